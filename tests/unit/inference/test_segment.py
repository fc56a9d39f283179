"""``volumed segment`` (volumed.inference.segment): outputs on the input grid for NIfTI and the real
DICOM series, SEG round trip, the label-map priority rule, small images, atomic outputs and
bad input (API and CLI).

A tiny untrained package is built once (STU-Net tiny, 6 mm model grid, 64x64x16 patch): geometry
and plumbing do not depend on accuracy, which the training engineer measures."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from volumed.cli import main
from volumed.errors import ConfigError, OutputExistsError, UnknownTermError
from volumed.data.transforms import BoxInverter, invert_to_original
from volumed.inference import preview as preview_module
from volumed.inference import segment as segment_module
from volumed.inference.body import body_mask
from volumed.inference.blending import WindowLogits, _cell_upper_bound, _merge_boxes
from volumed.inference.package import load_package
from volumed.inference.segment import (
    PRIORITY_RULE,
    PromptSegPredictor,
    is_trained,
    refuse_untrained,
    resolve_prompts,
    segment,
)
from volumed.inference.stats import compute_statistics
from volumed.io import read_volume
from volumed.io.volume import Volume
from volumed.io.writer import read_dicom_seg

TERMS = ["liver", "spleen", "kidney_left", "kidney_right", "costal_cartilages"]


def _nii(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def _assert_on_grid(path: Path, volume: Volume) -> np.ndarray:
    data, affine = _nii(path)
    assert data.shape == volume.shape, path
    np.testing.assert_allclose(affine, volume.affine, atol=1e-4, err_msg=str(path))
    return data


def fake_probabilities(self, case, queries, *, progress=False):
    """Deterministic stand-in for the network: term k lights up voxels with HU above 300 - 200 k."""
    hu = case.image.as_tensor()[0] * 2000.0 - 1000.0  # undo the -1000..1000 window
    return torch.stack([torch.sigmoid((hu - (300.0 - 200.0 * k)) / 20.0) for k in range(queries.shape[0])])


# ------------------------------------------------------------------------------------ geometry


def test_nifti_outputs_lie_on_the_input_grid(package, ts_dir, tmp_path):
    image = ts_dir / "example_ct_sm.nii.gz"
    volume = read_volume(image)
    out = tmp_path / "out"
    result = segment(image, ["liver", "left kidney"], model_dir=package, out_dir=out, progress=False)

    assert [t.name for t in result.terms] == ["liver", "kidney_left"]
    assert [t.prompt for t in result.terms] == ["liver", "left kidney"]
    assert all(t.trained and not t.free_text for t in result.terms)
    assert result.dicom_seg is None and result.dicom_sr is None and result.warnings == ()
    assert sorted(p.name for p in out.iterdir()) == ["labels.json", "labels.nii.gz", "masks", "preview.png", "report.txt",
                                                     "statistics.json"]
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["kidney_left.nii.gz", "liver.nii.gz"]
    assert not list(tmp_path.glob(".out.volumed-*")), "staging folder left behind"

    label = _assert_on_grid(out / "labels.nii.gz", volume)
    assert set(np.unique(label)) <= {0, 1, 2}
    stats = json.loads((out / "statistics.json").read_text())
    assert stats["shape"] == [122, 101, 30] and stats["modality"] == "CT"
    # Reproducibility: the model and the software that made these outputs.
    assert stats["model"]["path"] == str(package) and stats["software"]["torch"] == torch.__version__
    assert set(stats["software"]) == {"volumed", "monai", "torch", "lightning", "numpy", "python", "cuda"}
    for term in result.terms:
        mask = _assert_on_grid(term.mask_path, volume)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        # The label map never claims a voxel that the term's own mask does not hold.
        assert not np.any((label == term.value) & (mask == 0))
        # statistics.json is computed on the original grid, from exactly this mask.
        expected = compute_statistics(mask, volume, term.name).to_dict()
        saved = stats["terms"][term.name]
        assert saved["voxels"] == expected["voxels"] == int(mask.sum())
        assert saved["volume_ml"] == pytest.approx(mask.sum() * 27 / 1000)  # 3 mm isotropic
        assert saved["components"] == expected["components"]
        assert saved["bbox_voxels"] == [list(c) for c in expected["bbox_voxels"]]
        assert saved["intensity"]["unit"] == "HU"
    table = json.loads((out / "labels.json").read_text())
    assert table["labels"]["2"] == {"name": "kidney_left", "prompt": "left kidney", "free_text": False, "trained": True,
                                    "postprocess": "largest_component"}
    assert table["priority"] == PRIORITY_RULE and table["threshold"] == 0.5
    assert (out / "preview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # report.txt: the findings in words, the same lines the summary prints, under the image and model.
    report = (out / "report.txt").read_text().splitlines()
    assert report[0].startswith("volumed segmentation findings (research use only; not a medical device")
    assert report[1] == "image: example_ct_sm.nii.gz (CT, 122 x 101 x 30 voxels of 3 x 3 x 3 mm)"
    findings = result.summary()[: sum(t.present for t in result.terms) + 2]  # header, found lines, absent line
    assert findings[0].startswith("found ") and findings[-1].startswith("absent (")
    assert report[4:4 + len(findings)] == findings


def test_dicom_series_outputs_overlay_in_physical_space_and_seg_round_trips(package, ts_dir, tmp_path):
    series = ts_dir / "example_ct_dicom_with_uids"
    volume = read_volume(series)  # 512 x 512 x 20, LPS
    out = tmp_path / "out"
    result = segment(series, ["liver", "spleen"], model_dir=package, out_dir=out, progress=False)

    label = _assert_on_grid(out / "labels.nii.gz", volume)
    for term in result.terms:
        _assert_on_grid(term.mask_path, volume)
    assert result.dicom_seg == out / "segmentation.dcm" and result.warnings == ()
    assert result.dicom_sr == out / "report_sr.dcm" and result.dicom_sr.is_file()
    seg = read_dicom_seg(result.dicom_seg, volume)
    assert seg.referenced_series_uid == volume.source.series_uid
    assert seg.frame_of_reference_uid == volume.source.frame_of_reference_uid
    present = [t for t in result.terms if np.any(label == t.value)]
    assert present, "the untrained tiny model should still mark some voxels"
    assert [s.name for s in seg.segments] == [t.name for t in present]
    for segment_info, term in zip(seg.segments, present):
        np.testing.assert_array_equal(seg.masks[segment_info.number], label == term.value)


def test_dicom_series_without_uids_skips_the_seg_with_a_warning(package, ts_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", fake_probabilities)
    series = ts_dir / "example_ct_dicom"
    volume = read_volume(series)
    out = tmp_path / "out"
    result = segment(series, ["liver"], model_dir=package, out_dir=out, progress=False)
    assert result.dicom_seg is None and not (out / "segmentation.dcm").exists()
    assert result.dicom_sr is None and not (out / "report_sr.dcm").exists()
    assert len(result.warnings) == 1 and "DICOM SEG skipped" in result.warnings[0]
    assert "StudyInstanceUID" in result.warnings[0]
    assert any(line.startswith("warning: DICOM SEG skipped") for line in result.summary())
    _assert_on_grid(out / "labels.nii.gz", volume)
    _assert_on_grid(out / "masks" / "liver.nii.gz", volume)
    assert (out / "statistics.json").is_file() and (out / "preview.png").is_file()


def test_dicom_series_gets_an_sr_with_the_numbers_of_statistics_json(package, ts_dir, tmp_path, monkeypatch):
    """report_sr.dcm next to the SEG: one group per term, present ones referencing their SEG
    segment with statistics.json's volume and HU, the absent one reported absent."""
    import highdicom as hd
    import pydicom

    def two_present_one_absent(self, case, queries, *, progress=False):
        probs = fake_probabilities(self, case, queries[:2])  # liver: HU above 300, spleen: above 100
        return torch.cat([probs, 0.4 * probs[:1]])

    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", two_present_one_absent)
    series = ts_dir / "example_ct_dicom_with_uids"
    volume = read_volume(series)
    out = tmp_path / "out"
    result = segment(series, ["liver", "spleen", "left kidney"], model_dir=package, out_dir=out, progress=False)
    assert result.warnings == () and result.dicom_sr == out / "report_sr.dcm"
    assert ", DICOM SEG, DICOM SR) in " in result.summary()[-1]
    stats = json.loads((out / "statistics.json").read_text())["terms"]
    assert [stats[n]["present"] for n in ("liver", "spleen", "kidney_left")] == [True, True, False]
    label = _assert_on_grid(out / "labels.nii.gz", volume)
    seg = pydicom.dcmread(out / "segmentation.dcm", stop_before_pixels=True)
    sr = hd.sr.srread(out / "report_sr.dcm")
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert (sr.PatientID, sr.StudyInstanceUID) == (seg.PatientID, volume.source.study_uid)

    groups = {g.tracking_identifier: g for g in sr.content.get_volumetric_roi_measurement_groups()}
    others = {g.tracking_identifier: g for g in sr.content.get_image_measurement_groups()}
    assert sorted([*groups, *others]) == ["kidney_left", "liver", "spleen"]  # nobody dropped
    numbers = {s.TrackingID: s.SegmentNumber for s in seg.SegmentSequence}
    for term in result.terms[:2]:
        group = groups.get(term.name) or others[term.name]
        volume_ml = [m.value for m in group.get_measurements() if m.name.meaning == "Volume"]
        assert volume_ml == [pytest.approx(stats[term.name]["volume_ml"], rel=1e-9)]
        hu = [m.value for m in group.get_measurements() if m.name.meaning == "Attenuation Coefficient"]
        assert hu == [pytest.approx(stats[term.name]["intensity"]["mean"], rel=1e-9)]
        if np.any(label == term.value):  # in the label map: a SEG segment, referenced
            ref = group.referenced_segment[0].ReferencedSOPSequence[0]
            assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
            assert ref.ReferencedSegmentNumber == numbers[term.name]
        else:  # every voxel went to the more probable spleen: no segment, still reported
            assert term.name in others
    absent = others["kidney_left"]
    assert not absent.get_measurements()
    assert [q.value.meaning for q in absent.get_qualitative_evaluations() if q.name.meaning == "Presence of property"] == ["Absent"]
    bound = stats["kidney_left"]["max_probability_bound"]
    assert any(f"at most {bound:.3f} everywhere" in item.TextValue for item in absent[0].ContentSequence
               if item.ValueType == "TEXT")


