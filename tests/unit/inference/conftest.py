"""Shared by the inference tests: a tiny untrained package for the module's ``TERMS`` (geometry and
plumbing do not depend on accuracy) and the offline text encoder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from volumed.inference.package import PromptSegConfig, build_model, save_package
from volumed.text.encoder import TextEncoder, default_model_dir, model_hash


def tiny_package(folder: Path, terms: Sequence[str]) -> Path:
    """STU-Net tiny, 6 mm model grid, 64 x 64 x 16 patch (total stride 32 x 32 x 8), untrained,
    seeded: a package folder that ``volumed segment`` loads in a fraction of a second."""
    torch.manual_seed(0)
    config = PromptSegConfig(
        encoder="stunet_tiny",
        encoder_kwargs={"strides": [[2, 2, 2], [2, 2, 2], [2, 2, 1], [2, 2, 1], [2, 2, 1]]},
        decoder_kwargs=dict(embed_dim=32, num_layers=1, num_heads=4, pixel_dim=8, num_memory_levels=2,
                            pixel_levels=[1, 2, 3, 4, 5]),
        text_model_hash=model_hash(default_model_dir()),
        preprocessing=dict(modality="CT", target_spacing=[6.0, 6.0, 6.0], margin=2),
        patch_size=(64, 64, 16),
        terms=list(terms),
        modalities=["CT"],
    )
    return save_package(build_model(config), config, folder / "model")


@pytest.fixture(scope="module")
def package(request, tmp_path_factory) -> Path:
    """:func:`tiny_package` for the test module's ``TERMS``."""
    return tiny_package(tmp_path_factory.mktemp("pkg"), request.module.TERMS)


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    return TextEncoder()
