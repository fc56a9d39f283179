"""Data of the text-prompted segmenter's partial-label training: datalist, cases, patches.

Every case brings its *own* set of annotated terms: one scan has a 41-class TotalSegmentator map,
another a 31-class one, a third only a few binary masks. The rule that makes such data usable
together (the partial-label rule of SAT, Zhao et al. 2023, and of DoDNet/CLIP-Driven Universal
Model): **a term contributes to the loss of a case only if the case annotates it.** An annotated
term that is absent from a patch is a true negative (all-zero target); a term the case does not
annotate is *unknown* there and never used, neither as positive nor as negative, because the
structure may well be in the image, unlabelled. Terms listed under ``absent`` are annotated as
absent from the whole scan (e.g. a prostate in a female patient) and are always negatives.

Datalist: label-set styles
--------------------------
The datalist is an MSD JSON or a CSV read by :func:`volumed.data.datalist.load_datalist`; each
entry uses exactly one of two label styles (paths relative to the datalist, or its ``dataroot``):

* **label map** -- ``label``: a multi-label map holding TotalSegmentator ids of the entry's modality
  (``total`` task for CT, ``total_mr`` for MR); ``terms`` (optional): the annotated structures, as
  canonical names or synonyms (``"left kidney"``), group terms allowed (``kidney`` = union of both
  kidneys). Without ``terms``, the annotated set is every vocabulary class whose id occurs in the
  map. A listed term whose ids do not occur is annotated-absent (a negative everywhere).
* **binary masks** -- ``masks``: ``{term: mask_path}`` (JSON object; in a CSV column
  ``term=path; term=path``), each mask non-zero inside the structure. A mask on another grid
  than the image (e.g. TotalSegmentator's ``heart.nii.gz`` of the pulmonary crop) is resampled onto
  the image grid in world space (nearest neighbour, :func:`volumed.io.read_label`). Free-text
  names (``pulmonary artery``) are accepted only with ``allow_free_text=True``.
* ``absent`` (optional, either style): terms known to be absent from the whole scan.
* ``exclusive`` (optional, ``true``/``false``): the entry's masks come from one labelling in which a
  voxel belongs to at most one structure (TotalSegmentator's one-hot outputs, a manual label map).
  A voxel inside any of its masks is then known *not* to be any other vocabulary structure, so a
  term the entry does not annotate can still be trained as a negative there (and only there):
  ``PromptSegModule(exclusive_negatives=k)``. Without it, unannotated terms are never used.

JSON example::

    {"dataroot": "../../../shared/data", "modality": {"0": "CT"},
     "training": [
       {"image": "totalsegmentator_ct_sm/example_ct_sm.nii.gz", "label": "totalsegmentator_ct_sm/example_seg.nii.gz"},
       {"image": "thorax/ct.nii.gz", "masks": {"heart": "thorax/heart.nii.gz"}, "absent": ["brain"]}]}

Every problem (unknown term, a term of the wrong modality, both or neither style, a missing mask
file, a malformed ``masks``) is reported at once in one :class:`~volumed.errors.DatalistError`.

Training data flow (``T`` = all terms of the data set, ``B`` = batch, ``(px, py, pz)`` = patch)::

    case: read -> preprocess (RAS, spacing, body crop, intensity to [0, 1]) -> image (1, x, y, z),
          masks (K, x, y, z) of its K annotated terms -> cached in memory
    sample: pad to the patch, foreground-biased crop (MONAI RandCropByLabelClassesd: each present
          structure equally often), optional rotation, scaling and intensity augmentation
          (``augment``) -> image (1, px, py, pz), target (T, px, py, pz), annotated (T,)
    step: terms used = annotated & (present in the patch | sampled negative), union over the batch
          -> text embeddings (precomputed once) -> logits (B, T_used, px, py, pz)
          -> PartialLabelLoss (Dice on positives + BCE on every used pair)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from monai.data import DataLoader, MetaTensor
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandCropByLabelClassesd,
    RandCropByPosNegLabeld,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from torch.utils.data import Dataset, RandomSampler

from volumed.data.ct_augment import POOL_TISSUES, BoxCrop, ContrastPhase, FieldOfView, region_of
from volumed.data.ct_augment import slice_thickness as slice_thickness_transform
from volumed.data.datalist import DatalistEntry, load_datalist, split_terms
from volumed.data.hu_priors import tissue_of
from volumed.data.synthesis import BODY_CLASSES, CTSynthesizer, LabelMapCase, load_label_map_case
from volumed.data.transforms import PAD_MODES, PreprocessConfig, build_preprocessing, pad_spatial
from volumed.data.vocab import Vocabulary, default_vocabulary
from volumed.errors import ConfigError, DatalistError, UnknownTermError
from volumed.io import read_label, read_volume
from volumed.io.volume import Volume

__all__ = [
    "LabelSource",
    "PromptSegCase",
    "PromptSegDataModule",
    "PromptSegPatchDataset",
    "SyntheticSource",
    "load_case",
    "load_promptseg_datalist",
    "load_synthetic_case",
    "load_synthetic_sources",
    "patch_augmentation",
    "phantom_cases",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Datalist: what each case annotates
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelSource:
    """One datalist entry resolved: where its image and labels are and which terms it annotates.

    Attributes:
        image: image file or DICOM folder.
        modality: ``"CT"`` or ``"MR"``.
        terms: annotated terms, canonical names (or free text), in a fixed order.
        label_map: the TotalSegmentator-id label map (label-map style), else ``None``.
        label_ids: for each term, the ids whose union is it in ``label_map`` (label-map style).
        masks: for each term, its binary mask file (binary-mask style), else empty.
        absent: terms annotated as absent from the whole scan (part of ``terms`` too).
        exclusive: the masks are mutually exclusive (one structure per voxel): inside them, the
            terms the entry does not annotate are known negatives.
        where: the entry's position in the datalist, for messages.
    """

    image: Path
    modality: str
    terms: tuple[str, ...]
    label_map: Path | None = None
    label_ids: tuple[tuple[int, ...], ...] = ()
    masks: tuple[Path, ...] = ()
    absent: tuple[str, ...] = ()
    exclusive: bool = False
    where: str = ""


def _parse_masks(value: Any) -> dict[str, str] | str:
    """``masks`` of an entry as ``{term: path}``, or a problem description."""
    if isinstance(value, Mapping):
        if not value or not all(isinstance(k, str) and isinstance(v, str) and v.strip() for k, v in value.items()):
            return f"'masks' must map term names to mask paths, got {dict(value)!r}"
        return {k: v.strip() for k, v in value.items()}
    if isinstance(value, str):  # CSV: "term=path; term=path"
        out: dict[str, str] = {}
        for part in split_terms(value):
            name, sep, path = part.partition("=")
            if not sep or not name.strip() or not path.strip():
                return f"'masks' cell must read 'term=path; term=path', got {value!r}"
            out[name.strip()] = path.strip()
        return out or f"'masks' is empty: {value!r}"
    return f"'masks' must be an object {{term: mask_path}} (or 'term=path; ...' in CSV), got {type(value).__name__}"


def _data_base(path: Path) -> Path:
    """Folder that relative paths of ``path`` resolve against (as :func:`load_datalist` does)."""
    folder = path.absolute().parent
    if path.suffix.lower() == ".json":
        try:
            root = json.loads(path.read_text(encoding="utf-8-sig")).get("dataroot")
        except (OSError, ValueError, AttributeError):
            root = None
        if isinstance(root, str) and root.strip():
            return folder / Path(root).expanduser()
    return folder


def load_promptseg_datalist(
    path: str | Path,
    *,
    section: str = "training",
    default_modality: str = "CT",
    allow_free_text: bool = False,
    vocabulary: Vocabulary | None = None,
) -> list[LabelSource]:
    """Read a datalist and resolve each entry's label style and annotated terms (module docstring).

    Raises:
        DatalistError: listing every problem with its entry (plus everything
            :func:`load_datalist` reports).
    """
    path = Path(path)
    entries = load_datalist(path, section=section)
    vocab = vocabulary or default_vocabulary()
    base = _data_base(path)
    problems: list[str] = []
    sources: list[LabelSource] = []
    for entry in entries:
        where = f"{section}[{entry.row}]" if path.suffix.lower() == ".json" else f"row {entry.row}"
        src = _resolve_entry(entry, where, base, vocab, default_modality, allow_free_text, problems)
        if src is not None:
            sources.append(src)
    if problems:
        raise DatalistError(problems, path)
    return sources


def restrict_terms(sources: Sequence[LabelSource], terms: Sequence[str], where: str | Path = "terms") -> list[LabelSource]:
    """Keep only ``terms`` (canonical names or free text, as the datalist resolved them) of each
    source; a source annotating none of them is dropped. Every term must be annotated somewhere.

    Raises:
        ConfigError: a term no source annotates (the message lists what they do annotate).
    """
    wanted = list(dict.fromkeys(terms))
    known = sorted({t for s in sources for t in s.terms})
    missing = [t for t in wanted if t not in known]
    if missing:
        raise ConfigError(f"term(s) {missing} are annotated by no datalist entry; annotated: {known}", where)
    out = []
    for s in sources:
        keep = [k for k, t in enumerate(s.terms) if t in wanted]
        if not keep:
            continue
        n_masks = len(s.masks)  # mask-style: one file per term that is not listed absent
        out.append(replace(
            s,
            terms=tuple(s.terms[k] for k in keep),
            label_ids=tuple(s.label_ids[k] for k in keep) if s.label_map is not None else (),
            masks=tuple(s.masks[k] for k in keep if k < n_masks) if s.label_map is None else (),
            absent=tuple(t for t in s.absent if t in wanted),
        ))  # fmt: skip
    return out


@dataclass(frozen=True)
class ValidationCase:
    """A whole scan and its reference masks on its original grid, for validation Dice through the
    path of ``volumed segment`` (:func:`volumed.tasks.promptseg.predict_probabilities`).

    Attributes:
        name: the image path.
        volume: the image as read.
        terms: the annotated terms.
        masks: ``(K, X, Y, Z)`` bool, one per term, on the volume's grid (all False: absent).
    """

    name: str
    volume: Volume
    terms: tuple[str, ...]
    masks: np.ndarray


def load_validation_case(source: LabelSource, volume: Volume | None = None) -> ValidationCase:
    """Read a datalist entry as a :class:`ValidationCase` (label-map ids or mask files on the image
    grid); ``volume``: the entry's image when already read."""
    if volume is None:
        volume = read_volume(source.image, modality=source.modality)
    if source.label_map is not None:
        ids = np.asarray(read_label(source.label_map, reference=volume).data)
        terms, label_ids = source.terms, source.label_ids
        if len(terms) == len(source.absent):  # no 'terms': every class of the map
            present = _classes_in_map(ids, source.modality)
            terms, label_ids = tuple(present) + terms, tuple((i,) for i in present.values()) + label_ids
        masks = np.stack([np.isin(ids, list(i)) if i else np.zeros(ids.shape, bool) for i in label_ids])
    else:
        terms = source.terms
        stack = [np.asarray(read_label(m, reference=volume).data) > 0 for m in source.masks]
        stack += [np.zeros(volume.shape, bool)] * len(source.absent)
        masks = np.stack(stack)
    return ValidationCase(str(source.image), volume, tuple(terms), masks)