def _write_itk(volume: Volume, path: Path) -> Path:
    """Write ``volume`` with SimpleITK (NRRD / MHA): ITK stores LPS, volumed works in RAS."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.transpose(volume.data, (2, 1, 0)))  # ITK arrays are (z, y, x)
    spacing = np.asarray(volume.spacing)
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(tuple(float(v) for v in ras_to_lps @ volume.affine[:3, 3]))
    img.SetDirection(tuple(float(v) for v in (ras_to_lps @ volume.affine[:3, :3] / spacing).ravel()))
    sitk.WriteImage(img, str(path))
    return path


def test_outputs_name_the_bundle_version_of_a_bundles_model(package, ts_dir, tmp_path, monkeypatch):
    """A package that is a bundle's models/ folder is known by the bundle's version (what
    `volumed bundle new` and fine-tuning bump), not by config.json's own field; a loose package
    keeps config.json's."""
    import shutil

    from volumed.inference.package import package_version, read_config

    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", fake_probabilities)
    bundle = tmp_path / "my_bundle"
    shutil.copytree(package, bundle / "models")
    (bundle / "configs").mkdir()
    (bundle / "configs" / "metadata.json").write_text(json.dumps({"version": "2.3.1"}))
    loose = read_config(package).version
    assert loose != "2.3.1" and package_version(package) == loose
    image = ts_dir / "example_ct_sm.nii.gz"
    for model, expected in ((bundle / "models", "2.3.1"), (package, loose)):
        out = tmp_path / f"out_{expected}"
        segment(image, ["liver"], model_dir=model, out_dir=out, progress=False)
        assert json.loads((out / "labels.json").read_text())["model"]["version"] == expected
        assert json.loads((out / "statistics.json").read_text())["model"]["version"] == expected
        assert f"(version {expected}, encoder" in (out / "report.txt").read_text()


def test_dicom_series_with_one_structure_gets_its_seg_and_sr(package, ts_dir, tmp_path, monkeypatch):
    """One prompt on a DICOM series: a SEG of one segment (highdicom puts its identification in
    the shared functional groups) and an SR that references it. This once failed in highdicom's
    ``ReferencedSegment.from_segmentation`` with an AttributeError and wrote nothing."""
    import highdicom as hd
    import pydicom

    def liver_only(self, case, queries, *, progress=False):
        return fake_probabilities(self, case, queries[:1])  # liver: HU above 300

    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", liver_only)
    series = ts_dir / "example_ct_dicom_with_uids"
    out = tmp_path / "out"
    result = segment(series, ["liver"], model_dir=package, out_dir=out, progress=False)
    assert result.warnings == () and result.dicom_seg == out / "segmentation.dcm" and result.dicom_sr == out / "report_sr.dcm"
    seg = pydicom.dcmread(out / "segmentation.dcm", stop_before_pixels=True)
    assert [s.TrackingID for s in seg.SegmentSequence] == ["liver"]
    (group,) = hd.sr.srread(out / "report_sr.dcm").content.get_volumetric_roi_measurement_groups()
    ref = group.referenced_segment[0].ReferencedSOPSequence[0]
    assert (group.tracking_identifier, ref.ReferencedSOPInstanceUID, ref.ReferencedSegmentNumber) == ("liver", seg.SOPInstanceUID, 1)
    stats = json.loads((out / "statistics.json").read_text())["terms"]["liver"]
    assert [m.value for m in group.get_measurements() if m.name.meaning == "Volume"] == [pytest.approx(stats["volume_ml"], rel=1e-9)]


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_image_smaller_than_the_patch_is_padded_and_comes_back_on_its_grid(package, ts_dir, tmp_path, suffix):
    full = read_volume(ts_dir / "example_ct_sm.nii.gz")
    # 30 x 30 x 8 voxels at 3 mm = 15 x 15 x 4 at 6 mm: far below the 64 x 64 x 16 patch.
    affine = full.affine.copy()
    affine[:, 3] = full.affine @ np.array([40, 30, 10, 1.0])
    small = Volume(np.ascontiguousarray(full.data[40:70, 30:60, 10:18]), affine, "CT")
    path = _write_itk(small, tmp_path / f"small{suffix}")
    assert read_volume(path, modality="CT").same_grid(small)
    # The crop holds no air, so the reader cannot recognise CT by itself: it must be named.
    with pytest.raises(ConfigError, match="cannot tell whether the image is CT or MR"):
        segment(path, ["liver"], model_dir=package, out_dir=tmp_path / "out", progress=False)
    result = segment(path, ["liver", "spleen"], model_dir=package, out_dir=tmp_path / "out", modality="CT", progress=False)
    label = _assert_on_grid(result.label_map, small)
    for term in result.terms:
        _assert_on_grid(term.mask_path, small)
    assert label.shape == (30, 30, 8)


# ------------------------------------------------------------------------- priority and masks


