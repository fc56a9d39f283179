"""Writing: NIfTI on the input grid, DICOM SEG round trip on the real series, atomic outputs."""

import json

import numpy as np
import pytest

from volumed.errors import DicomSeriesError, OutputExistsError
from volumed.io import read_label, read_volume
from volumed.io.atomic import atomic_output
from volumed.io.writer import SegmentSpec, read_dicom_seg, write_dicom_seg, write_label_map, write_masks


@pytest.fixture(scope="module")
def dicom_case(ts_dir):
    vol = read_volume(ts_dir / "example_ct_dicom_with_uids")
    lab = read_label(ts_dir / "example_seg_dicom.nii.gz", vol)
    names = json.loads((ts_dir / "totalsegmentator_class_map_all_tasks.json").read_text())["total"]
    segments = [SegmentSpec(int(v), names[str(int(v))]) for v in np.unique(lab.data) if v]
    return vol, lab, segments


def test_dicom_seg_round_trip_is_voxel_identical(dicom_case, tmp_path):
    vol, lab, segments = dicom_case
    out = write_dicom_seg(lab.data, vol, segments, tmp_path / "seg.dcm")
    content = read_dicom_seg(out, vol)
    assert len(content.segments) == len(segments) == 31
    for seg, spec in zip(content.segments, segments):
        assert seg.name == spec.name
        np.testing.assert_array_equal(content.masks[seg.number], lab.data == spec.value, err_msg=spec.name)
    # It references the source series and its frame of reference, in the same study.
    assert content.referenced_series_uid == vol.source.series_uid
    assert content.frame_of_reference_uid == vol.source.frame_of_reference_uid
    assert content.study_uid == vol.source.study_uid
    by_name = {s.name: s for s in content.segments}
    assert by_name["liver"].property_type == ("10200004", "SCT", "Liver")
    left = [s for s in content.segments if s.name.endswith("_left") and s.property_type[1] == "SCT"]
    assert left and all(s.laterality == ("7771000", "SCT", "Left") for s in left)
    # Structures SNOMED CT lacks in pydicom's dictionary use the documented local scheme.
    local = [s for s in content.segments if s.property_type[1] == "99VOLUMED"]
    assert all(s.property_type[2] for s in local)


def test_dicom_seg_refuses_series_without_uids(ts_dir, tmp_path):
    vol = read_volume(ts_dir / "example_ct_dicom")  # anonymised with empty UIDs
    with pytest.raises(DicomSeriesError, match="empty StudyInstanceUID, SeriesInstanceUID"):
        write_dicom_seg(np.zeros(vol.shape, np.uint8), vol, [SegmentSpec(1, "liver")], tmp_path / "seg.dcm")
    assert not list(tmp_path.iterdir())


def test_dicom_seg_needs_dicom_source(ts_dir, tmp_path):
    vol = read_volume(ts_dir / "example_ct_sm.nii.gz")
    with pytest.raises(DicomSeriesError, match="needs a DICOM source series"):
        write_dicom_seg(np.zeros(vol.shape, np.uint8), vol, [SegmentSpec(1, "liver")], tmp_path / "seg.dcm")


def test_nifti_outputs_on_input_grid(dicom_case, tmp_path):
    vol, lab, segments = dicom_case
    out = write_label_map(lab.data, vol, tmp_path / "labels.nii.gz")
    back = read_volume(out)
    assert back.same_grid(vol, atol=1e-6)
    np.testing.assert_array_equal(back.data, lab.data)
    masks = write_masks(lab.data, {s.value: s.name for s in segments[:3]}, vol, tmp_path / "masks")
    for spec in segments[:3]:
        m = read_volume(masks[spec.name])
        assert m.same_grid(vol, atol=1e-6) and m.data.dtype == np.uint8
        np.testing.assert_array_equal(m.data, (lab.data == spec.value).astype(np.uint8))


def test_no_silent_overwrite(dicom_case, tmp_path):
    vol, lab, _ = dicom_case
    p = write_label_map(lab.data, vol, tmp_path / "labels.nii.gz")
    before = p.read_bytes()
    with pytest.raises(OutputExistsError, match="overwrite"):
        write_label_map(np.zeros_like(lab.data), vol, p)
    assert p.read_bytes() == before
    write_label_map(np.zeros_like(lab.data), vol, p, overwrite=True)
    assert read_volume(p).data.max() == 0


def test_atomic_output_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
