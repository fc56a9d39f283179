"""Connected-component post-processing of ``volumed segment`` (volumed.inference.postprocess):
a one-body structure keeps only its largest component, voxel for voxel as without
post-processing; a multi-piece one keeps all; on every inversion path (index copy of hot voxels,
resampled boxes of lazily blended windows, a full-resolution probability map), in the masks, the
label map, the statistics and the CLI.

A tiny untrained package; the network's output is replaced by two blobs per term (a large one and
a small one, far apart) on the model grid."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from volumed.cli import main
from volumed.data.transforms import BoxInverter
from volumed.data.vocab import default_vocabulary
from volumed.errors import ConfigError
from volumed.inference.blending import WindowLogits
from volumed.inference.body import body_mask
from volumed.inference.package import PromptSegConfig, build_model, load_package, read_config
from volumed.inference.postprocess import (
    LARGEST_COMPONENT,
    ComponentFilter,
    default_rule,
    largest_component,
    postprocess_rules,
)
from volumed.inference.segment import PromptSegPredictor, resolve_prompts, segment
from volumed.inference.stats import compute_statistics
from volumed.io import read_volume
from volumed.io.volume import Volume

TERMS = ["liver", "colon", "kidney_left"]
CONNECTIVITY_26 = np.ones((3, 3, 3), bool)


def _two_blob_logits(coarse_shape, n_terms: int, big, small) -> torch.Tensor:
    """Coarse logits ``(n_terms, *coarse_shape)``: every term +4 in the cells ``big`` and
    ``small`` (tuples of slices), -20 elsewhere."""
    logits = torch.full((n_terms, *coarse_shape), -20.0)
    logits[(slice(None), *big)] = 4.0
    logits[(slice(None), *small)] = 4.0
    return logits


def _probability_maps(pieces_by_term, shape) -> dict[int, np.ndarray]:
    """Per term, the inverted probabilities on the original grid (0 where none was computed)."""
    maps = {}
    for k, pieces in pieces_by_term:
        out = np.zeros(shape, np.float32)
        for where, values in pieces or ():
            out[where] = np.maximum(out[where], values)
        maps[k] = out
    return maps


def _check_largest_kept_exactly(predictor, probs, case, volume, rules):
    """iter_original with and without the rules: the liver (rule largest_component) keeps one
    26-component of its raw mask, the largest, with the raw probabilities voxel for voxel; the
    colon (no rule) is unchanged. Returns the raw and post-processed masks."""
    raw = _probability_maps(predictor.iter_original(probs, case), volume.shape)
    components = ComponentFilter(rules, 0.5)
    post = _probability_maps(predictor.iter_original(probs, case, components), volume.shape)
    raw_liver, post_liver = raw[0] > 0.5, post[0] > 0.5
    labels, count = ndimage.label(raw_liver, CONNECTIVITY_26)
    assert count == 2, "the fake output should give two liver blobs"
    sizes = np.bincount(labels.ravel())[1:]
    np.testing.assert_array_equal(post_liver, labels == 1 + int(sizes.argmax()))
    # The kept blob: bit for bit the probabilities of the raw output.
    np.testing.assert_array_equal(post[0][post_liver], raw[0][post_liver])
    assert components.removed == {0: 1} and components.postprocessing(0).rule == LARGEST_COMPONENT
    np.testing.assert_array_equal(post[1], raw[1])  # colon: every component, untouched
    assert ndimage.label(post[1] > 0.5, CONNECTIVITY_26)[1] == 2
    assert components.postprocessing(1).rule is None and components.postprocessing(1).removed_components is None
    return raw_liver, post_liver


# ------------------------------------------------------------------------------------ the rules


def test_default_rules_keep_the_largest_component_of_one_body_structures_only():
    vocab = default_vocabulary()
    one_body = ["liver", "spleen", "kidney_left", "gallbladder", "stomach", "pancreas", "heart", "aorta",
                "inferior_vena_cava", "urinary_bladder", "lung_upper_lobe_left", "lung_middle_lobe_right",
                "femur_left", "hip_right", "sacrum", "trachea", "esophagus", "spinal_cord", "vertebrae_L1", "rib_left_3"]
    several = ["colon", "small_bowel", "duodenum", "portal_vein_and_splenic_vein", "costal_cartilages",
               "kidney", "lung_left", "lung", "ribs", "vertebrae_lumbar"]
    terms = vocab.resolve_all(one_body + several, "CT")
    assert postprocess_rules(terms) == [LARGEST_COMPONENT] * len(one_body) + [None] * len(several)
    free = resolve_prompts(["pulmonary artery", "hepatic cyst"], "CT", allow_free_text=True)
    assert [default_rule(t) for t in free] == [LARGEST_COMPONENT, None]  # trained free text / any free text
    assert [default_rule(t) for t in vocab.resolve_all(["lung_left", "vertebrae"], "MR")] == [None, None]  # groups, classes in MR
    # Overrides, in turn: by canonical name, synonym or free text, ignoring case.
    two = vocab.resolve_all(["left kidney", "colon"], "CT")
    assert postprocess_rules(two, {"Left Kidney": None}, {"colon": "largest_component"}) == [None, LARGEST_COMPONENT]
    assert postprocess_rules(two, {"kidney_left": None}, {"kidney left": "largest_component"}) == [LARGEST_COMPONENT, None]
    with pytest.raises(ConfigError, match="unknown post-processing rule"):
        postprocess_rules(two, {"colon": "biggest"})


def test_largest_component_is_26_connected_and_ties_go_to_the_first():
    hot = np.zeros((6, 6, 6), bool)
    hot[0, 0, 0] = hot[1, 1, 1] = hot[2, 2, 2] = True  # corner-touching: one component
    hot[5, 5, 5] = hot[5, 5, 4] = True  # a second one of 2 voxels
    keep, count = largest_component(hot)
    assert count == 2 and keep.sum() == 3 and keep[0, 0, 0] and not keep[5, 5, 5]
    hot[4, 4, 3] = True  # now 3 voxels each: the first in scan order wins
    keep, count = largest_component(hot)
    assert count == 2 and keep[0, 0, 0] and not keep[5, 5, 5]


def test_package_config_records_overrides_and_old_packages_get_the_default(package, tmp_path):
    assert read_config(package).postprocess == {}
    data = json.loads((package / "config.json").read_text())
    data.pop("postprocess")  # a package written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert read_config(tmp_path).postprocess == {}
    data["postprocess"] = {"liver": None, "colon": "largest_component"}
    config = PromptSegConfig.from_dict(data)
    assert json.loads(config.to_json())["postprocess"] == {"liver": None, "colon": "largest_component"}
    predictor = PromptSegPredictor(build_model(config), config)
    terms = predictor.resolve_prompts(["liver", "colon", "left kidney"], "CT")
    assert predictor.postprocess_rules(terms) == [None, LARGEST_COMPONENT, LARGEST_COMPONENT]
    assert predictor.postprocess_rules(terms, {"liver": "largest_component"}) == [LARGEST_COMPONENT] * 3
    assert predictor.postprocess_rules(terms, False) == [None] * 3
    with pytest.raises(ConfigError, match="unknown post-processing rule"):
        PromptSegConfig.from_dict({**data, "postprocess": {"liver": "largest"}})
    # The committed default package (written before the field) still reads, with the default.
    bundle = Path(__file__).resolve().parents[3] / "bundles" / "volumed_promptseg_ct" / "models"
    if (bundle / "config.json").is_file():
        assert read_config(bundle).postprocess == {}


# ----------------------------------------------------------------------------- inversion paths


def test_index_copy_of_hot_voxels_keeps_the_largest_blob_exactly(package, text_encoder, monkeypatch):
    """Lazily blended windows, model grid == original grid (up to flips): hot voxels copied."""
    model, config = load_package(package)
    config = replace(config, preprocessing=dict(modality="CT", target_spacing=None, crop_foreground=False))
    predictor = PromptSegPredictor(model, config, text_encoder=text_encoder)
    # LAS: the copy flips x, so the components are those of the flipped voxels.
    volume = Volume(np.full((24, 20, 20), 40.0, np.float32), np.diag([-1.0, 1.0, 1.0, 1.0]), "CT")
    case = predictor.preprocess(volume)
    assert BoxInverter(case).is_index_copy
    logits = _two_blob_logits((12, 10, 10), 2, (slice(1, 6), slice(1, 6), slice(1, 6)), (slice(9, 11), slice(7, 9), slice(7, 9)))
    probs = WindowLogits([logits], [(0, 0, 0)], (24, 20, 20), (2, 2, 2), (24, 20, 20), (24, 20, 20), (0, 0, 0),
                         torch.ones(24, 20, 20))  # fmt: skip
    terms = predictor.resolve_prompts(["liver", "colon"], "CT")
    rules = predictor.postprocess_rules(terms)
    assert rules == [LARGEST_COMPONENT, None]
    raw_liver, post_liver = _check_largest_kept_exactly(predictor, probs, case, volume, rules)

    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", lambda self, case, q, progress=False: probs)
    pred = predictor.predict(volume, terms)
    raw = predictor.predict(volume, terms, postprocess=False)
    np.testing.assert_array_equal(pred.masks[0], post_liver)
    np.testing.assert_array_equal(raw.masks[0], raw_liver)
    np.testing.assert_array_equal(pred.masks[1], raw.masks[1])
    assert compute_statistics(pred.masks[0], volume, "liver").components == 1
    assert [p.to_dict() for p in pred.postprocessing] == [
        {"postprocess": LARGEST_COMPONENT, "removed_components": 1, "removed_outside_body_ml": 0.0},
        {"postprocess": None, "removed_components": None, "removed_outside_body_ml": 0.0}]
    assert [p.rule for p in raw.postprocessing] == [None, None]
    # The label map: the removed blob goes to the colon (the liver won the tie there before).
    removed = raw_liver & ~post_liver
    assert np.all(raw.label_map[removed] == 1) and np.all(pred.label_map[removed] == 2)
    assert np.all(pred.label_map[post_liver] == 1)
    # Confidence: over the kept blob only, with its exact probabilities.
    full = probs[0:1][0].flip(0).numpy()  # the model grid flipped onto the LAS original grid
    assert pred.evidence[0].confidence == pytest.approx(float(full[post_liver].mean()), abs=1e-6)


@pytest.mark.realdata
def test_resampled_boxes_of_blended_windows_keep_the_largest_blob_exactly(package, ts_dir, text_encoder, monkeypatch):
    """A real CT at 3 mm, the model at 6 mm (cropped to the body): hot regions, resampled box to box."""
    predictor = PromptSegPredictor(*load_package(package), text_encoder=text_encoder)
    volume = read_volume(ts_dir / "example_ct_sm.nii.gz")
    case = predictor.preprocess(volume)
    assert not BoxInverter(case).is_index_copy
    shape = case.model_shape
    padded = [-(-n // 2) * 2 for n in shape]
    coarse = [p // 2 for p in padded]
    logits = _two_blob_logits(coarse, 2, (slice(3, 11), slice(4, 12), slice(2, 6)), (slice(20, 23), slice(16, 19), slice(2, 5)))
    probs = WindowLogits([logits], [(0, 0, 0)], tuple(padded), (2, 2, 2), tuple(padded), shape, (0, 0, 0),
                         torch.ones(padded))  # fmt: skip
    terms = predictor.resolve_prompts(["liver", "colon"], "CT")
    for slack in (0, 10**9):  # the blobs in boxes of their own, or one box holding both
        probs.merge_slack = slack
        assert len(probs.regions(0, 0.5)) == (2 if slack == 0 else 1)
        raw_liver, post_liver = _check_largest_kept_exactly(predictor, probs, case, volume, predictor.postprocess_rules(terms))

    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", lambda self, case, q, progress=False: probs)
    pred = predictor.predict(volume, terms)
    # The kept component, less what lies outside the patient's body (the blobs are placed by hand).
    body = body_mask(volume)
    np.testing.assert_array_equal(pred.masks[0], post_liver & body)
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    assert pred.postprocessing[0].outside_body_ml == pytest.approx(np.count_nonzero(post_liver & ~body) * voxel_ml, abs=1e-3)
    assert compute_statistics(pred.masks[0], volume, "liver").components == 1
    assert not np.any(pred.label_map[raw_liver & ~post_liver] == 1)


def test_a_removed_blob_inside_the_box_of_the_kept_component_is_removed_there_too(package, text_encoder):
    """An L-shaped component and a smaller blob in its corner, 2 mm model grid resampled onto 1 mm:
    the L's box (not merged with the blob's) holds the blob, which must be zeroed in it too."""
    model, config = load_package(package)
    config = replace(config, preprocessing=dict(modality="CT", target_spacing=[2.0, 2.0, 2.0], crop_foreground=False))
    predictor = PromptSegPredictor(model, config, text_encoder=text_encoder)
    volume = Volume(np.full((40, 40, 40), 40.0, np.float32), np.eye(4), "CT")
    case = predictor.preprocess(volume)
    assert case.model_shape == (20, 20, 20) and not BoxInverter(case).is_index_copy
    logits = torch.full((2, 10, 10, 10), -20.0)
    logits[:, 0:6, 0, 2:7] = 10.0  # the L: a row along x ...
    logits[:, 0, 0:6, 2:7] = 10.0  # ... and a column along y (55 cells)
    logits[:, 4:7, 4:7, 3:6] = 10.0  # the blob (27 cells), in the L's corner, three cells away from it
    probs = WindowLogits([logits], [(0, 0, 0)], (20, 20, 20), (2, 2, 2), (20, 20, 20), (20, 20, 20), (0, 0, 0),
                         torch.ones(20, 20, 20))  # fmt: skip
    probs.merge_slack = 0
    (l_core, l_box), (blob_core, _) = probs.regions(0, 0.5)
    assert l_core[0][1] > blob_core[0][0] and l_core[1][1] > blob_core[1][0]  # the L's box reaches into the blob
    terms = predictor.resolve_prompts(["liver", "colon"], "CT")
    _check_largest_kept_exactly(predictor, probs, case, volume, predictor.postprocess_rules(terms))


def _blob_probabilities(self, case, queries, *, progress=False):
    """Full-resolution stand-in for the network on the model grid: every term 0.9 in a large and
    a small blob, 0.1 elsewhere (no smooth edge: the boxes' resampling still reads 0.1 around)."""
    probs = torch.full((queries.shape[0], *case.model_shape), 0.1)
    probs[:, 4:16, 6:18, 3:9] = 0.9
    probs[:, 24:28, 24:28, 4:8] = 0.9
    return probs


@pytest.mark.realdata
def test_segment_writes_postprocessed_masks_statistics_and_label_map_and_no_postprocess_keeps_all(
    package, ts_dir, tmp_path, monkeypatch, capsys
):
    """Full-resolution probabilities resampled onto a real CT, through segment() and the CLI."""
    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", _blob_probabilities)
    image = ts_dir / "example_ct_sm.nii.gz"
    result = segment(image, ["liver", "colon"], model_dir=package, out_dir=tmp_path / "post", progress=False)
    argv = ["segment", str(image), "--model", str(package), "-o", str(tmp_path / "raw"), "-p", "liver", "-p", "colon",
            "--no-progress", "--no-postprocess"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    capsys.readouterr()

    def read(out: Path):
        masks = {t: np.asarray(nib.load(str(out / "masks" / f"{t}.nii.gz")).dataobj).astype(bool) for t in ("liver", "colon")}
        label = np.asarray(nib.load(str(out / "labels.nii.gz")).dataobj)
        return masks, label, json.loads((out / "statistics.json").read_text())["terms"], json.loads((out / "labels.json").read_text())

    post, post_label, post_stats, post_table = read(tmp_path / "post")
    raw, raw_label, raw_stats, raw_table = read(tmp_path / "raw")
    labels, count = ndimage.label(raw["liver"], CONNECTIVITY_26)
    assert count == 2  # --no-postprocess keeps both blobs
    # Post-processed: the largest component, then only what lies inside the patient's body (the
    # small blob's corner reaches the air beside the patient).
    body = body_mask(read_volume(image))
    largest = labels == 1 + int(np.bincount(labels.ravel())[1:].argmax())
    assert (largest & ~body).any()
    np.testing.assert_array_equal(post["liver"], largest & body)
    np.testing.assert_array_equal(post["colon"], raw["colon"] & body)
    voxel_ml = float(np.prod(read_volume(image).spacing)) / 1000
    assert post_stats["liver"]["removed_outside_body_ml"] == pytest.approx((largest & ~body).sum() * voxel_ml, abs=1e-3)
    assert raw_stats["liver"]["removed_outside_body_ml"] is None
    assert ndimage.label(post["colon"], CONNECTIVITY_26)[1] == 2
    # Statistics: of the post-processed masks, with the rule applied and what it removed.
    assert post_stats["liver"]["components"] == 1 and post_stats["colon"]["components"] == 2
    assert post_stats["liver"]["voxels"] == int(post["liver"].sum()) < raw_stats["liver"]["voxels"]
    assert post_stats["liver"]["postprocess"] == "largest_component"
    assert post_stats["liver"]["removed_components"] == 1 and post_stats["colon"]["postprocess"] is None
    assert raw_stats["liver"]["components"] == 2 and raw_stats["liver"]["postprocess"] is None
    assert result.terms[0].statistics.components == 1 and result.terms[0].postprocessing.removed_components == 1
    assert [post_table["labels"][v]["postprocess"] for v in ("1", "2")] == ["largest_component", None]
    assert [raw_table["labels"][v]["postprocess"] for v in ("1", "2")] == [None, None]
    assert "largest_component" in post_table["postprocess"]
    # The label map: no liver voxel in the removed blob, which the colon now holds inside the body
    # (outside it, neither).
    removed = raw["liver"] & ~largest
    assert removed.any() and not np.any(post_label[removed] == 1)
    assert np.all(post_label[removed & body] == 2) and np.all(post_label[~body] == 0)
    assert np.all(raw_label[removed] == 1)
    assert "1 fragment(s) removed" in result.summary()[1]
    # An override from the caller: the liver keeps both blobs too.
    kept = segment(image, ["liver"], model_dir=package, out_dir=tmp_path / "override", progress=False,
                   postprocess={"liver": None})
    assert kept.terms[0].statistics.components == 2 and kept.terms[0].postprocessing.rule is None
    with pytest.raises(ConfigError, match="unknown post-processing rule"):
        segment(image, ["liver"], model_dir=package, out_dir=tmp_path / "bad", postprocess={"liver": "largest"})
    assert not (tmp_path / "bad").exists()


def _torso_with_table() -> Volume:
    """A 2 mm soft-tissue torso in air with a dense table 7 mm under it (RAS, so the model grid is
    the image grid turned only by the package's resampling)."""
    shape = (60, 56, 24)
    x, y, _ = np.ogrid[: shape[0], : shape[1], : shape[2]]
    data = np.full(shape, -1000.0, dtype=np.float32)
    data[np.broadcast_to(((x - 30) / 22.0) ** 2 + ((y - 26) / 16.0) ** 2 <= 1.0, shape)] = 40.0
    data[8:52, 46:49, :] = 1000.0  # the table
    return Volume(data, np.diag([2.0, 2.0, 2.0, 1.0]), "CT")


def _liver_inside_colon_on_the_table(self, case, queries, *, progress=False):
    """Stands in for the network: the liver a box in the middle of the torso, the colon exactly
    the table (the brightest voxels of the model-grid image), kidney_left nowhere."""
    image = case.image[0]
    probs = torch.full((queries.shape[0], *case.model_shape), 0.05)
    x, y, z = (s // 2 for s in case.model_shape)
    probs[0, x - 4 : x + 4, y - 4 : y + 4, z - 3 : z + 3] = 0.9
    probs[1][image >= image.max() - 1e-3] = 0.9
    return probs


def test_ct_masks_stay_inside_the_body_and_a_structure_only_on_the_table_is_absent(package, tmp_path, monkeypatch):
    from volumed.inference.structured_report import build_structured_report
    from volumed.inference.view import render_view
    from volumed.io.writer import write_nifti

    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", _liver_inside_colon_on_the_table)
    volume = _torso_with_table()
    image = write_nifti(volume, tmp_path / "torso.nii.gz")
    body = body_mask(volume)
    assert not body[30, 47, 12] and body[30, 26, 12]  # the table is out, the torso in
    result = segment(image, TERMS, model_dir=package, out_dir=tmp_path / "post", progress=False)
    liver, colon, _ = result.terms
    assert liver.evidence.present and colon.evidence.present is False
    assert colon.evidence.rejected["rule"] == "outside_body"
    # What the table held: about its 44 x 3 x 24 voxels of 8 uL, at probability 0.9.
    assert colon.evidence.rejected["volume_ml"] == pytest.approx(44 * 3 * 24 * 0.008, rel=0.35)
    assert colon.evidence.rejected["max_probability"] == pytest.approx(0.9, abs=1e-3)
    assert colon.postprocessing.outside_body_ml == pytest.approx(colon.evidence.rejected["volume_ml"])
    assert liver.postprocessing.outside_body_ml == 0.0
    out = tmp_path / "post"
    mask = np.asarray(nib.load(str(out / "masks" / "colon.nii.gz")).dataobj)
    labels = np.asarray(nib.load(str(out / "labels.nii.gz")).dataobj)
    assert not mask.any() and not np.any(labels == 2) and np.any(labels == 1)
    stats = json.loads((out / "statistics.json").read_text())["terms"]
    assert stats["colon"]["rejected"]["rule"] == "outside_body" and stats["colon"]["present"] is False
    assert stats["colon"]["removed_outside_body_ml"] == pytest.approx(colon.postprocessing.outside_body_ml)
    summary = "\n".join(result.summary())
    assert "outside the patient's body" in summary
    report = build_structured_report(out, volume)
    assert any("colon" in s.text.lower() and "outside the patient's body" in s.text for s in report.sentences)
    page = render_view(out, tmp_path / "view.html")
    assert ", outside the body" in page.path.read_text()
    # Without post-processing the table's "colon" is kept: the raw output.
    raw = segment(image, TERMS, model_dir=package, out_dir=tmp_path / "raw", progress=False, postprocess=False)
    assert raw.terms[1].evidence.present and raw.terms[1].postprocessing.outside_body_ml is None
