"""`make demo` (the README's first command) runs the default MONAI bundle: on the embedded real CT
by default, on IMAGE= otherwise, and on the second real CT unless TCIA= is empty.

`make -n` prints the commands without running them; that the commands themselves work on the real
CT is tested in tests/unit/bundle (volumed run on the real DICOM series)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
BUNDLE = "bundles/volumed_promptseg_ct"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _demo_commands(*variables: str) -> list[str]:
    done = subprocess.run(["make", "-n", "-s", "demo", *variables], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if "volumed " in line and not line.startswith("echo")]


def test_demo_runs_the_default_bundle_on_the_embedded_ct_and_the_tcia_ct():
    commands = _demo_commands()
    runs = [c for c in commands if " run " in c]
    assert runs[0].endswith(f"volumed run {BUNDLE} ../shared/data/totalsegmentator_ct_sm/example_ct_dicom_with_uids "
                            "-o demo_out/segment --overwrite")
    assert runs[1].endswith(f"volumed -q run {BUNDLE} ../shared/data/tcia_ccth_a01/ct.nii.gz -o demo_out/segment_tcia --overwrite")
    assert len(runs) == 2
    assert not [c for c in commands if " segment " in c], "the demo goes through the bundle, not the package folder"
    assert (REPO / BUNDLE / "configs" / "inference.json").is_file()


def test_demo_takes_a_user_image_and_skips_the_tcia_ct():
    commands = _demo_commands("IMAGE=my_ct.nii.gz", "LABEL=", "TCIA=", "OUT=out")
    runs = [c for c in commands if " run " in c]
    assert runs == [f".venv/bin/volumed run {BUNDLE} my_ct.nii.gz -o out/segment --overwrite"]
    assert any(c.endswith("volumed preview my_ct.nii.gz  -o out/preview.png --overwrite") for c in commands)
