"""Helpers shared by test modules in several folders (tests/ is on sys.path through its conftest):
``from shared_helpers import run_cli, tiny_config``."""

from __future__ import annotations

from collections.abc import Sequence


def tiny_config(terms: Sequence[str]):
    """The :class:`PromptSegConfig` of a tiny test network: STU-Net tiny, 6 mm model grid,
    64 x 64 x 16 patch (total stride 32 x 32 x 8), for ``terms``."""
    from volumed.inference.package import PromptSegConfig
    from volumed.text.encoder import default_model_dir, model_hash

    return PromptSegConfig(
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


def run_cli(args: Sequence[str], capsys) -> tuple[int, str, str]:
    """``volumed ARGS`` through :func:`volumed.cli.main`: ``(exit code, stdout, stderr)``."""
    from volumed.cli import main

    try:
        main(list(args))
        code = 0
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err
