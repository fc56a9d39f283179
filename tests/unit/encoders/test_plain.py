"""The plain CNN encoder (``cnn_tiny``): the registry's contract (maps finest first, feature_info)."""

from __future__ import annotations

import pytest
import torch

from volumed.encoders import create_encoder, get_encoder_spec
from volumed.encoders.plain import PlainCNNEncoder
from volumed.errors import ConfigError


def test_cnn_tiny_returns_one_map_per_stage_with_its_recorded_stride():
    enc = create_encoder("cnn_tiny", in_channels=2)
    assert get_encoder_spec("cnn_tiny").family == "plain"
    assert [(f.channels, f.stride) for f in enc.feature_info] == [(8, (1, 1, 1)), (16, (2, 2, 2)), (16, (2, 2, 2))]
    maps = enc(torch.rand(2, 2, 24, 16, 8))
    assert [tuple(m.shape) for m in maps] == [(2, 8, 24, 16, 8), (2, 16, 12, 8, 4), (2, 16, 12, 8, 4)]
    assert sum(p.numel() for p in enc.parameters()) < 20_000
    # Gradients reach the first stage (no dead path).
    maps[-1].amax(dim=(2, 3, 4)).sum().backward()
    assert enc.stages[0].conv.weight.grad.abs().sum() > 0


def test_anisotropic_strides_accumulate_and_bad_stages_are_refused():
    enc = PlainCNNEncoder(1, channels=(4, 8), strides=((2, 2, 1), 2))
    assert [f.stride for f in enc.feature_info] == [(2, 2, 1), (4, 4, 2)]
    assert enc(torch.rand(1, 1, 16, 16, 8))[-1].shape == (1, 8, 4, 4, 4)
    with pytest.raises(ConfigError, match="one stride per stage"):
        PlainCNNEncoder(1, channels=(4, 8), strides=(1,))
    with pytest.raises(ConfigError, match="bad stage"):
        PlainCNNEncoder(1, channels=(4,), strides=(0,))