def _resolve_term(
    text: str, modality: str, vocab: Vocabulary, allow_free_text: bool, where: str, problems: list[str],
    free_text_hint: str = "set allow_free_text to train free text",
) -> str | None:
    try:
        return vocab.resolve(text, modality, allow_free_text=allow_free_text).name
    except UnknownTermError as err:
        hint = ", ".join(err.suggestions)
        problems.append(f"{where}: unknown term {text!r} (nearest: {hint}; {free_text_hint})")
    except ConfigError as err:
        problems.append(f"{where}: term {text!r}: {err}")
    return None


def _resolve_entry(
    entry: DatalistEntry,
    where: str,
    base: Path,
    vocab: Vocabulary,
    default_modality: str,
    allow_free_text: bool,
    problems: list[str],
) -> LabelSource | None:
    modality = entry.modality or default_modality
    n_before = len(problems)
    masks_value = entry.extra.get("masks")
    if masks_value is not None and not (isinstance(masks_value, str) and not masks_value.strip()):
        if entry.label is not None:
            problems.append(f"{where}: give either 'label' (a TotalSegmentator-id map) or 'masks' (binary masks), not both")
            return None
        parsed = _parse_masks(masks_value)
        if isinstance(parsed, str):
            problems.append(f"{where}: {parsed}")
            return None
        terms, masks = [], []
        for text, mask in parsed.items():
            name = _resolve_term(text, modality, vocab, allow_free_text, where, problems)
            mask_path = Path(mask).expanduser()
            mask_path = mask_path if mask_path.is_absolute() else base / mask_path
            if not mask_path.is_file():
                problems.append(f"{where}: mask of {text!r} does not exist ({mask_path})")
            if name is not None and name in terms:
                problems.append(f"{where}: two masks for term {name!r}")
            if name is not None:
                terms.append(name)
                masks.append(mask_path.absolute())
        label_map, label_ids = None, ()
    elif entry.label is not None:
        label_map, masks = entry.label, []
        terms = []
        if entry.terms:
            for text in entry.terms:
                # A label map's ids are TotalSegmentator's: free text can never index it.
                name = _resolve_term(text, modality, vocab, False, where, problems,
                                     "a label map's terms must be vocabulary terms; free text needs 'masks' ({term: mask})")
                if name is not None and name not in terms:
                    terms.append(name)
        label_ids = tuple(vocab.label_ids(t, modality) for t in terms)
    else:
        problems.append(f"{where}: no labels: give 'label' (a TotalSegmentator-id map) or 'masks' ({{term: mask}})")
        return None
    absent = [
        n
        for n in (_resolve_term(t, modality, vocab, allow_free_text, where, problems) for t in split_terms(entry.extra.get("absent")))
        if n is not None
    ]
    for name in absent:
        if name in terms:
            problems.append(f"{where}: term {name!r} is both annotated and listed as absent")
    exclusive = entry.extra.get("exclusive", False)
    if not isinstance(exclusive, bool):
        problems.append(f"{where}: 'exclusive' must be true or false, got {exclusive!r}")
    if len(problems) > n_before:
        return None
    return LabelSource(
        image=entry.image,
        modality=modality,
        terms=tuple(terms) + tuple(absent),
        label_map=label_map,
        label_ids=tuple(label_ids) + ((),) * len(absent) if label_map is not None else (),
        masks=tuple(masks),
        absent=tuple(absent),
        exclusive=bool(exclusive),
        where=where,
    )


