"""``volumed train report``: train the report generator (visual prefix -> causal LM) with LightningCLI.

Usage::

    volumed train report --config configs/train_report-cpu.yaml [--trainer.max_steps 300] \\
        [--out runs/report] [--ckpt_path last] [--num_threads 2]

Every recipe value can be overridden on the command line (``--model.lm_mode frozen``,
``--model.lm path/to/hf_model_dir``, ``--data.datalist reports.csv`` ...); ``--print_config``
shows the merged configuration. ``--out`` (default ``runs/report``) receives
``checkpoints/last.ckpt`` (trainable weights only: a frozen LM is reloaded from ``model.lm``) and
the logger's files, with ``val/ce_f1``, the clinical-efficacy F1 of the generated validation
reports, among the metrics.
"""

from __future__ import annotations

from volumed.tasks.report import ReportDataModule, ReportModule
from volumed.tasks.run_cli import RunCLI, build_cli

__all__ = ["ReportCLI", "main"]

DEFAULT_OUT = "runs/report"


class ReportCLI(RunCLI):
    """The shared run CLI (``--out``, ``--ckpt_path``, ``--num_threads``, ``--checkpoint.*``)."""

    default_out = DEFAULT_OUT

    def add_arguments_to_parser(self, parser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("seed_everything", "data.seed")


def main(argv: list[str] | None = None) -> None:
    """Train from command-line arguments (``None``: ``sys.argv[1:]``)."""
    cli = build_cli(ReportCLI, ReportModule, ReportDataModule, argv, __doc__.split("\n\n")[0] if __doc__ else None)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config["ckpt_path"])
