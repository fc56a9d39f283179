"""The LightningCLI base of every ``volumed`` training command (``pretrain``, ``train <task>``).

One run folder per run: ``--out`` is the Trainer's root and holds ``checkpoints/`` (``last.ckpt``
always kept and refreshed, so an interrupted run loses at most ``every_n_train_steps`` steps);
``--ckpt_path last`` resumes from it; ``--num_threads`` sets torch's CPU threads.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from volumed.errors import ConfigError


def checkpoint_dir(out: str | Path) -> str:
    return str(Path(out) / "checkpoints")


class RunCLI(LightningCLI):
    """LightningCLI with ``--out``, ``--ckpt_path``, ``--num_threads`` and a ModelCheckpoint group.

    Subclasses set ``default_out`` and may add arguments after calling ``super()``.
    """

    default_out = "runs/run"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--out", type=str, default=self.default_out, help="run folder: checkpoints/, logs, outputs")
        parser.add_argument(
            "--ckpt_path", type=str | None, default=None, help="resume: 'last' (<out>/checkpoints/last.ckpt) or a .ckpt path"
        )
        parser.add_argument("--num_threads", type=int | None, default=None, help="torch CPU threads (default: torch's choice)")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 100, "checkpoint.save_top_k": 0})
        parser.link_arguments("out", "trainer.default_root_dir")
        parser.link_arguments("out", "checkpoint.dirpath", compute_fn=checkpoint_dir)

    def instantiate_trainer(self, **kwargs):
        """Unless ``--trainer.logger`` says otherwise: CSV logs in ``<out>/lightning_logs/version_N``
        (``metrics.csv``, with LightningCLI's ``config.yaml``) and TensorBoard logs in
        ``<out>/tensorboard``. (Lightning's own default is one or the other, depending on whether a
        TensorBoard writer happens to be installed.)"""
        from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

        trainer_config = self._get(self.config_init, "trainer", default={}) or {}
        if "logger" not in kwargs and trainer_config.get("logger") in (None, True):
            out = self._get(self.config_init, "out")
            kwargs["logger"] = [CSVLogger(out, name="lightning_logs"), TensorBoardLogger(out, name="tensorboard")]
        return super().instantiate_trainer(**kwargs)


class RecordEnvironment(Callback):
    """Writes ``<out>/environment.json`` when fitting starts: the command line, seed, precision,
    the ``deterministic`` flag and the software versions (:func:`volumed.environment.software_versions`),
    next to the checkpoints and LightningCLI's ``config.yaml``."""

    def __init__(self, out: str | Path, argv: list[str] | None, seed: int | None) -> None:
        self.out = Path(out)
        self.argv = list(argv or [])
        self.seed = seed

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        from volumed.environment import software_versions
        from volumed.io.atomic import atomic_write_text

        record = {
            "argv": self.argv,
            "seed": self.seed,
            "precision": str(trainer.precision),
            "deterministic": bool(torch.are_deterministic_algorithms_enabled()),
            "devices": int(trainer.num_devices),
            "num_nodes": int(trainer.num_nodes),
            "strategy": type(trainer.strategy).__name__,
            "software": software_versions(),
        }
        atomic_write_text(self.out / "environment.json", json.dumps(record, indent=2) + "\n", overwrite=True)


def build_cli(cli_class: type[RunCLI], model_class, datamodule_class, argv: list[str] | None, description: str | None) -> RunCLI:
    """Parse ``argv`` into ``cli_class`` (not run yet) and apply ``--num_threads``."""
    with warnings.catch_warnings():
        # `volumed <command> ...` passes the arguments after its sub-command explicitly while
        # sys.argv still holds the whole command line; that is intended, not a mistake.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        cli = cli_class(
            model_class,
            datamodule_class,
            run=False,
            args=argv,
            seed_everything_default=0,
            # The modules bring their own optimiser and schedule (configure_optimizers).
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"description": description},
        )
    ckpt_path = cli.config.get("ckpt_path")
    if ckpt_path and ckpt_path not in ("last", "best", "hpc", "registry") and "://" not in ckpt_path \
            and not Path(ckpt_path).is_file():
        # Before any data is loaded: Lightning would only fail at fit, with a traceback.
        raise ConfigError("checkpoint to resume from does not exist (--ckpt_path: 'last' or a .ckpt file)", ckpt_path)
    if cli.config["num_threads"]:
        torch.set_num_threads(int(cli.config["num_threads"]))
    cli.trainer.callbacks.append(RecordEnvironment(cli.config["out"], argv, cli.config.get("seed_everything")))
    return cli
