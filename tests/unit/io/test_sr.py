"""DICOM SR (volumed.io.sr): a TID 1500 report of a SEG of the real DICOM series, read back with
pydicom and highdicom; absent structures reported, SEG references checked, no silent overwrite."""


import pydicom
import pytest

from volumed.errors import DicomSeriesError, OutputExistsError, VolumedError
from volumed.io import read_volume
from volumed.io.sr import SR_SERIES_DESCRIPTION, write_dicom_sr

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
# kidney_left is not in the 20-slice slab: absent. portal_vein_and_splenic_vein has a local code.
NAMES = ["liver", "spleen", "kidney_left", "portal_vein_and_splenic_vein", "rib_left_7"]


@pytest.fixture(scope="module")
def sr_case(reference_seg_and_findings, tmp_path_factory):
    """The real series, statistics.json-like entries of NAMES and a SEG of the present ones."""
    vol, entries, seg_path, findings = reference_seg_and_findings(NAMES, tmp_path_factory.mktemp("seg"))
    assert [e["present"] for e in entries.values()] == [True, True, False, True, True]
    return vol, entries, seg_path, findings


def _comments(group) -> list[str]:
    return [item.TextValue for item in group[0].ContentSequence
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"]


def _measurement(group, meaning: str, derivation: str | None = None):
    hits = [m for m in group.get_measurements()
            if m.name.meaning == meaning and (derivation is None or (m.derivation and m.derivation.meaning == derivation))]
    assert len(hits) == 1, (group.tracking_identifier, meaning, derivation)
    return hits[0]


def test_sr_reports_every_structure_with_the_statistics_and_references_the_seg(sr_case, tmp_path):
    import highdicom as hd

    vol, entries, seg_path, findings = sr_case
    out = write_dicom_sr(findings, vol, seg_path, tmp_path / "report_sr.dcm", threshold=0.5)
    raw = pydicom.dcmread(out)
    sr = hd.sr.srread(out)
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    source = pydicom.dcmread(vol.source.files[0], stop_before_pixels=True)

    assert raw.SOPClassUID == COMPREHENSIVE_3D_SR and raw.Modality == "SR" and isinstance(sr, hd.sr.Comprehensive3DSR)
    # Same patient and study as the source; a series and instance of its own.
    for key in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate", "StudyID"):
        assert raw[key].value == source[key].value, key
    assert raw.SeriesInstanceUID not in (source.SeriesInstanceUID, seg.SeriesInstanceUID)
    assert raw.SOPInstanceUID not in (source.SOPInstanceUID, seg.SOPInstanceUID)
    assert raw.SeriesDescription == SR_SERIES_DESCRIPTION and raw.Manufacturer == "volumed" and raw.SoftwareVersions
    assert (raw.CompletionFlag, raw.VerificationFlag, raw.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")
    # Evidence: every source slice and the SEG.
    evidence = {s.SeriesInstanceUID: {i.ReferencedSOPInstanceUID for i in s.ReferencedSOPSequence}
                for study in raw.CurrentRequestedProcedureEvidenceSequence for s in study.ReferencedSeriesSequence}
    assert evidence[vol.source.series_uid] == set(vol.source.sop_instance_uids)
    assert evidence[seg.SeriesInstanceUID] == {seg.SOPInstanceUID}
    # The local code of portal_vein_and_splenic_vein is declared.
    assert [s.CodingSchemeDesignator for s in raw.CodingSchemeIdentificationSequence] == ["99VOLUMED"]

    # One volumetric group per present structure, referencing its SEG segment.
    segments = {s.TrackingID: s for s in seg.SegmentSequence}
    volumetric = {g.tracking_identifier: g for g in sr.content.get_volumetric_roi_measurement_groups()}
    assert sorted(volumetric) == sorted(n for n in NAMES if entries[n]["present"])
    for name, group in volumetric.items():
        e, seg_item = entries[name], segments[name]
        ref = group.referenced_segment[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == seg.SOPClassUID
        assert ref.ReferencedSegmentNumber == seg_item.SegmentNumber
        assert group.tracking_uid == seg_item.TrackingUID  # SR and SEG track the same structure
        assert group.finding_type.value == seg_item.SegmentedPropertyTypeCodeSequence[0].CodeValue
        volume = _measurement(group, "Volume")
        assert (volume.name.value, volume.unit.value) == ("118565006", "ml")
        assert volume.value == pytest.approx(e["volume_ml"], rel=1e-9)
        hu = _measurement(group, "Attenuation Coefficient", "Mean")
        assert hu.unit.value == "[hnsf'U]" and hu.value == pytest.approx(e["intensity"]["mean"], rel=1e-9)
        assert _measurement(group, "Probability", "Mean").value == pytest.approx(e["confidence"])
        assert _measurement(group, "Probability", "Maximum").value == pytest.approx(e["max_probability"])
        presence = [q.value.meaning for q in group.get_qualitative_evaluations() if q.name.meaning == "Presence of property"]
        assert presence == ["Present"]
        assert f"prompt '{e['prompt']}'" in _comments(group)
    liver_site = volumetric["liver"].finding_sites[0].value
    assert (liver_site.value, liver_site.scheme_designator) == ("10200004", "SCT")
    rib = volumetric["rib_left_7"]
    assert rib.finding_type.meaning == "Rib" and rib.finding_sites[0].laterality.meaning == "Left"
    # Code items hold codes only: the SEG's modifier sequence does not leak into the SR.
    codes = [i.ConceptCodeSequence[0] for i in rib[0].ContentSequence if i.ValueType == "CODE"]
    assert codes and all(set(c.dir()) <= {"CodeValue", "CodingSchemeDesignator", "CodeMeaning", "CodingSchemeVersion"}
                         for c in codes)

    # The absent structure is listed, as absent, with its evidence; no measurements.
    (absent,) = sr.content.get_image_measurement_groups()
    assert absent.tracking_identifier == "kidney_left" and not absent.get_measurements()
    assert [q.value.meaning for q in absent.get_qualitative_evaluations() if q.name.meaning == "Presence of property"] == ["Absent"]
    assert "not found: the model's probability is at most 0.230 everywhere in the image (threshold 0.5)" in _comments(absent)
    site = absent.finding_sites[0]
    assert site.value.meaning == "Kidney" and site.laterality.meaning == "Left"


def test_sr_refuses_overwrite_unless_asked(sr_case, tmp_path):
    vol, _, seg_path, findings = sr_case
    path = write_dicom_sr(findings, vol, seg_path, tmp_path / "report_sr.dcm")
    before = path.read_bytes()
    first = pydicom.dcmread(path).SOPInstanceUID
    with pytest.raises(OutputExistsError, match="report_sr.dcm: output exists already; pass overwrite=True"):
        write_dicom_sr(findings, vol, seg_path, path)
    assert path.read_bytes() == before
    write_dicom_sr(findings, vol, seg_path, path, overwrite=True)
    assert pydicom.dcmread(path).SOPInstanceUID != first  # replaced by a new instance
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report_sr.dcm"]  # no temporary file left


def test_sr_checks_its_seg_references(sr_case, tmp_path):
    vol, _, seg_path, findings = sr_case
    liver, spleen = findings[0], findings[1]
    wrong = [liver.__class__(**{**liver.__dict__, "segment_number": spleen.segment_number})]
    with pytest.raises(VolumedError, match=f"SEG segment {spleen.segment_number} is 'spleen', not 'liver'"):
        write_dicom_sr(wrong, vol, seg_path, tmp_path / "sr.dcm")
    with pytest.raises(VolumedError, match="the DICOM SEG has no segment 9"):
        write_dicom_sr([liver.__class__(**{**liver.__dict__, "segment_number": 9})], vol, seg_path, tmp_path / "sr.dcm")
    with pytest.raises(VolumedError, match="kidney_left is absent but given SEG segment 1"):
        write_dicom_sr([findings[2].__class__(**{**findings[2].__dict__, "segment_number": 1})], vol, seg_path,
                       tmp_path / "sr.dcm")
    with pytest.raises(VolumedError, match="no structures to report"):
        write_dicom_sr([], vol, seg_path, tmp_path / "sr.dcm")
    assert not list(tmp_path.iterdir())


def test_sr_says_when_the_seg_segment_is_smaller_than_the_mask_or_missing(sr_case, tmp_path):
    """The label map gives an overlap to the more probable structure: a segment may be smaller
    than the mask that statistics.json measures, or missing; the SR says so and keeps the mask's numbers."""
    import highdicom as hd

    vol, entries, seg_path, findings = sr_case
    liver, spleen = findings[0], findings[1]
    smaller = liver.__class__(**{**liver.__dict__, "segment_voxels": liver.voxels - 100})
    lost = spleen.__class__(**{**spleen.__dict__, "segment_number": None, "segment_voxels": None})
    sr = hd.sr.srread(write_dicom_sr([smaller, lost], vol, seg_path, tmp_path / "sr.dcm"))
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    assert group.tracking_identifier == "liver"
    assert f"the SEG segment holds {liver.voxels - 100} of the mask's {liver.voxels} voxels" in " ".join(_comments(group))
    assert _measurement(group, "Volume").value == pytest.approx(entries["liver"]["volume_ml"], rel=1e-9)
    # A present structure without a segment: a group with no image reference, still Present and measured.
    (other,) = sr.content.get_image_measurement_groups()
    assert other.tracking_identifier == "spleen"
    assert [q.value.meaning for q in other.get_qualitative_evaluations() if q.name.meaning == "Presence of property"] == ["Present"]
    assert _measurement(other, "Volume").value == pytest.approx(entries["spleen"]["volume_ml"], rel=1e-9)
    assert any(c.startswith(f"not in the DICOM SEG: every voxel of its mask ({spleen.voxels})") for c in _comments(other))


def test_sr_needs_a_dicom_source_series(ts_dir, sr_case, tmp_path):
    _, _, seg_path, findings = sr_case
    nifti = read_volume(ts_dir / "example_ct_sm.nii.gz")
    with pytest.raises(DicomSeriesError, match="a DICOM SR needs a DICOM source series"):
        write_dicom_sr(findings, nifti, seg_path, tmp_path / "sr.dcm")
    anonymised = read_volume(ts_dir / "example_ct_dicom")  # empty UIDs
    with pytest.raises(DicomSeriesError, match="empty StudyInstanceUID.*a DICOM SR must reference them"):
        write_dicom_sr(findings, anonymised, seg_path, tmp_path / "sr.dcm")
    assert not list(tmp_path.iterdir())


def test_sr_of_a_seg_with_one_segment(reference_seg_and_findings, tmp_path):
    """highdicom writes a one-segment SEG with the segment identification in the shared
    functional groups; the SR must still reference it (``volumed segment DICOM -p liver`` once
    failed here with an AttributeError from highdicom's ``ReferencedSegment.from_segmentation``)."""
    import highdicom as hd

    vol, entries, seg_path, findings = reference_seg_and_findings(["liver", "kidney_left"], tmp_path)
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True)
    assert len(seg.SegmentSequence) == 1
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert "SegmentIdentificationSequence" in shared  # the case highdicom's reader does not take
    assert not any("SegmentIdentificationSequence" in f for f in seg.PerFrameFunctionalGroupsSequence)

    out = write_dicom_sr(findings, vol, seg_path, tmp_path / "report_sr.dcm", threshold=0.5)
    sr = hd.sr.srread(out)
    (group,) = sr.content.get_volumetric_roi_measurement_groups()
    assert group.tracking_identifier == "liver"
    ref = group.referenced_segment[0].ReferencedSOPSequence[0]
    assert (ref.ReferencedSOPInstanceUID, ref.ReferencedSegmentNumber) == (seg.SOPInstanceUID, 1)
    # Its source images: the slices the SEG's frames were derived from, each once.
    sources = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in group.referenced_segment[1:]]
    derived = {s.ReferencedSOPInstanceUID for f in seg.PerFrameFunctionalGroupsSequence
               for d in f.DerivationImageSequence for s in d.SourceImageSequence}
    assert len(sources) == len(set(sources)) == len(derived) > 1 and set(sources) == derived
    assert derived <= set(vol.source.sop_instance_uids)


def test_sr_segment_reference_equals_highdicoms_where_highdicom_reads_the_seg(sr_case):
    """With one segment per frame group (several segments), the reference is highdicom's own."""
    import highdicom as hd

    from volumed.io.sr import _referenced_segment

    _, _, seg_path, findings = sr_case
    seg = pydicom.dcmread(seg_path)
    numbers = [f.segment_number for f in findings if f.segment_number is not None]
    assert len(numbers) == 4
    for number in numbers:
        assert _referenced_segment(seg, number) == hd.sr.ReferencedSegment.from_segmentation(seg, segment_number=number)
