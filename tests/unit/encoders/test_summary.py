"""Encoder summary: counts on the meta device agree with real modules and real forward passes."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from volumed.encoders import create_encoder, list_encoders
from volumed.encoders.registry import FeatureInfo
from volumed.encoders.summary import (
    format_table,
    summarize_all,
    summarize_encoder,
    valid_input_shape,
)
from volumed.errors import ConfigError


def test_params_and_weights_equal_a_real_module():
    enc = create_encoder("stunet_tiny")
    s = summarize_encoder("stunet_tiny")
    assert s.name == "stunet_tiny" and s.family == "stunet"
    assert s.input_shape == (128, 128, 128)
    assert s.params == sum(p.numel() for p in enc.parameters())
    assert s.params_m == pytest.approx(s.params / 1e6)
    n_weights = s.params + sum(b.numel() for b in enc.buffers())
    assert s.weights_mib == pytest.approx(n_weights * 4 / 2**20)


def test_flops_equal_the_analytic_convolution_count():
    # 2 * output voxels * in_channels * kernel volume per output channel, for every conv.
    enc = create_encoder("stunet_tiny")
    expected = 0

    def hook(module, inputs, output):
        nonlocal expected
        k = module.weight.shape[1] * module.weight.shape[2:].numel()
        expected += 2 * output.numel() * k

    handles = [m.register_forward_hook(hook) for m in enc.modules() if isinstance(m, nn.Conv3d)]
    with torch.no_grad():
        enc(torch.zeros(1, 1, 64, 64, 64))
    for h in handles:
        h.remove()
    s = summarize_encoder("stunet_tiny", input_size=64)
    assert s.gflops > 0
    assert s.gflops * 1e9 == pytest.approx(expected, rel=1e-9)
    # Compute grows with the volume: 2x the edge, 8x the voxels.
    assert summarize_encoder("stunet_tiny", input_size=128).gflops == pytest.approx(8 * s.gflops, rel=1e-6)


def test_activation_memory_on_meta_equals_a_real_cpu_forward():
    # The meta-device method (storages told apart without data pointers) must give the bytes a
    # real forward saves for backward, where storages are told apart by their data pointers.
    enc = create_encoder("stunet_tiny").train()
    params = {p.untyped_storage().data_ptr() for p in enc.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        enc(torch.randn(1, 1, 64, 64, 64))
    s = summarize_encoder("stunet_tiny", input_size=64)
    assert s.activations_mib * 2**20 == pytest.approx(sum(saved.values()), rel=1e-9)
    # Lower bound sanity: at least the full-resolution stage output (4 ch x 64^3 fp32) is kept.
    assert s.activations_mib * 2**20 > 4 * 64**3 * 4


def test_summarize_all_lists_every_registered_preset():
    rows = summarize_all()
    assert sorted(r.name for r in rows) == list_encoders()
    assert {"stunet_tiny", "stunet_s", "stunet_b", "stunet_l", "stunet_h"} <= {r.name for r in rows}
    by_name = {r.name: r for r in rows}
    assert by_name["stunet_h"].params > 500e6  # built on meta: no memory was needed for it
    stunets = [by_name[n] for n in ("stunet_tiny", "stunet_s", "stunet_b", "stunet_l", "stunet_h")]
    for small, big in zip(stunets, stunets[1:]):
        assert small.params < big.params and small.gflops < big.gflops
        assert small.activations_mib < big.activations_mib
    assert all(r.gflops > 0 and r.activations_mib > 0 for r in rows)


def test_format_table_has_a_row_per_encoder():
    rows = [summarize_encoder("stunet_tiny"), summarize_encoder("stunet_s")]
    text = format_table(rows)
    lines = text.splitlines()
    assert len(lines) == 4 and "GFLOPs" in lines[0] and "params (M)" in lines[0]
    assert lines[2].startswith("stunet_tiny") and "128x128x128" in lines[2]
    assert f"{rows[1].params_m:,.2f}" in lines[3]
    md = format_table(rows, markdown=True).splitlines()
    assert len(md) == 4 and all(line.startswith("| ") and line.endswith(" |") for line in md)
    assert set(md[1].replace("|", "").replace(" ", "")) <= {"-", ":"}


class _PatchEncoder(nn.Module):
    """A stand-in for an encoder with 20x20x10 patches (like CT-ViT)."""

    feature_info = [FeatureInfo(channels=8, stride=(20, 20, 10))]


def test_valid_input_shape_picks_nearest_accepted_size():
    assert valid_input_shape(_PatchEncoder(), 128) == (120, 120, 130)
    assert valid_input_shape(_PatchEncoder(), 5) == (20, 20, 10)
    with torch.device("meta"):
        assert valid_input_shape(create_encoder("stunet_b"), 128) == (128, 128, 128)
        assert valid_input_shape(create_encoder("stunet_b"), 100) == (96, 96, 96)


def test_bad_input_size_and_unknown_name():
    with pytest.raises(ConfigError, match="input_size"):
        summarize_encoder("stunet_tiny", input_size=0)
    with pytest.raises(ConfigError, match="unknown encoder"):
        summarize_encoder("not_an_encoder")
    assert summarize_encoder("stunet_tiny", input_size=64).input_shape == (64, 64, 64)