def test_label_map_priority_highest_probability_then_prompt_order(package, text_encoder, monkeypatch):
    model, config = load_package(package)
    # No resampling and no crop: model grid == original grid, so probabilities come back exactly.
    config = replace(config, preprocessing=dict(modality="CT", target_spacing=None, crop_foreground=False))
    predictor = PromptSegPredictor(model, config, text_encoder=text_encoder)
    volume = Volume(np.full((6, 5, 4), 40.0, np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), "CT")
    x = torch.arange(6)[:, None, None].expand(6, 5, 4)
    y = torch.arange(5)[None, :, None].expand(6, 5, 4)
    probs = torch.stack([
        torch.where(x < 4, 0.8, 0.1),  # liver
        torch.full((6, 5, 4), 0.4),  # right kidney: nowhere above threshold, skipped before inversion
        torch.where((x >= 2) & (y < 3), 0.9, 0.2),  # spleen: higher where it overlaps the liver
        torch.where((x < 4) & (y >= 3), 0.8, 0.0),  # left kidney: ties with the liver
    ]).float()
    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", lambda self, case, q, progress=False: probs)
    terms = predictor.resolve_prompts(["liver", "right kidney", "spleen", "left kidney"], "CT")
    case = predictor.preprocess(volume)
    assert [(k, p is None) for k, p in predictor.iter_original(probs, case)] == [(0, False), (1, True), (2, False), (3, False)]
    assert [(k, p is None) for k, p in predictor.iter_original(probs, case, skip={0})] == [(0, True), (1, True), (2, False), (3, False)]
    boxes = {k: [box for box, _ in p] for k, p in predictor.iter_original(probs, case) if p is not None}
    # Each term is inverted only in the box of its voxels above threshold, one voxel wider.
    assert boxes[0] == [(slice(0, 5), slice(0, 5), slice(0, 4))] and boxes[3] == [(slice(0, 5), slice(2, 5), slice(0, 4))]
    pred = predictor.predict(volume, terms)

    np.testing.assert_array_equal(pred.masks[0], (x < 4).numpy())
    assert pred.masks[1].shape == (6, 5, 4) and not pred.masks[1].any()
    np.testing.assert_array_equal(pred.masks[2], ((x >= 2) & (y < 3)).numpy())  # overlap kept
    np.testing.assert_array_equal(pred.masks[3], ((x < 4) & (y >= 3)).numpy())
    expected = np.zeros((6, 5, 4), np.uint8)
    expected[(x < 4).numpy()] = 1  # liver; the tie with the left kidney goes to the earlier prompt
    expected[((x >= 2) & (y < 3)).numpy()] = 3  # spleen wins where its probability is higher
    np.testing.assert_array_equal(pred.label_map, expected)
    assert set(pred.seconds) == {"queries", "preprocess", "sliding_window", "invert", "postprocess"}


def test_a_term_trained_as_free_text_needs_no_free_text_flag():
    """`volumed segment -p "pulmonary artery"` on the default model (trained on that text) was
    refused as an unknown term, pointing at pulmonary_vein, while `--all`, the untrained-term error
    and the bundle runner all list it as trained."""
    trained = ["liver", "pulmonary artery"]
    got = resolve_prompts(["liver", "Pulmonary Artery"], "CT", trained_terms=trained)
    assert [(t.name, t.is_free_text) for t in got] == [("liver", False), ("Pulmonary Artery", True)]
    refuse_untrained(got, trained)
    with pytest.raises(UnknownTermError, match="'hepatic cyst'"):  # other free text still needs the flag
        resolve_prompts(["pulmonary artery", "hepatic cyst"], "CT", trained_terms=trained)
    with pytest.raises(UnknownTermError, match="'pulmonary artery'"):  # not trained: unknown, as before
        resolve_prompts(["pulmonary artery"], "CT", trained_terms=["liver"])


def test_all_terms_adds_trained_terms_available_in_the_modality(package, text_encoder):
    model, config = load_package(package)
    predictor = PromptSegPredictor(model, config, text_encoder=text_encoder)
    ct = predictor.resolve_prompts(["left kidney"], "CT", all_terms=True)
    assert [t.name for t in ct] == ["kidney_left", "liver", "spleen", "kidney_right", "costal_cartilages"]
    mr = predictor.resolve_prompts([], "MR", all_terms=True)  # costal cartilages: CT only
    assert [t.name for t in mr] == ["liver", "spleen", "kidney_left", "kidney_right"]
    # A term trained as free text (not in the vocabulary) comes with --all, flagged free text.
    trained_free = resolve_prompts(["liver"], "CT", trained_terms=["liver", "pulmonary artery"], all_terms=True)
    assert [(t.name, t.is_free_text) for t in trained_free] == [("liver", False), ("pulmonary artery", True)]
    assert is_trained(trained_free[1], ["pulmonary artery"]) and not is_trained(ct[0], ["liver"])
    with pytest.raises(ConfigError, match="--all: the model lists no trained terms available in MR"):
        resolve_prompts([], "MR", trained_terms=["costal_cartilages"], all_terms=True)
    free = predictor.resolve_prompts(["liver", "hepatic cyst"], "CT", allow_free_text=True)
    assert free[1].is_free_text and predictor.prompt_texts(free) == ["liver", "hepatic cyst"]
    assert predictor.prompt_texts(ct[:1]) == ["kidney_left"]  # the canonical name, as in training


def _monai_full_resolution(predictor: PromptSegPredictor, case, queries, probs: WindowLogits) -> torch.Tensor:
    """MONAI's own gaussian blending of full-resolution logits, then the sigmoid (a model-zoo
    bundle's SlidingWindowInferer + Activationsd), on the same padded image."""
    from monai.inferers import sliding_window_inference

    image = case.image.as_tensor()[None].float()
    pads = [v for n, p, o in reversed(list(zip(case.model_shape, probs.padded_shape, probs.offset))) for v in (o, p - n - o)]
    segmenter = predictor.model.segmenter
    with torch.inference_mode():
        full = sliding_window_inference(
            torch.nn.functional.pad(image, pads), predictor.config.patch_size, 1,
            lambda w: segmenter(w, queries), overlap=predictor.config.overlap, mode="gaussian",
        )[0].sigmoid()  # fmt: skip
    (x, y, z), (ox, oy, oz) = case.model_shape, probs.offset
    return full[:, ox : ox + x, oy : oy + y, oz : oz + z]


