"""Zero-shot classification metrics as CT-CLIP reports them: AUROC, and F1, precision and recall at
the threshold that maximises F1, per finding.

::

    per finding: probabilities p (N,) in [0, 1], labels y (N,) in {0, 1}
        auroc     = torchmetrics binary_auroc(p, y)                       (None: one class only)
        threshold = argmax over the precision-recall curve's thresholds of F1 = 2PR / (P + R)
                    (torchmetrics binary_precision_recall_curve); ties go to the higher threshold
        f1, precision, recall, accuracy at that threshold (p >= threshold is positive)
    over findings: the means of those that are defined (macro)

The curve comes from torchmetrics, which Lightning already installs, so nothing here is
hand-written. A finding with no positive or no negative case has no AUROC and no threshold: its
numbers are None, and it is left out of the macro means (and counted in ``undefined``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torchmetrics.functional.classification import binary_auroc, binary_precision_recall_curve

from volumed.errors import ConfigError

__all__ = ["FindingClassification", "ZeroShotMetrics", "classification_metrics", "score_binary"]


@dataclass(frozen=True)
class FindingClassification:
    """Scores of one finding (None where the labels hold one class only)."""

    finding: str
    positives: int
    negatives: int
    auroc: float | None
    threshold: float | None
    f1: float | None
    precision: float | None
    recall: float | None
    accuracy: float | None


@dataclass(frozen=True)
class ZeroShotMetrics:
    """Per-finding scores and their macro means over the defined ones."""

    findings: tuple[FindingClassification, ...]
    auroc: float | None
    f1: float | None
    precision: float | None
    recall: float | None
    undefined: tuple[str, ...]

    def by_finding(self) -> dict[str, FindingClassification]:
        return {f.finding: f for f in self.findings}

    def to_dict(self) -> dict:
        return {"macro": {"auroc": self.auroc, "f1": self.f1, "precision": self.precision, "recall": self.recall},
                "undefined": list(self.undefined), "findings": [asdict(f) for f in self.findings]}

    def to_table(self) -> str:
        def fmt(v: float | None) -> str:
            return "-" if v is None else f"{v:.3f}"

        width = max([len("finding"), *(len(f.finding) for f in self.findings)])
        rows = [f"{'finding':<{width}}  {'pos':>4} {'neg':>4}  auroc  f1     prec   recall threshold"]
        for f in self.findings:
            rows.append(f"{f.finding:<{width}}  {f.positives:>4} {f.negatives:>4}  {fmt(f.auroc):<6} {fmt(f.f1):<6} "
                        f"{fmt(f.precision):<6} {fmt(f.recall):<6} {fmt(f.threshold)}")
        rows.append(f"{'macro':<{width}}  {'':>4} {'':>4}  {fmt(self.auroc):<6} {fmt(self.f1):<6} {fmt(self.precision):<6} "
                    f"{fmt(self.recall):<6}")
        return "\n".join(rows)


def _as_vectors(probabilities, labels, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(probabilities, dtype=torch.float32).flatten()
    y = torch.as_tensor(labels).flatten()
    if y.dtype == torch.bool:  # torch.isin has no bool kernel
        y = y.long()
    if p.shape != y.shape or p.numel() == 0:
        raise ConfigError(f"{what}: probabilities and labels must be non-empty and of one length, "
                          f"got {tuple(p.shape)} and {tuple(y.shape)}")
    if not torch.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ConfigError(f"{what}: probabilities must lie in [0, 1]")
    if not torch.isin(y, torch.tensor([0, 1], dtype=y.dtype)).all():
        raise ConfigError(f"{what}: labels must be 0 or 1 (or bool)")
    return p, y.long()


def score_binary(finding: str, probabilities, labels) -> FindingClassification:
    """AUROC, and F1 / precision / recall / accuracy at the F1-maximising threshold, of one finding."""
    p, y = _as_vectors(probabilities, labels, finding)
    pos, neg = int(y.sum()), int((1 - y).sum())
    if pos == 0 or neg == 0:
        return FindingClassification(finding, pos, neg, None, None, None, None, None, None)
    auroc = float(binary_auroc(p, y))
    precision, recall, thresholds = binary_precision_recall_curve(p, y)
    # The curve has one more point than thresholds (recall 0, precision 1, no threshold): drop it.
    precision, recall = precision[:-1], recall[:-1]
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(precision))
    best = int(torch.nonzero(f1 == f1.max()).flatten()[-1])  # thresholds ascend: the last is the highest
    threshold = float(thresholds[best])
    accuracy = float(((p >= threshold).long() == y).float().mean())
    return FindingClassification(finding, pos, neg, auroc, threshold, float(f1[best]), float(precision[best]),
                                 float(recall[best]), accuracy)


def classification_metrics(probabilities: Mapping[str, Sequence[float]] | torch.Tensor,
                           labels: Mapping[str, Sequence[int]] | torch.Tensor,
                           findings: Sequence[str] | None = None) -> ZeroShotMetrics:
    """Per-finding scores (:func:`score_binary`) and macro means.

    Args:
        probabilities, labels: ``{finding: (N,)}`` dicts with the same keys, or ``(N, F)`` tensors
            with ``findings`` naming the columns.
        findings: the finding names (required with tensors; with dicts, an order to report in).
    """
    if isinstance(probabilities, Mapping):
        names = list(findings or probabilities)
        if not isinstance(labels, Mapping) or set(names) - set(labels) or set(names) - set(probabilities):
            raise ConfigError("classification_metrics: probabilities and labels must hold the same findings")
        columns = [(n, probabilities[n], labels[n]) for n in names]
    else:
        p, y = torch.as_tensor(probabilities), torch.as_tensor(labels)
        if findings is None or p.ndim != 2 or p.shape != y.shape or p.shape[1] != len(findings):
            raise ConfigError("classification_metrics: (N, F) tensors of one shape need F finding names")
        columns = [(n, p[:, k], y[:, k]) for k, n in enumerate(findings)]
    scores = tuple(score_binary(n, pk, yk) for n, pk, yk in columns)
    defined = [s for s in scores if s.auroc is not None]

    def mean(key: str) -> float | None:
        return sum(getattr(s, key) for s in defined) / len(defined) if defined else None

    return ZeroShotMetrics(scores, mean("auroc"), mean("f1"), mean("precision"), mean("recall"),
                           tuple(s.finding for s in scores if s.auroc is None))
