"""The Swin transformer encoder of MONAI's SwinUNETR, as a multi-scale volumed encoder.

VoCo (Wu et al., "VoCo: A Simple-yet-Effective Volume Contrastive Learning Framework for 3D
Medical Image Analysis", CVPR 2024) pre-trains MONAI's SwinUNETR with ``feature_size=48``.
This module wraps only the transformer, :class:`monai.networks.nets.swin_unetr.SwinTransformer`,
under the attribute name ``swinViT``, exactly as SwinUNETR names it; its state-dict keys are
therefore ``swinViT.patch_embed...``, ``swinViT.layers1.0...`` and VoCo / SwinUNETR checkpoints
load into it by name. SwinUNETR's convolutional ``encoder1``..``encoder10`` blocks are *not*
included: they only adapt skip connections for SwinUNETR's own decoder, so they belong to a
segmentation head; when loading a full SwinUNETR checkpoint they are reported as unexpected keys.

Outputs, finest first, for an input ``(B, C, X, Y, Z)`` and patch ``p`` (2 in every preset), with
``F = feature_size``: stride ``p`` with ``F`` channels (patch embedding), then the four Swin
stages at strides ``2p, 4p, 8p, 16p`` with ``2F, 4F, 8F, 16F`` channels (each stage ends in
patch merging, as in MONAI). With ``normalize=True`` (SwinUNETR's default) every map is
layer-normalised over channels without affine parameters, exactly what SwinUNETR feeds its decoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.nets.swin_unetr import SwinTransformer
from torch.overrides import TorchFunctionMode
from monai.utils import ensure_tuple_rep

from volumed.encoders.registry import FeatureInfo, register_encoder
from volumed.errors import ConfigError

__all__ = ["SwinEncoder", "swin_b", "swin_tiny"]

# Patch embedding plus four merging stages: the coarsest map is 2**4 patches per axis below the input.
_NUM_MERGES = 4


class _LinspaceOnCPU(TorchFunctionMode):
    """Run ``torch.linspace`` on the CPU, whatever the default device.

    MONAI's ``SwinTransformer.__init__`` turns ``torch.linspace(0, drop_path_rate, n)`` into
    Python floats with ``.item()``, which raises under ``with torch.device("meta")`` (the bug
    dinov2 fixed in facebookresearch/dinov2#477). Computing only that tiny tensor on the CPU lets
    the encoder be built on the meta device (parameter counts, deferred initialisation); every
    parameter still follows the caller's default device.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.linspace:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


class SwinEncoder(nn.Module):
    """SwinUNETR's Swin transformer returning five feature maps, finest first.

    Args:
        in_channels: input channels.
        feature_size: channels ``F`` after the patch embedding (SwinUNETR's ``feature_size``).
        patch_size: patch-embedding stride in voxels, the same on every axis.
        depths: Swin blocks per stage (4 stages).
        num_heads: attention heads per stage.
        window_size: attention window in tokens, the same on every axis.
        mlp_ratio: MLP expansion in the Swin blocks.
        qkv_bias: bias in the query/key/value projection.
        drop_rate: dropout after the patch embedding and in the MLPs.
        attn_drop_rate: attention-weight dropout.
        dropout_path_rate: stochastic-depth rate, increased linearly over the blocks.
        normalize: layer-normalise every returned map over channels (SwinUNETR's ``normalize``).
        use_checkpoint: gradient checkpointing of the Swin blocks (MONAI's ``use_checkpoint``).
        use_v2: add SwinUNETR-V2's residual convolution blocks before each stage.
        use_flash_attention: let MONAI use ``torch.nn.functional.scaled_dot_product_attention``.

    Attributes:
        feature_info: five entries, channels ``F, 2F, 4F, 8F, 16F`` at strides
            ``p, 2p, 4p, 8p, 16p`` on every axis.
    """

    def __init__(
        self,
        in_channels: int = 1,
        feature_size: int = 48,
        patch_size: int = 2,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        dropout_path_rate: float = 0.0,
        normalize: bool = True,
        use_checkpoint: bool = False,
        use_v2: bool = False,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__()
        if len(depths) != _NUM_MERGES or len(num_heads) != _NUM_MERGES:
            raise ConfigError(
                f"SwinEncoder: depths and num_heads need {_NUM_MERGES} stages each, "
                f"got depths={tuple(depths)}, num_heads={tuple(num_heads)}"
            )
        for stage, heads in enumerate(num_heads):
            width = feature_size * 2**stage
            if heads < 1 or width % heads:
                raise ConfigError(
                    f"SwinEncoder: stage {stage + 1} has {width} channels, not divisible by num_heads={heads}"
                )
        if patch_size < 1:
            raise ConfigError(f"SwinEncoder: patch_size must be a positive number of voxels, got {patch_size}")
        self.in_channels = in_channels
        self.normalize = normalize
        self.divisor = patch_size * 2**_NUM_MERGES
        # The attribute name is load-bearing: it makes the keys match SwinUNETR / VoCo checkpoints.
        with _LinspaceOnCPU():
            self.swinViT = SwinTransformer(
                in_chans=in_channels,
                embed_dim=feature_size,
                window_size=ensure_tuple_rep(window_size, 3),
                patch_size=ensure_tuple_rep(patch_size, 3),
                depths=tuple(depths),
                num_heads=tuple(num_heads),
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                drop_rate=drop_rate,
                attn_drop_rate=attn_drop_rate,
                drop_path_rate=dropout_path_rate,
                norm_layer=nn.LayerNorm,
                use_checkpoint=use_checkpoint,
                spatial_dims=3,
                downsample="merging",
                use_v2=use_v2,
                use_flash_attention=use_flash_attention,
            )
        self.feature_info = [
            FeatureInfo(channels=feature_size * 2**i, stride=(patch_size * 2**i,) * 3) for i in range(_NUM_MERGES + 1)
        ]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x`` ``(B, C, X, Y, Z)`` -> five maps ``(B, F * 2**i, X / (p * 2**i), ...)``, ``i = 0..4``.

        Raises:
            ConfigError: ``x`` is not 5D, has the wrong channel count, or a spatial size is not a
                multiple of ``patch_size * 16`` (32 for the presets).
        """
        if x.ndim != 5:
            raise ConfigError(f"SwinEncoder input must be (B, C, X, Y, Z), got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ConfigError(f"SwinEncoder input has {x.shape[1]} channels, the model expects {self.in_channels}")
        for axis, n in zip("XYZ", x.shape[2:]):
            if n % self.divisor:
                raise ConfigError(
                    f"SwinEncoder input: axis {axis} has size {n}, which is not divisible by {self.divisor} "
                    f"(patch size x 2**{_NUM_MERGES} merges); crop or pad {axis} to a multiple of {self.divisor}"
                )
        return list(self.swinViT(x, self.normalize))


# Presets. Each builder merges its preset into the caller's kwargs, so calling it directly
# gives the same model as ``create_encoder(name)``.

_SWIN_B = dict(feature_size=48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), window_size=7, patch_size=2)
# Window 4 (not 7) divides every stage grid of a 64^3 or 32^3 input, so MONAI pads nothing:
# about 6x faster on a CPU than window 7 at this size.
_SWIN_TINY = dict(feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24), window_size=4, patch_size=2)


@register_encoder(
    "swin_b",
    family="swin",
    description="SwinUNETR's Swin transformer as pre-trained by VoCo: feature_size 48, depths 2-2-2-2, "
    "heads 3-6-12-24, window 7, patch 2; 5 maps at strides 2..32",
    **_SWIN_B,
)
def swin_b(in_channels: int = 1, **kwargs) -> SwinEncoder:
    """VoCo's backbone (SwinUNETR ``feature_size=48``); loads ``swinViT.*`` checkpoint keys."""
    return SwinEncoder(in_channels=in_channels, **{**_SWIN_B, **kwargs})


@register_encoder(
    "swin_tiny",
    family="swin",
    description="tiny SwinUNETR encoder for CPU tests: feature_size 12, depths 1-1-1-1, heads 3-6-12-24, "
    "window 4",
    **_SWIN_TINY,
)
def swin_tiny(in_channels: int = 1, **kwargs) -> SwinEncoder:
    """A Swin encoder small enough for CPU tests at 64^3."""
    return SwinEncoder(in_channels=in_channels, **{**_SWIN_TINY, **kwargs})
