"""Report generation: a visual prefix from a 3D encoder's features, fed to a causal language model.

The design follows CT2Rep and M3D-LaMed / RadFM: the volume is encoded once, its feature map is
pooled into a *fixed* number of visual tokens, and those tokens, projected into the language
model's embedding space, precede a short text prompt; the report is the prompt's continuation.

Data flow for an image ``(B, C, X, Y, Z)`` (``N = num_visual_tokens``, ``D = resampler_dim``,
``H`` = the LM's embedding width, ``P`` prompt tokens, ``T`` report tokens)::

    encoder ─▶ maps, finest first ─▶ map[feature_level] (B, C_f, x, y, z)
      ─▶ pooling, one of
           "perceiver": tokens (B, x*y*z, C_f) ─▶ Linear to D, + 3D sin-cos position
                        N learned latents ─▶ num_layers x [cross-attention to the tokens, FFN]
           "conv":      1x1x1 Conv3d to D ─▶ adaptive average pool to ``token_grid`` ─▶ flatten
           "max":       1x1x1 Conv3d to D ─▶ adaptive max pool to ``token_grid`` ─▶ flatten
      ─▶ (B, N, D) ─▶ projector Linear-GELU-Linear ─▶ visual prefix (B, N, H)

    LM input:  [visual prefix (N)] [prompt embeddings (P)] [report embeddings (T)]
    LM labels: [ignored .......... ignored .............] [report tokens + EOS     ]

Training is teacher-forced next-token cross-entropy over the report tokens only. Generation
(:meth:`ReportGenerator.generate`) hands ``inputs_embeds = [prefix, prompt]`` to transformers'
``generate``, greedy (``num_beams=1``) or beam search, and stops at EOS or after
``max_new_tokens``, which is capped so that prefix + prompt + report never exceed the LM's
``max_position_embeddings`` (the *max-length guard*).

What trains is chosen by ``lm_mode`` (:data:`LM_MODES`):

* ``"frozen"``: the LM is frozen; the encoder (unless ``freeze_encoder``), the pooling and the
  projector learn to *speak to* it, as in LLaVA's first stage;
* ``"lora"``: low-rank adapters (PEFT's LoRA, injected in place, so the LM stays a plain
  ``transformers`` model) are trained with the visual path; the LM's own weights stay frozen;
* ``"full"``: every LM weight trains; meant for the randomly initialised tiny LM of the tests,
  which has no language to keep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from volumed.encoders.registry import create_encoder
from volumed.errors import ConfigError
from volumed.heads.promptseg import SinCosPositionEncoding3D, TermCrossAttentionLayer
from volumed.text.causal_lm import CausalLM

__all__ = [
    "IGNORE_INDEX",
    "LM_MODES",
    "POOLINGS",
    "ReportBatchInputs",
    "ReportGenerator",
    "VisualPrefix",
    "apply_lm_mode",
    "create_report_generator",
]

LM_MODES: tuple[str, ...] = ("frozen", "lora", "full")
POOLINGS: tuple[str, ...] = ("perceiver", "conv", "max")
#: Label value that cross-entropy ignores (prefix, prompt and padding positions).
IGNORE_INDEX = -100


class VisualPrefix(nn.Module):
    """One encoder feature map -> ``N`` visual tokens in the LM's embedding space.

    Args:
        in_channels: channels ``C_f`` of the feature map used.
        lm_dim: the LM's embedding width ``H``.
        num_tokens: ``N``; for ``"conv"`` and ``"max"`` it must equal ``prod(token_grid)``.
        pooling: ``"perceiver"`` (learned latents cross-attend to every feature voxel, with 3D
            sin-cos positions on the keys), ``"conv"`` (1x1x1 convolution, then adaptive average
            pooling to ``token_grid``) or ``"max"`` (the same with adaptive max pooling: a finding
            of a few voxels is not averaged away over its region). The pooled tokens go to the
            projector *without* a LayerNorm: normalising each token over its channels removes
            how strongly the region responds, which is the finding (measured on the 3 mm nodule
            phantoms: with the LayerNorm the finding head stayed near chance, held-out AUROC
            0.39-0.79 after 200-800 steps; without it 1.0 after 200, docs/reports.md).
        dim: resampler width ``D``.
        num_layers, num_heads: perceiver depth and heads (``num_heads`` divides ``dim``).
        token_grid: ``(gx, gy, gz)`` of the ``"conv"`` and ``"max"`` poolings; default: ``N`` split as evenly as
            powers of two allow, e.g. 8 -> ``(2, 2, 2)``.
        stride: the feature map's stride in input voxels (positions of the perceiver's keys).

    ``forward(feature)``: ``(B, C_f, x, y, z)`` -> ``(B, N, H)``.
    """

    def __init__(
        self,
        in_channels: int,
        lm_dim: int,
        num_tokens: int = 8,
        pooling: str = "perceiver",
        dim: int = 256,
        num_layers: int = 2,
        num_heads: int = 4,
        token_grid: Sequence[int] | None = None,
        stride: Sequence[int] = (1, 1, 1),
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        if num_tokens < 1:
            raise ConfigError(f"num_visual_tokens must be at least 1, got {num_tokens}")
        self.pooling = pooling
        self.num_tokens = int(num_tokens)
        self.stride = tuple(int(s) for s in stride)
        if pooling == "perceiver":
            if dim % num_heads:
                raise ConfigError(f"resampler_dim {dim} is not divisible by resampler_heads {num_heads}")
            self.input_proj = nn.Linear(in_channels, dim)
            self.position = SinCosPositionEncoding3D(dim)
            self.latents = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)
            self.layers = nn.ModuleList(TermCrossAttentionLayer(dim, num_heads, mlp_ratio=2.0) for _ in range(num_layers))
            self.norm = nn.LayerNorm(dim)
        else:
            grid = tuple(int(g) for g in token_grid) if token_grid is not None else _even_grid(num_tokens)
            if len(grid) != 3 or int(torch.tensor(grid).prod()) != num_tokens:
                raise ConfigError(f"token_grid {token_grid} must be 3 sizes whose product is num_visual_tokens={num_tokens}")
            self.token_grid = grid
            self.input_proj = nn.Conv3d(in_channels, dim, kernel_size=1)
        # LLaVA-1.5's projector: two linear layers with a GELU.
        self.projector = nn.Sequential(nn.Linear(dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        if feature.ndim != 5:
            raise ValueError(f"VisualPrefix expects a (B, C, x, y, z) feature map, got shape {tuple(feature.shape)}")
        b = feature.shape[0]
        if self.pooling == "perceiver":
            memory = self.input_proj(feature.flatten(2).transpose(1, 2))  # (B, x*y*z, D)
            pos = self.position(feature.shape[2:], self.stride).to(memory.dtype)[None].expand(b, -1, -1)
            latents = self.latents[None].expand(b, -1, -1).to(memory.dtype)
            zero = torch.zeros_like(latents)
            for layer in self.layers:
                latents = layer(latents, zero, memory, pos)
            tokens = self.norm(latents)
        else:
            pool = F.adaptive_max_pool3d if self.pooling == "max" else F.adaptive_avg_pool3d
            pooled = pool(self.input_proj(feature), self.token_grid)  # (B, D, gx, gy, gz)
            tokens = pooled.flatten(2).transpose(1, 2)
        return self.projector(tokens)


def _even_grid(n: int) -> tuple[int, int, int]:
    grid = [1, 1, 1]
    axis = 0
    while n % 2 == 0:
        grid[axis] *= 2
        n //= 2
        axis = (axis + 1) % 3
    grid[2] *= n  # an odd remainder goes to one axis
    return tuple(grid)  # type: ignore[return-value]


def apply_lm_mode(
    lm: nn.Module,
    mode: str,
    *,
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.05,
    lora_target_modules: Sequence[str] | str | None = None,
) -> nn.Module:
    """Set which LM weights train: ``"frozen"`` none, ``"full"`` all, ``"lora"`` only LoRA adapters.

    LoRA adapters are injected *in place* with ``peft.inject_adapter_in_model`` (so ``lm`` stays a
    ``transformers`` model whose ``generate`` works unchanged); ``lora_target_modules`` ``None``
    means every linear layer of the transformer blocks (``"all-linear"``, which leaves the output
    head alone). Returns ``lm``.
    """
    if mode not in LM_MODES:
        raise ConfigError(f"lm_mode must be one of {', '.join(LM_MODES)}, got {mode!r}")
    if mode == "full":
        lm.requires_grad_(True)
        return lm
    lm.requires_grad_(False)
    if mode == "lora":
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as exc:  # pragma: no cover - peft is a declared dependency
            raise ConfigError("lm_mode 'lora' needs the peft package: pip install peft") from exc
        targets = "all-linear" if lora_target_modules is None else lora_target_modules
        config = LoraConfig(r=int(lora_r), lora_alpha=float(lora_alpha), lora_dropout=float(lora_dropout),
                            target_modules=list(targets) if not isinstance(targets, str) else targets, bias="none")
        inject_adapter_in_model(config, lm)
        n = 0
        for name, p in lm.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
                n += 1
        if n == 0:
            raise ConfigError(f"LoRA found no layer to adapt among lora_target_modules={targets!r}")
    return lm


@dataclass(frozen=True)
class ReportBatchInputs:
    """The LM inputs of a batch: ``inputs_embeds`` ``(B, L, H)``, ``attention_mask`` ``(B, L)``
    and ``labels`` ``(B, L)`` (``IGNORE_INDEX`` on prefix, prompt and padding)."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


