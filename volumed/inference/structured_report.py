"""Structured, grounded report from a segmentation (``volumed report``).

Pipeline (one image, the folder ``volumed segment`` wrote for it)::

    DIR/statistics.json (+ labels.json, masks/<name>.nii.gz)      what volumed segment measured
    + the image (Volume, HU for CT; same grid as the masks)
      -> structures, in label-value order: present ones with volume (mL) against an approximate
         adult normal range where one is documented (NORMAL_VOLUME_RANGES_ML), mean attenuation
         (HU), the model's confidence, and a flag when the mask's mean HU does not fit its tissue
         (statistics.json "hu_check"); absent ones with their evidence (an upper bound of the
         probability, or what the presence rule turned away)
      -> lesions: the 26-connected components (scipy.ndimage.label) of each present lesion-like
         mask (a term whose name says lesion, tumour, nodule, mass, cyst, metastasis, ...):
         volume (mL), extent along the R-L, A-P and S-I axes (mm, voxel edges included), mean HU,
         location: the organ mask holding most of it, its side, and its lobe or segment where a
         lobe or segment mask holds it (lung lobes are TotalSegmentator classes)
      -> sentences by fixed templates (deterministic: same input, same text), each carrying the
         masks it states (term, label value, SEG segment number, mask file, lesion component)
         and the measurements (a JSON pointer into statistics.json or report.json, the value,
         its unit and the text the sentence states)
      -> StructuredReport: .text() is report.txt, .to_dict() is report.json

Rules a reader would otherwise have to guess:

* A present structure whose statistics.json ``hu_check`` says implausible gets a flag sentence
  (lesion-like terms excepted: their prior would be their organ's tissue, not the lesion's).
* A structure whose mask reaches the edge of the image grid is cut by the field of view: only
  part of it was measured, so its volume is never compared with a normal range.
* Absent means "not found by the model in this image" (not in the field of view, or missed),
  and every absent structure is stated, with its evidence, never dropped.
* A lesion's side is the organ's side when the organ is paired or a lung lobe; otherwise the
  side of the body's midline its centre lies on (CT: the mean R-L position of the voxels above
  -500 HU, i.e. the body; other modalities: the centre of the image).
* The numbers are those of statistics.json to the last digit in report.json; sentences round
  them (volumes to 0.1 mL, 0.01 below 1 mL; HU to 0.1; probabilities to 0.01) and each
  measurement records the exact text stated.

Approximate adult normal volume ranges (mL), from well-known published series; they vary with
body size, sex, age and method, and are a guide, not a diagnosis:

============  ==============  ================================================================
structure     range (mL)      source
============  ==============  ================================================================
liver         1100 - 2000     standard liver volume formulas for body surface areas of
                              1.6-2.2 m^2, rounded: Urata K et al., Hepatology 1995;21:1317-21
                              (706.2 x BSA + 2.4: 1132-1556 mL) and Heinemann A et al., Liver
                              Transpl Surg 1999;5:366-8 (1072.8 x BSA - 345.7: 1371-2014 mL)
spleen        107 - 314       Prassopoulos P et al., Eur Radiol 1997;7:246-8: CT of 140 adults
                              without splenic disease, range 107.2-314.5 cm^3 (mean 214.6)
kidney (each) 100 - 200       Emamian SA et al., AJR 1993;160:83-6: 665 adult volunteers
                              (ultrasound), mean volumes about 134 mL (right), 146 mL (left);
                              range rounded around them
============  ==============  ================================================================

Other structures get no comparison (their volume depends on filling, breathing or what the
mask includes), and the sentence says so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from volumed.errors import ConfigError, VolumedError
from volumed.io.volume import Volume

__all__ = [
    "NORMAL_VOLUME_RANGES_ML",
    "Lesion",
    "MaskRef",
    "MeasurementRef",
    "NormalRange",
    "Sentence",
    "StructuredReport",
    "build_structured_report",
    "is_lesion_like",
    "read_statistics",
]

STATISTICS_NAME = "statistics.json"
TABLE_NAME = "labels.json"
MASKS_DIR = "masks"
DISCLAIMER = "research use only; not a medical device, not for diagnosis"
#: At most this many components of one lesion-like mask are described, the largest first.
MAX_LESIONS_PER_MASK = 20
#: CT voxels above this (HU) are the body when the midline is estimated (air is -1000).
BODY_HU = -500.0
_LESION_WORDS = re.compile(
    r"\b(lesions?|tumou?rs?|nodules?|mass(es)?|cysts?|metasta\w*|cancers?|carcinomas?|neoplasms?|hcc|polyps?)\b",
    re.IGNORECASE)
_CONNECTIVITY_26 = ndimage.generate_binary_structure(3, 3)


@dataclass(frozen=True)
class NormalRange:
    """An approximate adult normal volume range: ``low_ml`` to ``high_ml`` mL, from ``source``."""

    low_ml: float
    high_ml: float
    source: str

    def compare(self, volume_ml: float) -> str:
        """``"below"``, ``"within"`` or ``"above"`` the range (edges are within)."""
        return "below" if volume_ml < self.low_ml else "above" if volume_ml > self.high_ml else "within"


_LIVER = NormalRange(1100.0, 2000.0, "Urata et al., Hepatology 1995; Heinemann et al., Liver Transpl Surg 1999 "
                     "(standard liver volume for BSA 1.6-2.2 m^2)")
_KIDNEY = NormalRange(100.0, 200.0, "Emamian et al., AJR 1993 (means about 134 mL right, 146 mL left)")
#: The module docstring's table: term -> approximate adult range.
NORMAL_VOLUME_RANGES_ML: dict[str, NormalRange] = {
    "liver": _LIVER,
    "spleen": NormalRange(107.0, 314.0, "Prassopoulos et al., Eur Radiol 1997 (CT, 140 adults)"),
    "kidney_left": _KIDNEY,
    "kidney_right": _KIDNEY,
}


@dataclass(frozen=True)
class MaskRef:
    """A mask a sentence states: the ``term`` (canonical name, the key of statistics.json),
    its ``label_value`` in labels.nii.gz, its DICOM SEG ``segment_number`` (``None`` without a
    SEG, or when the term has no segment), ``mask_file`` (relative to the segmentation folder)
    and, for a lesion, its ``component`` number (1 = the largest component of the mask)."""

    term: str
    label_value: int | None
    segment_number: int | None
    mask_file: str
    component: int | None = None


@dataclass(frozen=True)
class MeasurementRef:
    """A number a sentence states: ``key`` is a JSON pointer into ``statistics.json`` or
    ``report.json`` (``"statistics.json#/terms/liver/volume_ml"``), ``value`` the exact number
    there (or a list of numbers), ``unit``, and ``stated`` the text that appears in the sentence."""

    key: str
    value: float | list[float]
    unit: str
    stated: str


@dataclass(frozen=True)
class Sentence:
    """One sentence of the report and what grounds it.

    Attributes:
        id: ``"s1"``, ``"s2"``, ... in report order.
        section: ``"structures"``, ``"flags"``, ``"lesions"`` or ``"absent"``.
        text: the sentence.
        masks: the masks it states; the first is its subject.
        measurements: the numbers it states.
        labels: CT-RATE findings (volumed.text.labels) the extractor finds in ``text``.
        normal_range: the range it compares a volume with (``{"low_ml", "high_ml", "source",
            "comparison"}``), or ``None``.
    """

    id: str
    section: str
    text: str
    masks: tuple[MaskRef, ...]
    measurements: tuple[MeasurementRef, ...] = ()
    labels: tuple[str, ...] = ()
    normal_range: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Lesion:
    """One connected component of a lesion-like mask, on the image's grid.

    Attributes:
        id: ``"lesion1"``, ... in report order; term: the mask's term; component: 1 = largest.
        voxels, volume_ml: size (mL = voxels x voxel volume / 1000).
        size_mm: extent along the R-L, A-P and S-I world axes (mm), voxel edges included.
        centre_mm: RAS centre of mass (mm).
        mean_intensity: mean image value inside it (HU for CT); intensity_unit: ``"HU"`` or ``"intensity"``.
        organ: the present non-lesion term whose mask holds most of it (``None``: none does);
            organ_fraction: the share of its voxels inside that mask.
        side: ``"right"``, ``"left"`` or ``None`` (on the midline within a voxel).
        lobe: the lobe or segment term that holds most of it (lung lobes, liver segments), or ``None``.
    """

    id: str
    term: str
    component: int
    voxels: int
    volume_ml: float
    size_mm: tuple[float, float, float]
    centre_mm: tuple[float, float, float]
    mean_intensity: float | None
    intensity_unit: str
    organ: str | None
    organ_fraction: float
    side: str | None
    lobe: str | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StructuredReport:
    """What :func:`build_structured_report` made: ``sentences`` (findings, each grounded) and
    ``notes`` (method lines without masks), plus the lesions and report-level CT-RATE labels."""

    image: str | None
    modality: str
    segmentation_dir: str
    threshold: float | None
    model: dict | None
    sentences: tuple[Sentence, ...]
    lesions: tuple[Lesion, ...]
    notes: tuple[str, ...]
    labels: dict[str, int]
    normal_ranges: dict[str, dict] = field(default_factory=dict)

    def by_term(self) -> dict[str, list[Sentence]]:
        """Sentences grouped by their subject term (the first mask), in report order."""
        out: dict[str, list[Sentence]] = {}
        for s in self.sentences:
            out.setdefault(s.masks[0].term, []).append(s)
        return out

    def text(self) -> str:
        """``report.txt``: a header, then one sentence per line under section titles, then the notes."""
        titles = {"structures": "Structures", "flags": "Flags", "lesions": "Lesions", "absent": "Absent structures"}
        lines = [f"volumed structured report ({DISCLAIMER})",
                 f"image: {self.image or 'unknown'} ({self.modality})",
                 f"segmentation: {self.segmentation_dir}"]
        if self.model:
            lines.append(f"model: {self.model.get('path')} (version {self.model.get('version')})")
        for section, title in titles.items():
            part = [s.text for s in self.sentences if s.section == section]
            if part:
                lines += ["", f"{title}:", *part]
        lines += ["", "Notes:", *self.notes]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        """``report.json``: sentences -> masks, measurements, labels; lesions; notes; report-level labels."""
        return {
            "image": self.image,
            "modality": self.modality,
            "segmentation_dir": self.segmentation_dir,
            "threshold": self.threshold,
            "model": self.model,
            "sentences": [s.to_dict() for s in self.sentences],
            "lesions": [lesion.to_dict() for lesion in self.lesions],
            "normal_ranges": self.normal_ranges,
            "notes": list(self.notes),
            "labels": self.labels,
            "text": self.text(),
        }


# ------------------------------------------------------------------------------------ reading


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise VolumedError(f"no {what} here; is this a volumed segment output folder?", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise VolumedError(f"{what} is not UTF-8 (byte {err.start})", path) from err
    except json.JSONDecodeError as err:
        raise VolumedError(f"{what} is not valid JSON (line {err.lineno}: {err.msg})", path) from err
    if not isinstance(data, dict):
        raise VolumedError(f"{what} must hold a JSON object", path)
    return data


def read_statistics(segmentation_dir: str | Path) -> dict:
    """``statistics.json`` of a ``volumed segment`` folder, checked for what the report uses.

    Raises:
        VolumedError: missing, not UTF-8, not JSON, or an entry without ``present``/``volume_ml``.
    """
    path = Path(segmentation_dir) / STATISTICS_NAME
    stats = _read_json(path, "statistics.json")
    terms = stats.get("terms")
    if not isinstance(terms, dict) or not terms:
        raise VolumedError("statistics.json lists no terms", path)
    for name, entry in terms.items():
        missing = [k for k in ("present", "volume_ml", "voxels") if not isinstance(entry, dict) or k not in entry]
        if missing:
            raise VolumedError(f"statistics.json: term {name!r} lacks {', '.join(missing)}", path)
    if "shape" not in stats:
        raise VolumedError("statistics.json has no image shape", path)
    return stats


def is_lesion_like(name: str) -> bool:
    """Whether a term names a lesion (lesion, tumour, nodule, mass, cyst, metastasis, carcinoma,
    neoplasm, HCC, polyp): ``kidney_cyst_left`` and ``"liver tumor"`` are, ``liver`` is not."""
    return bool(_LESION_WORDS.search(re.sub(r"[_\s]+", " ", name)))


# ------------------------------------------------------------------------------------ wording


def _readable(name: str) -> str:
    """``kidney_left`` -> "left kidney" (the vocabulary's display name), free text as given."""
    from volumed.data.vocab import default_vocabulary

    vocab = default_vocabulary()
    return vocab.term(name).display_name if name in vocab else re.sub(r"[_\s]+", " ", name).strip()


def _ml(v: float) -> str:
    from volumed.inference.stats import ml_text  # lazy, as compute_statistics below

    return ml_text(v)  # 0.04 mL is not 0.0


def _num(v: float, digits: int = 1) -> str:
    return f"{v:.{digits}f}"


def _range_text(r: NormalRange) -> str:
    return f"{r.low_ml:g}-{r.high_ml:g} mL"


def _pointer(*parts: object) -> str:
    """A JSON pointer (RFC 6901: ``~`` -> ``~0``, ``/`` -> ``~1``)."""
    return "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def _stat_ref(name: str, *path: str) -> str:
    return "statistics.json#" + _pointer("terms", name, *path)


# ------------------------------------------------------------------------------------ building


def _touches_edge(entry: Mapping, shape: Sequence[int]) -> bool:
    box = entry.get("bbox_voxels")
    if not box:
        return False
    lo, hi = box
    return any(a <= 0 or b >= n - 1 for a, b, n in zip(lo, hi, shape))


def _midline_x(image: Volume) -> float:
    """RAS x (mm) of the body's midline: the mean x of the body voxels (CT, above BODY_HU), else
    of the image's centre."""
    if image.modality == "CT":
        body = np.asarray(image.data) > BODY_HU
        if body.any():
            # x is linear in the voxel index, so the mean x of the voxels is the x of their mean index.
            return float(image.voxel_to_world(np.asarray([ndimage.center_of_mass(body)]))[0, 0])
    centre = (np.asarray(image.shape, dtype=float) - 1) / 2
    return float(image.voxel_to_world(centre[None])[0, 0])


def _side_of_name(name: str) -> str | None:
    m = re.search(r"(?:^|_)(left|right)(?:_|$)", name)
    return m.group(1) if m else None


def _lobe_of_name(name: str) -> str | None:
    """``lung_upper_lobe_right`` -> "upper lobe"; ``liver_segment_4`` -> "segment 4"; else None."""
    m = re.search(r"(upper|middle|lower)_lobe", name)
    if m:
        return f"{m.group(1)} lobe"
    m = re.search(r"segment_?(\w+)$", name)
    return f"segment {m.group(1)}" if m else None


def _organ_of_name(name: str) -> str:
    """``lung_upper_lobe_right`` -> "right lung"; otherwise the readable name."""
    m = re.fullmatch(r"lung_(?:upper|middle|lower)_lobe_(left|right)", name)
    return f"{m.group(1)} lung" if m else _readable(name)


def _load_mask(segmentation_dir: Path, name: str, image: Volume) -> np.ndarray:
    from volumed.inference.segment import mask_file_name
    from volumed.io import read_label

    path = segmentation_dir / MASKS_DIR / f"{mask_file_name(name)}.nii.gz"
    if not path.is_file():
        raise VolumedError(f"the mask of {name!r} is missing from the segmentation folder", path)
    return np.asarray(read_label(path, image).data) > 0


def _find_lesions(segmentation_dir: Path, image: Volume, terms: Mapping[str, Mapping], lesion_terms: Sequence[str],
                  ) -> list[Lesion]:
    """Components of each present lesion-like mask, largest first, located in the organ masks."""
    from volumed.inference.stats import compute_statistics

    if not lesion_terms:
        return []
    organs = [n for n, e in terms.items() if e["present"] and n not in lesion_terms]
    organ_masks = {n: _load_mask(segmentation_dir, n, image) for n in organs}
    midline = _midline_x(image)
    out: list[Lesion] = []
    for name in lesion_terms:
        mask = _load_mask(segmentation_dir, name, image)
        labels, n = ndimage.label(mask, structure=_CONNECTIVITY_26)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        order = np.argsort(-sizes, kind="stable")[:MAX_LESIONS_PER_MASK]
        for rank, k in enumerate(order, start=1):
            component = labels == (k + 1)
            stats = compute_statistics(component, image, name)  # the same measurement as statistics.json
            (r0, a0, s0), (r1, a1, s1) = stats.bbox_mm
            centre = image.voxel_to_world(np.asarray([ndimage.center_of_mass(component)]))[0]
            overlaps = {o: int(np.count_nonzero(m & component)) for o, m in organ_masks.items()}
            inside = {o: c for o, c in overlaps.items() if c}
            lobe_terms = {o: c for o, c in inside.items() if _lobe_of_name(o)}
            organ_terms = {o: c for o, c in inside.items() if not _lobe_of_name(o)}
            lobe = max(lobe_terms, key=lobe_terms.get) if lobe_terms else None
            organ = max(organ_terms, key=organ_terms.get) if organ_terms else lobe
            side = _side_of_name(organ or "") or _side_of_name(lobe or "") or _side_of_name(name)
            if side is None:
                dx = float(centre[0]) - midline  # RAS: +x is the patient's right
                side = None if abs(dx) < min(image.spacing) else ("right" if dx > 0 else "left")
            out.append(Lesion(
                id=f"lesion{len(out) + 1}", term=name, component=rank, voxels=stats.voxels,
                volume_ml=stats.volume_ml, size_mm=(r1 - r0, a1 - a0, s1 - s0),
                centre_mm=tuple(float(c) for c in centre),  # type: ignore[arg-type]
                mean_intensity=stats.intensity.mean, intensity_unit=stats.intensity.unit,
                organ=organ, organ_fraction=(inside[organ] / stats.voxels) if organ else 0.0, side=side, lobe=lobe,
            ))
    return out


def build_structured_report(
    segmentation_dir: str | Path,
    image: Volume,
    *,
    segment_numbers: Mapping[str, int] | None = None,
) -> StructuredReport:
    """The structured report of one ``volumed segment`` output folder (module docstring).

    Args:
        segmentation_dir: the folder (statistics.json, labels.json, masks/).
        image: the segmented image (``read_volume``), on the masks' grid.
        segment_numbers: term -> DICOM SEG segment number (what the SEG holds), if any.

    Raises:
        VolumedError: statistics.json missing or malformed, a mask file missing.
        ConfigError: ``image`` is not the grid statistics.json was measured on.
    """
    from volumed.text.labels import ABNORMALITIES, label_report

    seg_dir = Path(segmentation_dir)
    stats = read_statistics(seg_dir)
    if tuple(stats["shape"]) != tuple(image.shape):
        raise ConfigError(f"the image is {' x '.join(map(str, image.shape))} voxels but statistics.json was measured "
                          f"on {' x '.join(map(str, stats['shape']))}: not the segmented image", seg_dir / STATISTICS_NAME)
    from volumed.inference.segment import LABELS_NAME

    if (seg_dir / LABELS_NAME).is_file():  # same shape is not enough: the grid must be the same in space
        import nibabel as nib

        labels_affine = nib.load(seg_dir / LABELS_NAME).affine
        if not np.allclose(labels_affine, image.affine, atol=1e-3):
            raise ConfigError("the image has the segmentation's shape but not its position, orientation or spacing "
                              "(labels.nii.gz's affine differs): not the segmented image", seg_dir / LABELS_NAME)
    table_path = seg_dir / TABLE_NAME
    model = _read_json(table_path, "labels.json").get("model") if table_path.is_file() else None
    terms: dict[str, dict] = stats["terms"]
    shape = stats["shape"]
    threshold = stats.get("threshold")
    numbers = dict(segment_numbers or {})

    def ref(name: str, component: int | None = None) -> MaskRef:
        from volumed.inference.segment import mask_file_name

        e = terms[name]
        return MaskRef(name, e.get("value"), numbers.get(name), f"{MASKS_DIR}/{mask_file_name(name)}.nii.gz", component)

    drafts: list[tuple[str, str, tuple[MaskRef, ...], tuple[MeasurementRef, ...], dict | None]] = []
    ranges_used: dict[str, dict] = {}
    lesion_terms = [n for n, e in terms.items() if e["present"] and is_lesion_like(n)]

    # Present structures: volume against its range, attenuation, confidence.
    for name, e in terms.items():
        if not e["present"] or name in lesion_terms:
            continue
        title = _readable(name)
        vol = float(e["volume_ml"])
        meas = [MeasurementRef(_stat_ref(name, "volume_ml"), vol, "mL", f"{_ml(vol)} mL")]
        text = f"The {title} measures {_ml(vol)} mL"
        normal = NORMAL_VOLUME_RANGES_ML.get(name)
        comparison = None
        cut = _touches_edge(e, shape)
        if cut:
            text += ", but it reaches the edge of the scanned volume, so only part of it was measured"
            if normal:
                text += f" and the volume is not compared with the approximate adult range of {_range_text(normal)}"
                comparison = {"low_ml": normal.low_ml, "high_ml": normal.high_ml, "source": normal.source,
                              "comparison": "not compared: cut by the field of view"}
        elif normal:
            verdict = normal.compare(vol)
            text += f", {verdict} the approximate adult range of {_range_text(normal)}"
            comparison = {"low_ml": normal.low_ml, "high_ml": normal.high_ml, "source": normal.source,
                          "comparison": verdict}
        if normal:
            ranges_used[name] = {"low_ml": normal.low_ml, "high_ml": normal.high_ml, "source": normal.source}
        intensity = e.get("intensity") or {}
        if intensity.get("mean") is not None:
            mean = float(intensity["mean"])
            unit = intensity.get("unit", "HU")
            if unit == "HU":
                text += f"; mean attenuation {_num(mean)} HU"
                meas.append(MeasurementRef(_stat_ref(name, "intensity", "mean"), mean, "HU", f"{_num(mean)} HU"))
            else:
                text += f"; mean intensity {_num(mean)} (arbitrary units)"
                meas.append(MeasurementRef(_stat_ref(name, "intensity", "mean"), mean, "arbitrary", _num(mean)))
        if e.get("confidence") is not None:
            conf = float(e["confidence"])
            text += f"; model confidence {_num(conf, 2)}"
            meas.append(MeasurementRef(_stat_ref(name, "confidence"), conf, "1", _num(conf, 2)))
        if not e.get("trained", True):
            text += "; the model was not trained on this structure, so its mask means little"
        drafts.append(("structures", text + ".", (ref(name),), tuple(meas), comparison))

    # Flags: a mean HU that does not fit the structure's tissue. Not for lesions: hu_check takes
    # the tissue from the name, so a "lung nodule" would be held to aerated lung's range.
    for name, e in terms.items():
        check = e.get("hu_check")
        if not e["present"] or not check or check.get("plausible", True) or name in lesion_terms:
            continue
        mean = float(e["intensity"]["mean"])
        low, high = (float(v) for v in check["expected_hu"])
        text = (f"The {_readable(name)} mask's mean attenuation of {_num(mean)} HU is implausible for {check['tissue']} "
                f"(expected {low:g} to {high:g} HU): the mask probably lies on another structure.")
        meas = (MeasurementRef(_stat_ref(name, "intensity", "mean"), mean, "HU", f"{_num(mean)} HU"),
                MeasurementRef(_stat_ref(name, "hu_check", "expected_hu"), [low, high], "HU", f"{low:g} to {high:g} HU"))
        drafts.append(("flags", text, (ref(name),), meas, None))

    # Lesions: components of the lesion-like masks.
    lesions = _find_lesions(seg_dir, image, terms, lesion_terms)
    for i, lesion in enumerate(lesions):
        pointer = "report.json#" + _pointer("lesions", i)
        size = " x ".join(_num(s) for s in lesion.size_mm)
        text = (f"Lesion {i + 1} ({_readable(lesion.term)}, component {lesion.component}) measures {_ml(lesion.volume_ml)} mL "
                f"and {size} mm (right-left x anterior-posterior x superior-inferior)")
        meas = [MeasurementRef(pointer + "/volume_ml", lesion.volume_ml, "mL", f"{_ml(lesion.volume_ml)} mL"),
                MeasurementRef(pointer + "/size_mm", list(lesion.size_mm), "mm", f"{size} mm")]
        if lesion.mean_intensity is not None:
            unit = "HU" if lesion.intensity_unit == "HU" else ""
            stated = f"{_num(lesion.mean_intensity)} HU" if unit else _num(lesion.mean_intensity)
            text += f", mean {'attenuation' if unit else 'intensity'} {stated}"
            meas.append(MeasurementRef(pointer + "/mean_intensity", lesion.mean_intensity, unit or "arbitrary", stated))
        masks = [ref(lesion.term, lesion.component)]
        if lesion.organ:
            where = _organ_of_name(lesion.organ)
            text += f", in the {where}"
            if lesion.lobe and lesion.lobe != lesion.organ:
                text += f", {_lobe_of_name(lesion.lobe)}"
                masks.append(ref(lesion.lobe))
            elif lesion.lobe:
                text += f", {_lobe_of_name(lesion.lobe)}"
            masks.insert(1, ref(lesion.organ))
            if lesion.side and lesion.side not in where:
                text += f", {lesion.side} side"
        else:
            text += ", outside every segmented organ" + (f", {lesion.side} of the midline" if lesion.side else ", on the midline")
        drafts.append(("lesions", text + ".", tuple(dict.fromkeys(masks)), tuple(meas), None))

    # Absent structures, each with its evidence.
    for name, e in terms.items():
        if e["present"]:
            continue
        title = _readable(name)
        rejected = e.get("rejected")
        if rejected:
            if rejected.get("rule") == "anatomy":
                from volumed.inference.stats import anatomy_conflict_text

                where = anatomy_conflict_text(rejected, _readable, "the ")
                text = (f"The {title} is reported absent: the only candidate was a {_ml(rejected['volume_ml'])} mL region at "
                        f"mean probability {_num(rejected['confidence'], 2)} {where}.")
            elif rejected.get("rule") == "outside_body":
                text = (f"The {title} is reported absent: the only candidate was a {_ml(rejected['volume_ml'])} mL region at "
                        f"mean probability {_num(rejected['confidence'], 2)}, all of it outside the patient's body.")
            elif rejected.get("rule") == "hu":
                from volumed.inference.stats import hu_rejection_text

                text = (f"The {title} is reported absent: the only candidate was a {_ml(rejected['volume_ml'])} mL region at "
                        f"mean probability {_num(rejected['confidence'], 2)} {hu_rejection_text(rejected)}.")
            else:
                text = (f"The {title} is reported absent: the only candidate was a {_ml(rejected['volume_ml'])} mL region at "
                        f"mean probability {_num(rejected['confidence'], 2)}, under the model's presence rule "
                        f"({rejected['min_ml']:g} mL and {_num(rejected['min_confidence'], 2)}).")
            meas = (MeasurementRef(_stat_ref(name, "rejected", "volume_ml"), float(rejected["volume_ml"]), "mL",
                                   f"{_ml(rejected['volume_ml'])} mL"),
                    MeasurementRef(_stat_ref(name, "rejected", "confidence"), float(rejected["confidence"]), "1",
                                   _num(rejected["confidence"], 2)))
        else:
            bound = e.get("max_probability_bound")
            if bound is None:
                text = f"The {title} is absent: the model found no voxel above the threshold."
                meas = ()
            else:
                text = (f"The {title} is absent: the model's probability is at most {_num(bound, 2)} everywhere in the "
                        f"scan" + (f" (threshold {threshold:g})." if threshold is not None else "."))
                meas = (MeasurementRef(_stat_ref(name, "max_probability_bound"), float(bound), "1", _num(bound, 2)),)
        if not e.get("trained", True):
            text = text[:-1] + "; the model was not trained on this structure."
        drafts.append(("absent", text, (ref(name),), meas, None))

    sentences = tuple(
        Sentence(f"s{i}", section, text, masks, meas, tuple(label_report(text).positives()), comparison)
        for i, (section, text, masks, meas, comparison) in enumerate(drafts, start=1)
    )
    notes = [
        "Each sentence's masks and measurements are listed in report.json; the numbers are those of statistics.json.",
        "Normal ranges are approximate adult ranges from published series (docs/reports.md); they depend on body "
        "size, sex and age.",
        "Confidence is the model's mean probability inside the mask, not a measured accuracy.",
    ]
    if not lesion_terms:
        notes.append("No lesion mask was segmented, so lesions were not assessed.")
    whole = "\n".join(s.text for s in sentences)
    report_labels = label_report(whole).labels
    return StructuredReport(
        image=stats.get("image"),
        modality=str(stats.get("modality", image.modality)),
        segmentation_dir=str(seg_dir),
        threshold=threshold,
        model=model,
        sentences=sentences,
        lesions=tuple(lesions),
        notes=tuple(notes),
        labels={name: int(report_labels[name]) for name in ABNORMALITIES},
        normal_ranges=ranges_used,
    )
