"""Grounding metrics (ReXGroundingCT protocol): per-finding Dice, hit rate, false-positive findings.

::

    per finding: predicted mask (D, H, W) and reference mask (D, H, W) or None
        present finding (reference has voxels):
            dice     = MONAI compute_dice (one foreground channel; an empty prediction scores 0)
            hit      = |prediction ∩ reference| >= min_overlap voxels  ("the prediction overlaps the target")
            components_hit / components = reference connected components (26-connected) touched by the
                       prediction: for focal findings with several lesions ("multiple nodules")
        absent finding (no reference: a negated sentence, or a sentence not in this volume):
            false_positive = the prediction has at least min_voxels voxels
    over findings: mean Dice and hit rate over present findings (all, focal, non-focal), and the
        false-positive rate over absent ones

Masks are binary: bool or integer arrays (non-zero is foreground), or probabilities, which are
thresholded at ``threshold`` (0.5). Prediction and reference must have the same shape, and both
must be in the same grid (the reference's; :mod:`volumed.inference` writes masks in the input
geometry). An all-zero reference counts as absent, as ``"mask": null`` does in the datalist
(:mod:`volumed.data.grounding_datalist`), because a mask with no voxel cannot be hit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics import compute_dice
from scipy import ndimage

from volumed.errors import ConfigError

__all__ = ["FindingScore", "GroundingMetrics", "grounding_metrics", "score_finding"]


@dataclass(frozen=True)
class FindingScore:
    """The score of one finding.

    Attributes:
        present: the reference has voxels; False for a negated or absent finding.
        focal: True/False for focal/non-focal findings, None when not known or absent.
        dice: Dice of prediction and reference (present findings), else None.
        hit: the prediction overlaps the reference by at least ``min_overlap`` voxels (present
            findings), else None.
        false_positive: the prediction has voxels although the finding is absent (absent
            findings), else None.
        components: connected components of the reference (0 when absent).
        components_hit: those touched by the prediction.
        predicted_voxels: foreground voxels of the prediction.
        reference_voxels: foreground voxels of the reference.
    """

    present: bool
    focal: bool | None
    dice: float | None
    hit: bool | None
    false_positive: bool | None
    components: int
    components_hit: int
    predicted_voxels: int
    reference_voxels: int


@dataclass(frozen=True)
class GroundingMetrics:
    """Summary over findings; a mean over no findings is NaN.

    Attributes:
        n_present, n_absent: present and absent findings scored.
        n_focal, n_non_focal: present findings of each category (unknown category counts in neither).
        mean_dice, mean_dice_focal, mean_dice_non_focal: mean per-finding Dice.
        hit_rate, hit_rate_focal, hit_rate_non_focal: fraction of present findings hit.
        component_hit_rate: reference components touched / all reference components (present findings).
        false_positive_rate: fraction of absent findings with a prediction.
        false_positives: the number of those.
    """

    n_present: int
    n_absent: int
    n_focal: int
    n_non_focal: int
    mean_dice: float
    mean_dice_focal: float
    mean_dice_non_focal: float
    hit_rate: float
    hit_rate_focal: float
    hit_rate_non_focal: float
    component_hit_rate: float
    false_positive_rate: float
    false_positives: int


def _binary(mask, threshold: float, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).detach().cpu()
    if t.dtype == torch.bool:
        return t
    if t.is_floating_point():
        if torch.isnan(t).any():
            raise ConfigError(f"the {name} mask holds NaN values")
        return t >= threshold
    return t != 0


def score_finding(
    prediction,
    reference=None,
    *,
    focal: bool | None = None,
    threshold: float = 0.5,
    min_overlap: int = 1,
    min_voxels: int = 1,
) -> FindingScore:
    """Score one finding's predicted mask against its reference mask (None: the finding is absent).

    Args:
        prediction: predicted mask, shape (D, H, W) (any 3D shape; numpy array or tensor).
        reference: reference mask of the same shape, or None for an absent finding.
        focal: the finding's category, carried into the score.
        threshold: probability at or above which a floating-point voxel is foreground.
        min_overlap: voxels of overlap that make a hit.
        min_voxels: predicted voxels that make a false positive on an absent finding.

    Raises:
        ConfigError: prediction and reference shapes differ, a mask is not 3D, or holds NaN.
    """
    pred = _binary(prediction, threshold, "predicted")
    if pred.ndim != 3:
        raise ConfigError(f"a finding mask must be 3D (D, H, W); the prediction has shape {tuple(pred.shape)}")
    n_pred = int(pred.sum())
    ref = _binary(reference, threshold, "reference") if reference is not None else None
    if ref is not None and ref.shape != pred.shape:
        raise ConfigError(f"prediction shape {tuple(pred.shape)} differs from reference shape {tuple(ref.shape)}; "
                          "resample the prediction to the reference grid first")
    if ref is None or not bool(ref.any()):
        return FindingScore(False, None, None, None, n_pred >= min_voxels, 0, 0, n_pred, 0)
    dice = float(compute_dice(pred[None, None].float(), ref[None, None].float(),
                              include_background=True, ignore_empty=False)[0, 0])
    overlap = int((pred & ref).sum())
    labels, n_components = ndimage.label(ref.numpy(), structure=np.ones((3, 3, 3), dtype=bool))
    touched = np.unique(labels[pred.numpy() & (labels > 0)])
    return FindingScore(True, focal, dice, overlap >= min_overlap, None, int(n_components), int(touched.size),
                        n_pred, int(ref.sum()))


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else math.nan


def grounding_metrics(scores: Sequence[FindingScore]) -> GroundingMetrics:
    """Summarise finding scores: mean Dice and hit rate over present findings (all, focal,
    non-focal), component hit rate, and the false-positive rate over absent findings."""
    present = [s for s in scores if s.present]
    absent = [s for s in scores if not s.present]
    focal = [s for s in present if s.focal is True]
    non_focal = [s for s in present if s.focal is False]
    components = sum(s.components for s in present)
    false_positives = sum(bool(s.false_positive) for s in absent)
    return GroundingMetrics(
        n_present=len(present),
        n_absent=len(absent),
        n_focal=len(focal),
        n_non_focal=len(non_focal),
        mean_dice=_mean([s.dice for s in present]),
        mean_dice_focal=_mean([s.dice for s in focal]),
        mean_dice_non_focal=_mean([s.dice for s in non_focal]),
        hit_rate=_mean([float(s.hit) for s in present]),
        hit_rate_focal=_mean([float(s.hit) for s in focal]),
        hit_rate_non_focal=_mean([float(s.hit) for s in non_focal]),
        component_hit_rate=sum(s.components_hit for s in present) / components if components else math.nan,
        false_positive_rate=false_positives / len(absent) if absent else math.nan,
        false_positives=false_positives,
    )
