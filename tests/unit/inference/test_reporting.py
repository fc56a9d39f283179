"""``volumed report`` (volumed.inference.reporting): report.txt, report.json and, for the real
20-slice DICOM series, a TID 1500 SR whose sentences are read back with highdicom and sit in
the measurement group that references their SEG segment; outputs are atomic and never
silently replaced; a segmentation run by the command itself (tiny model) lands in OUT too."""

from __future__ import annotations

import json
import os
import shutil

import highdicom as hd
import numpy as np
import pydicom
import pytest
from segmentation_folder import write_segmentation_folder
from test_structured_report import phantom

from volumed.cli import main
from volumed.errors import ConfigError, OutputExistsError, VolumedError
from volumed.inference.reporting import SR_REPORT_DESCRIPTION, write_report
from volumed.io import read_label, read_volume
from volumed.io.volume import Volume
from volumed.io.writer import write_nifti

#: kidney_left is not in the slab (absent); the others are, from the reference segmentation.
DICOM_NAMES = ["liver", "spleen", "aorta", "kidney_left", "stomach"]
TERMS = ["liver", "spleen"]  # the tiny package's (tests/unit/inference/conftest.py)


@pytest.fixture(scope="module")
def dicom_case(ts_dir, tmp_path_factory):
    """The real series (with UIDs), a segmentation folder of DICOM_NAMES from its reference label
    map, with SEG and SR as volumed segment writes them, and the report of it in another folder."""
    vol = read_volume(ts_dir / "example_ct_dicom_with_uids")
    ref = read_label(ts_dir / "example_seg_dicom.nii.gz", vol).data
    classes = {v: int(k) for k, v in json.loads((ts_dir / "totalsegmentator_class_map_all_tasks.json").read_text())["total"].items()}
    root = tmp_path_factory.mktemp("dicom")
    seg_dir = write_segmentation_folder(vol, {n: ref == classes[n] for n in DICOM_NAMES}, root / "seg",
                                        bounds={"kidney_left": 0.02})
    assert (seg_dir / "segmentation.dcm").is_file() and (seg_dir / "report_sr.dcm").is_file()
    result = write_report(ts_dir / "example_ct_dicom_with_uids", root / "report", from_segmentation=seg_dir)
    return vol, seg_dir, result


def test_dicom_sr_round_trip_holds_every_sentence_in_the_group_of_its_segment(dicom_case):
    vol, seg_dir, result = dicom_case
    data = json.loads(result.report_json.read_text())
    sentences = data["sentences"]
    assert result.dicom_sr == result.out_dir / "report_sr.dcm"
    assert sorted(p.name for p in result.out_dir.iterdir()) == ["report.json", "report.txt", "report_sr.dcm"]

    seg = pydicom.dcmread(seg_dir / "segmentation.dcm", stop_before_pixels=True)
    segments = {int(s.SegmentNumber): s.TrackingID for s in seg.SegmentSequence}
    raw = pydicom.dcmread(result.dicom_sr)
    sr = hd.sr.srread(result.dicom_sr)
    assert raw.SeriesDescription == SR_REPORT_DESCRIPTION and raw.StudyInstanceUID == vol.source.study_uid
    assert data["dicom"]["sr"]["sop_instance_uid"] == raw.SOPInstanceUID
    assert data["dicom"]["seg"]["sop_instance_uid"] == seg.SOPInstanceUID

    groups = {g.tracking_identifier: g for g in sr.content.get_volumetric_roi_measurement_groups()}
    groups.update({g.tracking_identifier: g for g in sr.content.get_image_measurement_groups()})
    assert sorted(groups) == sorted(DICOM_NAMES)

    def findings(group):
        return [i.TextValue for i in group[0].ContentSequence
                if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "121071"]

    # Every sentence, in report order, is a Finding of its subject's group, and nowhere else.
    read_back = [text for name in DICOM_NAMES for text in findings(groups[name])]
    assert sorted(read_back) == sorted(s["text"] for s in sentences) and len(read_back) == len(sentences)
    for s in sentences:
        subject = s["masks"][0]
        group = groups[subject["term"]]
        assert s["text"] in findings(group)
        if subject["segment_number"] is not None:  # present: the group references that SEG segment
            ref = group.referenced_segment[0].ReferencedSOPSequence[0]
            assert ref.ReferencedSOPInstanceUID == seg.SOPInstanceUID
            assert ref.ReferencedSegmentNumber == subject["segment_number"]
            assert segments[subject["segment_number"]] == subject["term"]
            volume = [m for m in group.get_measurements() if m.name.meaning == "Volume"][0]
            stated = [m for m in s["measurements"] if m["key"].endswith("/volume_ml")]
            assert stated and volume.value == pytest.approx(stated[0]["value"], rel=1e-9)
            assert stated[0]["stated"] in s["text"]
        else:
            assert s["section"] == "absent"
    absent = groups["kidney_left"]
    assert [q.value.meaning for q in absent.get_qualitative_evaluations()
            if q.name.meaning == "Presence of property"] == ["Absent"]
    assert findings(absent) == ["The left kidney is absent: the model's probability is at most 0.02 everywhere in "
                                "the scan (threshold 0.5)."]
    # The slab is 20 slices: the liver is cut by the field of view, so no range verdict.
    liver = next(s for s in sentences if s["masks"][0]["term"] == "liver")
    assert "reaches the edge of the scanned volume" in liver["text"]
    text = result.report_txt.read_text()
    assert all(s["text"] in text for s in sentences) and text == data["text"]


