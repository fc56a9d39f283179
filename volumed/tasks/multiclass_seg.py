"""Plain multi-class segmentation with STU-Net: one softmax channel per class plus background.

What the STU-Net bundles (``bundles/volumed_stunet_{s,b,l,h}_ct``) train. Unlike the text-prompted
head, the class set is fixed by the network's last layer, and every training case must carry a
full label map of those classes (a class missing from a case's map is learned as background).

Data flow (one case, ``C`` classes)::

    image (X, Y, Z) HU + label map (X, Y, Z) of TotalSegmentator ids
      -> volumed.data.transforms.preprocess (RAS, target spacing, body crop, HU window to [0, 1])
      -> ids -> class indices 1..C (anything else 0 = background), cached per case
      -> random patches (B, 1, px, py, pz) / (B, 1, px, py, pz), a share centred on foreground
      -> STU-Net: logits (B, C + 1, px, py, pz) (+ coarser deep-supervision outputs in training)
      -> MONAI DiceCELoss (softmax, one-hot target) under DeepSupervisionLoss

Classes are named by their canonical vocabulary terms (``liver``, ``kidney_left``); their ids in
a label map are the vocabulary's TotalSegmentator ids (:meth:`volumed.data.vocab.Vocabulary.label_ids`),
which the phantoms (:mod:`volumed.data.phantoms`) use too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from volumed.errors import ConfigError

__all__ = ["MultiClassSegDataModule", "MultiClassSegModule", "NetworkExport", "class_lookup"]

log = logging.getLogger(__name__)


def class_lookup(classes: Sequence[str], modality: str = "CT") -> np.ndarray:
    """``table[id] = class index`` (1-based, 0 = background) for label maps of TotalSegmentator ids.

    Raises:
        UnknownTermError: a class name that is not a vocabulary term (with suggestions).
        ConfigError: a class with no label id in ``modality``, a repeated one, or two classes sharing an id.
    """
    from volumed.data.vocab import default_vocabulary

    vocab = default_vocabulary()
    if len(set(classes)) != len(classes) or not classes:
        raise ConfigError(f"classes must be distinct and non-empty, got {list(classes)}", "classes")
    ids: dict[int, int] = {}
    for k, name in enumerate(classes, start=1):
        found = vocab.label_ids(name, modality)
        if not found:
            raise ConfigError(f"class {name!r} has no {modality} label id in the vocabulary", "classes")
        for i in found:
            if i in ids:
                raise ConfigError(f"classes {classes[ids[i] - 1]!r} and {name!r} share the label id {i}", "classes")
            ids[i] = k
    table = np.zeros(max(ids) + 1, dtype=np.int64)
    for i, k in ids.items():
        table[i] = k
    return table


class _PatchDataset(Dataset):
    """``samples`` random patches of cached model-space cases; item ``i`` is drawn from a
    generator seeded by ``(seed, epoch, i)``, so an epoch is reproducible in any worker."""

    def __init__(self, cases: list[tuple[torch.Tensor, torch.Tensor]], patch: Sequence[int], samples: int,
                 foreground_fraction: float, seed: int) -> None:
        self.cases, self.patch, self.samples = cases, tuple(int(p) for p in patch), int(samples)
        self.foreground_fraction, self.seed, self.epoch = float(foreground_fraction), int(seed), 0

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        image, label = self.cases[int(rng.integers(len(self.cases)))]
        # Pad to at least the patch (air = 0 after the window, background = 0).
        pad = [max(0, p - s) for p, s in zip(self.patch, image.shape[1:])]
        if any(pad):
            spec = [x for p in reversed(pad) for x in (p // 2, p - p // 2)]
            image, label = F.pad(image, spec), F.pad(label, spec)
        shape = np.array(image.shape[1:])
        high = shape - np.array(self.patch)
        foreground = torch.nonzero(label[0] > 0) if rng.random() < self.foreground_fraction else None
        if foreground is not None and len(foreground):
            centre = foreground[int(rng.integers(len(foreground)))].numpy()
            start = np.clip(centre - np.array(self.patch) // 2, 0, high)
        else:
            start = np.array([int(rng.integers(h + 1)) for h in high])
        box = tuple(slice(int(a), int(a) + p) for a, p in zip(start, self.patch))
        return {"image": image[(slice(None), *box)].clone(), "label": label[(slice(None), *box)].clone()}


class MultiClassSegDataModule(L.LightningDataModule):
    """Cases with full label maps -> random patches for :class:`MultiClassSegModule`.

    Args:
        data: MONAI-style list of ``{"image": path, "label": path}`` (NIfTI/NRRD/MHA files or DICOM
            folders; the label map is brought onto the image's grid by ``volumed.io.read_label``).
        classes: class names in channel order (channel ``k`` is ``classes[k - 1]``, 0 is background).
        target_spacing, ct_window, margin: model space (``volumed.data.transforms.PreprocessConfig``).
        patch_size: ``(px, py, pz)`` voxels; must suit the network's strides.
        batch_size: patches per step.
        samples_per_epoch: patches per epoch.
        foreground_fraction: share of patches centred on a labelled voxel (nnU-Net: 1/3).
        phantom_cases, phantom_shape, phantom_spacing: add this many phantoms
            (:func:`volumed.data.phantoms.make_cohort`, CT) to ``data``; for tests and smoke runs.
        seed: patches and phantoms.
        num_workers: DataLoader workers.

    Raises (on ``setup``): ConfigError for no data, an entry without a label map, unknown classes.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]] | None = None,
        classes: Sequence[str] = ("liver",),
        target_spacing: Sequence[float] = (1.5, 1.5, 1.5),
        ct_window: Sequence[float] = (-1000.0, 1000.0),
        margin: int = 8,
        patch_size: Sequence[int] = (128, 128, 128),
        batch_size: int = 2,
        samples_per_epoch: int = 250,
        foreground_fraction: float = 0.33,
        phantom_cases: int = 0,
        phantom_shape: Sequence[int] = (96, 96, 64),
        phantom_spacing: Sequence[float] = (3.0, 3.0, 3.0),
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.classes = list(classes)
        self.lookup = class_lookup(self.classes)  # unknown classes fail now, before any volume is read
        self.cases: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.train_set: _PatchDataset | None = None

    def _model_space(self, volume, label) -> tuple[torch.Tensor, torch.Tensor]:
        from volumed.data.transforms import PreprocessConfig, preprocess

        hp = self.hparams
        config = PreprocessConfig(modality="CT", target_spacing=tuple(hp.target_spacing), ct_window=tuple(hp.ct_window),
                                  margin=int(hp.margin))
        case = preprocess(volume, label, config)
        ids = case.label.as_tensor().to(torch.int64).clamp(min=0)
        ids = torch.where(ids < len(self.lookup), ids, torch.zeros_like(ids))
        classes = torch.as_tensor(self.lookup)[ids]
        return case.image.as_tensor().to(torch.float32), classes.to(torch.int64)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from volumed.io import read_label, read_volume

        hp = self.hparams
        data = list(hp.data or [])
        if not data and not hp.phantom_cases:
            raise ConfigError("no training data: give data ([{'image': ..., 'label': ...}]) or phantom_cases", "train#dataset")
        for k, item in enumerate(data):
            if not isinstance(item, Mapping) or not item.get("image") or not item.get("label"):
                raise ConfigError(f"data entry {k} needs 'image' and 'label' (a full label map): {item!r}", "train#dataset#data")
            volume = read_volume(item["image"])
            self.cases.append(self._model_space(volume, read_label(item["label"], volume)))
        if hp.phantom_cases:
            from volumed.data.phantoms import make_cohort

            for case in make_cohort(int(hp.phantom_cases), int(hp.seed), shape=hp.phantom_shape, spacing=hp.phantom_spacing):
                self.cases.append(self._model_space(case.image, case.label))
        self.train_set = _PatchDataset(self.cases, hp.patch_size, hp.samples_per_epoch, hp.foreground_fraction, hp.seed)

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None, "setup() first"
        self.train_set.epoch = self.trainer.current_epoch if self.trainer is not None else 0
        sampler = None
        if self.trainer is not None and self.trainer.world_size > 1:
            # Item i is fixed by (seed, epoch, i): rank r takes items r, r + W, ..., so a step of W
            # ranks with batch b sees exactly what one process with batch W * b sees (the DDP test
            # holds the two runs to that). Given explicitly, Lightning keeps it.
            from torch.utils.data import DistributedSampler

            sampler = DistributedSampler(self.train_set, num_replicas=self.trainer.world_size,
                                         rank=self.trainer.global_rank, shuffle=False, drop_last=True)  # fmt: skip
        return DataLoader(self.train_set, batch_size=int(self.hparams.batch_size), shuffle=False, sampler=sampler,
                          num_workers=int(self.hparams.num_workers))


