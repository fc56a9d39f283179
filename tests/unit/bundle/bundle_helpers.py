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

GROUND = BUNDLES / "volumed_ground_ct"


def default_findings() -> list[str]:
    """The grounding bundle's default finding sentences (inference.json's displayable_configs#findings)."""
    return json.loads((GROUND / "configs" / "inference.json").read_text())["displayable_configs"]["findings"]


def tiny_ground_bundle(folder: Path) -> Path:
    """``folder/volumed_ground_ct``: bundles/volumed_ground_ct's LICENSE, configs and docs around an
    untrained tiny grounding package (STU-Net tiny on a 6 mm grid, 64 x 64 x 16 window; grounds in
    a second), with its large_files.yml recorded anew."""
    import shutil

    import torch
    from shared_helpers import tiny_config

    from volumed.bundle.integrity import record_hashes
    from volumed.heads.grounding import GroundingConfig, build_grounding_model, save_grounding_package

    root = folder / "volumed_ground_ct"
    root.mkdir()
    for name in ("LICENSE", "configs", "docs"):
        src = GROUND / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    torch.manual_seed(0)
    config = tiny_config(["liver", "lung_lower_lobe_right"])
    save_grounding_package(build_grounding_model(config), config, GroundingConfig(training={"max_steps": 2}),
                           root / "models")
    record_hashes(root)
    return root

CLIP = BUNDLES / "volumed_clip_ct"


def clip_default_findings() -> list[str]:
    """The CLIP bundle's default abnormalities (inference.json's displayable_configs#findings)."""
    return json.loads((CLIP / "configs" / "inference.json").read_text())["displayable_configs"]["findings"]


def tiny_clip_bundle(folder: Path) -> Path:
    """``folder/volumed_clip_ct``: bundles/volumed_clip_ct's LICENSE, configs and docs around an
    untrained CLIP package of the real one's architecture and preprocessing (it is small: 0.7 MB),
    with its large_files.yml recorded anew."""
    import shutil

    import torch

    from volumed.bundle.integrity import record_hashes
    from volumed.heads.clip import build_clip_model, read_clip_config, save_clip_package

    root = folder / "volumed_clip_ct"
    root.mkdir()
    for name in ("LICENSE", "configs", "docs"):
        src = CLIP / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    torch.manual_seed(0)
    config = read_clip_config(CLIP / "models")
    save_clip_package(build_clip_model(config), config, root / "models")
    record_hashes(root)
    return root
