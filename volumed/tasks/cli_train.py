"""``volumed train promptseg``: partial-label training of the text-prompted segmenter (LightningCLI).

Usage::

    volumed train promptseg --config configs/train_promptseg-cpu.yaml [--trainer.max_steps 200] \\
        [--out runs/promptseg] [--package_dir DIR] [--ckpt_path last] [--num_threads 2]

Every recipe value can be overridden on the command line (``--model.lr 1e-3``,
``--data.patch_size [96,96,32]``, ``--model.encoder_weights runs/voco/encoder.pt`` ...);
``--print_config`` shows the merged configuration. ``--out`` (default ``runs/promptseg``) receives
``checkpoints/last.ckpt`` and the logger's files; the trained network is saved at the end as a
``volumed segment`` package (``config.json`` + ``model.safetensors``, see
:mod:`volumed.inference.package`) in ``--package_dir`` (default ``<out>/package``).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from volumed.tasks.promptseg import PackageExport, PromptSegDataModule, PromptSegModule
from volumed.tasks.run_cli import RunCLI, build_cli

__all__ = ["PromptSegCLI", "main"]

DEFAULT_OUT = "runs/promptseg"


class PromptSegCLI(RunCLI):
    """The shared run CLI plus ``--package_dir``; the package records the training patch and seed."""

    default_out = DEFAULT_OUT

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--package_dir", type=str | None, default=None, help="where the trained package goes (default <out>/package)")
        # The sliding-window ROI recorded in the package is the training patch.
        parser.link_arguments("data.patch_size", "model.patch_size")
        parser.link_arguments("seed_everything", "model.seed")
        parser.link_arguments("seed_everything", "data.seed")


def main(argv: list[str] | None = None) -> None:
    """Train from command-line arguments (``None``: ``sys.argv[1:]``) and save the package."""
    args = list(sys.argv[1:] if argv is None else argv)
    cli = build_cli(PromptSegCLI, PromptSegModule, PromptSegDataModule, args, __doc__.split("\n\n")[0] if __doc__ else None)
    cfg = cli.config
    out = Path(cfg["out"])
    package_dir = Path(cfg["package_dir"]) if cfg["package_dir"] else out / "package"
    config_files = [str(p) for p in (cfg.get("config") or [])]
    training = {
        "command": "volumed train promptseg " + shlex.join(args),
        "config": config_files,
        "seed": int(cfg["seed_everything"]) if cfg["seed_everything"] is not None else None,
        "data": cfg["data"]["datalist"] or f"phantoms(n={cfg['data']['phantom_cases']}, seed={cfg['data']['phantom_seed']})",
        "max_steps": int(cfg["trainer"]["max_steps"]),
        "patch_size": list(cfg["data"]["patch_size"]),
        "batch_size": int(cfg["data"]["batch_size"]),
        "lr": float(cfg["model"]["lr"]),
        "encoder_weights": cfg["model"]["encoder_weights"],
        "init_weights": cfg["model"]["init_weights"],
        "term_text": "canonical term name (free text as written)",
    }
    cli.trainer.callbacks.append(PackageExport(package_dir, training))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cfg["ckpt_path"])
