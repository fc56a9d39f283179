"""Partial-label training of the text-prompted segmenter: loss, LightningModule, package export.

The rule that makes scans with different label sets usable together (the partial-label rule of
SAT, Zhao et al. 2023): **a term contributes to the loss of a case only if the case annotates it**.
The datalist, the cases and the patches are in :mod:`volumed.tasks.promptseg_data` (re-exported
here); this module holds what a training step does with a batch::

    batch: image (B, 1, px, py, pz), target (B, T, px, py, pz), annotated (B, T)
    step: terms used = annotated & (present in the patch | sampled negative), union over the batch
          -> text embeddings (precomputed once) -> logits (B, T_used, px, py, pz)
          -> PartialLabelLoss (Dice on positives + BCE on every used pair)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from monai.losses import DiceLoss

from volumed.data.transforms import PreprocessConfig
from volumed.errors import ConfigError
from volumed.inference.package import PromptSegConfig, TextPromptedSegmenter, build_model, save_package
from volumed.io.volume import Volume
from volumed.tasks.optim import adamw_warmup_cosine
from volumed.tasks.promptseg_data import (
    LabelSource,
    PromptSegCase,
    PromptSegDataModule,
    PromptSegPatchDataset,
    load_case,
    load_promptseg_datalist,
    patch_augmentation,
    phantom_cases,
)

__all__ = [
    "LabelSource",
    "PackageExport",
    "PartialLabelLoss",
    "PartialLabelLossOutput",
    "PromptSegCase",
    "PromptSegDataModule",
    "PromptSegModule",
    "PromptSegPatchDataset",
    "encode_terms",
    "load_case",
    "load_promptseg_datalist",
    "patch_augmentation",
    "phantom_cases",
    "predict_probabilities",
    "select_terms",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


def select_terms(
    target: torch.Tensor, annotated: torch.Tensor, num_negatives: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Which (sample, term) pairs enter the loss: ``(B, T)`` bool.

    Every annotated term present in the patch is used (a positive); of the annotated terms absent
    from the patch, at most ``num_negatives`` per sample, drawn at random (``None``: all). Terms
    not annotated for a sample are never used.

    Args:
        target: ``(B, T, ...)`` binary targets. annotated: ``(B, T)`` bool.
    """
    present = target.flatten(2).amax(2) > 0
    positives = annotated & present
    negatives = annotated & ~present
    if num_negatives is not None:
        # Drawn on the CPU, where the generator lives, then moved: a CPU generator cannot draw
        # onto CUDA tensors (the GPU recipe stopped at its first step on this).
        scores = torch.rand(negatives.shape, generator=generator).to(negatives.device)
        scores = scores.masked_fill(~negatives, 2.0)
        rank = scores.argsort(1).argsort(1)
        negatives = negatives & (rank < int(num_negatives))
    return positives | negatives


