"""``volumed train multiclass``: plain multi-class STU-Net segmentation (LightningCLI).

Usage::

    volumed train multiclass --data.data '[{"image": "ct.nii.gz", "label": "seg.nii.gz"}]' \\
        --data.classes '[liver, spleen]' --model.network stunet_s [--trainer.max_steps 1000] \\
        [--trainer.devices 2 --trainer.strategy ddp] [--trainer.precision bf16-mixed] [--out runs/multiclass]

The same module and data as the STU-Net bundles' ``configs/train.json``
(:mod:`volumed.tasks.multiclass_seg`), with Lightning's whole command line: ``--trainer.devices``,
``--trainer.num_nodes``, ``--trainer.strategy ddp|fsdp`` and ``--trainer.precision``. The number
of output channels follows ``--data.classes`` (plus background). The trained network's weights go
to ``<out>/model.safetensors`` (what a bundle's ``models/`` holds), from rank zero.
"""

from __future__ import annotations

import sys
from pathlib import Path

from volumed.tasks.multiclass_seg import MultiClassSegDataModule, MultiClassSegModule, NetworkExport
from volumed.tasks.run_cli import RunCLI, build_cli

__all__ = ["MultiClassCLI", "main"]


def _num_classes(classes) -> int:
    return len(list(classes)) + 1


class MultiClassCLI(RunCLI):
    """The shared run CLI; ``model.num_classes`` is linked to ``data.classes``."""

    default_out = "runs/multiclass"

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.classes", "model.num_classes", compute_fn=_num_classes)
        parser.link_arguments("seed_everything", "data.seed")


def main(argv: list[str] | None = None) -> None:
    """Train from command-line arguments (``None``: ``sys.argv[1:]``) and write the weights."""
    args = list(sys.argv[1:] if argv is None else argv)
    cli = build_cli(MultiClassCLI, MultiClassSegModule, MultiClassSegDataModule, args, __doc__.split("\n\n")[0] if __doc__ else None)
    cli.trainer.callbacks.append(NetworkExport(Path(cli.config["out"]) / "model.safetensors"))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config["ckpt_path"])