# --------------------------------------------------------------------------------------------
# Label maps without images (section "synthetic"): what each one teaches
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSource:
    """One entry of a datalist's ``synthetic`` section resolved: a label map (no image) that
    training patches are synthesised from (:mod:`volumed.data.synthesis`).

    Attributes:
        name: the entry's ``name`` (default: the label map's folder or file name).
        files: the :func:`volumed.data.synthesis.read_structures` keywords (absolute paths).
        terms: annotated terms, canonical names.
        term_structures: for each term, the structure names (as in the source) whose union is
            it; empty: the term is annotated absent.
        where: the entry's position, for messages.
    """

    name: str
    files: dict[str, Any]
    terms: tuple[str, ...]
    term_structures: tuple[tuple[str, ...], ...]
    where: str = ""


def _structure_names(files: Mapping[str, Any]) -> list[str]:
    """Structure names of a source without reading its volumes (file stems, keys, colour table)."""
    from volumed.data.synthesis import read_colour_table

    if "masks_dir" in files:
        folder = Path(files["masks_dir"])
        return sorted(f.name[: -len(".nii.gz")] if f.name.endswith(".nii.gz") else f.stem
                      for f in [*folder.glob("*.nii.gz"), *folder.glob("*.nii")])  # fmt: skip
    if "masks" in files:
        return sorted(files["masks"])
    table = files.get("colour_table")
    return sorted(read_colour_table(table).values()) if table else []


def load_synthetic_sources(
    path: str | Path, *, section: str = "synthetic", vocabulary: Vocabulary | None = None
) -> list[SyntheticSource]:
    """Read the label-map-only section of a JSON datalist (absent section: ``[]``).

    Each entry gives its label map in one of three styles, paths relative to the datalist's
    ``dataroot`` like the images:

    * ``masks_dir``: a folder of binary masks ``<structure>.nii.gz`` (a TotalSegmentator
      ``segmentations/`` folder);
    * ``masks``: ``{structure: mask file}``;
    * ``label`` + ``colour_table``: an integer map and its 3D Slicer colour table.

    Optional keys: ``name``; ``structure_terms`` ``{structure: term}`` for structures whose name is
    not a vocabulary term or synonym (``"postcava": "inferior_vena_cava"``; several structures may
    map to one term, whose mask is then their union); ``terms``: the annotated terms. Without
    ``terms`` every term that some structure maps to is annotated; with it, a listed term that
    no structure maps to is annotated *absent*, which is only right for a complete label map.
    Every structure is synthesised (each with its own intensity), mapped to a term or not.

    Raises:
        DatalistError: every problem at once (style, missing files, unknown terms).
    """
    path = Path(path)
    if path.suffix.lower() != ".json":
        return []
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as err:
        raise DatalistError([f"cannot read JSON: {err}"], path) from None
    entries = doc.get(section) if isinstance(doc, dict) else None
    if entries is None:
        return []
    vocab = vocabulary or default_vocabulary()
    base = _data_base(path)
    problems: list[str] = []
    sources: list[SyntheticSource] = []
    if not isinstance(entries, list):
        raise DatalistError([f"section {section!r} must be a list of entries"], path)
    for row, entry in enumerate(entries):
        where = f"{section}[{row}]"
        if not isinstance(entry, dict):
            problems.append(f"{where}: an entry must be an object, got {type(entry).__name__}")
            continue
        n_before = len(problems)
        styles = [k for k in ("masks_dir", "masks", "label") if entry.get(k)]
        if len(styles) != 1:
            problems.append(f"{where}: give exactly one of 'masks_dir', 'masks' or 'label' (+ 'colour_table'), got {styles or 'none'}")
            continue
        unknown = sorted(set(entry) - {"name", "masks_dir", "masks", "label", "colour_table", "structure_terms", "terms"})
        if unknown:
            problems.append(f"{where}: unknown keys {unknown}")

        def resolve(value: str) -> Path:
            p = Path(value).expanduser()
            return (p if p.is_absolute() else base / p).absolute()

        files: dict[str, Any] = {}
        if "masks_dir" in styles:
            files["masks_dir"] = resolve(entry["masks_dir"])
            if not files["masks_dir"].is_dir():
                problems.append(f"{where}: masks_dir does not exist ({files['masks_dir']})")
        elif "masks" in styles:
            parsed = _parse_masks(entry["masks"])
            if isinstance(parsed, str):
                problems.append(f"{where}: {parsed}")
            else:
                files["masks"] = {k: resolve(v) for k, v in parsed.items()}
                problems += [f"{where}: mask of {k!r} does not exist ({v})" for k, v in files["masks"].items() if not v.is_file()]
        else:
            files["label"] = resolve(entry["label"])
            if not files["label"].is_file():
                problems.append(f"{where}: label does not exist ({files['label']})")
            if entry.get("colour_table"):
                files["colour_table"] = resolve(entry["colour_table"])
                if not files["colour_table"].is_file():
                    problems.append(f"{where}: colour_table does not exist ({files['colour_table']})")
        if len(problems) > n_before:
            continue
        explicit = entry.get("structure_terms") or {}
        if not isinstance(explicit, dict):
            problems.append(f"{where}: 'structure_terms' must map structure names to terms")
            continue
        names = _structure_names(files)
        missing = sorted(set(explicit) - set(names))
        if missing:
            problems.append(f"{where}: structure_terms names structures the source does not have: {missing}")
        by_term: dict[str, list[str]] = {}
        for structure in names:
            if structure in explicit:
                term = _resolve_term(str(explicit[structure]), "CT", vocab, False, where, problems)
            else:
                term = vocab.lookup(structure)
                if term is not None and not vocab.label_ids(term, "CT"):
                    term = None
            if term is not None:
                by_term.setdefault(term, []).append(structure)
        if entry.get("terms") is not None:
            terms = []
            for text in split_terms(entry["terms"]):
                t = _resolve_term(text, "CT", vocab, False, where, problems)
                if t is not None and t not in terms:
                    terms.append(t)
        else:
            terms = sorted(by_term)
        if len(problems) > n_before:
            continue
        default_name = Path(str(files.get("masks_dir") or files.get("label") or next(iter(files["masks"].values())).parent))
        name = str(entry.get("name") or (default_name.parent.name if default_name.name == "segmentations" else default_name.name))
        sources.append(SyntheticSource(name, files, tuple(terms), tuple(tuple(by_term.get(t, ())) for t in terms), where))
    if problems:
        raise DatalistError(problems, path)
    return sources


def load_synthetic_case(source: SyntheticSource, config: PreprocessConfig, seed: int = 0, thighs: bool = False) -> PromptSegCase:
    """A :class:`SyntheticSource` in model space (:func:`volumed.data.synthesis.load_label_map_case`)
    as a training case whose image is drawn anew for every patch; ``thighs``: thighs drawn below a
    map that ends across both femoral shafts (:func:`volumed.data.synthesis.extend_thighs`)."""
    lm = load_label_map_case(name=source.name, terms=source.terms, term_structures=source.term_structures,
                             target_spacing=config.target_spacing, margin=int(np.max(config.margin)), seed=seed,
                             thighs=thighs, **source.files)  # fmt: skip
    structures = {n: lm.classes[0] == c for c, n in enumerate(lm.class_names) if c >= len(BODY_CLASSES)}
    regions = _regions(structures)
    return PromptSegCase(None, lm.masks(), lm.terms, "CT", f"synthetic:{source.name}", regions=regions, synthetic=lm)


# --------------------------------------------------------------------------------------------
# Cases in model space
# --------------------------------------------------------------------------------------------


