"""STU-Net: a scalable nnU-Net-style residual U-Net (Huang et al. 2023, arXiv:2304.06716).

STU-Net scales nnU-Net in depth and width while keeping every weight shape independent of the
task, so one pre-trained model transfers to any label set:

* six encoder stages with ``base * [1, 2, 4, 8, 16, 16]`` channels; every stage is a stack of
  residual blocks (conv3-IN-LeakyReLU-conv3-IN + shortcut, then LeakyReLU). The first block of
  stages 1..5 has stride 2, so the input is downsampled five times (total stride 32);
* a decoder that upsamples by nearest-neighbour interpolation and a 1x1 convolution (no
  transposed convolution, whose kernel would be tied to the pooling layout), concatenates the
  skip connection and applies residual blocks; a 1x1 segmentation head sits on every decoder
  stage for deep supervision.

Presets (``channels`` = ``base * [1, 2, 4, 8, 16, 16]``, same number of blocks per stage in the
encoder and the decoder); parameters with 1 input channel and 105 classes (TotalSegmentator):

===========  ====  ======  ==============  =============
preset       base  blocks  params (paper)  params (here)
===========  ====  ======  ==============  =============
stunet_tiny     4       1  --              0.92 M
stunet_s       16       1  14.60 M         14.60 M
stunet_b       32       1  58.26 M         58.26 M
stunet_l       64       2  440.30 M        440.30 M
stunet_h       96       3  1457.33 M       1457.33 M
===========  ====  ======  ==============  =============

``stunet_tiny`` has no published weights; it is for tests and CPU smoke runs.

Parameter names map one to one onto the published nnU-Net checkpoints (for a converter; u counts
decoder stages coarsest first there, so ``i = 4 - u``): ``conv_blocks_context.s.b.{conv1,norm1,
conv2,norm2}`` -> ``encoder.stages.s.b.*``, ``...conv3`` -> ``...shortcut``,
``upsample_layers.u.conv`` -> ``decoder.i.upsample.preconv``, ``conv_blocks_localization.u.b`` ->
``decoder.i.blocks.b``, ``seg_outputs.u`` -> ``heads.i``.

Inputs are ``(B, C, X, Y, Z)``; each spatial size must be divisible by the product of the stage
strides, 32 for the default isotropic layout, and at least one must exceed it (instance norm at the
deepest stage needs more than one voxel): ``64 x 32 x 32`` is the smallest default input.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.utils.checkpoint
from monai.networks.blocks import UpSample

from volumed.encoders.registry import FeatureInfo, get_encoder_spec, register_encoder
from volumed.errors import ConfigError

__all__ = [
    "STUNET_PRESETS",
    "STUNet",
    "STUNetDecoderStage",
    "STUNetEncoder",
    "STUNetResidualBlock",
    "create_stunet",
]

Stride3 = tuple[int, int, int]

# The published layout for TotalSegmentator: five isotropic 2x downsamplings. nnU-Net plans for
# anisotropic data may use (1, 2, 2) and similar; ``strides`` accepts any such layout.
DEFAULT_STRIDES: tuple[Stride3, ...] = ((2, 2, 2),) * 5

# nnU-Net's LeakyReLU slope; also the ``a`` of its He initialisation.
_NEG_SLOPE = 1e-2


def _as_stride3(stride: int | Sequence[int]) -> Stride3:
    if isinstance(stride, int):
        return (stride, stride, stride)
    s = tuple(int(v) for v in stride)
    if len(s) != 3:
        raise ConfigError(f"strides: each stride needs 3 values (X, Y, Z), got {stride!r}")
    return s  # type: ignore[return-value]


class STUNetResidualBlock(nn.Module):
    """Residual block ``LReLU(IN(conv3(LReLU(IN(conv3(x))))) + shortcut(x))``.

    The shortcut is a strided 1x1 convolution when the channel count or the resolution changes
    or ``projection`` is set, the identity otherwise. MONAI's ``UnetResBlock`` is not used because
    it normalises the shortcut, which STU-Net does not (its weights would not map onto published
    checkpoints).

    Args:
        in_channels: channels of the input ``(B, in_channels, X, Y, Z)``.
        out_channels: channels of the output.
        stride: stride of the first 3x3x3 convolution and of the shortcut, per axis.
        projection: use the 1x1 convolution shortcut even when shapes do not change.

    Shapes: ``(B, in_channels, X, Y, Z) -> (B, out_channels, X/sx, Y/sy, Z/sz)``.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int | Sequence[int] = 1, projection: bool = False
    ):
        super().__init__()
        stride3 = _as_stride3(stride)
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, stride=stride3, padding=1)
        self.norm1 = nn.InstanceNorm3d(out_channels, affine=True)
        self.act1 = nn.LeakyReLU(_NEG_SLOPE, inplace=True)
        self.conv2 = nn.Conv3d(out_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = nn.InstanceNorm3d(out_channels, affine=True)
        if projection or in_channels != out_channels or stride3 != (1, 1, 1):
            self.shortcut: nn.Module = nn.Conv3d(in_channels, out_channels, kernel_size=1, stride=stride3)
        else:
            self.shortcut = nn.Identity()
        self.act2 = nn.LeakyReLU(_NEG_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act2(y + self.shortcut(x))


def _stage(in_channels: int, out_channels: int, depth: int, stride: Stride3) -> nn.Sequential:
    """``depth`` residual blocks; only the first one changes channels and resolution.

    The first block always has the 1x1 projection shortcut (as in STU-Net), also where shapes
    happen not to change (e.g. ``in_channels == channels[0]``), so that the parameter set does not
    depend on the number of input channels and weights transfer between them.
    """
    blocks = [STUNetResidualBlock(in_channels, out_channels, stride, projection=True)]
    blocks += [STUNetResidualBlock(out_channels, out_channels) for _ in range(depth - 1)]
    return nn.Sequential(*blocks)


def _init_he(module: nn.Module) -> None:
    # nnU-Net's InitWeights_He(1e-2): Kaiming-normal conv weights, zero biases.
    if isinstance(module, nn.Conv3d):
        nn.init.kaiming_normal_(module.weight, a=_NEG_SLOPE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class STUNetEncoder(nn.Module):
    """The six encoder stages of STU-Net; returns one feature map per stage.

    Args:
        in_channels: input channels ``C`` (1 for CT).
        channels: output channels of the six stages, ``base * (1, 2, 4, 8, 16, 16)`` in the paper.
        depths: residual blocks per stage (1 for S/B, 2 for L, 3 for H).
        strides: downsampling of stages 1..5, one ``(sx, sy, sz)`` each (stage 0 keeps full
            resolution). Default: five isotropic 2x steps, so inputs must be divisible by 32.
        gradient_checkpointing: recompute each stage in the backward pass instead of keeping its
            activations (``torch.utils.checkpoint``); trades ~30% more compute for memory.

    ``forward(x)`` with ``x`` of shape ``(B, C, X, Y, Z)`` returns a list of six tensors, finest
    first: ``(B, channels[i], X/s_i, Y/s_i, Z/s_i)`` with ``s_i = feature_info[i].stride``.
    Raises :class:`~volumed.errors.ConfigError` if a spatial size is not divisible by
    :attr:`input_divisor`, or if the deepest stage would hold a single voxel (instance norm needs
    more than one), i.e. the smallest inputs are like ``64 x 32 x 32``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256, 512, 512),
        depths: Sequence[int] = (1, 1, 1, 1, 1, 1),
        strides: Sequence[int | Sequence[int]] = DEFAULT_STRIDES,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        channels, depths = tuple(int(c) for c in channels), tuple(int(d) for d in depths)
        stage_strides = [(1, 1, 1)] + [_as_stride3(s) for s in strides]
        if not len(channels) == len(depths) == len(stage_strides):
            raise ConfigError(
                f"STUNetEncoder: channels ({len(channels)}), depths ({len(depths)}) and strides "
                f"({len(stage_strides) - 1}, one fewer than stages) describe different stage counts"
            )
        if in_channels < 1 or min(channels) < 1 or min(depths) < 1:
            raise ConfigError(
                f"STUNetEncoder: in_channels, channels and depths must be >= 1, got "
                f"in_channels={in_channels}, channels={channels}, depths={depths}"
            )
        self.in_channels = in_channels
        self.channels = channels
        self.depths = depths
        self.stage_strides: tuple[Stride3, ...] = tuple(stage_strides)
        self.gradient_checkpointing = gradient_checkpointing

        self.stages = nn.ModuleList()
        self.feature_info: list[FeatureInfo] = []
        prev, total = in_channels, (1, 1, 1)
        for ch, depth, stride in zip(channels, depths, stage_strides):
            self.stages.append(_stage(prev, ch, depth, stride))
            total = tuple(t * s for t, s in zip(total, stride))
            self.feature_info.append(FeatureInfo(channels=ch, stride=total))  # type: ignore[arg-type]
            prev = ch
        self.apply(_init_he)

    @property
    def input_divisor(self) -> Stride3:
        """Each spatial size of the input must be a multiple of this, per axis (32 by default)."""
        return self.feature_info[-1].stride

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`ConfigError` unless ``x`` is ``(B, in_channels, X, Y, Z)`` with divisible sizes."""
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ConfigError(
                f"STUNetEncoder: expected input (B, {self.in_channels}, X, Y, Z), got {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        if any(s % d for s, d in zip(spatial, self.input_divisor)):
            raise ConfigError(
                f"STUNetEncoder: input spatial size {spatial} is not divisible by {self.input_divisor} "
                f"(the total downsampling); pad or crop the input, e.g. with MONAI DivisiblePad"
            )
        if all(s == d for s, d in zip(spatial, self.input_divisor)):
            # Instance norm (which uses input statistics in eval mode too) cannot normalise a
            # single voxel; torch's own error does not say which input size caused it.
            raise ConfigError(
                f"STUNetEncoder: input spatial size {spatial} must exceed {self.input_divisor} along at "
                f"least one axis, so that the deepest stage has more than one voxel for instance norm"
            )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(x)
        features = []
        for stage in self.stages:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # Non-reentrant checkpointing also handles inputs without requires_grad.
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
            features.append(x)
        return features


class STUNetDecoderStage(nn.Module):
    """One decoder stage: upsample, concatenate the skip, residual blocks.

    The upsampling is MONAI's :class:`~monai.networks.blocks.UpSample` in non-trainable mode:
    a 1x1 convolution (``in_channels -> out_channels``) then nearest-neighbour interpolation.
    STU-Net interpolates first and convolves after; for nearest-neighbour interpolation the two
    orders give identical outputs (a 1x1 conv acts on each voxel alone and interpolation copies
    voxels), with the same weights, and convolving first costs ``sx*sy*sz`` times fewer FLOPs.

    Args:
        in_channels: channels of the coarser input ``x``.
        out_channels: channels of the skip connection and of the output.
        depth: residual blocks after the concatenation.
        scale: upsampling factor per axis (the stride of the matching encoder stage).

    Shapes: ``x (B, in_channels, X, Y, Z)``, ``skip (B, out_channels, X*sx, Y*sy, Z*sz)``
    -> ``(B, out_channels, X*sx, Y*sy, Z*sz)``.
    """

    def __init__(self, in_channels: int, out_channels: int, depth: int, scale: Sequence[int]):
        super().__init__()
        self.upsample = UpSample(
            spatial_dims=3,
            in_channels=in_channels,
            out_channels=out_channels,
            scale_factor=_as_stride3(scale),
            mode="nontrainable",
            # An explicit conv, because MONAI's default pre-conv is skipped when channels are
            # equal, and STU-Net has this 1x1 conv on every stage (its weights must transfer).
            pre_conv=nn.Conv3d(in_channels, out_channels, kernel_size=1),
            interp_mode="nearest",
            align_corners=None,
        )
        self.blocks = _stage(2 * out_channels, out_channels, depth, (1, 1, 1))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.blocks(torch.cat((self.upsample(x), skip), dim=1))


class STUNet(nn.Module):
    """STU-Net segmentation network: :class:`STUNetEncoder`, a nearest-upsampling decoder and
    1x1 segmentation heads on every decoder stage.

    Args:
        in_channels: input channels ``C``.
        num_classes: output channels (classes including background).
        channels, depths, strides, gradient_checkpointing: as in :class:`STUNetEncoder`; the
            decoder stage at each resolution has as many blocks as the encoder stage there.
        deep_supervision: in training mode, return the logits of every decoder stage.

    ``forward(x)`` with ``x`` of shape ``(B, C, X, Y, Z)`` (sizes divisible by the encoder's
    ``input_divisor``, 32 by default) returns logits ``(B, num_classes, X, Y, Z)``. With
    ``deep_supervision`` and ``self.training`` it returns a list instead, full resolution first,
    then each coarser decoder stage at its own resolution (``X/2, X/4, ..., X/16`` by default);
    downsampling the target to match is the loss's job (as in nnU-Net).

    The encoder's parameters live under ``encoder.``, so
    ``net.encoder.load_state_dict(create_encoder(...).state_dict())`` and the reverse work.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 105,
        channels: Sequence[int] = (32, 64, 128, 256, 512, 512),
        depths: Sequence[int] = (1, 1, 1, 1, 1, 1),
        strides: Sequence[int | Sequence[int]] = DEFAULT_STRIDES,
        deep_supervision: bool = True,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        if num_classes < 1:
            raise ConfigError(f"STUNet: num_classes must be >= 1, got {num_classes}")
        self.encoder = STUNetEncoder(in_channels, channels, depths, strides, gradient_checkpointing)
        self.num_classes = num_classes
        self.deep_supervision = deep_supervision
        ch, dep, st = self.encoder.channels, self.encoder.depths, self.encoder.stage_strides
        # decoder[i] brings stage i+1's resolution up to stage i's, coarsest first in forward().
        self.decoder = nn.ModuleList(
            STUNetDecoderStage(ch[i + 1], ch[i], dep[i], st[i + 1]) for i in range(len(ch) - 1)
        )
        self.heads = nn.ModuleList(nn.Conv3d(ch[i], num_classes, kernel_size=1) for i in range(len(ch) - 1))
        self.decoder.apply(_init_he)
        self.heads.apply(_init_he)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        features = self.encoder(x)
        y = features[-1]
        want_all = self.deep_supervision and self.training
        logits: list[torch.Tensor] = []
        for i in reversed(range(len(self.decoder))):
            y = self.decoder[i](y, features[i])
            if want_all or i == 0:
                logits.append(self.heads[i](y))
        if want_all:
            return logits[::-1]  # full resolution first
        return logits[-1]


# name -> (base width, blocks per stage); channels are base * (1, 2, 4, 8, 16, 16).
_PRESETS: dict[str, tuple[int, int, str]] = {
    "stunet_tiny": (4, 1, "STU-Net tiny (base 4): for tests and CPU smoke runs, no published weights"),
    "stunet_s": (16, 1, "STU-Net S (base 16, 1 block/stage), 14.6M params as a 105-class segmenter"),
    "stunet_b": (32, 1, "STU-Net B (base 32, 1 block/stage), 58.3M params as a 105-class segmenter"),
    "stunet_l": (64, 2, "STU-Net L (base 64, 2 blocks/stage), 440M params as a 105-class segmenter"),
    "stunet_h": (96, 3, "STU-Net H (base 96, 3 blocks/stage), 1.46B params as a 105-class segmenter"),
}
_WIDTH_MULTIPLIERS = (1, 2, 4, 8, 16, 16)

#: Preset keyword arguments (``channels``, ``depths``) by name, shared by encoder and full net.
STUNET_PRESETS: dict[str, dict] = {
    name: {"channels": tuple(base * m for m in _WIDTH_MULTIPLIERS), "depths": (depth,) * 6}
    for name, (base, depth, _) in _PRESETS.items()
}


def _build_encoder(in_channels: int = 1, use_checkpoint: bool = False, **kwargs) -> STUNetEncoder:
    # ``use_checkpoint`` is the keyword every registered encoder takes (Swin and CT-ViT name it so,
    # after MONAI), so a recipe's ``encoder_kwargs: {use_checkpoint: true}`` works for any preset.
    if use_checkpoint:
        kwargs["gradient_checkpointing"] = True
    return STUNetEncoder(in_channels=in_channels, **kwargs)


for _name, (_base, _depth, _description) in _PRESETS.items():
    register_encoder(_name, family="stunet", description=_description, **STUNET_PRESETS[_name])(_build_encoder)


def create_stunet(
    name: str,
    in_channels: int = 1,
    num_classes: int = 105,
    deep_supervision: bool = True,
    **overrides,
) -> STUNet:
    """Build the full STU-Net segmenter for the registered preset ``name`` (e.g. ``"stunet_b"``).

    ``overrides`` replace preset keyword arguments (``channels``, ``depths``, ``strides``,
    ``gradient_checkpointing``). ``create_stunet(name).encoder`` has the same architecture and
    state-dict keys as ``create_encoder(name)``.
    """
    spec = get_encoder_spec(name)
    if spec.family != "stunet":
        stunets = ", ".join(n for n in STUNET_PRESETS)
        raise ConfigError(f"create_stunet: {name!r} is a {spec.family!r} encoder, not STU-Net; use one of {stunets}")
    kwargs = {**spec.default_kwargs, **overrides}
    return STUNet(in_channels=in_channels, num_classes=num_classes, deep_supervision=deep_supervision, **kwargs)
