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

import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from volumed.tasks.promptseg import PackageExport, PromptSegDataModule, PromptSegModule

__all__ = ["PromptSegCLI", "main"]

DEFAULT_OUT = "runs/promptseg"


def _checkpoint_dir(out: str | Path) -> str:
    return str(Path(out) / "checkpoints")


class PromptSegCLI(LightningCLI):
    """LightningCLI with ``--out``, ``--package_dir``, ``--ckpt_path``, ``--num_threads`` and a
    ModelCheckpoint group."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--out", type=str, default=DEFAULT_OUT, help="run folder: checkpoints/, logs, package/")
        parser.add_argument("--package_dir", type=str | None, default=None, help="where the trained package goes (default <out>/package)")
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None, help="resume: 'last' (<out>/checkpoints/last.ckpt) or a .ckpt path"
        )
        parser.add_argument("--num_threads", type=int | None, default=None, help="torch CPU threads (default: torch's choice)")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 100, "checkpoint.save_top_k": 0})
        parser.link_arguments("out", "trainer.default_root_dir")
        parser.link_arguments("out", "checkpoint.dirpath", compute_fn=_checkpoint_dir)
        # The sliding-window ROI recorded in the package is the training patch.
        parser.link_arguments("data.patch_size", "model.patch_size")
        parser.link_arguments("seed_everything", "model.seed")
        parser.link_arguments("seed_everything", "data.seed")


def main(argv: list[str] | None = None) -> None:
    """Train from command-line arguments (``None``: ``sys.argv[1:]``) and save the package."""
    args = list(sys.argv[1:] if argv is None else argv)
    cli = PromptSegCLI(
        PromptSegModule,
        PromptSegDataModule,
        run=False,
        args=args,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": __doc__.split("\n\n")[0] if __doc__ else None},
    )
    cfg = cli.config
    if cfg["num_threads"]:
        torch.set_num_threads(int(cfg["num_threads"]))
    out = Path(cfg["out"])
    package_dir = Path(cfg["package_dir"]) if cfg["package_dir"] else out / "package"
    config_files = [str(p) for p in (cfg.get("config") or [])]
    training = {
        "command": "volumed train promptseg " + " ".join(args),
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
