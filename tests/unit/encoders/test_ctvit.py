"""CT-ViT encoder: shapes, size-agnostic weights, causality along depth, presets, errors."""

from __future__ import annotations


import pytest
import torch

from volumed.encoders import FeatureInfo, create_encoder, get_encoder_spec
from volumed.encoders.ctvit import CTViT, CTViTOutput, ctvit_tiny
from volumed.errors import ConfigError


@pytest.fixture(scope="module")
def tiny() -> CTViT:
    torch.manual_seed(0)
    return create_encoder("ctvit_tiny").eval()


def _volume(*size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1, *size, generator=g)


def test_tiny_forward_shapes_match_feature_info(tiny):
    x = _volume(40, 60, 100)  # X != Y, so a swapped in-plane axis would show
    with torch.no_grad():
        feats = tiny(x)
        out = tiny.forward_features(x)

    assert tiny.feature_info == [FeatureInfo(channels=64, stride=(20, 20, 10))]
    assert len(feats) == len(tiny.feature_info) == 1
    info = tiny.feature_info[0]
    expected = (1, info.channels, *(n // s for n, s in zip(x.shape[2:], info.stride)))
    assert tuple(feats[0].shape) == expected == (1, 64, 2, 3, 10)
    assert isinstance(out, CTViTOutput)
    torch.testing.assert_close(out.tokens, feats[0])
    assert out.pooled.shape == (1, 64)
    torch.testing.assert_close(out.pooled, out.tokens.mean(dim=(2, 3, 4)))
    assert torch.isfinite(out.tokens).all()


def test_token_grid_is_in_volumed_axis_order():
    # Without transformer layers each token sees only its own patch, so perturbing the patch at
    # X-index 1, Y-index 0, Z-index 2 must change exactly tokens[..., 1, 0, 2].
    model = ctvit_tiny(spatial_depth=0, temporal_depth=0).eval()
    x = _volume(40, 60, 30)
    y = x.clone()
    y[..., 20:40, 0:20, 20:30] += 5.0
    with torch.no_grad():
        changed = (model(x)[0] - model(y)[0]).abs().amax(dim=1)[0]  # (X', Y', Z')
    assert changed.shape == (2, 3, 3)
    assert changed[1, 0, 2] > 0
    changed[1, 0, 2] = 0
    assert torch.all(changed == 0)


def test_same_weights_accept_100_and_140_slices_and_are_causal_across_lengths(tiny):
    x140 = _volume(40, 40, 140, seed=1)
    with torch.no_grad():
        long = tiny.forward_features(x140).tokens
        short = tiny.forward_features(x140[..., :100]).tokens
        wide = tiny.forward_features(_volume(80, 60, 100)).tokens  # another in-plane size, same weights
    assert long.shape == (1, 64, 2, 2, 14)
    assert short.shape == (1, 64, 2, 2, 10)
    assert wide.shape == (1, 64, 4, 3, 10)
    # Causal along depth: the first 100 slices of the 140-slice volume give the same first 10 tokens.
    torch.testing.assert_close(long[..., :10], short, rtol=1e-4, atol=1e-5)


def test_changing_the_last_depth_chunk_leaves_earlier_tokens_unchanged(tiny):
    x = _volume(40, 40, 100, seed=2)
    y = x.clone()
    y[..., 90:100] = torch.randn(1, 1, 40, 40, 10, generator=torch.Generator().manual_seed(3)) * 3.0
    with torch.no_grad():
        a = tiny.forward_features(x)
        b = tiny.forward_features(y)
    torch.testing.assert_close(a.tokens[..., :9], b.tokens[..., :9], rtol=1e-4, atol=1e-5)
    assert (a.tokens[..., 9] - b.tokens[..., 9]).abs().max() > 1e-2
    assert (a.pooled - b.pooled).abs().max() > 1e-4


def test_changing_an_early_chunk_reaches_later_tokens(tiny):
    # The converse: information flows forward in depth, so the depth transformer is not a no-op.
    x = _volume(40, 40, 100, seed=4)
    y = x.clone()
    # Noise, not a constant: a constant shift of a whole patch is removed by the patch LayerNorm.
    y[..., 0:10] += torch.randn(1, 1, 40, 40, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = tiny.forward_features(x).tokens
        b = tiny.forward_features(y).tokens
    assert (a[..., 5:] - b[..., 5:]).abs().amax() > 1e-3


@pytest.mark.parametrize(
    ("size", "axis", "n", "patch"),
    [
        ((45, 40, 100), "X", 45, 20),
        ((40, 30, 100), "Y", 30, 20),
        ((40, 40, 95), "Z", 95, 10),
        ((40, 40, 5), "Z", 5, 10),
    ],
)
def test_non_divisible_size_raises_config_error_naming_axis_size_and_patch(tiny, size, axis, n, patch):
    with pytest.raises(ConfigError) as err:
        tiny(torch.zeros(1, 1, *size))
    msg = str(err.value)
    assert f"axis {axis} has size {n}" in msg
    assert f"patch_size {patch}" in msg


def test_bad_rank_and_channels_raise_config_error(tiny):
    with pytest.raises(ConfigError, match=r"\(B, C, X, Y, Z\)"):
        tiny(torch.zeros(1, 40, 40, 100))
    with pytest.raises(ConfigError, match="2 channels, the model expects 1"):
        tiny(torch.zeros(1, 2, 40, 40, 100))
    with pytest.raises(ConfigError, match="input_size: axis Z has size 99"):
        ctvit_tiny(input_size=(40, 40, 99))


def test_gradient_checkpointing_gives_same_outputs_and_gradients(tiny):
    ckpt = ctvit_tiny(use_checkpoint=True)
    ckpt.load_state_dict(tiny.state_dict())
    assert ckpt.spatial_transformer.use_checkpoint and ckpt.temporal_transformer.use_checkpoint
    x = _volume(40, 40, 30, seed=5)
    grads = []
    for model in (tiny, ckpt):
        model.zero_grad()
        out = model.forward_features(x)
        out.pooled.square().sum().backward()
        grads.append(model.to_tokens[2].weight.grad.clone())
        model.zero_grad()
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_bf16_autocast_runs_on_cpu(tiny):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiny.forward_features(_volume(40, 40, 20))
    assert out.tokens.shape == (1, 64, 2, 2, 2)
    assert torch.isfinite(out.tokens.float()).all()


def test_ctvit_base_on_meta_device_has_ct_clip_configuration():
    with torch.device("meta"):
        model = create_encoder("ctvit_base")
    n_params = sum(p.numel() for p in model.parameters())
    # 23.45 M: patch embedding 2.06 M (2000-voxel patches -> 512), spatial position-bias MLP
    # 0.27 M, and 10.56 M for each 4-layer transformer (per layer: PEG 14 k, attention 1.05 M,
    # GEGLU MLP 1.57 M, norms). CT-CLIP's CTViT encoder is of the same size.
    assert n_params == 23_452_312
    assert model.feature_info == [FeatureInfo(channels=512, stride=(20, 20, 10))]
    assert len(model.spatial_transformer.layers) == 4 and len(model.temporal_transformer.layers) == 4
    attn = model.spatial_transformer.layers[0].attn
    assert attn.heads == 8 and attn.to_qkv.out_features == 3 * 8 * 32
    assert model.input_size == (480, 480, 240)


def test_registry_presets_and_overrides():
    spec = get_encoder_spec("ctvit_tiny")
    assert spec.family == "ctvit" and get_encoder_spec("ctvit_base").family == "ctvit"
    model = create_encoder("ctvit_tiny", in_channels=2, patch_size=10, depth_patch_size=5)
    assert model.feature_info == [FeatureInfo(channels=64, stride=(10, 10, 5))]
    with torch.no_grad():
        (tokens,) = model(torch.zeros(1, 2, 20, 30, 25))
    assert tokens.shape == (1, 64, 2, 3, 5)
    # Calling the builder directly gives the preset, not the class defaults.
    assert sum(p.numel() for p in ctvit_tiny().parameters()) == sum(
        p.numel() for p in create_encoder("ctvit_tiny").parameters()
    )
