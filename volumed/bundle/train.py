"""The ``train#trainer`` of a promptseg bundle's ``configs/train.json``: Lightning, driven by MONAI's
``ConfigWorkflow``.

volumed trains with Lightning (``volumed.tasks.promptseg``: the Trainer owns devices, precision,
checkpoints); MONAI's ``SupervisedTrainer`` would need pytorch-ignite and a second training loop.
So the bundle's trainer is this small object with MONAI's ``max_epochs`` property and a ``run()``,
which fits :class:`~volumed.tasks.promptseg.PromptSegModule` on
:class:`~volumed.tasks.promptseg.PromptSegDataModule` and writes a package (config.json +
model.safetensors) that ``volumed bundle new --from-checkpoint`` turns into a bundle.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["PromptSegBundleTrainer"]

log = logging.getLogger(__name__)


class PromptSegBundleTrainer:
    """Fit ``module`` on ``datamodule`` with Lightning; ``run()`` returns the package folder.

    Args:
        module: a :class:`~volumed.tasks.promptseg.PromptSegModule`.
        datamodule: a :class:`~volumed.tasks.promptseg.PromptSegDataModule` (a datalist, or phantoms).
        max_epochs: epochs of ``datamodule.samples_per_epoch`` patches.
        output_dir: Lightning's root folder (checkpoints), and ``package/`` unless ``package_dir``.
        device: ``cpu`` or a CUDA device (Lightning's accelerator is chosen from it).
        max_steps: optional cap on optimiser steps (-1: none).
        seed: ``lightning.seed_everything``.
        package_dir: where the trained package goes (default ``output_dir/package``).
        training: what to record in the package's ``config.training`` (recipe, data).
        checkpoint_every_n_steps: Lightning checkpoints (``last.ckpt`` always kept).
    """

    def __init__(
        self,
        module,
        datamodule,
        max_epochs: int = 1,
        output_dir: str | Path = "train_out",
        device: str | torch.device = "cpu",
        max_steps: int = -1,
        seed: int = 0,
        package_dir: str | Path | None = None,
        training: Mapping[str, Any] | None = None,
        checkpoint_every_n_steps: int | None = None,
    ) -> None:
        self.module = module
        self.datamodule = datamodule
        self.max_epochs = int(max_epochs)
        self.max_steps = int(max_steps)
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        self.seed = int(seed)
        self.package_dir = Path(package_dir) if package_dir is not None else self.output_dir / "package"
        self.training = dict(training or {})
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.trainer = None

    def run(self) -> Path:
        import lightning as L
        from lightning.pytorch.callbacks import ModelCheckpoint

        from volumed.tasks.promptseg import PackageExport

        L.seed_everything(self.seed, workers=True)
        accelerator = "gpu" if self.device.type == "cuda" else "cpu"
        devices = [self.device.index or 0] if accelerator == "gpu" else 1
        checkpoints = ModelCheckpoint(dirpath=self.output_dir / "checkpoints", save_last=True,
                                      every_n_train_steps=self.checkpoint_every_n_steps)
        record = {**self.training, "max_epochs": self.max_epochs, "seed": self.seed, "runner": "configs/train.json"}
        self.trainer = L.Trainer(
            max_epochs=self.max_epochs, max_steps=self.max_steps, accelerator=accelerator, devices=devices,
            logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            default_root_dir=str(self.output_dir), callbacks=[checkpoints, PackageExport(self.package_dir, record)],
        )
        self.trainer.fit(self.module, datamodule=self.datamodule)
        log.info("trained package: %s", self.package_dir)
        print(f"wrote {self.package_dir} ({self.trainer.global_step} steps); make it a bundle with: "
              f"volumed bundle new --from-checkpoint {self.package_dir} --task promptseg NAME")
        return self.package_dir
