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
from dataclasses import asdict, dataclass
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
    SpatialPadd,
)
from torch.utils.data import Dataset, RandomSampler

from volumed.data.datalist import DatalistEntry, load_datalist, split_terms
from volumed.data.transforms import PreprocessConfig, build_preprocessing
from volumed.data.vocab import Vocabulary, default_vocabulary
from volumed.errors import ConfigError, DatalistError, UnknownTermError
from volumed.io import read_label, read_volume
from volumed.io.volume import Volume

__all__ = [
    "LabelSource",
    "PromptSegCase",
    "PromptSegDataModule",
    "PromptSegPatchDataset",
    "load_case",
    "load_promptseg_datalist",
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
        where: the entry's position in the datalist, for messages.
    """

    image: Path
    modality: str
    terms: tuple[str, ...]
    label_map: Path | None = None
    label_ids: tuple[tuple[int, ...], ...] = ()
    masks: tuple[Path, ...] = ()
    absent: tuple[str, ...] = ()
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


def _resolve_term(
    text: str, modality: str, vocab: Vocabulary, allow_free_text: bool, where: str, problems: list[str]
) -> str | None:
    try:
        return vocab.resolve(text, modality, allow_free_text=allow_free_text).name
    except UnknownTermError as err:
        hint = ", ".join(err.suggestions)
        problems.append(f"{where}: unknown term {text!r} (nearest: {hint}; set allow_free_text to train free text)")
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
                name = _resolve_term(text, modality, vocab, False, where, problems)
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
        where=where,
    )


# --------------------------------------------------------------------------------------------
# Cases in model space
# --------------------------------------------------------------------------------------------


@dataclass
class PromptSegCase:
    """One preprocessed training case.

    Attributes:
        image: ``(1, x, y, z)`` float32 in ``[0, 1]``, model space.
        masks: ``(K, x, y, z)`` uint8, one channel per annotated term (all zero: absent).
        terms: the ``K`` annotated terms.
        modality: ``"CT"`` or ``"MR"``.
        name: where it came from (image path, phantom id).
    """

    image: torch.Tensor
    masks: torch.Tensor
    terms: tuple[str, ...]
    modality: str
    name: str = ""


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


def load_case(source: LabelSource, config: PreprocessConfig) -> PromptSegCase:
    """Read, label and preprocess one datalist case (see :class:`LabelSource`)."""
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
        return PromptSegCase(image, masks, terms, source.modality, str(source.image))
    else:
        stack = [torch.as_tensor(read_label(m, reference=volume).data > 0) for m in source.masks]
        stack += [torch.zeros(volume.shape, dtype=torch.bool)] * len(source.absent)
        image, masks = _preprocess_with_masks(volume, torch.stack(stack).to(torch.uint8), cfg)
        masks = masks.to(torch.uint8)
    return PromptSegCase(image, masks, source.terms, source.modality, str(source.image))


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


class PromptSegPatchDataset(Dataset):
    """Foreground-biased patches of cached cases, with targets over the data set's term list.

    Args:
        cases: the preprocessed cases.
        terms: the data set's term list ``T`` (every case's terms must be in it).
        patch_size: ``(px, py, pz)`` voxels; smaller images are padded with 0 (air after scaling).
        fg_rate: probability that a patch is centred on a foreground voxel; otherwise on a
            background voxel.
        length: samples per epoch (cases are drawn round robin, ``index % len(cases)``).
        sampling: how the foreground centre is chosen. ``"class"`` (default, nnU-Net style): pick
            one of the case's *present* annotated structures uniformly, then a voxel of it (MONAI
            ``RandCropByLabelClassesd``), so a 1,000-voxel aorta is sampled as often as a
            40,000-voxel liver. ``"union"``: a voxel of the union of all structures (MONAI
            ``RandCropByPosNegLabeld``), which favours the large organs.
        augment: apply :func:`patch_augmentation` to each patch (off by default: the default
            model was trained without it).

    Item: ``{"image": (1, px, py, pz) float32, "target": (T, px, py, pz) uint8,
    "annotated": (T,) bool, "modality": 0 (CT) | 1 (MR), "center_fg": bool}``.
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
    ):
        if not 0.0 <= fg_rate <= 1.0:
            raise ConfigError(f"fg_rate must be a probability in [0, 1], got {fg_rate!r}", "fg_rate")
        if sampling not in ("class", "union"):
            raise ConfigError(f"sampling must be 'class' or 'union', got {sampling!r}", "sampling")
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
        self.sampling = sampling
        self.augment = patch_augmentation() if augment else None
        keys = ["image", "masks", "fg"]
        pad = SpatialPadd(keys=keys, spatial_size=self.patch_size, mode="constant")
        if sampling == "union":
            # pos/neg weights: fg_rate of the patches are centred on foreground. With pos=0
            # and neg=0 MONAI refuses, so fg_rate 0 means "background only" via neg=1.
            crop = RandCropByPosNegLabeld(
                keys=keys, label_key="fg", spatial_size=self.patch_size, pos=self.fg_rate, neg=1.0 - self.fg_rate,
                num_samples=1, allow_smaller=False,
            )  # fmt: skip
            self.transforms = [Compose([pad, crop]) for _ in self.cases]
        else:
            # One cropper per case: the class ratios depend on which of its structures are present.
            # Channel 0 of the crop label is the background, channels 1.. the case's masks.
            self.transforms = []
            for case in self.cases:
                present = [bool(m.any()) for m in case.masks]
                n = sum(present)
                ratios = [1.0 - self.fg_rate if n else 1.0] + [self.fg_rate / n if p else 0.0 for p in present]
                if not any(ratios):  # fg_rate 1 with nothing present: background is all there is
                    ratios[0] = 1.0
                crop = RandCropByLabelClassesd(
                    keys=keys, label_key="crop_label", spatial_size=self.patch_size, ratios=ratios,
                    num_samples=1, allow_smaller=False, warn=False,
                )  # fmt: skip
                self.transforms.append(Compose([SpatialPadd(keys=[*keys, "crop_label"], spatial_size=self.patch_size), crop]))

    def set_random_state(self, seed: int) -> "PromptSegPatchDataset":
        for k, t in enumerate(self.transforms):
            t.set_random_state(seed=seed + 7919 * k)
        if self.augment is not None:
            self.augment.set_random_state(seed=seed + 104729)
        return self

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        case = self.cases[i % len(self.cases)]
        fg = case.masks.amax(0, keepdim=True) if len(case.masks) else torch.zeros_like(case.image, dtype=torch.uint8)
        data = {"image": case.image, "masks": case.masks, "fg": fg}
        if self.sampling == "class":
            # Padding with 0 marks padded voxels as neither background nor a structure: no centre there.
            data["crop_label"] = torch.cat([1 - fg, case.masks]) if len(case.masks) else 1 - fg
        out = self.transforms[i % len(self.cases)](data)[0]
        if self.augment is not None:
            out = self.augment(out)
        image = torch.as_tensor(out["image"]).float()
        masks = torch.as_tensor(out["masks"]).to(torch.uint8)
        fgp = torch.as_tensor(out["fg"])
        target = torch.zeros((len(self.terms), *self.patch_size), dtype=torch.uint8)
        annotated = torch.zeros(len(self.terms), dtype=torch.bool)
        for k, t in enumerate(case.terms):
            target[self.index[t]] = masks[k]
            annotated[self.index[t]] = True
        c = tuple(s // 2 for s in self.patch_size)
        return {
            "image": image,
            "target": target,
            "annotated": annotated,
            "modality": 0 if case.modality == "CT" else 1,
            "center_fg": bool(fgp[(0, *c)] > 0),
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
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
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
            sources = load_promptseg_datalist(
                hp.datalist, section=hp.section, default_modality=hp.default_modality, allow_free_text=hp.allow_free_text
            )
            self.cases = [load_case(s, self.preprocess_config) for s in sources]
        else:
            self.cases = phantom_cases(
                hp.phantom_cases, hp.phantom_seed, hp.phantom_shape, hp.phantom_spacing, self.preprocess_config, hp.phantom_terms
            )
        # Sorted: the term order (and so the package's term list) does not depend on entry order.
        self.terms = sorted({t for c in self.cases for t in c.terms})
        self.train_set = PromptSegPatchDataset(
            self.cases, self.terms, hp.patch_size, hp.fg_rate, hp.samples_per_epoch, hp.sampling, hp.augment
        )
        self.train_set.set_random_state(hp.seed)
        for c in self.cases:
            log.info("case %s: model shape %s, %d terms", c.name, tuple(c.image.shape[1:]), len(c.terms))

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        step = self.trainer.global_step if self.trainer is not None else 0
        generator = torch.Generator().manual_seed(hp.seed + step)
        sampler = RandomSampler(self.train_set, replacement=True, num_samples=len(self.train_set), generator=generator)
        return DataLoader(
            self.train_set, batch_size=hp.batch_size, sampler=sampler, generator=generator, num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )  # fmt: skip
