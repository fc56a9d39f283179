"""Invertible preprocessing: real label maps go to model space and come back on the original grid.

Measured figures (default CT pipeline, 1.5 mm isotropic, fraction of voxels equal to the input):
- example_ct_sm + example_seg (3 mm -> 1.5 mm): 100% with nearest and with one-hot/argmax inversion.
- example_ct_dicom + example_seg_dicom (0.977 x 0.977 x 2 mm -> 1.5 mm, in-plane downsampling):
  hard label map (nearest forward) inverted by nearest 99.617%, by one-hot/trilinear/argmax 99.608%;
  soft one-hot (the ideal softmax) inverted with trilinear + argmax 99.905%. A hard 1.5 mm label
  map cannot hold 0.98 mm boundaries; at 1.0 mm the hard round trip reaches 99.956%.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd

from volumed.data.transforms import (
    BoxInverter,
    ForegroundThreshold,
    PreprocessConfig,
    build_preprocessing,
    invert_box_to_original,
    invert_scores_to_labels,
    invert_to_original,
    invert_to_volume,
    label_to_model_probabilities,
    preprocess,
)
from volumed.errors import ConfigError, InvalidVolumeError
from volumed.io import Volume, read_label, read_volume


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.mean(a == b))


@pytest.fixture(scope="module")
def sm_pair(ts_dir):
    image = read_volume(ts_dir / "example_ct_sm.nii.gz")
    return image, read_label(ts_dir / "example_seg.nii.gz", image)


@pytest.fixture(scope="module")
def dicom_pair(ts_dir):
    image = read_volume(ts_dir / "example_ct_dicom")
    # The seg is stored LAS; read_label brings it onto the series' (LPS) grid in world space.
    return image, read_label(ts_dir / "example_seg_dicom.nii.gz", image)


@pytest.fixture(scope="module")
def dicom_case(dicom_pair):
    image, label = dicom_pair
    return preprocess(image, label, PreprocessConfig(modality="CT"))


def _box_phantom() -> tuple[Volume, Volume]:
    """60x50x40 CT at 2 mm: -700 HU background (not body, but above the window minimum), a
    0 HU body box at [20:40, 15:35, 10:30] and label 1 inside it, label 2 in a background corner."""
    hu = np.full((60, 50, 40), -700, np.int16)
    hu[20:40, 15:35, 10:30] = 0
    lab = np.zeros(hu.shape, np.uint8)
    lab[22:38, 17:33, 12:28] = 1
    lab[:5, :5, :5] = 2
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = (-50.0, 20.0, 100.0)
    image = Volume(hu, affine, modality="CT")
    return image, image.with_data(lab)


# --- acceptance: real label maps, default pipeline, back on the original grid -----------------


@pytest.mark.realdata
def test_sm_label_roundtrip_is_exact_on_the_original_grid(sm_pair):
    image, label = sm_pair
    case = preprocess(image, label)  # default CT config: RAS, 1.5 mm, body crop, -1000..1000 HU
    assert case.model_shape == (243, 199, 59)  # 3 mm -> 1.5 mm really resamples
    assert np.allclose(np.linalg.norm(case.image.affine[:3, :3].numpy(), axis=0), 1.5)
    assert case.label.dtype == torch.uint8 and case.label.shape == case.image.shape
    for mode in ("nearest", "bilinear"):
        back = invert_to_volume(case.label, case, mode=mode)
        assert back.shape == image.shape
        assert np.array_equal(back.affine, image.affine)
        assert back.data.dtype == np.uint8
        assert _agreement(back.data, label.data) >= 0.999, mode


@pytest.mark.realdata
def test_dicom_hard_label_roundtrip_figures(dicom_pair, dicom_case):
    image, label = dicom_pair
    assert dicom_case.model_shape[0] == 334  # 512 x 0.977 mm -> 1.5 mm
    back = invert_to_volume(dicom_case.label, dicom_case, mode="nearest")
    assert back.shape == (512, 512, 20)
    assert np.array_equal(back.affine, image.affine)
    # Honest floor: a hard 1.5 mm map cannot carry 0.98 mm in-plane boundaries (measured 99.617%).
    agree_15 = _agreement(back.data, label.data)
    assert 0.995 <= agree_15 < 0.999
    # Model space finer than 1.5 mm in-plane: the same hard round trip reaches 99.9%.
    fine = preprocess(image, label, PreprocessConfig(modality="CT", target_spacing=(1.0, 1.0, 1.0)))
    assert fine.model_shape[2] == 39  # 20 slices x 2 mm resampled to 1 mm
    assert _agreement(invert_to_original(fine.label, fine), label.data) >= 0.999


@pytest.mark.realdata
def test_dicom_soft_onehot_roundtrip_reaches_999(dicom_pair, dicom_case):
    image, label = dicom_pair
    ids = np.unique(label.data)
    probs = label_to_model_probabilities(label, dicom_case, ids)
    assert probs.shape == (len(ids), *dicom_case.model_shape)
    assert torch.allclose(probs.sum(0), torch.ones(()), atol=1e-4)  # partial volumes sum to 1
    back = invert_scores_to_labels(probs, dicom_case, class_ids=ids)
    assert back.shape == image.shape and back.dtype == np.uint8
    agree = _agreement(back, label.data)
    assert agree >= 0.999  # measured 99.905%
    hard = _agreement(invert_to_original(dicom_case.label, dicom_case), label.data)
    assert agree > hard


# --- single steps -------------------------------------------------------------------------------


@pytest.mark.realdata
def test_orientation_alone_inverts_exactly(dicom_pair):
    image, label = dicom_pair
    assert image.orientation == "LPS"
    config = PreprocessConfig(modality="CT", target_spacing=None, crop_foreground=False)
    transform = build_preprocessing(config)
    out = transform({"image": image.to_metatensor(), "label": label.to_metatensor()})
    assert out["image"].shape == (1, 512, 512, 20)
    assert np.allclose(np.diag(out["image"].affine.numpy())[:3], image.spacing)  # RAS: positive diagonal
    expected = np.clip((image.data.astype(np.float32) + 1000) / 2000, 0, 1)
    assert np.allclose(out["image"][0].numpy()[::-1, ::-1], expected, atol=1e-6)  # LPS -> RAS flips i and j

    # The MONAI way for predictions: Invertd on the image's trace (leaves the trace in place).
    pred = MetaTensor(out["label"].as_tensor().clone())  # a plain tensor would be skipped by Invertd
    inv = Invertd(keys="pred", transform=transform, orig_keys="image")({"pred": pred, "image": out["image"]})
    assert np.array_equal(inv["pred"][0].numpy(), label.data)

    back = transform.inverse(out)  # consumes the traces
    assert np.array_equal(back["label"][0].numpy(), label.data)
    assert np.allclose(back["image"][0].numpy(), expected, atol=1e-6)
    assert np.allclose(back["image"].affine.numpy(), image.affine)


@pytest.mark.realdata
@pytest.mark.parametrize(
    "name, spacing",
    [
        ("example_ct_sm.nii.gz", (3.0, 3.0, 3.0)),  # same grid: index copy
        ("example_ct_dicom", (0.9765625, 0.9765625, 2.0)),  # LPS -> RAS flips only: index copy
        ("example_ct_dicom", (3.0, 3.0, 3.0)),  # resampled: separable trilinear (axis-aligned grids)
    ],
)
def test_box_inversion_equals_the_whole_grid_inversion(ts_dir, name, spacing):
    volume = read_volume(ts_dir / name)
    case = preprocess(volume, None, PreprocessConfig(modality="CT", target_spacing=spacing))
    g = torch.Generator().manual_seed(0)
    field = torch.nn.functional.avg_pool3d(torch.rand(1, 1, *case.model_shape, generator=g), 5, 1, 2)[0]
    whole = invert_to_original(field, case, mode="bilinear")
    x, y, z = case.model_shape
    box = ((3, x - 5), (4, y - 2), (2, z - 3))
    slices, values = invert_box_to_original(field[:, 3 : x - 5, 4 : y - 2, 2 : z - 3], box, case)
    assert values.shape == (1, *[s.stop - s.start for s in slices])
    # Every returned voxel agrees with the whole-grid inversion to float rounding, up to the
    # box's faces: a voxel just beyond a face would read the box's border value, not the next
    # model voxel (where boxes of neighbouring regions meet inside a structure, that added false
    # voxels to masks: bench_monai_baseline, 2026-12-02).
    np.testing.assert_allclose(values[0], whole[slices], atol=1e-5)
    # The box is exactly the original voxels whose sample points lie between the box's voxel centres.
    corners = np.array([[a, b, c, 1.0] for a in (box[0][0], box[0][1] - 1) for b in (box[1][0], box[1][1] - 1) for c in (box[2][0], box[2][1] - 1)])
    to_original = np.linalg.inv(volume.affine) @ np.asarray(case.image.affine, dtype=np.float64)
    mapped = (to_original @ corners.T)[:3]
    for d, sl in enumerate(slices):
        assert sl.start == max(0, int(np.ceil(mapped[d].min() - 1e-6)))
        assert sl.stop == int(np.floor(mapped[d].max() + 1e-6)) + 1
    with pytest.raises(ConfigError, match="values of shape"):
        invert_box_to_original(field[:, :4, :4, :4], box, case)
    inverter = BoxInverter(case)
    if inverter.is_index_copy:
        # Voxel by voxel: each model voxel lands on the original voxel that holds its value.
        rng = np.random.default_rng(0)
        voxels = np.stack([rng.integers(0, n, 500) for n in case.model_shape], axis=1)
        where, inside = inverter.copy_voxels(voxels)
        assert inside.all() and len(where[0]) == 500
        np.testing.assert_allclose(whole[where], field[0].numpy()[tuple(voxels.T)], atol=1e-6)
    else:
        with pytest.raises(ConfigError, match="not the original grid"):
            inverter.copy_voxels(np.zeros((1, 3), dtype=np.int64))
        # The separable path computes what MONAI's SpatialResample computes (the generic path).
        generic = BoxInverter(case)
        assert inverter.axes == [0, 1, 2]
        generic.axes = None
        for part, where in ((field[:, 3 : x - 5, 4 : y - 2, 2 : z - 3], box), (field[:, :5, 7:9, -3:], ((0, 5), (7, 9), (z - 3, z)))):
            (fast_slices, fast), (ref_slices, ref) = inverter(part, where), generic(part, where)
            assert fast_slices == ref_slices
            np.testing.assert_allclose(fast, ref, atol=2e-5)
    # The whole model grid as one box, edges included: the same values everywhere, and nothing
    # but the whole-grid inversion's zero padding outside.
    whole_box = tuple((0, n) for n in case.model_shape)
    slices, values = invert_box_to_original(field, whole_box, case)
    np.testing.assert_allclose(values[0], whole[slices], atol=1e-5)
    outside = np.ones(whole.shape, bool)
    outside[slices] = False
    assert np.all(whole[outside] == 0)


def test_ct_window_maps_to_unit_range_and_clips():
    hu = np.array([-3000, -1000, -500, 0, 500, 1000, 3000], np.float32)
    data = np.tile(hu[:, None, None], (1, 4, 3))
    image = Volume(data, np.eye(4), modality="CT")
    config = PreprocessConfig(target_spacing=None, crop_foreground=False)
    scaled = preprocess(image, None, config).image[0, :, 0, 0].numpy()
    assert np.allclose(scaled, [0, 0, 0.25, 0.5, 0.75, 1, 1])
    narrow = PreprocessConfig(target_spacing=None, crop_foreground=False, ct_window=(-160, 240))
    scaled = preprocess(image, None, narrow).image[0, :, 0, 0].numpy()
    assert np.allclose(scaled, [0, 0, 0, 0.4, 1, 1, 1])


@pytest.mark.realdata
def test_mr_percentile_scaling_on_real_breast_mri(shared_data):
    image = read_volume(shared_data / "pyradiomics_mri" / "breast1_image.nrrd", modality="MR")
    config = PreprocessConfig(modality="MR", target_spacing=None, crop_foreground=False)
    x = preprocess(image, None, config).image.numpy()
    assert x.min() == 0.0 and x.max() == 1.0
    # 0.5 / 99.5 percentiles: about 0.5% of voxels clipped at each end.
    assert 0.003 < np.mean(x == 1.0) < 0.01
    lo, hi = np.percentile(image.data, [0.5, 99.5])
    mid = image.data.astype(np.float32)[::-1, ::-1]  # LPS -> RAS
    inside = (mid > lo) & (mid < hi)
    assert np.allclose(x[0][inside], (mid[inside] - lo) / (hi - lo), atol=1e-5)
    # The default MR pipeline (1.5 mm, body crop at the 20th percentile) stays in [0, 1] too.
    default = preprocess(image).image
    assert default.shape[3] == 29  # 21 slices x 2.1 mm resampled to 1.5 mm
    assert float(default.min()) == 0.0 and float(default.max()) == 1.0


def test_foreground_threshold_fixed_and_percentile():
    x = torch.arange(100, dtype=torch.float32).reshape(1, 10, 10, 1)
    assert int(ForegroundThreshold(threshold=-500)(x - 550).sum()) == 49  # -550..-451: above -500 are -499..-451
    assert int(ForegroundThreshold(percentile=20)(x).sum()) == 80  # 20th percentile of 0..99 is 19.8
    with pytest.raises(ConfigError, match="exactly one of"):
        ForegroundThreshold(threshold=0, percentile=10)


def test_foreground_crop_and_its_padding_on_inversion():
    image, label = _box_phantom()
    config = PreprocessConfig(target_spacing=None, margin=3)
    case = preprocess(image, label, config)
    assert case.model_shape == (20 + 6, 20 + 6, 20 + 6)  # body box plus 3 voxels each side
    assert np.allclose(case.image.affine[:3, 3].numpy(), image.voxel_to_world([[17, 12, 7]])[0])
    back_img = invert_to_original(case.image, case, mode="bilinear")
    box = np.zeros(image.shape, bool)
    box[17:43, 12:38, 7:33] = True
    # Background is -700 HU (0.15 after scaling) but the crop's inverse pads the window minimum (0).
    assert np.all(back_img[~box] == 0.0)
    assert np.allclose(back_img[box], np.clip((image.data[box] + 1000.0) / 2000.0, 0, 1))
    back_lab = invert_to_original(case.label, case)
    assert np.all(back_lab[~box] == 0)  # label 2 lived outside the body box: padded as background
    assert np.array_equal(back_lab[box], label.data[box])
    # Scores with background *not* first: outside the crop the background channel must still win.
    ids = [1, 0]
    scores = torch.stack([case.label[0] == c for c in ids]).float()
    back_soft = invert_scores_to_labels(scores, case, class_ids=ids)
    assert np.array_equal(back_soft, np.where(label.data == 2, 0, label.data))


@pytest.mark.realdata
def test_real_crop_removes_only_air(dicom_pair, dicom_case):
    image, _ = dicom_pair
    assert dicom_case.model_shape[1] < 334  # anterior/posterior air removed
    support = invert_to_original(torch.ones((1, *dicom_case.model_shape)), dicom_case, mode="nearest") > 0
    assert 0.2 < np.mean(~support) < 0.5
    assert not np.any(image.data[~support] > -500)


# --- errors and plumbing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"target_spacing": (1.5, 0.0, 1.5)}, "target_spacing"),
        ({"orientation": "RAR"}, "orientation"),
        ({"ct_window": (500, -500)}, "ct_window"),
        ({"mr_percentiles": (99.5, 0.5)}, "mr_percentiles"),
        ({"margin": -1}, "margin"),
        ({"modality": "PET"}, "modality"),
        ({"label_keys": ("image",)}, "label_keys"),
    ],
)
def test_config_rejects_bad_values(kwargs, field):
    with pytest.raises(ConfigError, match=f"PreprocessConfig.{field}"):
        PreprocessConfig(**kwargs)


@pytest.mark.realdata
def test_user_errors_name_the_problem(tmp_path, sm_pair):
    image, label = sm_pair
    with pytest.raises(ConfigError, match="config is for MR but the volume is CT"):
        preprocess(image, None, PreprocessConfig(modality="MR"))
    moved = Volume(label.data, label.affine @ np.diag([1.0, 1.0, 2.0, 1.0]), source=label.source)
    with pytest.raises(InvalidVolumeError, match="example_seg.nii.gz: label map grid .* differs from the image grid"):
        preprocess(image, moved)
    air = Volume(np.full((8, 8, 8), -1000, np.int16), np.eye(4), modality="CT")
    with pytest.raises(InvalidVolumeError, match="no voxel above -500.0 HU"):
        preprocess(air)
    with pytest.raises(ConfigError, match="modality is 'unknown'"):
        preprocess(Volume(image.data, image.affine))
    case = preprocess(image, None, PreprocessConfig(target_spacing=None))
    with pytest.raises(ConfigError, match=r"invert_to_original: got shape \(3, 3, 3\)"):
        invert_to_original(torch.zeros(3, 3, 3), case)
    with pytest.raises(ConfigError, match="mode must be 'nearest' or 'bilinear'"):
        invert_to_original(case.image, case, mode="cubic")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="give one channel"):
        invert_to_volume(torch.zeros((2, *case.model_shape)), case)


def test_pipeline_pickles_for_worker_processes():
    transform = build_preprocessing(PreprocessConfig(modality="MR"))
    clone = pickle.loads(pickle.dumps(transform))
    select = [t for t in clone.transforms if hasattr(t, "cropper")][0].cropper.select_fn
    assert isinstance(select, ForegroundThreshold) and select.percentile == 20.0
