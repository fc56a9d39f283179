"""The lung lobe atlas (volumed.data.lobe_atlas): its coordinates, how it is built and stored, and
and an atlas of the TotalSegmentator label maps on the real 74 cm CT's reference lungs, which it
never saw."""

import nibabel as nib
import numpy as np
import pytest

from volumed.data.lobe_atlas import ATLAS_PATH, BINS, LOBES, SIDES, build_atlas, load_atlas, lobe_prior, lung_coordinates, save_atlas


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def test_coordinates_run_medial_to_lateral_front_to_back_and_up_from_the_base():
    # Two points of a lung 100 mm wide, 200 mm deep: its medial-front-base and lateral-back-top corners.
    pts = np.array([[-20.0, 50.0, 10.0], [-120.0, -150.0, 310.0]])
    left = lung_coordinates(pts, "left")  # RAS: the left lung's lateral side is its lowest x
    np.testing.assert_allclose(left, [[0.0, 0.0, 0.0], [1.0, 1.0, 1.5]])
    right = lung_coordinates(pts * [-1, 1, 1], "right")
    np.testing.assert_allclose(right, left)
    with pytest.raises(ValueError, match="side"):
        lung_coordinates(pts, "middle")
    with pytest.raises(ValueError, match="non-empty"):
        lung_coordinates(np.zeros((0, 3)), "left")


def test_an_atlas_built_from_a_split_lung_gives_that_split_back(tmp_path):
    # A subject whose lungs are boxes split at mid-height: upper lobes above, lower (and the right
    # middle lobe in front of the lower) below.
    shape = (40, 30, 40)
    masks = {n: np.zeros(shape, bool) for n in LOBES}
    masks["lung_upper_lobe_left"][5:17, 5:25, 25:38] = True
    masks["lung_lower_lobe_left"][5:17, 5:25, 12:25] = True
    masks["lung_upper_lobe_right"][23:35, 5:25, 25:38] = True
    masks["lung_middle_lobe_right"][23:35, 15:25, 12:25] = True
    masks["lung_lower_lobe_right"][23:35, 5:15, 12:25] = True
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    atlas = build_atlas([(masks, affine)])
    assert set(atlas) == set(SIDES) and atlas["left"].shape == (2, *BINS) and atlas["right"].shape == (3, *BINS)
    np.testing.assert_allclose(atlas["right"].sum(axis=0), 1.0, atol=1e-5)
    for side, lobes in SIDES.items():
        lung = np.any([masks[n] for n in lobes], axis=0)
        index = np.argwhere(lung)
        choice = lobe_prior(index @ affine[:3, :3].T, side, atlas).argmax(axis=0)
        for k, name in enumerate(lobes):
            pred = np.zeros(shape, bool)
            pred[tuple(index[choice == k].T)] = True
            assert _dice(pred, masks[name]) > 0.85, (side, name)
    # Stored and read back (float16 on disk), and a file of other bins is refused by name.
    path = save_atlas(atlas, tmp_path / "atlas.npz", sources="boxes")
    again = load_atlas(path)
    np.testing.assert_allclose(again["left"], atlas["left"], atol=1e-3)
    bad = tmp_path / "bad.npz"
    np.savez(bad, bins=np.array([4, 4, 4]), w_max=np.float32(1.6), left=np.zeros((2, 4, 4, 4)), right=np.zeros((3, 4, 4, 4)))
    with pytest.raises(ValueError, match="bad.npz.*bins"):
        load_atlas(bad)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_atlas(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="right lung"):
        build_atlas([({n: masks[n] for n in SIDES["left"]}, affine)])


def test_each_subjects_lung_weighs_the_same_whatever_its_voxel_size():
    # Two subjects with the same lungs: one all upper lobe at 2 mm voxels, one all lower lobe at
    # 1 mm (8 times the voxels). Counted per voxel, the second would take 8/9 of every bin.
    def subject(scale, lobe_left, lobe_right):
        shape = tuple(int(n * scale) for n in (40, 30, 40))
        masks = {n: np.zeros(shape, bool) for n in LOBES}
        box = lambda x0, x1: (slice(int(x0 * scale), int(x1 * scale)), slice(int(5 * scale), int(25 * scale)), slice(int(12 * scale), int(38 * scale)))  # noqa: E731
        masks[lobe_left][box(5, 17)] = True
        masks[lobe_right][box(23, 35)] = True
        return masks, np.diag([2.0 / scale, 2.0 / scale, 2.0 / scale, 1.0])

    atlas = build_atlas([subject(1, "lung_upper_lobe_left", "lung_upper_lobe_right"),
                         subject(2, "lung_lower_lobe_left", "lung_lower_lobe_right")], sigma=0)
    assert abs(float(np.median(atlas["left"][0])) - 0.5) < 0.1 and abs(float(np.median(atlas["right"][0])) - 0.5) < 0.1


def _lobes(folder):
    masks, affine = {}, None
    for name in LOBES:
        if (folder / f"{name}.nii.gz").is_file():
            img = nib.load(folder / f"{name}.nii.gz")
            masks[name], affine = np.asarray(img.dataobj) > 0, np.asarray(img.affine)
    return masks, affine


def test_an_atlas_of_the_label_maps_splits_the_74_cm_cts_lungs_it_never_saw(shared_data):
    """tcia_ccth_a01's reference lungs split by an atlas of the two TotalSegmentator label maps
    alone (the shipped atlas counts tcia_ccth_a01 too, so this is its leave-one-out measure);
    2026-12-06 (bench/bench_lobe_atlas.py): 0.665 / 0.740 / 0.851 / 0.796 / 0.827."""
    tcia = shared_data / "tcia_ccth_a01" / "masks"
    maps = shared_data / "totalsegmentator_label_maps"
    if not tcia.is_dir() or not maps.is_dir():
        pytest.skip(f"{tcia} or {maps} not found")
    atlas = build_atlas([_lobes(maps / s / "segmentations") for s in ("s0327", "s0328")])
    masks, affine = _lobes(tcia)
    floors = {"lung_upper_lobe_left": 0.62, "lung_lower_lobe_left": 0.70, "lung_upper_lobe_right": 0.80,
              "lung_middle_lobe_right": 0.75, "lung_lower_lobe_right": 0.78}  # fmt: skip
    for side, lobes in SIDES.items():
        lung = np.any([masks[n] for n in lobes], axis=0)
        index = np.argwhere(lung)
        choice = lobe_prior(index @ affine[:3, :3].T + affine[:3, 3], side, atlas).argmax(axis=0)
        for k, name in enumerate(lobes):
            pred = np.zeros(lung.shape, bool)
            pred[tuple(index[choice == k].T)] = True
            assert _dice(pred, masks[name]) >= floors[name], name
    # The shipped atlas is the one of all three subjects.
    with np.load(ATLAS_PATH) as f:
        assert str(f["sources"]) == "s0327, s0328, tcia_ccth_a01"
