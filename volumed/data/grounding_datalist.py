"""Finding-level datalists for grounding (ReXGroundingCT-style): a volume and its finding sentences.

One JSON file, in the shape of an MSD datalist whose entries carry ``findings``::

    {"dataroot": "/data/grounding",                  # optional; also "base_dir"
     "modality": "CT",                               # optional default; CT or MR
     "training": [
       {"image": "images/case1.nii.gz",
        "report": "optional full report text",
        "findings": [
          {"text": "A 12 mm nodule in the right lower lobe.", "mask": "masks/case1_f0.nii.gz", "category": "focal"},
          {"text": "Patchy ground glass in both lungs.", "mask": "masks/case1.nii.gz", "mask_label": 2,
           "category": "non-focal"},
          {"text": "No pleural effusion.", "mask": null}
        ]}],
     "validation": [...], "test": [...]}

Rules:

- ``text`` is the finding sentence: non-empty.
- ``mask`` is the reference mask of that finding: a binary mask file (any non-zero voxel is the
  finding), or with ``mask_label`` (a positive integer) the voxels of that value in a shared
  label map. ``null`` or no ``mask`` means the finding is **absent**: a negated sentence ("No
  pleural effusion.") or a sentence that is not in this volume. A model should predict nothing
  for it; the metrics count a prediction there as a false positive
  (:mod:`volumed.metrics.grounding`).
- ``category`` is ``"focal"`` (a lesion with a boundary: nodule, mass, cyst) or ``"non-focal"``
  (diffuse: emphysema, ground glass, effusion), as ReXGroundingCT sorts findings; required
  with a mask, ignored without one.
- ``findings`` may be empty (a normal study). A finding holds only ``text``, ``mask``,
  ``mask_label`` and ``category``; any other key there is a problem. An entry's ``report`` and
  ``modality`` are optional, and its other keys are kept in :attr:`GroundingCase.extra`
  (reported only when they look like a misspelt known key).

Relative paths resolve against the datalist's folder, or its ``dataroot``, as in
:mod:`volumed.data.datalist`. Everything is checked before anything is returned, and every
problem is reported at once in one :class:`~volumed.errors.DatalistError` whose message gives
the datalist file and, per problem, the entry (``training[3].findings[1]``) and the file named.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from volumed.data.datalist import normalise_modality
from volumed.errors import ConfigError, DatalistError
from volumed.io.atomic import atomic_write_text, check_writable

__all__ = [
    "CATEGORIES",
    "FindingAnnotation",
    "GroundingCase",
    "load_grounding_datalist",
    "write_grounding_datalist",
]

#: Finding categories, as ReXGroundingCT sorts them.
CATEGORIES: tuple[str, ...] = ("focal", "non-focal")
_CASE_KEYS = ("image", "findings", "report", "modality")
_FINDING_KEYS = ("text", "mask", "mask_label", "category")


@dataclass(frozen=True)
class FindingAnnotation:
    """One finding sentence of a volume and its reference.

    Attributes:
        text: the finding sentence.
        mask: absolute path of its reference mask, or None when the finding is absent (negated,
            or not in this volume): nothing should be predicted for it.
        focal: True for focal, False for non-focal findings; None when absent.
        mask_label: the value of this finding in a shared label map, or None for a binary mask
            (any non-zero voxel).
        index: position in the entry's ``findings`` list.
    """

    text: str
    mask: Path | None
    focal: bool | None = None
    mask_label: int | None = None
    index: int = 0

    @property
    def present(self) -> bool:
        return self.mask is not None


@dataclass(frozen=True)
class GroundingCase:
    """One volume with its findings.

    Attributes:
        image: absolute path of the image file or DICOM series folder.
        findings: the finding sentences, in file order.
        report: the full report, or None.
        modality: "CT" or "MR", or None when not given.
        row: 0-based index of the entry in its section.
        extra: the entry's other keys, unchanged.
    """

    image: Path
    findings: tuple[FindingAnnotation, ...]
    report: str | None = None
    modality: str | None = None
    row: int = 0
    extra: dict[str, Any] = field(default_factory=dict, hash=False)


def _near_miss(key: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(key.lower(), known, n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return (p if p.is_absolute() else base / p).absolute()


def load_grounding_datalist(
    path: str | Path, *, section: str = "training", check_files: bool = True
) -> list[GroundingCase]:
    """Read and validate a finding-level datalist (see the module doc for the format).

    Args:
        path: the ``.json`` datalist.
        section: the section to read ("training", "validation", "test", ...).
        check_files: check that every image and mask exists.

    Raises:
        DatalistError: listing every problem: malformed JSON (line and column), a missing
            section (naming the available ones), an empty section, an entry without an image or
            without a ``findings`` list, a finding without text, a mask without a category, an
            unknown category, a ``mask_label`` that is not a positive integer or has no mask,
            missing image or mask files (named), a duplicate image, an unknown modality, and
            unknown keys that look like misspelt known ones.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatalistError(["datalist file does not exist" if not path.exists() else "datalist path is not a file"], path)
    if path.suffix.lower() != ".json":
        raise DatalistError([f"a finding-level datalist is JSON; got {path.suffix!r}"], path)
    try:
        doc = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DatalistError([f"not UTF-8 text at byte {err.start}; save the file as UTF-8"], path) from None
    except json.JSONDecodeError as err:
        raise DatalistError([f"malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"], path) from None
    if not isinstance(doc, dict):
        raise DatalistError([f"the top level must be a JSON object of sections, got {type(doc).__name__}"], path)
    problems: list[str] = []
    base = path.absolute().parent
    root = doc.get("dataroot", doc.get("base_dir"))
    if root is not None:
        if isinstance(root, str) and root.strip():
            base = _resolve(base, root)
        else:
            problems.append(f"'dataroot'/'base_dir' must be a non-empty path string, got {root!r}")
    if section not in doc:
        available = ", ".join(repr(k) for k, v in doc.items() if isinstance(v, list)) or "none"
        raise DatalistError([f"section {section!r} not found; available sections: {available}"], path)
    items = doc[section]
    if not isinstance(items, list) or not items:
        raise DatalistError([f"section {section!r} must be a non-empty list of entries"], path)
    default_modality = None
    if doc.get("modality") is not None:
        default_modality = normalise_modality(doc["modality"]) if isinstance(doc["modality"], str) else None
        if default_modality is None:
            problems.append(f"top-level 'modality' {doc['modality']!r} is not CT or MR")

    cases: list[GroundingCase] = []
    seen: dict[str, str] = {}
    for i, item in enumerate(items):
        where = f"{section}[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: an entry must be an object with 'image' and 'findings', got {type(item).__name__}")
            continue
        for key in item:
            if key not in _CASE_KEYS and _near_miss(key, _CASE_KEYS):
                problems.append(f"{where}: unknown key {key!r}{_near_miss(key, _CASE_KEYS)}")
        image = None
        image_s = item.get("image")
        if not isinstance(image_s, str) or not image_s.strip():
            problems.append(f"{where}: 'image' must be a non-empty path string, got {image_s!r}")
        else:
            image = _resolve(base, image_s.strip())
            if check_files and not image.exists():
                problems.append(f"{where}: image {image_s!r} does not exist ({image})")
            key = os.path.normpath(str(image))
            if key in seen:
                problems.append(f"{where}: image {image_s!r} duplicates {seen[key]}")
            seen.setdefault(key, where)
        modality = default_modality
        if item.get("modality") is not None:
            modality = normalise_modality(item["modality"]) if isinstance(item["modality"], str) else None
            if modality is None:
                problems.append(f"{where}: unknown modality {item['modality']!r}; expected CT or MR")
        report = item.get("report")
        if report is not None and not isinstance(report, str):
            problems.append(f"{where}: 'report' must be a string, got {type(report).__name__}")
            report = None
        raw = item.get("findings")
        if not isinstance(raw, list):
            problems.append(f"{where}: 'findings' must be a list of objects with 'text' (and 'mask'), got {raw!r}")
            raw = []
        parsed = [_finding(f, j, f"{where}.findings[{j}]", base, check_files, problems) for j, f in enumerate(raw)]
        findings = [f for f in parsed if f is not None]
        if image is not None:
            extra = {k: v for k, v in item.items() if k not in _CASE_KEYS}
            cases.append(GroundingCase(image, tuple(findings), report.strip() if report and report.strip() else None,
                                       modality, i, extra))
    if problems:
        raise DatalistError(problems, path)
    return cases


