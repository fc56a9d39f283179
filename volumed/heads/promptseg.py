"""Text-prompted segmentation: a term-query decoder on top of any registered 3D encoder.

The design follows SAT (Zhao et al., "One Model to Rule them All: Towards Universal Segmentation
for Medical Images with Text Prompts", 2023) with Medal-S-style parallel prompting: each anatomy
term's text embedding becomes one *query*; the queries attend to the encoder's multi-scale
features through a transformer decoder; a light pixel decoder gives a per-voxel embedding; and
the mask logits of a term are the dot product of its query embedding with every voxel's
embedding. The encoder, the pixel decoder and the transformer run once per image, however many
terms are asked for.

Data flow for an image ``(B, C, X, Y, Z)`` and ``N`` terms (``E = embed_dim``, ``P = pixel_dim``)::

    encoder ─▶ L maps (B, C_l, X/s_l, Y/s_l, Z/s_l), finest first
      ─▶ FPN (MONAI FeaturePyramidNetwork: 1x1 laterals, nearest top-down, 3x3 outputs) ─▶ L maps (B, P, ...)
           ├─ finest map ─▶ per-voxel embedding (B, P, x0, y0, z0)
           └─ coarsest `num_memory_levels` maps ─▶ 1x1 to E, + 3D sin-cos position + level embedding
                                                ─▶ memory tokens (B, T, E)
    term embeddings (B, N, D_text) ─▶ MLP ─▶ queries (B, N, E)
      ─▶ num_layers x [cross-attention to memory, FFN] ─▶ MLP ─▶ mask embeddings (B, N, P)
    logits = mask embedding · per-voxel embedding ─▶ (B, N, x0, y0, z0) ─▶ trilinear ─▶ (B, N, X, Y, Z)

**Term independence (a deliberate choice).** SAT lets its queries self-attend; this decoder does
not: queries attend to the image only, and every other operation (layer norms, FFNs, MLPs) acts on
one query at a time. So a term's logits depend only on the image and that term, never on which
other terms share the batch. That is what partial-label training needs (a dataset that annotates
only the liver cannot change how "spleen" is segmented) and what makes query chunking exact.

**Memory.** The output alone holds ``B * N * X * Y * Z`` floats: 4 bytes x 24 terms x 512^2 x 300
voxels is 7.5 GB. The logits are therefore computed at the finest feature resolution and only then
upsampled (trilinear interpolation is linear, so this equals upsampling the per-voxel embedding
first and then taking the dot product, at ``N`` instead of ``P`` channels of full-resolution
work). :meth:`TermQueryDecoder.iter_logits` yields the logits chunk by chunk of terms, after the
transformer ran once for all of them, so a caller can threshold and store each chunk before the
next is made; :meth:`PromptSegmenter.decode` with ``chunk_size`` concatenates those chunks (same
result, lower peak of intermediate buffers, but the full output is still held).

Positions are voxel positions of the *input* grid (a token's centre, ``(i + 0.5) * stride - 0.5``),
not millimetres: the same weights apply to any spacing, and tokens of different levels that cover
the same region get similar codes. An encoder with a single coarse map (CT-ViT: one map at stride
20 x 20 x 10) works too; its masks are then upsampled from that coarse grid and are blocky until
the model is trained at a finer patch size.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from monai.networks.blocks import MLPBlock
from monai.networks.blocks.feature_pyramid_network import FeaturePyramidNetwork

from volumed.encoders.registry import FeatureInfo, create_encoder
from volumed.errors import ConfigError

__all__ = [
    "PADDING_LOGIT",
    "InputWindows",
    "PromptSegmenter",
    "SinCosPositionEncoding3D",
    "TermCrossAttentionLayer",
    "TermQueryDecoder",
    "create_prompt_segmenter",
]

#: Logit written for padded terms (``query_mask`` False): sigmoid ~ 0, and finite so that a loss
#: which forgets to mask them yields a large-but-finite value instead of NaN (fp16-safe).
PADDING_LOGIT = -1.0e4

Shape3 = tuple[int, int, int]


class SinCosPositionEncoding3D(nn.Module):
    """Fixed sine-cosine encoding of 3D voxel positions, for any grid size and stride.

    MONAI's ``build_sincos_position_embedding`` uses grid indices ``0..n-1`` of one grid; here
    positions are token centres in *input* voxels, so maps at different strides share one
    coordinate frame. Each axis gets ``2 * (dim // 6)`` channels (half sine, half cosine at
    geometrically spaced frequencies); the ``dim % 6`` remaining channels are zero.

    Args:
        dim: encoding width (the transformer's ``embed_dim``), at least 6.
        temperature: longest wavelength, in voxels, divided by ``2 * pi``.
    """

    def __init__(self, dim: int, temperature: float = 10000.0):
        super().__init__()
        if dim < 6:
            raise ConfigError(f"SinCosPositionEncoding3D: dim must be at least 6 (2 per axis), got {dim}")
        self.dim = dim
        self.per_axis = 2 * (dim // 6)
        freq = temperature ** (-torch.arange(self.per_axis // 2, dtype=torch.float64) / (self.per_axis // 2))
        self.register_buffer("inv_freq", freq.float(), persistent=False)

    def forward(self, size: Sequence[int], stride: Sequence[int] = (1, 1, 1)) -> torch.Tensor:
        """Encoding ``(x * y * z, dim)`` of a ``size = (x, y, z)`` grid, flattened ``x``-major."""
        axes = []
        for n, s in zip(size, stride):
            pos = (torch.arange(n, device=self.inv_freq.device, dtype=torch.float32) + 0.5) * s - 0.5
            ang = pos[:, None] * self.inv_freq[None, :]
            axes.append(torch.cat([ang.sin(), ang.cos()], dim=1))  # (n, per_axis)
        ex, ey, ez = axes
        nx, ny, nz = (int(v) for v in size)
        enc = torch.cat(
            [
                ex[:, None, None, :].expand(nx, ny, nz, -1),
                ey[None, :, None, :].expand(nx, ny, nz, -1),
                ez[None, None, :, :].expand(nx, ny, nz, -1),
            ],
            dim=-1,
        ).reshape(nx * ny * nz, 3 * self.per_axis)
        return F.pad(enc, (0, self.dim - 3 * self.per_axis))


class TermCrossAttentionLayer(nn.Module):
    """One decoder layer: queries cross-attend to image tokens, then an FFN (pre-norm, residual).

    There is no self-attention among queries (see the module docstring), so every output row
    depends on its own query row and the memory only.

    Args:
        embed_dim: query and memory width ``E``.
        num_heads: attention heads; must divide ``embed_dim``.
        mlp_ratio: FFN hidden width as a multiple of ``embed_dim``.
        dropout: dropout in attention and FFN.
    """

    def __init__(self, embed_dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm_q = nn.LayerNorm(embed_dim)
        self.norm_mem = nn.LayerNorm(embed_dim)
        self.cross_attn = nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout, batch_first=True)
        self.norm_ffn = nn.LayerNorm(embed_dim)
        self.ffn = MLPBlock(embed_dim, int(embed_dim * mlp_ratio), dropout_rate=dropout, act="GELU")

    def forward(
        self, queries: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor
    ) -> torch.Tensor:
        """``queries``/``query_pos`` ``(B, N, E)``, ``memory``/``memory_pos`` ``(B, T, E)`` -> ``(B, N, E)``.

        As in DETR, positions are added to queries and keys but not to values, so the attention
        pattern is position-aware while what is read out is image content.
        """
        mem = self.norm_mem(memory)
        attn, _ = self.cross_attn(self.norm_q(queries) + query_pos, mem + memory_pos, mem, need_weights=False)
        queries = queries + attn
        return queries + self.ffn(self.norm_ffn(queries))


class TermQueryDecoder(nn.Module):
    """SAT-style term-query decoder: text embeddings in, per-term mask logits out.

    Args:
        feature_info: the encoder's ``feature_info`` (channels and stride of each map, finest first).
        text_dim: width ``D_text`` of the term embeddings (384 for MiniLM).
        embed_dim: transformer width ``E``.
        num_layers: number of :class:`TermCrossAttentionLayer`.
        num_heads: attention heads; must divide ``embed_dim``.
        pixel_dim: width ``P`` of the FPN maps and of the per-voxel embedding; default ``embed_dim``.
            Full-resolution buffers scale with it, so keep it small for large volumes.
        num_memory_levels: how many of the coarsest FPN maps the queries attend to (tokens are the
            voxels of those maps; Mask2Former uses 3). Clipped to the number of maps.
        pixel_levels: indices into ``feature_info`` of the maps the FPN uses (default: all). Leaving
            out a stride-1 map (STU-Net's stage 0) makes the per-voxel embedding coarser but cuts
            the full-resolution FPN convolution, by far its largest cost on large inputs.
        mlp_ratio: FFN width multiple.
        dropout: dropout in the transformer layers.

    ``forward`` input:
        features: the encoder's maps, ``features[l]`` ``(B, C_l, X/s_l, Y/s_l, Z/s_l)``.
        term_embeddings: ``(B, N, D_text)``, or ``(N, D_text)`` shared by every image.
        input_shape: ``(X, Y, Z)`` of the image; default: finest map size times its stride.
        query_mask: optional bool ``(B, N)``; False marks padding (terms lists of different
            lengths across a batch), whose logits are set to :data:`PADDING_LOGIT`.
        chunk_size: compute logits for at most this many terms at a time (see :meth:`iter_logits`).

    ``forward`` output: logits ``(B, N, X, Y, Z)`` (apply a sigmoid per term; terms may overlap).
    """

    def __init__(
        self,
        feature_info: Sequence[FeatureInfo],
        text_dim: int = 384,
        embed_dim: int = 256,
        num_layers: int = 6,
        num_heads: int = 8,
        pixel_dim: int | None = None,
        num_memory_levels: int = 3,
        pixel_levels: Sequence[int] | None = None,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
    ):
        super().__init__()
        feature_info = list(feature_info)
        if not feature_info:
            raise ConfigError("TermQueryDecoder: feature_info is empty; the encoder must describe its maps")
        for name, value in (("text_dim", text_dim), ("embed_dim", embed_dim), ("num_heads", num_heads)):
            if int(value) < 1:
                raise ConfigError(f"TermQueryDecoder: {name} must be a positive integer, got {value!r}")
        if embed_dim % num_heads:
            raise ConfigError(f"TermQueryDecoder: num_heads ({num_heads}) must divide embed_dim ({embed_dim})")
        if num_layers < 1 or num_memory_levels < 1:
            raise ConfigError(
                f"TermQueryDecoder: num_layers ({num_layers}) and num_memory_levels ({num_memory_levels}) must be >= 1"
            )
        levels = list(range(len(feature_info))) if pixel_levels is None else [int(i) for i in pixel_levels]
        if not levels or sorted(set(levels)) != levels or levels[0] < 0 or levels[-1] >= len(feature_info):
            raise ConfigError(
                f"TermQueryDecoder: pixel_levels must be increasing indices in 0..{len(feature_info) - 1}, "
                f"got {pixel_levels!r}"
            )
        pixel_dim = int(embed_dim if pixel_dim is None else pixel_dim)
        if pixel_dim < 1:
            raise ConfigError(f"TermQueryDecoder: pixel_dim must be a positive integer, got {pixel_dim}")

        self.feature_info = feature_info
        self.text_dim = int(text_dim)
        self.embed_dim = int(embed_dim)
        self.pixel_dim = pixel_dim
        self.pixel_levels = levels
        self.num_memory_levels = min(int(num_memory_levels), len(levels))

        self.fpn = FeaturePyramidNetwork(
            spatial_dims=3, in_channels_list=[feature_info[i].channels for i in levels], out_channels=pixel_dim
        )
        # Only the finest output (per-voxel embedding) and the coarsest `num_memory_levels` outputs
        # (memory) are read. The 3x3 output convolutions of the levels in between would be
        # parameters without gradient (DDP rejects those) and wasted work; their lateral 1x1
        # convolutions still feed the top-down path.
        for i in range(1, len(levels) - self.num_memory_levels):
            self.fpn.layer_blocks[i] = nn.Identity()
        self.memory_proj = nn.ModuleList(
            nn.Conv3d(pixel_dim, embed_dim, kernel_size=1) for _ in range(self.num_memory_levels)
        )
        # The sin-cos code says where a token is; the level embedding says at which scale.
        self.level_embed = nn.Parameter(torch.zeros(self.num_memory_levels, embed_dim))
        nn.init.normal_(self.level_embed, std=0.02)
        self.pos_enc = SinCosPositionEncoding3D(embed_dim)
        self.text_proj = nn.Sequential(nn.Linear(text_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim))
        self.layers = nn.ModuleList(
            TermCrossAttentionLayer(embed_dim, num_heads, mlp_ratio, dropout) for _ in range(num_layers)
        )
        self.norm_out = nn.LayerNorm(embed_dim)
        self.mask_embed = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, embed_dim), nn.GELU(),
            nn.Linear(embed_dim, pixel_dim),
        )  # fmt: skip

    # -- checks ----------------------------------------------------------------------------------

    def _check_features(self, features: Sequence[torch.Tensor]) -> None:
        if len(features) != len(self.feature_info):
            raise ConfigError(
                f"TermQueryDecoder: got {len(features)} feature maps, but feature_info describes "
                f"{len(self.feature_info)}; was the decoder built for this encoder?"
            )
        for i, (f, info) in enumerate(zip(features, self.feature_info)):
            if f.ndim != 5 or f.shape[1] != info.channels:
                raise ConfigError(
                    f"TermQueryDecoder: feature map {i} has shape {tuple(f.shape)}, expected "
                    f"(B, {info.channels}, x, y, z)"
                )

    def _check_terms(self, term_embeddings: torch.Tensor, batch: int) -> torch.Tensor:
        t = term_embeddings
        if t.ndim == 2:
            t = t.unsqueeze(0).expand(batch, -1, -1)
        if t.ndim != 3 or t.shape[0] != batch or t.shape[-1] != self.text_dim or t.shape[1] < 1:
            raise ConfigError(
                f"TermQueryDecoder: term_embeddings has shape {tuple(term_embeddings.shape)}, expected "
                f"(N, {self.text_dim}) or ({batch}, N, {self.text_dim}) with N >= 1"
            )
        return t

    # -- stages ----------------------------------------------------------------------------------

    def pixel_features(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the FPN once.

        Returns:
            ``pixel`` ``(B, P, x0, y0, z0)``: per-voxel embedding at the finest used map;
            ``memory`` ``(B, T, E)``: tokens of the coarsest ``num_memory_levels`` maps (with
            level embedding); ``memory_pos`` ``(1, T, E)``: their 3D position encoding.
        """
        self._check_features(features)
        names = [f"p{i}" for i in self.pixel_levels]
        fpn = list(self.fpn(OrderedDict(zip(names, (features[i] for i in self.pixel_levels)))).values())
        first = len(fpn) - self.num_memory_levels
        tokens, pos = [], []
        for k, (proj, fmap) in enumerate(zip(self.memory_proj, fpn[first:])):
            stride = self.feature_info[self.pixel_levels[first + k]].stride
            tokens.append(rearrange(proj(fmap), "b e x y z -> b (x y z) e") + self.level_embed[k])
            pos.append(self.pos_enc(fmap.shape[2:], stride))
        memory = torch.cat(tokens, dim=1)
        memory_pos = torch.cat(pos, dim=0).to(memory.dtype).unsqueeze(0)
        return fpn[0], memory, memory_pos

    def query_embeddings(
        self, term_embeddings: torch.Tensor, memory: torch.Tensor, memory_pos: torch.Tensor
    ) -> torch.Tensor:
        """Term embeddings ``(B, N, D_text)`` -> mask embeddings ``(B, N, P)`` (one transformer pass)."""
        query_pos = self.text_proj(term_embeddings)
        # The projected term is both the starting content and, re-added in every layer, the
        # query's identity, so deep layers cannot lose track of which term they segment.
        q = query_pos
        for layer in self.layers:
            q = layer(q, query_pos, memory, memory_pos)
        return self.mask_embed(self.norm_out(q))

    def iter_logits(
        self,
        features: Sequence[torch.Tensor],
        term_embeddings: torch.Tensor,
        input_shape: Sequence[int] | None = None,
        query_mask: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield ``(terms, logits)`` chunk by chunk: ``logits`` ``(B, len(terms), X, Y, Z)``.

        The FPN and the transformer run once, before the first chunk; each chunk only costs a dot
        product and an upsampling, and holds ``B * chunk_size * X * Y * Z`` floats. Being a
        generator, it checks its arguments when the first chunk is requested.
        """
        self._check_features(features)
        batch = features[0].shape[0]
        terms = self._check_terms(term_embeddings, batch)
        n = terms.shape[1]
        if query_mask is not None and tuple(query_mask.shape) != (batch, n):
            raise ConfigError(
                f"TermQueryDecoder: query_mask has shape {tuple(query_mask.shape)}, expected ({batch}, {n})"
            )
        if chunk_size is not None and int(chunk_size) < 1:
            raise ConfigError(f"TermQueryDecoder: chunk_size must be a positive integer or None, got {chunk_size!r}")
        if input_shape is None:
            f0, s0 = features[self.pixel_levels[0]], self.feature_info[self.pixel_levels[0]].stride
            input_shape = tuple(int(d) * s for d, s in zip(f0.shape[2:], s0))
        out_size = tuple(int(v) for v in input_shape)
        if len(out_size) != 3:
            raise ConfigError(f"TermQueryDecoder: input_shape must be (X, Y, Z), got {input_shape!r}")

        pixel, memory, memory_pos = self.pixel_features(features)
        mask_emb = self.query_embeddings(terms.to(memory.dtype), memory, memory_pos)  # (B, N, P)
        step = n if chunk_size is None else int(chunk_size)
        for start in range(0, n, step):
            sl = slice(start, min(start + step, n))
            logits = torch.einsum("bnp,bpxyz->bnxyz", mask_emb[:, sl], pixel)
            if tuple(logits.shape[2:]) != out_size:
                logits = F.interpolate(logits, size=out_size, mode="trilinear", align_corners=False)
            if query_mask is not None:
                keep = query_mask[:, sl].to(torch.bool)[:, :, None, None, None]
                logits = logits.masked_fill(~keep, PADDING_LOGIT)
            yield sl, logits

    def forward(
        self,
        features: Sequence[torch.Tensor],
        term_embeddings: torch.Tensor,
        input_shape: Sequence[int] | None = None,
        query_mask: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, N, X, Y, Z)``; see the class docstring for the arguments."""
        chunks = [c for _, c in self.iter_logits(features, term_embeddings, input_shape, query_mask, chunk_size)]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=1)


class InputWindows(nn.Module):
    """More input channels: the image seen through narrower intensity windows.

    The model's input is one CT mapped linearly from the preprocessing window (``scale_hu``, by
    default -1000..1000 HU) to ``[0, 1]``. On that scale a hypodense liver lesion 40 HU below its
    organ differs by 2 % of the range, while air, fat and bone span all of it. Each window
    ``(lo, hi)`` HU adds, per input channel, ``clip((hu - lo) / (hi - lo), 0, 1)`` computed from
    the ``[0, 1]`` input (a soft-tissue window, -160..240 HU, makes that lesion 10 %), as a
    radiologist switches windows. Nothing is learned here and nothing is stored in the weights:
    the windows are part of the network's config (``PromptSegConfig.input_windows``), and
    :meth:`set_scale` follows the preprocessing's window.

    ``forward(x (B, C, ...)) -> (B, C * (1 + len(windows)), ...)``: the input first, then each
    channel through each window.
    """

    def __init__(self, windows_hu: Sequence[Sequence[float]], scale_hu: Sequence[float] = (-1000.0, 1000.0)):
        super().__init__()
        windows = []
        for w in windows_hu:
            if len(w) != 2 or not float(w[0]) < float(w[1]):
                raise ConfigError(f"InputWindows: each window must be [low, high] HU with low < high, got {list(w)!r}")
            windows.append((float(w[0]), float(w[1])))
        if not windows:
            raise ConfigError("InputWindows: give at least one window [low, high] HU")
        self.windows = tuple(windows)
        self.register_buffer("low", torch.zeros(len(windows)), persistent=False)
        self.register_buffer("width", torch.ones(len(windows)), persistent=False)
        self.set_scale(scale_hu)

    def set_scale(self, scale_hu: Sequence[float]) -> None:
        """The HU of the input's 0 and 1 (the preprocessing's ``ct_window``)."""
        a, b = float(scale_hu[0]), float(scale_hu[1])
        if not a < b:
            raise ConfigError(f"InputWindows: the input scale must be [low, high] HU with low < high, got {list(scale_hu)!r}")
        w = torch.tensor(self.windows, dtype=torch.float32)
        self.low.copy_((w[:, 0] - a) / (b - a))
        self.width.copy_((w[:, 1] - w[:, 0]) / (b - a))
        self.scale_hu = (a, b)

    @property
    def factor(self) -> int:
        """Output channels per input channel."""
        return 1 + len(self.windows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, 1, -1) + (1,) * (x.ndim - 2)
        low, width = self.low.to(x.dtype).view(shape), self.width.to(x.dtype).view(shape)
        windowed = ((x.unsqueeze(2) - low) / width).clamp(0.0, 1.0)  # (B, C, K, ...)
        return torch.cat([x, windowed.flatten(1, 2)], dim=1)


class PromptSegmenter(nn.Module):
    """An encoder and a :class:`TermQueryDecoder`: ``(image, terms) -> per-term mask logits``.

    Args:
        encoder: any registry encoder (``forward(x)`` returns maps finest first; has ``feature_info``).
        decoder: a :class:`TermQueryDecoder` built for that encoder's ``feature_info``.
        input_windows: optional :class:`InputWindows` applied to the image before the encoder
            (whose input channels must then be ``C * input_windows.factor``).

    ``forward(image (B, C, X, Y, Z), term_embeddings (B, N, D_text) or (N, D_text))`` returns
    logits ``(B, N, X, Y, Z)``. For inference with many terms, :meth:`encode_image` once and
    :meth:`decode` (or :meth:`iter_decode`) as often as needed.
    """

    def __init__(self, encoder: nn.Module, decoder: TermQueryDecoder, input_windows: InputWindows | None = None):
        super().__init__()
        info = getattr(encoder, "feature_info", None)
        if info is None:
            raise ConfigError(f"PromptSegmenter: encoder {type(encoder).__name__} has no feature_info")
        if list(info) != list(decoder.feature_info):
            raise ConfigError(
                f"PromptSegmenter: the decoder was built for feature_info {decoder.feature_info}, "
                f"but the encoder has {list(info)}"
            )
        self.encoder = encoder
        self.decoder = decoder
        self.input_windows = input_windows

    def encode_image(self, image: torch.Tensor) -> list[torch.Tensor]:
        """``image`` ``(B, C, X, Y, Z)`` -> the encoder's maps, finest first."""
        if image.ndim != 5:
            raise ConfigError(f"PromptSegmenter: image must be (B, C, X, Y, Z), got shape {tuple(image.shape)}")
        if self.input_windows is not None:
            image = self.input_windows(image)
        return list(self.encoder(image))

    def decode(
        self,
        features: Sequence[torch.Tensor],
        term_embeddings: torch.Tensor,
        input_shape: Sequence[int] | None = None,
        query_mask: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """Logits ``(B, N, X, Y, Z)`` from precomputed ``features`` (see :class:`TermQueryDecoder`)."""
        return self.decoder(features, term_embeddings, input_shape, query_mask, chunk_size)

    def iter_decode(
        self,
        features: Sequence[torch.Tensor],
        term_embeddings: torch.Tensor,
        input_shape: Sequence[int] | None = None,
        query_mask: torch.Tensor | None = None,
        chunk_size: int = 8,
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield ``(terms, logits chunk)`` so a caller can reduce each chunk (threshold, argmax) at once."""
        return self.decoder.iter_logits(features, term_embeddings, input_shape, query_mask, chunk_size)

    def forward(
        self,
        image: torch.Tensor,
        term_embeddings: torch.Tensor,
        query_mask: torch.Tensor | None = None,
        chunk_size: int | None = None,
    ) -> torch.Tensor:
        """``image`` ``(B, C, X, Y, Z)`` and ``N`` terms -> logits ``(B, N, X, Y, Z)``; one encoder pass."""
        features = self.encode_image(image)
        return self.decode(features, term_embeddings, image.shape[2:], query_mask, chunk_size)


def create_prompt_segmenter(
    encoder_name: str,
    text_dim: int = 384,
    in_channels: int = 1,
    encoder_kwargs: dict | None = None,
    input_windows: Sequence[Sequence[float]] | None = None,
    window_scale: Sequence[float] = (-1000.0, 1000.0),
    **decoder_kwargs,
) -> PromptSegmenter:
    """Build a registry encoder (``create_encoder(encoder_name, in_channels, **encoder_kwargs)``)
    and a :class:`TermQueryDecoder` for its ``feature_info`` (``decoder_kwargs`` go to it).
    With ``input_windows`` (HU; ``window_scale``: the HU of the input's 0 and 1), the image also
    enters through those windows (:class:`InputWindows`), and the encoder reads
    ``in_channels * (1 + len(input_windows))`` channels."""
    windows = InputWindows(input_windows, window_scale) if input_windows else None
    channels = in_channels * (windows.factor if windows is not None else 1)
    encoder = create_encoder(encoder_name, in_channels=channels, **(encoder_kwargs or {}))
    decoder = TermQueryDecoder(encoder.feature_info, text_dim=text_dim, **decoder_kwargs)
    return PromptSegmenter(encoder, decoder, windows)


def fpn_level_key_map(old_levels: Sequence[int], new_levels: Sequence[int], num_memory_levels: int):
    """A ``key_map`` for :func:`volumed.encoders.weights.load_encoder_weights` that moves a
    checkpoint's FPN weights to the same encoder levels in a decoder with other ``pixel_levels``
    (e.g. ``[1..5]`` -> ``[0..5]``: the stride-1 level added below).

    The FPN's blocks are indexed by position in ``pixel_levels``, so without the map block ``j`` of
    the checkpoint (level ``old_levels[j]``) would land on level ``new_levels[j]``: a level-5
    lateral on level 4, where the shapes happen to agree. Lateral (``inner_blocks``) and memory
    output (``layer_blocks`` of the coarsest ``num_memory_levels``) weights go to their own level;
    the finest output convolution (the per-voxel embedding) goes to the new finest level, as its
    starting point; levels the checkpoint lacks keep their initialisation. Other keys are kept.
    """
    import re

    old, new = [int(v) for v in old_levels], [int(v) for v in new_levels]
    pattern = re.compile(r"^((?:.*\.)?fpn\.)(inner_blocks|layer_blocks)\.(\d+)\.(.*)$")
    memory_old = set(old[len(old) - int(num_memory_levels):])

    def remap(key: str) -> str | None:
        m = pattern.match(key)
        if not m:
            return key
        head, kind, j, tail = m.group(1), m.group(2), int(m.group(3)), m.group(4)
        if j >= len(old):
            return None
        level = old[j]
        if kind == "layer_blocks":
            if j == 0:  # the finest output: the per-voxel embedding
                return f"{head}{kind}.0.{tail}"
            if level not in memory_old:
                return None
        if level not in new:
            return None
        return f"{head}{kind}.{new.index(level)}.{tail}"

    return remap
