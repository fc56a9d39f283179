"""DICOM conformance of what ``volumed segment`` writes: the SEG and the SR of the real DICOM
series pass dicom3tools' ``dciodvfy`` (IOD, module and attribute checks) with no error, their
only warnings are the ones docs/coding.md lists, and ``dcentvfy`` finds SEG and SR consistent
(same patient for the same study).

dicom3tools is a test-time Debian package (``apt-get install dicom3tools``), not a Python
dependency. Without it these tests skip, except where ``VOLUMED_REQUIRE_DICOM3TOOLS=1`` (set by
.ci/run, which installs the package when missing): there a missing binary fails the run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pydicom
import pytest

from volumed.io.coding import LOCAL_SCHEME, structure_code
from volumed.io.sr import write_dicom_sr

# Present (liver), absent (kidney_left), a local 99VOLUMED code (portal_vein_and_splenic_vein)
# and a laterality modifier (rib_left_7): every kind of segment and SR group the writers make.
NAMES = ["liver", "kidney_left", "portal_vein_and_splenic_vein", "rib_left_7"]
UNRECOGNISED_SCHEME = re.compile(r"^Warning - Unrecognized defined term <([^>]*)> for value 1 of attribute <Coding Scheme Designator>$")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path:
        return path
    why = f"{name} is not installed (Debian package dicom3tools: apt-get install dicom3tools)"
    if os.environ.get("VOLUMED_REQUIRE_DICOM3TOOLS") == "1":
        pytest.fail(f"{why}; VOLUMED_REQUIRE_DICOM3TOOLS=1 (CI) requires it", pytrace=False)
    pytest.skip(why)


def _run(tool: str, *files: Path) -> list[str]:
    """The tool's report lines (it writes to both streams), blank lines dropped. Its exit status
    is 1 when it reports an error; the lines say which, so they are what the tests read."""
    done = subprocess.run([_tool(tool), *map(str, files)], check=False, capture_output=True, text=True, timeout=120)
    return [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def _errors(lines: list[str]) -> list[str]:
    return [line for line in lines if line.startswith("Error")]


@pytest.fixture(scope="module")
def written(reference_seg_and_findings, tmp_path_factory):
    """A SEG and an SR of the real series, from its reference label map (no model needed),
    written as ``volumed segment`` writes them (a SegmentDescription on every segment)."""
    out = tmp_path_factory.mktemp("conformance")
    vol, entries, seg, findings = reference_seg_and_findings(NAMES, out, describe=True)
    assert [n for n in NAMES if entries[n]["present"]] == ["liver", "portal_vein_and_splenic_vein", "rib_left_7"]
    assert structure_code("portal_vein_and_splenic_vein").local
    sr = write_dicom_sr(findings, vol, seg, out / "report_sr.dcm", threshold=0.5)
    source = pydicom.dcmread(vol.source.files[0], stop_before_pixels=True)
    # Study attributes are copied from the source, codes included (e.g. its Procedure Code Sequence).
    source_schemes = {item.CodingSchemeDesignator for item in source.get("ProcedureCodeSequence", [])}
    return seg, sr, source_schemes


@pytest.mark.parametrize("which, iod", [("seg", "Segmentation"), ("sr", "Comprehensive3DSR")])
def test_dciodvfy_finds_no_error_and_only_the_documented_warnings(written, which, iod):
    seg, sr, source_schemes = written
    path = seg if which == "seg" else sr
    lines = _run("dciodvfy", path)
    assert lines[:1] == [iod], lines  # it recognised the IOD and checked it against its modules
    assert not _errors(lines), "\n".join(lines)
    # The only warnings (docs/coding.md): a coding scheme dicom3tools does not know, either our
    # private 99VOLUMED or one the source study's own codes use (here SECTRA).
    warnings = [line for line in lines[1:] if line.startswith("Warning")]
    assert len(warnings) == len(lines) - 1, lines
    schemes = [m.group(1) if (m := UNRECOGNISED_SCHEME.match(w)) else w for w in warnings]
    assert set(schemes) <= {LOCAL_SCHEME, *source_schemes}, "\n".join(lines)
    # Each scheme is seen: the local code and its declaration, and the copied study codes.
    assert set(schemes) == {LOCAL_SCHEME, *source_schemes}
    declared = [i.CodingSchemeDesignator for i in pydicom.dcmread(path, stop_before_pixels=True).CodingSchemeIdentificationSequence]
    assert declared == [LOCAL_SCHEME]


def test_dcentvfy_finds_seg_and_sr_consistent(written):
    seg, sr, _ = written
    lines = _run("dcentvfy", seg, sr)
    assert not _errors(lines), "\n".join(lines)
    # What remains is dicom3tools assigning an attribute to another information entity in the
    # Segmentation IOD than in the SR IOD (AccessionNumber, ReferencedStudySequence), not a conflict.
    assert all(line.startswith("Warning - Different information entities for attribute") for line in lines), lines


def test_the_checks_fail_on_a_broken_object(written, tmp_path):
    """The two checks above can fail: a SEG without a Type 1 attribute, and an SR of another
    patient in the same study."""
    seg, sr, _ = written
    ds = pydicom.dcmread(seg)
    del ds.SegmentSequence[0].SegmentLabel
    ds.save_as(tmp_path / "seg.dcm")
    assert any("SegmentLabel" in e for e in _errors(_run("dciodvfy", tmp_path / "seg.dcm")))
    ds = pydicom.dcmread(sr)
    ds.PatientID = "someone else"
    ds.save_as(tmp_path / "sr.dcm")
    assert any("Different PatientID" in e for e in _errors(_run("dcentvfy", seg, tmp_path / "sr.dcm")))
