"""Phantom cohorts for report generation: chest phantoms paired with template reports whose only
finding is the one the image holds or lacks, a lung nodule, in balanced classes.

The volumes are :func:`volumed.data.phantoms.make_case` cases, unchanged; a case is *positive*
when it holds a lung nodule at least ``min_nodule_mm`` across (the report names the lobe of
every lung nodule) and *negative* when it holds none. Cases whose only nodules are smaller are
skipped: on a coarse grid they are a voxel or two and the report would state what the image can
barely show. The other phantom lesions (liver, spleen, kidney) stay in the image and are not
reported, so they are distractors the model must learn to ignore.

Reports, read by the CT-RATE label extractor (:mod:`volumed.text.labels`) as ``Lung nodule`` = 1
and 0 respectively, and no other finding::

    positive: "There is a nodule in the right lower lobe. No pleural effusion."
              "There are nodules in the left upper lobe and the right middle lobe. No pleural effusion."
    negative: "No lung nodule. No pleural effusion."

Balance. A cohort of ``n`` has ``n // 2`` positives and ``n - n // 2`` negatives, interleaved
(negative first), so neither the prior nor the position in the cohort tells the label: a model
that ignores the image cannot beat chance, and clinical-efficacy F1 measures the visual path.
Cohorts are deterministic in ``(n, seed, shape, spacing, min_nodule_mm, lesion_rate,
field_of_view)``; a held-out cohort is one with another ``seed``.

Field of view. ``"whole"`` keeps the phantom's grid. ``"chest"`` crops every volume of a case to
the box of its lung labels plus ``chest_margin_mm`` (a chest CT's field of view: the lungs, the
mediastinum and the upper liver/spleen domes), which makes a finer grid affordable: on 3 mm
voxels an 18 mm nodule is 6 voxels across against one-voxel (3 mm) vessels, where on the 6 mm
default it is 3 and a vessel crossing looks alike (docs/reports.md, "Diagnosis").
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from volumed.data.phantoms import PHANTOM_LABELS, PhantomCase, make_case
from volumed.errors import ConfigError

__all__ = ["ReportPhantom", "make_report_cohort", "nodule_report"]

#: The CT-RATE finding the cohort's reports are about.
REPORTED_FINDING = "Lung nodule"
_NORMAL = "No pleural effusion."


@dataclass(frozen=True)
class ReportPhantom:
    """A phantom case, its report, and whether the report (and the image) holds a lung nodule."""

    case: PhantomCase
    report: str
    nodule: bool


def nodule_report(case: PhantomCase) -> str:
    """The template report of ``case``: the lobes of its lung nodules, or "No lung nodule."."""
    lobes: list[str] = []
    for lesion in case.lesions:
        if lesion.kind == "lung_nodule" and lesion.location not in lobes:
            lobes.append(lesion.location)
    if not lobes:
        return f"No lung nodule. {_NORMAL}"
    if len(lobes) == 1 and sum(l.kind == "lung_nodule" for l in case.lesions) == 1:
        return f"There is a nodule in the {lobes[0]}. {_NORMAL}"
    where = " and ".join(f"the {lobe}" for lobe in lobes)
    return f"There are nodules in {where}. {_NORMAL}"


_LUNG_IDS = tuple(v for k, v in PHANTOM_LABELS.items() if k.startswith("lung_"))


def _crop(case: PhantomCase, field_of_view: str, margin_mm: float) -> PhantomCase:
    """``case`` itself (``"whole"``), or its volumes cropped to the lungs' box plus ``margin_mm``
    (``"chest"``; the affines' origins move with the crop, so world coordinates are kept)."""
    if field_of_view == "whole":
        return case
    lungs = np.isin(case.label.data, _LUNG_IDS)
    if not lungs.any():
        return case
    spacing = np.sqrt(np.sum(np.square(case.image.affine[:3, :3]), axis=0))
    pad = np.ceil(float(margin_mm) / spacing).astype(int)
    sl = []
    for a in range(3):
        idx = np.flatnonzero(lungs.any(axis=tuple(b for b in range(3) if b != a)))
        sl.append(slice(max(0, int(idx[0]) - pad[a]), min(lungs.shape[a], int(idx[-1]) + 1 + pad[a])))
    box = tuple(sl)
    present = set(int(i) for i in np.unique(case.label.data[box]) if i)
    names = {i: nm for i, nm in case.label_names.items() if i in present}
    return replace(case, image=case.image.crop(box), label=case.label.crop(box), lesion_map=case.lesion_map.crop(box),
                   label_names=names, terms=tuple(names.values()))


def make_report_cohort(
    n: int,
    seed: int,
    *,
    shape: Sequence[int] = (48, 48, 32),
    spacing: Sequence[float] = (6.0, 6.0, 6.0),
    min_nodule_mm: float = 12.0,
    lesion_rate: float = 0.9,
    max_scan: int | None = None,
    field_of_view: str = "whole",
    chest_margin_mm: float = 12.0,
) -> list[ReportPhantom]:
    """``n`` balanced report phantoms (see the module docstring).

    Args:
        n: cohort size (at least 2).
        seed: phantom seed; cases ``make_case(seed, index=j)`` are scanned for ``j = 0, 1, ...``.
        shape, spacing: the phantom grid (the default 48 x 48 x 32 at 6 mm holds the whole
            288 x 288 x 192 mm field of view).
        min_nodule_mm: a positive case's largest lung nodule is at least this wide.
        lesion_rate: passed to :func:`make_case` (how often a case has lesions at all).
        max_scan: give up after scanning this many cases (default ``50 * n``).
        field_of_view: ``"whole"`` (the grid as rendered) or ``"chest"`` (cropped to the lungs'
            box plus ``chest_margin_mm``; see the module docstring).
        chest_margin_mm: the margin around the lungs for ``field_of_view="chest"``.

    Returns:
        The cohort, negative and positive cases alternating.
    """
    if int(n) < 2:
        raise ConfigError(f"a report cohort needs at least 2 cases (one of each class), got n={n!r}")
    if field_of_view not in ("whole", "chest"):
        raise ConfigError(f"field_of_view must be 'whole' or 'chest', got {field_of_view!r}")
    want_pos, want_neg = int(n) // 2, int(n) - int(n) // 2
    pos: list[ReportPhantom] = []
    neg: list[ReportPhantom] = []
    limit = int(max_scan) if max_scan is not None else 50 * int(n)
    for j in range(limit):
        if len(pos) >= want_pos and len(neg) >= want_neg:
            break
        case = make_case(seed, index=j, shape=shape, spacing=spacing, lesion_rate=lesion_rate)
        nodules = [l for l in case.lesions if l.kind == "lung_nodule"]
        if not nodules and len(neg) < want_neg:
            neg.append(ReportPhantom(_crop(case, field_of_view, chest_margin_mm), nodule_report(case), False))
        elif nodules and max(l.diameter_mm for l in nodules) >= min_nodule_mm and len(pos) < want_pos:
            pos.append(ReportPhantom(_crop(case, field_of_view, chest_margin_mm), nodule_report(case), True))
    if len(pos) < want_pos or len(neg) < want_neg:
        raise ConfigError(
            f"found {len(pos)} of {want_pos} nodule and {len(neg)} of {want_neg} normal phantoms in {limit} cases; "
            "lower min_nodule_mm or raise max_scan"
        )
    out: list[ReportPhantom] = []
    for i in range(want_neg):
        out.append(neg[i])
        if i < want_pos:
            out.append(pos[i])
    return out