class MultiClassSegModule(L.LightningModule):
    """A STU-Net preset trained with Dice + cross-entropy on every decoder stage.

    Args:
        network: STU-Net preset (``stunet_s``, ``stunet_b``, ``stunet_l``, ``stunet_h``, ``stunet_tiny``).
        num_classes: output channels, background included.
        network_kwargs: preset overrides (``strides``, ``gradient_checkpointing``).
        init_weights: optional weights to start from (an encoder, e.g. VoCo's ``encoder.pt``, or a
            whole network), loaded with ``volumed.encoders.weights.load_encoder_weights`` (report logged).
        lr, weight_decay, warmup_steps: AdamW with warm-up and cosine decay.

    ``forward(image (B, 1, X, Y, Z))`` -> logits ``(B, num_classes, X, Y, Z)`` (in eval mode).
    """

    def __init__(
        self,
        network: str = "stunet_s",
        num_classes: int = 2,
        network_kwargs: Mapping[str, Any] | None = None,
        init_weights: str | None = None,
        lr: float = 1e-3,
        weight_decay: float = 3e-5,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from monai.losses import DeepSupervisionLoss, DiceCELoss

        from volumed.encoders.stunet import create_stunet

        self.net = create_stunet(network, in_channels=1, num_classes=int(num_classes), deep_supervision=True,
                                 **dict(network_kwargs or {}))
        if init_weights:
            from volumed.encoders.weights import load_encoder_weights

            report = load_encoder_weights(self.net, init_weights)
            log.info("initial weights: %s", report)
        self.loss = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True), weight_mode="exp")

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # float: DeepSupervisionLoss resizes the target by interpolation, which needs a float tensor.
        loss = self.loss(self.net(batch["image"]), batch["label"].float())
        # sync_dist: under DDP the logged loss is the mean over ranks, i.e. over the global batch.
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["image"].shape[0], sync_dist=True)
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        from volumed.tasks.optim import adamw_warmup_cosine

        return adamw_warmup_cosine(self, self.net.parameters(), lr=self.hparams.lr,
                                   weight_decay=self.hparams.weight_decay, warmup_steps=self.hparams.warmup_steps)


class NetworkExport(Callback):
    """At the end of ``fit``, write ``pl_module.net``'s weights to ``path`` (``.safetensors``: a
    bundle's ``models/model.safetensors``; rank zero only, atomically)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from volumed.encoders.weights import save_weights

        if trainer.is_global_zero:
            save_weights(pl_module.net, self.path, overwrite=True)
            log.info("wrote %s", self.path)
