"""``volumed segment``: text-prompted segmentation of one image, end to end.

Pipeline (one image, ``N`` prompts)::

    read_volume (NIfTI / NRRD / MHA / DICOM series)          original grid (X, Y, Z), affine
      -> resolve prompts (vocabulary, image modality)         N canonical terms (or free text)
      -> refuse terms the model was not trained on (unless allow_untrained)
      -> text embeddings (TextEncoder, cached) -> modality-conditioned queries  (N, D)
      -> preprocess (PreprocessConfig from the package)       model grid (1, x, y, z) in [0, 1]
      -> MONAI sliding_window_inference (roi = patch_size); per window the encoder runs ONCE
         and the term-query decoder answers all N terms in one pass (coarse logits kept)
      -> per term, only in the box where its probability can exceed the threshold: exact
         gaussian blending of the windows (volumed.inference.blending)
      -> per term, on the MODEL grid: connected components of its voxels above the threshold
         (26-connected, one bool map); a one-body structure (liver, heart, a vertebra, ...)
         keeps only its largest component, others (colon, groups, free text) keep all
         (volumed.inference.postprocess; the kept values are unchanged)
      -> trilinear inversion of the boxes onto the original grid; CT: voxels outside the
         patient's body (volumed.inference.body: the table, the air) set to 0
      -> threshold -> mask, label map;
         per term, while its mask is set: voxel count, summed and peak probability
         (confidence), no probability map kept
      -> absent terms (empty mask): the maximum of their blend on the model grid, found by
         branch and bound over the coarse cells (an upper bound of their probability)
      -> outputs on the original grid (shape and affine of the input, exactly)

Outputs in ``out_dir``:

* ``masks/<name>.nii.gz``: one uint8 mask per term (``<name>`` is the canonical term; free text
  is turned into a file-safe name). Masks of different terms may overlap.
* ``labels.nii.gz`` + ``labels.json``: one label map and its table (value -> canonical term,
  prompt, ``free_text``, ``trained``: False for a term the model was never trained on, allowed only
  with ``allow_untrained``; ``postprocess``: the rule applied, ``"largest_component"``,
  ``"lung_outline"`` (CT, the five lobes prompted: filled to the lungs' air,
  :mod:`volumed.inference.lungs`) or ``null``). **Priority rule**: a voxel above threshold for several terms
  gets the term with the highest probability there; exact ties go to the earlier prompt. Values
  are never summed, so the map holds only the listed values.
* ``statistics.json``: the ``threshold``, and per term: ``value``, ``prompt``, ``free_text``,
  ``trained``; ``present`` (the mask is not empty: a structure not in the image gets an empty
  mask and ``present: false``); ``confidence`` (mean probability inside the mask, exact) and
  ``max_probability`` (exact peak) for a present term, ``null`` for an absent one;
  ``max_probability_bound`` for an absent term (an upper bound of its probability anywhere,
  at most the threshold; ``null`` for a present one); volume (mL), intensity (HU for CT),
  bounding boxes (voxels and RAS mm), connected components (see :mod:`volumed.inference.stats`);
  ``postprocess`` (the rule applied, or ``null``) and ``removed_components`` (the components it
  dropped on the model grid), ``removed_outside_body_ml`` (CT: mL of the mask that lay outside the
  patient's body and was removed; ``null`` for MR or without post-processing). All measured on
  the post-processed masks. A mask turned away is
  absent with ``rejected``: its volume, mean and peak probability, and ``rule``: ``"presence"``
  (the package's presence rule: small and unsure; a lobe of at least 1 mL of a lung the lobe
  atlas split is exempt) or ``"anatomy"`` (the anatomy check: it lies on
  the axial slices of found structures it never shares a slice with, a femur beside the liver;
  ``conflicts_with`` names them, :mod:`volumed.data.craniocaudal`) or ``"outside_body"`` (CT: all
  of it lay outside the patient's body) or ``"hu"`` (CT without contrast, its own aorta under 100
  HU: an enhancing tissue brighter than its native range allows, :func:`_native_hu_rejects`).
  ``hu_check`` (CT, present terms): the mask's mean HU against its tissue's prior
  (:func:`volumed.inference.stats.hu_check`); an implausible one is flagged in the summary too.
* ``preview.png``: three orthogonal slices with the label map and a legend naming each colour
  (present terms, ``(untrained)`` where so), and a line listing the absent terms.
* ``report.txt``: the findings in words (image, model, then the summary's found / absent lines,
  :func:`findings_lines`). Plain text, not a radiology report (``report_sr.dcm`` is the DICOM SR).
* ``segmentation.dcm``: a DICOM SEG of the label map, when the input is a DICOM series with
  Study/Series/Frame-of-Reference UIDs, one segment per term in the label map; its
  SegmentDescription gives the prompt and the confidence, and an untrained term's SegmentLabel
  and SegmentDescription say "untrained". A series without the UIDs (anonymised) gets no SEG: a
  warning is recorded in the result (and printed by the CLI); every other output is still written.
* ``report_sr.dcm``: with every SEG, a DICOM SR (Comprehensive 3D SR, TID 1500 Measurement Report,
  :mod:`volumed.io.sr`) in the same study: per present term a measurement group referencing its
  SEG segment with the volume (mL), mean intensity (HU), confidence and peak probability of
  ``statistics.json``; per absent term a group saying "Absent" with the bound of its probability.
  No SEG (a series without UIDs, or nothing found), no SR. Codes: docs/coding.md.

Post-processing (:mod:`volumed.inference.postprocess`): a structure that is one connected body
keeps only its largest 26-connected component, found on the model grid before inversion, so
scattered false-positive fragments elsewhere disappear and the kept component's probabilities are
those of the raw output, voxel for voxel. The rule of each term comes from its kind (one-body
TotalSegmentator class or not), the package's ``config.postprocess`` and the caller's
``postprocess`` (``False``, ``--no-postprocess``: every component of every term, the raw output).
On a CT, post-processing also keeps every mask inside the patient's body
(:func:`volumed.inference.body.body_mask`: the tissue above -500 HU, the table and blankets
dropped, the lungs filled, 5 mm of margin): no organ lies on the table or in the air around the
patient, where a model that never saw that scanner's table may put one (a leave-one-out model put
"small bowel" under the tcia scan's patient, docs/synthesis.md round 15). A structure with no
voxel left inside the body is absent with ``rejected.rule = "outside_body"``.

Untrained terms: a prompt for a term not in the package's ``terms`` (a vocabulary term the model
never saw, or free text other than a trained one) would get a mask that means nothing, so it is
refused (``ConfigError`` naming it and listing the trained terms) unless ``allow_untrained``; then
it is flagged untrained in labels.json, statistics.json, the summary, the preview legend and the
SEG. ``all_terms`` adds trained terms only.

Atomicity: all files are first written into a hidden staging folder next to ``out_dir`` and
moved in only when everything succeeded, so a failure leaves no partial output. Existing outputs
are refused (``OutputExistsError``) before any computation unless ``overwrite=True``; with it,
outputs of an earlier run that this run does not produce (masks of other terms, an old SEG) are
removed so the folder stays consistent.

Small images: a model-space image smaller than ``patch_size`` is padded to it as the package's
training patches were (``config.pad_mode``: mirrored at its edges, or 0, air for CT, in packages
written before the field existed) and the prediction is cropped back, so outputs are still on
the input grid.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from volumed.data.craniocaudal import TRIM, Found, implausible_terms, s_extent
from volumed.data.lobe_atlas import SIDES
from volumed.data.transforms import BoxInverter, PreprocessConfig, PreprocessedCase, pad_spatial, preprocess
from volumed.data.vocab import ResolvedTerm, Vocabulary, default_vocabulary, normalize_text
from volumed.errors import ConfigError, InvalidVolumeError, OutputExistsError, VolumedError
from volumed.inference.blending import WindowLogits, _bounding_box, importance_map
from volumed.inference.package import PromptSegConfig, TextPromptedSegmenter, load_package, package_version, read_config
from volumed.inference.body import body_mask
from volumed.inference.lungs import LOBES, LUNG_OUTLINE, outline_lobes
from volumed.inference.postprocess import (
    LARGEST_COMPONENT,
    RULE_DESCRIPTIONS,
    ComponentFilter,
    Postprocessing,
    check_rules,
    postprocess_rules,
)
from volumed.inference.stats import (
    MaskEvidence,
    TermStatistics,
    anatomy_evidence,
    compute_statistics,
    hu_check,
    mask_evidence,
    ml_text,
    native_hu_evidence,
    outside_body_evidence,
    presence_rejects,
    rejected_evidence,
    rejection_text,
)
from volumed.io import read_volume
from volumed.environment import software_versions
from volumed.io.atomic import atomic_write_text, check_creatable
from volumed.io.masks import BoxMask
from volumed.io.volume import Volume
from volumed.text.encoder import TextEncoder

if TYPE_CHECKING:  # the writer is imported where it is used; MONAI only for the annotation
    from monai.inferers import SlidingWindowInferer

    from volumed.io.writer import DicomOutputUids

__all__ = [
    "LABELS_NAME",
    "TABLE_NAME",
    "STATISTICS_NAME",
    "PREVIEW_NAME",
    "SEG_NAME",
    "SR_NAME",
    "REPORT_NAME",
    "REPORT_JSON_NAME",
    "MASKS_DIR",
    "PRIORITY_RULE",
    "Prediction",
    "PromptSegPredictor",
    "SegmentedTerm",
    "SegmentationResult",
    "default_model_dir",
    "findings_lines",
    "is_trained",
    "mask_file_name",
    "refuse_untrained",
    "read_package_config",
    "resolve_prompts",
    "segment",
]

log = logging.getLogger(__name__)

LABELS_NAME = "labels.nii.gz"
TABLE_NAME = "labels.json"
STATISTICS_NAME = "statistics.json"
PREVIEW_NAME = "preview.png"
SEG_NAME = "segmentation.dcm"
SR_NAME = "report_sr.dcm"
REPORT_NAME = "report.txt"
#: Written by ``volumed report`` (volumed.inference.reporting) into the same folder: listed here so
#: that an earlier run's report.json counts as an output (refused without overwrite) and goes with
#: the rest when a run replaces the folder's outputs.
REPORT_JSON_NAME = "report.json"
MASKS_DIR = "masks"
_TOP_LEVEL_OUTPUTS = (LABELS_NAME, TABLE_NAME, STATISTICS_NAME, PREVIEW_NAME, REPORT_NAME, REPORT_JSON_NAME, SEG_NAME,
                      SR_NAME)
#: Terms are blended in chunks of at most this many (term, coarse cell) pairs (4 bytes each, a few maps).
_CHUNK_CELLS = 1 << 24
#: A lobe of a lung the lobe atlas split is exempt from the presence rule from this size (mL).
ATLAS_LOBE_MIN_ML = 1.0

#: At most this many coarse cells are blended to find the peak of an absent term (a few ms).
_PEAK_CELLS = 1 << 15

PRIORITY_RULE = (
    "a voxel above threshold for several terms gets the term with the highest probability; "
    "ties go to the earlier prompt; per-term masks in masks/ keep the overlaps"
)


def default_model_dir() -> Path:
    """``<repo>/bundles/volumed_promptseg_ct/models``: where the trained default package lives."""
    return Path(__file__).resolve().parents[2] / "bundles" / "volumed_promptseg_ct" / "models"


def mask_file_name(name: str) -> str:
    """File-safe stem for a term: canonical names are kept; free text becomes ``a_b_c``."""
    if re.fullmatch(r"[A-Za-z0-9_]+", name):
        return name
    return normalize_text(name).replace(" ", "_") or "term"


# ------------------------------------------------------------------------------ model, prompts


def read_package_config(model_dir: str | Path | None = None) -> tuple[Path, PromptSegConfig]:
    """The package folder (default :func:`default_model_dir`) and its config, without the weights:
    cheap, so prompts and modality are checked before the network is built."""
    path = Path(model_dir) if model_dir is not None else default_model_dir()
    if not path.is_dir():
        hint = "pass --model DIR (a folder with config.json and model.safetensors)"
        if model_dir is None:
            hint += ", or train the default model: volumed train promptseg --config configs/train_promptseg-cpu.yaml"
        raise ConfigError(f"no segmentation model folder here; {hint}", path)
    return path, read_config(path)


def resolve_prompts(
    prompts: Sequence[str],
    modality: str,
    *,
    trained_terms: Sequence[str] = (),
    all_terms: bool = False,
    allow_free_text: bool = False,
    vocabulary: Vocabulary | None = None,
) -> list[ResolvedTerm]:
    """Prompts -> resolved terms for an image of ``modality``.

    ``all_terms`` appends every trained term that exists in ``modality`` and was not already
    asked for, after the explicit prompts (in ``trained_terms`` order). A prompt outside the
    vocabulary is accepted without ``allow_free_text`` when it is one of ``trained_terms`` (a term
    the model was trained on as free text, e.g. "pulmonary artery"); it stays flagged free text.

    Raises:
        ConfigError: no prompts (and not ``all_terms``), duplicates, a term not available in
            this modality, or ``all_terms`` with no trained term available in ``modality``.
        UnknownTermError: an unknown prompt without ``allow_free_text`` (3 suggestions).
    """
    vocab = vocabulary or default_vocabulary()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not allow_free_text and prompts:
        # A prompt outside the vocabulary that the model was trained on as that very text ("pulmonary
        # artery") needs no --free-text: its mask means what it says (as the bundle runner accepts it).
        trained_text = {normalize_text(t) for t in trained_terms}
        for prompt in prompts:
            if not (isinstance(prompt, str) and (vocab.lookup(prompt) is not None
                                                 or normalize_text(prompt) in trained_text)):
                vocab.resolve(prompt, modality)  # raises: unknown term (or an empty prompt)
        allow_free_text = True
    if not all_terms:
        return vocab.resolve_all(prompts, modality=modality, allow_free_text=allow_free_text)
    # Trained vocabulary terms that exist in this modality, and terms trained as free text (not in
    # the vocabulary, e.g. "pulmonary artery"; they have no modality table, so they always come).
    trained = [t for t in trained_terms if t not in vocab or vocab.label_ids(t, modality)]
    if not trained:
        raise ConfigError(
            f"--all: the model lists no trained terms available in {modality} (config.terms = {list(trained_terms)})",
            "prompts",
        )
    resolved = vocab.resolve_all(prompts, modality=modality, allow_free_text=allow_free_text) if prompts else []
    asked = {normalize_text(r.name) for r in resolved}
    for name in trained:
        if normalize_text(name) in asked:
            continue
        if name in vocab:
            resolved.append(vocab.resolve(name, modality))
        else:
            resolved.append(ResolvedTerm(name, None, name, True, modality, (), name))
    return resolved


def is_trained(term: ResolvedTerm, trained_terms: Sequence[str]) -> bool:
    """Whether the model was trained on ``term`` (canonical name, or the same free text)."""
    return normalize_text(term.name) in {normalize_text(t) for t in trained_terms}


def refuse_untrained(terms: Sequence[ResolvedTerm], trained_terms: Sequence[str]) -> None:
    """Raise unless the model was trained on every term (see :func:`is_trained`).

    A model asked for a structure it never learned still answers, with masks that mean nothing;
    ``volumed segment`` refuses such prompts unless ``allow_untrained`` (``--allow-untrained``).

    Raises:
        ConfigError: naming each untrained prompt and listing the terms the model was trained on.
    """
    untrained = [t for t in terms if not is_trained(t, trained_terms)]
    if not untrained:
        return
    asked = ", ".join(repr(t.prompt) + ("" if normalize_text(t.prompt) == normalize_text(t.name) else f" ({t.name})")
                      for t in untrained)
    raise ConfigError(
        f"the model was not trained on {asked}; it was trained on: {', '.join(trained_terms) or 'nothing'} "
        "(volumed segment --list-terms); pass allow_untrained=True (--allow-untrained) to segment "
        f"{'it' if len(untrained) == 1 else 'them'} anyway, flagged untrained in every output",
        "prompts",
    )


# ----------------------------------------------------------------------------------- prediction


@dataclass
class Prediction:
    """Masks of ``N`` terms on the original grid of one image.

    Attributes:
        label_map: ``(X, Y, Z)`` uint8/uint16, value ``k + 1`` for term ``k`` (priority rule above).
        masks: ``N`` bool arrays ``(X, Y, Z)`` (overlaps kept), or ``None`` when they were handed
            to an ``on_mask`` callback instead of being kept (each as a
            :class:`volumed.io.masks.BoxMask`: bounded memory on large images).
        evidence: per term, whether it was found and how sure the model is: mean and peak
            probability inside a present mask (exact), an upper bound of the probability of an
            absent one (:class:`volumed.inference.stats.MaskEvidence`).
        seconds: wall time per stage: ``queries`` (text), ``preprocess``, ``sliding_window``,
            ``invert`` (post-processing, inversion, threshold, label map and ``on_mask`` callbacks),
            and ``postprocess``, the part of ``invert`` spent on connected components.
        postprocessing: per term, the connected-component rule applied on the model grid and how
            many components it removed (:class:`volumed.inference.postprocess.Postprocessing`);
            masks, evidence and label map are those after it.
    """

    label_map: np.ndarray
    masks: list[np.ndarray] | None
    evidence: list[MaskEvidence] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    postprocessing: list[Postprocessing] = field(default_factory=list)


def _within(inner: Sequence[tuple[int, int]], outer: Sequence[tuple[int, int]]) -> tuple[slice, ...]:
    """Slices that cut box ``inner`` out of an array holding box ``outer`` (both on one grid)."""
    return tuple(slice(a - a0, b - a0) for (a, b), (a0, _) in zip(inner, outer))


def _box_above(
    values: torch.Tensor, threshold: float, box: Sequence[tuple[int, int]], grid: Sequence[int]
) -> tuple[tuple[int, int], ...] | None:
    """The voxels of ``values`` (the model-grid ``box``) above ``threshold``: their bounding box
    grown by one voxel (what trilinear resampling reads), within the model ``grid``; ``None`` if
    none is."""
    lo, hi = _bounding_box(values > threshold)
    if lo is None:
        return None
    return tuple((max(0, a0 + a - 1), min(n, a0 + b + 1)) for (a0, _), a, b, n in zip(box, lo, hi, grid))


def _pieces_box(pieces) -> tuple[tuple[int, int, int], np.ndarray]:
    """The start and an all-False bool crop of the box that holds every piece of
    :meth:`PromptSegPredictor.iter_original` (boxes of slices, or voxel index arrays)."""
    lo, hi = [None] * 3, [None] * 3
    for where, _ in pieces:
        if isinstance(where[0], slice):
            bounds = [(w.start, w.stop) for w in where]
        elif len(where[0]):
            bounds = [(int(a.min()), int(a.max()) + 1) for a in where]
        else:
            continue
        for d, (a, b) in enumerate(bounds):
            lo[d] = a if lo[d] is None else min(lo[d], a)
            hi[d] = b if hi[d] is None else max(hi[d], b)
    if lo[0] is None:
        return (0, 0, 0), np.zeros((0, 0, 0), dtype=bool)
    return tuple(int(a) for a in lo), np.zeros([b - a for a, b in zip(lo, hi)], dtype=bool)


def _windowing_of(inferer, config: PromptSegConfig) -> tuple[PromptSegConfig, int]:
    """``config`` with the ``roi_size`` and ``overlap`` of a MONAI ``SlidingWindowInferer``, and its
    ``sw_batch_size``. Refuses what the predictor cannot reproduce (another blending mode)."""
    from dataclasses import replace

    from monai.inferers import SlidingWindowInferer

    if not isinstance(inferer, SlidingWindowInferer):
        raise ConfigError(f"inferer must be a monai.inferers.SlidingWindowInferer, got {type(inferer).__name__}", "inferer")
    if str(inferer.mode) not in ("gaussian", "BlendMode.GAUSSIAN") or inferer.sigma_scale not in (0.125, [0.125] * 3, (0.125,) * 3):
        raise ConfigError(f"inferer: the predictor blends windows as mode='gaussian', sigma_scale=0.125; got mode={inferer.mode!r}, "
                          f"sigma_scale={inferer.sigma_scale!r}", "inferer")
    roi = tuple(int(r) for r in inferer.roi_size)
    if len(roi) != 3 or min(roi) < 1:
        raise ConfigError(f"inferer: roi_size must be three positive sizes, got {inferer.roi_size!r}", "inferer")
    overlap = inferer.overlap
    if not isinstance(overlap, (int, float)):
        values = {float(v) for v in overlap}
        if len(values) != 1:
            raise ConfigError(f"inferer: one overlap for all axes, got {overlap!r}", "inferer")
        overlap = values.pop()
    return replace(config, patch_size=roi, overlap=float(overlap)), int(inferer.sw_batch_size)


class PromptSegPredictor:
    """A loaded text-prompted segmenter, ready to segment images with any number of prompts.

    Args:
        model: the network (``load_package``); put in eval mode and moved to ``device``.
        config: the package's :class:`PromptSegConfig` (preprocessing, patch, overlap, threshold).
        text_encoder: encoder of the prompts; by default the one named by ``config.text_model``,
            checked against ``config.text_model_hash`` (another model's embeddings would mean
            nothing to the decoder).
        vocabulary: prompt resolution; default :func:`default_vocabulary`.
        device: where the network runs. With a coarse decoder (the default models) the windows'
            logits stay there and are blended there (:class:`WindowLogits`); only the voxels above
            the threshold come back to the host. A full-resolution decoder's windows are blended
            by MONAI on the CPU.
        sw_batch_size: windows per forward pass.
        lazy_blending: False makes MONAI blend every term at full resolution in every window (the
            reference the lazy path is tested against; same masks, slower with many prompts).
        preprocessing: a transform taking ``{"image": Volume}`` to ``{"image": MetaTensor (1, x, y,
            z)}`` in model space, as a MONAI bundle's ``preprocessing`` does (its first step,
            :class:`volumed.bundle.transforms.LoadVolumed`, passes a ``Volume`` through); default
            :func:`volumed.data.transforms.build_preprocessing` of ``config.preprocessing``. Its
            geometric steps must be MONAI invertible transforms: the inversion reads their trace.
        inferer: a MONAI ``SlidingWindowInferer`` whose ``roi_size``, ``overlap`` and
            ``sw_batch_size`` replace the package's ``patch_size``, ``overlap`` and
            ``sw_batch_size`` (a bundle's ``inferer``). Its mode must be ``"gaussian"`` with the
            default ``sigma_scale``, the blending that :class:`WindowLogits` reproduces exactly.
        lobe_atlas: the lobe atlas that splits an outlined lung into lobes
            (:func:`volumed.data.lobe_atlas.load_atlas` or ``build_atlas``); default the shipped
            one. A benchmark passes an atlas without the scan it tests.

    Sliding-window blending: when the decoder predicts on a coarse grid (``pixel_levels``
    without the stride-1 map, as in the default model), the windows are blended exactly but
    lazily, per term and only where its mask can be (:class:`volumed.inference.blending.WindowLogits`),
    so extra prompts cost far less than extra model runs (bench/bench_prompts.py).
    """

    def __init__(
        self,
        model: TextPromptedSegmenter,
        config: PromptSegConfig,
        *,
        text_encoder: TextEncoder | None = None,
        vocabulary: Vocabulary | None = None,
        device: str | torch.device = "cpu",
        sw_batch_size: int = 1,
        lazy_blending: bool = True,
        preprocessing: Callable[[dict], dict] | None = None,
        inferer: "SlidingWindowInferer | None" = None,
        lobe_atlas: "Mapping[str, np.ndarray] | None" = None,
    ):
        if inferer is not None:
            config, sw_batch_size = _windowing_of(inferer, config)
        if sw_batch_size < 1:
            raise ConfigError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        self.preprocessing = preprocessing
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = config
        self.vocabulary = vocabulary or default_vocabulary()
        self._text_encoder = text_encoder  # loaded on first use: callers with embeddings never need it
        self.sw_batch_size = int(sw_batch_size)
        self.lazy_blending = bool(lazy_blending)
        self.lobe_atlas = lobe_atlas

    @property
    def text_encoder(self) -> TextEncoder:
        if self._text_encoder is None:
            self._text_encoder = self._load_text_encoder(self.config)
        return self._text_encoder

    @classmethod
    def from_package(cls, model_dir: str | Path | None = None, *, device: str | torch.device = "cpu", **kwargs) -> "PromptSegPredictor":
        """Load a package folder (``config.json`` + ``model.safetensors``); default :func:`default_model_dir`.
        A bundle's ``models/`` folder has its weights checked against the bundle's sha256 first
        (:func:`volumed.bundle.integrity.verify_bundle_package`)."""
        from volumed.bundle.integrity import verify_bundle_package

        path, _ = read_package_config(model_dir)
        verify_bundle_package(path)
        model, config = load_package(path)
        return cls(model, config, device=device, **kwargs)

    @staticmethod
    def _load_text_encoder(config: PromptSegConfig) -> TextEncoder:
        encoder = TextEncoder(None if config.text_model == "default" else config.text_model)
        if config.text_model_hash and encoder.model_hash != config.text_model_hash:
            raise ConfigError(
                f"the model was trained with text model hash {config.text_model_hash[:12]}..., but "
                f"{encoder.model_dir} hashes to {encoder.model_hash[:12]}...; its embeddings would be meaningless",
                "text_model",
            )
        if encoder.dim != config.text_dim:
            raise ConfigError(f"text model gives {encoder.dim}-d embeddings, the model expects {config.text_dim}", "text_model")
        return encoder

    # -- prompts ---------------------------------------------------------------------------------

    def resolve_prompts(
        self, prompts: Sequence[str], modality: str, *, all_terms: bool = False, allow_free_text: bool = False
    ) -> list[ResolvedTerm]:
        """:func:`resolve_prompts` with this model's trained terms and vocabulary."""
        return resolve_prompts(prompts, modality, trained_terms=self.config.terms, all_terms=all_terms,
                               allow_free_text=allow_free_text, vocabulary=self.vocabulary)

    def prompt_texts(self, terms: Sequence[ResolvedTerm]) -> list[str]:
        """Text embedded for each term, as in training (``volumed.tasks.promptseg.encode_terms``):
        the canonical name ("kidney_left") for vocabulary terms, so every synonym ("left kidney",
        "Left Kidney") gives the same query; the stripped prompt for free text."""
        return [t.name for t in terms]

    def term_queries(self, terms: Sequence[ResolvedTerm], modality: str) -> torch.Tensor:
        """Modality-conditioned term queries ``(N, D_text)`` on the model's device."""
        text = self.text_encoder.encode_cached(self.prompt_texts(terms)).to(self.device)
        with torch.inference_mode():
            return self.model.condition(text, modality)

    def postprocess_rules(
        self, terms: Sequence[ResolvedTerm], postprocess: bool | Mapping[str, str | None] = True
    ) -> list[str | None]:
        """Each term's connected-component rule (:mod:`volumed.inference.postprocess`): the
        default of its kind, overridden by the package's ``config.postprocess``, then by
        ``postprocess`` when it is a mapping; all ``None`` when ``postprocess`` is False."""
        if not isinstance(postprocess, Mapping) and not postprocess:
            return [None] * len(terms)
        overrides = [self.config.postprocess] + ([postprocess] if isinstance(postprocess, Mapping) else [])
        return postprocess_rules(terms, *overrides, vocabulary=self.vocabulary)

    # -- inference -------------------------------------------------------------------------------

    def preprocess(self, volume: Volume) -> PreprocessedCase:
        """The image in model space with the package's preprocessing (modality = the image's), or
        with the ``preprocessing`` transform given to the predictor."""
        settings = PreprocessConfig(**{**self.config.preprocessing, "modality": volume.modality})
        if self.preprocessing is None:
            return preprocess(volume, None, settings)
        if settings.crop_foreground and volume.modality == "CT" and not np.any(volume.data > settings.ct_foreground_hu):
            # preprocess() refuses this too: a crop to nothing would fail inside MONAI with no file name.
            raise InvalidVolumeError(
                f"no voxel above {settings.ct_foreground_hu} HU to crop to; is this CT in Hounsfield units?", volume.source.path
            )
        image = self.preprocessing({settings.image_key: volume})[settings.image_key]
        return PreprocessedCase(image=image, label=None, transform=self.preprocessing, config=settings, original=volume)

    def _decoder_stride(self, model_shape: Sequence[int]) -> tuple[int, int, int] | None:
        """Stride of the decoder's per-voxel embedding when windows can be blended lazily from
        coarse logits (:class:`WindowLogits`): coarser than the input, dividing the patch and the
        window interval (so every window starts on a whole coarse cell); else ``None``."""
        decoder = self.model.segmenter.decoder
        stride = tuple(int(v) for v in decoder.feature_info[decoder.pixel_levels[0]].stride)
        if stride == (1, 1, 1) or not self.lazy_blending:
            return None
        for r, s, n in zip(self.config.patch_size, stride, model_shape):
            interval = int(int(r) * (1 - float(self.config.overlap)))  # MONAI's _get_scan_interval
            if int(r) % s or (n > int(r) and interval % s):
                return None
        return stride  # type: ignore[return-value]

    def predict_probabilities(
        self, case: PreprocessedCase, queries: torch.Tensor, *, progress: bool = False
    ) -> "torch.Tensor | WindowLogits":
        """Sigmoid probabilities of ``N`` terms on the model grid.

        MONAI's ``sliding_window_inference`` places windows of ``config.patch_size`` (the image is
        first padded to at least one patch as ``config.pad_mode`` says) and runs the network;
        per window the encoder runs once and the decoder answers all ``N`` terms.

        Returns:
            When the decoder predicts on a coarse grid (:meth:`_decoder_stride`; the image is then
            also padded to a multiple of the stride), a
            :class:`WindowLogits`: every window's coarse logits, blended exactly on demand
            (gaussian weights, as MONAI's ``mode="gaussian"``) but only where each term can exceed
            the threshold. Otherwise ``(N, x, y, z)`` float32 probabilities: the windows' logits
            blended by MONAI at full resolution, then the sigmoid.
        """
        segmenter = self.model.segmenter
        image = case.image.as_tensor()[None].to(torch.float32)  # (1, 1, x, y, z)
        model_shape = tuple(int(s) for s in image.shape[2:])
        roi = tuple(int(s) for s in self.config.patch_size)
        stride = self._decoder_stride(model_shape)
        common = dict(roi_size=roi, sw_batch_size=self.sw_batch_size, overlap=float(self.config.overlap),
                      mode="gaussian", progress=progress, sw_device=self.device, device=torch.device("cpu"))
        pad_mode = getattr(self.config, "pad_mode", "constant")
        if stride is None:

            def full_resolution(window: torch.Tensor) -> torch.Tensor:
                # One encoder pass per window answers every term: the decoder is term-independent.
                # Logits are blended and the sigmoid follows, as in MONAI's model-zoo bundles.
                return segmenter(window, queries)

            # Pad to at least the patch ourselves, as training did (MONAI would pad with 0), then
            # keep the model grid only.
            padded = [max(r, n) for n, r in zip(model_shape, roi)]
            offset = tuple((p - n) // 2 for n, p in zip(model_shape, padded))
            pads = [v for n, p, o in reversed(list(zip(model_shape, padded, offset))) for v in (o, p - n - o)]
            with torch.inference_mode():
                probs = sliding_window_inference(pad_spatial(image, pads, pad_mode), predictor=full_resolution, **common)
            probs = torch.sigmoid(torch.as_tensor(probs)[0].float())
            return probs[(slice(None), *(slice(o, o + n) for o, n in zip(offset, model_shape)))].contiguous()

        # Pad (as the package's training did: mirrored, or 0, air for CT) to at least the patch and
        # to a multiple of the stride, half before as MONAI would; MONAI then pads nothing, and
        # every window starts on a whole coarse cell of the padded image.
        padded = [max(r, -(-n // s) * s) for n, r, s in zip(model_shape, roi, stride)]
        offset = tuple((p - n) // 2 for n, p in zip(model_shape, padded))
        pads = [v for n, p, o in reversed(list(zip(model_shape, padded, offset))) for v in (o, p - n - o)]
        image = pad_spatial(image, pads, pad_mode)
        coarse = [r // s for r, s in zip(roi, stride)]
        logits: list[torch.Tensor] = []
        origins: list[tuple[int, ...]] = []

        def coarse_logits(window: torch.Tensor, where: Sequence[Sequence[slice]]) -> torch.Tensor:
            # Kept on the network's device: WindowLogits blends there and hands out only the hot voxels.
            out = segmenter.decode(segmenter.encode_image(window), queries, coarse).float()
            for b, slices in enumerate(where):
                logits.append(out[b].clone())
                origins.append(tuple(int(sl.start) for sl in slices[2:]))
            # MONAI blends this placeholder (one coarse channel, negligible); WindowLogits blends the terms.
            return torch.zeros((out.shape[0], 1, *coarse), device=window.device)

        with torch.inference_mode():
            sliding_window_inference(image, predictor=coarse_logits, with_coord=True, **common)
        return WindowLogits(logits, origins, roi, stride, image.shape[2:], model_shape, offset, importance_map(roi))

    @staticmethod
    def max_probability_bounds(probs: "torch.Tensor | WindowLogits", terms: Sequence[int]) -> np.ndarray:
        """``(len(terms),)`` float: per term, an upper bound of its probability at every voxel of
        the model grid, hence of the original grid (inverting forms convex combinations of model
        voxels, or 0 outside the crop). Used for the terms found absent.

        For a probability tensor: its maximum. For :class:`WindowLogits`: the exact maximum of the
        blend on the model grid, found by branch and bound over the coarse cells, so that only a
        few cells are blended: every cell has an upper bound (:meth:`WindowLogits.bound_for`); the
        cell with the largest bound, blended exactly (:meth:`WindowLogits.blend_cells`), gives a
        lower bound ``L`` of the maximum; then the cells whose bound exceeds ``L`` are blended, as
        no other can hold the maximum. Should more than ``_PEAK_CELLS`` cells exceed ``L`` (a
        broad plateau), only the ``_PEAK_CELLS`` with the largest bounds are blended and the result
        is the larger of their maximum and the largest bound left: still an upper bound, not exact.
        (The sigmoid of the largest coarse logit of any window is also an upper bound and costs
        nothing, but on real CTs some window's logit of almost every term is positive somewhere,
        so it is close to 1 even for absent terms.)
        """
        terms = list(terms)
        if not terms:
            return np.zeros(0)
        if not isinstance(probs, WindowLogits):
            probs = torch.as_tensor(probs)
            return np.array([float(probs[k].max()) if probs[k].numel() else 0.0 for k in terms])
        stride, offset, shape = (torch.tensor(v) for v in (probs.stride, probs.offset, probs.model_shape))
        fine = torch.cartesian_prod(*(torch.arange(v) for v in probs.stride)).reshape(-1, 3)  # (s^3, 3), blend_cells' order
        grid = probs.bound_shape

        def exact_max(part: list[int], rows: torch.Tensor) -> torch.Tensor:
            """``(len(part),)``: the largest blend at the model-grid voxels of the coarse cells
            ``rows`` ((M, 2): index into ``part``, flat cell), 0 for a term without rows."""
            cells = torch.from_numpy(np.stack(np.unravel_index(rows[:, 1].numpy(), grid), 1)).long().reshape(-1, 3)
            values = probs.blend_cells(part, torch.cat([rows[:, :1], cells], 1))
            voxels = cells[:, None, :] * stride + fine[None] - offset  # (M, s^3, 3) model-grid voxels
            values[~((voxels >= 0) & (voxels < shape)).all(dim=2)] = 0.0
            return torch.zeros(len(part)).scatter_reduce_(0, rows[:, 0], values.amax(dim=1), "amax")

        out = np.zeros(len(terms))
        chunk = max(1, _CHUNK_CELLS // max(1, math.prod(grid)))
        for first in range(0, len(terms), chunk):
            part = terms[first : first + chunk]
            bounds = probs.bound_for(part).flatten(1)  # (T, cells); cells wholly in the padding: 0
            index = torch.arange(len(part))
            lower = exact_max(part, torch.stack([index, bounds.argmax(dim=1)], 1))  # at each term's top cell
            rows = (bounds > lower[:, None]).nonzero()  # the cells that may hold a larger value
            left = torch.zeros(len(part))  # the largest bound of the cells not blended
            counts = torch.bincount(rows[:, 0], minlength=len(part))
            for t in (counts > _PEAK_CELLS).nonzero().flatten().tolist():  # broad plateaus: rare
                ranked = bounds[t].masked_fill(bounds[t] <= lower[t], -1.0).topk(_PEAK_CELLS + 1)
                left[t] = ranked.values[-1]
                rows = torch.cat([rows[rows[:, 0] != t], torch.stack([torch.full((_PEAK_CELLS,), t), ranked.indices[:-1]], 1)])
            peak = exact_max(part, rows) if len(rows) else torch.zeros(len(part))
            out[first : first + len(part)] = torch.maximum(torch.maximum(lower, peak), left).double().numpy()
        return out

    def iter_original(
        self, probs: "torch.Tensor | WindowLogits", case: PreprocessedCase, components: ComponentFilter | None = None,
        skip: Collection[int] = (),
    ) -> Iterator[tuple[int, list[tuple[tuple, np.ndarray]] | None]]:
        """Yield ``(term index, pieces)`` on the original grid: ``pieces`` is a list of ``(where,
        probabilities)``, either a box (``where`` a tuple of slices of the original grid,
        ``probabilities`` its float32 values) or voxels (``where`` a tuple of three index arrays,
        ``probabilities`` 1-D, only voxels above ``config.threshold``, each once). Both index a
        numpy array of the original grid the same way. Boxes may overlap (the values agree there
        wherever they exceed the threshold).

        Only what is around each structure is computed. For :class:`WindowLogits`, the coarse
        cells where the blend can exceed ``config.threshold`` are blended exactly, all terms at
        once; then, when the model grid is the original grid up to flips, the voxels above the
        threshold are copied to their original indices (:meth:`WindowLogits.hot_voxels`); else
        each group of those cells makes a box, narrowed to the voxels above the threshold, grown
        by one voxel and resampled box to box (:class:`volumed.data.transforms.BoxInverter`). For a
        probability tensor, the box of the voxels above the threshold is inverted. Trilinear
        resampling only forms convex combinations, so outside the boxes the inverted probability
        is at most the threshold; inside, it is exact wherever it can exceed it. Masks
        (``> threshold``) and the label map are therefore those of a whole-grid inversion, at the
        cost of the structures.

        ``components`` (:class:`volumed.inference.postprocess.ComponentFilter`) applies each
        term's connected-component rule on the model grid, before inversion: of a term whose rule
        is ``largest_component``, only the voxels above the threshold of its largest 26-connected
        component are kept (voxels of the others dropped from the voxel lists, set to 0 in the
        boxes). Two components are separated by voxels at most the threshold, so no 2 x 2 x 2
        trilinear cell holds voxels of both: the kept component's inverted values are exact, voxel
        for voxel those of the raw output (the module docstring of
        :mod:`volumed.inference.postprocess` gives the argument). Without it, every component is kept.

        Terms come in prompt order; a :class:`WindowLogits` blends them in chunks (all at once
        unless the image is large, ``_CHUNK_CELLS``), a probability tensor one at a time. A term
        nowhere above the threshold yields ``None`` (structures outside the field of view cost
        nothing), and so does a term of ``skip`` without being computed (the caller makes its
        pieces otherwise: the lobes filled to the lungs' air).
        """
        threshold = float(self.config.threshold)
        components = components or ComponentFilter([], threshold)
        whole = tuple((0, n) for n in case.model_shape)
        invert = BoxInverter(case)
        if isinstance(probs, WindowLogits):
            # Terms are blended in chunks that keep the coarse maps of a chunk within ~64 MB.
            chunk = max(1, _CHUNK_CELLS // max(1, math.prod(probs.bound_shape)))
            for first in range(0, probs.num_terms, chunk):
                chunk_terms = range(first, min(first + chunk, probs.num_terms))
                terms = [k for k in chunk_terms if k not in skip]
                yield from _in_order(self._chunk_pieces(probs, invert, components, terms, case),
                                     [k for k in chunk_terms if k in skip])
            return
        for k in range(len(probs)):  # one term at a time: memory holds one term's boxes
            if k in skip:
                yield k, None
                continue
            term = components.tensor(k, torch.as_tensor(probs[k]))
            tight = _box_above(term, threshold, whole, case.model_shape)
            yield k, self._invert_boxes(invert, [(tight, term[_within(tight, whole)])] if tight is not None else [])

    def _chunk_pieces(self, probs: WindowLogits, invert: BoxInverter, components: ComponentFilter,
                      terms: Sequence[int], case: PreprocessedCase) -> Iterator[tuple[int, list | None]]:
        """:meth:`iter_original` for one chunk of terms of a :class:`WindowLogits`, in order."""
        if not terms:
            return
        threshold = float(self.config.threshold)
        if invert.is_index_copy:  # no resampling: only the voxels above the threshold matter
            for k, voxels, values in probs.hot_voxels(terms, threshold):
                where, inside = invert.copy_voxels(voxels.numpy())
                values = values.numpy()[inside]
                if components.applies(k):
                    # The copy maps model voxels one to one (flips, axis order, a shift), so
                    # the components of the copied voxels are the model grid's, less the
                    # voxels beyond the original grid: exactly those of the mask.
                    kept, values = components.voxels(k, np.stack(where, 1), values)
                    where = tuple(kept.T)
                yield k, [(where, values)] if len(values) else None
            return
        for k, regions in probs.hot_regions(terms, threshold, margin_cells=1):
            # One bool map of the whole term: a component may span several (overlapping) boxes.
            regions = components.boxes(k, regions)
            model_boxes = []
            for core, box, values in regions:
                # Only the voxels of the core: those in the rim belong to another region's
                # core (with the one-voxel margin it needs), or are at most the threshold.
                # The tight box (core voxels above it, grown by one voxel) lies within ``box``.
                tight = _box_above(values[_within(core, box)], threshold, core, case.model_shape)
                if tight is not None:
                    model_boxes.append((tight, values[_within(tight, box)]))
            yield k, self._invert_boxes(invert, model_boxes)

    def _lung_outline(self, probs: "torch.Tensor | WindowLogits", case: PreprocessedCase,
                        terms: Sequence[ResolvedTerm]) -> tuple[dict[int, torch.Tensor], set[int]]:
        """``{term index: model-grid probabilities}`` of the five lobes filled to the lungs' air
        (:func:`volumed.inference.lungs.outline_lobes`), and the term indices of the lobes of a
        lung the atlas split; both empty unless the image is a CT and all five lobes are among
        ``terms``."""
        index = {t.name: k for k, t in enumerate(terms) if not t.is_free_text}
        if case.original.modality != "CT" or not all(n in index for n in LOBES):
            return {}, set()
        ks = [index[n] for n in LOBES]
        whole = tuple((0, n) for n in case.model_shape)
        dense = torch.stack([probs.blend(k, whole) if isinstance(probs, WindowLogits) else torch.as_tensor(probs[k])
                             for k in ks])
        a_min, a_max = case.config.ct_window
        hu = case.image.as_tensor()[0].numpy().astype(np.float32) * np.float32(a_max - a_min) + np.float32(a_min)
        affine = np.asarray(case.image.affine, dtype=np.float64)
        body = body_mask(Volume(hu, affine, "CT"), work_mm=8.0)
        # A component that holds most of the model's lung calls is kept when they make 10 mL (the
        # presence rule's size): a few stray voxels do not turn an air pocket into lung.
        voxel_ml = float(np.prod(np.linalg.norm(affine[:3, :3], axis=0))) / 1000.0
        result = outline_lobes(dense, LOBES, hu, body, affine, float(self.config.threshold),
                               min_voxels=max(1, math.ceil(10.0 / voxel_ml)),
                               atlas=True if self.lobe_atlas is None else self.lobe_atlas)
        split = {index[n] for side in result.atlas_sides for n in SIDES[side]}
        return dict(zip(ks, result.probabilities)), split

    def _tensor_pieces(self, k: int, values: torch.Tensor, case: PreprocessedCase,
                       components: ComponentFilter) -> list | None:
        """Term ``k``'s pieces on the original grid from a whole model-grid probability map
        (its component rule applied first), as :meth:`iter_original` gives them."""
        whole = tuple((0, n) for n in case.model_shape)
        term = components.tensor(k, values)
        tight = _box_above(term, float(self.config.threshold), whole, case.model_shape)
        return self._invert_boxes(BoxInverter(case), [(tight, term[_within(tight, whole)])] if tight is not None else [])

    @staticmethod
    def _invert_boxes(invert: BoxInverter, model_boxes: list) -> list | None:
        pieces = []
        for box, values in model_boxes:
            inverted = invert(values[None], box)
            if inverted is not None:
                pieces.append((inverted[0], inverted[1][0]))
        return pieces or None

    def predict(
        self,
        volume: Volume,
        terms: Sequence[ResolvedTerm],
        *,
        progress: bool = False,
        on_mask: Callable[[int, np.ndarray], None] | None = None,
        postprocess: bool | Mapping[str, str | None] = True,
        anatomy_check: bool = True,
        lung_outline: bool = True,
    ) -> Prediction:
        """Segment ``volume`` for ``terms`` (resolved for its modality): masks on the original grid.

        Args:
            on_mask: called as ``on_mask(k, mask)`` with each term's mask as soon as it exists, a
                :class:`volumed.io.masks.BoxMask` (the box of its voxels; ``np.asarray(mask)`` is
                the full ``(X, Y, Z)`` bool array); the masks are then not kept
                (``Prediction.masks`` is ``None``). A term the anatomy check drops is handed
                over a second time, as an empty mask, after every term's first call.
            postprocess: connected-component post-processing (:meth:`postprocess_rules`): True
                applies each term's rule, a mapping overrides rules per term, False keeps every
                component of every term (the raw output).
            anatomy_check: drop found structures that cannot share axial slices with the others
                found (:mod:`volumed.data.craniocaudal`: a femur on the slices of the liver);
                each is reported absent with the structures it conflicts with. Only the
                structures whose largest component was kept take part (so none with
                ``postprocess=False``, the raw output).
            lung_outline: on a CT with post-processing and all five lobes prompted, the lobes
                are filled to the lungs' air (:mod:`volumed.inference.lungs`; recorded as the
                lobes' rule ``"lung_outline"``). False: the model's lobes (components filtered).
        """
        if not terms:
            raise ConfigError("no terms to segment", "prompts")
        clock = [time.perf_counter()]
        queries = self.term_queries(terms, volume.modality)
        clock.append(time.perf_counter())
        case = self.preprocess(volume)
        clock.append(time.perf_counter())
        probs = self.predict_probabilities(case, queries, progress=progress)
        clock.append(time.perf_counter())
        threshold = float(self.config.threshold)
        components = ComponentFilter(self.postprocess_rules(terms, postprocess), threshold)
        # CT with post-processing: masks are kept inside the patient's body (module docstring).
        body = body_mask(volume) if isinstance(postprocess, Mapping) or postprocess else None
        start = time.perf_counter()
        outlined, atlas_lobes = self._lung_outline(probs, case, terms) if lung_outline and body is not None else ({}, set())
        outline_seconds = time.perf_counter() - start
        outside: dict[int, float] = {}  # mL removed outside the body, per term
        # The running best probability above the threshold (0 where none is): zeros, not the
        # threshold, so that the pages of the grid no piece touches are never written (calloc).
        best = np.zeros(volume.shape, dtype=np.float32)
        label = np.zeros(volume.shape, dtype=np.uint8 if len(terms) < 256 else np.uint16)
        masks: list[np.ndarray] | None = [] if on_mask is None else None
        kept: dict[int, np.ndarray] = {}
        found: dict[int, tuple[int, float, float | None]] = {}  # voxels, their summed probability, the peak
        presence = dict(getattr(self.config, "presence", None) or {})
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        rejected: dict[int, MaskEvidence] = {}
        extents: dict[int, tuple] = {}  # found terms: (core S extent, box slices) for the anatomy check
        hu_mean: dict[int, float] = {}  # found CT terms of enhancing tissues: the mask's mean HU
        boxes: dict[int, tuple] = {}
        blood_pool = _enhancing_terms(terms) if volume.modality == "CT" else set()
        for k, pieces in self.iter_original(probs, case, components, skip=set(outlined)):
            if k in outlined:  # the lobes: filled to the lungs' air instead of the model's outline
                pieces = self._tensor_pieces(k, outlined[k], case, components)
            # The mask is held as the box of its pieces (a BoxMask): its cost is the structure's,
            # not the image's. The label map and the running best probability are full-grid
            # arrays, written only inside the pieces.
            dropped = (0, 0.0, None)
            if body is not None and pieces:
                pieces, dropped = _inside_body(pieces, body, threshold)
                outside[k] = round(dropped[0] * voxel_ml, 3)
            origin, crop = _pieces_box(pieces or ())
            # The mask's voxels are counted and their probabilities summed as they are set: pieces
            # may overlap (with equal values above the threshold), so each voxel counts once, and
            # no full-grid probability map is ever made.
            voxels, total, peak = 0, 0.0, None
            # None: nowhere above threshold, an empty mask and no label-map voxel.
            for where, prob in pieces or ():
                if prob.size:
                    peak = max(float(prob.max()), -math.inf if peak is None else peak)
                # Strictly greater: an exact tie keeps the earlier prompt (the priority rule); the
                # terms with a probability map arrive in prompt order.
                if isinstance(where[0], slice):  # a box: basic slices are views
                    above = prob > threshold
                    mask_box = crop[tuple(slice(w.start - o, w.stop - o) for w, o in zip(where, origin))]
                    new = above & ~mask_box
                    voxels += int(np.count_nonzero(new))
                    total += float(prob[new].sum(dtype=np.float64))
                    mask_box |= above
                    best_box, label_box = best[where], label[where]
                    win = above & (prob > best_box)
                    best_box[win] = prob[win]
                    label_box[win] = k + 1
                else:  # voxels, all above the threshold (and so above ``best``'s initial 0)
                    local = tuple(a - o for a, o in zip(where, origin))
                    new = ~crop[local]
                    voxels += int(np.count_nonzero(new))
                    total += float(prob[new].sum(dtype=np.float64))
                    crop[local] = True
                    win = prob > best[where]
                    winners = tuple(a[win] for a in where)
                    best[winners] = prob[win]
                    label[winners] = k + 1
            mask = BoxMask(volume.shape, origin, crop)
            found[k] = (voxels, total, peak)
            if not voxels and dropped[0]:
                # Found only outside the patient (the table, the air): absent, with what was seen there.
                rejected[k] = outside_body_evidence(*dropped, voxel_ml)
                found[k] = (0, 0.0, None)
            # A lobe of a lung the atlas split is there because the lung is (at least 10 mL of air
            # the model calls lung): the presence rule, meant for the model's small unsure calls,
            # does not turn a 7 mL upper lobe at the top of a slab away. A sliver under 1 mL the
            # atlas drew at the image's edge is still judged by it.
            judged = k not in atlas_lobes or voxels * voxel_ml < ATLAS_LOBE_MIN_ML
            if voxels and judged and presence_rejects(presence, voxels * voxel_ml, total / voxels):
                # Small and unsure: reported absent (the evidence keeps what was seen). Its voxels
                # leave the label map; another term's lower probability there is not restored.
                rejected[k] = rejected_evidence(presence, voxels, total, peak, voxel_ml)
                label_box = label[mask.box]
                label_box[crop & (label_box == k + 1)] = 0
                mask = BoxMask.empty(volume.shape)
                found[k] = (0, 0.0, None)
            # Only one-body structures (their largest component kept) take part: the extent of a
            # many-piece or raw mask is that of its scattered fragments, not of the structure.
            if anatomy_check and found[k][0] and components.postprocessing(k).rule == LARGEST_COMPONENT:
                extents[k] = (s_extent(crop, volume.affine, origin, volume.shape, trim=TRIM), mask.box)
            if found[k][0] and k in blood_pool:  # the mask's own voxels only, for the native HU rule
                boxes[k] = mask.box
                hu_mean[k] = float(volume.data[mask.box][crop].mean(dtype=np.float64))
            if on_mask is not None:
                on_mask(k, mask)
            else:
                kept[k] = mask.full()
        for k, why in _native_hu_rejects(terms, found, hu_mean, voxel_ml).items():
            voxels, total, peak = found[k]
            rejected[k] = native_hu_evidence(voxels, total, peak, voxel_ml, hu_mean[k], *why)
            label_box = label[boxes[k]]
            label_box[label_box == k + 1] = 0  # its voxels leave the label map
            found[k] = (0, 0.0, None)
            extents.pop(k, None)
            if on_mask is not None:
                on_mask(k, BoxMask.empty(volume.shape))
            else:
                kept[k] = np.zeros(volume.shape, dtype=bool)
        if len(extents) >= 2:
            # Weight: volume times mean probability, i.e. the summed probability times a voxel's mL.
            # A lobe of a lung the atlas split weighs what its whole lung weighs: it is there
            # because the lung is (air the model calls lung), not as a guess of its own, so two
            # false "kidneys" at the lung apex do not outweigh the upper lobe the atlas drew there.
            weight = {k: found[k][1] * voxel_ml for k in extents}
            for side in SIDES.values():
                lung = [k for k in atlas_lobes if terms[k].name in side and k in weight]
                whole = sum(weight[k] for k in lung)
                weight.update(dict.fromkeys(lung, whole))
            dropped = implausible_terms({terms[k].name: Found(extents[k][0], weight[k]) for k in extents})
            for k in [k for k in extents if terms[k].name in dropped]:
                voxels, total, peak = found[k]
                rejected[k] = anatomy_evidence(dropped[terms[k].name], voxels, total, peak, voxel_ml, extents[k][0])
                label_box = label[extents[k][1]]
                label_box[label_box == k + 1] = 0  # its voxels leave the label map
                found[k] = (0, 0.0, None)
                if on_mask is not None:
                    on_mask(k, BoxMask.empty(volume.shape))
                else:
                    kept[k] = np.zeros(volume.shape, dtype=bool)
        if masks is not None:
            masks.extend(kept[k] for k in range(len(terms)))
        # Absent terms: the evidence is a bound of their probability (exact values were computed
        # only where they could exceed the threshold).
        absent = [k for k in range(len(terms)) if found[k][0] == 0 and k not in rejected]
        bounds = dict(zip(absent, self.max_probability_bounds(probs, absent)))
        evidence = [rejected[k] if k in rejected else mask_evidence(*found[k], bounds.get(k), threshold)
                    for k in range(len(terms))]
        clock.append(time.perf_counter())
        stages = ("queries", "preprocess", "sliding_window", "invert")
        seconds = {s: b - a for s, a, b in zip(stages, clock, clock[1:])}
        seconds["postprocess"] = components.seconds + outline_seconds  # part of "invert"
        post = [components.postprocessing(k) for k in range(len(terms))]
        post = [replace(p, rule=LUNG_OUTLINE) if k in outlined else p for k, p in enumerate(post)]
        if body is not None:
            post = [replace(p, outside_body_ml=outside.get(k, 0.0)) for k, p in enumerate(post)]
        return Prediction(label, masks, evidence, seconds, post)


#: The aorta of a scan without contrast measures 30-55 HU; under this, none was given (portal
#: venous 130-220, arterial 250-600; volumed.data.hu_priors).
NATIVE_AORTA_HU = 100.0


def _enhancing_terms(terms: Sequence) -> set[int]:
    """Indices of the terms whose tissue enhances with contrast (blood-pool tissues of
    :mod:`volumed.data.hu_priors`: the aorta, kidneys, liver, heart...)."""
    from volumed.data.hu_priors import TISSUES, tissue_of

    return {k for k, t in enumerate(terms) if TISSUES[tissue_of(t.name)].blood_pool}


def _native_hu_rejects(terms: Sequence, found: Mapping[int, tuple], hu_mean: Mapping[int, float],
                       voxel_ml: float) -> dict[int, tuple]:
    """Found structures whose mean HU their tissue never has without contrast, in a scan whose
    aorta shows none: ``{k: (tissue, (low, high) expected HU, aorta's mean HU)}``.

    A CT without contrast shows no enhancing tissue above its native range: a "kidney" at 270 HU
    in a scan whose aorta measures 58 HU lies on bone (bundle 0.6.0 called tcia_ccth_a01's iliac
    wings kidneys, docs/synthesis.md round 20). Applied only when the scan's own aorta is found
    (at least 5 mL at mean probability 0.8) and measures under :data:`NATIVE_AORTA_HU`; to the
    tissues that enhance (``hu_mean`` holds only those), judged by
    :func:`volumed.inference.stats.hu_check` in the native phase (its range widened for partial
    volume); never to the aorta itself, and never for being too dark. With contrast, or without an
    aorta to tell, nothing is turned away here."""
    aorta = next((k for k in hu_mean if terms[k].name == "aorta"), None)
    if aorta is None:
        return {}
    voxels, total, _ = found[aorta]
    if not voxels or voxels * voxel_ml < 5.0 or total / voxels < 0.8 or hu_mean[aorta] >= NATIVE_AORTA_HU:
        return {}
    out = {}
    for k, mean in hu_mean.items():
        if k == aorta or not found[k][0]:
            continue
        check = hu_check(terms[k].name, mean, "HU", phase="native")
        if check and mean > check["expected_hu"][1]:
            out[k] = (check["tissue"], tuple(check["expected_hu"]), hu_mean[aorta])
    return out


def _in_order(pieces: Iterator[tuple[int, list | None]], skipped: Sequence[int]) -> Iterator[tuple[int, list | None]]:
    """``pieces`` (ascending term indices) with ``(k, None)`` for each of ``skipped`` at its place."""
    pending = sorted(skipped)
    for k, value in pieces:
        while pending and pending[0] < k:
            yield pending.pop(0), None
        yield k, value
    yield from ((k, None) for k in pending)


def _inside_body(pieces: list, body: np.ndarray, threshold: float) -> tuple[list, tuple[int, float, float | None]]:
    """``pieces`` (``(where, probabilities)``: a box of slices or voxel indices, as
    :meth:`Segmenter.iter_original` yields them) with every value outside ``body`` set to 0 (a
    box) or dropped (voxels), and what was removed above ``threshold``: its voxels (each once,
    pieces may overlap), their summed probability and the peak (``None`` when nothing was)."""
    kept, index, values = [], [], []
    for where, prob in pieces:
        inside = body[where]
        if isinstance(where[0], slice):
            out = (prob > threshold) & ~inside
            if out.any():
                local = np.nonzero(out)
                index.append(np.ravel_multi_index(tuple(a + w.start for a, w in zip(local, where)), body.shape))
                values.append(prob[out])
                prob = np.where(inside, prob, 0).astype(prob.dtype, copy=False)
            kept.append((where, prob))
        else:  # voxels, all above the threshold
            if not inside.all():
                index.append(np.ravel_multi_index(tuple(a[~inside] for a in where), body.shape))
                values.append(prob[~inside])
                where, prob = tuple(a[inside] for a in where), prob[inside]
            kept.append((where, prob))
    if not index:
        return kept, (0, 0.0, None)
    index, first = np.unique(np.concatenate(index), return_index=True)
    values = np.concatenate(values)[first]
    return kept, (len(index), float(values.sum(dtype=np.float64)), float(values.max()))


def _absent_why(evidence: MaskEvidence) -> str:
    """Why a term is absent, for the summary and the report: the bound of its probability, or
    what the presence rule turned away."""
    r = evidence.rejected
    if r:
        return f"rejected: {rejection_text(r)}"
    return f"p <= {evidence.max_probability_bound:.2f}"


# ------------------------------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class SegmentedTerm:
    """One prompted structure: its label value, names, flags, mask file, statistics and evidence.

    ``trained`` is False for a term the model was never trained on (allowed only with
    ``allow_untrained``); ``evidence`` says whether it was found (``present``) and how sure the
    model is (``confidence``, or an upper bound of its probability when absent);
    ``postprocessing`` which connected-component rule was applied (statistics and evidence are
    those of the post-processed mask).
    """

    value: int
    name: str
    prompt: str
    free_text: bool
    trained: bool
    mask_path: Path
    statistics: TermStatistics
    evidence: MaskEvidence
    postprocessing: Postprocessing = Postprocessing(None)

    @property
    def present(self) -> bool:
        return self.evidence.present

    @property
    def display_name(self) -> str:
        """The canonical name, with ``" (untrained)"`` for a term the model was not trained on."""
        return self.name + ("" if self.trained else " (untrained)")


@dataclass(frozen=True)
class SegmentationResult:
    """What :func:`segment` wrote.

    Attributes:
        out_dir: the output folder.
        image: the input path; modality: ``"CT"`` / ``"MR"``; model_dir: the package used.
        terms: the structures in label-value order (value 1 first).
        label_map, label_table, statistics, preview: paths of those outputs.
        dicom_seg: the DICOM SEG path, or ``None`` (input not DICOM, or SEG skipped: see warnings).
        dicom_sr: the DICOM SR path (written with every SEG), or ``None``.
        warnings: problems that did not stop the run (e.g. SEG skipped for a series without UIDs).
        seconds: wall time per stage (``read``, ``predict``, ``write``, ``total``).
        threshold: the probability above which a voxel is in a mask (the package's).
    """

    out_dir: Path
    image: Path
    modality: str
    model_dir: Path
    terms: tuple[SegmentedTerm, ...]
    label_map: Path
    label_table: Path
    statistics: Path
    preview: Path
    dicom_seg: Path | None
    warnings: tuple[str, ...] = ()
    seconds: dict[str, float] = field(default_factory=dict)
    threshold: float | None = None
    dicom_sr: Path | None = None

    def summary(self) -> list[str]:
        """Human-readable lines: how many structures were found, one line per found structure
        (volume, confidence, intensity, components, flags), one line listing the absent ones with
        the bound of their probability, then the outputs and warnings."""
        lines = findings_lines(self.terms, self.threshold)
        lines.append(f"wrote {self.out_dir} ({len(self.terms)} masks, labels, statistics, preview, report"
                     + (", DICOM SEG" if self.dicom_seg else "") + (", DICOM SR" if self.dicom_sr else "")
                     + f") in {self.seconds.get('total', 0):.1f} s")
        lines += [f"warning: {w}" for w in self.warnings]
        return lines


def findings_lines(terms: Sequence[SegmentedTerm], threshold: float | None) -> list[str]:
    """The findings in words, one line each: how many structures were found, one line per found
    structure (volume in mL, confidence, mean intensity, components, flags), then one line listing
    the absent ones with the upper bound of their probability. The summary printed by ``volumed
    segment`` / ``volumed run`` and ``report.txt`` both start with these lines."""
    found = [t for t in terms if t.present]
    absent = [t for t in terms if not t.present]
    threshold = threshold if threshold is not None else math.nan
    lines = [f"found {len(found)} of {len(terms)} structure(s) (probability above {threshold:g}):"]
    for t in found:
        s = t.statistics
        check = _hu_check(t)
        implausible = (f"HU implausible for {check['tissue']}: expected {check['expected_hu'][0]:g} to "
                       f"{check['expected_hu'][1]:g}") if check and not check["plausible"] else ""
        flags = ", ".join(f for f, on in (("free text", t.free_text), ("untrained", not t.trained),
                                          (implausible, bool(implausible))) if on)
        hu = f", mean {s.intensity.mean:.1f} {s.intensity.unit}" if s.intensity.mean is not None else ""
        volume = f"{s.volume_ml:9.1f}" if s.volume_ml >= 1 else f"{s.volume_ml:9.2f}"  # 0.04 mL is not 0.0
        removed = t.postprocessing.removed_components
        outside = t.postprocessing.outside_body_ml
        lines.append(
            f"{t.value:3d} {t.name:<28s} {volume} mL, confidence {t.evidence.confidence:.2f}{hu}, "
            f"{s.components} component(s)" + (f", {removed} fragment(s) removed" if removed else "")
            + (f", {ml_text(outside)} mL outside the body removed" if outside else "")
            + (f" [{flags}]" if flags else "")
        )
    # An absent structure's evidence: an upper bound of its probability anywhere in the image.
    lines.append(f"absent ({len(absent)}): " + (", ".join(
        f"{t.name} ({_absent_why(t.evidence)}" + ("" if t.trained else ", untrained") + ")"
        for t in absent) if absent else "none"))
    return lines


def _existing_outputs(out_dir: Path) -> list[Path]:
    found = [out_dir / n for n in _TOP_LEVEL_OUTPUTS if (out_dir / n).exists()]
    masks = out_dir / MASKS_DIR
    if masks.is_dir():
        found += sorted(masks.glob("*.nii.gz"))
    elif masks.exists():
        found.append(masks)
    return found


def _check_output_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError("output path exists and is not a folder", out_dir)
    check_creatable(out_dir)
    existing = _existing_outputs(out_dir) if out_dir.is_dir() else []
    if existing and not overwrite:
        names = ", ".join(str(p.relative_to(out_dir)) for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
        raise OutputExistsError(
            f"output folder holds outputs of an earlier run ({names}); pass overwrite=True (--overwrite) or another folder",
            out_dir,
        )


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the staged outputs into ``out_dir``; with overwrite, stale outputs go (see module docs)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    trash = staging / ".replaced"
    trash.mkdir()
    old_masks = out_dir / MASKS_DIR
    if old_masks.exists():
        os.replace(old_masks, trash / MASKS_DIR)
    os.replace(staging / MASKS_DIR, old_masks)
    for name in _TOP_LEVEL_OUTPUTS:
        new, final = staging / name, out_dir / name
        if new.exists():
            os.replace(new, final)  # atomic per file: readers see the old or the new file
        elif final.exists():
            os.replace(final, trash / name)


def mask_writer_threads() -> int:
    """Threads for the per-term mask writes of :func:`segment`: 1 when the machine has a core
    that torch's intra-op threads leave free, else 0 (the writes run in the caller's thread)."""
    return 1 if (os.cpu_count() or 1) > torch.get_num_threads() else 0


class _InlineExecutor:
    """The ``submit`` of an executor, run at once in the caller's thread (a completed future)."""

    def submit(self, fn: Callable, /, *args, **kwargs):
        from concurrent.futures import Future

        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as error:  # handed over as a thread pool's future would hand it
            future.set_exception(error)
        return future


@contextmanager
def mask_writer(threads: int) -> Iterator:
    """An executor for the mask writes: a one-thread pool for ``threads`` >= 1, else inline."""
    if threads < 1:
        yield _InlineExecutor()
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="volumed-mask-writer") as pool:
        yield pool


def segment(
    image_path: "str | Path | Volume",
    prompts: Sequence[str],
    *,
    model_dir: str | Path | None = None,
    out_dir: str | Path,
    all_terms: bool = False,
    allow_free_text: bool = False,
    allow_untrained: bool = False,
    series_uid: str | None = None,
    modality: str | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
    postprocess: bool | Mapping[str, str | None] = True,
    anatomy_check: bool = True,
    predictor: PromptSegPredictor | None = None,
    dicom_uids: "DicomOutputUids | Mapping[str, str] | None" = None,
) -> SegmentationResult:
    """Segment the structures named by ``prompts`` in one image; write masks, label map,
    statistics, preview (and a DICOM SEG and SR for DICOM input) into ``out_dir``.

    Args:
        image_path: NIfTI / NRRD / MHA file or DICOM series folder.
        prompts: anatomy prompts ("liver", "left kidney", "L1 vertebra"); may be empty with ``all_terms``.
        model_dir: package folder (``config.json`` + ``model.safetensors``); default :func:`default_model_dir`.
        out_dir: output folder (created).
        all_terms: also segment every trained term available in the image's modality.
        allow_free_text: accept prompts outside the vocabulary (flagged ``free_text``; untrained
            unless the model was trained on that very text, and then refused without ``allow_untrained``).
        allow_untrained: accept prompts for terms the model was never trained on (not in its
            config's ``terms``); they are segmented and flagged untrained in every output.
        series_uid: SeriesInstanceUID when the DICOM folder holds several series.
        modality: ``"CT"`` or ``"MR"`` to override the reader's guess (it recognises CT by its air
            at -1000 HU; anything else reads as unknown and must be named).
        overwrite: replace the outputs of an earlier run in ``out_dir``.
        device: torch device for the network ("cpu", "cuda").
        progress: show a progress bar over the sliding windows.
        postprocess: connected-component post-processing (:mod:`volumed.inference.postprocess`):
            True keeps only the largest component of each structure that is one connected body
            (the package's ``config.postprocess`` may override the rule per term); a mapping
            ``{term: "largest_component" | None}`` overrides it further; False keeps every
            component of every term (the raw output, ``--no-postprocess``). Each term's rule is
            recorded in ``labels.json`` and ``statistics.json``.
        anatomy_check: report absent a found structure that shares axial slices with found
            structures it never shares them with (:mod:`volumed.data.craniocaudal`); its
            ``statistics.json`` entry gives ``rejected.rule = "anatomy"`` and the conflicts.
        predictor: an already loaded predictor of the package in ``model_dir`` (a MONAI bundle's
            network, preprocessing and inferer: :mod:`volumed.bundle.promptseg`); by default the
            package is loaded after the cheap checks. ``device`` is then the predictor's.
        dicom_uids: Series and SOP Instance UIDs of the DICOM SEG and SR
            (:class:`volumed.io.writer.DicomOutputUids`, or its fields as a mapping), e.g.
            derived from the inputs so that a PACS upload can be recognised when repeated
            (``volumed dicomweb run``); fresh UIDs when ``None``.

    Returns:
        A :class:`SegmentationResult`. Every output lies on the input's grid (shape and affine).

    Raises:
        ConfigError: no prompts, duplicates, a prompt for another modality, a model folder
            that is missing or for another modality, a term the model was not trained on
            (without ``allow_untrained``), an unknown post-processing rule. UnknownTermError:
            unknown prompt.
        OutputExistsError: ``out_dir`` holds outputs and not ``overwrite`` (checked first).
        VolumeReadError, InvalidVolumeError, DicomSeriesError: unreadable input.
    """
    from volumed.io.writer import DicomOutputUids

    t0 = time.perf_counter()
    uids = DicomOutputUids.from_mapping(dicom_uids)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts and not all_terms:
        raise ConfigError("give at least one anatomy prompt (--prompt liver) or --all", "prompts")
    if isinstance(postprocess, Mapping):
        postprocess = check_rules(postprocess)
    out = Path(out_dir)
    _check_output_dir(out, overwrite)  # before any computation

    # Everything cheap is checked before the network is built: model folder, image, prompts.
    used_model, config = read_package_config(model_dir)
    if isinstance(image_path, Volume):  # already read (batch inference prefetches the next case)
        volume = image_path if modality is None else replace(image_path, modality=modality.upper())
    else:
        volume = read_volume(image_path, series_uid=series_uid, modality=modality)
    if not isinstance(image_path, Volume):
        image_ref = Path(image_path)
    else:
        image_ref = Path(volume.source.path) if volume.source.path else Path("<in-memory volume>")
    if volume.modality not in ("CT", "MR"):
        raise ConfigError(
            "cannot tell whether the image is CT or MR (no air at -1000 HU, no DICOM Modality); "
            "name it with modality='CT' or 'MR' (--modality)",
            image_ref,
        )
    terms = resolve_prompts(prompts, volume.modality, trained_terms=config.terms, all_terms=all_terms,
                            allow_free_text=allow_free_text)
    if volume.modality not in config.modalities:
        raise ConfigError(
            f"the model was trained on {', '.join(config.modalities)} images only; this image is {volume.modality}",
            used_model,
        )
    if not allow_untrained:
        refuse_untrained(terms, config.terms)
    names = [mask_file_name(t.name) for t in terms]
    if len(set(names)) != len(names):
        raise ConfigError(f"two prompts map to the same mask file name: {names}", "prompts")
    if predictor is None:
        predictor = PromptSegPredictor.from_package(used_model, device=device)
    t_read = time.perf_counter()

    warnings: list[str] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.volumed-", dir=out.parent))
    try:
        (staging / MASKS_DIR).mkdir()
        stats: dict[int, TermStatistics] = {}

        from volumed.io.masks import write_mask_nifti

        # Each mask arrives as the box of its voxels; its file and statistics cost what the
        # structure's box costs, not the 512 x 512 x 200 grid (volumed.io.masks). The gzip write
        # runs on a second thread, beside the next term's inversion, only where a core is left
        # over by torch's threads (mask_writer_threads): on 2 cores with 2 torch threads a third
        # busy thread stalls torch's parallel regions, and 16 writes cost 1.0 s of wall instead
        # of 0.25 s of CPU (BENCHMARKS.md, "Scaling").
        pending: list = []

        def keep(k: int, mask: BoxMask) -> None:
            while len(pending) >= 2:
                pending.pop(0).result()  # re-raises a failed write here; bounds the masks held
            # A second call for a term (the anatomy check dropped it) replaces its mask with an
            # empty one: the writes run in order (one writer thread, or this one).
            pending.append(writer.submit(write_mask_nifti, mask, volume, staging / MASKS_DIR / f"{names[k]}.nii.gz",
                                         overwrite=k in stats))
            stats[k] = compute_statistics(mask, volume, terms[k].name)

        with mask_writer(mask_writer_threads()) as writer:
            try:
                prediction = predictor.predict(volume, terms, progress=progress, on_mask=keep, postprocess=postprocess,
                                               anatomy_check=anatomy_check)
            finally:
                outcomes = [f.exception() for f in pending]  # wait for every write, even on failure
            for error in outcomes:
                if error is not None:
                    raise error
        t_pred = time.perf_counter()

        segmented = tuple(
            SegmentedTerm(
                value=k + 1,
                name=t.name,
                prompt=t.prompt,
                free_text=t.is_free_text,
                trained=is_trained(t, predictor.config.terms),
                mask_path=out / MASKS_DIR / f"{names[k]}.nii.gz",
                statistics=stats[k],
                evidence=prediction.evidence[k],
                postprocessing=prediction.postprocessing[k],
            )
            for k, t in enumerate(terms)
        )
        _write_outputs(staging, volume, prediction.label_map, segmented, predictor.config, used_model, warnings, uids)
        has_seg = (staging / SEG_NAME).exists()
        has_sr = (staging / SR_NAME).exists()
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    t_end = time.perf_counter()
    return SegmentationResult(
        out_dir=out,
        image=image_ref,
        modality=volume.modality,
        model_dir=used_model,
        terms=segmented,
        label_map=out / LABELS_NAME,
        label_table=out / TABLE_NAME,
        statistics=out / STATISTICS_NAME,
        preview=out / PREVIEW_NAME,
        dicom_seg=out / SEG_NAME if has_seg else None,
        warnings=tuple(warnings),
        seconds={"read": t_read - t0, "predict": t_pred - t_read, "write": t_end - t_pred, "total": t_end - t0},
        threshold=float(predictor.config.threshold),
        dicom_sr=out / SR_NAME if has_sr else None,
    )


def _write_outputs(
    staging: Path,
    volume: Volume,
    label_map: np.ndarray,
    terms: tuple[SegmentedTerm, ...],
    config: PromptSegConfig,
    model_dir: Path,
    warnings: list[str],
    uids: "DicomOutputUids | None" = None,
) -> None:
    """Label map, table, statistics, report, preview and (DICOM input) SEG and SR into ``staging``
    (with ``uids`` as their Series and SOP Instance UIDs; fresh ones when ``None``)."""
    from volumed.inference.preview import render_preview
    from volumed.io.writer import write_dicom_seg, write_label_map

    write_label_map(label_map, volume, staging / LABELS_NAME)
    version = package_version(model_dir, config)  # the bundle's, once for every output
    table = {
        "background": 0,
        "labels": {
            str(t.value): {"name": t.name, "prompt": t.prompt, "free_text": t.free_text, "trained": t.trained,
                           "postprocess": t.postprocessing.rule}
            for t in terms
        },
        "priority": PRIORITY_RULE,
        "postprocess": RULE_DESCRIPTIONS,
        "threshold": float(config.threshold),
        "model": {"path": str(model_dir), "version": version, "encoder": config.encoder},
    }
    atomic_write_text(staging / TABLE_NAME, json.dumps(table, indent=2) + "\n")
    statistics = {
        "image": str(volume.source.path) if volume.source.path else None,
        "modality": volume.modality,
        "shape": list(volume.shape),
        "spacing_mm": list(volume.spacing),
        "threshold": float(config.threshold),
        "terms": {t.name: _term_statistics(t) for t in terms},
        "model": {"path": str(model_dir), "version": version},
        "software": software_versions(),
    }
    atomic_write_text(staging / STATISTICS_NAME, json.dumps(statistics, indent=2) + "\n")
    atomic_write_text(staging / REPORT_NAME, _report_text(volume, terms, config, model_dir, version))
    found = [t for t in terms if t.present]
    absent = [f"{t.display_name} ({_absent_why(t.evidence)})" for t in terms if not t.present]
    render_preview(
        volume,
        staging / PREVIEW_NAME,
        label=label_map,
        label_names={t.value: t.display_name for t in found},
        notes=[f"absent: {', '.join(absent)}"] if absent else [],
        title=f"{volume.source.path.name if volume.source.path else 'image'}: {len(found)} of {len(terms)} structure(s) found",
    )
    if volume.source.format != "dicom":
        return
    missing = [n for n, v in (("StudyInstanceUID", volume.source.study_uid), ("SeriesInstanceUID", volume.source.series_uid),
                               ("FrameOfReferenceUID", volume.source.frame_of_reference_uid)) if not v]
    if missing:
        warnings.append(f"DICOM SEG skipped: the source series has no {', '.join(missing)} (anonymised?); "
                        "the NIfTI outputs were written")
        return
    in_map = np.bincount(np.asarray(label_map).ravel(), minlength=len(terms) + 1)  # voxels per label value
    segments = [_segment_spec(t) for t in terms if in_map[t.value]]
    if not segments:
        warnings.append("DICOM SEG skipped: no structure was found above threshold")
        return
    try:
        write_dicom_seg(label_map, volume, segments, staging / SEG_NAME,
                        series_instance_uid=uids.seg_series if uids else None,
                        sop_instance_uid=uids.seg_instance if uids else None)
    except VolumedError as err:
        warnings.append(f"DICOM SEG skipped: {err}")
        return
    # The SR reports every term, present or absent, with the numbers of statistics.json; segment
    # k of the SEG is the k-th term in the label map (the order of ``segments``).
    from volumed.io.sr import StructureFinding, write_dicom_sr

    numbers = {spec.value: k for k, spec in enumerate(segments, start=1)}
    findings = [
        StructureFinding.from_statistics(statistics["terms"][t.name], segment_number=numbers.get(t.value),
                                         segment_voxels=int(in_map[t.value]) if t.value in numbers else None)
        for t in terms
    ]
    try:
        write_dicom_sr(findings, volume, staging / SEG_NAME, staging / SR_NAME, threshold=float(config.threshold),
                       series_instance_uid=uids.sr_series if uids else None,
                       sop_instance_uid=uids.sr_instance if uids else None)
    except VolumedError as err:
        warnings.append(f"DICOM SR skipped: {err}")


def _report_text(volume: Volume, terms: tuple[SegmentedTerm, ...], config: PromptSegConfig, model_dir: Path,
                 version: str) -> str:
    """``report.txt``: the findings in words (:func:`findings_lines`) under a header naming the
    image and the model. A plain-text findings list, not a radiology report (the DICOM SR is
    ``report_sr.dcm``, written for DICOM input)."""
    source = volume.source.path.name if volume.source.path else "image"
    spacing = " x ".join(f"{s:.3g}" for s in volume.spacing)
    lines = [
        "volumed segmentation findings (research use only; not a medical device, not for diagnosis)",
        f"image: {source} ({volume.modality}, {' x '.join(map(str, volume.shape))} voxels of {spacing} mm)",
        f"model: {model_dir} (version {version}, encoder {config.encoder})",
        "",
        *findings_lines(terms, float(config.threshold)),
        "",
        "confidence is the model's mean probability inside the mask, not a measured accuracy;",
        f"volumes and intensities per structure are in {STATISTICS_NAME}, masks in {MASKS_DIR}/, the label map in {LABELS_NAME}.",
    ]
    return "\n".join(lines) + "\n"


def _term_statistics(term: SegmentedTerm) -> dict:
    """One term's entry of ``statistics.json``: what it is and whether it was found first, then
    the evidence and the measurements (see :mod:`volumed.inference.stats`)."""
    stats = term.statistics.to_dict()
    return {"name": stats.pop("name"), "value": term.value, "prompt": term.prompt, "free_text": term.free_text,
            "trained": term.trained, **term.evidence.to_dict(), **stats, **term.postprocessing.to_dict(),
            "hu_check": _hu_check(term)}


def _hu_check(term: SegmentedTerm) -> dict | None:
    """:func:`volumed.inference.stats.hu_check` of a present term's mask (``None`` if absent)."""
    if not term.present:
        return None
    return hu_check(term.name, term.statistics.intensity.mean, term.statistics.intensity.unit)


def _segment_spec(term: SegmentedTerm):
    """The DICOM SEG segment of a present term: an untrained term says so in its SegmentLabel
    (what viewers show) and SegmentDescription."""
    from volumed.io.coding import readable_name
    from volumed.io.writer import SegmentSpec

    description = f"prompt '{term.prompt}', mean probability {term.evidence.confidence:.2f}"
    if not term.trained:
        description += "; untrained: the model was not trained on this term"
    suffix = "" if term.trained else " (untrained)"
    label = readable_name(term.name)[: 64 - len(suffix)] + suffix  # SegmentLabel holds 64 characters
    return SegmentSpec(term.value, term.name, label=label, description=description)
