"""Training of the grounding head (``volumed train ground``): finding sentences -> masks.

Data: a finding-level datalist (:mod:`volumed.data.grounding_datalist`), or phantoms written as
one (:func:`volumed.data.grounding_phantoms.write_grounding_phantoms`). Each case is read once,
preprocessed like every other head (:class:`volumed.data.transforms.PreprocessConfig`), and its
sentences parsed (:func:`volumed.heads.grounding.finding_queries`). Negated sentences are dropped:
they never reach the model at inference. Absent sentences (``mask: null``, not negated) stay, as
negatives. Text embeddings are computed once per run, never per step::

    patch (B, 1, px, py, pz), centred on a finding's mask with probability fg_rate
    K sentences per patch: those whose mask lies in the patch first, then the others (their
        target in this patch is empty: the model must not answer "right lower lobe" with a
        nodule of the left lung)
    queries = GroundingModel.queries(sentence, location) (B*K, D) -> logits (B, K, px, py, pz)
    loss = PartialLabelLoss: Dice on the non-empty targets + BCE on every pair

The trained network is written as a grounding package (config.json + grounding.json +
model.safetensors, :func:`volumed.heads.grounding.save_grounding_package`), read by
``volumed ground --model``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from volumed.data.transforms import PreprocessConfig, pad_spatial
from volumed.errors import ConfigError
from volumed.heads.grounding import (
    FindingQuery,
    GroundingConfig,
    GroundingModel,
    build_grounding_model,
    finding_queries,
    save_grounding_package,
)
from volumed.inference.package import PromptSegConfig

if TYPE_CHECKING:
    from volumed.heads.promptseg import TermQueryDecoder
from volumed.tasks.optim import adamw_warmup_cosine
from volumed.tasks.promptseg import PartialLabelLoss

__all__ = [
    "GroundingDataModule",
    "GroundingModule",
    "GroundingPatchDataset",
    "GroundingTrainCase",
    "encode_queries",
    "load_grounding_cases",
]

log = logging.getLogger(__name__)
_MODALITY_IDS = {"CT": 0, "MR": 1}


def _text_encoder(text_model: str):
    from volumed.text.encoder import TextEncoder

    return TextEncoder(None if text_model == "default" else text_model)


def encode_queries(queries: Sequence[FindingQuery], encoder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sentence (N, D), location (N, D), has_location (N,) bool)`` for ``queries``: the sentence
    as written, and its location text (:func:`volumed.heads.grounding.location_text`; zeros when
    none). Location texts come from the encoder's on-disk cache, like anatomy terms."""
    sentence = encoder.encode([q.text for q in queries])
    places = sorted({q.location for q in queries if q.location})
    table = dict(zip(places, encoder.encode_cached(places))) if places else {}
    location = torch.stack([table[q.location] if q.location else torch.zeros(encoder.dim) for q in queries]) \
        if queries else torch.empty(0, encoder.dim)
    has = torch.tensor([q.location is not None for q in queries], dtype=torch.bool)
    return sentence, location, has


@dataclass
class GroundingTrainCase:
    """One preprocessed case: ``image`` (1, x, y, z) in [0, 1]; per kept sentence ``masks``
    (K, x, y, z) uint8 (all zero for an absent sentence), ``queries``, and their embeddings."""

    image: torch.Tensor
    masks: torch.Tensor
    queries: tuple[FindingQuery, ...]
    sentence: torch.Tensor
    location: torch.Tensor
    has_location: torch.Tensor
    modality: str
    case_id: str
    anatomy: torch.Tensor | None = None  # (K,) bool: anatomy sentences (FindingQuery.anatomy)

    def __post_init__(self):
        if self.anatomy is None:
            self.anatomy = torch.tensor([q.anatomy for q in self.queries], dtype=torch.bool)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape[1:])  # type: ignore[return-value]