def exclusive_negative_bce(logits: torch.Tensor, pairs: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """BCE with target 0 over the ``known`` voxels of the selected pairs (mean per pair, then over
    pairs): ``logits (B, N, X, Y, Z)``, ``pairs (B, N)`` bool, ``known (B, 1, X, Y, Z)``.

    Used for the terms an exclusive case does not annotate: inside its masks they are absent.
    """
    pairs = pairs.to(torch.bool)
    if not bool(pairs.any()):
        return logits.sum() * 0.0
    weight = known.to(logits.dtype).expand_as(logits)[pairs].flatten(1)  # (M, V)
    per_voxel = F.softplus(logits[pairs].float()).flatten(1)  # BCE(x, 0) = log(1 + e^x)
    return ((per_voxel * weight).sum(1) / weight.sum(1).clamp_min(1.0)).mean()


class PartialLabelLossOutput(NamedTuple):
    """``loss`` = ``dice_weight * dice + bce_weight * bce``; ``pairs``/``positives``: pairs used."""

    loss: torch.Tensor
    dice: torch.Tensor
    bce: torch.Tensor
    pairs: int
    positives: int


class PartialLabelLoss(nn.Module):
    """Dice + BCE over the selected (sample, term) pairs only.

    ``forward(logits (B, N, X, Y, Z), target (B, N, X, Y, Z), use (B, N) bool)``. The pairs with
    ``use`` False are removed by boolean indexing before any arithmetic, so they contribute exactly
    zero loss and exactly zero gradient (multiplying by a zero weight would too, but a NaN/inf
    logit there would still poison the sum).

    BCE (mean over the used pairs' voxels) sees positives and negatives. Dice (MONAI ``DiceLoss``,
    sigmoid, one value per pair) is taken on the pairs whose patch target is non-empty only: on an
    empty target Dice is 0 or 1 depending on a smoothing constant and punishes a few false-positive
    voxels as hard as a missed organ, which fights BCE (SAT and nnU-Net do not use it either).

    With ``bce_topk`` (a fraction, e.g. 0.1) BCE is the mean over each pair's hardest voxels only,
    as nnU-Net's TopK loss: a confident 5 mL false-positive blob for a term absent from a patch
    is ~1 % of a 96 x 96 x 48 patch, so the plain voxel mean dilutes it 100-fold and the term's
    negatives barely train (a structure absent from the scan then came back at 0.9 confidence).

    Args:
        dice_weight, bce_weight: weights of the two terms.
        bce_topk: fraction of each pair's voxels, the largest BCE first, averaged (``None``: all).
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, bce_topk: float | None = None):
        super().__init__()
        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        if bce_topk is not None and not 0.0 < float(bce_topk) <= 1.0:
            raise ConfigError(f"PartialLabelLoss: bce_topk must be a fraction in (0, 1], got {bce_topk!r}")
        self.bce_topk = None if bce_topk is None else float(bce_topk)
        self.dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, use: torch.Tensor) -> PartialLabelLossOutput:
        if logits.shape != target.shape or tuple(use.shape) != tuple(logits.shape[:2]):
            raise ConfigError(
                f"PartialLabelLoss: logits {tuple(logits.shape)}, target {tuple(target.shape)} and use "
                f"{tuple(use.shape)} must be (B, N, ...), (B, N, ...) and (B, N)"
            )
        use = use.to(torch.bool)
        x = logits[use].float()  # (M, X, Y, Z)
        y = target[use].to(x.dtype)
        zero = logits.sum() * 0.0  # keeps the graph (and DDP) happy when nothing is used
        if x.shape[0] == 0:
            return PartialLabelLossOutput(zero, zero, zero, 0, 0)
        if self.bce_topk is None:
            bce = F.binary_cross_entropy_with_logits(x, y)
        else:
            per_voxel = F.binary_cross_entropy_with_logits(x, y, reduction="none").flatten(1)
            k = max(1, int(math.ceil(self.bce_topk * per_voxel.shape[1])))
            bce = per_voxel.topk(k, dim=1, sorted=False).values.mean()
        pos = y.flatten(1).amax(1) > 0
        dice = self.dice(x[pos].unsqueeze(1), y[pos].unsqueeze(1)).mean() if bool(pos.any()) else zero
        loss = self.dice_weight * dice + self.bce_weight * bce
        return PartialLabelLossOutput(loss, dice, bce, int(x.shape[0]), int(pos.sum()))


# --------------------------------------------------------------------------------------------
# LightningModule
# --------------------------------------------------------------------------------------------


def _text_model_dir(text_model: str) -> str | None:
    return None if text_model == "default" else text_model


def encode_terms(terms: Sequence[str], text_model: str = "default") -> tuple[torch.Tensor, str]:
    """Frozen text embeddings ``(N, D)`` of ``terms`` (the text of a term is its canonical name,
    or the free text itself) and the text model's hash. Cached on disk by the encoder."""
    from volumed.text.encoder import TextEncoder

    encoder = TextEncoder(_text_model_dir(text_model))
    return encoder.encode_cached(list(terms)), encoder.model_hash


class PromptSegModule(L.LightningModule):
    """Partial-label training of a :class:`~volumed.inference.package.TextPromptedSegmenter`.

    Args:
        encoder, encoder_kwargs, decoder_kwargs: the network (``PromptSegConfig`` fields).
        encoder_weights: checkpoint loaded into the encoder before training (e.g. VoCo's
            ``encoder.pt``), through :func:`volumed.encoders.weights.load_encoder_weights`; the
            report is logged and kept in :attr:`encoder_load_report`.
        init_weights: weights of the *whole* network to start from, e.g. the ``model.safetensors``
            of a package trained earlier (a second, fine-tuning phase); must fit exactly.
        text_model: ``"default"`` (MiniLM) or a local Hugging Face folder.
        lr, weight_decay: AdamW.
        warmup_steps: linear warm-up, then cosine decay to 0 at ``trainer.max_steps``.
        num_negatives: annotated-absent terms per patch used as negatives (``None``: all).
        exclusive_negatives: for a patch of an ``exclusive`` case (its masks one structure per
            voxel, e.g. TotalSegmentator outputs), this many of the terms it does *not* annotate,
            drawn at random, are trained as negatives inside its masks only (BCE with target 0
            over the ``known`` voxels): a structure the case leaves unlabelled may be anywhere
            else, but not inside its liver or lungs. ``0``: off (unannotated terms never used).
        dice_weight, bce_weight, bce_topk: :class:`PartialLabelLoss` weights and top-k fraction.
        patch_size, overlap, threshold: recorded in the package for sliding-window inference.
        presence: the package's presence rule (``{"min_ml", "min_confidence"}``, :class:`PromptSegConfig`):
            a mask both smaller and less sure is reported absent. ``None``: none.
        seed: seeds the negative sampling.

    Batch: see :class:`PromptSegPatchDataset`. The term list and its embeddings come from the
    DataModule at ``setup`` (:meth:`set_terms`), computed once per run, never per step.
    """

    def __init__(
        self,
        encoder: str = "stunet_tiny",
        encoder_kwargs: dict | None = None,
        decoder_kwargs: dict | None = None,
        encoder_weights: str | None = None,
        init_weights: str | None = None,
        text_model: str = "default",
        lr: float = 2.0e-3,
        weight_decay: float = 1.0e-2,
        warmup_steps: int = 20,
        num_negatives: int | None = None,
        exclusive_negatives: int = 0,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        bce_topk: float | None = None,
        patch_size: Sequence[int] = (64, 64, 32),
        overlap: float = 0.25,
        threshold: float = 0.5,
        presence: dict | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_config = PromptSegConfig(
            encoder=encoder,
            encoder_kwargs=dict(encoder_kwargs or {}),
            decoder_kwargs=dict(decoder_kwargs or {}),
            text_model=text_model,
            patch_size=tuple(int(p) for p in patch_size),
            overlap=float(overlap),
            threshold=float(threshold),
            presence=dict(presence or {}),
        )
        self.net: TextPromptedSegmenter = build_model(self.model_config)
        self.loss_fn = PartialLabelLoss(dice_weight, bce_weight, bce_topk)
        self.encoder_load_report = None
        if encoder_weights:
            from volumed.encoders.weights import load_encoder_weights

            self.encoder_load_report = load_encoder_weights(self.net.segmenter.encoder, encoder_weights)
            log.info("encoder weights from %s:\n%s", encoder_weights, self.encoder_load_report.format_table())
        if init_weights:
            from volumed.encoders.weights import load_encoder_weights

            self.init_load_report = load_encoder_weights(self.net, init_weights, key_map=None, strict=True)
        self.terms: list[str] = []
        self.register_buffer("term_embeddings", torch.empty(0, self.model_config.text_dim), persistent=False)
        self._generator = torch.Generator().manual_seed(int(seed))
        self._val_embeddings: dict[tuple[str, ...], torch.Tensor] = {}  # validation terms -> embeddings

    def set_terms(self, terms: Sequence[str], embeddings: torch.Tensor | None = None) -> None:
        """Fix the term list ``T`` and its frozen embeddings ``(T, D)`` (computed if not given)."""
        terms = list(terms)
        if embeddings is None:
            embeddings, digest = encode_terms(terms, self.hparams.text_model)
            self.model_config.text_model_hash = digest
        if tuple(embeddings.shape) != (len(terms), self.model_config.text_dim):
            raise ConfigError(f"term embeddings of shape {tuple(embeddings.shape)} for {len(terms)} terms")
        self.terms = terms
        self.term_embeddings = embeddings.to(self.device, torch.float32)
        self.model_config.terms = terms

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:
            dm.setup(stage)
            if self.terms != list(dm.terms):
                self.set_terms(dm.terms)
            self.model_config.preprocessing = _preprocessing_dict(dm.preprocess_config)
            self.model_config.modalities = sorted({c.modality for c in dm.cases})
            self.model_config.pad_mode = str(getattr(dm.hparams, "pad_mode", "constant"))

    def forward(self, image: torch.Tensor, term_index: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, N, X, Y, Z)`` of the terms ``term_index`` ``(N,)`` for images ``(B, 1, X, Y, Z)``
        with modality ids ``(B,)``."""
        b, n = image.shape[0], term_index.shape[0]
        text = self.term_embeddings[term_index]  # (N, D)
        ids = modality.to(torch.long)[:, None].expand(b, n).reshape(-1)
        queries = self.net.text_condition(text[None].expand(b, -1, -1).reshape(b * n, -1), ids).reshape(b, n, -1)
        return self.net.segmenter(image, queries)

    def compute_loss(self, batch: Mapping[str, torch.Tensor]) -> PartialLabelLossOutput:
        use = select_terms(batch["target"], batch["annotated"], self.hparams.num_negatives, self._generator)
        extra = self._exclusive_pairs(batch)
        # Only the terms some sample of the batch uses are decoded (term-independent queries make
        # this exact); unused pairs among them are masked out by the loss.
        idx = (use | extra).any(0).nonzero().flatten()
        if idx.numel() == 0:
            idx = batch["annotated"].any(0).nonzero().flatten()[:1]
        logits = self(batch["image"], idx.to(self.device), batch["modality"])
        out = self.loss_fn(logits, batch["target"][:, idx], use[:, idx])
        if not bool(extra.any()):
            return out
        excl = exclusive_negative_bce(logits, extra[:, idx], batch["known"])
        if self._trainer is not None:
            self.log("train/exclusive_bce", excl.detach(), batch_size=batch["image"].shape[0])
        return out._replace(loss=out.loss + self.loss_fn.bce_weight * excl)

    def _exclusive_pairs(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``(B, T)`` bool: the unannotated terms trained as negatives inside an exclusive
        case's masks (``exclusive_negatives`` per sample, drawn at random)."""
        annotated = batch["annotated"].to(torch.bool)
        k = int(self.hparams.exclusive_negatives or 0)
        if k <= 0 or "exclusive" not in batch:
            return torch.zeros_like(annotated)
        rows = batch["exclusive"].to(torch.bool).view(-1, 1) & (batch["known"].flatten(1).amax(1) > 0).view(-1, 1)
        candidates = ~annotated & rows
        scores = torch.rand(candidates.shape, generator=self._generator).to(candidates.device)
        rank = scores.masked_fill(~candidates, 2.0).argsort(1).argsort(1)
        return candidates & (rank < k)

    def on_validation_epoch_start(self) -> None:
        self._val_dice: dict[str, list[float]] = {}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Dice of every annotated, non-empty term of one whole validation scan
        (``datamodule.validation_cases[batch]``) on its original grid, through the path of
        ``volumed segment`` (:func:`predict_probabilities`, threshold of the package)."""
        from monai.metrics import compute_dice

        case = self.trainer.datamodule.validation_cases[int(batch)]
        # Once per term list, not per validation: a cache miss loads the text model.
        if case.terms not in self._val_embeddings:
            self._val_embeddings[case.terms] = encode_terms(list(case.terms), self.hparams.text_model)[0]
        embeddings = self._val_embeddings[case.terms]
        # fp32, as ``volumed segment`` runs, whatever the training precision's autocast.
        with torch.autocast(device_type=self.device.type, enabled=False):
            probs = predict_probabilities(self.net, self.model_config, case.volume, list(case.terms), embeddings)
        for k, term in enumerate(case.terms):
            ref = case.masks[k]
            if not ref.any():
                continue
            pred = torch.as_tensor(probs[k] > self.model_config.threshold)[None, None]
            d = float(compute_dice(pred, torch.as_tensor(ref)[None, None], include_background=True).item())
            self._val_dice.setdefault(term, []).append(d)

    def on_validation_epoch_end(self) -> None:
        scores = getattr(self, "_val_dice", {})
        if not scores:
            return
        per_term = {t: float(np.mean(v)) for t, v in scores.items()}
        self.log("val/dice", float(np.mean(list(per_term.values()))), prog_bar=True)
        for t, v in per_term.items():
            self.log("val/dice/" + t.replace(" ", "_"), v)
        self.validation_dice = per_term

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(batch)
        bs = batch["image"].shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=bs)
        self.log("train/dice_loss", out.dice, batch_size=bs)
        self.log("train/bce", out.bce, batch_size=bs)
        self.log("train/pairs", float(out.pairs), batch_size=bs)
        return out.loss

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_warmup_cosine(self, self.net.parameters(), lr=self.hparams.lr,
                                   weight_decay=self.hparams.weight_decay, warmup_steps=self.hparams.warmup_steps)

    def package_config(self, training: Mapping[str, Any] | None = None) -> PromptSegConfig:
        """The :class:`PromptSegConfig` to save with the trained weights."""
        cfg = PromptSegConfig(**asdict(self.model_config))
        if not cfg.text_model_hash:
            from volumed.text.encoder import default_model_dir, model_hash

            d = _text_model_dir(cfg.text_model) or default_model_dir()
            cfg.text_model_hash = model_hash(d) if d else ""
        cfg.training = {**cfg.training, **(training or {})}
        return cfg

    def export_package(self, out_dir: str | Path, training: Mapping[str, Any] | None = None, overwrite: bool = True) -> Path:
        """:func:`~volumed.inference.package.save_package` of the trained network."""
        return save_package(self.net, self.package_config(training), out_dir, overwrite=overwrite)


def _preprocessing_dict(config: PreprocessConfig) -> dict:
    d = asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


class PackageExport(Callback):
    """Saves the trained network as a package at the end of ``fit`` (rank zero), recording the
    recipe, steps, wall time and software versions in its ``training``: any LightningModule with
    ``export_package(out_dir, training)`` (:class:`PromptSegModule`: a ``volumed segment``
    package; :class:`volumed.tasks.ground.GroundingModule`: a grounding package)."""

    def __init__(self, out_dir: str | Path, training: Mapping[str, Any] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.training = dict(training or {})
        self._start: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and hasattr(pl_module, "export_package"):
            from volumed.environment import software_versions

            info = {**self.training, "steps": int(trainer.global_step), "software": software_versions()}
            if self._start is not None:
                info["fit_wall_minutes"] = round((time.perf_counter() - self._start) / 60.0, 1)
            path = pl_module.export_package(self.out_dir, info)
            log.info("saved the trained package to %s", path)


# --------------------------------------------------------------------------------------------
# Inference used for evaluation (whole image, sliding window, back to the original grid)
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_probabilities(
    model: TextPromptedSegmenter,
    config: PromptSegConfig,
    volume: Volume,
    terms: Sequence[str],
    embeddings: torch.Tensor,
    *,
    sw_batch_size: int = 1,
    postprocess: bool = True,
) -> np.ndarray:
    """Per-term probabilities ``(N, X, Y, Z)`` float32 on ``volume``'s original grid.

    The same path as ``volumed segment`` (:class:`volumed.inference.segment.PromptSegPredictor`):
    the package's preprocessing, MONAI sliding-window inference, trilinear inversion to the
    original grid. Values are computed only around each structure (zeros elsewhere, and for
    terms that never exceed the threshold); they are exact wherever they exceed it (when the
    model grid is the original grid up to flips, only the voxels above the threshold are set).
    With ``postprocess`` (the default, as ``volumed segment``), each term's connected-component
    rule (:mod:`volumed.inference.postprocess`) removes the fragments first.
    """
    from dataclasses import replace

    from volumed.inference.segment import PromptSegPredictor

    if len(terms) != embeddings.shape[0]:
        raise ValueError(f"{len(terms)} terms but {embeddings.shape[0]} embeddings")
    modality = volume.modality if volume.modality in ("CT", "MR") else config.preprocessing.get("modality", "CT")
    predictor = PromptSegPredictor(model, config, sw_batch_size=sw_batch_size)
    case = predictor.preprocess(replace(volume, modality=modality))
    with torch.inference_mode():
        queries = model.condition(embeddings.to(torch.float32), modality)
    probs = predictor.predict_probabilities(case, queries)
    out = np.zeros((len(terms), *volume.shape), dtype=np.float32)
    components = None
    if postprocess:
        from volumed.inference.postprocess import ComponentFilter

        resolved = [predictor.vocabulary.resolve(t, modality, allow_free_text=True) for t in terms]
        components = ComponentFilter(predictor.postprocess_rules(resolved), float(config.threshold))
    for k, pieces in predictor.iter_original(probs, case, components):
        for where, values in pieces or ():  # a box (slices) or voxels (index arrays)
            out[k][where] = np.maximum(out[k][where], values)
    return out
