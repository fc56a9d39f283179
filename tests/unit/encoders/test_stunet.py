"""STU-Net: published sizes, shapes, deep supervision, decoder design, checkpointing, weight transfer."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from volumed.encoders import FeatureInfo, create_encoder, get_encoder_spec, list_encoders
from volumed.encoders.stunet import (
    STUNet,
    STUNetDecoderStage,
    STUNetEncoder,
    STUNetResidualBlock,
    create_stunet,
)
from volumed.errors import ConfigError, VolumedError

# Table 1 of Huang et al. 2023 (1 input channel, 105 TotalSegmentator classes).
PUBLISHED_PARAMS = {"stunet_s": 14.60e6, "stunet_b": 58.26e6, "stunet_l": 440.30e6, "stunet_h": 1457.33e6}


def _tiny_net(**kwargs) -> STUNet:
    torch.manual_seed(0)
    return create_stunet("stunet_tiny", num_classes=3, **kwargs)


# Narrower than stunet_tiny and with only three downsamplings, so that training steps on CPU
# take milliseconds (3D convolutions with a handful of channels run at ~1-5 GFLOP/s there).
SMALL = {"channels": (2, 4, 4, 8, 8, 8), "strides": [(2, 2, 2)] * 3 + [(1, 1, 1)] * 2}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_param_count_matches_paper(name):
    with torch.device("meta"):  # the 1.4B-parameter model allocates nothing here
        net = create_stunet(name, in_channels=1, num_classes=105)
    n = sum(p.numel() for p in net.parameters())
    assert n == pytest.approx(PUBLISHED_PARAMS[name], rel=0.02)
    # The encoder is the same architecture as the registered preset.
    with torch.device("meta"):
        enc = create_encoder(name)
    assert sum(p.numel() for p in enc.parameters()) == sum(p.numel() for p in net.encoder.parameters())


def test_presets_registered_with_paper_widths_and_depths():
    assert {"stunet_tiny", "stunet_s", "stunet_b", "stunet_l", "stunet_h"} <= set(list_encoders())
    expected = {"stunet_s": (16, 1), "stunet_b": (32, 1), "stunet_l": (64, 2), "stunet_h": (96, 3)}
    for name, (base, depth) in expected.items():
        spec = get_encoder_spec(name)
        assert spec.family == "stunet"
        assert tuple(spec.default_kwargs["channels"]) == tuple(base * m for m in (1, 2, 4, 8, 16, 16))
        assert tuple(spec.default_kwargs["depths"]) == (depth,) * 6
    with torch.device("meta"):
        enc = create_encoder("stunet_l")
    # depth 2: each stage holds two residual blocks; only the first one strides.
    assert all(len(stage) == 2 for stage in enc.stages)
    assert [stage[0].conv1.stride for stage in enc.stages] == [(1, 1, 1)] + [(2, 2, 2)] * 5
    assert all(stage[1].conv1.stride == (1, 1, 1) for stage in enc.stages)


def test_encoder_features_match_feature_info_on_real_forward():
    enc = create_encoder("stunet_tiny", in_channels=2).eval()
    x = torch.randn(2, 2, 32, 64, 32)  # non-cubic, every size divisible by 32
    with torch.no_grad():
        feats = enc(x)
    assert len(feats) == len(enc.feature_info) == 6
    assert enc.feature_info[0] == FeatureInfo(channels=4, stride=(1, 1, 1))
    assert enc.feature_info[-1] == FeatureInfo(channels=64, stride=(32, 32, 32))
    for f, info in zip(feats, enc.feature_info):
        expected = (2, info.channels) + tuple(s // st for s, st in zip(x.shape[2:], info.stride))
        assert tuple(f.shape) == expected
        assert torch.isfinite(f).all()


def test_anisotropic_strides_follow_the_layout():
    strides = [(2, 2, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2), (1, 1, 2)]
    enc = STUNetEncoder(1, channels=(2, 4, 4, 4, 4, 4), strides=strides)
    assert enc.input_divisor == (16, 16, 8)
    feats = enc(torch.randn(1, 1, 16, 32, 8))
    assert [tuple(f.shape[2:]) for f in feats] == [(16, 32, 8), (8, 16, 8), (4, 8, 8), (2, 4, 4), (1, 2, 2), (1, 2, 1)]
    net = STUNet(1, 3, channels=(2, 4, 4, 4, 4, 4), strides=strides).eval()
    assert net(torch.randn(1, 1, 16, 32, 8)).shape == (1, 3, 16, 32, 8)


def test_full_net_output_shape_in_eval():
    net = _tiny_net().eval()
    x = torch.randn(1, 1, 32, 64, 32)
    with torch.no_grad():
        y = net(x)
    assert isinstance(y, torch.Tensor)
    assert y.shape == (1, 3, 32, 64, 32)


def test_deep_supervision_returns_every_decoder_stage_in_training():
    torch.manual_seed(0)
    net = create_stunet("stunet_tiny", num_classes=3, channels=(2, 2, 2, 4, 4, 4)).train()
    x = torch.randn(1, 1, 32, 32, 64)
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == 5
    assert [tuple(o.shape) for o in outs] == [(1, 3, 32 // s, 32 // s, 64 // s) for s in (1, 2, 4, 8, 16)]
    # The full-resolution output is the same tensor eval mode returns.
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), outs[0].detach())
    # Without deep supervision, training returns one tensor.
    net.deep_supervision = False
    assert isinstance(net.train()(x), torch.Tensor)


def test_decoder_upsamples_by_nearest_interpolation_and_1x1_conv():
    net = _tiny_net()
    assert not any(isinstance(m, (nn.ConvTranspose3d,)) for m in net.modules())
    assert len(net.decoder) == 5 and all(isinstance(s, STUNetDecoderStage) for s in net.decoder)
    for stage in net.decoder:
        ups = [m for m in stage.upsample.modules() if isinstance(m, nn.Upsample)]
        convs = [m for m in stage.upsample.modules() if isinstance(m, nn.Conv3d)]
        assert len(ups) == 1 and ups[0].mode == "nearest"
        assert len(convs) == 1 and convs[0].kernel_size == (1, 1, 1)
    # Also where channels do not change (stage 5 -> 4), the 1x1 conv is there (weights transfer).
    deepest = net.decoder[-1].upsample
    assert deepest.preconv.in_channels == deepest.preconv.out_channels == 64
    assert all(isinstance(h, nn.Conv3d) and h.kernel_size == (1, 1, 1) and h.out_channels == 3 for h in net.heads)


def test_conv_then_nearest_equals_nearest_then_conv():
    # STU-Net interpolates before its 1x1 conv; we convolve first (8x cheaper). Same function.
    torch.manual_seed(0)
    stage = STUNetDecoderStage(6, 4, depth=1, scale=(2, 2, 2))
    x = torch.randn(2, 6, 3, 4, 5)
    conv = stage.upsample.preconv
    reference = conv(F.interpolate(x, scale_factor=2, mode="nearest"))
    torch.testing.assert_close(stage.upsample(x), reference)


@pytest.mark.parametrize("shape", [(32, 32, 48), (30, 32, 32), (32, 32, 16)])
def test_non_divisible_input_raises_config_error(shape):
    enc = create_encoder("stunet_tiny")
    with pytest.raises(ConfigError, match=r"not divisible by \(32, 32, 32\)") as info:
        enc(torch.zeros(1, 1, *shape))
    assert str(shape) in str(info.value)
    with pytest.raises(ConfigError, match="not divisible"):
        _tiny_net()(torch.zeros(1, 1, *shape))


def test_single_voxel_bottleneck_raises_config_error():
    # Instance norm uses input statistics in eval mode too, so a 1-voxel deepest stage never works.
    enc = create_encoder("stunet_tiny")
    for mode in (enc.train, enc.eval):
        mode()
        with pytest.raises(ConfigError, match=r"\(32, 32, 32\) must exceed \(32, 32, 32\)"):
            enc(torch.zeros(1, 1, 32, 32, 32))
    assert enc(torch.zeros(1, 1, 32, 64, 32))[-1].shape == (1, 64, 1, 2, 1)


def test_wrong_channel_count_raises_config_error():
    with pytest.raises(ConfigError, match=r"expected input \(B, 1, X, Y, Z\), got \(1, 3, 32, 32, 32\)"):
        create_encoder("stunet_tiny")(torch.zeros(1, 3, 32, 32, 32))


def test_gradient_checkpointing_gives_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = STUNet(1, 3, **SMALL).train()
    ckpt = STUNet(1, 3, **SMALL, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.encoder.gradient_checkpointing and not plain.encoder.gradient_checkpointing
    x = torch.randn(2, 1, 16, 16, 24)
    results = []
    for net in (plain, ckpt):
        net.zero_grad()
        outs = net(x)
        sum((o**2).mean() for o in outs).backward()
        results.append(([o.detach() for o in outs], {n: p.grad.clone() for n, p in net.named_parameters()}))
    (outs_a, grads_a), (outs_b, grads_b) = results
    for a, b in zip(outs_a, outs_b):
        torch.testing.assert_close(a, b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)
    assert grads_a["encoder.stages.0.0.conv1.weight"].abs().sum() > 0


def test_checkpointing_actually_skips_saving_stage_activations():
    def saved_count(net: STUNetEncoder) -> int:
        n = 0

        def pack(t):
            nonlocal n
            n += 1
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(torch.randn(1, 1, 16, 16, 24))
        return n

    a = STUNetEncoder(1, **SMALL)
    b = STUNetEncoder(1, **SMALL, gradient_checkpointing=True)
    assert saved_count(b) < saved_count(a) / 4


def test_encoder_state_dict_lives_under_encoder_prefix():
    net = _tiny_net()
    enc = create_encoder("stunet_tiny")
    enc_keys = set(enc.state_dict())
    prefixed = {k[len("encoder.") :] for k in net.state_dict() if k.startswith("encoder.")}
    assert enc_keys == prefixed
    # Round trip: encoder weights load into the full net and come back out identical.
    torch.manual_seed(1)
    src = create_encoder("stunet_tiny")
    net.encoder.load_state_dict(src.state_dict(), strict=True)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(net.state_dict()[f"encoder.{k}"], v)


def test_residual_block_shortcut_only_when_shape_changes_or_asked():
    same = STUNetResidualBlock(8, 8)
    assert isinstance(same.shortcut, nn.Identity)
    assert isinstance(STUNetResidualBlock(8, 8, projection=True).shortcut, nn.Conv3d)
    down = STUNetResidualBlock(8, 16, stride=2)
    assert isinstance(down.shortcut, nn.Conv3d)
    assert down.shortcut.kernel_size == (1, 1, 1) and down.shortcut.stride == (2, 2, 2)
    assert [type(m) for m in (down.norm1, down.norm2)] == [nn.InstanceNorm3d] * 2
    assert down.norm1.affine and down.act1.negative_slope == pytest.approx(0.01)
    assert down(torch.randn(1, 8, 8, 8, 8)).shape == (1, 16, 4, 4, 4)


def test_create_stunet_rejects_other_families_and_bad_config():
    with pytest.raises(ConfigError, match="unknown encoder 'stunet_xl'"):
        create_stunet("stunet_xl")
    with pytest.raises(ConfigError, match="describe different stage counts"):
        STUNetEncoder(1, channels=(4, 8, 16), depths=(1, 1, 1))
    with pytest.raises(ConfigError, match="num_classes"):
        STUNet(1, 0)
    assert issubclass(ConfigError, VolumedError)


@pytest.mark.parametrize("in_channels", [1, 4])  # 4 == stunet_tiny's channels[0]
def test_parameter_set_does_not_depend_on_input_channels(in_channels):
    # Every stage's first block projects its shortcut, also when in_channels == channels[0], so
    # weights can be adapted between input channel counts key by key.
    ref = {k: v.shape for k, v in create_encoder("stunet_tiny", in_channels=1).state_dict().items()}
    enc = create_encoder("stunet_tiny", in_channels=in_channels)
    assert set(enc.state_dict()) == set(ref)
    assert isinstance(enc.stages[0][0].shortcut, nn.Conv3d)
    assert enc.stages[0][0].shortcut.weight.shape == (4, in_channels, 1, 1, 1)

