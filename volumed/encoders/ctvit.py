"""CT-ViT: the factorised space/depth vision transformer of GenerateCT and CT-CLIP.

Hamamci et al., "GenerateCT: Text-Conditional Generation of 3D Chest CT Volumes" (2023) and
"Developing Generalist Foundation Models from a Multimodal Dataset for 3D Computed Tomography"
(CT-CLIP, 2024). This is an independent implementation of the *encoder* half of their CTViT
(no vector quantiser, no decoder), following the published design:

1. Non-overlapping 3D patches (``patch_size`` in-plane, ``depth_patch_size`` along the slice axis)
   are flattened, layer-normed, linearly projected to ``dim`` and layer-normed again.
2. A *spatial* transformer: the tokens of one depth slab attend to each other. Position enters
   through a continuous position bias (an MLP over log-scaled relative in-plane offsets,
   Swin-V2 style), so any in-plane token grid works with the same weights.
3. A *causal depth* transformer: each in-plane position attends to its own and earlier depth
   tokens. Position enters through ALiBi (a fixed per-head linear distance penalty), so any
   number of slabs works with the same weights.
4. Every layer of both transformers starts with a position-generating depthwise 3x3x3
   convolution (PEG) padded only towards earlier slabs, which keeps the model causal along depth.

Axis convention. CT-CLIP's CTViT takes ``(B, C, T, H, W)``, a "video" whose frames ``T`` are the
axial slices. volumed's encoders take ``(B, C, X, Y, Z)`` with ``Z`` the slice axis after RAS
orientation, so the mapping is ``T = Z``, ``H = Y`` (rows: anterior-posterior) and ``W = X``
(columns: left-right), i.e. ``original = x.permute(0, 1, 4, 3, 2)``. Internally the tokens are
kept in the original's ``(B, T, H, W, D) = (B, Z', Y', X', D)`` layout and each patch vector is
flattened in the original's ``(c, pt, p1, p2) = (c, pz, py, px)`` order; outputs are returned
in volumed's ``(B, D, X', Y', Z')`` layout.

Deliberate differences from CT-CLIP's code (documented so that nobody expects bit-compatible
checkpoints): standard scaled dot-product attention (not cosine-similarity attention with null
key/values); the depth transformer's attention is causal (CT-CLIP only makes its PEG causal);
the CPB is evaluated on the ``(2h-1)(2w-1)`` distinct offsets instead of all token pairs; the
pooled embedding is the mean over all tokens (CT-CLIP averages over depth, then flattens the
fixed 24 x 24 grid into a 294,912-wide linear layer, which ties it to one in-plane size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from einops.layers.torch import Rearrange
from monai.networks.blocks import MLPBlock
from monai.utils import ensure_tuple_rep
from torch.utils.checkpoint import checkpoint

from volumed.encoders.registry import FeatureInfo, register_encoder
from volumed.errors import ConfigError

__all__ = [
    "CTViT",
    "CTViTOutput",
    "CTViTTransformer",
    "CausalDepthPEG",
    "ContinuousPositionBias",
    "DepthALiBi",
    "ctvit_base",
    "ctvit_tiny",
]


@dataclass
class CTViTOutput:
    """What :meth:`CTViT.forward_features` returns.

    Attributes:
        tokens: token grid ``(B, dim, X / patch, Y / patch, Z / depth_patch)``, for dense heads.
        pooled: mean over all tokens, ``(B, dim)``: the volume embedding a CLIP head projects.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor


class ContinuousPositionBias(nn.Module):
    """Per-head attention bias for a 2D token grid, from an MLP over relative offsets.

    The offset ``(dh, dw)`` between two tokens is log-scaled (``sign(d) * log(1 + |d|)``) so
    that an MLP trained on one grid size extrapolates smoothly to larger offsets (Liu et al.,
    Swin Transformer V2, 2022). The MLP is evaluated once per distinct offset and gathered.

    Args:
        heads: number of attention heads (one bias map each).
        hidden_size: width of the two hidden layers of the MLP.
    """

    def __init__(self, heads: int, hidden_size: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2, hidden_size),
            nn.LeakyReLU(0.1),
            nn.Linear(hidden_size, hidden_size),
            nn.LeakyReLU(0.1),
            nn.Linear(hidden_size, heads),
        )

    def forward(self, h: int, w: int) -> torch.Tensor:
        """Bias ``(heads, h * w, h * w)`` for ``h x w`` tokens flattened row-major."""
        device = self.mlp[0].weight.device
        dh = torch.arange(-(h - 1), h, device=device)
        dw = torch.arange(-(w - 1), w, device=device)
        offsets = torch.stack(torch.meshgrid(dh, dw, indexing="ij"), dim=-1).float()
        table = self.mlp(torch.sign(offsets) * torch.log1p(offsets.abs()))  # (2h-1, 2w-1, heads)

        grid = torch.stack(
            torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"), dim=-1
        ).reshape(-1, 2)
        rel = grid[:, None, :] - grid[None, :, :]  # (N, N, 2), entries in [-(h-1), h-1] x [-(w-1), w-1]
        bias = table[rel[..., 0] + h - 1, rel[..., 1] + w - 1]  # (N, N, heads)
        return rearrange(bias, "i j h -> h i j")


