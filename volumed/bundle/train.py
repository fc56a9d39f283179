"""The ``train#trainer`` of a bundle's ``configs/train.json``: Lightning, driven by MONAI's
``ConfigWorkflow``.

volumed trains with Lightning (the Trainer owns devices, precision, checkpoints); MONAI's
``SupervisedTrainer`` would need pytorch-ignite and a second training loop. So a bundle's trainer
is a small object with MONAI's ``max_epochs`` property and a ``run()`` that fits the config's
LightningModule (``train#module``) on its DataModule (``train#dataset``):

* :class:`LightningBundleTrainer`: fit, checkpoints under ``output_dir/checkpoints`` (``last.ckpt``
  always), plus the ``callbacks`` the config gives (what to write at the end: an encoder, weights);
* :class:`PromptSegBundleTrainer`: the same, writing a promptseg package (config.json +
  model.safetensors) that ``volumed bundle new --from-checkpoint`` turns into a bundle;
* :class:`GroundingBundleTrainer`: the same for the grounding head (a grounding package:
  config.json + grounding.json + model.safetensors; ``--task ground``);
* :class:`ClipBundleTrainer`: the same for the CT-CLIP head (a CLIP package: clip.json +
  model.safetensors; ``--task clip``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["LightningBundleTrainer", "PromptSegBundleTrainer", "GroundingBundleTrainer", "ClipBundleTrainer"]

log = logging.getLogger(__name__)


class LightningBundleTrainer:
    """Fit ``module`` on ``datamodule`` with Lightning; ``run()`` returns ``output_dir``.

    Args:
        module: a LightningModule (``train#module``).
        datamodule: a LightningDataModule (``train#dataset``).
        max_epochs: epochs (MONAI's ``max_epochs`` property).
        output_dir: Lightning's root folder (``checkpoints/``) and where the callbacks write.
        device: ``cpu`` or a CUDA device (Lightning's accelerator is chosen from it).
        max_steps: optional cap on optimiser steps (-1: none).
        seed: ``lightning.seed_everything``.
        callbacks: extra Lightning callbacks (e.g. ``EncoderExport``: what the run leaves behind).
        checkpoint_every_n_steps: Lightning checkpoints (``last.ckpt`` always kept).
        limit_val_batches: Lightning's, to keep validation short (1.0: all).
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
        callbacks: Sequence[Any] | None = None,
        checkpoint_every_n_steps: int | None = None,
        limit_val_batches: int | float = 1.0,
    ) -> None:
        self.module = module
        self.datamodule = datamodule
        self.max_epochs = int(max_epochs)
        self.max_steps = int(max_steps)
        self.output_dir = Path(output_dir)
        self.device = torch.device(device)
        self.seed = int(seed)
        self.callbacks = list(callbacks or [])
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.limit_val_batches = limit_val_batches
        self.trainer = None

    def _callbacks(self) -> list:
        """What the run writes besides checkpoints (subclasses add theirs)."""
        return list(self.callbacks)

    def _result(self) -> Path:
        return self.output_dir

    def run(self) -> Path:
        import lightning as L
        from lightning.pytorch.callbacks import ModelCheckpoint

        L.seed_everything(self.seed, workers=True)
        accelerator = "gpu" if self.device.type == "cuda" else "cpu"
        devices = [self.device.index or 0] if accelerator == "gpu" else 1
        checkpoints = ModelCheckpoint(dirpath=self.output_dir / "checkpoints", save_last=True,
                                      every_n_train_steps=self.checkpoint_every_n_steps)
        self.trainer = L.Trainer(
            max_epochs=self.max_epochs, max_steps=self.max_steps, accelerator=accelerator, devices=devices,
            logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            limit_val_batches=self.limit_val_batches, default_root_dir=str(self.output_dir),
            callbacks=[checkpoints, *self._callbacks()],
        )
        self.trainer.fit(self.module, datamodule=self.datamodule)
        result = self._result()
        log.info("trained: %s (%d steps)", result, self.trainer.global_step)
        return result


class PromptSegBundleTrainer(LightningBundleTrainer):
    """Fit a :class:`~volumed.tasks.promptseg.PromptSegModule` on a
    :class:`~volumed.tasks.promptseg.PromptSegDataModule`; ``run()`` returns the package folder.

    Args (besides :class:`LightningBundleTrainer`'s):
        package_dir: where the trained package goes (default ``output_dir/package``).
        training: what to record in the package's ``config.training`` (recipe, data).
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
        super().__init__(module, datamodule, max_epochs=max_epochs, output_dir=output_dir, device=device,
                         max_steps=max_steps, seed=seed, checkpoint_every_n_steps=checkpoint_every_n_steps)
        self.package_dir = Path(package_dir) if package_dir is not None else self.output_dir / "package"
        self.training = dict(training or {})

    def _callbacks(self) -> list:
        from volumed.tasks.promptseg import PackageExport

        record = {**self.training, "max_epochs": self.max_epochs, "seed": self.seed, "runner": "configs/train.json"}
        return [*super()._callbacks(), PackageExport(self.package_dir, record)]

    task = "promptseg"  # the ``volumed bundle new --task`` of the package this trainer writes

    def _result(self) -> Path:
        print(f"wrote {self.package_dir} ({self.trainer.global_step} steps); make it a bundle with: "
              f"volumed bundle new --from-checkpoint {self.package_dir} --task {self.task} NAME")
        return self.package_dir


class GroundingBundleTrainer(PromptSegBundleTrainer):
    """Fit a :class:`~volumed.tasks.ground.GroundingModule` on a
    :class:`~volumed.tasks.ground.GroundingDataModule`; ``run()`` returns the grounding package
    folder (its ``export_package`` writes config.json, grounding.json and model.safetensors, with
    ``training`` recorded in grounding.json)."""

    task = "ground"


class ClipBundleTrainer(PromptSegBundleTrainer):
    """Fit a :class:`~volumed.tasks.clip.ClipModule` on a :class:`~volumed.tasks.clip.ClipDataModule`;
    ``run()`` returns the CLIP package folder (clip.json + model.safetensors, with ``training``
    recorded in clip.json). Validation (zero-shot AUROC on the held-out pairs, when the data module
    has some) runs after every epoch."""

    task = "clip"
