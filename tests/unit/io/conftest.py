"""Shared inputs of the DICOM SEG / SR tests (test_sr.py, test_dicom_conformance.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from volumed.inference.stats import compute_statistics
from volumed.io import read_label, read_volume
from volumed.io.sr import StructureFinding
from volumed.io.writer import SegmentSpec, write_dicom_seg


def _reference_seg_and_findings(ts_dir: Path, names: list[str], out_dir: Path, describe: bool = False):
    """The real 20-slice series, a label map of ``names`` from its reference segmentation,
    statistics.json-like entries (made-up probabilities: confidence 0.8 + 0.01 * value, absent
    structures bounded by 0.23), a SEG of the present structures (``describe``: a
    SegmentDescription on every segment, as ``volumed segment`` writes) and the SR findings.

    Returns ``(volume, entries, seg_path, findings)``."""
    vol = read_volume(ts_dir / "example_ct_dicom_with_uids")
    ref = read_label(ts_dir / "example_seg_dicom.nii.gz", vol)
    classes = {v: int(k) for k, v in json.loads((ts_dir / "totalsegmentator_class_map_all_tasks.json").read_text())["total"].items()}
    label = np.zeros(vol.shape, np.uint8)
    entries = {}
    for value, name in enumerate(names, start=1):
        mask = ref.data == classes[name]
        label[mask] = value
        present = bool(mask.any())
        entries[name] = {**compute_statistics(mask, vol, name).to_dict(), "value": value, "prompt": name.replace("_", " "),
                         "trained": True, "present": present, "confidence": 0.8 + 0.01 * value if present else None,
                         "max_probability": 0.99 if present else None, "max_probability_bound": None if present else 0.23}
    present = [n for n in names if entries[n]["present"]]
    specs = [SegmentSpec(entries[n]["value"], n, description=f"prompt '{entries[n]['prompt']}'" if describe else None)
             for n in present]
    seg_path = write_dicom_seg(label, vol, specs, out_dir / "segmentation.dcm")
    numbers = {n: k for k, n in enumerate(present, start=1)}
    findings = [StructureFinding.from_statistics(entries[n], segment_number=numbers.get(n),
                                                 segment_voxels=entries[n]["voxels"] if n in numbers else None)
                for n in names]
    return vol, entries, seg_path, findings


@pytest.fixture(scope="module")
def reference_seg_and_findings(ts_dir):
    """``make(names, out_dir, describe=False)``: see :func:`_reference_seg_and_findings`."""
    return lambda names, out_dir, describe=False: _reference_seg_and_findings(ts_dir, names, out_dir, describe)
