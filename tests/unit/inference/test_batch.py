"""Batch inference: ``volumed segment --datalist``: bad cases are skipped and listed, outputs equal
single-case runs, and a run killed with SIGKILL and restarted does every case exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volumed.data.phantoms import make_cohort
from volumed.errors import ConfigError
from volumed.inference.batch import SUMMARY_NAME, batch_cases, run_batch
from volumed.inference.segment import segment
from volumed.io.writer import write_nifti

VOLUMED = Path(sys.executable).parent / "volumed"
TERMS = ["liver", "spleen"]  # of the tiny package (the package fixture)
FILES = ["labels.json", "labels.nii.gz", "masks", "preview.png", "report.txt", "statistics.json"]


def _cohort(root: Path, n: int) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for case in make_cohort(n, 0, shape=(64, 64, 40), spacing=(4.0, 4.0, 4.0)):
        paths.append(write_nifti(case.image, root / f"{case.case_id}.nii.gz"))
    return paths


def _bad_files(root: Path) -> dict[str, Path]:
    """The three bad inputs of issue 21 item 7 that are files, plus a missing one."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr["dim"][0], hdr["dim"][1:4] = 3, (30000, 30000, 30000)
    (root / "huge.nii").write_bytes(hdr.binaryblock + b"\x00" * 68)
    img = nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), None)
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    nib.save(img, str(root / "no_spacing.nii"))
    raw = bytearray((root / "no_spacing.nii").read_bytes())
    raw[80:92] = np.zeros(3, np.float32).tobytes()  # pixdim[1:4] = 0 as stored
    (root / "no_spacing.nii").write_bytes(bytes(raw))
    (root / "broken.nii.gz").write_bytes(b"not a nifti")
    return {"huge": root / "huge.nii", "no_spacing": root / "no_spacing.nii", "broken": root / "broken.nii.gz",
            "missing": root / "missing.nii.gz"}  # fmt: skip


def _datalist(path: Path, images: list[Path]) -> Path:
    path.write_text(json.dumps({"testing": [{"image": str(p)} for p in images]}))
    return path


def test_bad_cases_are_listed_and_skipped_and_outputs_equal_single_runs(package, tmp_path):
    good = _cohort(tmp_path / "in", 2)
    bad = _bad_files(tmp_path / "in")
    datalist = _datalist(tmp_path / "list.json", [*good, *bad.values()])
    out = tmp_path / "out"
    summary = run_batch(datalist, out, ["liver", "spleen"], model_dir=package, progress=False)
    assert sorted(summary.done) == [p.name[:-7] for p in good] and summary.skipped == []
    assert set(summary.failed) == set(bad)
    assert "claims 30000 x 30000 x 30000 voxels" in summary.failed["huge"]
    assert "voxel size is unknown" in summary.failed["no_spacing"]
    assert "not a readable NIfTI" in summary.failed["broken"] and "no such file" in summary.failed["missing"]
    saved = json.loads((out / SUMMARY_NAME).read_text())
    assert saved["failed"] == summary.failed and sorted(saved["done"]) == sorted(summary.done)
    assert sorted(p.name for p in out.iterdir()) == sorted([SUMMARY_NAME, *summary.done])
    # Each case's outputs are those of volumed segment on that image alone.
    single = segment(good[0], ["liver", "spleen"], model_dir=package, out_dir=tmp_path / "single", progress=False)
    batch_dir = out / good[0].name[:-7]
    assert sorted(p.name for p in batch_dir.iterdir()) == FILES
    for name in ("liver.nii.gz", "spleen.nii.gz"):
        a = nib.load(str(batch_dir / "masks" / name))
        b = nib.load(str(single.out_dir / "masks" / name))
        assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)) and np.allclose(a.affine, b.affine)
    # A re-run skips the complete cases and tries the failed ones again.
    again = run_batch(datalist, out, ["liver", "spleen"], model_dir=package, progress=False)
    assert sorted(again.skipped) == sorted(summary.done) and again.done == [] and set(again.failed) == set(bad)


def test_datalist_problems_are_refused_up_front(tmp_path):
    a, b = tmp_path / "x" / "ct.nii.gz", tmp_path / "y" / "ct.nii.gz"
    dup = _datalist(tmp_path / "dup.json", [a, b])
    with pytest.raises(ConfigError, match="entries 0 and 1 have the same case id 'ct'; give each an 'id'"):
        batch_cases(dup)
    (tmp_path / "ids.json").write_text(json.dumps({"training": [{"image": str(a), "id": "a"}, {"image": str(b), "id": "b"}]}))
    assert [c.case_id for c in batch_cases(tmp_path / "ids.json")] == ["a", "b"]
    with pytest.raises(ConfigError, match="at least one anatomy prompt"):
        run_batch(dup, tmp_path / "out", [])


def test_a_run_killed_with_sigkill_and_restarted_does_every_case_exactly_once(package, tmp_path):
    images = _cohort(tmp_path / "in", 6)
    datalist = _datalist(tmp_path / "list.json", images)
    out = tmp_path / "out"
    cmd = [str(VOLUMED), "segment", "--datalist", str(datalist), "-o", str(out), "-p", "liver", "-p", "spleen",
           "--model", str(package), "--devices", "2", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if out.is_dir() and any(not p.name.startswith(".") and p.is_dir() for p in out.iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the parent and both workers, mid-case
    proc.wait()
    first = {p.name: (p / "statistics.json").stat().st_mtime_ns for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert 1 <= len(first) < 6
    for name in first:  # whatever exists under a case's name is complete
        assert sorted(q.name for q in (out / name).iterdir()) == FILES

    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / SUMMARY_NAME).read_text())
    ids = sorted(p.name[:-7] for p in images)
    assert sorted(summary["skipped"]) == sorted(first) and sorted(summary["done"] + summary["skipped"]) == ids
    assert summary["failed"] == {}
    assert sorted(p.name for p in out.iterdir()) == sorted([SUMMARY_NAME, *ids])  # no partial folder left
    for name, mtime in first.items():  # finished before the kill: not redone
        assert (out / name / "statistics.json").stat().st_mtime_ns == mtime
    for name in ids:
        assert sorted(q.name for q in (out / name).iterdir()) == FILES
        assert set(json.loads((out / name / "statistics.json").read_text())["terms"]) == {"liver", "spleen"}
