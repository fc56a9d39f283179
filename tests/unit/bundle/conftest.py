"""Bundle tests: the real bundles under bundles/, and a tiny bundle (the real bundle's configs, LICENSE
and docs around a tiny untrained package for the same terms) that runs in a second."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from bundle_helpers import PROMPTSEG, default_prompts


@pytest.fixture
def tiny_bundle(tmp_path, make_tiny_package) -> Path:
    """A copy of bundles/volumed_promptseg_ct whose models/ holds a tiny package (6 mm grid, 64 x 64
    x 16 windows) trained on nothing but listing the bundle's default prompts as its terms; its
    large_files.yml is recorded anew."""
    from volumed.bundle.integrity import record_hashes

    root = tmp_path / "volumed_promptseg_ct"
    root.mkdir()
    for name in ("LICENSE", "configs", "docs"):
        src = PROMPTSEG / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    shutil.move(str(make_tiny_package(tmp_path / "pkg", default_prompts())), str(root / "models"))
    record_hashes(root)
    return root
