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

from pathlib import Path

from volumed.tasks.pretrain_voco import EncoderExport, VoCoDataModule, VoCoPretrainModule
from volumed.tasks.run_cli import RunCLI, build_cli

__all__ = ["VoCoCLI", "main"]

DEFAULT_OUT = "runs/pretrain_voco"


class VoCoCLI(RunCLI):
    """The shared run CLI (``--out``, ``--ckpt_path``, ``--num_threads``, ``--checkpoint.*``) for VoCo."""

    default_out = DEFAULT_OUT


def main(argv: list[str] | None = None) -> None:
    """Run VoCo pretraining from command-line arguments (``None``: ``sys.argv[1:]``)."""
    cli = build_cli(VoCoCLI, VoCoPretrainModule, VoCoDataModule, argv, __doc__.split("\n\n")[0] if __doc__ else None)
    out = Path(cli.config["out"])
    cli.trainer.callbacks.append(EncoderExport(out / "encoder.pt"))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config["ckpt_path"])
