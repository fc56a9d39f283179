"""``volumed ground``: one mask per positive sentence on the input grid, grounding.json, DICOM SEG."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from volumed.data.phantoms import make_case
from volumed.errors import ConfigError, OutputExistsError
from volumed.heads.grounding import (
    GroundingConfig,
    build_grounding_model,
    save_grounding_package,
)
from volumed.inference import ground as ground_module
from volumed.inference.ground import GroundingPredictor, ground
from volumed.io import read_volume
from volumed.io.writer import read_dicom_seg, write_nifti

SENTENCES = ["12 mm nodule in the right lower lobe", "No pleural effusion.", "A 2 cm lesion in the liver."]


@pytest.fixture(scope="module")
def gpackage(tmp_path_factory):
    """An untrained tiny grounding package (6 mm model grid, 64 x 64 x 16 patch)."""
    from shared_helpers import tiny_config

    torch.manual_seed(0)
    config = tiny_config(["liver", "lung_lower_lobe_right"])
    return save_grounding_package(build_grounding_model(config), config, GroundingConfig(), tmp_path_factory.mktemp("g") / "model")


@pytest.fixture(scope="module")
def phantom_image(tmp_path_factory):
    case = make_case(2, index=0, shape=(48, 40, 24), spacing=(5.0, 6.0, 7.0), lesion_rate=1.0)
    return write_nifti(case.image, tmp_path_factory.mktemp("img") / "ct.nii.gz")


def _box_probabilities(seg, gated, case, queries):
    """Stands in for the network: every sentence 'found' in a box of the model grid, 0.9 inside."""
    n = queries.shape[0] // 2
    probs = torch.zeros((n, *case.model_shape))
    x, y, z = (s // 2 for s in case.model_shape)
    for k in range(n):
        probs[k, x - 2 - k : x + 2, y - 2 : y + 2, z - 1 : z + 1] = 0.9
    return probs


def test_outputs_are_on_the_input_grid_with_one_mask_per_positive_sentence(gpackage, phantom_image, tmp_path, monkeypatch):
    monkeypatch.setattr(ground_module, "_predict_gated", _box_probabilities)
    report = tmp_path / "report.txt"
    report.write_text("Non-contrast CT. A 9 mm nodule in the left upper lobe. The spleen is normal.")
    out = tmp_path / "out"
    result = ground(phantom_image, SENTENCES, report=report, model_dir=gpackage, out_dir=out, organ_margin_mm=None)
    doc = json.loads((out / "grounding.json").read_text())
    assert [f["sentence"] for f in doc["findings"]] == SENTENCES + ["A 9 mm nodule in the left upper lobe."]
    assert [f["negated"] for f in doc["findings"]] == [False, True, False, False]
    assert [f["mask"] for f in doc["findings"]] == ["masks/finding_01.nii.gz", None, "masks/finding_02.nii.gz",
                                                   "masks/finding_03.nii.gz"]
    first = doc["findings"][0]
    assert first["location"] == {"term": "lung_lower_lobe_right", "region": None, "side": "right",
                                 "query_text": "lung_lower_lobe_right"}
    assert first["size_mm"] == [12.0] and first["finding_type"] == "nodule" and first["found"]
    # Mean probability inside the mask: 0.9 in the box, less at its edges after trilinear inversion.
    assert 0.5 < first["confidence"] <= 0.9 and first["max_probability"] == pytest.approx(0.9)
    assert len(first["instances"]) == 1
    assert doc["findings"][1]["confidence"] is None and doc["findings"][1]["volume_ml"] == 0
    image = nib.load(str(phantom_image))
    for f in doc["findings"]:
        if f["mask"]:
            mask = nib.load(str(out / f["mask"]))
            assert mask.shape == image.shape and np.allclose(mask.affine, image.affine)
            data = np.asarray(mask.dataobj)
            assert data.sum() * np.prod(image.header.get_zooms()) / 1000 == pytest.approx(f["volume_ml"], rel=1e-3)
    assert result.dicom_seg is None and not list(tmp_path.glob(".out.volumed-*"))  # staging removed
    assert any(line.startswith("negated: 'No pleural effusion.'") for line in result.summary())
    # Nothing is overwritten without overwrite=True; with it, the old masks go.
    with pytest.raises(OutputExistsError, match="earlier run"):
        ground(phantom_image, SENTENCES[:1], model_dir=gpackage, out_dir=out)
    ground(phantom_image, SENTENCES[:1], model_dir=gpackage, out_dir=out, overwrite=True)
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["finding_01.nii.gz"]


def test_untrained_network_runs_end_to_end_and_negated_sentences_are_never_predicted(gpackage, phantom_image):
    predictor = GroundingPredictor.from_package(gpackage)
    from volumed.heads.grounding import finding_queries

    volume = read_volume(phantom_image)
    results = predictor.ground(volume, finding_queries(SENTENCES))
    assert results[1].mask is None and not results[1].found
    for r in (results[0], results[2]):
        assert r.mask.shape == volume.shape and r.mask.dtype == bool
        assert (r.confidence is None) == (not r.found)
        assert sum(i.voxels for i in r.instances) == int(r.mask.sum())


def test_bad_input_is_refused_before_the_network_runs(gpackage, phantom_image, tmp_path):
    with pytest.raises(ConfigError, match="at least one finding sentence"):
        ground(phantom_image, [], model_dir=gpackage, out_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match="empty finding sentence"):
        ground(phantom_image, [""], model_dir=gpackage, out_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match="English"):
        ground(phantom_image, ["Kein Pleuraerguss, keine Raumforderung in der Leber."], model_dir=gpackage, out_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match="not a grounding model folder"):
        ground(phantom_image, SENTENCES, model_dir=tmp_path, out_dir=tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.realdata
def test_dicom_input_gets_a_seg_with_one_segment_per_found_sentence(gpackage, ts_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(ground_module, "_predict_gated", _box_probabilities)
    series = ts_dir / "example_ct_dicom_with_uids"
    volume = read_volume(series)
    result = ground(series, SENTENCES, model_dir=gpackage, out_dir=tmp_path / "out", organ_margin_mm=None)
    assert result.dicom_seg == tmp_path / "out" / "grounding_seg.dcm"
    seg = read_dicom_seg(result.dicom_seg, volume)
    assert seg.referenced_series_uid == volume.source.series_uid and len(seg.segments) == 2
    for info, mask_name in zip(seg.segments, ("finding_01", "finding_02")):
        mask = np.asarray(nib.load(str(tmp_path / "out" / "masks" / f"{mask_name}.nii.gz")).dataobj) > 0
        # Where two sentences share voxels, the SEG gives each voxel to one of them.
        assert seg.masks[info.number].sum() <= mask.sum() and np.all(mask[seg.masks[info.number] > 0])


def test_cli_ground(gpackage, phantom_image, tmp_path, monkeypatch, capsys):
    from volumed.cli import main

    monkeypatch.setattr(ground_module, "_predict_gated", _box_probabilities)
    with pytest.raises(SystemExit) as exit_info:
        main(["ground", str(phantom_image), "--finding", SENTENCES[0], "--finding", SENTENCES[1],
              "--finding", "The liver is normal.", "--model", str(gpackage), "-o", str(tmp_path / "out"),
              "--no-organ-gate"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "found: '12 mm nodule in the right lower lobe' -> masks/finding_01.nii.gz" in printed
    assert "negated: 'No pleural effusion.' (no mask)" in printed
    assert "normal: 'The liver is normal.' (no finding, no mask)" in printed
    record = json.loads((tmp_path / "out" / "grounding.json").read_text())["findings"]
    assert [(f["negated"], f["normal"], f["mask"]) for f in record[1:]] == [(True, False, None), (True, True, None)]
    assert not (tmp_path / "out" / "masks" / "finding_03.nii.gz").exists()


@pytest.mark.realdata
def test_anatomy_sentences_on_a_real_ct_are_grounded_to_their_structure(ts_dir, tmp_path, capsys):
    """ "The liver." names one structure and nothing else: `volumed ground` answers it with the
    default segmenter (the grounding bundle's own segmenter was fine-tuned on finding phantoms and
    gives Dice 0.03 here, BENCHMARKS.md), on the input grid, against the real reference masks.
    Both models trained on this scan: this checks the routing, not unseen-scan accuracy."""
    from pathlib import Path

    from volumed.cli import main
    from volumed.io import read_label

    bundle = Path(__file__).resolve().parents[3] / "bundles" / "volumed_ground_ct" / "models"
    image = ts_dir / "example_ct_sm.nii.gz"
    volume = read_volume(image)
    labels = read_label(ts_dir / "example_seg.nii.gz", reference=volume).data
    with pytest.raises(SystemExit) as exit_info:
        # No --model: the shipped grounding bundle is the default, as for `volumed segment`.
        main(["ground", str(image), "-f", "The liver.", "-f", "the left kidney", "-f", "No ascites.",
              "-f", "Splenomegaly.", "-o", str(tmp_path / "out")])
    assert exit_info.value.code in (0, None)
    record = json.loads((tmp_path / "out" / "grounding.json").read_text())
    assert Path(record["model"]["path"]).resolve() == bundle.resolve()
    findings = record["findings"]
    assert [(f["anatomy"], f["location"]["term"]) for f in findings[:2]] == [(True, "liver"), (True, "kidney_left")]
    assert findings[2]["negated"] and findings[2]["mask"] is None
    # An enlarged organ is a non-focal finding: its mask is the organ, from the segmenter.
    assert (findings[3]["anatomy"], findings[3]["location"]["term"], findings[3]["finding_type"]) == (True, "spleen", "enlargement")
    for f, label, least in zip([*findings[:2], findings[3]], (5, 3, 1), (0.88, 0.80, 0.88)):
        img = nib.load(str(tmp_path / "out" / f["mask"]))
        assert np.allclose(img.affine, nib.load(str(image)).affine, atol=1e-4) and img.shape == volume.shape
        pred, ref = np.asarray(img.dataobj) > 0, labels == label
        dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
        assert dice >= least, (f["sentence"], dice)


def _centre_and_corner(seg, gated, case, queries):
    """Stands in for the network: the first sentence 'found' in the middle of the model grid and in
    one of its corners (air around the phantom's body)."""
    probs = _box_probabilities(seg, gated, case, queries)
    probs[0, :3, :3, :3] = 0.95
    return probs


@pytest.mark.parametrize("body_only", [True, False])
def test_findings_stay_inside_the_body(gpackage, phantom_image, monkeypatch, body_only):
    from volumed.heads.grounding import finding_queries
    from volumed.inference.body import body_mask

    monkeypatch.setattr(ground_module, "_predict_gated", _centre_and_corner)
    volume = read_volume(phantom_image)
    body = body_mask(volume)
    assert not body[0, 0, 0] and body[tuple(s // 2 for s in volume.shape)]
    found = GroundingPredictor.from_package(gpackage, body_only=body_only, organ_margin_mm=None).ground(volume, finding_queries(SENTENCES[:1]))[0]
    assert found.found and found.mask[tuple(s // 2 for s in volume.shape)]
    if body_only:  # the corner is gone from the mask, its instances and its confidence
        assert len(found.instances) == 1 and not (found.mask & ~body).any()
        assert found.max_probability == pytest.approx(0.9)
    else:
        assert len(found.instances) == 2 and (found.mask & ~body).any()
        assert found.max_probability == pytest.approx(0.95)


@pytest.mark.realdata
def test_a_finding_stays_near_the_structure_its_sentence_names(gpackage, ts_dir, monkeypatch):
    """A network that 'finds' every sentence everywhere: the liver lesion's mask is the default
    segmenter's liver grown by 10 mm plus the stated 20 mm, so it holds the reference liver and
    nothing far from it; a place the segmenter does not know ('the lungs', a group) leaves the
    finding in the body."""
    from scipy import ndimage

    from volumed.heads.grounding import finding_queries
    from volumed.inference.body import body_mask
    from volumed.io import read_label

    def everywhere(seg, gated, case, queries):
        return torch.full((queries.shape[0] // 2, *case.model_shape), 0.9)

    monkeypatch.setattr(ground_module, "_predict_gated", everywhere)
    image = ts_dir / "example_ct_sm.nii.gz"
    volume = read_volume(image)
    liver = read_label(ts_dir / "example_seg.nii.gz", reference=volume).data == 5
    lesion, nodule = GroundingPredictor.from_package(gpackage).ground(
        volume, finding_queries(["A 20 mm hypodense lesion in the liver.", "A 9 mm nodule in the lungs."]))
    assert lesion.search_region == {"kind": "organ", "term": "liver", "margin_mm": 30.0}
    assert nodule.search_region == {"kind": "body"}
    assert np.array_equal(nodule.mask, body_mask(volume))
    assert (lesion.mask & liver).sum() >= 0.98 * liver.sum()
    distance = ndimage.distance_transform_edt(~liver, sampling=volume.spacing)
    # Within the margin of the reference liver, give or take 3 voxels, except where the
    # segmenter's liver strays (here 291 voxels up to 31 mm outside the reference liver).
    near = distance[lesion.mask] <= 30.0 + 9.0
    assert near.mean() >= 0.95 and distance[lesion.mask].max() <= 30.0 + 35.0
    assert lesion.mask.sum() < 0.6 * nodule.mask.sum()


def test_an_mr_is_not_gated_by_a_ct_segmenter(gpackage, phantom_image, monkeypatch):
    """The default segmenter is CT-only: on an MR the finding keeps the whole image (no body mask
    either: MR has no fixed intensity scale), and says so."""
    from volumed.heads.grounding import finding_queries

    monkeypatch.setattr(ground_module, "_predict_gated", _centre_and_corner)
    ct = read_volume(phantom_image)
    mr = type(ct)(ct.data, ct.affine, "MR")
    found = GroundingPredictor.from_package(gpackage).ground(mr, finding_queries(SENTENCES[:1]))[0]
    assert found.search_region == {"kind": "image"} and len(found.instances) == 2


@pytest.mark.realdata
def test_anatomy_sentences_and_the_organ_gate_share_one_segmenter_pass(gpackage, ts_dir, monkeypatch):
    """A request with an anatomy sentence and a finding in the same structure runs the default
    segmenter once (one preprocessing, one sliding-window pass over the union of structures), and
    each answer is what it is alone."""
    from volumed.heads.grounding import finding_queries
    from volumed.inference.segment import PromptSegPredictor

    def everywhere(seg, gated, case, queries):
        return torch.full((queries.shape[0] // 2, *case.model_shape), 0.9)

    monkeypatch.setattr(ground_module, "_predict_gated", everywhere)
    calls = []
    original = PromptSegPredictor.predict_probabilities

    def counted(self, case, queries, **kwargs):
        calls.append(int(queries.shape[0]))
        return original(self, case, queries, **kwargs)

    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", counted)
    volume = read_volume(ts_dir / "example_ct_sm.nii.gz")
    predictor = GroundingPredictor.from_package(gpackage)
    liver, lesion = predictor.ground(volume, finding_queries(["The liver.", "A 20 mm hypodense lesion in the liver."]))
    assert calls == [1]  # the liver, once, for both
    assert liver.query.anatomy and liver.found and lesion.search_region["term"] == "liver"
    alone_liver = predictor.ground(volume, finding_queries(["The liver."]))[0]
    alone_lesion = predictor.ground(volume, finding_queries(["A 20 mm hypodense lesion in the liver."]))[0]
    assert np.array_equal(liver.mask, alone_liver.mask) and liver.confidence == alone_liver.confidence
    assert np.array_equal(lesion.mask, alone_lesion.mask) and lesion.search_region == alone_lesion.search_region


def test_a_lobes_finding_is_searched_in_its_whole_lung_and_a_small_unsure_organ_is_no_region():
    """The search region of a lobe is every lobe of its side the segmenter found (the middle
    lobe, found 90 mm away, does not keep the nodule from the lower lobe next to it); a kidney
    the presence rule calls absent (small and unsure) leaves the finding in the image."""
    from types import SimpleNamespace

    from volumed.heads.grounding import finding_queries
    from volumed.inference.ground import _region_terms

    assert _region_terms("lung_middle_lobe_right") == ("lung_upper_lobe_right", "lung_middle_lobe_right",
                                                       "lung_lower_lobe_right")
    assert _region_terms("lung_upper_lobe_left") == ("lung_upper_lobe_left", "lung_lower_lobe_left")
    assert _region_terms("liver") == ("liver",) and _region_terms(None) == ()
    volume = SimpleNamespace(shape=(60, 20, 20), spacing=(2.0, 2.0, 2.0))

    def piece(x0, x1, p):
        where = (slice(x0, x1), slice(5, 15), slice(5, 15))
        return where, np.full((x1 - x0, 10, 10), p, dtype=np.float32)

    pieces = {"lung_middle_lobe_right": [piece(0, 5, 0.95)], "lung_lower_lobe_right": [piece(50, 60, 0.95)],
              "kidney_left": [piece(20, 22, 0.6)]}  # 0.4 mL at mean 0.6: absent
    owner = SimpleNamespace(body_only=False, organ_margin_mm=10.0)
    queries = finding_queries(["A 9 mm nodule in the right middle lobe.", "A 12 mm cyst in the left kidney."])
    assert [q.location_term for q in queries] == ["lung_middle_lobe_right", "kidney_left"]
    within, regions = GroundingPredictor._search_regions(owner, volume, queries, pieces, 0.5,
                                                         {"min_ml": 10.0, "min_confidence": 0.8})
    lung, kidney = within
    assert regions[0] == {"kind": "organ", "term": "lung_middle_lobe_right", "margin_mm": 19.0,
                          "structures": ["lung_middle_lobe_right", "lung_lower_lobe_right"]}
    assert lung[55, 10, 10] and lung[2, 10, 10] and not lung[30, 10, 10]  # both lobes, not the gap
    assert lung[45, 10, 10]  # 10 mm outside the lower lobe: within 19 mm
    assert kidney is None and regions[1] == {"kind": "image"}
    # Without the rule the same small kidney is a region.
    within, regions = GroundingPredictor._search_regions(owner, volume, queries[1:], pieces, 0.5, None)
    assert regions[0]["kind"] == "organ" and within[0][21, 10, 10]
