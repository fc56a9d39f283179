"""Coded concepts for segments: SNOMED CT where pydicom's code dictionary knows the structure.

``structure_code("kidney_left")`` gives the property category (Anatomical Structure, or Lesion
for findings), the property type (SCT "Kidney") and a laterality modifier (SCT "Left").
Structures SNOMED CT does not name in pydicom's dictionary get a code in volumed's **local
coding scheme** ``99VOLUMED`` (DICOM PS3.16 8.2: private schemes start with ``99``): the code
value is the canonical structure name, the meaning its readable form. The scheme is documented
in docs/coding.md so that receivers can interpret it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

LOCAL_SCHEME = "99VOLUMED"
LOCAL_SCHEME_VERSION = "1"

_ORDINALS = {"1": "first", "2": "second", "3": "third", "4": "fourth", "5": "fifth", "6": "sixth", "7": "seventh",
             "8": "eighth", "9": "ninth", "10": "tenth", "11": "eleventh", "12": "twelfth"}
_LESION_WORDS = ("lesion", "nodule", "tumor", "tumour", "mass", "cyst", "metastasis", "finding")
# TotalSegmentator words for a concept that pydicom's dictionary names otherwise: the SNOMED CT
# code keeps these structures out of the local scheme (and out of dciodvfy's warnings).
_SYNONYMS = {"small bowel": "small intestine", "urinary bladder": "bladder", "clavicula": "clavicle",
             "atrial appendage": "auricular appendage"}


@dataclass(frozen=True)
class StructureCode:
    """Codes for one segment: ``(value, scheme, meaning)`` triples."""

    category: tuple[str, str, str]
    type: tuple[str, str, str]
    laterality: tuple[str, str, str] | None
    local: bool

    def as_highdicom(self):
        from highdicom.sr import CodedConcept

        def cc(t):
            return CodedConcept(value=t[0], scheme_designator=t[1], meaning=t[2])

        return cc(self.category), cc(self.type), (cc(self.laterality) if self.laterality else None)


@lru_cache(maxsize=1)
def _sct_by_meaning() -> dict[str, tuple[str, str]]:
    from pydicom.sr.codedict import codes

    table: dict[str, tuple[str, str]] = {}
    for kw in codes.SCT.dir():
        code = getattr(codes.SCT, kw)
        table.setdefault(code.meaning.lower(), (code.value, code.meaning))
    return table


def _candidates(tokens: list[str], side: str | None) -> list[tuple[str, bool]]:
    """Meaning phrases to look up, each with whether it already includes the side."""
    out: list[tuple[str, bool]] = []
    words = " ".join(tokens)
    words = _SYNONYMS.get(words, words)
    if tokens[:1] == ["lung"] and "lobe" in tokens:
        pos = next((t for t in tokens if t in ("upper", "middle", "lower")), "")
        if side:
            out.append((f"{pos} lobe of {side} lung", True))
        out.append((f"{pos} lobe of lung", False))
    m = re.fullmatch(r"vertebrae ([clts]\d+)", words)
    if m:
        out.append((f"{m.group(1)} vertebra", False))
    if tokens[:1] == ["rib"]:
        out.append(("rib", False))
    if side:
        out.append((f"{side} {words}", True))
    out.append((words, False))
    if words.endswith("s"):
        out.append((words[:-1], False))
    out.append((words.replace("vertebrae", "vertebra"), False))
    return out


@lru_cache(maxsize=512)
def structure_code(name: str) -> StructureCode:
    """Codes for a canonical structure name (TotalSegmentator style, e.g. ``lung_upper_lobe_left``)."""
    table = _sct_by_meaning()
    tokens = [t.lower() for t in re.split(r"[_\s]+", name.strip()) if t]
    side = "left" if "left" in tokens else ("right" if "right" in tokens else None)
    base = [t for t in tokens if t not in ("left", "right") and not t.isdigit()]
    lesion = any(w in tokens for w in _LESION_WORDS)
    category = ("49755003", "SCT", "Morphologically Altered Structure") if lesion else ("123037004", "SCT", "Anatomical Structure")
    for phrase, includes_side in _candidates(base or tokens, side):
        for key in (phrase, f"structure of {phrase} (body structure)"):
            hit = table.get(key)
            if hit:
                lat = None
                if side and not includes_side:
                    lat = ("7771000", "SCT", "Left") if side == "left" else ("24028007", "SCT", "Right")
                return StructureCode(category, (hit[0], "SCT", hit[1]), lat, local=False)
    meaning = readable_name(name)
    return StructureCode(category, (name[:16] if len(name) <= 16 else _short_code(name), LOCAL_SCHEME, meaning), None, local=True)


def local_scheme_identification():
    """The Coding Scheme Identification Sequence item that declares ``99VOLUMED``.

    Every SEG or SR holding a local code carries it (SOP Common module), so a receiver learns
    what the private designator is and where it is documented.
    """
    from highdicom.coding_schemes import CodingSchemeIdentificationItem

    return CodingSchemeIdentificationItem(
        designator=LOCAL_SCHEME, name="volumed local structure codes", version=LOCAL_SCHEME_VERSION,
        responsible_organization="volumed (docs/coding.md)",
    )


def _short_code(name: str) -> str:
    # DICOM Code Value (SH) holds at most 16 characters; keep it stable and readable.
    import hashlib

    return name[:9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:6]


def readable_name(name: str) -> str:
    """``"kidney_left"`` -> ``"kidney left"``; ``"vertebrae_L1"`` -> ``"vertebrae L1"``."""
    return re.sub(r"[_\s]+", " ", name).strip()
