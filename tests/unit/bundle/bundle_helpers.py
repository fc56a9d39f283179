"""Paths and small helpers of the bundle tests (a module with its own name: several conftest.py
files share the module name "conftest", so tests do not import from one)."""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
BUNDLES = REPO / "bundles"
PROMPTSEG = BUNDLES / "volumed_promptseg_ct"


def all_bundles() -> list[Path]:
    """Every bundle folder under bundles/."""
    return sorted(p for p in BUNDLES.iterdir() if p.is_dir())


def default_prompts() -> list[str]:
    """The promptseg bundle's default prompt list (inference.json's displayable_configs#prompts)."""
    return json.loads((PROMPTSEG / "configs" / "inference.json").read_text())["displayable_configs"]["prompts"]

VOCO = BUNDLES / "volumed_voco_pretrain"
#: Bundles with no inference: they train an encoder, they predict nothing (no configs/inference.json).
TRAIN_ONLY = {"volumed_voco_pretrain"}