@pytest.mark.realdata
def test_lazy_blending_equals_monai_full_resolution_blending(package, ts_dir, text_encoder):
    model, config = load_package(package)
    # 3 mm, no crop: a 70 x 64 x 16 model grid (padded to 70 x 64 x 16), 2 x 1 x 1 windows of 64 x 64 x 16.
    config = replace(config, preprocessing=dict(modality="CT", target_spacing=[3.0, 3.0, 3.0], crop_foreground=False))
    predictor = PromptSegPredictor(model, config, text_encoder=text_encoder)
    whole = read_volume(ts_dir / "example_ct_sm.nii.gz")
    volume = Volume(np.ascontiguousarray(whole.data[20:90, 10:74, 8:24]), whole.affine, "CT")
    case = predictor.preprocess(volume)
    queries = predictor.term_queries(predictor.resolve_prompts(TERMS, "CT"), "CT")
    probs = predictor.predict_probabilities(case, queries)
    assert isinstance(probs, WindowLogits) and probs.stride == (2, 2, 2)
    assert probs.origins == [(0, 0, 0), (6, 0, 0)] and probs.shape == (5, 70, 64, 16)
    full = _monai_full_resolution(predictor, case, queries, probs)
    torch.testing.assert_close(probs[0:5], full, atol=1e-6, rtol=0)  # the whole grid, every term
    for k in range(5):
        hot = full[k] > 0.5
        covered = torch.zeros_like(hot)
        for core, box in probs.regions(k, 0.5):
            assert all(b0 <= a and b <= b1 for (a, b), (b0, b1) in zip(core, box))
            covered[tuple(slice(a, b) for a, b in core)] = True
        assert not (hot & ~covered).any()  # the cores hold every voxel above the threshold
        assert torch.all(probs.bound[k] >= 0) and torch.all(probs.bound[k] <= 1)
    # The bound is an upper bound of the blend in every coarse cell.
    cells = torch.nn.functional.max_pool3d(full, 2, 2)  # the padded grid is the model grid here
    assert probs.bound.shape == cells.shape and torch.all(probs.bound >= cells - 1e-6)
    # The grids coincide (3 mm, no crop): an index copy, so only the hot cells are blended (no
    # margin); the masks are still those of thresholding the full-resolution blend.
    assert BoxInverter(case).is_index_copy
    marked = 0
    for k, pieces in predictor.iter_original(probs, case):
        mask = np.zeros(volume.shape, dtype=bool)
        for box, values in pieces or ():
            mask[box] |= values > 0.5
        np.testing.assert_array_equal(mask, invert_to_original(full[k], case, mode="bilinear") > 0.5)
        marked += int(mask.sum())
    assert marked > 1000, "the untrained tiny model should still mark some voxels"
    # Skipped terms (the lobes, filled to the lungs' air by the caller) come as None in their
    # place, uncomputed; the others as before.
    every = {k: p for k, p in predictor.iter_original(probs, case)}
    skipped = list(predictor.iter_original(probs, case, skip={1, 3}))
    assert [k for k, _ in skipped] == [0, 1, 2, 3, 4] and skipped[1][1] is None and skipped[3][1] is None
    for k in (0, 2, 4):
        mine, theirs = skipped[k][1] or [], every[k] or []
        assert len(mine) == len(theirs)
        for (where_a, a), (where_b, b) in zip(mine, theirs):
            assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(where_a, where_b))
            # Skipping changes which terms are inverted together, and a batched resample may
            # round differently in the last bits (seen: 35 of 5213 values 6e-9 apart).
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # A window interval that is not a multiple of the stride falls back to MONAI's own blending.
    odd = PromptSegPredictor(model, replace(config, overlap=0.3), text_encoder=text_encoder)
    assert odd._decoder_stride((100, 100, 30)) is None  # z interval int(16 * 0.7) = 11
    odd_case = odd.preprocess(whole)  # 122 x 101 x 30: more than one window along z
    assert odd._decoder_stride(odd_case.model_shape) is None
    assert isinstance(odd.predict_probabilities(odd_case, queries), torch.Tensor)


@pytest.mark.realdata
def test_box_by_box_masks_equal_whole_grid_inversion_on_the_dicom_series(package, ts_dir, text_encoder):
    """0.98 x 0.98 x 2 mm LPS -> 6 mm RAS and back: the masks of predict() are those of inverting
    the full-resolution blend over the whole grid; with post-processing, those of inverting it
    with every component but the largest set to 0 on the model grid."""
    from scipy import ndimage

    predictor = PromptSegPredictor(*load_package(package), text_encoder=text_encoder)
    volume = read_volume(ts_dir / "example_ct_dicom")
    terms = predictor.resolve_prompts(TERMS, "CT")
    raw = predictor.predict(volume, terms, postprocess=False)
    post = predictor.predict(volume, terms)
    case = predictor.preprocess(volume)
    queries = predictor.term_queries(terms, "CT")
    probs = predictor.predict_probabilities(case, queries)
    full = _monai_full_resolution(predictor, case, queries, probs)
    body = body_mask(volume)
    assert body.any() and not body.all()
    voxel_ml = float(np.prod(volume.spacing)) / 1000
    marked = removed = outside_ml = 0
    for k in range(len(terms)):
        model_grid = full[k].clone()
        if terms[k].name != "costal_cartilages":  # every component of the cartilages is kept
            labels, count = ndimage.label((model_grid > 0.5).numpy(), np.ones((3, 3, 3), bool))
            largest = 1 + int(np.bincount(labels.ravel())[1:].argmax())
            model_grid[torch.from_numpy((labels > 0) & (labels != largest))] = 0.0
            assert post.postprocessing[k].removed_components == count - 1
            removed += count - 1
        for pred, values in ((raw, full[k]), (post, model_grid)):
            inverted = invert_to_original(values, case, mode="bilinear")
            if pred is post:  # post-processed: only inside the patient's body
                outside = float(((inverted > 0.5) & ~body).sum()) * voxel_ml
                assert post.postprocessing[k].outside_body_ml == pytest.approx(outside, abs=2e-3)
                outside_ml += outside
                inverted = np.where(body, inverted, 0)
            expected = inverted > 0.5
            # Equal, but for voxels within float rounding of the threshold (1 of 5.2 million here).
            differ = pred.masks[k] != expected
            assert np.all(np.abs(inverted[differ] - 0.5) < 1e-5) and differ.sum() <= 3
            marked += int(expected.sum())
            # Confidence and peak: those of the whole-grid inversion inside the mask (the tiny model
            # marks every term here; absent terms: the tests below).
            evidence = pred.evidence[k]
            assert evidence.present and pred.masks[k].any()
            assert evidence.confidence == pytest.approx(float(inverted[pred.masks[k]].mean()), abs=1e-5)
            assert evidence.max_probability == pytest.approx(float(inverted.max()), abs=1e-5)
        assert not np.any(post.masks[k] & ~raw.masks[k])  # post-processing only removes voxels
    assert removed > 0, "the untrained tiny model should mark scattered fragments"
    assert outside_ml > 0, "and some outside the patient's body"
    assert all(p.outside_body_ml is None for p in raw.postprocessing)


@pytest.mark.parametrize("stride", [(2, 2, 2), (2, 2, 1), (4, 2, 1)])
def test_cell_upper_bound_bounds_the_trilinear_upsampling_and_is_tight_on_flat_fields(stride):
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(3, 9, 7, 5, generator=g) * 20
    size = [n * s for n, s in zip(coarse.shape[1:], stride)]
    fine = torch.nn.functional.interpolate(coarse[None], size=size, mode="trilinear", align_corners=False)[0]
    cell_max = torch.nn.functional.max_pool3d(fine[None], stride, stride)[0]
    bound = _cell_upper_bound(coarse, stride)
    assert torch.all(bound >= cell_max - 1e-4)
    assert float((bound - cell_max).mean()) < float((torch.nn.functional.max_pool3d(coarse[None], 3, 1, 1)[0] - cell_max).mean())
    flat = torch.full((1, 4, 4, 4), -7.0)
    torch.testing.assert_close(_cell_upper_bound(flat, stride), flat)


def test_a_group_reaching_into_another_box_is_still_inverted_exactly(package, text_encoder):
    """An L-shaped group and a blob in its corner: their boxes overlap without being merged, so the
    L's box holds part of the blob, up to its border; the masks still equal thresholding the exact
    blend everywhere."""
    model, config = load_package(package)
    config = replace(config, preprocessing=dict(modality="CT", target_spacing=None, crop_foreground=False))
    predictor = PromptSegPredictor(model, config, text_encoder=text_encoder)
    case = predictor.preprocess(Volume(np.full((20, 20, 20), 40.0, np.float32), np.eye(4), "CT"))
    logits = torch.full((1, 10, 10, 10), -20.0)
    logits[0, 0:6, 0, 3:6] = 10.0  # the L: a row along x ...
    logits[0, 0, 0:6, 3:6] = 10.0  # ... and a column along y
    logits[0, 4:8, 4:8, 3:6] = 10.0  # the blob, two cells away from the L
    probs = WindowLogits([logits], [(0, 0, 0)], (20, 20, 20), (2, 2, 2), (20, 20, 20), (20, 20, 20), (0, 0, 0),
                         torch.ones(20, 20, 20))  # fmt: skip
    probs.merge_slack = 0
    boxes = [box for _, box in probs.regions(0, 0.5)]
    assert len(boxes) == 2 and boxes[0][0][1] > boxes[1][0][0]  # overlapping along x, not merged
    (k, pieces), = list(predictor.iter_original(probs, case))
    mask = np.zeros((20, 20, 20), bool)
    for box, values in pieces:
        mask[box] |= values > 0.5
    np.testing.assert_array_equal(mask, (probs[0:1][0] > 0.5).numpy())


