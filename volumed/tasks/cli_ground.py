"""``volumed train ground``: train the grounding head (finding sentences -> masks) with LightningCLI.

Usage::

    volumed train ground --data.phantoms 20 --trainer.max_steps 300 [--out runs/ground] \\
        [--package_dir DIR] [--data.datalist findings.json] [--model.init_weights PATH] [--num_threads 2]

``--data.datalist`` is a finding-level datalist (:mod:`volumed.data.grounding_datalist`); without
it, ``--data.phantoms N`` phantom cases with generated finding sentences are written and read
back through the same reader. ``--out`` (default ``runs/ground``) receives the checkpoints and
logs; the trained network is saved as a grounding package (config.json, grounding.json,
model.safetensors) in ``--package_dir`` (default ``<out>/package``), read by ``volumed ground --model``.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from volumed.tasks.ground import GroundingDataModule, GroundingModule
from volumed.tasks.promptseg import PackageExport
from volumed.tasks.run_cli import RunCLI, build_cli

__all__ = ["GroundingCLI", "main"]

DEFAULT_OUT = "runs/ground"


class GroundingCLI(RunCLI):
    """The shared run CLI plus ``--package_dir``; the package's sliding-window ROI is the training patch."""

    default_out = DEFAULT_OUT

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--package_dir", type=str | None, default=None, help="where the trained package goes (default <out>/package)")
        parser.link_arguments("data.patch_size", "model.patch_size")
        parser.link_arguments("data.text_model", "model.text_model")
        parser.link_arguments("seed_everything", "data.seed")


def main(argv: list[str] | None = None) -> None:
    """Train from command-line arguments (``None``: ``sys.argv[1:]``) and save the package."""
    args = list(sys.argv[1:] if argv is None else argv)
    cli = build_cli(GroundingCLI, GroundingModule, GroundingDataModule, args, __doc__.split("\n\n")[0] if __doc__ else None)
    cfg = cli.config
    out = Path(cfg["out"])
    package_dir = Path(cfg["package_dir"]) if cfg["package_dir"] else out / "package"
    data = cfg["data"]
    training = {
        "command": "volumed train ground " + shlex.join(args),
        "config": [str(p) for p in (cfg.get("config") or [])],
        "seed": int(cfg["seed_everything"]) if cfg["seed_everything"] is not None else None,
        "data": data["datalist"] or f"phantoms(n={data['phantoms']}, seed={data['phantom_seed']})",
        "max_steps": int(cfg["trainer"]["max_steps"]),
        "patch_size": list(data["patch_size"]),
        "batch_size": int(data["batch_size"]),
        "lr": float(cfg["model"]["lr"]),
        "init_weights": cfg["model"]["init_weights"],
    }
    cli.trainer.callbacks.append(PackageExport(package_dir, training))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cfg["ckpt_path"])
