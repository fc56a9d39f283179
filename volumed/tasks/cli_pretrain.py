"""``volumed pretrain``: VoCo pretraining driven by LightningCLI and a YAML recipe.

Usage::

    volumed pretrain --config configs/pretrain_voco-cpu.yaml [--trainer.max_steps 500] \\
        [--out runs/voco] [--ckpt_path last | --ckpt_path path/to/file.ckpt] [--num_threads 2]

Everything in the recipe can be overridden on the command line (``--model.lr 3e-4``,
``--data.batch_size 4``, ``--trainer.precision bf16-mixed`` ...); ``--print_config`` shows the
merged configuration. ``--out`` (default ``runs/pretrain_voco``) receives:

* ``checkpoints/``: Lightning checkpoints, ``last.ckpt`` always (``--checkpoint.*`` configures
  :class:`~lightning.pytorch.callbacks.ModelCheckpoint`);
* ``encoder.pt``: the student encoder's weights at the end of the run, loadable with
  ``volumed.encoders.weights.load_encoder_weights`` into ``create_encoder(<model.encoder>)``;
* the logger's files (CSV, or TensorBoard when installed) with the merged ``config.yaml``, under
  ``lightning_logs/version_<n>/``.

``--ckpt_path last`` resumes from ``<out>/checkpoints/last.ckpt`` (model, teacher, optimiser,
scheduler, step counter) and starts from scratch, with a warning, when there is none yet.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from volumed.tasks.pretrain_voco import EncoderExport, VoCoDataModule, VoCoPretrainModule

__all__ = ["VoCoCLI", "main"]

DEFAULT_OUT = "runs/pretrain_voco"


def _checkpoint_dir(out: str | Path) -> str:
    return str(Path(out) / "checkpoints")


class VoCoCLI(LightningCLI):
    """LightningCLI with ``--out`` (run folder), ``--ckpt_path``, ``--num_threads`` and a ModelCheckpoint group."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--out", type=str, default=DEFAULT_OUT, help="run folder: checkpoints/, encoder.pt, config, logs")
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None, help="resume: 'last' (<out>/checkpoints/last.ckpt) or a .ckpt path"
        )
        parser.add_argument("--num_threads", type=int | None, default=None, help="torch CPU threads (default: torch's choice)")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # Keep last.ckpt always (what --ckpt_path last resumes from) and refresh it periodically,
        # so an interrupted run loses at most that many steps.
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 100, "checkpoint.save_top_k": 0})
        # One folder per run: the Trainer's root and the checkpoint folder follow --out.
        parser.link_arguments("out", "trainer.default_root_dir")
        parser.link_arguments("out", "checkpoint.dirpath", compute_fn=_checkpoint_dir)


def main(argv: list[str] | None = None) -> None:
    """Run VoCo pretraining from command-line arguments (``None``: ``sys.argv[1:]``)."""
    with warnings.catch_warnings():
        # `volumed pretrain ...` passes the arguments after its sub-command explicitly while
        # sys.argv still holds the whole command line; that is intended, not a mistake.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = VoCoCLI(
            VoCoPretrainModule,
            VoCoDataModule,
            run=False,
            args=argv,
            seed_everything_default=0,
            # The module brings its own AdamW + warm-up cosine schedule (configure_optimizers).
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": __doc__.split("\n\n")[0] if __doc__ else None},
        )
    if cli.config["num_threads"]:
        torch.set_num_threads(int(cli.config["num_threads"]))
    out = Path(cli.config["out"])
    cli.trainer.callbacks.append(EncoderExport(out / "encoder.pt"))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config["ckpt_path"])
