"""VoCo volume-contrastive pretraining of any registered encoder, as a LightningModule + DataModule.

VoCo: Wu, Zhuang and Chen, "VoCo: A Simple-yet-Effective Volume Contrastive Learning Framework for
3D Medical Image Analysis", CVPR 2024 (arXiv:2402.17300), and its extended version "Large-Scale 3D
Medical Image Pre-training with Geometric Context Priors" (VoCo-v2, arXiv:2410.09890).

The pretext task: the body region of a volume is tiled by an ``n x n`` grid of *base crops*; a
*random crop* of the same size must be located by comparing it with the base crops. Its label is its
overlap fraction with each base crop (:mod:`volumed.data.voco_crops`). Every crop is encoded, the
deepest feature map is average-pooled and an MLP projector maps it to an embedding (:class:`VoCoNet`).
A momentum (EMA) teacher, as in VoCo-v2, encodes the same crops without gradients. The losses
are documented on :class:`VoCoLoss`.

Data flow and shapes (``B`` volumes per batch, ``N = n * n`` base crops, ``K`` random crops,
crop size ``(cx, cy, cz)`` voxels, ``D`` embedding width)::

    batch.base    (B, N, C, cx, cy, cz)  \\
    batch.random  (B, K, C, cx, cy, cz)   > student / teacher -> (B, N, D), (B, K, D)
    batch.labels  (B, K, N)              /   predicted overlaps p (B, K, N) vs labels -> losses
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from monai.data import CacheDataset, DataLoader
from monai.transforms import Resize, Transform
from monai.utils import convert_to_tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import RandomSampler, default_collate

from volumed.data.datalist import load_datalist
from volumed.data.transforms import PreprocessConfig, preprocess
from volumed.data.voco_crops import VoCoCropDataset, VoCoCrops, VoCoCropSampler
from volumed.encoders import create_encoder
from volumed.encoders.weights import save_weights
from volumed.tasks.optim import adamw_warmup_cosine
from volumed.errors import ConfigError
from volumed.io import read_volume

__all__ = [
    "EncoderExport",
    "VoCoDataModule",
    "VoCoLoss",
    "VoCoLossOutput",
    "VoCoNet",
    "VoCoPretrainModule",
    "VoCoProjector",
    "VoCoRegionLoader",
    "position_logits",
]


# --------------------------------------------------------------------------------------------
# Model pieces
# --------------------------------------------------------------------------------------------


class VoCoProjector(nn.Module):
    """Global average pooling of the deepest feature map, then a 3-layer MLP.

    Follows VoCo's projection head: ``Linear-BN-ReLU, Linear-BN-ReLU, Linear``. The batch norms
    have no affine parameters and no running statistics (they always normalise over the crops
    of the current forward pass, in training and in evaluation), so predictions depend only on the
    crops encoded together, never on a running average of other batches.

    Args:
        in_channels: channels of the deepest feature map (``feature_info[-1].channels``).
        hidden_dim: width of the two hidden layers.
        out_dim: embedding width ``D``.

    ``forward(feature)``: ``(M, in_channels, x, y, z)`` -> ``(M, out_dim)``; ``M >= 2``.
    """

    def __init__(self, in_channels: int, hidden_dim: int = 2048, out_dim: int = 2048) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, hidden_dim),
            nn.BatchNorm1d(hidden_dim, affine=False, track_running_stats=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim, affine=False, track_running_stats=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.mlp(F.adaptive_avg_pool3d(feature, 1).flatten(1))


class VoCoNet(nn.Module):
    """An encoder with a :class:`VoCoProjector` on its deepest feature map.

    ``forward(x)``: crops ``(M, C, cx, cy, cz)`` -> embeddings ``(M, D)``.
    """

    def __init__(self, encoder: nn.Module, hidden_dim: int = 2048, out_dim: int = 2048) -> None:
        super().__init__()
        info = getattr(encoder, "feature_info", None)
        if not info:
            raise ConfigError(f"{type(encoder).__name__} has no feature_info; VoCo needs a registered volumed encoder")
        self.encoder = encoder
        self.projector = VoCoProjector(info[-1].channels, hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(x)[-1])


def position_logits(random: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """VoCo's predicted overlaps ``p = max(0, cos(q_k, b_n))``.

    Args:
        random: ``(B, K, D)`` random-crop embeddings ``q``.
        base: ``(B, N, D)`` base-crop embeddings ``b`` of the same volumes.

    Returns:
        ``(B, K, N)`` in ``[0, 1]``, computed in float32 (safe under bf16 autocast).
    """
    q = F.normalize(random.float(), dim=-1)
    b = F.normalize(base.float(), dim=-1)
    return torch.relu(q @ b.transpose(1, 2))


class VoCoLossOutput(NamedTuple):
    """The weighted ``total`` and its three unweighted terms (scalars)."""

    total: torch.Tensor
    position: torch.Tensor
    negative: torch.Tensor
    regularization: torch.Tensor


class VoCoLoss(nn.Module):
    """VoCo's three losses on predicted overlaps ``p`` (B, K, N) and labels ``y`` (B, K, N).

    With ``d = |p - y|`` (both in ``[0, 1]``):

    * position loss, VoCo's prediction loss ``-log(1 - d)``. The CVPR paper averages it over all
      base crops; VoCo-v2 and the authors' public code weight it by the labels (a mean over the
      base crops a random crop overlaps) and handle the others with the negative loss below. The
      latter form is implemented::

          L_pos = sum_{b,k,n} y * -log(max(1 - d, eps)) / sum_{b,k,n} y

    * negative loss (VoCo-v2): base crops a random crop does not touch must get similarity 0::

          L_neg = sum_{y = 0} p^2 / #{y = 0}

    * regularisation loss (VoCo "volume contrast for regularisation"): the base crops of one
      volume stand for different regions, so their embeddings ``b`` are pushed apart::

          L_reg = mean_b mean_{n != m} max(0, cos(b_n, b_m))^2

      (the authors' code stops the gradient through one crop of each pair; here both get it).

    ``total = w_pos * L_pos + w_neg * L_neg + w_reg * L_reg`` (all weights 1 in the papers).
    ``eps`` keeps the logarithm finite when a prediction is exactly wrong (``d = 1``).
    """

    def __init__(
        self,
        position_weight: float = 1.0,
        negative_weight: float = 1.0,
        regularization_weight: float = 1.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.position_weight = position_weight
        self.negative_weight = negative_weight
        self.regularization_weight = regularization_weight
        self.eps = eps

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, base: torch.Tensor) -> VoCoLossOutput:
        """``logits`` and ``labels`` ``(B, K, N)``; ``base`` embeddings ``(B, N, D)``."""
        if logits.shape != labels.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ")
        p, y = logits.float(), labels.float()
        d = (p - y).abs()
        position = (y * -torch.log((1.0 - d).clamp(min=self.eps))).sum() / y.sum().clamp(min=self.eps)
        zero = (y == 0).float()
        negative = (zero * p.square()).sum() / zero.sum().clamp(min=1.0)
        regularization = self.base_discrepancy(base)
        total = (
            self.position_weight * position
            + self.negative_weight * negative
            + self.regularization_weight * regularization
        )
        return VoCoLossOutput(total, position, negative, regularization)

    @staticmethod
    def base_discrepancy(base: torch.Tensor) -> torch.Tensor:
        """``mean_b mean_{n != m} max(0, cos(b_n, b_m))^2`` for ``base`` of shape ``(B, N, D)``."""
        b = F.normalize(base.float(), dim=-1)
        sim = torch.relu(b @ b.transpose(1, 2)).square()
        n = b.shape[1]
        off_diagonal = ~torch.eye(n, dtype=torch.bool, device=b.device)
        return sim[:, off_diagonal].mean()


# --------------------------------------------------------------------------------------------
# LightningModule
# --------------------------------------------------------------------------------------------


class VoCoPretrainModule(L.LightningModule):
    """VoCo pretraining of ``create_encoder(encoder)`` with an EMA teacher.

    Args:
        encoder: registered encoder name (``volumed.encoders.list_encoders()``).
        in_channels: input channels (1 for CT).
        encoder_kwargs: overrides passed to :func:`~volumed.encoders.create_encoder`.
        hidden_dim, proj_dim: projector widths (VoCo: 2048 and 2048).
        teacher_momentum: EMA decay ``m`` of the teacher, ``t <- m * t + (1 - m) * s`` after each
            optimiser step (the authors' code uses 0.9). ``None`` disables the teacher (VoCo v1:
            the student also encodes the base crops).
        lr, weight_decay: AdamW settings (VoCo: lr 1e-4).
        warmup_steps: linear warm-up, then cosine decay to 0 at the last step
            (:class:`monai.optimizers.WarmupCosineSchedule`).
        position_weight, negative_weight, regularization_weight: see :class:`VoCoLoss`.

    Training logs ``train/loss``, ``train/pos_loss``, ``train/neg_loss``, ``train/reg_loss`` and
    ``train/pos_mae`` (mean ``|p - y|`` over all random/base pairs); validation logs ``val/pos_mae``
    and ``val/loss`` from the student alone.
    """

    def __init__(
        self,
        encoder: str = "stunet_tiny",
        in_channels: int = 1,
        encoder_kwargs: dict[str, Any] | None = None,
        hidden_dim: int = 2048,
        proj_dim: int = 2048,
        teacher_momentum: float | None = 0.9,
        lr: float = 1e-4,
        weight_decay: float = 1e-2,
        warmup_steps: int = 0,
        position_weight: float = 1.0,
        negative_weight: float = 1.0,
        regularization_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if teacher_momentum is not None and not 0.0 <= teacher_momentum < 1.0:
            raise ConfigError(f"teacher_momentum must be in [0, 1) or None, got {teacher_momentum}")
        self.student = VoCoNet(create_encoder(encoder, in_channels, **(encoder_kwargs or {})), hidden_dim, proj_dim)
        self.teacher: AveragedModel | None = None
        if teacher_momentum is not None:
            # torch's own EMA container; buffers are not averaged (the encoders' buffers are
            # constants or batch statistics, and the projector keeps none).
            self.teacher = AveragedModel(self.student, multi_avg_fn=get_ema_multi_avg_fn(teacher_momentum))
            self.teacher.requires_grad_(False)
        self.criterion = VoCoLoss(position_weight, negative_weight, regularization_weight)

    # -- forward ------------------------------------------------------------------------------

    def embed(self, base: torch.Tensor, random: torch.Tensor, net: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode all crops of a batch in one pass (so the projector normalises over all of them).

        Args:
            base: ``(B, N, C, cx, cy, cz)``; random: ``(B, K, C, cx, cy, cz)``.
            net: the student (default) or the teacher.

        Returns:
            Embeddings ``(B, N, D)`` of the base crops and ``(B, K, D)`` of the random crops.
        """
        net = net if net is not None else self.student
        (b, n), k = base.shape[:2], random.shape[1]
        z = net(torch.cat([base.flatten(0, 1), random.flatten(0, 1)]))
        return z[: b * n].unflatten(0, (b, n)), z[b * n :].unflatten(0, (b, k))

    @torch.no_grad()
    def predict_overlaps(self, base: torch.Tensor, random: torch.Tensor) -> torch.Tensor:
        """Student's predicted overlaps ``(B, K, N)`` for crops shaped as in :meth:`embed`."""
        zb, zr = self.embed(base, random)
        return position_logits(zr, zb)

    def _step(self, batch: VoCoCrops, stage: str) -> torch.Tensor:
        s_base, s_rand = self.embed(batch.base, batch.random)
        if stage == "train" and self.teacher is not None:
            with torch.no_grad():
                t_base, t_rand = self.embed(batch.base, batch.random, self.teacher)
            # VoCo-v2: each side of the comparison comes once from the student and once from the
            # teacher, so the targets the student chases move slowly (the EMA) in both directions.
            logits = 0.5 * (position_logits(s_rand, t_base) + position_logits(t_rand, s_base))
        else:
            logits = position_logits(s_rand, s_base)
        out = self.criterion(logits, batch.labels, s_base)
        mae = (logits.detach() - batch.labels.float()).abs().mean()
        bs = batch.labels.shape[0]
        on_step = stage == "train"
        self.log(f"{stage}/loss", out.total, prog_bar=True, batch_size=bs, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        self.log(f"{stage}/pos_mae", mae, prog_bar=True, batch_size=bs, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        self.log_dict(
            {f"{stage}/pos_loss": out.position, f"{stage}/neg_loss": out.negative, f"{stage}/reg_loss": out.regularization},
            batch_size=bs, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step,
        )
        return out.total

    def training_step(self, batch: VoCoCrops, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: VoCoCrops, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    # -- optimisation -------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_warmup_cosine(self, self.student.parameters(), lr=self.hparams.lr,
                                   weight_decay=self.hparams.weight_decay, warmup_steps=self.hparams.warmup_steps)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # After the weights moved (once per optimiser step, also with gradient accumulation).
        if self.teacher is not None:
            self.teacher.update_parameters(self.student)

    # -- export -------------------------------------------------------------------------------

    def export_encoder(self, path: str | Path, use_teacher: bool = False) -> Path:
        """Save the (student, or EMA teacher) encoder's weights with :func:`volumed.encoders.weights.save_weights`.

        The file loads into ``create_encoder(encoder)`` with ``load_encoder_weights``. An existing
        file is replaced (a resumed run re-exports to the same place).
        """
        if use_teacher and self.teacher is None:
            raise ConfigError("export_encoder(use_teacher=True): this run has no teacher (teacher_momentum=None)")
        net = self.teacher.module if use_teacher else self.student
        return save_weights(net.encoder, path, overwrite=True)


class EncoderExport(Callback):
    """At the end of ``fit``, write the student encoder to ``path`` (rank zero only)."""

    def __init__(self, path: str | Path, use_teacher: bool = False) -> None:
        self.path = Path(path)
        self.use_teacher = use_teacher

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero and isinstance(pl_module, VoCoPretrainModule):
            pl_module.export_encoder(self.path, use_teacher=self.use_teacher)


# --------------------------------------------------------------------------------------------
# DataModule
# --------------------------------------------------------------------------------------------


class VoCoRegionLoader(Transform):
    """Read one volume and bring it to a VoCo region: ``{"image": path, "modality": m}`` -> ``{"image": (1, *region)}``.

    Reading is :func:`volumed.io.read_volume` (NIfTI, NRRD, MHA, DICOM folders); preprocessing is
    the project's :func:`volumed.data.transforms.preprocess` (RAS, optional spacing, crop to the
    body box, intensity to ``[0, 1]``: CT by the ``ct_window`` HU, MR by percentiles); MONAI
    ``Resize`` then squeezes the body box into ``region_size``, as VoCo does. Output ``"image"`` is a
    plain float32 tensor ``(1, *region_size)``; ``"modality"`` and ``"path"`` say what was read.

    Args:
        region_size: ``(n * cx, n * cy, cz)`` voxels.
        spacing: resample to this voxel size (mm) before the crop, or ``None`` to keep the grid.
        ct_window: HU mapped to ``[0, 1]`` for CT.
        default_modality: used when neither the datalist nor the file tells CT from MR.

    Raises (when called): the reader's :class:`~volumed.errors.VolumedError` subclasses, e.g.
    ``InvalidVolumeError`` for a CT without any voxel above the body threshold.
    """

    def __init__(
        self,
        region_size: Sequence[int],
        spacing: Sequence[float] | None = None,
        ct_window: Sequence[float] = (-175.0, 250.0),
        default_modality: str = "CT",
    ) -> None:
        self.region_size = tuple(int(s) for s in region_size)
        self.configs = {
            m: PreprocessConfig(
                modality=m,
                target_spacing=tuple(spacing) if spacing is not None else None,
                ct_window=tuple(ct_window),
                margin=0,
                label_keys=(),
            )
            for m in ("CT", "MR")
        }
        if default_modality not in self.configs:
            raise ConfigError(f"default_modality must be 'CT' or 'MR', got {default_modality!r}")
        self.default_modality = default_modality
        self.resize = Resize(spatial_size=self.region_size, mode="trilinear", anti_aliasing=True)

    def __call__(self, item: Mapping[str, Any]) -> dict[str, Any]:
        volume = read_volume(item["image"], modality=item.get("modality"))
        modality = volume.modality if volume.modality in self.configs else self.default_modality
        image = preprocess(volume, config=self.configs[modality]).image
        region = convert_to_tensor(self.resize(image), track_meta=False, dtype=torch.float32)
        return {"image": region, "modality": modality, "path": str(item["image"])}


class VoCoDataModule(L.LightningDataModule):
    """Unlabelled volumes -> VoCo regions -> :class:`~volumed.data.voco_crops.VoCoCrops` batches.

    Each volume is read and preprocessed by :class:`VoCoRegionLoader` (RAS, optional spacing, body
    crop, intensities to ``[0, 1]``, resize to the region ``(n * cx, n * cy, cz)``; the authors
    resize the body box to 384 x 384 x 96 for a 4 x 4 grid of 96^3 crops). These regions are cached
    (MONAI ``CacheDataset``); the crops are drawn anew for every sample.

    Args:
        datalist: MSD-style JSON or CSV (``volumed.data.datalist.load_datalist``); images may be
            NIfTI/NRRD/MHA files or DICOM folders, relative paths resolve against the datalist.
        section: datalist section for training.
        crop_size: ``(cx, cy, cz)`` voxels (an int means a cube); must suit the encoder's stride.
        grid: ``n``, the base crops form an ``n x n`` grid.
        num_random_crops: ``K`` random crops per volume and sample.
        batch_size: volumes per batch (each brings ``n * n + K`` crops).
        num_workers: DataLoader worker processes.
        spacing: resample to this voxel size in mm first (``None``: keep the file's grid).
        ct_window: CT intensities mapped linearly to ``[0, 1]`` and clipped (VoCo: -175..250 HU).
        default_modality: for volumes whose modality neither the datalist nor the file gives.
        flip_prob, rotate90_prob: crop augmentations (VoCo: 0.2 each), see ``VoCoCropSampler``.
        samples_per_epoch: draw this many samples (with replacement) per epoch; ``None``: one pass.
        val_samples_per_volume: size of a fixed validation set (crops drawn once with ``seed + 1``);
            0 disables validation.
        cache_rate: fraction of the preprocessed volumes kept in memory.
        seed: seeds the crop positions (training, and the fixed validation set).
    """

    def __init__(
        self,
        datalist: str | Path,
        section: str = "training",
        crop_size: int | Sequence[int] = (64, 64, 32),
        grid: int = 3,
        num_random_crops: int = 4,
        batch_size: int = 1,
        num_workers: int = 0,
        spacing: Sequence[float] | None = None,
        ct_window: Sequence[float] = (-175.0, 250.0),
        default_modality: str = "CT",
        flip_prob: float = 0.0,
        rotate90_prob: float = 0.0,
        samples_per_epoch: int | None = None,
        val_samples_per_volume: int = 0,
        cache_rate: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.sampler_kwargs = dict(
            crop_size=crop_size, grid=grid, num_random_crops=num_random_crops, flip_prob=flip_prob, rotate90_prob=rotate90_prob
        )
        # Built now, so that a bad crop/grid/modality setting fails before any volume is read.
        self.region_size = VoCoCropSampler(**self.sampler_kwargs).region_size
        self.loader = VoCoRegionLoader(self.region_size, spacing, ct_window, default_modality)
        self.regions: CacheDataset | None = None
        self.train_set: VoCoCropDataset | None = None
        self.val_set: list[VoCoCrops] = []

    def setup(self, stage: str | None = None) -> None:
        if self.regions is not None:
            return
        hp = self.hparams
        entries = load_datalist(hp.datalist, section=hp.section, require=("image",))
        items = [{"image": str(e.image), "modality": e.modality} for e in entries]
        # copy_cache=False: the sampler only reads a region (crops are new tensors), so handing out
        # the cached tensor itself saves a deep copy of it per sample.
        self.regions = CacheDataset(
            items, transform=self.loader, cache_rate=hp.cache_rate, num_workers=max(1, hp.num_workers),
            copy_cache=False, progress=False,
        )
        self.train_set = VoCoCropDataset(self.regions, VoCoCropSampler(**self.sampler_kwargs))
        if hp.val_samples_per_volume > 0:
            # A fixed set: the same crops at every evaluation, from its own seeded stream.
            val = VoCoCropDataset(self.regions, VoCoCropSampler(**self.sampler_kwargs).set_random_state(hp.seed + 1))
            self.val_set = [val[i] for i in range(len(val)) for _ in range(hp.val_samples_per_volume)]

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        # MONAI's DataLoader seeds the crop sampler from this generator (in the main process, or
        # per worker); offsetting the seed by the step a resumed run starts from makes it draw new
        # crops instead of replaying those of the first steps, and keeps a fresh run reproducible.
        step = self.trainer.global_step if self.trainer is not None else 0
        generator = torch.Generator().manual_seed(hp.seed + step)
        sampler = None
        if hp.samples_per_epoch:
            sampler = RandomSampler(self.train_set, replacement=True, num_samples=int(hp.samples_per_epoch), generator=generator)
        return DataLoader(
            self.train_set,
            batch_size=hp.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            generator=generator,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
            # torch's collate keeps the VoCoCrops NamedTuple (MONAI's list_data_collate would not).
            collate_fn=default_collate,
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_set:
            return []
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, shuffle=False, num_workers=0, collate_fn=default_collate)