@dataclass
class PromptSegCase:
    """One preprocessed training case: a real image with masks, or a label map to synthesise from.

    Attributes:
        image: ``(1, x, y, z)`` float32 in ``[0, 1]``, model space; ``None`` for a synthetic case.
        masks: ``(K, x, y, z)`` uint8, one channel per annotated term (all zero: absent).
        terms: the ``K`` annotated terms.
        modality: ``"CT"`` or ``"MR"``.
        name: where it came from (image path, phantom id, label-map source).
        pools: ``(P, x, y, z)`` uint8 blood-pool and enhancing-organ masks of a real CT, one per
            tissue (:data:`volumed.data.ct_augment.POOL_TISSUES`), for the contrast-phase
            augmentation; ``pool_tissues`` and ``pool_means`` (HU, over the case) go with them.
        regions: ``{"chest" | "abdomen" | "pelvis": (first, last)}`` 1-based model-space slices
            that the case's structures of that region span (field-of-view augmentation).
        synthetic: the label map an image is drawn from for every patch (``image`` is ``None``).
        exclusive: the masks are mutually exclusive (:attr:`LabelSource.exclusive`).
    """

    image: torch.Tensor | None
    masks: torch.Tensor
    terms: tuple[str, ...]
    modality: str
    name: str = ""
    pools: torch.Tensor | None = None
    pool_tissues: tuple[str, ...] = ()
    pool_means: tuple[float, ...] = ()
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)
    synthetic: LabelMapCase | None = None
    exclusive: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        """Model-space ``(x, y, z)``."""
        return tuple(int(s) for s in self.masks.shape[1:])  # type: ignore[return-value]