def load_grounding_cases(cases, config: PreprocessConfig, encoder) -> list[GroundingTrainCase]:
    """Read and preprocess :class:`~volumed.data.grounding_datalist.GroundingCase` entries; drop
    negated sentences (and cases left with none)."""
    from volumed.io import read_label, read_volume
    from volumed.tasks.promptseg_data import _preprocess_with_masks

    out = []
    for case in cases:
        modality = case.modality or "CT"
        volume = read_volume(case.image, modality=modality)
        kept, stack = [], []
        for f in case.findings:
            (query,) = finding_queries([f.text])
            if query.negated:
                continue
            if f.mask is None:
                mask = np.zeros(volume.shape, bool)
            else:
                data = read_label(f.mask, reference=volume).data
                mask = data == f.mask_label if f.mask_label is not None else data > 0
            kept.append(query)
            stack.append(torch.as_tensor(mask))
        if not kept:
            continue
        cfg = PreprocessConfig(**{**asdict(config), "modality": modality})
        image, masks = _preprocess_with_masks(volume, torch.stack(stack).to(torch.uint8), cfg)
        sentence, location, has = encode_queries(kept, encoder)
        out.append(GroundingTrainCase(image, masks.to(torch.uint8), tuple(kept), sentence, location, has, modality,
                                      str(case.extra.get("case_id", case.image.name))))
    if not out:
        raise ConfigError("no case holds a sentence to ground (all negated, or no findings)", "datalist")
    return out