class ReportGenerator(nn.Module):
    """A 3D encoder, a :class:`VisualPrefix` and a causal LM that writes the report.

    Args:
        encoder: a registered volumed encoder (``forward(x)`` returns maps finest first and
            ``feature_info`` describes them).
        lm: the language model and its tokenizer (:func:`volumed.text.causal_lm.load_causal_lm`).
        num_visual_tokens, pooling, resampler_dim, resampler_layers, resampler_heads, token_grid:
            see :class:`VisualPrefix`.
        feature_level: which encoder map feeds the prefix (``-1``: the deepest).
        prompt: text between the visual prefix and the report (``""`` for none).
        max_report_tokens: reports are truncated to this many tokens for training, and it is the
            default (and the ceiling) of ``max_new_tokens`` in :meth:`generate`.

    ``forward(image, reports)``: image ``(B, C, X, Y, Z)`` and ``B`` report strings -> scalar loss.
    ``generate(image)`` -> ``B`` report strings.
    """

    def __init__(
        self,
        encoder: nn.Module,
        lm: CausalLM,
        *,
        num_visual_tokens: int = 8,
        pooling: str = "perceiver",
        resampler_dim: int = 256,
        resampler_layers: int = 2,
        resampler_heads: int = 4,
        token_grid: Sequence[int] | None = None,
        feature_level: int = -1,
        prompt: str = "Findings:",
        max_report_tokens: int = 256,
    ) -> None:
        super().__init__()
        info = getattr(encoder, "feature_info", None)
        if not info:
            raise ConfigError(f"{type(encoder).__name__} has no feature_info; the report head needs a registered volumed encoder")
        try:
            level = info[feature_level]
        except IndexError:
            raise ConfigError(f"feature_level {feature_level} out of range: the encoder returns {len(info)} maps") from None
        if max_report_tokens < 1:
            raise ConfigError(f"max_report_tokens must be at least 1, got {max_report_tokens}")
        self.encoder = encoder
        self.feature_level = int(feature_level)
        self.lm = lm.model
        # Not a module: the tokenizer has no weights and is rebuilt from the LM's source.
        self.tokenizer = lm.tokenizer
        self.visual = VisualPrefix(
            level.channels, lm.hidden_size, num_visual_tokens, pooling, resampler_dim, resampler_layers,
            resampler_heads, token_grid, level.stride,
        )
        self.max_report_tokens = int(max_report_tokens)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        self.register_buffer("prompt_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.max_positions = int(getattr(self.lm.config, "max_position_embeddings", 0) or 0) or None
        if self.max_positions is not None and self.prefix_length + 1 > self.max_positions:
            raise ConfigError(
                f"{num_visual_tokens} visual tokens + {len(ids)} prompt tokens leave no room in the LM's "
                f"{self.max_positions} positions"
            )

    @property
    def prefix_length(self) -> int:
        """Visual tokens plus prompt tokens: the positions before the report starts."""
        return self.visual.num_tokens + int(self.prompt_ids.numel())

    def _embed_dtype(self) -> torch.dtype:
        return self.lm.get_input_embeddings().weight.dtype

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Visual prefix ``(B, N, H)`` of an image ``(B, C, X, Y, Z)``."""
        feature = self.encoder(image)[self.feature_level]
        return self.visual(feature).to(self._embed_dtype())

    def _prefix(self, image: torch.Tensor) -> torch.Tensor:
        """``[visual prefix, prompt embeddings]`` ``(B, N + P, H)``."""
        visual = self.encode_image(image)
        if self.prompt_ids.numel() == 0:
            return visual
        prompt = self.lm.get_input_embeddings()(self.prompt_ids)[None].expand(visual.shape[0], -1, -1)
        return torch.cat([visual, prompt], dim=1)

    def tokenize_reports(self, reports: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Report token ids ``(B, T)`` ending in EOS (truncated to ``max_report_tokens``), right
        padded, and their mask ``(B, T)``."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        rows = []
        for text in reports:
            ids = self.tokenizer(str(text), add_special_tokens=False)["input_ids"][: self.max_report_tokens - 1]
            rows.append(ids + [eos])
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return ids, mask

    def build_inputs(self, image: torch.Tensor, reports: Sequence[str]) -> ReportBatchInputs:
        """Teacher-forcing inputs of a batch (see :class:`ReportBatchInputs`)."""
        if len(reports) != image.shape[0]:
            raise ValueError(f"{image.shape[0]} images but {len(reports)} reports")
        prefix = self._prefix(image)
        ids, mask = self.tokenize_reports(reports)
        ids, mask = ids.to(prefix.device), mask.to(prefix.device)
        text = self.lm.get_input_embeddings()(ids)
        b, n = prefix.shape[:2]
        ones = torch.ones((b, n), dtype=mask.dtype, device=mask.device)
        ignore = torch.full((b, n), IGNORE_INDEX, dtype=torch.long, device=ids.device)
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
        return ReportBatchInputs(torch.cat([prefix, text], 1), torch.cat([ones, mask], 1), torch.cat([ignore, labels], 1))

    def forward(self, image: torch.Tensor, reports: Sequence[str]) -> torch.Tensor:
        """Mean next-token cross-entropy over the report tokens (EOS included)."""
        return self.loss_and_visual(image, reports)[0]

    def loss_and_visual(self, image: torch.Tensor, reports: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward`'s loss and the visual prefix ``(B, N, H)`` it was computed with (for an
        auxiliary loss on the prefix, e.g. ``ReportModule``'s finding loss)."""
        inputs = self.build_inputs(image, reports)
        logits = self.lm(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask).logits
        # Position t predicts token t + 1.
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), inputs.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX
        )
        return loss, inputs.inputs_embeds[:, : self.visual.num_tokens]

    def max_new_tokens_for(self, requested: int | None) -> int:
        """The max-length guard: ``requested`` (default ``max_report_tokens``) capped by
        ``max_report_tokens`` and by the LM's positions left after the prefix."""
        n = self.max_report_tokens if requested is None else int(requested)
        if n < 1:
            raise ConfigError(f"max_new_tokens must be at least 1, got {requested}")
        n = min(n, self.max_report_tokens)
        if self.max_positions is not None:
            n = min(n, self.max_positions - self.prefix_length)
        return n

    @torch.no_grad()
    def generate(
        self,
        image: torch.Tensor,
        *,
        max_new_tokens: int | None = None,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Write one report per image, greedy (``num_beams=1``) or by beam search.

        Args:
            image: ``(B, C, X, Y, Z)``.
            max_new_tokens: at most this many report tokens (see :meth:`max_new_tokens_for`).
            num_beams: 1 for greedy decoding, more for beam search.
            length_penalty: beam search's length normalisation exponent.
            generate_kwargs: passed to ``transformers``' ``generate`` (e.g. ``repetition_penalty``).

        Returns:
            The decoded reports, special tokens removed, whitespace stripped.
        """
        if num_beams < 1:
            raise ConfigError(f"num_beams must be at least 1, got {num_beams}")
        prefix = self._prefix(image)
        mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        out = self.lm.generate(
            inputs_embeds=prefix,
            attention_mask=mask,
            max_new_tokens=self.max_new_tokens_for(max_new_tokens),
            num_beams=int(num_beams),
            do_sample=False,
            length_penalty=float(length_penalty) if num_beams > 1 else 1.0,
            early_stopping=num_beams > 1,
            eos_token_id=eos,
            pad_token_id=pad,
            # SmolLM2's generation config asks for sampling settings; greedy and beam ignore them.
            temperature=None,
            top_p=None,
            top_k=None,
            **generate_kwargs,
        )
        # With inputs_embeds only, decoder-only models return just the new tokens.
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]


def create_report_generator(
    encoder: str,
    lm: CausalLM,
    *,
    in_channels: int = 1,
    encoder_kwargs: dict[str, Any] | None = None,
    lm_mode: str = "lora",
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.05,
    lora_target_modules: Sequence[str] | str | None = None,
    **generator_kwargs: Any,
) -> ReportGenerator:
    """``ReportGenerator(create_encoder(encoder, ...), apply_lm_mode(lm.model, lm_mode, ...), ...)``."""
    apply_lm_mode(lm.model, lm_mode, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                  lora_target_modules=lora_target_modules)
    return ReportGenerator(create_encoder(encoder, in_channels, **(encoder_kwargs or {})), lm, **generator_kwargs)