def _finding(item: Any, index: int, where: str, base: Path, check_files: bool, problems: list[str]) -> FindingAnnotation | None:
    if not isinstance(item, dict):
        problems.append(f"{where}: a finding must be an object with 'text' and 'mask', got {item!r}")
        return None
    before = len(problems)
    for key in item:
        if key not in _FINDING_KEYS:
            problems.append(f"{where}: unknown key {key!r}{_near_miss(key, _FINDING_KEYS)}")
    text = item.get("text")
    if not isinstance(text, str) or not text.strip():
        problems.append(f"{where}: 'text' must be a non-empty finding sentence, got {text!r}")
    mask_s, label, category = item.get("mask"), item.get("mask_label"), item.get("category")
    mask = None
    if mask_s is not None:
        if not isinstance(mask_s, str) or not mask_s.strip():
            problems.append(f"{where}: 'mask' must be a path string, or null for an absent finding; got {mask_s!r}")
        else:
            mask = _resolve(base, mask_s.strip())
            if check_files and not mask.is_file():
                problems.append(f"{where}: mask {mask_s!r} does not exist ({mask})")
        if category not in CATEGORIES:
            problems.append(f"{where}: a finding with a mask needs 'category' "
                            f"{' or '.join(repr(c) for c in CATEGORIES)}, got {category!r}")
    if label is not None:
        if isinstance(label, bool) or not isinstance(label, int) or label < 1:
            problems.append(f"{where}: 'mask_label' must be a positive integer, got {label!r}")
        elif mask_s is None:
            problems.append(f"{where}: 'mask_label' {label} given without a 'mask'")
    if len(problems) > before:
        return None
    present = mask is not None
    return FindingAnnotation(text.strip(), mask, (category == "focal") if present else None,
                             label if present else None, index)