class GroundingPatchDataset(Dataset):
    """Random patches with ``queries_per_patch`` sentences each (see the module docstring).

    Item: ``image`` (1, px, py, pz) float, ``target`` (K, px, py, pz) uint8, ``sentence`` and
    ``location`` (K, D) float, ``has_location`` and ``anatomy`` (K,) bool, ``modality`` () long.

    Anatomy sentences (whole organs) are never a patch's centre while a finding is there to
    centre on, and at most ``anatomy_per_patch`` of them come with a patch, after the findings
    in it: they teach the location gate and must not crowd the findings out.
    """

    def __init__(self, cases: Sequence[GroundingTrainCase], patch_size: Sequence[int], fg_rate: float = 0.8,
                 queries_per_patch: int = 4, samples: int = 64, seed: int = 0, anatomy_per_patch: int = 1):
        if not cases:
            raise ConfigError("GroundingPatchDataset: no cases")
        if not 0.0 <= float(fg_rate) <= 1.0 or int(queries_per_patch) < 1:
            raise ConfigError(f"GroundingPatchDataset: fg_rate in [0, 1] and queries_per_patch >= 1, got {fg_rate}, {queries_per_patch}")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.fg_rate, self.k, self.samples, self.seed = float(fg_rate), int(queries_per_patch), int(samples), int(seed)
        self.anatomy_per_patch = int(anatomy_per_patch)
        self.cases = [self._padded(c) for c in cases]
        self._draws = 0

    def _padded(self, case: GroundingTrainCase) -> dict[str, Any]:
        target = [max(s, p) for s, p in zip(case.shape, self.patch_size)]
        pads = [v for s, t in reversed(list(zip(case.shape, target))) for v in ((t - s) // 2, t - s - (t - s) // 2)]
        masks = pad_spatial(case.masks, pads, "constant")
        return {"image": pad_spatial(case.image, pads, "constant"), "masks": masks, "case": case,
                "fg": [m.nonzero() for m in masks]}

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, i: int) -> dict[str, Any]:
        # A fresh draw per call (epochs differ), reproducible per worker.
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng((self.seed, info.id if info else 0, self._draws, int(i)))
        self._draws += 1
        item = self.cases[int(rng.integers(len(self.cases)))]
        case, shape = item["case"], item["image"].shape[1:]
        anatomy = case.anatomy
        present = [k for k, fg in enumerate(item["fg"]) if len(fg) and not anatomy[k]] or \
            [k for k, fg in enumerate(item["fg"]) if len(fg)]
        if present and rng.random() < self.fg_rate:
            fg = item["fg"][present[int(rng.integers(len(present)))]]
            # Jittered, so that the finding is anywhere in the patch, not always at its centre
            # (a network would learn "the centre" and answer every sliding window there).
            jitter = [int(rng.integers(-(p // 2) + 2, p // 2 - 1)) if p > 6 else 0 for p in self.patch_size]
            center = fg[int(rng.integers(len(fg)))].numpy() + np.array(jitter)
        else:
            center = np.array([rng.integers(n) for n in shape])
        start = [int(np.clip(c - p // 2, 0, n - p)) for c, p, n in zip(center, self.patch_size, shape)]
        box = tuple(slice(s, s + p) for s, p in zip(start, self.patch_size))
        target = item["masks"][(slice(None), *box)]
        inside = target.flatten(1).amax(1) > 0
        order = [int(k) for k in rng.permutation(len(case.queries))]
        organs = [k for k in order if anatomy[k] and inside[k]][: self.anatomy_per_patch]
        findings = [k for k in order if not anatomy[k]]
        order = [k for k in findings if inside[k]] + organs + [k for k in findings if not inside[k]]
        order = order or [int(k) for k in rng.permutation(len(case.queries))]
        pick = [order[j % len(order)] for j in range(self.k)]
        return {"image": item["image"][(slice(None), *box)].float(), "target": target[pick],
                "sentence": case.sentence[pick], "location": case.location[pick],
                "has_location": case.has_location[pick], "anatomy": anatomy[pick],
                "modality": torch.tensor(_MODALITY_IDS[case.modality])}


class GroundingDataModule(L.LightningDataModule):
    """Cases of a finding-level datalist (or written phantoms) as random patches.

    Args:
        datalist: finding-level datalist JSON; ``None`` writes ``phantoms`` phantom cases
            (:func:`volumed.data.grounding_phantoms.write_grounding_phantoms`) into ``phantom_dir``
            (default: a temporary folder) and reads them back through the same datalist reader.
        section: datalist section to train on.
        phantoms, phantom_seed, phantom_shape, phantom_spacing: the phantom cohort.
        phantom_anatomy: anatomy sentences per phantom case (whole organs, which train the
            location gate; :func:`~volumed.data.grounding_phantoms.phantom_findings`).
        anatomy_per_patch: at most this many anatomy sentences per patch (:class:`GroundingPatchDataset`).
        target_spacing (mm), crop_foreground, margin, ct_window (HU mapped to [0, 1]): the
            preprocessing (recorded in the package). A narrow window makes soft-tissue lesions
            (20-60 HU from their organ) visible to a small network early in training.
        patch_size, batch_size, fg_rate, queries_per_patch, samples_per_epoch, num_workers: patches.
        text_model: ``"default"`` (MiniLM) or a local Hugging Face folder.
        seed: patch sampling.
    """

    def __init__(
        self,
        datalist: str | None = None,
        section: str = "training",
        phantoms: int = 0,
        phantom_seed: int = 0,
        phantom_shape: Sequence[int] = (64, 64, 48),
        phantom_spacing: Sequence[float] = (4.0, 4.0, 4.0),
        phantom_dir: str | None = None,
        phantom_anatomy: int = 0,
        anatomy_per_patch: int = 1,
        target_spacing: Sequence[float] | None = (4.0, 4.0, 4.0),
        crop_foreground: bool = False,
        margin: int = 8,
        ct_window: Sequence[float] = (-1000.0, 1000.0),
        patch_size: Sequence[int] = (32, 32, 16),
        batch_size: int = 2,
        fg_rate: float = 0.8,
        queries_per_patch: int = 4,
        samples_per_epoch: int = 64,
        num_workers: int = 0,
        text_model: str = "default",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if datalist is None and int(phantoms) < 1:
            raise ConfigError("give data.datalist (a finding-level datalist) or data.phantoms > 0", "data")
        self.preprocess_config = PreprocessConfig(
            target_spacing=tuple(float(s) for s in target_spacing) if target_spacing else None,
            crop_foreground=bool(crop_foreground), margin=int(margin), ct_window=tuple(float(v) for v in ct_window))
        self.cases: list[GroundingTrainCase] = []
        self.text_model_hash = ""
        self._tmp: tempfile.TemporaryDirectory | None = None

    @property
    def datalist_path(self) -> Path:
        h = self.hparams
        if h.datalist is not None:
            return Path(h.datalist)
        from volumed.data.grounding_phantoms import write_grounding_phantoms

        if h.phantom_dir is None:
            self._tmp = self._tmp or tempfile.TemporaryDirectory(prefix="volumed-ground-")
            folder = Path(self._tmp.name)
        else:
            folder = Path(h.phantom_dir)
        path = folder / "grounding.json"
        if not path.is_file():
            write_grounding_phantoms(folder, int(h.phantoms), int(h.phantom_seed), shape=h.phantom_shape,
                                     spacing=h.phantom_spacing, anatomy=int(h.phantom_anatomy))
        return path

    def setup(self, stage: str | None = None) -> None:
        if self.cases:
            return
        from volumed.data.grounding_datalist import load_grounding_datalist

        cases = load_grounding_datalist(self.datalist_path, section=self.hparams.section)
        encoder = _text_encoder(self.hparams.text_model)
        self.text_model_hash = encoder.model_hash
        self.cases = load_grounding_cases(cases, self.preprocess_config, encoder)
        log.info("grounding: %d cases, %d sentences", len(self.cases), sum(len(c.queries) for c in self.cases))

    def train_dataloader(self) -> DataLoader:
        h = self.hparams
        ds = GroundingPatchDataset(self.cases, h.patch_size, h.fg_rate, h.queries_per_patch, h.samples_per_epoch, h.seed,
                                   h.anatomy_per_patch)
        return DataLoader(ds, batch_size=int(h.batch_size), shuffle=False, num_workers=int(h.num_workers))


class GroundingModule(L.LightningModule):
    """Trains a :class:`~volumed.heads.grounding.GroundingModel`.

    Args:
        encoder, encoder_kwargs, decoder_kwargs: the network (:class:`PromptSegConfig` fields).
        init_weights: ``model.safetensors`` of a ``volumed segment`` package (or of a grounding
            package) to start from; the segmenter and modality table load, the location
            conditioning keeps its start when the file has none.
        sentence_weight: the sentence's initial weight in the query
            (:class:`~volumed.heads.grounding.LocationConditioning`); small when starting from an
            anatomy model, so that the untrained query points at the finding's organ.
        gate_kernel: dilation of the location gate (:class:`~volumed.heads.grounding.GroundingModel`).
        text_model: ``"default"`` (MiniLM) or a local Hugging Face folder.
        lr, weight_decay, warmup_steps: AdamW, warm-up, cosine decay (:func:`adamw_warmup_cosine`).
        dice_weight, bce_weight, bce_topk: :class:`~volumed.tasks.promptseg.PartialLabelLoss` weights
            and top-k fraction (a lesion is ~0.1 % of a patch: the plain voxel mean dilutes it).
        pos_weight: with it, the BCE weighs a finding's voxels this many times a background
            voxel (``binary_cross_entropy_with_logits(pos_weight=...)``), and Dice is taken as
            in :class:`PartialLabelLoss`. Without it, a network starting from an anatomy model
            learns "nothing anywhere" within a few dozen steps, because findings are so small.
        pos_weight_voxels: with ``pos_weight``, a finding with fewer voxels than this in the
            patch has its positive weight raised, to ``pos_weight * pos_weight_voxels / voxels``,
            so that its voxels together weigh as much as a finding of ``pos_weight_voxels``
            voxels. Larger findings keep ``pos_weight``. Without it, an 8 mm lesion (3-4 voxels
            at 4 mm) weighs a tenth of a 16 mm one in the BCE, and its Dice gradient vanishes once
            the network is sure of "nothing there" (docs/grounding.md, "Small findings").
        patch_size, overlap, threshold: recorded in the package for sliding-window inference.
        min_instance_voxels: recorded in grounding.json (components smaller are dropped).
        input_windows: ``[[low, high], ...]`` HU: the image also enters the encoder through
            these windows (:class:`~volumed.heads.promptseg.InputWindows`; a soft-tissue window
            for lesions a few tens of HU from their organ). The encoder's input convolution
            starts with zero weights for them (``in_channels="pad"``), so a network loaded from
            ``init_weights`` answers exactly as before until training gives them weight.
    """

    def __init__(
        self,
        encoder: str = "stunet_tiny",
        encoder_kwargs: dict | None = None,
        decoder_kwargs: dict | None = None,
        init_weights: str | None = None,
        sentence_weight: float = 1.0,
        gate_kernel: int = 9,
        text_model: str = "default",
        lr: float = 3.0e-3,
        weight_decay: float = 1.0e-2,
        warmup_steps: int = 5,
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        bce_topk: float | None = None,
        pos_weight: float | None = None,
        pos_weight_voxels: int | None = None,
        patch_size: Sequence[int] = (32, 32, 16),
        overlap: float = 0.25,
        threshold: float = 0.5,
        min_instance_voxels: int = 0,
        input_windows: Sequence[Sequence[float]] | None = None,
    ) -> None:
        super().__init__()
        if pos_weight_voxels is not None and (pos_weight is None or int(pos_weight_voxels) < 1):
            raise ConfigError(f"GroundingModule: pos_weight_voxels ({pos_weight_voxels!r}) needs pos_weight and must be >= 1")
        self.save_hyperparameters()
        self.model_config = PromptSegConfig(
            encoder=encoder, encoder_kwargs=dict(encoder_kwargs or {}), decoder_kwargs=dict(decoder_kwargs or {}),
            input_windows=[[float(w[0]), float(w[1])] for w in (input_windows or [])],
            text_model=text_model, patch_size=tuple(int(p) for p in patch_size), overlap=float(overlap),
            threshold=float(threshold))
        self.grounding_config = GroundingConfig(gate_kernel=int(gate_kernel), min_instance_voxels=int(min_instance_voxels))
        self.net: GroundingModel = build_grounding_model(self.model_config, sentence_weight, gate_kernel)
        self.loss_fn = PartialLabelLoss(dice_weight, bce_weight, bce_topk)
        if init_weights:
            from volumed.encoders.weights import load_encoder_weights

            # "pad": input channels added by input_windows start at zero weight (the start's
            # answers unchanged); without windows the channel counts agree and nothing is adapted.
            report = load_encoder_weights(self.net, init_weights, key_map=_fpn_key_map(init_weights, self.net.segmenter.decoder),
                                          in_channels="pad", strict=False)
            log.info("initial weights from %s:\n%s", init_weights, report.format_table())

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None:
            return
        dm.setup(stage)
        d = asdict(dm.preprocess_config)
        self.model_config.preprocessing = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        if self.net.segmenter.input_windows is not None:  # the windows read the data's [0, 1] scale
            self.net.segmenter.input_windows.set_scale(dm.preprocess_config.ct_window)
        self.model_config.modalities = sorted({c.modality for c in dm.cases})
        self.model_config.text_model_hash = dm.text_model_hash
        queries = [q for c in dm.cases for q in c.queries]
        self.model_config.terms = sorted({q.location_term for q in queries if q.location_term})
        self.grounding_config.locations = list(self.model_config.terms)
        self.grounding_config.finding_types = sorted({q.finding_type for q in queries if q.finding_type})

    def forward(self, image: torch.Tensor, sentence: torch.Tensor, location: torch.Tensor, has_location: torch.Tensor,
                modality: torch.Tensor, anatomy: torch.Tensor | None = None) -> torch.Tensor:
        """Batched queries: ``image`` (B, 1, ...), ``sentence``/``location`` (B, K, D), ``has_location``
        and ``anatomy`` (B, K), ``modality`` (B,) ids -> logits (B, K, ...). An anatomy sentence's
        channel is its location query's own logits, which it trains (the gate of a finding
        sentence gets no gradient: :meth:`GroundingModel.gate`)."""
        b, k, d = sentence.shape
        ids = modality.to(torch.long)[:, None].expand(b, k).reshape(-1)
        loc = location.reshape(b * k, d)
        q = self.net.location(sentence.reshape(b * k, d), loc, has_location.reshape(b * k))
        queries = torch.cat([self.net.text_condition(q, ids).reshape(b, k, d),
                             self.net.text_condition(loc, ids).reshape(b, k, d)], dim=1)
        return self.net.gate(self.net.segmenter(image, queries), has_location, anatomy)

    def compute_loss(self, batch: Mapping[str, torch.Tensor]):
        anatomy = batch.get("anatomy")
        logits = self(batch["image"], batch["sentence"], batch["location"], batch["has_location"], batch["modality"],
                      anatomy)
        use = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
        out = self.loss_fn(logits, batch["target"], use)
        if self.hparams.pos_weight is None:
            return out
        # Findings' voxels weigh pos_weight times a background voxel; an organ's (anatomy) as many.
        weight = torch.full(logits.shape[:2], float(self.hparams.pos_weight), device=logits.device)
        if self.hparams.get("pos_weight_voxels"):
            # A small finding's voxels together weigh as much as pos_weight_voxels voxels.
            voxels = batch["target"].flatten(2).sum(-1).float().clamp_min(1.0)
            weight = weight * (float(self.hparams.pos_weight_voxels) / voxels).clamp_min(1.0)
        if anatomy is not None:
            weight = torch.where(anatomy.to(torch.bool), torch.ones_like(weight), weight)
        bce = F.binary_cross_entropy_with_logits(logits.float(), batch["target"].float(),
                                                 pos_weight=weight[:, :, None, None, None])
        return out._replace(loss=self.loss_fn.dice_weight * out.dice + self.loss_fn.bce_weight * bce, bce=bce)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self.compute_loss(batch)
        bs = batch["image"].shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=bs)
        self.log("train/dice_loss", out.dice, batch_size=bs)
        self.log("train/bce", out.bce, batch_size=bs)
        return out.loss

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_warmup_cosine(self, self.net.parameters(), lr=self.hparams.lr,
                                   weight_decay=self.hparams.weight_decay, warmup_steps=self.hparams.warmup_steps)

    def export_package(self, out_dir: str | Path, training: Mapping[str, Any] | None = None,
                       metrics: Mapping[str, Any] | None = None, overwrite: bool = True) -> Path:
        """Write the trained network as a grounding package."""
        cfg = PromptSegConfig(**asdict(self.model_config))
        if not cfg.text_model_hash:
            cfg.text_model_hash = _text_encoder(cfg.text_model).model_hash
        grounding = GroundingConfig(**asdict(self.grounding_config))
        grounding.training = {**grounding.training, **(training or {})}
        grounding.metrics = {**grounding.metrics, **(metrics or {})}
        return save_grounding_package(self.net, cfg, grounding, out_dir, overwrite=overwrite)


def _fpn_key_map(init_weights: str, decoder: TermQueryDecoder):
    """``None`` (names as they are), or :func:`volumed.heads.promptseg.fpn_level_key_map` when
    ``init_weights`` is a package's weights whose ``config.json`` (beside them) gives other FPN
    ``pixel_levels`` than ``decoder``'s: the FPN blocks are indexed by position in those levels,
    so loading by name would put each level's weights one level off.

    Raises:
        ConfigError: the package's config is unreadable, or its number of memory levels differs
            (the memory outputs could not be placed).
    """
    from volumed.heads.promptseg import fpn_level_key_map
    from volumed.inference.package import CONFIG_NAME, read_config

    package = Path(init_weights).parent
    if not (package / CONFIG_NAME).is_file():
        return None  # a bare weights file: its names are taken as they are
    old = read_config(package).decoder_kwargs
    every = list(range(len(decoder.feature_info)))  # TermQueryDecoder's default: every level
    old_levels = [int(v) for v in (old.get("pixel_levels") or every)]
    if old_levels == decoder.pixel_levels:
        return None
    memory = min(int(old.get("num_memory_levels", 3)), len(old_levels))
    if memory != decoder.num_memory_levels:
        raise ConfigError(f"cannot start from these weights: their decoder reads {memory} memory level(s), this "
                          f"one {decoder.num_memory_levels}; set decoder_kwargs.num_memory_levels to {memory}",
                          package / CONFIG_NAME)
    return fpn_level_key_map(old_levels, decoder.pixel_levels, memory)
