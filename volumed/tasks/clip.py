"""CT-CLIP training (``volumed train clip``): volumes and their reports, contrastively.

::

    datalist (image + report, MSD JSON or CSV) or phantom report cohort (volumed.data.report_phantoms)
      ──preprocess (RAS, optional spacing, optional body crop, CT window -> [0, 1])──▶ (1, x, y, z)
      ──pad with air / crop (random in training, central in validation) to input_size──▶ (1, *input_size)
      reports ──report_embedding (sentence-averaged, frozen TextEncoder; volumed.heads.clip)──▶ (D,)
        (computed once in setup, never per step)
      ──ClipModule: VolumeTextCLIP──▶ logits (B, B) ──clip_loss (symmetric InfoNCE)

Validation (each validation epoch): zero-shot probabilities of the module's findings (the 18
CT-RATE abnormalities by default) against the labels the CT-RATE rule extractor
(:func:`volumed.text.labels.label_report`) reads off each validation report; logged as
``val/auroc`` (macro over the findings with both classes), ``val/f1``, and ``val/auroc/<finding>``.

The trained network is written as a CLIP package (``clip.json`` + ``model.safetensors``,
:func:`volumed.heads.clip.save_clip_package`), read by ``volumed classify --model``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from volumed.data.transforms import PreprocessConfig, preprocess
from volumed.errors import ConfigError
from volumed.heads.clip import (
    NEGATION_MODES,
    ClipConfig,
    VolumeTextCLIP,
    build_clip_model,
    clip_loss,
    clip_targets,
    prompt_pair_embeddings,
    report_embedding,
    save_clip_package,
    zero_shot_probabilities,
)
from volumed.tasks.optim import adamw_warmup_cosine
from volumed.text.labels import ABNORMALITIES, label_report

__all__ = ["ClipDataModule", "ClipModule", "ClipPairs", "fit_to_size", "prompt_embeddings"]

log = logging.getLogger(__name__)


def _text_encoder(text_model: str):
    from volumed.text.encoder import TextEncoder

    return TextEncoder(None if text_model == "default" else text_model)


def prompt_embeddings(findings: Sequence[str], encoder, negated: str = "keep") -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """``(names, present (F, D), absent (F, D))``: the frozen embeddings of each finding's prompt
    pair, embedded as one-sentence reports (:func:`volumed.heads.clip.report_embedding`)."""
    prompts, present, absent = prompt_pair_embeddings(encoder, findings, negated)
    return [p.finding for p in prompts], present, absent


def fit_to_size(image: torch.Tensor, size: Sequence[int], rng: np.random.Generator | None = None) -> torch.Tensor:
    """``(C, x, y, z)`` -> ``(C, *size)``: padded with 0 (air) where smaller (centred), cropped where
    larger, at a random offset with ``rng`` (training) or centrally without (validation)."""
    size = tuple(int(s) for s in size)
    pad = [max(s - n, 0) for s, n in zip(size, image.shape[1:])]
    if any(pad):
        image = F.pad(image, [v for p in reversed(pad) for v in (p // 2, p - p // 2)], value=0.0)
    starts = []
    for n, s in zip(image.shape[1:], size):
        extra = int(n) - s
        starts.append(int(rng.integers(extra + 1)) if rng is not None and extra else extra // 2)
    return image[(slice(None), *(slice(a, a + s) for a, s in zip(starts, size)))]


class ClipPairs(Dataset):
    """Cached model-space volumes with their report embeddings.

    Item: ``image`` (1, *input_size) float, ``text`` (D,) float, ``report`` str, ``index`` int.
    With ``train=True`` a volume larger than ``input_size`` is cropped at a random place per draw.
    """

    def __init__(self, images: Sequence[torch.Tensor], texts: torch.Tensor, reports: Sequence[str],
                 input_size: Sequence[int], train: bool, seed: int = 0) -> None:
        if not len(images) or len(images) != len(reports) or texts.shape[0] != len(reports):
            raise ConfigError(f"ClipPairs: {len(images)} images, {texts.shape[0]} embeddings and {len(reports)} reports")
        self.images, self.texts, self.reports = list(images), texts, list(reports)
        self.input_size, self.train, self.seed = tuple(int(s) for s in input_size), bool(train), int(seed)
        self._draws = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rng = None
        if self.train:
            info = torch.utils.data.get_worker_info()
            rng = np.random.default_rng((self.seed, info.id if info else 0, self._draws, int(i)))
            self._draws += 1
        return {"image": fit_to_size(self.images[i], self.input_size, rng).float(), "text": self.texts[i],
                "report": self.reports[i], "index": int(i)}


class ClipDataModule(L.LightningDataModule):
    """Volume-report pairs from a datalist or a phantom report cohort.

    Args:
        datalist: MSD JSON or CSV with ``image`` and ``report`` (:mod:`volumed.data.datalist`);
            ``None`` trains on a phantom report cohort
            (:func:`volumed.data.report_phantoms.make_report_cohort`: balanced lung-nodule and
            normal chest phantoms with template reports).
        section, val_section: JSON sections; validation is skipped when ``val_section`` is absent.
        val_datalist: a separate validation datalist.
        phantom_cases, phantom_val_cases: cohort sizes (validation uses ``phantom_seed + 1``:
            held-out phantoms).
        phantom_seed, phantom_shape, phantom_spacing, min_nodule_mm: the phantom cohort.
        phantom_field_of_view: ``"whole"`` or ``"chest"`` (cropped to the lungs, for fine grids).
        phantom_report: ``"template"``: the cohort's nodule report ("There is a nodule in the right
            lower lobe." / "No lung nodule."); ``"full"``: the phantom's own report
            (:func:`volumed.data.phantoms.make_case`), which describes every lesion with its size
            and place, and says "No pulmonary nodules." when there is none.
        input_size: the encoder's input (model-space voxels); CT-ViT needs multiples of its patch.
        spacing: resample to this voxel size (mm); ``None`` keeps the grid.
        crop_foreground: crop to the body box (with ``margin`` voxels) before fitting to input_size.
        ct_window: CT HU mapped to ``[0, 1]``.
        text_model: ``"default"`` (MiniLM) or a local Hugging Face folder.
        max_report_words: report truncation (:func:`volumed.heads.clip.report_sentences`).
        negated: ``"keep"`` or ``"drop"``: how negated sentences enter the report embeddings
            (:func:`volumed.heads.clip.report_embedding`; linked to the model's).
        batch_size, num_workers, seed: loading.
    """

    def __init__(
        self,
        datalist: str | None = None,
        section: str = "training",
        val_section: str = "validation",
        val_datalist: str | None = None,
        phantom_cases: int = 64,
        phantom_val_cases: int = 32,
        phantom_seed: int = 0,
        phantom_shape: Sequence[int] = (48, 48, 32),
        phantom_spacing: Sequence[float] = (6.0, 6.0, 6.0),
        min_nodule_mm: float = 12.0,
        phantom_field_of_view: str = "whole",
        phantom_report: str = "template",
        input_size: Sequence[int] = (48, 48, 32),
        spacing: Sequence[float] | None = None,
        crop_foreground: bool = False,
        margin: int = 4,
        ct_window: Sequence[float] = (-1000.0, 1000.0),
        text_model: str = "default",
        max_report_words: int = 2000,
        negated: str = "keep",
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if phantom_report not in ("template", "full"):
            raise ConfigError(f"data.phantom_report must be 'template' or 'full', got {phantom_report!r}", "data")
        if negated not in NEGATION_MODES:
            raise ConfigError(f"data.negated must be one of {NEGATION_MODES}, got {negated!r}", "data")
        if datalist is None and int(phantom_cases) < 2:
            raise ConfigError("give data.datalist (image + report) or data.phantom_cases >= 2", "data")
        self.preprocess_config = PreprocessConfig(
            target_spacing=tuple(float(s) for s in spacing) if spacing else None, crop_foreground=bool(crop_foreground),
            margin=int(margin), ct_window=tuple(float(v) for v in ct_window), label_keys=())
        self.train_set: ClipPairs | None = None
        self.val_set: ClipPairs | None = None
        self.text_model_hash = ""
        self.encoder = None

    def _datalist_items(self, path: str, section: str, missing_ok: bool = False) -> list[tuple[Any, str, str | None]]:
        from volumed.data.datalist import load_datalist
        from volumed.tasks.report import _has_section

        if missing_ok and not _has_section(path, section):
            return []
        return [(e.image, e.report, e.modality) for e in load_datalist(path, section=section, require=("image", "report"))]

    def _phantom_items(self, n: int, seed: int) -> list[tuple[Any, str, str | None]]:
        from volumed.data.report_phantoms import make_report_cohort

        h = self.hparams
        cohort = make_report_cohort(n, seed, shape=h.phantom_shape, spacing=h.phantom_spacing, min_nodule_mm=h.min_nodule_mm,
                                    field_of_view=h.phantom_field_of_view)
        return [(p.case.image, p.case.report if h.phantom_report == "full" else p.report, "CT") for p in cohort]

    def _load(self, items, train: bool) -> ClipPairs:
        from volumed.io import read_volume
        from volumed.io.volume import Volume

        images = []
        for source, _report, modality in items:
            volume = source if isinstance(source, Volume) else read_volume(source, modality=modality)
            cfg = PreprocessConfig(**{**asdict(self.preprocess_config), "modality": volume.modality
                                      if volume.modality in ("CT", "MR") else "CT"})
            images.append(preprocess(volume, config=cfg).image.as_tensor().float())
        reports = [r for _s, r, _m in items]
        texts = report_embedding(self.encoder, reports, max_words=self.hparams.max_report_words,
                                 negated=self.hparams.negated)
        return ClipPairs(images, texts, reports, self.hparams.input_size, train, self.hparams.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        h = self.hparams
        if h.datalist:
            train = self._datalist_items(h.datalist, h.section)
            if h.val_datalist:
                val = self._datalist_items(h.val_datalist, h.val_section if str(h.val_datalist).endswith(".json") else h.section)
            elif str(h.datalist).endswith(".json"):
                val = self._datalist_items(h.datalist, h.val_section, missing_ok=True)
            else:
                val = []
        else:
            train = self._phantom_items(int(h.phantom_cases), int(h.phantom_seed))
            val = self._phantom_items(int(h.phantom_val_cases), int(h.phantom_seed) + 1) if h.phantom_val_cases else []
        self.encoder = _text_encoder(h.text_model)
        self.text_model_hash = self.encoder.model_hash
        self.train_set = self._load(train, train=True)
        self.val_set = self._load(val, train=False) if val else None
        log.info("clip: %d training pairs, %d validation pairs", len(self.train_set), len(self.val_set or ()))

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        generator = torch.Generator().manual_seed(int(h.seed) + (self.trainer.global_step if self.trainer is not None else 0))
        return DataLoader(self.train_set, batch_size=int(h.batch_size), shuffle=True, drop_last=len(self.train_set) > int(h.batch_size),
                          generator=generator, num_workers=int(h.num_workers))

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=int(self.hparams.batch_size), shuffle=False, num_workers=0)


class ClipModule(L.LightningModule):
    """Trains a :class:`~volumed.heads.clip.VolumeTextCLIP`.

    Args:
        encoder, encoder_kwargs: a registry preset and its overrides (CT-ViT by default).
        embed_dim, text_hidden: the shared embedding size; the text projection's hidden width (0: linear).
        pooling, feature_level: how the volume embedding is pooled (``"mean"`` or ``"max"``) and from
            which encoder map (``-1``: the deepest); see :class:`~volumed.heads.clip.VolumeTextCLIP`.
        init_temperature: CLIP's 0.07.
        text_model: ``"default"`` (MiniLM) or a local Hugging Face folder (linked to the data's).
        findings: zero-shot findings for validation and the package default (empty: CT-RATE's 18).
        lr, weight_decay, warmup_steps: AdamW, warm-up, cosine decay.
        input_size: the encoder input (linked to the data's); overlap: tile overlap at inference.
        max_report_words: recorded in the package (linked to the data's).
        negated: how negated sentences enter report and prompt embeddings, recorded in the
            package (linked to the data's; :func:`volumed.heads.clip.report_embedding`).
    """

    def __init__(
        self,
        encoder: str = "ctvit_tiny",
        encoder_kwargs: dict | None = None,
        embed_dim: int = 256,
        text_hidden: int = 0,
        init_temperature: float = 0.07,
        text_model: str = "default",
        findings: Sequence[str] = (),
        lr: float = 1.0e-3,
        weight_decay: float = 1.0e-2,
        warmup_steps: int = 5,
        input_size: Sequence[int] = (48, 48, 32),
        overlap: float = 0.0,
        max_report_words: int = 2000,
        pooling: str = "mean",
        feature_level: int = -1,
        negated: str = "keep",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.clip_config = ClipConfig(negated=negated,
            encoder=encoder, encoder_kwargs=dict(encoder_kwargs or {}), embed_dim=int(embed_dim),
            text_hidden=int(text_hidden), pooling=pooling, feature_level=int(feature_level), text_model=text_model,
            input_size=tuple(int(s) for s in input_size), overlap=float(overlap), findings=list(findings), max_report_words=int(max_report_words))
        self.net: VolumeTextCLIP = build_clip_model(self.clip_config)
        if init_temperature != 0.07:
            with torch.no_grad():
                self.net.logit_scale.fill_(float(np.log(1.0 / init_temperature)))
        self.finding_names: list[str] = []
        self._prompts: tuple[torch.Tensor, torch.Tensor] | None = None
        self._val: list[tuple[torch.Tensor, list[str]]] = []

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        dm.setup(stage)
        self.clip_config.preprocessing = {k: list(v) if isinstance(v, tuple) else v
                                          for k, v in asdict(dm.preprocess_config).items()}
        self.clip_config.text_model_hash = dm.text_model_hash
        names, present, absent = prompt_embeddings(self.clip_config.findings or ABNORMALITIES, dm.encoder,
                                                   self.clip_config.negated)
        self.finding_names, self._prompts = names, (present, absent)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.net(image, text)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        logits = self(batch["image"], batch["text"])
        loss = clip_loss(logits, clip_targets(list(batch["report"]), logits.shape[0], logits.device))
        bs = int(batch["image"].shape[0])
        self.log("train/loss", loss, prog_bar=True, batch_size=bs)
        self.log("train/logit_scale", self.net.scale.detach(), batch_size=bs)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        if self._prompts is None:
            return
        present, absent = (p.to(self.device) for p in self._prompts)
        probs = zero_shot_probabilities(self.net.embed_image(batch["image"]), self.net.embed_text(present),
                                        self.net.embed_text(absent), self.net.scale)
        self._val.append((probs.float().cpu(), list(batch["report"])))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        from volumed.metrics.classification import classification_metrics

        probs = torch.cat([p for p, _ in self._val])
        reports = [r for _, rs in self._val for r in rs]
        labels = torch.tensor([[int(label_report(r).labels.get(n, 0)) if n in ABNORMALITIES else 0
                                for n in self.finding_names] for r in reports])
        metrics = classification_metrics(probs, labels, self.finding_names)
        if metrics.auroc is not None:
            self.log("val/auroc", metrics.auroc)
            self.log("val/f1", metrics.f1)
        for f in metrics.findings:
            if f.auroc is not None:
                self.log(f"val/auroc/{f.finding}", f.auroc)
        self.clip_config.metrics = {"validation": metrics.to_dict()}

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_warmup_cosine(self, self.net.parameters(), lr=self.hparams.lr,
                                   weight_decay=self.hparams.weight_decay, warmup_steps=self.hparams.warmup_steps)

    def export_package(self, out_dir: str | Path, training: Mapping[str, Any] | None = None,
                       metrics: Mapping[str, Any] | None = None, overwrite: bool = True) -> Path:
        """Write the trained network as a CLIP package."""
        cfg = ClipConfig(**asdict(self.clip_config))
        if not cfg.text_model_hash:
            cfg.text_model_hash = _text_encoder(cfg.text_model).model_hash
        cfg.training = {**cfg.training, **(training or {})}
        cfg.metrics = {**cfg.metrics, **(metrics or {})}
        return save_clip_package(self.net, cfg, out_dir, overwrite=overwrite)