def _totalseg_channels(ids_map: torch.Tensor, label_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """``(x, y, z)`` id map -> ``(K, x, y, z)`` uint8, channel k = union of ``label_ids[k]``."""
    out = torch.zeros((len(label_ids), *ids_map.shape), dtype=torch.uint8)
    for k, ids in enumerate(label_ids):
        if ids:
            out[k] = torch.isin(ids_map, torch.as_tensor(list(ids), dtype=ids_map.dtype)).to(torch.uint8)
    return out


def _preprocess_with_masks(image: Volume, labels: torch.Tensor, config: PreprocessConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and a ``(C, X, Y, Z)`` label stack on its grid through the same pipeline (labels: nearest)."""
    pipeline = build_preprocessing(config)
    img = image.to_metatensor()
    meta = {k: v for k, v in img.meta.items() if k != "affine"}
    lab = MetaTensor(labels.to(torch.float32), affine=img.affine.clone(), meta=meta)
    out = pipeline({config.image_key: img, config.label_keys[0]: lab})
    return out[config.image_key].as_tensor().float(), out[config.label_keys[0]].as_tensor().round().to(torch.int32)


def _classes_in_map(ids: np.ndarray, modality: str) -> dict[str, int]:
    """TotalSegmentator class name -> id for every class id occurring in ``ids`` (ascending)."""
    from volumed.data.vocab import TOTALSEG_CT_CLASSES, TOTALSEG_MR_CLASSES

    names = TOTALSEG_CT_CLASSES if modality == "CT" else TOTALSEG_MR_CLASSES
    present = [int(i) for i in np.unique(ids) if 0 < i <= len(names)]
    return {names[i - 1]: i for i in present}


def _regions(named: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """``{region: (first, last)}``: the 1-based slices (last axis) spanned by the structures
    (``{name: (x, y, z) bool}``) that mark each body region (:func:`volumed.data.ct_augment.region_of`)."""
    regions: dict[str, tuple[int, int]] = {}
    for name, mask in named.items():
        region = region_of(name)
        if region is None or not bool(mask.any()):
            continue
        zs = mask.any(0).any(0).nonzero().flatten()
        a, b = int(zs.min()) + 1, int(zs.max()) + 1
        old = regions.get(region)
        regions[region] = (min(a, old[0]), max(b, old[1])) if old else (a, b)
    return regions


def _pools_and_regions(
    named: Mapping[str, torch.Tensor], image: torch.Tensor, ct_window: Sequence[float]
) -> tuple[torch.Tensor | None, tuple[str, ...], tuple[float, ...], dict[str, tuple[int, int]]]:
    """From a case's model-space structure masks ``{name: (x, y, z) bool}`` and its image
    ``(1, x, y, z)`` in ``[0, 1]``: the blood-pool masks (one per pool tissue, the union of its
    structures), their mean HU, and the slice span of each body region (1-based)."""
    lo, hi = float(ct_window[0]), float(ct_window[1])
    by_tissue: dict[str, torch.Tensor] = {}
    for name, mask in named.items():
        tissue = tissue_of(name)
        if tissue in POOL_TISSUES and bool(mask.any()):
            by_tissue[tissue] = by_tissue[tissue] | mask if tissue in by_tissue else mask.clone()
    regions = _regions(named)
    if not by_tissue:
        return None, (), (), regions
    tissues = tuple(sorted(by_tissue))
    pools = torch.stack([by_tissue[t] for t in tissues]).to(torch.uint8)
    means = tuple(float(image[0][by_tissue[t]].mean()) * (hi - lo) + lo for t in tissues)
    return pools, tissues, means, regions


def load_case(source: LabelSource, config: PreprocessConfig) -> PromptSegCase:
    """Read, label and preprocess one datalist case (see :class:`LabelSource`), with the blood
    pools and body regions the CT augmentations need (:func:`_pools_and_regions`)."""
    volume = read_volume(source.image, modality=source.modality)
    cfg = PreprocessConfig(**{**asdict(config), "modality": source.modality})
    if source.label_map is not None:
        ids = read_label(source.label_map, reference=volume)
        # The id map goes through the pipeline as one channel (nearest); the per-term channels are
        # made in model space, where they are far smaller (41 channels of a 512^2 series: 860 MB).
        terms, label_ids = source.terms, source.label_ids
        if len(terms) == len(source.absent):  # no 'terms': every class present in the map is annotated
            present = _classes_in_map(ids.data, source.modality)
            terms, label_ids = tuple(present) + terms, tuple((i,) for i in present.values()) + label_ids
        image, ids_model = _preprocess_with_masks(volume, torch.as_tensor(ids.data.astype(np.int32))[None], cfg)
        masks = _totalseg_channels(ids_model[0], label_ids)
        # Every structure of the map (annotated or not) can move with the phase or mark a region.
        named = {n: ids_model[0] == i for n, i in _classes_in_map(ids_model[0].numpy(), source.modality).items()}
    else:
        stack = [torch.as_tensor(read_label(m, reference=volume).data > 0) for m in source.masks]
        stack += [torch.zeros(volume.shape, dtype=torch.bool)] * len(source.absent)
        image, masks = _preprocess_with_masks(volume, torch.stack(stack).to(torch.uint8), cfg)
        masks = masks.to(torch.uint8)
        named = {t: masks[k] > 0 for k, t in enumerate(source.terms)}
    extras = _pools_and_regions(named, image, cfg.ct_window) if source.modality == "CT" else (None, (), (), {})
    pools, tissues, means, regions = extras
    return PromptSegCase(image, masks, terms if source.label_map is not None else source.terms, source.modality,
                         str(source.image), pools, tissues, means, regions, exclusive=source.exclusive)


def phantom_cases(
    n: int,
    seed: int,
    shape: Sequence[int],
    spacing: Sequence[float],
    config: PreprocessConfig,
    terms: Sequence[str] | None = None,
) -> list[PromptSegCase]:
    """A phantom cohort (:func:`volumed.data.phantoms.make_cohort`) as training cases (label-map
    style): the structures ``terms`` are annotated (``None``: every structure a phantom holds)."""
    from volumed.data.phantoms import make_cohort

    vocab = default_vocabulary()
    cases = []
    for ph in make_cohort(n, seed, shape=shape, spacing=spacing, lesion_rate=0.0):
        annotated = tuple(t for t in ph.terms if terms is None or t in terms)
        image, ids_model = _preprocess_with_masks(ph.image, torch.as_tensor(ph.label.data.astype(np.int32))[None], config)
        masks = _totalseg_channels(ids_model[0], [vocab.label_ids(t, "CT") for t in annotated])
        cases.append(PromptSegCase(image, masks, annotated, "CT", ph.case_id))
    return cases


# --------------------------------------------------------------------------------------------
# Patches
# --------------------------------------------------------------------------------------------


def patch_augmentation() -> Compose:
    """nnU-Net-style augmentation of a cropped patch (keys ``image``, ``masks``, ``fg``), with
    MONAI transforms, each applied with its own probability:

    * a random rotation (up to 15 degrees about each axis) and scaling (0.85-1.15), with the same
      matrix for the image (trilinear, air outside) and the masks (nearest);
    * intensity: multiplicative (0.75-1.25) and additive (+-0.05 of the window, i.e. +-100 HU
      for the default -1000..1000 window) shifts, gamma contrast (0.7-1.5), gaussian noise and
      blur, for scanners, contrast phases and reconstruction kernels other than the training ones.

    No mirroring: it would turn a left kidney into a right one.
    """
    keys = ["image", "masks", "fg"]
    return Compose([
        RandAffined(keys=keys, prob=0.3, rotate_range=(0.26, 0.26, 0.26), scale_range=(0.15, 0.15, 0.15),
                    mode=("bilinear", "nearest", "nearest"), padding_mode="zeros"),
        RandScaleIntensityd(keys="image", factors=0.25, prob=0.15),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.15),
        RandAdjustContrastd(keys="image", gamma=(0.7, 1.5), prob=0.3),
        RandGaussianNoised(keys="image", std=0.01, prob=0.1),
        RandGaussianSmoothd(keys="image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0), prob=0.1),
    ])  # fmt: skip


def _plain(x: Any) -> torch.Tensor:
    """A plain tensor (MONAI transforms return MetaTensors, synthesis plain ones: a batch must
    not mix them)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


class PromptSegPatchDataset(Dataset):
    """Foreground-biased patches of cached cases, with targets over the data set's term list.

    Args:
        cases: the preprocessed cases (real images, or label maps with ``synthetic`` set).
        terms: the data set's term list ``T`` (every case's terms must be in it).
        patch_size: ``(px, py, pz)`` voxels; smaller images are padded (``pad_mode``).
        fg_rate: probability that a patch is centred on a foreground voxel; otherwise on a
            background voxel.
        length: samples per epoch (cases are drawn round robin, ``index % len(cases)``, unless
            ``synthetic_share`` is set).
        synthetic_share: fraction of the indices that go to the synthetic cases (round robin
            among them; the rest round robin among the real ones). ``None``: every case equally
            often. With 4 label maps and 3 real CTs, equal shares give the real CTs 43% of the
            patches; a model that saw synthesis only transferred better to unseen scans than one
            trained on that mix (docs/synthesis.md, round 8).
        sampling: how the foreground centre is chosen. ``"class"`` (default, nnU-Net style): pick
            one of the case's *present* annotated structures uniformly, then a voxel of it (MONAI
            ``RandCropByLabelClassesd``), so a 1,000-voxel aorta is sampled as often as a
            40,000-voxel liver. ``"union"``: a voxel of the union of all structures (MONAI
            ``RandCropByPosNegLabeld``), which favours the large organs.
        augment: apply :func:`patch_augmentation` to each patch.
        contrast_phase: probability that a real CT patch's blood pools move to a random phase
            (:class:`volumed.data.ct_augment.ContrastPhase`; 0: off).
        field_of_view: probability that a patch keeps one body region's slices only
            (:class:`volumed.data.ct_augment.FieldOfView`; 0: off).
        slice_thickness: probability that a patch is resampled as 1-5 mm slices
            (:func:`volumed.data.ct_augment.slice_thickness`; 0: off).
        box_crop: probability that a patch, real or synthetic, keeps only a random box of 10-30 cm
            around its centre, the rest filled as inference pads an exported crop
            (:class:`volumed.data.ct_augment.BoxCrop`; 0: off).
        spacing: model-space voxel size, mm (synthesis and slice thickness).
        ct_window: the HU window of the ``[0, 1]`` scale (synthesis, contrast phase).
        deform_mm: largest elastic displacement of a synthetic patch's label map, mm.
        synthetic_texture: lung vessels and bone cortex in synthetic patches
            (:meth:`volumed.data.synthesis.CTSynthesizer.add_texture`).
        synthetic_heart_wall: a darker myocardium and septum around the blood of a synthetic
            contrast-enhanced heart (:meth:`volumed.data.synthesis.CTSynthesizer.add_heart_wall`).
        synthetic_enhancement: ``(low, high)``: a synthetic contrast patch enhances by a fraction
            in this range of its phase's prior over native
            (:class:`volumed.data.synthesis.CTSynthesizer`'s ``enhancement``); ``(1, 1)``: the priors.
        synthetic_surroundings: probability that a synthetic patch gets arms beside the trunk, and
            that it gets a scanner table under the back
            (:meth:`volumed.data.synthesis.CTSynthesizer.add_surroundings`; 0: off).
        pad_mode: how a real image smaller than the patch is padded, with its masks
            (:func:`volumed.data.transforms.pad_spatial`): ``"constant"`` (air, the default: what
            the committed model was trained with), ``"symmetric"`` (mirrored; removes the air
            bands above and below thin slabs, docs/synthesis.md round 4) or ``"symmetric_z"``
            (mirrored along slices only, air in-plane, round 5). Inference pads the same
            way (the package records it). Synthetic label maps are always padded with air.

    Per patch: crop -> synthetic: :class:`volumed.data.synthesis.CTSynthesizer` (deformation,
    image from the labels, targets from the deformed labels); real CT: contrast phase; both: field
    of view -> box crop -> ``augment`` -> slice thickness.

    Item: ``{"image": (1, px, py, pz) float32, "target": (T, px, py, pz) uint8,
    "annotated": (T,) bool, "modality": 0 (CT) | 1 (MR), "center_fg": bool, "synthetic": bool,
    "exclusive": bool, "known": (1, px, py, pz) uint8}``; ``known`` is the union of the annotated
    masks of an ``exclusive`` case (where its unannotated terms are negatives), zero otherwise.
    """

    def __init__(
        self,
        cases: Sequence[PromptSegCase],
        terms: Sequence[str],
        patch_size: Sequence[int],
        fg_rate: float = 0.67,
        length: int | None = None,
        sampling: str = "class",
        augment: bool = False,
        contrast_phase: float = 0.0,
        field_of_view: float = 0.0,
        slice_thickness: float = 0.0,
        spacing: Sequence[float] = (3.0, 3.0, 3.0),
        ct_window: Sequence[float] = (-1000.0, 1000.0),
        deform_mm: float = 6.0,
        synthetic_texture: bool = True,
        synthetic_heart_wall: bool = False,
        synthetic_enhancement: Sequence[float] = (1.0, 1.0),
        synthetic_surroundings: float = 0.0,
        pad_mode: str = "constant",
        synthetic_share: float | None = None,
        box_crop: float = 0.0,
    ):
        if pad_mode not in PAD_MODES:
            raise ConfigError(f"pad_mode must be one of {list(PAD_MODES)}, got {pad_mode!r}", "pad_mode")
        self.pad_mode = pad_mode
        if not 0.0 <= fg_rate <= 1.0:
            raise ConfigError(f"fg_rate must be a probability in [0, 1], got {fg_rate!r}", "fg_rate")
        if sampling not in ("class", "union"):
            raise ConfigError(f"sampling must be 'class' or 'union', got {sampling!r}", "sampling")
        for name, p in (("contrast_phase", contrast_phase), ("field_of_view", field_of_view), ("slice_thickness", slice_thickness),
                        ("box_crop", box_crop)):
            if not 0.0 <= float(p) <= 1.0:
                raise ConfigError(f"{name} must be a probability in [0, 1], got {p!r}", name)
        if not cases:
            raise ConfigError("no training cases", "cases")
        self.cases = list(cases)
        self.terms = list(terms)
        self.index = {t: i for i, t in enumerate(self.terms)}
        missing = sorted({t for c in self.cases for t in c.terms} - set(self.index))
        if missing:
            raise ConfigError(f"terms of the cases missing from the term list: {missing}", "terms")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.fg_rate = float(fg_rate)
        self.length = int(length) if length else len(self.cases)
        self.case_of = self._case_order(synthetic_share)
        self.sampling = sampling
        self.augment = patch_augmentation() if augment else None
        self.spacing = tuple(float(v) for v in spacing)
        self.surroundings = float(synthetic_surroundings)
        if not 0.0 <= self.surroundings <= 1.0:
            raise ConfigError(f"synthetic_surroundings must be a probability in [0, 1], got {synthetic_surroundings!r}",
                              "synthetic_surroundings")
        self.synthesizers = [
            CTSynthesizer(c.synthetic.class_tissues, spacing, ct_window, deform_mm=deform_mm, texture=synthetic_texture,
                           heart_wall=synthetic_heart_wall, enhancement=synthetic_enhancement,
                           surroundings=synthetic_surroundings, class_names=c.synthetic.class_names)
            if c.synthetic is not None else None
            for c in self.cases
        ]  # fmt: skip
        self.contrast = [
            ContrastPhase(c.pool_tissues, c.pool_means, ct_window, prob=contrast_phase)
            if contrast_phase > 0 and c.pools is not None and c.synthetic is None else None
            for c in self.cases
        ]  # fmt: skip
        fill = "mirror" if pad_mode.startswith("symmetric") else "air"
        self.fov = [FieldOfView(c.regions, prob=field_of_view, fill=fill) if field_of_view > 0 and c.regions else None for c in self.cases]
        self.box = BoxCrop(self.spacing, prob=float(box_crop), fill=fill) if box_crop > 0 else None
        self.thickness = slice_thickness_transform(float(spacing[2]), prob=slice_thickness) if slice_thickness > 0 else None
        self._torch_rng = np.random.default_rng(0)
        # Per case, once: the tensors padded to at least one patch (0: air, no structure, no
        # slice) and the voxel indices the crop centres are drawn from. Drawing them per patch
        # (MONAI does when no indices are given) cost more than the network's step.
        self.base: list[dict[str, Any]] = []
        self.transforms = []
        for case in self.cases:
            self.base.append(self._padded(case))
            keys = [k for k in ("image", "classes", "masks", "fg", "zindex", "pools") if k in self.base[-1]]
            if sampling == "union":
                # pos/neg weights: fg_rate of the patches are centred on foreground. With pos=0
                # and neg=0 MONAI refuses, so fg_rate 0 means "background only" via neg=1.
                crop = RandCropByPosNegLabeld(
                    keys=keys, label_key="fg", spatial_size=self.patch_size, pos=self.fg_rate, neg=1.0 - self.fg_rate,
                    num_samples=1, allow_smaller=False, fg_indices_key="fg_indices", bg_indices_key="bg_indices",
                )  # fmt: skip
                self.transforms.append(crop)
                continue
            # One cropper per case: the class ratios depend on which of its structures are present.
            # Class 0 is the background, classes 1.. the case's masks.
            present = [bool(m.any()) for m in case.masks]
            n = sum(present)
            ratios = [1.0 - self.fg_rate if n else 1.0] + [self.fg_rate / n if p else 0.0 for p in present]
            if not any(ratios):  # fg_rate 1 with nothing present: background is all there is
                ratios[0] = 1.0
            crop = RandCropByLabelClassesd(
                keys=keys, label_key="fg", spatial_size=self.patch_size, ratios=ratios, num_samples=1,
                allow_smaller=False, warn=False, indices_key="crop_indices",
            )  # fmt: skip
            self.transforms.append(crop)

    def _padded(self, case: PromptSegCase) -> dict[str, Any]:
        """The case's tensors padded to at least the patch (half before, half after, as MONAI's
        ``SpatialPad``; a real image and its masks as :attr:`pad_mode`, slice indices and synthetic
        label maps with 0), with the crop-centre indices of :attr:`sampling` (never in the padding)."""
        shape = case.shape
        # Room for arms beside a synthetic trunk and a table under its back
        # (``synthetic_surroundings``): a label map is cropped to the body with a few voxels of
        # air, so a patch would show a sliver of them at most. Air is added at both sides (96 mm)
        # and behind the back (64 mm; RAS: the first rows are posterior); no crop centre there.
        extra = [(0, 0), (0, 0), (0, 0)]
        if case.synthetic is not None and self.surroundings > 0:
            side, back = round(96.0 / self.spacing[0]), round(64.0 / self.spacing[1])
            extra = [(side, side), (back, 0), (0, 0)]
        before = [(max(s, p) - s) // 2 + e[0] for s, p, e in zip(shape, self.patch_size, extra)]
        after = [max(s, p) - s - (max(s, p) - s) // 2 + e[1] for s, p, e in zip(shape, self.patch_size, extra)]
        target = [s + b + a for s, b, a in zip(shape, before, after)]
        pads = [v for a in (2, 1, 0) for v in (before[a], after[a])]

        mode = self.pad_mode if case.synthetic is None else "constant"

        def pad(x: torch.Tensor, how: str = mode) -> torch.Tensor:
            return pad_spatial(x, pads, how)

        z = shape[2]
        fg = case.masks.amax(0, keepdim=True) if len(case.masks) else torch.zeros((1, *shape), dtype=torch.uint8)
        out: dict[str, Any] = {
            "masks": pad(case.masks),
            "fg": pad(fg),
            # 1-based slice index of every voxel: 0 marks padding (field-of-view augmentation).
            "zindex": pad(torch.arange(1, z + 1, dtype=torch.int16).view(1, 1, 1, z).expand(1, *shape).contiguous(), "constant"),
        }
        if case.synthetic is not None:
            out["classes"] = pad(case.synthetic.classes)
        else:
            out["image"] = pad(case.image)
        if case.pools is not None:
            out["pools"] = pad(case.pools)
        inside = torch.zeros((1, *target), dtype=torch.bool)
        inside[(0, *[slice(pads[2 * (2 - a)], pads[2 * (2 - a)] + shape[a]) for a in range(3)])] = True
        flat_in = inside.flatten()
        flat_fg = (out["fg"][0].flatten() > 0) & flat_in
        if self.sampling == "union":
            out["fg_indices"] = flat_fg.nonzero().flatten()
            out["bg_indices"] = (~flat_fg & flat_in).nonzero().flatten()
        else:
            # Padding is neither background nor a structure: no centre there.
            out["crop_indices"] = [(~flat_fg & flat_in).nonzero().flatten()] + [
                ((m.flatten() > 0) & flat_in).nonzero().flatten() for m in out["masks"]
            ]
        return out

    def set_random_state(self, seed: int) -> "PromptSegPatchDataset":
        for k, t in enumerate(self.transforms):
            t.set_random_state(seed=seed + 7919 * k)
        for k, part in enumerate([*self.synthesizers, *self.contrast, *self.fov]):
            if part is not None:
                part.set_random_state(seed + 15485863 + 31 * k)
        if self.box is not None:
            self.box.set_random_state(seed + 32452843)
        if self.augment is not None:
            self.augment.set_random_state(seed=seed + 104729)
        self._torch_rng = np.random.default_rng(seed + 1299709)
        return self

    def __len__(self) -> int:
        return self.length

    def _slice_thickness(self, image: torch.Tensor) -> torch.Tensor:
        # TorchIO draws from torch's global generator: seed it from ours, keep the caller's state.
        state = torch.random.get_rng_state()
        torch.manual_seed(int(self._torch_rng.integers(0, 2**31 - 1)))
        try:
            return torch.as_tensor(self.thickness(image.float())).float()
        finally:
            torch.random.set_rng_state(state)

    def _case_order(self, share: float | None) -> list[int]:
        """The case of each index ``0 .. length - 1``."""
        n = len(self.cases)
        if share is None:
            return [i % n for i in range(self.length)]
        share = float(share)
        if not 0.0 <= share <= 1.0:
            raise ConfigError(f"synthetic_share must be a fraction in [0, 1], got {share!r}", "synthetic_share")
        synth = [k for k, c in enumerate(self.cases) if c.synthetic is not None]
        real = [k for k, c in enumerate(self.cases) if c.synthetic is None]
        if (share > 0 and not synth) or (share < 1 and not real):
            kind = "synthetic" if share > 0 and not synth else "real"
            raise ConfigError(f"synthetic_share {share} needs {kind} cases, and there are none", "synthetic_share")
        n_synth = int(round(share * self.length))
        if 0 < share < 1:  # both kinds at least once per epoch
            n_synth = min(max(n_synth, 1), self.length - 1)
        return [synth[i % len(synth)] for i in range(n_synth)] + [real[i % len(real)] for i in range(self.length - n_synth)]

    def __getitem__(self, i: int) -> dict[str, Any]:
        k = self.case_of[i % self.length]
        case = self.cases[k]
        out = dict(self.transforms[k](dict(self.base[k]))[0])
        if case.synthetic is not None:
            image, classes, _ = self.synthesizers[k](torch.as_tensor(out.pop("classes")))
            out["image"] = image
            out["masks"] = case.synthetic.masks(classes)
            out["fg"] = out["masks"].amax(0, keepdim=True) if len(out["masks"]) else torch.zeros_like(classes, dtype=torch.uint8)
        elif self.contrast[k] is not None:
            out = self.contrast[k](out)
        if self.fov[k] is not None:
            out = self.fov[k](out)
        if self.box is not None:
            out = self.box(out)
        if self.augment is not None:
            out = self.augment({key: out[key] for key in ("image", "masks", "fg")})
        image = _plain(out["image"]).float()
        if self.thickness is not None:
            image = self._slice_thickness(image)
        # Inference images never leave [0, 1] (the window clips): neither do training patches.
        image = image.clamp(0.0, 1.0)
        masks = _plain(out["masks"]).to(torch.uint8)
        fgp = _plain(out["fg"])
        target = torch.zeros((len(self.terms), *self.patch_size), dtype=torch.uint8)
        annotated = torch.zeros(len(self.terms), dtype=torch.bool)
        for j, t in enumerate(case.terms):
            target[self.index[t]] = masks[j]
            annotated[self.index[t]] = True
        c = tuple(s // 2 for s in self.patch_size)
        exclusive = bool(case.exclusive) and case.synthetic is None
        # The union of the annotated masks, after every spatial transform (masks.amax, not the
        # augmented "fg", which is interpolated separately).
        known = masks.amax(0, keepdim=True) if exclusive and len(masks) else torch.zeros((1, *self.patch_size), dtype=torch.uint8)
        return {
            "image": image,
            "target": target,
            "annotated": annotated,
            "modality": 0 if case.modality == "CT" else 1,
            "center_fg": bool(fgp[(0, *c)] > 0),
            "synthetic": case.synthetic is not None,
            "exclusive": exclusive,
            "known": known,
        }


class PromptSegDataModule(L.LightningDataModule):
    """Cases from a datalist (or a phantom cohort) -> foreground-biased patch batches.

    Args:
        datalist: MSD JSON / CSV (module docstring for the label styles); ``None`` uses a phantom
            cohort of ``phantom_cases`` cases instead.
        section: JSON section.
        patch_size: training patch ``(px, py, pz)`` voxels in model space (must suit the encoder's strides).
        batch_size: patches per step.
        fg_rate: fraction of patches centred on annotated foreground.
        sampling: ``"class"`` (each present structure equally often) or ``"union"``
            (``PromptSegPatchDataset``).
        augment: rotation, scaling and intensity augmentation of the patches (:func:`patch_augmentation`).
        samples_per_epoch: patches per epoch.
        num_workers: DataLoader workers.
        target_spacing: model-space voxel size, mm.
        ct_window: HU window mapped to ``[0, 1]``.
        margin: body-crop margin, voxels.
        default_modality: modality of entries without one.
        allow_free_text: accept mask names that are not vocabulary terms.
        phantom_cases, phantom_seed, phantom_shape, phantom_spacing: the phantom cohort.
        phantom_terms: the structures annotated in the phantoms (``None``: all of them).
        seed: seeds the crop positions.
        real: use the datalist's image entries (section ``section``).
        synthetic: use its label-map-only entries (section ``synthetic_section``,
            :func:`load_synthetic_sources`), with an image synthesised for every patch.
        synthetic_section: the JSON section of those entries.
        exclude: leave out every entry whose image path (or label-map name / path) contains one
            of these strings: how leave-one-scan-out folds are made from one datalist.
        contrast_phase, field_of_view, slice_thickness, box_crop: probabilities of the CT
            augmentations (:class:`PromptSegPatchDataset`; 0: off).
        deform_mm: largest elastic displacement of a synthetic patch's label map, mm.
        synthetic_texture: lung vessels and bone cortex in synthetic patches
            (:meth:`volumed.data.synthesis.CTSynthesizer.add_texture`).
        synthetic_heart_wall: a darker myocardium and septum around the blood of a synthetic
            contrast-enhanced heart (:meth:`volumed.data.synthesis.CTSynthesizer.add_heart_wall`).
        synthetic_enhancement: ``(low, high)``: a synthetic contrast patch enhances by a fraction
            in this range of its phase's prior over native
            (:class:`volumed.data.synthesis.CTSynthesizer`'s ``enhancement``); ``(1, 1)``: the priors.
        synthetic_surroundings: probability that a synthetic patch gets arms beside the trunk, and
            that it gets a scanner table under the back
            (:meth:`volumed.data.synthesis.CTSynthesizer.add_surroundings`; 0: off).
        synthetic_thighs: draw 12-20 cm of thighs below a label map that ends across both femoral
            shafts (:func:`volumed.data.synthesis.extend_thighs`; no label map here reaches mid-thigh).
        pad_mode: how real images smaller than the patch are padded (:class:`PromptSegPatchDataset`);
            recorded in the trained package, whose inference pads the same way.
        synthetic_share: fraction of the patches drawn from synthetic cases (:class:`PromptSegPatchDataset`;
            ``None``: every case equally often).
        terms: train only these terms of the image entries (:func:`restrict_terms`; entries
            annotating none of them are dropped). ``None``: every annotated term.
        max_cases: use only the first ``max_cases`` image entries (few-shot fine-tuning).
        val_datalist: datalist of whole scans scored after every validation interval (Dice on
            their original grid, :meth:`PromptSegModule.validation_step`); section ``val_section``.
            Only the terms that train are scored. ``None``: no validation.
    """

    def __init__(
        self,
        datalist: str | None = None,
        section: str = "training",
        patch_size: Sequence[int] = (64, 64, 32),
        batch_size: int = 2,
        fg_rate: float = 0.67,
        sampling: str = "class",
        augment: bool = False,
        samples_per_epoch: int = 100,
        num_workers: int = 0,
        target_spacing: Sequence[float] = (3.0, 3.0, 3.0),
        ct_window: Sequence[float] = (-1000.0, 1000.0),
        margin: int = 8,
        default_modality: str = "CT",
        allow_free_text: bool = False,
        phantom_cases: int = 2,
        phantom_terms: Sequence[str] | None = None,
        phantom_seed: int = 0,
        phantom_shape: Sequence[int] = (64, 64, 48),
        phantom_spacing: Sequence[float] = (4.5, 4.5, 4.0),
        seed: int = 0,
        real: bool = True,
        synthetic: bool = True,
        synthetic_section: str = "synthetic",
        exclude: Sequence[str] = (),
        contrast_phase: float = 0.0,
        field_of_view: float = 0.0,
        slice_thickness: float = 0.0,
        box_crop: float = 0.0,
        deform_mm: float = 6.0,
        synthetic_texture: bool = True,
        synthetic_heart_wall: bool = False,
        synthetic_enhancement: Sequence[float] = (1.0, 1.0),
        synthetic_surroundings: float = 0.0,
        synthetic_thighs: bool = False,
        pad_mode: str = "constant",
        synthetic_share: float | None = None,
        terms: Sequence[str] | None = None,
        max_cases: int | None = None,
        val_datalist: str | None = None,
        val_section: str = "validation",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if max_cases is not None and int(max_cases) < 1:
            raise ConfigError(f"max_cases must be at least 1, got {max_cases!r}", "max_cases")
        self.validation_cases: list[ValidationCase] = []
        if len(tuple(patch_size)) != 3:
            raise ConfigError(f"patch_size must be three voxel counts, got {patch_size!r}", "patch_size")
        self.preprocess_config = PreprocessConfig(
            modality=default_modality, target_spacing=tuple(target_spacing), ct_window=tuple(ct_window), margin=margin
        )
        self.cases: list[PromptSegCase] = []
        self.terms: list[str] = []
        self.train_set: PromptSegPatchDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        if hp.datalist:
            excluded = [str(e) for e in hp.exclude or ()]

            def kept(*names: object) -> bool:
                return not any(e in str(n) for e in excluded for n in names)

            sources = load_promptseg_datalist(
                hp.datalist, section=hp.section, default_modality=hp.default_modality, allow_free_text=hp.allow_free_text
            ) if hp.real else []  # fmt: skip
            synthetic = load_synthetic_sources(hp.datalist, section=hp.synthetic_section) if hp.synthetic else []
            sources = [s for s in sources if kept(s.image)]
            synthetic = [s for s in synthetic if kept(s.name, *s.files.values())]
            if hp.terms:
                if synthetic:
                    raise ConfigError("data.terms selects terms of the image entries; set data.synthetic false", hp.datalist)
                sources = restrict_terms(sources, hp.terms, hp.datalist)
            if hp.max_cases:
                sources = sources[: int(hp.max_cases)]
            if not sources and not synthetic:
                raise ConfigError(
                    f"no training cases left in {hp.datalist} (real={hp.real}, synthetic={hp.synthetic}, exclude={excluded})",
                    "data",
                )
            self.cases = [load_case(s, self.preprocess_config) for s in sources]
            self.cases += [load_synthetic_case(s, self.preprocess_config, seed=hp.seed + k, thighs=hp.synthetic_thighs)
                           for k, s in enumerate(synthetic)]  # fmt: skip
        else:
            self.cases = phantom_cases(
                hp.phantom_cases, hp.phantom_seed, hp.phantom_shape, hp.phantom_spacing, self.preprocess_config, hp.phantom_terms
            )
        # Sorted: the term order (and so the package's term list) does not depend on entry order.
        self.terms = sorted({t for c in self.cases for t in c.terms})
        self.train_set = PromptSegPatchDataset(
            self.cases, self.terms, hp.patch_size, hp.fg_rate, hp.samples_per_epoch, hp.sampling, hp.augment,
            contrast_phase=hp.contrast_phase, field_of_view=hp.field_of_view, slice_thickness=hp.slice_thickness,
            spacing=self.preprocess_config.target_spacing or (1.0, 1.0, 1.0), ct_window=hp.ct_window, deform_mm=hp.deform_mm,
            synthetic_texture=hp.synthetic_texture, synthetic_heart_wall=hp.synthetic_heart_wall,
            synthetic_enhancement=tuple(hp.synthetic_enhancement), synthetic_surroundings=hp.synthetic_surroundings,
            pad_mode=hp.pad_mode, synthetic_share=hp.synthetic_share, box_crop=hp.box_crop,
        )  # fmt: skip
        self.train_set.set_random_state(hp.seed)
        if hp.val_datalist:
            if hp.datalist and Path(hp.val_datalist) == Path(hp.datalist) and hp.val_section == hp.section:
                val = list(sources)  # the training scans as selected (terms, max_cases, exclude)
            else:
                val = load_promptseg_datalist(hp.val_datalist, section=hp.val_section, default_modality=hp.default_modality,
                                              allow_free_text=hp.allow_free_text)  # fmt: skip
                # Only the terms that train are scored: Dice of a term the run does not train (another
                # datalist's structure) would steer early stopping and the kept weights.
                wanted = list(hp.terms) if hp.terms else list(self.terms)
                val = restrict_terms(val, [t for t in wanted if any(t in v.terms for v in val)] or wanted, hp.val_datalist)
            self.validation_cases = [load_validation_case(v) for v in val]
        for c in self.cases:
            log.info("case %s: model shape %s, %d terms%s", c.name, c.shape, len(c.terms),
                     f", pools {list(c.pool_tissues)}" if c.pool_tissues else "")  # fmt: skip

    def val_dataloader(self) -> Any:
        """Indices of :attr:`validation_cases`, one per step (``[]``: no validation)."""
        if not self.validation_cases:
            return []
        return torch.utils.data.DataLoader(list(range(len(self.validation_cases))), batch_size=None, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        step = self.trainer.global_step if self.trainer is not None else 0
        generator = torch.Generator().manual_seed(hp.seed + step)
        sampler = RandomSampler(self.train_set, replacement=True, num_samples=len(self.train_set), generator=generator)
        return DataLoader(
            self.train_set, batch_size=hp.batch_size, sampler=sampler, generator=generator, num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )  # fmt: skip
