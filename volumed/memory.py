"""Peak memory of one training step, estimated on the ``meta`` device (nothing is allocated).

The estimate of a training step (forward, backward, AdamW step) in bytes is::

    weights      4 B x every parameter and buffer (fp32 master weights, also under bf16-mixed;
                 a frozen copy such as VoCo's EMA teacher counts here too)
  + gradients    4 B x every trainable parameter
  + optimizer    8 B x every trainable parameter (AdamW: two fp32 moments)
  + batch        the input tensors of one step (image, targets)
  + activations  the storages autograd keeps from the forward pass for the backward pass
  + backward     BACKWARD_LARGEST x the largest saved tensor (the gradients in flight)
  + margin       ACTIVATION_MARGIN x activations (temporaries of the backward pass, e.g. the
                 recomputed stage under gradient checkpointing, and allocator fragmentation)
  + overhead     on a GPU only: CUDA_OVERHEAD_BYTES (CUDA context, cuDNN/cuBLAS workspaces)

Weights, gradients and optimizer state are all alive at once in a steady-state step: Lightning
runs the forward pass before it sets the previous step's gradients to ``None``, so the
activations of the forward pass meet the gradients and moments of the step before.

*Activations* are measured, not modelled: the real model of a recipe (encoder + decoder/head, as
its LightningModule builds it) runs one forward pass and its loss on ``meta`` tensors inside
``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor autograd saves; distinct
storages are summed (views count once) and parameters, buffers and the batch are left out.
Gradient checkpointing is measured the same way: a checkpointed stage saves only its input.

*bf16-mixed*: PyTorch's autocast does not act on meta tensors, so :class:`MetaAutocast` emulates
CUDA autocast's casting policy: the inputs of convolutions, matrix products, linear layers and
attention (autocast's lower-precision list) are cast to bfloat16, once per parameter and step as
autocast's weight cache does, so those ops output and save bf16 tensors; normalisations with an
fp32 policy (layer/group norm, softmax, BCE) cast back to fp32; all other ops run in the dtype
they are given, as under autocast. The bf16 copies of the weights are saved for the backward
pass and therefore counted among the activations.

:func:`estimate_recipe` reads a recipe YAML (``configs/train_promptseg.yaml``,
``configs/pretrain_voco.yaml``, ``configs/train_stunet-fsdp.yaml``) and estimates its step per GPU.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from volumed.errors import ConfigError

__all__ = [
    "ACTIVATION_MARGIN",
    "BACKWARD_LARGEST",
    "CUDA_OVERHEAD_BYTES",
    "MemoryEstimate",
    "MetaAutocast",
    "estimate_promptseg",
    "estimate_recipe",
    "estimate_training_step",
    "estimate_voco",
    "measure_activations",
    "saved_activation_bytes",
]

_GIB, _MIB = 2**30, 2**20

#: Share of the measured activations added for what the sum of saved tensors leaves out: the
#: temporaries of the backward pass (under checkpointing, one stage's recomputed activations) and
#: allocator fragmentation. Checked against the peak RSS of real CPU steps (bench/bench_train_memory.py).
ACTIVATION_MARGIN = 0.25
#: The backward pass holds gradients as large as the largest saved tensor: the gradient reaching
#: the op that saved it and the one it passes on. Counted as this many times that tensor.
BACKWARD_LARGEST = 2
#: Added on a GPU: CUDA context, cuDNN and cuBLAS workspaces (about 0.5-1 GiB on recent cards).
CUDA_OVERHEAD_BYTES = 1 * _GIB

PRECISIONS = ("32-true", "bf16-mixed")


# --------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------

_F = torch.nn.functional
#: CUDA autocast's lower-precision (bf16) list, as far as volumed's networks call it.
_LOWER = {
    torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d, torch.conv_transpose2d,
    torch.conv_transpose3d, torch.convolution, torch._C._nn.linear, torch.matmul, torch.mm, torch.bmm,
    torch.baddbmm, torch.addmm, torch.addbmm, torch.einsum, torch._C._nn.scaled_dot_product_attention,
    torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.Tensor.mm, torch.Tensor.bmm,
}  # fmt: skip
#: CUDA autocast's fp32 list, as far as volumed's networks and losses call it.
_FP32 = {
    _F.layer_norm, torch.layer_norm, _F.group_norm, torch.group_norm, _F.softmax, torch.softmax,
    torch.Tensor.softmax, _F.log_softmax, torch.log_softmax, torch.Tensor.log_softmax,
    _F.binary_cross_entropy_with_logits, _F.cross_entropy, _F.softplus, _F.mse_loss, _F.cosine_similarity,
    torch.exp, torch.log, torch.pow, torch.Tensor.pow, torch.Tensor.exp, torch.Tensor.log,
}  # fmt: skip


class MetaAutocast(TorchFunctionMode):
    """CUDA autocast's bf16 casting policy for tensors on the ``meta`` device (where
    ``torch.autocast`` does nothing). Parameters are cast once per context, as autocast caches them."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.dtype = dtype
        self._cache: dict[int, torch.Tensor] = {}

    def _cast(self, value: Any, to: torch.dtype, source: torch.dtype) -> Any:
        if isinstance(value, torch.Tensor) and value.dtype == source:
            if isinstance(value, nn.Parameter) or (value.is_leaf and value.requires_grad):
                key = id(value)
                if key not in self._cache:
                    self._cache[key] = value.to(to)
                return self._cache[key]
            return value.to(to)
        if isinstance(value, (list, tuple)):
            return type(value)(self._cast(v, to, source) for v in value)
        return value

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LOWER:
            args = tuple(self._cast(a, self.dtype, torch.float32) for a in args)
            kwargs = {k: self._cast(v, self.dtype, torch.float32) for k, v in kwargs.items()}
        elif func in _FP32:
            args = tuple(self._cast(a, torch.float32, self.dtype) for a in args)
            kwargs = {k: self._cast(v, torch.float32, self.dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _storage_key(t: torch.Tensor) -> int:
    # The C++ storage address tells storages apart on the meta device, where data pointers are 0.
    return t.untyped_storage()._cdata


@dataclass(frozen=True)
class ActivationMeasure:
    """What one meta forward pass keeps for the backward pass, in bytes.

    Attributes:
        saved: distinct storages autograd saves, plus the inputs gradient checkpointing holds.
        recompute: the largest checkpointed segment's own saved storages: the backward pass
            recomputes one segment at a time and holds its activations while it runs (0 without
            checkpointing).
        largest: the largest single saved storage (the backward pass holds gradients of its size).
    """

    saved: int
    recompute: int
    largest: int = 0


@contextlib.contextmanager
def _measured_checkpoints(seen: dict[int, int], segments: list[int]):
    """Patch ``torch.utils.checkpoint.checkpoint`` (and every module's imported name for it) so
    each checkpointed call records its inputs into ``seen`` and its segment size into ``segments``."""
    import sys

    import torch.utils.checkpoint as tuc

    original = tuc.checkpoint

    def measured(function, *args, **kwargs):
        # Non-reentrant checkpointing keeps the segment's inputs (its own saved-tensor hooks hide
        # them from ours) and recomputes the segment in the backward pass: run it once more here,
        # counting what it saves, and throw the result away.
        for a in args:
            if isinstance(a, torch.Tensor):
                seen[_storage_key(a)] = a.untyped_storage().nbytes()
        inner: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            inner[_storage_key(t)] = t.untyped_storage().nbytes()
            return t

        if torch.is_grad_enabled():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                function(*args, **{k: v for k, v in kwargs.items() if k not in _CHECKPOINT_KWARGS})
            segments.append(sum(inner.values()))
        return original(function, *args, **kwargs)

    patched = [m for m in list(sys.modules.values()) if getattr(m, "checkpoint", None) is original]
    for module in patched:
        module.checkpoint = measured
    try:
        yield
    finally:
        for module in patched:
            module.checkpoint = original


_CHECKPOINT_KWARGS = {"use_reentrant", "preserve_rng_state", "context_fn", "determinism_check", "debug"}


def measure_activations(
    model: nn.Module, run: Callable[[], object], precision: str = "32-true", exclude: Iterable[torch.Tensor] = ()
) -> ActivationMeasure:
    """Bytes autograd keeps while ``run()`` executes (see :class:`ActivationMeasure`).

    ``model``'s parameters and buffers and the ``exclude`` tensors (the batch) are not counted;
    under ``precision="bf16-mixed"`` ``run()`` executes inside :class:`MetaAutocast`.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    skip = {_storage_key(t) for t in [*model.parameters(), *model.buffers(), *exclude]}
    seen: dict[int, int] = {}
    segments: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[_storage_key(t)] = t.untyped_storage().nbytes()
        return t

    # Boolean indexing on meta tensors (e.g. VoCoLoss's off-diagonal mask) then assumes every
    # element selected: its upper bound.
    from torch.fx.experimental import _config as fx_config

    with contextlib.ExitStack() as stack:
        stack.enter_context(fx_config.patch(meta_nonzero_assume_all_nonzero=True))
        stack.enter_context(_measured_checkpoints(seen, segments))
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
        if precision == "bf16-mixed":
            stack.enter_context(MetaAutocast())
        run()
    kept = [n for key, n in seen.items() if key not in skip]
    return ActivationMeasure(saved=sum(kept), recompute=max(segments, default=0), largest=max(kept, default=0))


def saved_activation_bytes(
    model: nn.Module, run: Callable[[], object], precision: str = "32-true", exclude: Iterable[torch.Tensor] = ()
) -> int:
    """:attr:`ActivationMeasure.saved` of :func:`measure_activations`."""
    return measure_activations(model, run, precision, exclude).saved


# --------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one training step, by part, in bytes (see the module docstring).

    Attributes:
        label: what was estimated (recipe, preset, crop, batch).
        precision: ``"32-true"`` or ``"bf16-mixed"``. checkpointing: encoder gradient checkpointing.
        device: ``"cpu"`` or ``"cuda"`` (the latter adds :data:`CUDA_OVERHEAD_BYTES`).
        trainable_params, frozen_params: parameter counts (frozen: no gradient, no optimizer state).
        shards: parameters, gradients and optimizer state are split over this many ranks (FSDP
            FULL_SHARD); 1 otherwise.
    """

    label: str
    precision: str
    checkpointing: bool
    device: str
    trainable_params: int
    frozen_params: int
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    batch_bytes: int
    activations_bytes: int
    recompute_bytes: int
    backward_bytes: int
    margin_bytes: int
    overhead_bytes: int
    shards: int = 1

    @property
    def total_bytes(self) -> int:
        return (
            self.weights_bytes + self.gradients_bytes + self.optimizer_bytes + self.batch_bytes
            + self.activations_bytes + self.recompute_bytes + self.backward_bytes + self.margin_bytes
            + self.overhead_bytes
        )  # fmt: skip

    @property
    def total_mib(self) -> float:
        return self.total_bytes / _MIB

    @property
    def total_gib(self) -> float:
        return self.total_bytes / _GIB

    def fits(self, card_gib: float) -> bool:
        """Whether the estimate stays below a card of ``card_gib`` GiB (as cards are sold: GB)."""
        return self.total_bytes <= card_gib * 1e9

    def describe(self) -> str:
        parts = (
            ("weights", self.weights_bytes), ("grads", self.gradients_bytes), ("AdamW", self.optimizer_bytes),
            ("batch", self.batch_bytes), ("activations", self.activations_bytes), ("recompute", self.recompute_bytes),
            ("backward", self.backward_bytes), ("margin", self.margin_bytes),
            ("overhead", self.overhead_bytes),
        )  # fmt: skip
        body = ", ".join(f"{name} {n / _GIB:.2f}" for name, n in parts)
        return f"{self.label}: {self.total_gib:.1f} GiB ({body} GiB)"


def estimate_training_step(
    model: nn.Module,
    run: Callable[[], object],
    *,
    label: str = "",
    precision: str = "32-true",
    device: str = "cpu",
    batch: Sequence[torch.Tensor] = (),
    trainable: Iterable[nn.Parameter] | None = None,
    checkpointing: bool = False,
    shards: int = 1,
    margin: float = ACTIVATION_MARGIN,
) -> MemoryEstimate:
    """Estimate one AdamW training step of ``model`` (built on the ``meta`` device).

    Args:
        run: the forward pass and loss of one step, on meta tensors (its backward is not run).
        batch: the step's input tensors (counted once, as ``batch_bytes``).
        trainable: the parameters the optimizer updates (default: those with ``requires_grad``).
        shards: FSDP FULL_SHARD ranks sharing weights, gradients and optimizer state.
    """
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be 'cpu' or 'cuda', got {device!r}")
    trainable = list(trainable) if trainable is not None else [p for p in model.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in trainable)
    n_all = sum(p.numel() for p in model.parameters())
    n_buffers = sum(b.numel() for b in model.buffers())
    measured = measure_activations(model, run, precision, exclude=batch)
    shards = max(1, int(shards))
    return MemoryEstimate(
        label=label,
        precision=precision,
        checkpointing=checkpointing,
        device=device,
        trainable_params=n_train,
        frozen_params=n_all - n_train,
        weights_bytes=4 * (n_all + n_buffers) // shards,
        gradients_bytes=4 * n_train // shards,
        optimizer_bytes=8 * n_train // shards,
        batch_bytes=sum(t.numel() * t.element_size() for t in batch),
        activations_bytes=measured.saved,
        recompute_bytes=measured.recompute,
        backward_bytes=BACKWARD_LARGEST * measured.largest,
        margin_bytes=int(margin * (measured.saved + measured.recompute)),
        overhead_bytes=CUDA_OVERHEAD_BYTES if device == "cuda" else 0,
        shards=shards,
    )


def _cube(size: int | Sequence[int]) -> tuple[int, int, int]:
    return (int(size),) * 3 if isinstance(size, int) else tuple(int(s) for s in size)  # type: ignore[return-value]


def _checkpointing(encoder_kwargs: Mapping[str, Any]) -> bool:
    return bool(encoder_kwargs.get("use_checkpoint") or encoder_kwargs.get("gradient_checkpointing"))


def estimate_promptseg(
    encoder: str,
    patch_size: int | Sequence[int],
    batch_size: int = 1,
    terms: int = 8,
    *,
    encoder_kwargs: Mapping[str, Any] | None = None,
    decoder_kwargs: Mapping[str, Any] | None = None,
    precision: str = "32-true",
    device: str = "cpu",
    label: str | None = None,
) -> MemoryEstimate:
    """One step of :class:`~volumed.tasks.promptseg.PromptSegModule`: its network as the module
    builds it, ``terms`` decoded terms for each of ``batch_size`` patches, and the loss's ops.

    The loss is :class:`~volumed.tasks.promptseg.PartialLabelLoss` with every pair used and
    positive (its worst case; the real loss selects pairs by boolean indexing, which the meta
    device cannot run): a copy of the logits, BCE with logits, and MONAI's sigmoid Dice.
    """
    from volumed.tasks.promptseg import PromptSegModule

    encoder_kwargs, decoder_kwargs = dict(encoder_kwargs or {}), dict(decoder_kwargs or {})
    shape = _cube(patch_size)
    with torch.device("meta"):
        module = PromptSegModule(encoder=encoder, encoder_kwargs=encoder_kwargs, decoder_kwargs=decoder_kwargs)
    module.train()
    module.term_embeddings = torch.empty(terms, module.model_config.text_dim, device="meta")
    image = torch.empty(batch_size, 1, *shape, device="meta")
    target = torch.empty(batch_size, terms, *shape, device="meta", dtype=torch.uint8)
    idx = torch.empty(terms, dtype=torch.long, device="meta")
    modality = torch.empty(batch_size, dtype=torch.long, device="meta")

    def run() -> torch.Tensor:
        logits = module(image, idx, modality)
        x = logits.flatten(0, 1).clone().float()  # the boolean-indexed copy of the used pairs
        y = target.flatten(0, 1).to(x.dtype)
        bce = F.binary_cross_entropy_with_logits(x, y)
        dice = module.loss_fn.dice(x.unsqueeze(1), y.unsqueeze(1)).mean()
        return dice + bce

    label = label or f"promptseg {encoder} {'x'.join(map(str, shape))} batch {batch_size}, {terms} terms"
    return estimate_training_step(
        module, run, label=label, precision=precision, device=device, batch=(image, target),
        trainable=list(module.net.parameters()), checkpointing=_checkpointing(encoder_kwargs),
    )  # fmt: skip


def estimate_voco(
    encoder: str,
    crop_size: int | Sequence[int],
    grid: int,
    num_random_crops: int,
    batch_size: int = 1,
    *,
    encoder_kwargs: Mapping[str, Any] | None = None,
    hidden_dim: int = 2048,
    proj_dim: int = 2048,
    teacher_momentum: float | None = 0.9,
    precision: str = "32-true",
    device: str = "cpu",
    label: str | None = None,
) -> MemoryEstimate:
    """One step of :class:`~volumed.tasks.pretrain_voco.VoCoPretrainModule`: the student encodes
    ``batch_size x (grid² + num_random_crops)`` crops with gradients; the EMA teacher (fp32
    weights, no gradients or optimizer state) encodes them without; then :class:`VoCoLoss`."""
    from volumed.tasks.pretrain_voco import VoCoPretrainModule, position_logits

    encoder_kwargs = dict(encoder_kwargs or {})
    shape = _cube(crop_size)
    n, k = grid * grid, num_random_crops
    with torch.device("meta"):
        module = VoCoPretrainModule(
            encoder=encoder, encoder_kwargs=encoder_kwargs, hidden_dim=hidden_dim, proj_dim=proj_dim,
            teacher_momentum=teacher_momentum,
        )  # fmt: skip
    module.train()
    base = torch.empty(batch_size, n, 1, *shape, device="meta")
    random = torch.empty(batch_size, k, 1, *shape, device="meta")
    labels = torch.empty(batch_size, k, n, device="meta")

    def run() -> torch.Tensor:  # VoCoPretrainModule._step without its logging
        s_base, s_rand = module.embed(base, random)
        if module.teacher is not None:
            with torch.no_grad():
                t_base, t_rand = module.embed(base, random, module.teacher)
            logits = 0.5 * (position_logits(s_rand, t_base) + position_logits(t_rand, s_base))
        else:
            logits = position_logits(s_rand, s_base)
        return module.criterion(logits, labels, s_base).total

    label = label or (
        f"voco {encoder} {'x'.join(map(str, shape))} x ({n} + {k}) crops, batch {batch_size}"
    )
    return estimate_training_step(
        module, run, label=label, precision=precision, device=device, batch=(base, random, labels),
        trainable=list(module.student.parameters()), checkpointing=_checkpointing(encoder_kwargs),
    )  # fmt: skip


def estimate_multiclass(
    network: str,
    patch_size: int | Sequence[int],
    num_classes: int,
    batch_size: int = 1,
    *,
    network_kwargs: Mapping[str, Any] | None = None,
    shards: int = 1,
    precision: str = "32-true",
    device: str = "cpu",
    label: str | None = None,
) -> MemoryEstimate:
    """One step of :class:`~volumed.tasks.multiclass_seg.MultiClassSegModule` (STU-Net with deep
    supervision, Dice + CE), per rank when FSDP shards the model over ``shards`` ranks."""
    from volumed.tasks.multiclass_seg import MultiClassSegModule

    network_kwargs = dict(network_kwargs or {})
    shape = _cube(patch_size)
    with torch.device("meta"):
        module = MultiClassSegModule(network=network, num_classes=num_classes, network_kwargs=network_kwargs)
    module.train()
    image = torch.empty(batch_size, 1, *shape, device="meta")
    target = torch.empty(batch_size, 1, *shape, device="meta")

    def run() -> torch.Tensor:
        return module.loss(module.net(image), target)

    label = label or f"multiclass {network} {'x'.join(map(str, shape))} batch {batch_size}"
    return estimate_training_step(
        module, run, label=label, precision=precision, device=device, batch=(image, target),
        checkpointing=_checkpointing(network_kwargs), shards=shards,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------


def _datalist_terms(path: Path) -> int:
    """Distinct terms a promptseg datalist names (annotated, absent or as mask keys)."""
    data = json.loads(path.read_text())
    terms: set[str] = set()
    for section in data.values() if isinstance(data, dict) else [data]:
        if not isinstance(section, list):
            continue
        for entry in section:
            if isinstance(entry, dict):
                terms.update(entry.get("terms", []) or [])
                terms.update(entry.get("absent", []) or [])
                terms.update((entry.get("masks") or {}).keys())
    return len(terms)


def _devices(trainer: Mapping[str, Any]) -> int:
    devices = trainer.get("devices", 1)
    return int(devices) if isinstance(devices, int) or str(devices).isdigit() else 1


def estimate_recipe(
    config: str | Path, overrides: Mapping[str, Mapping[str, Any]] | None = None, device: str = "cuda"
) -> MemoryEstimate:
    """Estimate the per-GPU step of a recipe YAML, with its precision, encoder, crop and batch.

    ``overrides`` replace entries per section, as the command line would: e.g.
    ``{"data": {"batch_size": 2}, "model": {"encoder_kwargs": {}}}``. The task is told by the
    model section (``encoder`` + ``decoder_kwargs``: promptseg; ``hidden_dim``: VoCo;
    ``network``: multi-class STU-Net, sharded over ``trainer.devices`` under FSDP).
    Promptseg decodes every term of its datalist in each step (its worst case).
    """
    import yaml

    path = Path(config)
    cfg = yaml.safe_load(path.read_text())
    for section, values in (overrides or {}).items():
        cfg.setdefault(section, {}).update(values)
    trainer, model, data = cfg.get("trainer", {}), cfg.get("model", {}), cfg.get("data", {})
    precision = str(trainer.get("precision", "32-true"))
    if precision not in PRECISIONS:
        raise ConfigError(f"{path.name}: precision {precision!r} is not estimated (one of {PRECISIONS})")
    label = path.name
    if "decoder_kwargs" in model:
        datalist = Path(data["datalist"])
        datalist = datalist if datalist.is_absolute() else path.resolve().parents[1] / datalist
        return estimate_promptseg(
            model["encoder"], data["patch_size"], int(data["batch_size"]), _datalist_terms(datalist),
            encoder_kwargs=model.get("encoder_kwargs"), decoder_kwargs=model["decoder_kwargs"],
            precision=precision, device=device, label=label,
        )  # fmt: skip
    if "hidden_dim" in model:
        return estimate_voco(
            model["encoder"], data["crop_size"], int(data["grid"]), int(data["num_random_crops"]),
            int(data["batch_size"]), encoder_kwargs=model.get("encoder_kwargs"), hidden_dim=int(model["hidden_dim"]),
            proj_dim=int(model["proj_dim"]), teacher_momentum=model.get("teacher_momentum", 0.9),
            precision=precision, device=device, label=label,
        )  # fmt: skip
    if "network" in model:
        strategy = trainer.get("strategy")
        fsdp = isinstance(strategy, Mapping) and "FSDP" in str(strategy.get("class_path", ""))
        kwargs = dict(model.get("network_kwargs") or {})
        if fsdp and (strategy.get("init_args") or {}).get("activation_checkpointing_policy"):
            # FSDP recomputes every residual block; stage-wise encoder checkpointing stands in
            # for it (the decoder's activations stay counted in full: an upper bound).
            kwargs["gradient_checkpointing"] = True
        return estimate_multiclass(
            model["network"], data["patch_size"], len(data["classes"]) + 1, int(data["batch_size"]),
            network_kwargs=kwargs, shards=_devices(trainer) if fsdp else 1, precision=precision,
            device=device, label=label,
        )  # fmt: skip
    raise ConfigError(f"{path.name}: not a recipe volumed.memory can estimate (promptseg, VoCo or multiclass)")


def with_label(estimate: MemoryEstimate, label: str) -> MemoryEstimate:
    """The same estimate under another label."""
    return replace(estimate, label=label)
