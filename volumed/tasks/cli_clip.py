"""``volumed train clip``: train the CT-CLIP head (volume-report contrastive alignment) with LightningCLI.

Usage::

    volumed train clip --config configs/train_clip-cpu.yaml [--trainer.max_steps N] [--out runs/clip] \\
        [--package_dir DIR] [--data.datalist pairs.csv] [--num_threads 1]

``--data.datalist`` is an MSD JSON or CSV with ``image`` and ``report`` (:mod:`volumed.data.datalist`);
without it a phantom report cohort is trained on, and held-out phantoms validate. ``--out``
(default ``runs/clip``) receives the checkpoints and logs; the trained network is saved as a CLIP
package (clip.json, model.safetensors) in ``--package_dir`` (default ``<out>/package``), read by
``volumed classify --model``.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from volumed.tasks.clip import ClipDataModule, ClipModule
from volumed.tasks.promptseg import PackageExport
from volumed.tasks.run_cli import RunCLI, build_cli

__all__ = ["ClipCLI", "main"]

DEFAULT_OUT = "runs/clip"


class ClipCLI(RunCLI):
    """The shared run CLI plus ``--package_dir``; the model's input size and text model are the data's."""

    default_out = DEFAULT_OUT

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--package_dir", type=str | None, default=None, help="where the trained package goes (default <out>/package)")
        parser.link_arguments("data.input_size", "model.input_size")
        parser.link_arguments("data.text_model", "model.text_model")
        parser.link_arguments("data.max_report_words", "model.max_report_words")
        parser.link_arguments("data.negated", "model.negated")
        parser.link_arguments("seed_everything", "data.seed")


def main(argv: list[str] | None = None) -> None:
    """Train from command-line arguments (``None``: ``sys.argv[1:]``) and save the package."""
    args = list(sys.argv[1:] if argv is None else argv)
    cli = build_cli(ClipCLI, ClipModule, ClipDataModule, args, __doc__.split("\n\n")[0] if __doc__ else None)
    cfg = cli.config
    out = Path(cfg["out"])
    package_dir = Path(cfg["package_dir"]) if cfg["package_dir"] else out / "package"
    data = cfg["data"]
    training = {
        "command": "volumed train clip " + shlex.join(args),
        "config": [str(p) for p in (cfg.get("config") or [])],
        "seed": int(cfg["seed_everything"]) if cfg["seed_everything"] is not None else None,
        "data": data["datalist"] or f"phantom report cohort(n={data['phantom_cases']}, seed={data['phantom_seed']})",
        "max_steps": int(cfg["trainer"]["max_steps"]),
        "input_size": list(data["input_size"]),
        "batch_size": int(data["batch_size"]),
        "lr": float(cfg["model"]["lr"]),
    }
    cli.trainer.callbacks.append(PackageExport(package_dir, training))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cfg["ckpt_path"])
