"""The one optimiser recipe of volumed's LightningModules: AdamW with warm-up and cosine decay."""

from __future__ import annotations

import math
from typing import Any, Iterable

import lightning.pytorch as pl
import torch
from monai.optimizers import WarmupCosineSchedule

from volumed.errors import ConfigError


def adamw_warmup_cosine(
    module: pl.LightningModule, params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float, warmup_steps: int
) -> dict[str, Any]:
    """``configure_optimizers`` output: AdamW and MONAI's ``WarmupCosineSchedule`` stepped per batch,
    decaying to zero at the end of the run (the Trainer's estimated optimiser steps)."""
    total = module.trainer.estimated_stepping_batches
    if not math.isfinite(total) or total <= 0:
        raise ConfigError(f"{type(module).__name__} needs a finite run: set trainer.max_steps (or max_epochs)")
    total = int(total)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=min(warmup_steps, max(total - 1, 0)), t_total=total)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
