"""Shared fixtures: the real data in ../shared/data (never copied into the repo) and phantoms."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VOLUMED_SHARED_DATA", REPO.parent / "shared" / "data"))

# Two cores: keep torch from oversubscribing them when several things run at once.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set VOLUMED_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the shared real data (../shared/data next to the checkout)."""
    return _need(SHARED_DATA)


@pytest.fixture(scope="session")
def ts_dir(shared_data) -> Path:
    """TotalSegmentator example data: CTs, DICOM series, reference segmentations."""
    return _need(shared_data / "totalsegmentator_ct_sm")