def test_merging_boxes_trades_a_little_volume_for_fewer_boxes():
    a, b, far = ((0, 10), (0, 10), (0, 10)), ((12, 20), (0, 10), (0, 10)), ((90, 95), (90, 95), (90, 95))
    assert _merge_boxes([a, b, far], slack=500) == [((0, 20), (0, 10), (0, 10)), far]
    assert _merge_boxes([a, b, far], slack=0) == [a, b, far]
    with pytest.raises(ValueError, match="not a multiple of the stride"):
        WindowLogits([torch.zeros(1, 2, 2, 2)], [(1, 0, 0)], (4, 4, 4), (2, 2, 2), (6, 4, 4), (6, 4, 4), (0, 0, 0),
                     torch.ones(4, 4, 4))  # fmt: skip


# ------------------------------------------------------------------------------ atomic outputs
# ------------------------------------------------------------------------------ atomic outputs


def test_existing_outputs_are_refused_before_any_compute_and_overwrite_replaces_them(package, ts_dir, tmp_path, monkeypatch):
    image = ts_dir / "example_ct_sm.nii.gz"
    out = tmp_path / "out"
    (out / "masks").mkdir(parents=True)
    (out / "masks" / "old_term.nii.gz").write_bytes(b"old")
    (out / "labels.json").write_text("{}")

    def no_compute(*args, **kwargs):
        raise AssertionError("the model was loaded although the output folder is not writable")

    with monkeypatch.context() as m:
        m.setattr(PromptSegPredictor, "from_package", no_compute)
        with pytest.raises(OutputExistsError, match=r"out: output folder holds outputs of an earlier run \(labels.json"):
            segment(image, ["liver"], model_dir=package, out_dir=out, progress=False)
    assert (out / "labels.json").read_text() == "{}"

    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", fake_probabilities)
    segment(image, ["liver"], model_dir=package, out_dir=out, overwrite=True, progress=False)
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["liver.nii.gz"]  # stale mask removed
    assert json.loads((out / "labels.json").read_text())["labels"]["1"]["name"] == "liver"
    # An empty existing folder is fine without --overwrite.
    (tmp_path / "empty").mkdir()
    segment(image, ["liver"], model_dir=package, out_dir=tmp_path / "empty", progress=False)
    # An output folder below an existing file is refused before any compute, naming the file.
    (tmp_path / "notes.txt").write_text("x")
    with monkeypatch.context() as m:
        m.setattr(PromptSegPredictor, "from_package", no_compute)
        with pytest.raises(OutputExistsError, match=r"cannot create the output: .*notes.txt is a file, not a folder"):
            segment(image, ["liver"], model_dir=package, out_dir=tmp_path / "notes.txt" / "out", progress=False)


