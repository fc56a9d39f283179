"""Finding sentences for phantom lesions, and phantom cohorts as finding-level datalists.

Each lesion of a phantom (:mod:`volumed.data.phantoms`) is described by a generated sentence
that names its size and location, in one of several wordings::

    "A 12 mm solid nodule in the right lower lobe."          (the phantom report's own sentence)
    "12 mm solid nodule in the right lower lobe"
    "There is a 1.2 cm solid nodule in the right lower lobe."
    "Right lower lobe: 12 mm solid nodule."

Each case also gets sentences whose reference is empty (``mask: null`` in the datalist):

* **negated**: "No nodule in the left upper lobe." for places without a lesion; the parser marks
  them negated, so they never reach the model;
* **absent**: affirmative sentences about a place that holds no lesion in this case ("An 11 mm
  hypodense lesion in the spleen."): the model must find nothing, and a mask there is a false
  positive (:mod:`volumed.metrics.grounding`).

On request (``anatomy``), a case also gets **anatomy** sentences ("The right lower lobe of the
lung.", "The spleen."), one per organ that can hold a lesion, whose reference is that organ of the
phantom's label map. They teach the location gate where each organ is (a grounding model's anatomy
queries, :attr:`volumed.heads.grounding.FindingQuery.anatomy`); they are training data, not a test
of grounding, so held-out cohorts are written without them.

The sizes of absent sentences are drawn from the lesion kind's range. Everything is drawn from
``numpy.random.default_rng((seed, index))``: the same case gets the same sentences.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from volumed.data.grounding_datalist import (
    FindingAnnotation,
    GroundingCase,
    write_grounding_datalist,
)
from volumed.data.phantoms import PhantomCase, make_case
from volumed.errors import ConfigError
from volumed.io.atomic import check_writable
from volumed.io.writer import write_nifti

__all__ = ["PhantomFinding", "phantom_findings", "write_grounding_phantoms"]

# Place phrase -> the finding phrase a lesion there would have (the phantom's lesion kinds).
_PLACES: dict[str, tuple[str, ...]] = {
    "right upper lobe": ("solid nodule",),
    "right middle lobe": ("solid nodule",),
    "right lower lobe": ("solid nodule",),
    "left upper lobe": ("solid nodule",),
    "left lower lobe": ("solid nodule",),
    "right liver lobe": ("hypodense lesion",),
    "left liver lobe": ("hypodense lesion",),
    "spleen": ("hypodense lesion",),
    "upper pole of the right kidney": ("hypodense cyst", "hyperdense lesion"),
    "lower pole of the right kidney": ("hypodense cyst", "hyperdense lesion"),
    "upper pole of the left kidney": ("hypodense cyst", "hyperdense lesion"),
    "lower pole of the left kidney": ("hypodense cyst", "hyperdense lesion"),
}
_NEGATED = {"solid nodule": "nodule", "hypodense lesion": "focal lesion", "hypodense cyst": "cyst",
            "hyperdense lesion": "focal lesion"}
_FINDING_OF_KIND = {"lung_nodule": "solid nodule", "liver_hypodense_lesion": "hypodense lesion",
                    "spleen_hypodense_lesion": "hypodense lesion", "kidney_cyst": "hypodense cyst",
                    "kidney_hyperdense_lesion": "hyperdense lesion"}


@dataclass(frozen=True)
class PhantomFinding:
    """A sentence about a phantom case and its reference.

    Attributes:
        text: the sentence.
        lesion_id: the value of the lesion it describes in the case's ``lesion_map``, or None
            for a negated or absent sentence (empty reference).
        kind: ``"lesion"``, ``"negated"``, ``"absent"`` or ``"anatomy"``.
        place: the place phrase it names (an anatomy sentence's: its organ's label name).
        organ_id: an anatomy sentence's organ, its value in the case's ``label`` map; else None.
    """

    text: str
    lesion_id: int | None
    kind: str
    place: str
    organ_id: int | None = None


def _article(size_text: str) -> str:
    return "An" if size_text.startswith("8") or size_text.split()[0] in ("11", "18") else "A"


def _sentence(size_mm: float, finding: str, place: str, style: int) -> str:
    size = int(np.floor(size_mm + 0.5))
    mm = f"{size} mm"
    if style == 0:
        return f"{_article(mm)} {mm} {finding} in the {place}."
    if style == 1:
        return f"{mm} {finding} in the {place}"
    if style == 2:
        cm = f"{size / 10:.1f} cm"
        return f"There is a {cm} {finding} in the {place}."
    return f"{place[0].upper()}{place[1:]}: {mm} {finding}."


# Organ label name -> the words of its anatomy sentence (each parses to that one structure).
_ANATOMY_WORDS = {
    "lung_upper_lobe_right": "right upper lobe of the lung", "lung_middle_lobe_right": "right middle lobe of the lung",
    "lung_lower_lobe_right": "right lower lobe of the lung", "lung_upper_lobe_left": "left upper lobe of the lung",
    "lung_lower_lobe_left": "left lower lobe of the lung", "liver": "liver", "spleen": "spleen",
    "kidney_right": "right kidney", "kidney_left": "left kidney",
}


def _anatomy_sentence(words: str, style: int) -> str:
    return (f"The {words}.", f"the {words}", f"{words[0].upper()}{words[1:]}.")[style % 3]


def phantom_findings(case: PhantomCase, *, negated: int = 1, absent: int = 2, anatomy: int = 0,
                     seed: int = 0) -> list[PhantomFinding]:
    """Sentences of one phantom case: one per lesion (with its size and location, in a wording
    drawn at random), then ``negated`` negated and ``absent`` affirmative sentences about places
    without a lesion (fewer if fewer such places exist), then ``anatomy`` anatomy sentences about
    organs of the case that can hold a lesion (fewer if fewer are in the field of view). The
    sentences without anatomy are the same whatever ``anatomy`` is."""
    rng = np.random.default_rng((int(seed), case.seed, case.index))
    out = []
    for lesion in case.lesions:
        finding = _FINDING_OF_KIND[lesion.kind]
        out.append(PhantomFinding(_sentence(lesion.diameter_mm, finding, lesion.location, int(rng.integers(4))),
                                  lesion.id, "lesion", lesion.location))
    # A place is free when its organ holds no lesion (an upper-pole sentence is no test of the
    # model when the same kidney has an interpolar lesion) and the field of view holds the organ.
    taken = {lesion.organ for lesion in case.lesions}
    organs = set(case.label_names.values())
    free = [p for p in _PLACES if _organ_of(p) not in taken and _organ_of(p) in organs]
    order = [free[i] for i in rng.permutation(len(free))]
    for place in order[:negated]:
        out.append(PhantomFinding(f"No {_NEGATED[_PLACES[place][0]]} in the {place}.", None, "negated", place))
    for place in order[negated : negated + absent]:
        finding = _PLACES[place][int(rng.integers(len(_PLACES[place])))]
        out.append(PhantomFinding(_sentence(float(rng.uniform(8.0, 25.0)), finding, place, int(rng.integers(4))),
                                  None, "absent", place))
    if int(anatomy) > 0:
        extra = np.random.default_rng((int(seed), case.seed, case.index, 1))  # leaves the draws above alone
        ids = {name: i for i, name in case.label_names.items()}
        names = [n for n in _ANATOMY_WORDS if n in ids]
        for name in [names[i] for i in extra.permutation(len(names))][: int(anatomy)]:
            out.append(PhantomFinding(_anatomy_sentence(_ANATOMY_WORDS[name], int(extra.integers(3))), None, "anatomy",
                                      name, ids[name]))
    return out


def _organ_of(place: str) -> str:
    if place.endswith("lobe") and "liver" not in place:
        side, level = place.split()[:2]
        return f"lung_{level}_lobe_{side}"
    if "liver" in place:
        return "liver"
    if "kidney" in place:
        return "kidney_right" if "right" in place else "kidney_left"
    return place


def write_grounding_phantoms(
    out_dir: str | Path,
    n: int,
    seed: int,
    *,
    shape: Sequence[int] = (64, 64, 48),
    spacing: Sequence[float] = (4.0, 4.0, 4.0),
    first_index: int = 0,
    negated: int = 1,
    absent: int = 2,
    anatomy: int = 0,
    section: str = "training",
    overwrite: bool = False,
) -> Path:
    """Write ``n`` phantom cases (``make_case(seed, index=first_index + i)``, each with 1-3
    lesions) as a finding-level datalist (:mod:`volumed.data.grounding_datalist`).

    Layout: ``images/<case>.nii.gz`` (int16 HU), ``lesions/<case>.nii.gz`` (the lesion map; a
    finding's ``mask_label`` is its lesion's value) and ``grounding.json``. Lesion findings are
    ``focal``; negated and absent ones have ``mask: null``. With ``anatomy`` > 0, that many
    anatomy sentences per case (:func:`phantom_findings`), ``non-focal``, whose reference is their
    organ in ``labels/<case>.nii.gz`` (the organ label map). Returns the datalist's path.
    """
    if int(n) < 1:
        raise ConfigError(f"n must be at least 1, got {n!r}")
    out = Path(out_dir).expanduser()
    datalist = out / "grounding.json"
    check_writable(datalist, overwrite)
    cases = []
    for i in range(int(n)):
        ph = make_case(seed, index=first_index + i, shape=shape, spacing=spacing, lesion_rate=1.0)
        image, lesions = out / "images" / f"{ph.case_id}.nii.gz", out / "lesions" / f"{ph.case_id}.nii.gz"
        write_nifti(ph.image, image, overwrite=overwrite, dtype=np.int16)
        write_nifti(ph.lesion_map, lesions, overwrite=overwrite)
        sentences = phantom_findings(ph, negated=negated, absent=absent, anatomy=anatomy, seed=seed)
        labels = out / "labels" / f"{ph.case_id}.nii.gz"
        if any(f.kind == "anatomy" for f in sentences):
            write_nifti(ph.label, labels, overwrite=overwrite)
        findings = tuple(
            FindingAnnotation(f.text, labels, False, f.organ_id, k) if f.kind == "anatomy" else
            FindingAnnotation(f.text, lesions if f.lesion_id else None, True if f.lesion_id else None, f.lesion_id, k)
            for k, f in enumerate(sentences)
        )
        cases.append(GroundingCase(image, findings, ph.report, "CT", i, {"case_id": ph.case_id}))
    return write_grounding_datalist(cases, datalist, section=section, overwrite=overwrite)