def test_existing_reports_are_refused_unless_overwrite(dicom_case, ts_dir, tmp_path):
    vol, seg_dir, result = dicom_case
    before = result.report_json.read_bytes()
    with pytest.raises(OutputExistsError, match="report.txt, report.json, report_sr.dcm"):
        write_report(ts_dir / "example_ct_dicom_with_uids", result.out_dir, from_segmentation=seg_dir)
    assert result.report_json.read_bytes() == before
    # Into the segmentation folder itself: segment's report.txt and SR are replaced only when asked.
    copy = tmp_path / "seg"
    shutil.copytree(seg_dir, copy)
    with pytest.raises(OutputExistsError, match="report.txt"):
        write_report(ts_dir / "example_ct_dicom_with_uids", copy, from_segmentation=copy)
    done = write_report(ts_dir / "example_ct_dicom_with_uids", copy, from_segmentation=copy, overwrite=True)
    assert done.report_txt.read_text().startswith("volumed structured report")
    assert pydicom.dcmread(copy / "report_sr.dcm").SeriesDescription == SR_REPORT_DESCRIPTION
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_an_anonymised_series_without_uids_gets_no_sr_and_says_why(ts_dir, tmp_path):
    vol = read_volume(ts_dir / "example_ct_dicom")  # UIDs emptied: no SEG, so nothing to reference
    liver = read_label(ts_dir / "example_seg_dicom.nii.gz", vol).data == 5
    seg_dir = write_segmentation_folder(vol, {"liver": liver}, tmp_path / "seg")
    result = write_report(ts_dir / "example_ct_dicom", tmp_path / "out", from_segmentation=seg_dir)
    assert result.dicom_sr is None and not (tmp_path / "out" / "report_sr.dcm").exists()
    assert any("DICOM SR skipped" in w for w in result.warnings)


def test_bad_inputs_name_the_file(tmp_path, capsys):
    volume, masks = phantom()
    image = write_nifti(volume, tmp_path / "ct.nii.gz")
    with pytest.raises(VolumedError, match="no statistics.json here") as err:
        write_report(image, tmp_path / "out", from_segmentation=tmp_path)
    assert err.value.path == tmp_path / "statistics.json"
    seg_dir = write_segmentation_folder(volume, {"liver": masks["liver"]}, tmp_path / "seg")
    other = write_nifti(Volume(np.asarray(volume.data)[:, :, :20], volume.affine, "CT"), tmp_path / "other.nii.gz")
    with pytest.raises(ConfigError, match="not the segmented image"):
        write_report(other, tmp_path / "out", from_segmentation=seg_dir)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    # The command line: one line naming the file, exit code 2.
    assert _exit_code(["report", str(image), "--from-segmentation", str(tmp_path), "-o", str(tmp_path / "out")]) == 2
    err_line = capsys.readouterr().err.strip().splitlines()
    assert len(err_line) == 1 and "statistics.json" in err_line[0] and err_line[0].startswith("volumed: error:")


def _exit_code(args) -> int:
    """Run ``volumed ARGS`` as the console script does; its exit status."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    return exit_.value.code


def test_report_command_segments_first_and_publishes_everything(package, tmp_path, capsys):
    volume, _ = phantom()
    image = write_nifti(volume, tmp_path / "ct.nii.gz")
    out = tmp_path / "out"
    args = ["report", str(image), "-o", str(out), "--model", str(package), "--no-progress"]
    assert _exit_code(args) == 0
    names = sorted(os.listdir(out))
    assert {"labels.json", "labels.nii.gz", "masks", "preview.png", "report.json", "report.txt",
            "statistics.json"} <= set(names)
    data = json.loads((out / "report.json").read_text())
    stats = json.loads((out / "statistics.json").read_text())
    assert data["segmentation_dir"] == str(out) and sorted(stats["terms"]) == sorted(TERMS)
    # Every term is stated, present or absent, with the numbers of statistics.json.
    assert sorted({s["masks"][0]["term"] for s in data["sentences"]}) == sorted(TERMS)
    assert (out / "report.txt").read_text() == data["text"]
    assert "wrote" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert _exit_code(args) == 2 and "--overwrite" in capsys.readouterr().err  # nothing silently overwritten
    assert _exit_code(args + ["--overwrite"]) == 0


def test_the_narrative_sr_passes_dciodvfy(dicom_case):
    """The Finding TEXT items keep the SR a valid Comprehensive 3D SR (dicom3tools' dciodvfy: no
    error; tests/unit/io/test_dicom_conformance.py checks the SR without sentences)."""
    import subprocess

    tool = shutil.which("dciodvfy")
    if tool is None:
        pytest.skip("dciodvfy is not installed (Debian package dicom3tools)")
    _, _, result = dicom_case
    done = subprocess.run([tool, str(result.dicom_sr)], capture_output=True, text=True, timeout=120, check=False)
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert lines[:1] == ["Comprehensive3DSR"], lines
    assert not [line for line in lines if line.startswith("Error")], "\n".join(lines)