def test_a_failure_mid_way_leaves_no_partial_output(package, ts_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", fake_probabilities)

    def broken_preview(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("volumed.inference.preview.render_preview", broken_preview)
    with pytest.raises(OSError, match="disk full"):
        segment(ts_dir / "example_ct_sm.nii.gz", ["liver"], model_dir=package, out_dir=tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither outputs nor staging folder


@pytest.mark.parametrize("threads", [0, 1])
def test_mask_writes_inline_or_on_a_thread_give_the_same_files_and_raise_a_failed_write(
        package, ts_dir, tmp_path, monkeypatch, threads):
    # 0: the writes run in segment()'s thread (2 cores, 2 torch threads); 1: on a writer thread.
    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", fake_probabilities)
    monkeypatch.setattr(segment_module, "mask_writer_threads", lambda: threads)
    image = ts_dir / "example_ct_sm.nii.gz"
    prompts = ["liver", "spleen", "kidney_left"]
    result = segment(image, prompts, model_dir=package, out_dir=tmp_path / "out", progress=False)
    volume = read_volume(image)
    label = _assert_on_grid(result.label_map, volume)
    for k, term in enumerate(result.terms):
        mask = _assert_on_grid(term.mask_path, volume)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert int(mask.sum()) == term.statistics.voxels
        assert np.all(mask[label == k + 1] == 1)  # the label map's voxels of a term are in its mask
    assert sum(t.statistics.voxels for t in result.terms) > 0

    import volumed.io.masks as masks_module

    calls = []

    def failing_write(mask, reference, path, *, overwrite=False):
        calls.append(Path(path).name)
        if len(calls) == 2:
            raise OSError(f"disk full writing {Path(path).name}")
        return masks_module.mask_nifti_bytes(mask, reference.affine)

    monkeypatch.setattr(masks_module, "write_mask_nifti", failing_write)
    with pytest.raises(OSError, match="disk full writing spleen.nii.gz"):
        segment(image, prompts, model_dir=package, out_dir=tmp_path / "failed", progress=False)
    assert not (tmp_path / "failed").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left


def test_the_mask_writer_thread_is_used_only_when_torch_leaves_a_core_free(monkeypatch):
    monkeypatch.setattr(segment_module.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(segment_module.torch, "get_num_threads", lambda: 2)
    assert segment_module.mask_writer_threads() == 0
    monkeypatch.setattr(segment_module.os, "cpu_count", lambda: 8)
    assert segment_module.mask_writer_threads() == 1
    with segment_module.mask_writer(0) as inline:
        assert inline.submit(sum, [1, 2]).result() == 3
        failed = inline.submit(int, "x")
        assert isinstance(failed.exception(), ValueError)


# ----------------------------------------------------------------------------------- bad input


def test_bad_prompts_raise_clear_errors(package, ts_dir, tmp_path):
    image = ts_dir / "example_ct_sm.nii.gz"
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="give at least one anatomy prompt"):
        segment(image, [], model_dir=package, out_dir=out)
    with pytest.raises(UnknownTermError, match="unknown anatomy term 'livr' for CT; nearest terms:") as err:
        segment(image, ["livr"], model_dir=package, out_dir=out)
    assert len(err.value.suggestions) == 3 and "liver" in err.value.suggestions
    with pytest.raises(ConfigError, match="prompts 'liver' and 'Liver' both resolve to 'liver'"):
        segment(image, ["liver", "Liver"], model_dir=package, out_dir=out)
    with pytest.raises(ConfigError, match="no segmentation model folder here"):
        segment(image, ["liver"], model_dir=tmp_path / "nowhere", out_dir=out)
    assert not out.exists()


def test_prompts_and_models_for_another_modality_are_refused(package, shared_data, tmp_path):
    mr = shared_data / "pyradiomics_mri" / "prostate_phantom_subvolume.nrrd"
    with pytest.raises(ConfigError, match="'costal cartilages' resolves to 'costal_cartilages', which TotalSegmentator segments only in CT"):
        segment(mr, ["costal cartilages"], model_dir=package, out_dir=tmp_path / "out", modality="MR")
    with pytest.raises(ConfigError, match="the model was trained on CT images only; this image is MR"):
        segment(mr, ["liver"], model_dir=package, out_dir=tmp_path / "out", modality="MR")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "volumed: error: prompts: give at least one anatomy prompt (--prompt liver) or --all"),
        (["-p", "livr"], "volumed: error: prompt: unknown anatomy term 'livr' for CT; nearest terms: "),
        (["-p", "liver", "-p", "hepar"], "volumed: error: prompts: prompts 'liver' and 'hepar' both resolve to 'liver'"),
    ],
)
def test_cli_bad_input_is_one_line_on_stderr_with_exit_code_2(package, ts_dir, tmp_path, capsys, args, message):
    argv = ["segment", str(ts_dir / "example_ct_sm.nii.gz"), "--model", str(package), "-o", str(tmp_path / "o"), *args]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_cli_existing_output_and_success(package, ts_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", fake_probabilities)
    out = tmp_path / "o"
    argv = ["segment", str(ts_dir / "example_ct_sm.nii.gz"), "--model", str(package), "-o", str(out), "-p", "liver",
            "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert "liver" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"volumed: error: {out}: output folder holds outputs of an earlier run") and err.count("\n") == 1


def test_default_model_dir_is_in_the_repository_bundles():
    path = segment_module.default_model_dir()
    assert path.parts[-3:] == ("bundles", "volumed_promptseg_ct", "models")
    assert (path.parents[2] / "volumed").is_dir()


# ------------------------------------------------------------- presence, confidence, untrained


def scaled_probabilities(scales):
    """A stand-in for the network: term k is ``scales[k]`` times one smooth map of the image (HU
    above about 100), so its peak is known and its mask is present exactly when the scale lets the
    map exceed the threshold."""

    def fake(self, case, queries, *, progress=False):
        hu = case.image.as_tensor()[0] * 2000.0 - 1000.0  # undo the -1000..1000 window
        base = torch.sigmoid((hu - 100.0) / 50.0)
        return torch.stack([base * s for s in scales[: queries.shape[0]]]).float()

    return fake


def test_statistics_say_which_terms_are_present_with_their_confidence_and_bound_the_absent(
    package, ts_dir, tmp_path, monkeypatch, text_encoder
):
    scales = [1.0, 0.3, 0.45]  # liver present; spleen and left kidney absent (peaks 0.3 and 0.45)
    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", scaled_probabilities(scales))
    image = ts_dir / "example_ct_sm.nii.gz"
    volume = read_volume(image)
    result = segment(image, ["liver", "spleen", "left kidney"], model_dir=package, out_dir=tmp_path / "out", progress=False)

    # The reference: the same model-grid probabilities inverted over the whole original grid.
    predictor = PromptSegPredictor(*load_package(package), text_encoder=text_encoder)
    case = predictor.preprocess(volume)
    model_grid = scaled_probabilities(scales)(predictor, case, torch.zeros(3, 1))
    stats = json.loads(result.statistics.read_text())
    assert stats["threshold"] == 0.5
    for k, term in enumerate(result.terms):
        saved = stats["terms"][term.name]
        reference = invert_to_original(model_grid[k], case, mode="bilinear")
        mask = _nii(term.mask_path)[0].astype(bool)
        assert saved["trained"] is True and saved["value"] == k + 1 and saved["voxels"] == int(mask.sum())
        assert saved["present"] == term.present == bool(mask.any())
        if k == 0:
            assert mask.sum() > 1000
            # Confidence: the mean probability inside the mask; the peak: the largest probability.
            assert saved["confidence"] == pytest.approx(float(reference[mask].mean()), abs=1e-5)
            assert saved["max_probability"] == pytest.approx(float(reference.max()), abs=1e-5)
            assert 0.5 < saved["confidence"] <= saved["max_probability"] <= 1
            assert saved["max_probability_bound"] is None
        else:
            assert not mask.any() and saved["confidence"] is None and saved["max_probability"] is None
            # The bound: the model-grid maximum, which no original-grid probability exceeds.
            bound = saved["max_probability_bound"]
            assert bound == pytest.approx(float(model_grid[k].max()), abs=1e-6)
            assert float(reference.max()) <= bound + 1e-6 and bound < 0.5
            assert bound == pytest.approx(scales[k] * float(model_grid[0].max()), abs=1e-6)
    lines = result.summary()
    assert lines[0] == "found 1 of 3 structure(s) (probability above 0.5):"
    assert lines[1].startswith("  1 liver") and f"confidence {stats['terms']['liver']['confidence']:.2f}" in lines[1]
    bounds = [stats["terms"][n]["max_probability_bound"] for n in ("spleen", "kidney_left")]
    assert lines[2] == f"absent (2): spleen (p <= {bounds[0]:.2f}), kidney_left (p <= {bounds[1]:.2f})"


def _peak_windows(stride=(2, 2, 2)) -> WindowLogits:
    """Six overlapping windows on a padded grid with the model grid offset inside it (as in
    test_blending.py): smooth random logits, some cells far above and many far below 0."""
    g = torch.Generator().manual_seed(3)
    roi, padded, model, offset = (16, 12, 8), (28, 20, 8), (26, 18, 7), (1, 1, 0)
    origins = [(x, y, 0) for x in (0, 8, 12) for y in (0, 8)]
    coarse = [r // s for r, s in zip(roi, stride)]
    logits = []
    for _ in origins:
        noise = torch.randn(4, *[max(1, c // 2) for c in coarse], generator=g) * 6 - torch.tensor([2.0, 12, 14, 30])[:, None, None, None]
        logits.append(torch.nn.functional.interpolate(noise[None], size=coarse, mode="trilinear", align_corners=False)[0])
    from volumed.inference.blending import importance_map

    return WindowLogits(logits, origins, roi, stride, padded, model, offset, importance_map(roi))


def test_absent_term_bound_is_the_exact_maximum_of_the_blend_by_branch_and_bound(monkeypatch):
    probs = _peak_windows()
    whole = tuple((0, n) for n in probs.model_shape)
    exact = [float(probs.blend(k, whole).max()) for k in range(4)]
    assert exact[0] > 0.5 > exact[1] > exact[2] > 0.01 > 1e-6 > exact[3]  # from present to clearly absent
    found = PromptSegPredictor.max_probability_bounds(probs, [3, 1, 2, 0])
    np.testing.assert_allclose(found, [exact[3], exact[1], exact[2], exact[0]], rtol=1e-5, atol=1e-7)
    # The sigmoid of the largest coarse logit is far looser: branch and bound is what makes it useful.
    assert max(float(w[1].max()) for w in probs.logits) > 0 and exact[1] < 0.5
    # With too small a budget of cells, still an upper bound, never below the maximum.
    monkeypatch.setattr(segment_module, "_PEAK_CELLS", 2)
    capped = PromptSegPredictor.max_probability_bounds(probs, range(4))
    assert np.all(capped >= np.array(exact) - 1e-6)
    assert np.all(capped <= probs.bound_for(range(4)).flatten(1).amax(dim=1).numpy() + 1e-6)
    # A probability tensor: its maximum.
    tensor = torch.stack([torch.full((3, 3, 3), 0.2), torch.linspace(0, 0.7, 27).reshape(3, 3, 3)])
    np.testing.assert_allclose(PromptSegPredictor.max_probability_bounds(tensor, [1, 0]), [0.7, 0.2], rtol=1e-6)


def test_predict_with_lazy_blending_gives_exact_confidence_and_the_peak_of_absent_terms(package, text_encoder, monkeypatch):
    """The index-copy path with real WindowLogits: a present blob, a near miss (a positive coarse
    logit whose blend stays under the threshold) and a term far below it."""
    model, config = load_package(package)
    config = replace(config, preprocessing=dict(modality="CT", target_spacing=None, crop_foreground=False))
    predictor = PromptSegPredictor(model, config, text_encoder=text_encoder)
    volume = Volume(np.full((20, 20, 20), 40.0, np.float32), np.eye(4), "CT")
    logits = torch.full((3, 10, 10, 10), -20.0)
    logits[0, 2:6, 2:6, 3:6] = 4.0  # liver: a blob
    logits[1] = -1.0
    logits[1, 7, 7, 7] = 1.0  # spleen: one positive coarse cell, whose neighbours pull its blend under 0.5
    logits[2] -= 5.0  # left kidney: nowhere near
    probs = WindowLogits([logits], [(0, 0, 0)], (20, 20, 20), (2, 2, 2), (20, 20, 20), (20, 20, 20), (0, 0, 0),
                         torch.ones(20, 20, 20))  # fmt: skip
    full = probs[0:3].numpy()
    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", lambda self, case, q, progress=False: probs)
    pred = predictor.predict(volume, predictor.resolve_prompts(["liver", "spleen", "left kidney"], "CT"))
    liver, spleen, kidney = pred.evidence
    np.testing.assert_array_equal(pred.masks[0], full[0] > 0.5)
    assert liver.present and liver.max_probability_bound is None
    assert liver.confidence == pytest.approx(float(full[0][full[0] > 0.5].mean()), abs=1e-6)
    assert liver.max_probability == pytest.approx(float(full[0].max()), abs=1e-6)
    for evidence, k in ((spleen, 1), (kidney, 2)):
        assert not pred.masks[k].any() and not evidence.present and evidence.confidence is None
        assert evidence.max_probability_bound == pytest.approx(float(full[k].max()), abs=1e-6)
    assert torch.sigmoid(torch.tensor(1.0)) > 0.5 > spleen.max_probability_bound > 0.4
    assert kidney.max_probability_bound < 1e-10


def test_prompts_the_model_was_not_trained_on_are_refused_before_any_compute(package, ts_dir, tmp_path, monkeypatch):
    image = ts_dir / "example_ct_sm.nii.gz"
    out = tmp_path / "out"

    def no_compute(*args, **kwargs):
        raise AssertionError("the model was loaded for an untrained prompt")

    monkeypatch.setattr(PromptSegPredictor, "from_package", no_compute)
    trained = "liver, spleen, kidney_left, kidney_right, costal_cartilages"
    with pytest.raises(ConfigError, match=rf"prompts: the model was not trained on 'left adrenal gland' \(adrenal_gland_left\); it was trained on: {trained} "):
        segment(image, ["liver", "left adrenal gland"], model_dir=package, out_dir=out, progress=False)
    with pytest.raises(ConfigError, match=r"not trained on 'hepatic cyst', 'aorta'; .* to segment them anyway") as err:
        segment(image, ["hepatic cyst", "aorta"], model_dir=package, out_dir=out, allow_free_text=True, progress=False)
    assert "--allow-untrained" in str(err.value) and "--list-terms" in str(err.value)
    assert not out.exists()
    # Free text the model was trained on is trained; --all adds trained terms only.
    refuse_untrained(resolve_prompts(["pulmonary artery"], "CT", allow_free_text=True), ["liver", "pulmonary artery"])
    refuse_untrained(resolve_prompts([], "CT", trained_terms=TERMS, all_terms=True), TERMS)


def test_allowed_untrained_terms_are_flagged_in_every_output(package, ts_dir, tmp_path, monkeypatch):
    def three_present_one_absent(self, case, queries, *, progress=False):
        probs = fake_probabilities(self, case, queries[:3])
        return torch.cat([probs, 0.4 * probs[:1]])

    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", three_present_one_absent)
    legends = []
    real_preview = preview_module.render_preview

    def recording_preview(*args, **kwargs):
        legends.append(kwargs)
        return real_preview(*args, **kwargs)

    monkeypatch.setattr("volumed.inference.preview.render_preview", recording_preview)
    series = ts_dir / "example_ct_dicom_with_uids"
    volume = read_volume(series)
    out = tmp_path / "out"
    # Without post-processing: the fake's 'liver' and 'aorta' (HU above 300 and 100) lose the label
    # map to the free text (HU above -100) but for a few ties where all three probabilities round
    # to 1, in bone fragments that post-processing would remove; the legend checks need them.
    result = segment(series, ["liver", "aorta", "hepatic cyst", "adrenal gland left"], model_dir=package, out_dir=out,
                     allow_free_text=True, allow_untrained=True, progress=False, postprocess=False)
    assert [(t.name, t.trained, t.present) for t in result.terms] == [
        ("liver", True, True), ("aorta", False, True), ("hepatic cyst", False, True), ("adrenal_gland_left", False, False)]
    table = json.loads((out / "labels.json").read_text())["labels"]
    stats = json.loads((out / "statistics.json").read_text())["terms"]
    assert [(table[str(t.value)]["trained"], stats[t.name]["trained"]) for t in result.terms] == [
        (True, True), (False, False), (False, False), (False, False)]
    lines = result.summary()
    assert lines[1].startswith("  1 liver") and "untrained" not in lines[1]
    assert lines[2].startswith("  2 aorta") and lines[2].endswith("[untrained]")
    assert lines[3].startswith("  3 hepatic cyst") and lines[3].endswith("[free text, untrained]")
    assert lines[4].startswith("absent (1): adrenal_gland_left (p <= ") and lines[4].endswith(", untrained)")
    # The preview's legend names the present terms by their label value, flagged; the absent one in a note.
    label = _assert_on_grid(out / "labels.nii.gz", volume)
    (call,) = legends
    assert call["label_names"] == {1: "liver", 2: "aorta (untrained)", 3: "hepatic cyst (untrained)"}
    assert set(np.unique(label)) - {0} == set(call["label_names"])
    assert len(call["notes"]) == 1 and call["notes"][0].startswith("absent: adrenal_gland_left (untrained) (p <= ")
    # The DICOM SEG: a valid SEG whose untrained segments say so in their label and description.
    seg = read_dicom_seg(result.dicom_seg, volume)
    assert [(s.name, s.label) for s in seg.segments] == [
        ("liver", "liver"), ("aorta", "aorta (untrained)"), ("hepatic cyst", "hepatic cyst (untrained)")]
    assert "untrained" not in seg.segments[0].description and "prompt 'liver'" in seg.segments[0].description
    assert all("untrained: the model was not trained on this term" in s.description for s in seg.segments[1:])
    for info, value in zip(seg.segments, (1, 2, 3)):
        np.testing.assert_array_equal(seg.masks[info.number], label == value)


def test_cli_refuses_an_untrained_prompt_and_allows_it_when_asked(package, ts_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", fake_probabilities)
    out = tmp_path / "o"
    argv = ["segment", str(ts_dir / "example_ct_sm.nii.gz"), "--model", str(package), "-o", str(out), "-p", "liver",
            "-p", "aorta", "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("volumed: error: prompts: the model was not trained on 'aorta'; it was trained on: liver, ")
    assert err.count("\n") == 1 and not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--allow-untrained"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("found ") and any(line.startswith("  2 aorta") and "[untrained]" in line for line in printed)
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "--list-terms", "--model", str(package)])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.splitlines()[1:] == [f"  {t}" for t in TERMS]


def test_overlapping_pieces_count_each_mask_voxel_once_in_the_confidence(package, text_encoder, monkeypatch):
    """Boxes may overlap (their values agree above the threshold): a voxel in two boxes is one
    voxel of the mask, counted once in the mean; voxels of an index copy likewise."""
    model, config = load_package(package)
    config = replace(config, preprocessing=dict(modality="CT", target_spacing=None, crop_foreground=False))
    predictor = PromptSegPredictor(model, config, text_encoder=text_encoder)
    volume = Volume(np.full((6, 4, 4), 40.0, np.float32), np.eye(4), "CT")
    reference = np.zeros(volume.shape, np.float32)
    reference[0:4] = 0.6
    reference[2:6] = 0.9
    reference[2:4] = 0.8  # in both boxes
    a, b = (slice(0, 4), slice(0, 4), slice(0, 4)), (slice(2, 6), slice(0, 4), slice(0, 4))
    pieces = {0: [(a, reference[a]), (b, reference[b])],
              # voxels (1, 1, 1) and (2, 0, 0), then (2, 0, 0) again
              1: [((np.array([1, 2]), np.array([1, 0]), np.array([1, 0])), np.array([0.95, 0.9], np.float32)),
                  ((np.array([2]), np.array([0]), np.array([0])), np.array([0.9], np.float32))]}
    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", lambda self, case, q, progress=False: torch.zeros(2, 6, 4, 4))
    monkeypatch.setattr(PromptSegPredictor, "iter_original", lambda self, probs, case, components=None, skip=(): iter(pieces.items()))
    pred = predictor.predict(volume, predictor.resolve_prompts(["liver", "spleen"], "CT"))
    assert pred.masks[0].all() and pred.evidence[0].confidence == pytest.approx(float(reference.mean()))
    assert pred.evidence[0].max_probability == pytest.approx(0.9)
    assert pred.masks[1].sum() == 2 and pred.evidence[1].confidence == pytest.approx(0.925)
    assert pred.evidence[1].max_probability == pytest.approx(0.95)  # in the first piece


def test_presence_rule_reports_a_small_unsure_mask_absent_with_what_was_seen(package, ts_dir, tmp_path, monkeypatch):
    """A package's ``presence`` rule: a mask both smaller than min_ml and less sure than
    min_confidence comes back empty and absent, statistics.json keeping its volume and mean
    probability; without the rule the same probabilities give a present mask."""
    import shutil

    def liver_and_an_unsure_blob(self, case, queries, *, progress=False):
        probs = fake_probabilities(self, case, queries[:1])  # liver: HU above 300 (bone), sure
        blob = torch.zeros_like(probs)
        c = [s // 2 for s in blob.shape[1:]]
        blob[0, c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3, c[2] - 2:c[2] + 2] = 0.6  # kidney: small, unsure
        return torch.cat([probs, blob])

    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", liver_and_an_unsure_blob)
    image = ts_dir / "example_ct_sm.nii.gz"
    plain = segment(image, ["liver", "left kidney"], model_dir=package, out_dir=tmp_path / "plain", progress=False)
    seen = json.loads((tmp_path / "plain" / "statistics.json").read_text())["terms"]["kidney_left"]
    assert seen["present"] is True and 0.5 < seen["confidence"] <= 0.6 + 1e-6 and seen.get("rejected") is None
    assert plain.terms[1].present

    ruled = tmp_path / "pkg"
    shutil.copytree(package, ruled)
    cfg = json.loads((ruled / "config.json").read_text())
    cfg["presence"] = {"min_ml": seen["volume_ml"] + 1.0, "min_confidence": 0.7}
    (ruled / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "ruled"
    result = segment(image, ["liver", "left kidney"], model_dir=ruled, out_dir=out, progress=False)
    stats = json.loads((out / "statistics.json").read_text())["terms"]
    kidney = stats["kidney_left"]
    assert kidney["present"] is False and kidney["volume_ml"] == 0.0 and kidney["confidence"] is None
    assert kidney["rejected"]["volume_ml"] == pytest.approx(seen["volume_ml"], rel=1e-3)
    assert kidney["rejected"]["confidence"] == pytest.approx(seen["confidence"], rel=1e-6)
    assert kidney["rejected"]["min_confidence"] == 0.7
    assert stats["liver"]["present"] is True and stats["liver"].get("rejected") is None  # large and sure: kept
    assert not np.asarray(nib.load(out / "masks" / "kidney_left.nii.gz").dataobj).any()
    assert not np.any(np.asarray(nib.load(out / "labels.nii.gz").dataobj) == result.terms[1].value)
    assert any("kidney_left (rejected: " in line for line in result.summary())

    cfg["presence"] = {"min_ml": 5}
    (ruled / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="presence"):
        segment(image, ["liver"], model_dir=ruled, out_dir=tmp_path / "bad", progress=False)


@pytest.mark.realdata
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CPU side of the path: test_blending.py)")
def test_the_default_model_on_cuda_gives_the_cpu_masks_on_the_example_ct(ts_dir, tmp_path):
    """With --device cuda the windows' logits stay on the GPU and are blended there; the masks
    must be those of the CPU run (float rounding may move a voxel at the threshold)."""
    masks = {}
    for device in ("cpu", "cuda"):
        segment_module.segment(ts_dir / "example_ct_sm.nii.gz", ["liver", "spleen", "aorta", "heart"], out_dir=tmp_path / device,
                               device=device, progress=False)
        masks[device] = {p.name: _nii(p)[0] > 0 for p in sorted((tmp_path / device / "masks").glob("*.nii.gz"))}
    assert masks["cpu"].keys() == masks["cuda"].keys() and masks["cpu"]
    for name, ref in masks["cpu"].items():
        got = masks["cuda"][name]
        dice = 2 * (ref & got).sum() / max(1, ref.sum() + got.sum())
        assert dice >= 0.999 or (ref.sum() == got.sum() == 0), (name, dice)


def test_an_enhancing_structure_brighter_than_it_ever_is_without_contrast_is_absent_in_a_native_scan():
    """In a CT without contrast (its own aorta under 100 HU) a kidney, a liver or a heart never
    measures more than its native range plus the partial-volume margin: a "kidney" at 333 HU lies
    on bone (bundle 0.6.0 on tcia_ccth_a01's iliac wings). Such a mask is turned away; with
    contrast (a bright aorta), without a found aorta, or an unsure one, nothing is; bone is never
    judged by it; and the reason reads in words."""
    from types import SimpleNamespace

    from volumed.inference.segment import _native_hu_rejects
    from volumed.inference.stats import native_hu_evidence, rejection_text

    terms = [SimpleNamespace(name=n) for n in ("aorta", "kidney_left", "liver", "femur_left", "heart")]
    found = {0: (1000, 900.0, 0.99), 1: (500, 420.0, 0.95), 2: (9000, 8500.0, 1.0), 3: (800, 700.0, 0.97),
             4: (3000, 2700.0, 0.98)}
    voxel_ml = 0.01  # the aorta: 10 mL at mean probability 0.9
    native = {0: 58.0, 1: 333.0, 2: 60.0, 3: 450.0, 4: 45.0}
    assert _native_hu_rejects(terms, found, native, voxel_ml) == {1: ("kidney", (-140.0, 195.0), 58.0)}
    assert _native_hu_rejects(terms, found, {**native, 0: 180.0}, voxel_ml) == {}  # portal venous
    assert _native_hu_rejects(terms, found, {k: v for k, v in native.items() if k}, voxel_ml) == {}  # no aorta
    unsure = {**found, 0: (1000, 600.0, 0.9)}  # mean probability 0.6
    assert _native_hu_rejects(terms, unsure, native, voxel_ml) == {}
    small = {**found, 0: (400, 380.0, 0.99)}  # 4 mL
    assert _native_hu_rejects(terms, small, native, voxel_ml) == {}
    evidence = native_hu_evidence(500, 420.0, 0.95, voxel_ml, 333.0, "kidney", (-140.0, 195.0), 58.0)
    assert not evidence.present and evidence.rejected["rule"] == "hu"
    assert rejection_text(evidence.rejected) == (
        "a 5.0 mL region at mean probability 0.84 at a mean 333 HU, which kidney never has without contrast "
        "(expected -140 to 195 HU; the aorta measures 58 HU)")
