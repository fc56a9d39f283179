"""Box masks and their box-cost NIfTI writer (volumed.io.masks): the file is the one write_nifti
writes for the full array, and every reader opens it."""

from __future__ import annotations

import gzip
import zlib

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from volumed.errors import VolumedError
from volumed.inference.stats import compute_statistics
from volumed.io.masks import BoxMask, _crc_after_zero_slices, _zero_slice, mask_nifti_bytes, write_mask_nifti
from volumed.io.volume import Volume
from volumed.io.writer import write_nifti

AFFINE = np.array([[-0.8, 0.0, 0.0, 120.0], [0.0, -0.8, 0.0, 95.5], [0.0, 0.0, 2.5, -310.0], [0, 0, 0, 1.0]])


def _reference(shape) -> Volume:
    rng = np.random.default_rng(0)
    return Volume(rng.normal(40.0, 30.0, size=shape).astype(np.float32), AFFINE, modality="CT")


def _blob_mask(shape, lo, hi, seed=1) -> np.ndarray:
    """A random bool blob inside the box [lo, hi) that touches every face of the box."""
    mask = np.zeros(shape, bool)
    rng = np.random.default_rng(seed)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    mask[box] = rng.random(tuple(b - a for a, b in zip(lo, hi))) < 0.4
    for axis in range(3):  # make the box tight
        for at in (lo[axis], hi[axis] - 1):
            idx = [slice(a, b) for a, b in zip(lo, hi)]
            idx[axis] = at
            mask[tuple(idx)][0, ...] = True
    return mask


CASES = {
    "inside": ((40, 36, 30), (5, 7, 9), (30, 20, 21)),
    "first_and_last_slice": ((24, 20, 12), (0, 3, 0), (24, 19, 12)),
    "one_voxel": ((16, 16, 16), (15, 0, 7), (16, 1, 8)),
    "single_slice_grid": ((20, 18, 1), (2, 2, 0), (9, 10, 1)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_box_mask_file_is_write_nifti_of_the_full_array(tmp_path, case):
    shape, lo, hi = CASES[case]
    full = _blob_mask(shape, lo, hi)
    ref = _reference(shape)
    box = BoxMask.from_array(full)
    assert box.start == lo and box.crop.shape == tuple(b - a for a, b in zip(lo, hi))
    assert box.voxels == int(full.sum())
    np.testing.assert_array_equal(np.asarray(box), full)

    ours = write_mask_nifti(box, ref, tmp_path / "ours.nii.gz")
    theirs = write_nifti(ref.with_data(full.astype(np.uint8)), tmp_path / "theirs.nii.gz")
    # Same NIfTI bytes (header and voxels), one gzip member whose CRC and size gzip checks.
    assert gzip.decompress(ours.read_bytes()) == gzip.decompress(theirs.read_bytes())
    assert zlib.decompressobj(31).decompress(ours.read_bytes())  # a single well-formed member

    img = nib.load(str(ours))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(img.dataobj), full.astype(np.uint8))
    itk = sitk.ReadImage(str(ours))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(itk).transpose(2, 1, 0), full.astype(np.uint8))


def test_empty_mask_writes_an_all_zero_volume_and_measures_nothing(tmp_path):
    shape = (33, 17, 9)
    ref = _reference(shape)
    empty = BoxMask.from_array(np.zeros(shape, bool))
    assert empty.crop.size == 0 and empty.shape == shape
    assert empty.voxels == 0 and not np.asarray(empty).any()
    path = write_mask_nifti(empty, ref, tmp_path / "absent.nii.gz")
    theirs = write_nifti(ref.with_data(np.zeros(shape, np.uint8)), tmp_path / "theirs.nii.gz")
    assert gzip.decompress(path.read_bytes()) == gzip.decompress(theirs.read_bytes())
    stats = compute_statistics(empty, ref, "gallbladder")
    assert stats.voxels == 0 and stats.volume_ml == 0.0


def test_zero_slice_crc_map_matches_zlib():
    nbytes = 37 * 11
    _, b, columns = _zero_slice(nbytes)
    rng = np.random.default_rng(3)
    for start in [0, 1, 0xFFFFFFFF, *rng.integers(0, 2**32, size=5).tolist()]:
        for count in (0, 1, 4):
            assert _crc_after_zero_slices(int(start), count, b, columns) == zlib.crc32(bytes(nbytes * count), int(start))


def test_statistics_of_a_box_mask_equal_those_of_the_full_array():
    shape = (40, 36, 30)
    full = _blob_mask(shape, (5, 7, 9), (30, 20, 21), seed=5)
    full[35:38, 30:33, 2:4] = True  # a second component: the box spans both
    ref = _reference(shape)
    a = compute_statistics(full, ref, "spleen").to_dict()
    b = compute_statistics(BoxMask.from_array(full), ref, "spleen").to_dict()
    assert a == b
    assert a["components"] >= 2 and a["bbox_voxels"][1] == (37, 32, 20)


def test_box_mask_rejects_a_box_outside_its_grid_and_a_non_bool_crop():
    with pytest.raises(ValueError, match="not inside the grid"):
        BoxMask((10, 10, 10), (8, 0, 0), np.ones((3, 2, 2), bool))
    with pytest.raises(ValueError, match="3-D bool"):
        BoxMask((10, 10, 10), (0, 0, 0), np.ones((3, 2, 2), np.uint8))


def test_writer_refuses_another_grid_a_wrong_suffix_and_an_existing_file(tmp_path):
    ref = _reference((12, 12, 6))
    mask = BoxMask.from_array(_blob_mask((12, 12, 6), (2, 2, 1), (6, 6, 4)))
    with pytest.raises(VolumedError, match="not the reference grid"):
        write_mask_nifti(BoxMask.empty((12, 12, 7)), ref, tmp_path / "x.nii.gz")
    with pytest.raises(VolumedError, match=r"\.nii\.gz"):
        write_mask_nifti(mask, ref, tmp_path / "x.nii")
    path = write_mask_nifti(mask, ref, tmp_path / "liver.nii.gz")
    before = path.read_bytes()
    with pytest.raises(VolumedError, match="exists"):
        write_mask_nifti(BoxMask.empty((12, 12, 6)), ref, path)
    assert path.read_bytes() == before  # nothing silently overwritten
    write_mask_nifti(BoxMask.empty((12, 12, 6)), ref, path, overwrite=True)
    assert not np.asarray(nib.load(str(path)).dataobj).any()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["liver.nii.gz"]  # no temp file left


def test_bytes_do_not_depend_on_the_crop_memory_layout():
    shape = (20, 16, 10)
    full = _blob_mask(shape, (3, 4, 2), (15, 12, 8))
    box = BoxMask.from_array(full)
    fortran = BoxMask(box.shape, box.start, np.asfortranarray(box.crop))
    assert mask_nifti_bytes(box, AFFINE) == mask_nifti_bytes(fortran, AFFINE)
