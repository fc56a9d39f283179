"""Size, memory and compute of every registered encoder, measured without allocating anything.

Every number comes from one forward pass on PyTorch's ``meta`` device: modules and tensors there
carry shapes and dtypes but no storage, so even the 1.4-billion-parameter STU-Net H costs a few
milliseconds and no memory. ``volumed encoders list`` prints :func:`format_table` of
:func:`summarize_all`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from volumed.encoders.registry import create_encoder, get_encoder_spec, list_encoders
from volumed.errors import ConfigError

__all__ = ["EncoderSummary", "format_table", "summarize_all", "summarize_encoder", "valid_input_shape"]

_MIB = 2**20


@dataclass(frozen=True)
class EncoderSummary:
    """Size, memory and compute of one encoder preset for one fp32 input of ``input_shape``.

    Attributes:
        name, family: the registry preset and its family (``stunet``, ``ctvit``, ...).
        input_shape: spatial input ``(X, Y, Z)`` in voxels the numbers refer to (batch 1,
            ``in_channels`` 1); the requested size, or the nearest size the encoder accepts.
        params: number of parameters.
        weights_mib: fp32 parameters and buffers, in MiB (2**20 bytes).
        activations_mib: fp32 tensors that autograd keeps from the forward pass for the backward
            pass (what training needs per sample on top of the weights), in MiB. Inference
            without autograd needs much less.
        gflops: forward GFLOPs (10**9; a multiply-add counts as 2) of convolutions, matrix
            products and attention, as counted by :class:`torch.utils.flop_counter.FlopCounterMode`;
            normalisation, activations and interpolation are not counted.
    """

    name: str
    family: str
    input_shape: tuple[int, int, int]
    params: int
    weights_mib: float
    activations_mib: float
    gflops: float

    @property
    def params_m(self) -> float:
        """Parameters in millions."""
        return self.params / 1e6


def _nearest_multiple(size: int, divisor: int) -> int:
    """The multiple of ``divisor`` closest to ``size`` (at least ``divisor``; ties go up)."""
    low = max(divisor, (size // divisor) * divisor)
    high = low + divisor
    return low if size - low < high - size else high


def valid_input_shape(encoder: nn.Module, input_size: int) -> tuple[int, int, int]:
    """The spatial shape nearest to ``input_size``³ that ``encoder`` accepts.

    The per-axis divisor is ``encoder.input_divisor`` when the encoder defines it, otherwise the
    least common multiple of the strides in ``encoder.feature_info`` (e.g. 32 for STU-Net, so 128
    stays 128; a CT-ViT with 20x20x10 patches turns 128 into 120x120x130).
    """
    divisor = getattr(encoder, "input_divisor", None)
    if divisor is None:
        divisor = tuple(math.lcm(*(f.stride[axis] for f in encoder.feature_info)) for axis in range(3))
    return tuple(_nearest_multiple(input_size, int(d)) for d in divisor)  # type: ignore[return-value]


def _saved_storages(run: Callable[[], object]) -> dict[int, int]:
    """Bytes of each distinct storage that autograd saves for backward while ``run()`` executes.

    Storages are told apart by their C++ address (``_cdata``), which works on the meta device
    where every data pointer is 0; views and in-place results therefore count once.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return seen


def summarize_encoder(name: str, input_size: int = 128, in_channels: int = 1) -> EncoderSummary:
    """Measure preset ``name`` for one fp32 input of ``input_size``³ voxels (batch 1).

    Method: build the encoder on the ``meta`` device and run one forward pass with autograd on,
    inside :class:`~torch.utils.flop_counter.FlopCounterMode` (FLOPs) and a
    ``saved_tensors_hooks`` context that records every storage autograd keeps for the backward
    pass (activations; parameters are subtracted). Weights are ``numel * 4`` bytes over all
    parameters and buffers. If the encoder needs sizes divisible by something that 128 is not a
    multiple of, the nearest valid size per axis is used and reported in ``input_shape``.
    """
    if input_size < 1:
        raise ConfigError(f"summarize_encoder: input_size must be >= 1, got {input_size}")
    spec = get_encoder_spec(name)
    with torch.device("meta"):
        encoder = create_encoder(name, in_channels=in_channels)
    encoder.train()  # the forward that training runs, e.g. dropout and checkpointing active
    shape = valid_input_shape(encoder, input_size)
    x = torch.empty(1, in_channels, *shape, device="meta", dtype=torch.float32)

    tensors = list(encoder.parameters()) + list(encoder.buffers())
    weight_storages = {t.untyped_storage()._cdata for t in tensors}
    flops = FlopCounterMode(display=False)
    with flops:
        saved = _saved_storages(lambda: encoder(x))
    activation_bytes = sum(n for key, n in saved.items() if key not in weight_storages)

    return EncoderSummary(
        name=name,
        family=spec.family,
        input_shape=shape,
        params=sum(p.numel() for p in encoder.parameters()),
        weights_mib=sum(t.numel() * 4 for t in tensors) / _MIB,  # fp32, whatever the build dtype
        activations_mib=activation_bytes / _MIB,
        gflops=flops.get_total_flops() / 1e9,
    )


def summarize_all(input_size: int = 128) -> list[EncoderSummary]:
    """:func:`summarize_encoder` for every registered preset, sorted by family then size."""
    rows = [summarize_encoder(name, input_size) for name in list_encoders()]
    return sorted(rows, key=lambda r: (r.family, r.params))


_COLUMNS = (
    ("encoder", "<", lambda r: r.name),
    ("family", "<", lambda r: r.family),
    ("input_shape", "<", lambda r: "x".join(map(str, r.input_shape))),
    ("params (M)", ">", lambda r: f"{r.params_m:,.2f}"),
    ("weights (MiB)", ">", lambda r: f"{r.weights_mib:,.1f}"),
    ("activations (MiB)", ">", lambda r: f"{r.activations_mib:,.1f}"),
    ("GFLOPs", ">", lambda r: f"{r.gflops:,.1f}"),
)


def format_table(rows: list[EncoderSummary], markdown: bool = False) -> str:
    """Rows as an aligned plain-text table, or a Markdown table with ``markdown=True``."""
    cells = [[fmt(r) for _, _, fmt in _COLUMNS] for r in rows]
    heads = [h for h, _, _ in _COLUMNS]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    aligns = [a for _, a, _ in _COLUMNS]

    def line(values: list[str], sep: str) -> str:
        return sep.join(f"{v:{a}{w}}" for v, a, w in zip(values, aligns, widths))

    if markdown:
        rule = ["-" * (w - 1) + (":" if a == ">" else "-") for w, a in zip(widths, aligns)]
        lines = [line(heads, " | "), " | ".join(rule)] + [line(c, " | ") for c in cells]
        return "\n".join(f"| {text} |" for text in lines)
    lines = [line(heads, "  "), line(["-" * w for w in widths], "  ")] + [line(c, "  ") for c in cells]
    return "\n".join(lines)
