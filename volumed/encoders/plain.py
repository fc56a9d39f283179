"""A plain 3D CNN encoder: stages of convolution, instance norm and LeakyReLU, no residuals.

MONAI's :class:`monai.networks.blocks.Convolution` (conv -> norm -> activation) makes each stage;
every stage's output is one feature map, finest first, as the registry's contract asks
(:mod:`volumed.encoders.registry`).

``cnn_tiny`` (8-16-16 channels, the middle stage stride 2, about 11 k parameters) is for probes,
tests and phantom studies: it is the network that learns a few-voxel lung nodule on the 3 mm
report phantoms within a few hundred CPU steps, where ``stunet_tiny``'s residual stages stay at
chance in the same budget (docs/reports.md, "2026-12-03"). It has no published weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution

from volumed.encoders.registry import FeatureInfo, register_encoder
from volumed.errors import ConfigError

__all__ = ["PlainCNNEncoder"]


class PlainCNNEncoder(nn.Module):
    """Stages of ``Conv3d(3x3x3) -> InstanceNorm(affine) -> LeakyReLU``.

    Args:
        in_channels: image channels.
        channels: output channels of each stage.
        strides: each stage's stride (an int or ``(sx, sy, sz)``), one per stage.

    ``forward(x)`` -> one map per stage, finest first; ``feature_info`` gives their channels and
    strides (cumulative, in input voxels).
    """

    def __init__(self, in_channels: int = 1, channels: Sequence[int] = (8, 16, 16),
                 strides: Sequence[int | Sequence[int]] = (1, 2, 1)) -> None:
        super().__init__()
        if not channels or len(channels) != len(strides):
            raise ConfigError(f"PlainCNNEncoder: one stride per stage, got channels {list(channels)} and "
                              f"strides {list(strides)}")
        stages, info, total, c_in = [], [], (1, 1, 1), int(in_channels)
        for c_out, stride in zip(channels, strides):
            s = (int(stride),) * 3 if isinstance(stride, int) else tuple(int(v) for v in stride)
            if len(s) != 3 or min(s) < 1 or int(c_out) < 1:
                raise ConfigError(f"PlainCNNEncoder: bad stage (channels {c_out}, stride {stride})")
            stages.append(Convolution(3, c_in, int(c_out), strides=s, kernel_size=3,
                                      norm=("instance", {"affine": True}), act=("leakyrelu", {"negative_slope": 0.01})))
            total = tuple(t * v for t, v in zip(total, s))
            info.append(FeatureInfo(channels=int(c_out), stride=total))
            c_in = int(c_out)
        self.stages = nn.ModuleList(stages)
        self.feature_info: list[FeatureInfo] = info

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for stage in self.stages:
            x = stage(x)
            out.append(x)
        return out


@register_encoder("cnn_tiny", family="plain",
                  description="plain 3D CNN, 8-16-16 channels, one stride-2 stage: for probes and phantom tests, "
                              "no published weights",
                  channels=(8, 16, 16), strides=(1, 2, 1))
def _cnn_tiny(in_channels: int = 1, **kwargs) -> PlainCNNEncoder:
    return PlainCNNEncoder(in_channels, **kwargs)
