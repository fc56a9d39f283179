"""SwinUNETR encoder: multi-scale shapes, checkpoint-key compatibility with MONAI SwinUNETR, errors."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import SwinUNETR

from volumed.encoders import FeatureInfo, create_encoder, get_encoder_spec
from volumed.encoders.swin import SwinEncoder, _LinspaceOnCPU, swin_tiny
from volumed.errors import ConfigError


@pytest.fixture(scope="module")
def tiny() -> SwinEncoder:
    torch.manual_seed(0)
    return create_encoder("swin_tiny").eval()


def test_tiny_features_finest_first_match_feature_info(tiny):
    x = torch.randn(1, 1, 64, 32, 96)  # anisotropic, so a permuted axis would show
    with torch.no_grad():
        feats = tiny(x)
    assert tiny.feature_info == [
        FeatureInfo(12, (2, 2, 2)),
        FeatureInfo(24, (4, 4, 4)),
        FeatureInfo(48, (8, 8, 8)),
        FeatureInfo(96, (16, 16, 16)),
        FeatureInfo(192, (32, 32, 32)),
    ]
    assert len(feats) == 5
    for f, info in zip(feats, tiny.feature_info):
        assert tuple(f.shape) == (1, info.channels, *(n // s for n, s in zip(x.shape[2:], info.stride)))
        assert torch.isfinite(f).all()
    # normalize=True: every map is layer-normalised over channels (zero mean per voxel).
    torch.testing.assert_close(feats[2].mean(dim=1), torch.zeros_like(feats[2][:, 0]), atol=1e-5, rtol=0)


def test_swin_b_matches_monai_swinunetr_feature_size_48_on_meta_device():
    # MONAI's SwinTransformer calls .item() in __init__; _LinspaceOnCPU is what makes meta work.
    with torch.device("meta"):
        model = create_encoder("swin_b")
        with _LinspaceOnCPU():
            reference = SwinUNETR(in_channels=1, out_channels=2, feature_size=48)
    assert next(model.parameters()).device.type == "meta"
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(p.numel() for p in reference.swinViT.parameters()) == 8_062_002
    ref_keys = {k for k in reference.state_dict() if k.startswith("swinViT.")}
    keys = set(model.state_dict())
    assert keys == ref_keys
    assert "swinViT.layers1.0.blocks.0.attn.qkv.weight" in keys
    assert model.feature_info[0] == FeatureInfo(48, (2, 2, 2))
    assert model.feature_info[-1] == FeatureInfo(768, (32, 32, 32))


def test_presets_have_state_dict_keys_under_swinViT(tiny):
    assert all(k.startswith("swinViT.") for k in tiny.state_dict())
    assert get_encoder_spec("swin_b").family == get_encoder_spec("swin_tiny").family == "swin"


def test_swinunetr_weights_load_by_name_and_reproduce_its_hidden_states(tiny):
    torch.manual_seed(1)
    reference = SwinUNETR(
        in_channels=1, out_channels=2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24), window_size=4
    ).eval()
    swin_state = {k: v for k, v in reference.state_dict().items() if k.startswith("swinViT.")}
    model = swin_tiny().eval()
    model.load_state_dict(swin_state, strict=True)
    x = torch.randn(1, 1, 32, 32, 64)
    with torch.no_grad():
        ours = model(x)
        theirs = reference.swinViT(x, reference.normalize)
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("size", "axis", "n"), [((48, 64, 64), "X", 48), ((64, 64, 100), "Z", 100)])
def test_size_not_divisible_by_32_raises_config_error(tiny, size, axis, n):
    with pytest.raises(ConfigError) as err:
        tiny(torch.zeros(1, 1, *size))
    assert f"axis {axis} has size {n}, which is not divisible by 32" in str(err.value)


def test_bad_rank_and_channels_raise_config_error(tiny):
    with pytest.raises(ConfigError, match=r"\(B, C, X, Y, Z\)"):
        tiny(torch.zeros(1, 32, 32, 32))
    with pytest.raises(ConfigError, match="3 channels, the model expects 1"):
        tiny(torch.zeros(1, 3, 32, 32, 32))
    with pytest.raises(ConfigError, match="not divisible by num_heads=5"):
        swin_tiny(num_heads=(5, 6, 12, 24))


def test_gradient_checkpointing_flag_reaches_monai_blocks_and_trains():
    model = create_encoder("swin_tiny", in_channels=2, use_checkpoint=True)
    blocks = [b for layer in (model.swinViT.layers1, model.swinViT.layers4) for b in layer[0].blocks]
    assert blocks and all(b.use_checkpoint for b in blocks)
    feats = model(torch.randn(1, 2, 32, 32, 32))
    sum(f.square().mean() for f in feats).backward()
    grad = model.swinViT.patch_embed.proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
