"""Shared fixtures: the real data in ../shared/data (never copied into the repo) and phantoms."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from shared_helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VOLUMED_SHARED_DATA", REPO.parent / "shared" / "data"))

# Two cores: keep torch from oversubscribing them when several things run at once.
# OMP_NUM_THREADS, when set, wins (e.g. 1 while other jobs use the cores).
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


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


def tiny_package(folder: Path, terms: Sequence[str]) -> Path:
    """A :func:`tiny_config` network, untrained, seeded: a package folder that ``volumed segment``
    loads in a fraction of a second."""
    from volumed.inference.package import build_model, save_package

    torch.manual_seed(0)
    config = tiny_config(terms)
    return save_package(build_model(config), config, folder / "model")


@pytest.fixture(scope="session")
def make_tiny_package():
    """``make_tiny_package(folder, terms) -> folder/model``: :func:`tiny_package` (inference and bundle tests)."""
    return tiny_package


def tiny_promptseg_bundle(folder: Path) -> Path:
    """``folder/volumed_promptseg_ct``: bundles/volumed_promptseg_ct's LICENSE, configs and docs
    around a :func:`tiny_package` listing the bundle's default prompts as its terms (same bundle
    name, version and prompts, so the same output UIDs; segments in a second), with its
    large_files.yml recorded anew."""
    from volumed.bundle.integrity import record_hashes

    bundle = REPO / "bundles" / "volumed_promptseg_ct"
    root = folder / "volumed_promptseg_ct"
    root.mkdir()
    for name in ("LICENSE", "configs", "docs"):
        src = bundle / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    prompts = json.loads((bundle / "configs" / "inference.json").read_text())["displayable_configs"]["prompts"]
    shutil.move(str(tiny_package(folder / "pkg", prompts)), str(root / "models"))
    record_hashes(root)
    return root


@pytest.fixture
def tiny_bundle(tmp_path) -> Path:
    """:func:`tiny_promptseg_bundle` in the test's tmp_path (bundle, serve and PACS tests)."""
    return tiny_promptseg_bundle(tmp_path)


@pytest.fixture(scope="session")
def tokenizer_dir(shared_data) -> Path:
    """SmolLM2's tokenizer in ../shared/data (the report generator's tests)."""
    path = shared_data / "tokenizers" / "smollm2_135m_instruct"
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"SmolLM2 tokenizer not found at {path}")
    return path
