"""Reading real CTs: geometry, HU and overlay of the reference segmentations in physical space."""

import numpy as np
import pytest

from volumed.io import read_label, read_volume
from volumed.io.volume import Volume


def test_dicom_series_geometry_and_hu(ts_dir):
    vol = read_volume(ts_dir / "example_ct_dicom")
    assert vol.shape == (512, 512, 20)
    np.testing.assert_allclose(vol.spacing, (0.9765625, 0.9765625, 2.0), atol=1e-6)
    assert (float(vol.data.min()), float(vol.data.max())) == (-1024.0, 1839.0)
    assert vol.modality == "CT"
    assert vol.orientation == "LPS"
    assert vol.source.format == "dicom" and len(vol.source.files) == 20
    # Slices are sorted by position along the normal: the affine's k column is +2 mm superior.
    np.testing.assert_allclose(vol.affine[:3, 2], (0, 0, 2.0), atol=1e-6)
    # First slice position (LPS -249.5, -437.5, -766.5) -> RAS (249.5, 437.5, -804.5 is the lowest slice).
    assert vol.affine[2, 3] == pytest.approx(-804.5)
    assert vol.source.frame_of_reference_uid == "1.3.12.2.1107.5.1.4.60064.30000022120807274275100000041"
    # The original series was anonymised with empty study/series UIDs; the reader survives it.
    assert vol.source.series_uid is None and vol.source.study_uid is None


def test_dicom_series_uids(ts_dir):
    vol = read_volume(ts_dir / "example_ct_dicom_with_uids")
    assert vol.source.study_uid.startswith("2.25.") and vol.source.series_uid.startswith("2.25.")
    assert len(set(vol.source.sop_instance_uids)) == 20
    # series_uid= selects by SeriesInstanceUID.
    again = read_volume(ts_dir / "example_ct_dicom_with_uids", series_uid=vol.source.series_uid)
    np.testing.assert_array_equal(again.data, vol.data)


def test_slices_sorted_by_position_not_name(ts_dir, tmp_path):
    """Copy the slices under shuffled names: the volume must be identical."""
    import shutil

    src = sorted((ts_dir / "example_ct_dicom").iterdir())
    rng = np.random.default_rng(0)
    for new_index, f in zip(rng.permutation(len(src)), src):
        shutil.copy(f, tmp_path / f"slice_{new_index:03d}.dcm")
    shuffled = read_volume(tmp_path)
    ref = read_volume(ts_dir / "example_ct_dicom")
    np.testing.assert_array_equal(shuffled.data, ref.data)
    np.testing.assert_allclose(shuffled.affine, ref.affine)


def _mean_hu(vol: Volume, lab: Volume, value: int) -> float:
    return float(vol.data[lab.data == value].mean())


def test_dicom_segmentation_overlays_in_physical_space(ts_dir):
    vol = read_volume(ts_dir / "example_ct_dicom")
    lab = read_label(ts_dir / "example_seg_dicom.nii.gz", vol)  # stored LAS; the series is LPS
    assert lab.same_grid(vol)
    assert _mean_hu(vol, lab, 5) == pytest.approx(89, abs=10)  # liver
    assert _mean_hu(vol, lab, 52) == pytest.approx(177, abs=10)  # aorta (contrast)
    # A pure axis flip: no voxel was interpolated.
    raw = read_volume(ts_dir / "example_seg_dicom.nii.gz").data
    np.testing.assert_array_equal(lab.data, raw[:, ::-1, :])


def test_label_map_of_another_scan_is_refused_not_silently_emptied(ts_dir):
    """`volumed preview example_ct_sm.nii.gz --label example_seg_dicom.nii.gz` (the DICOM slab's
    label map, 80 cm lower) drew no overlay and said nothing: resampling gave all background."""
    from volumed.errors import InvalidVolumeError

    vol = read_volume(ts_dir / "example_ct_sm.nii.gz")
    with pytest.raises(InvalidVolumeError, match="example_seg_dicom.nii.gz.*does not overlap the image"):
        read_label(ts_dir / "example_seg_dicom.nii.gz", vol)


def test_nifti_ct_and_segmentation(ts_dir):
    vol = read_volume(ts_dir / "example_ct_sm.nii.gz")
    assert vol.shape == (122, 101, 30) and vol.orientation == "RAS" and vol.modality == "CT"
    np.testing.assert_allclose(vol.spacing, (3.0, 3.0, 3.0))
    lab = read_label(ts_dir / "example_seg.nii.gz", vol)
    assert len(np.unique(lab.data)) - 1 == 41
    assert _mean_hu(vol, lab, 5) == pytest.approx(45, abs=10)  # liver
    assert _mean_hu(vol, lab, 1) == pytest.approx(33, abs=10)  # spleen


def test_nrrd_mri(shared_data):
    vol = read_volume(shared_data / "pyradiomics_mri" / "breast1_image.nrrd", modality="MR")
    assert vol.shape == (45, 120, 21) and vol.modality == "MR"
    np.testing.assert_allclose(vol.spacing, (0.664062, 0.664062, 2.1), atol=1e-5)
    lab = read_label(shared_data / "pyradiomics_mri" / "breast1_label.nrrd", vol)
    assert lab.same_grid(vol) and set(np.unique(lab.data)) == {0, 1}
    # Without --modality, an MR volume (no air in HU) is not mistaken for CT.
    assert read_volume(shared_data / "pyradiomics_mri" / "breast1_image.nrrd").modality == "unknown"


def test_mha_round_trip_geometry(ts_dir, tmp_path):
    """NIfTI -> MHA with SimpleITK: same voxels and the same RAS affine after reading back."""
    import SimpleITK as sitk

    src = ts_dir / "example_ct_sm.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(src)), str(tmp_path / "ct.mha"))
    a, b = read_volume(src), read_volume(tmp_path / "ct.mha")
    np.testing.assert_array_equal(a.data, b.data)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)


def test_metatensor_carries_affine(ts_dir):
    vol = read_volume(ts_dir / "example_ct_sm.nii.gz")
    mt = vol.to_metatensor()
    assert tuple(mt.shape) == (1, 122, 101, 30)
    np.testing.assert_allclose(mt.affine.numpy(), vol.affine)
