"""The committed default segmenter on the real CTs, end to end through ``volumed segment``: honest
absence on the abdominal DICOM slab, found structures with their confidence, outputs on the
input grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from volumed.cli import main

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "volumed_promptseg_ct" / "models"
LOBES = ("lung_upper_lobe_left", "lung_lower_lobe_left", "lung_upper_lobe_right", "lung_middle_lobe_right",
         "lung_lower_lobe_right")  # fmt: skip

pytestmark = pytest.mark.skipif(not (BUNDLE / "model.safetensors").is_file(), reason="no trained default package")


@pytest.fixture(scope="module")
def dicom_all(ts_dir, tmp_path_factory) -> dict:
    """``volumed segment --all`` on the 20-slice abdominal DICOM series (4 cm: liver, spleen,
    stomach, T11-T12; no lung, no heart): its statistics.json."""
    out = tmp_path_factory.mktemp("dicom_all") / "seg"
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", str(ts_dir / "example_ct_dicom_with_uids"), "--all", "-o", str(out), "--no-progress"])
    assert exit_info.value.code in (0, None)
    return json.loads((out / "statistics.json").read_text())


def test_structures_outside_the_abdominal_slab_are_reported_absent(dicom_all):
    terms = dicom_all["terms"]
    for name in (*LOBES, "heart", "pulmonary artery"):
        assert name in terms, name  # --all asked for it
        assert terms[name]["present"] is False, (name, terms[name])
        assert terms[name]["volume_ml"] == 0.0


def test_structures_in_the_slab_are_found_with_confidence(dicom_all):
    terms = dicom_all["terms"]
    for name in ("liver", "spleen", "stomach", "aorta"):
        assert terms[name]["present"] is True, (name, terms[name])
        assert terms[name]["confidence"] > 0.6, (name, terms[name]["confidence"])
    # The reference (TotalSegmentator) volumes: liver 699 mL, spleen 249 mL.
    assert 600 < terms["liver"]["volume_ml"] < 800 and 200 < terms["spleen"]["volume_ml"] < 300