class DepthALiBi(nn.Module):
    """Causal ALiBi bias (Press et al., 2022) for a sequence of depth tokens; no parameters.

    Head ``k`` (of ``n``) penalises attending ``d`` slabs back by ``d * 2 ** (-8 (k + 1) / n)``;
    later slabs are masked with ``-inf``. Being a fixed function of distance, it accepts any
    sequence length with the same weights.

    Args:
        heads: number of attention heads.
    """

    def __init__(self, heads: int) -> None:
        super().__init__()
        slopes = torch.tensor([2.0 ** (-8.0 * (k + 1) / heads) for k in range(heads)])
        # Not persistent: a function of ``heads``, so checkpoints need not carry it.
        self.register_buffer("slopes", slopes, persistent=False)

    def forward(self, n: int) -> torch.Tensor:
        """Bias ``(heads, n, n)``: ``-slope * (i - j)`` for ``j <= i``, ``-inf`` for ``j > i``."""
        pos = torch.arange(n, device=self.slopes.device)
        distance = (pos[:, None] - pos[None, :]).to(self.slopes.dtype)  # i - j
        bias = -self.slopes[:, None, None] * distance
        return bias.masked_fill(distance < 0, float("-inf"))


class CausalDepthPEG(nn.Module):
    """Position-generating depthwise 3x3x3 convolution, causal along depth.

    Zero padding of one token in-plane and of two tokens *before* the first slab (none after)
    means the output at slab ``z`` depends on slabs ``z-2 .. z`` only.

    Args:
        dim: token width (convolution channels; one group per channel).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(dim, dim, kernel_size=3, groups=dim)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """``grid`` ``(B, Z, H, W, D)`` -> position signal of the same shape."""
        x = rearrange(grid, "b z h w d -> b d z h w")
        # F.pad lists (last axis first): W (1, 1), H (1, 1), Z (2, 0) -> causal in Z.
        x = self.conv(F.pad(x, (1, 1, 1, 1, 2, 0)))
        return rearrange(x, "b d z h w -> b z h w d")


class BiasedSelfAttention(nn.Module):
    """Pre-norm multi-head self-attention with an additive per-head bias.

    Args:
        dim: token width.
        heads: number of heads.
        dim_head: width of each head.
        dropout: attention-weight dropout (training only).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.norm = nn.LayerNorm(dim)
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``x`` ``(N, L, dim)``, ``bias`` ``(heads, L, L)`` -> ``(N, L, dim)``."""
        qkv = self.to_qkv(self.norm(x))
        q, k, v = rearrange(qkv, "n l (three h d) -> three n h l d", three=3, h=self.heads)
        # SDPA wants the mask in the query dtype (bf16 under autocast); -inf survives the cast.
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.dropout if self.training else 0.0
        )
        return self.to_out(rearrange(out, "n h l d -> n l (h d)"))


class CTViTLayer(nn.Module):
    """PEG, then attention along one axis family, then a GEGLU feed-forward; all residual.

    Args:
        dim: token width.
        heads: attention heads.
        dim_head: width of each head.
        axis: ``"spatial"``: the ``H x W`` tokens of one slab attend to each other;
            ``"depth"``: the ``Z`` tokens at one in-plane position attend to each other.
        ff_mult: feed-forward expansion. As in CT-CLIP, the GEGLU hidden width is
            ``ff_mult * 2 / 3 * dim``, which matches a GELU MLP of ``ff_mult * dim`` in parameters.
        attn_dropout: attention-weight dropout.
        ff_dropout: feed-forward dropout.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        axis: Literal["spatial", "depth"],
        ff_mult: float = 4.0,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.axis = axis
        self.peg = CausalDepthPEG(dim)
        self.attn = BiasedSelfAttention(dim, heads, dim_head, attn_dropout)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = MLPBlock(dim, int(ff_mult * 2 / 3 * dim), dropout_rate=ff_dropout, act="GEGLU")

    def forward(self, grid: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``grid`` ``(B, Z, H, W, D)``, ``bias`` ``(heads, L, L)`` -> ``(B, Z, H, W, D)``."""
        b, z, h, w, _ = grid.shape
        grid = grid + self.peg(grid)
        if self.axis == "spatial":
            seq = rearrange(grid, "b z h w d -> (b z) (h w) d")
        else:
            seq = rearrange(grid, "b z h w d -> (b h w) z d")
        seq = seq + self.attn(seq, bias)
        seq = seq + self.ff(self.ff_norm(seq))
        if self.axis == "spatial":
            return rearrange(seq, "(b z) (h w) d -> b z h w d", b=b, h=h)
        return rearrange(seq, "(b h w) z d -> b z h w d", b=b, h=h, w=w)


class CTViTTransformer(nn.Module):
    """A stack of :class:`CTViTLayer` along one axis family, closed by a LayerNorm.

    Args:
        dim, heads, dim_head, axis, ff_mult, attn_dropout, ff_dropout: see :class:`CTViTLayer`.
        depth: number of layers.
        use_checkpoint: recompute each layer in the backward pass (saves activation memory).
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int,
        axis: Literal["spatial", "depth"],
        ff_mult: float = 4.0,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        use_checkpoint: bool = False,
    ) -> None:
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.layers = nn.ModuleList(
            CTViTLayer(dim, heads, dim_head, axis, ff_mult, attn_dropout, ff_dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, grid: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``grid`` ``(B, Z, H, W, D)`` -> ``(B, Z, H, W, D)``."""
        for layer in self.layers:
            if self.use_checkpoint and torch.is_grad_enabled():
                grid = checkpoint(layer, grid, bias, use_reentrant=False)
            else:
                grid = layer(grid, bias)
        return self.norm(grid)


class CTViT(nn.Module):
    """CT-ViT encoder: 3D patch tokens, spatial transformer, then causal depth transformer.

    Input ``x``: ``(B, in_channels, X, Y, Z)`` with ``Z`` the slice axis; ``X`` and ``Y`` must be
    multiples of the in-plane patch and ``Z`` of ``depth_patch_size``. Nothing is tied to a
    particular size: the same weights accept any such ``X``, ``Y`` and ``Z``.

    Args:
        in_channels: input channels (1 for CT).
        dim: token width.
        patch_size: in-plane patch ``(px, py)`` in voxels, or one int for both.
        depth_patch_size: patch along the slice axis ``Z`` in voxels (CT-CLIP's temporal patch).
        spatial_depth: layers of the spatial transformer.
        temporal_depth: layers of the causal depth transformer.
        heads: attention heads.
        dim_head: width of each head (``heads * dim_head`` need not equal ``dim``).
        ff_mult: feed-forward expansion (see :class:`CTViTLayer`).
        attn_dropout: attention-weight dropout.
        ff_dropout: feed-forward dropout.
        use_checkpoint: gradient checkpointing of every transformer layer.
        input_size: the ``(X, Y, Z)`` size the preset was designed for, e.g. CT-CLIP's
            480 x 480 x 240 (0.75 x 0.75 x 1.5 mm). Informational, for pipelines choosing a crop;
            checked for divisibility but not enforced in :meth:`forward`.

    Attributes:
        feature_info: one entry, ``FeatureInfo(dim, (px, py, depth_patch_size))``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        dim: int = 512,
        patch_size: int | Sequence[int] = 20,
        depth_patch_size: int = 10,
        spatial_depth: int = 4,
        temporal_depth: int = 4,
        heads: int = 8,
        dim_head: int = 32,
        ff_mult: float = 4.0,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
        use_checkpoint: bool = False,
        input_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        px, py = ensure_tuple_rep(patch_size, 2)
        for name, value in (("patch_size", px), ("patch_size", py), ("depth_patch_size", depth_patch_size)):
            if int(value) < 1:
                raise ConfigError(f"CTViT: {name} must be a positive number of voxels, got {value}")
        if dim < 1 or heads < 1 or dim_head < 1 or spatial_depth < 0 or temporal_depth < 0:
            raise ConfigError(
                f"CTViT: invalid sizes dim={dim}, heads={heads}, dim_head={dim_head}, "
                f"spatial_depth={spatial_depth}, temporal_depth={temporal_depth}"
            )
        self.in_channels = in_channels
        self.dim = dim
        self.patch = (int(px), int(py), int(depth_patch_size))
        self.input_size = tuple(int(s) for s in input_size) if input_size is not None else None
        if self.input_size is not None:
            self._check_spatial_size(self.input_size, what="input_size")

        patch_dim = in_channels * px * py * depth_patch_size
        self.to_tokens = nn.Sequential(
            # volumed (X, Y, Z) -> CT-CLIP (T, H, W) = (Z, Y, X) token layout; see module docstring.
            Rearrange("b c (x px) (y py) (z pz) -> b z y x (c pz py px)", px=px, py=py, pz=depth_patch_size),
            nn.LayerNorm(patch_dim),
            nn.Linear(patch_dim, dim),
            nn.LayerNorm(dim),
        )
        self.spatial_position_bias = ContinuousPositionBias(heads, hidden_size=dim)
        self.depth_position_bias = DepthALiBi(heads)
        block = dict(dim=dim, heads=heads, dim_head=dim_head, ff_mult=ff_mult, attn_dropout=attn_dropout,
                     ff_dropout=ff_dropout, use_checkpoint=use_checkpoint)  # fmt: skip
        self.spatial_transformer = CTViTTransformer(depth=spatial_depth, axis="spatial", **block)
        self.temporal_transformer = CTViTTransformer(depth=temporal_depth, axis="depth", **block)
        self.feature_info = [FeatureInfo(channels=dim, stride=self.patch)]

    def _check_spatial_size(self, size: Sequence[int], what: str) -> None:
        names = ("X", "Y", "Z")
        kinds = ("in-plane patch_size", "in-plane patch_size", "depth_patch_size")
        for axis, n, p, kind in zip(names, size, self.patch, kinds):
            if n < p or n % p:
                raise ConfigError(
                    f"CTViT {what}: axis {axis} has size {n}, which is not a positive multiple of the "
                    f"{kind} {p}; crop or pad {axis} to a multiple of {p} (e.g. {max(p, n - n % p)})"
                )

    def forward_features(self, x: torch.Tensor) -> CTViTOutput:
        """Encode ``x`` ``(B, C, X, Y, Z)`` into a token grid and a pooled embedding.

        Raises:
            ConfigError: ``x`` is not 5D, has the wrong channel count, or a size is not a
                multiple of its patch.
        """
        if x.ndim != 5:
            raise ConfigError(f"CTViT input must be (B, C, X, Y, Z), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ConfigError(f"CTViT input has {x.shape[1]} channels, the model expects {self.in_channels}")
        self._check_spatial_size(tuple(x.shape[2:]), what="input")

        grid = self.to_tokens(x)  # (B, Z', Y', X', D)
        _, z, h, w, _ = grid.shape
        grid = self.spatial_transformer(grid, self.spatial_position_bias(h, w))
        grid = self.temporal_transformer(grid, self.depth_position_bias(z))
        tokens = rearrange(grid, "b z y x d -> b d x y z")
        return CTViTOutput(tokens=tokens, pooled=tokens.mean(dim=(2, 3, 4)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder protocol: ``[tokens]`` with ``tokens`` ``(B, dim, X/px, Y/py, Z/pz)``."""
        return [self.forward_features(x).tokens]


# Presets. Each builder merges its preset into the caller's kwargs, so calling it directly
# gives the same model as ``create_encoder(name)``.

_CTVIT_BASE = dict(
    dim=512, patch_size=20, depth_patch_size=10, spatial_depth=4, temporal_depth=4, heads=8, dim_head=32,
    input_size=(480, 480, 240),
)  # fmt: skip
_CTVIT_TINY = dict(
    dim=64, patch_size=20, depth_patch_size=10, spatial_depth=1, temporal_depth=1, heads=4, dim_head=16,
    input_size=(40, 40, 100),
)  # fmt: skip


@register_encoder(
    "ctvit_base",
    family="ctvit",
    description="CT-ViT as in CT-CLIP: dim 512, 4 spatial + 4 causal depth layers, 8 heads x 32, "
    "patch 20 x 20 x 10; designed for 480 x 480 x 240 at 0.75 x 0.75 x 1.5 mm",
    **_CTVIT_BASE,
)
def ctvit_base(in_channels: int = 1, **kwargs) -> CTViT:
    """CT-CLIP's CT-ViT encoder configuration."""
    return CTViT(in_channels=in_channels, **{**_CTVIT_BASE, **kwargs})


@register_encoder(
    "ctvit_tiny",
    family="ctvit",
    description="tiny CT-ViT for CPU tests: dim 64, 1 + 1 layers, 4 heads x 16, patch 20 x 20 x 10",
    **_CTVIT_TINY,
)
def ctvit_tiny(in_channels: int = 1, **kwargs) -> CTViT:
    """A CT-ViT small enough to run on a CPU in well under a second at 40 x 40 x 100."""
    return CTViT(in_channels=in_channels, **{**_CTVIT_TINY, **kwargs})