def write_grounding_datalist(
    cases: Sequence[GroundingCase], path: str | Path, *, section: str = "training", overwrite: bool = False
) -> Path:
    """Write ``cases`` as a finding-level datalist, atomically; :func:`load_grounding_datalist`
    reads it back to the same cases (``row`` aside). Paths inside the datalist's folder are
    written relative to it.

    Raises:
        ConfigError: ``path`` is not ``.json``.
        OutputExistsError: ``path`` exists and ``overwrite`` is false.
        DatalistError: no cases, or an extra key that shadows a standard one.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() != ".json":
        raise ConfigError(f"a finding-level datalist is JSON; got {path.suffix!r}", path)
    check_writable(path, overwrite)
    problems = [f"entry {i}: extra key {k!r} shadows a standard key" for i, c in enumerate(cases) for k in c.extra
                if k in _CASE_KEYS]
    if not cases:
        problems.append("no cases to write")
    if problems:
        raise DatalistError(problems, path)
    folder = path.absolute().parent

    def rel(p: Path) -> str:
        return p.relative_to(folder).as_posix() if p.is_relative_to(folder) else str(p)

    items = []
    for case in cases:
        item: dict[str, Any] = {"image": rel(case.image), "findings": []}
        for f in case.findings:
            entry: dict[str, Any] = {"text": f.text, "mask": rel(f.mask) if f.mask is not None else None}
            if f.mask is not None:
                entry["category"] = "focal" if f.focal else "non-focal"
                if f.mask_label is not None:
                    entry["mask_label"] = f.mask_label
            item["findings"].append(entry)
        if case.report is not None:
            item["report"] = case.report
        if case.modality is not None:
            item["modality"] = case.modality
        item.update(case.extra)
        items.append(item)
    return atomic_write_text(path, json.dumps({section: items}, indent=2, ensure_ascii=False) + "\n", overwrite=overwrite)
