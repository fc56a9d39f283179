"""load_encoder_weights / save_weights: formats, key maps, input-channel adaptation, reports."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from volumed.encoders import create_encoder
from volumed.encoders.stunet import create_stunet
from volumed.encoders.weights import (
    CONTAINER_KEYS,
    adapt_input_channels,
    load_encoder_weights,
    read_state_dict,
    save_weights,
)
from volumed.errors import ConfigError, OutputExistsError, WeightsLoadError

# STU-Net instance-normalises its deepest stage, which needs more than one voxel there (> 32).
STUNET_SPATIAL = (64, 32, 32)


class TinyEncoder(nn.Module):
    """A conv-first encoder with a BatchNorm (buffers) and a second conv reading the input."""

    def __init__(self, in_channels: int = 1, width: int = 4):
        super().__init__()
        self.stem = nn.Conv3d(in_channels, width, 3, padding=1)
        self.skip = nn.Conv3d(in_channels, width, 1)
        self.norm = nn.BatchNorm3d(width)
        self.body = nn.Conv3d(width, 2 * width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.body(torch.relu(self.norm(self.stem(x) + self.skip(x))))]


class TinySegNet(nn.Module):
    def __init__(self, in_channels: int = 1):
        super().__init__()
        self.encoder = TinyEncoder(in_channels)
        self.decoder = nn.Conv3d(8, 3, 1)


def _trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every float tensor with seeded random values, so that a load is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g))
    return model


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("name", ["w.pt", "w.pth", "w.safetensors"])
def test_round_trip_each_file_format(tmp_path, name):
    src = _trained(TinyEncoder())
    path = save_weights(src, tmp_path / name)
    dst = TinyEncoder()
    report = load_encoder_weights(dst, path)
    _assert_same(dst.state_dict(), src.state_dict())
    assert report.ok and report.source == path and report.prefix_map == {}
    assert len(report.loaded) == report.model_tensors == len(src.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary file left behind


def test_lightning_ckpt_of_full_network_loads_its_encoder(tmp_path):
    net = _trained(create_stunet("stunet_tiny", num_classes=3))
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in net.state_dict().items()},
        "epoch": 7,
        "global_step": 70,
        "hyper_parameters": {"lr": 1e-3, "name": "stunet_tiny"},
    }
    torch.save(ckpt, tmp_path / "last.ckpt")
    enc = create_encoder("stunet_tiny")
    report = load_encoder_weights(enc, tmp_path / "last.ckpt", strict=True)
    _assert_same(enc.state_dict(), net.encoder.state_dict())
    assert report.ok and report.container == ("state_dict",)
    assert report.prefix_map == {"model.encoder.": ""}
    # the decoder and the heads are outside the selected prefix: listed, not "unexpected"
    n_other = len(net.state_dict()) - len(enc.state_dict())
    assert len(report.ignored) == n_other
    assert all(k.startswith(("model.decoder.", "model.heads.")) for k in report.ignored)


def test_full_network_checkpoint_into_full_network_keeps_names(tmp_path):
    net = _trained(create_stunet("stunet_tiny", num_classes=3))
    other = create_stunet("stunet_tiny", num_classes=3)
    report = load_encoder_weights(other, save_weights(net, tmp_path / "net.pt"))
    assert report.prefix_map == {} and report.ok  # "encoder." is not stripped when it already fits
    _assert_same(other.state_dict(), net.state_dict())


@pytest.mark.parametrize("weights_name", ["model.pt", "model.safetensors"])
def test_bundle_folder_resolves_to_its_model_file(tmp_path, weights_name):
    src = _trained(TinyEncoder())
    bundle = tmp_path / "my_bundle"
    (bundle / "configs").mkdir(parents=True)
    save_weights(src, bundle / "models" / weights_name)
    dst = TinyEncoder()
    report = load_encoder_weights(dst, bundle)
    assert report.source == bundle / "models" / weights_name and report.ok
    _assert_same(dst.state_dict(), src.state_dict())


def test_format_is_recognised_from_content_not_suffix(tmp_path):
    src = _trained(TinyEncoder())
    safetensors.torch.save_file(src.state_dict(), tmp_path / "pytorch_model.bin")
    torch.save(src.state_dict(), tmp_path / "legacy.weights", _use_new_zipfile_serialization=False)
    for name in ("pytorch_model.bin", "legacy.weights"):
        dst = TinyEncoder()
        assert load_encoder_weights(dst, tmp_path / name).ok
        _assert_same(dst.state_dict(), src.state_dict())


def test_bundle_folder_without_weights_is_an_error(tmp_path):
    (tmp_path / "models").mkdir()
    with pytest.raises(WeightsLoadError, match="not a MONAI bundle") as err:
        load_encoder_weights(TinyEncoder(), tmp_path)
    assert str(tmp_path) in str(err.value)


def test_ddp_prefix_inside_model_container_and_dict_source():
    src = _trained(TinyEncoder())
    ckpt = {"model": {f"module.{k}": v for k, v in src.state_dict().items()}, "optimizer": {"lr": 0.1}}
    dst = TinyEncoder()
    report = load_encoder_weights(dst, ckpt)
    assert report.source is None and report.container == ("model",) and report.prefix_map == {"module.": ""}
    _assert_same(dst.state_dict(), src.state_dict())


def test_student_is_default_container_and_teacher_on_request():
    student, teacher = _trained(TinyEncoder(), 1), _trained(TinyEncoder(), 2)
    ckpt = {"teacher": teacher.state_dict(), "student": student.state_dict(), "epoch": 3}
    assert "student" in CONTAINER_KEYS and "teacher" not in CONTAINER_KEYS
    dst = TinyEncoder()
    assert load_encoder_weights(dst, ckpt).container == ("student",)
    _assert_same(dst.state_dict(), student.state_dict())
    assert load_encoder_weights(dst, ckpt, container="teacher").container == ("teacher",)
    _assert_same(dst.state_dict(), teacher.state_dict())
    with pytest.raises(WeightsLoadError, match="no container 'ema'"):
        load_encoder_weights(dst, ckpt, container="ema")


def test_equally_good_prefixes_are_reported_as_ambiguous(caplog):
    student, teacher = _trained(TinyEncoder(), 1), _trained(TinyEncoder(), 2)
    flat = {f"student.{k}": v for k, v in student.state_dict().items()}
    flat.update({f"teacher.{k}": v for k, v in teacher.state_dict().items()})
    dst = TinyEncoder()
    with caplog.at_level(logging.WARNING, logger="volumed.encoders.weights"):
        report = load_encoder_weights(dst, flat)
    assert report.prefix_map == {"student.": ""} and len(report.ignored) == len(teacher.state_dict())
    _assert_same(dst.state_dict(), student.state_dict())
    assert any("'student.' -> ''" in r.getMessage() and "'teacher.' -> ''" in r.getMessage() for r in caplog.records)


def test_explicit_key_maps():
    src = _trained(TinyEncoder())
    ckpt = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    ckpt["head.weight"] = torch.zeros(3)

    dst = TinyEncoder()
    report = load_encoder_weights(dst, ckpt, key_map={"backbone.": ""})
    _assert_same(dst.state_dict(), src.state_dict())
    assert report.unexpected == ["head.weight"] and not report.ok  # an explicit map renames, it does not select

    dst = TinyEncoder()
    def backbone_only(key: str) -> str | None:
        return key[len("backbone.") :] if key.startswith("backbone.") else None

    report = load_encoder_weights(dst, ckpt, key_map=backbone_only)
    _assert_same(dst.state_dict(), src.state_dict())
    assert report.ok and report.ignored == ["head.weight"]

    report = load_encoder_weights(TinyEncoder(), ckpt, key_map=None)
    assert report.loaded == [] and len(report.missing) == report.model_tensors

    with pytest.raises(WeightsLoadError, match="sends both"):
        load_encoder_weights(TinyEncoder(), ckpt, key_map=lambda k: "stem.weight")
    with pytest.raises(ConfigError, match="key_map"):
        load_encoder_weights(TinyEncoder(), ckpt, key_map="guess")


def test_known_renames_apply_only_when_they_help():
    class FcMlp(nn.Module):  # a model that itself uses the fc1/fc2 names
        def __init__(self):
            super().__init__()
            self.mlp = nn.ModuleDict({"fc1": nn.Linear(4, 8), "fc2": nn.Linear(8, 4)})

    src = _trained(FcMlp())
    dst = FcMlp()
    report = load_encoder_weights(dst, src.state_dict())
    assert report.ok and report.renames == [] and report.prefix_map == {}
    _assert_same(dst.state_dict(), src.state_dict())


# ----------------------------------------------------------------------- bad and unsafe files


def test_garbage_truncated_and_empty_files_raise_naming_the_file(tmp_path):
    good = save_weights(_trained(TinyEncoder()), tmp_path / "good.pt").read_bytes()
    cases = {
        "notes.pt": b"these are not weights, just some text " * 20,
        "truncated.pt": good[: len(good) // 2],
        "empty.pth": b"",
        "broken.safetensors": save_weights(TinyEncoder(), tmp_path / "s.safetensors").read_bytes()[:-10],
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsLoadError) as err:
            load_encoder_weights(TinyEncoder(), tmp_path / name)
        assert name in str(err.value) and err.value.path == tmp_path / name
    with pytest.raises(WeightsLoadError, match="not found"):
        load_encoder_weights(TinyEncoder(), tmp_path / "missing.pt")


_UNPICKLED: list[str] = []


def _record_unpickling() -> str:
    _UNPICKLED.append("code ran")
    return "payload"


class Payload:
    """Unpickling this runs a function: what weights_only=True must prevent."""

    def __reduce__(self):
        return (_record_unpickling, ())


def test_pickled_python_objects_are_refused_without_running_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"stem.weight": torch.zeros(4, 1, 3, 3, 3), "config": Payload()}, path)
    with pytest.raises(WeightsLoadError, match="weights_only=True") as err:
        load_encoder_weights(TinyEncoder(), path)
    assert "evil.pt" in str(err.value) and "_record_unpickling" in str(err.value)
    assert _UNPICKLED == []
    # a whole pickled module is refused the same way
    torch.save(TinyEncoder(), tmp_path / "module.pt")
    with pytest.raises(WeightsLoadError, match="pickled Python object"):
        read_state_dict(tmp_path / "module.pt")


def test_checkpoint_without_tensors_is_an_error(tmp_path):
    torch.save({"epoch": 3, "note": "no weights here"}, tmp_path / "meta.pt")
    with pytest.raises(WeightsLoadError, match="holds no tensors"):
        load_encoder_weights(TinyEncoder(), tmp_path / "meta.pt")


# ------------------------------------------------------------------- mismatches and strictness


def test_wrong_width_layer_is_reported_and_strict_raises(tmp_path, caplog):
    src = _trained(TinyEncoder())
    state = dict(src.state_dict())
    state["body.weight"] = torch.randn(16, 4, 3, 3, 3)  # a 16-channel layer where the model has 8
    path = save_weights(state, tmp_path / "wide.pt")

    dst = TinyEncoder()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(WeightsLoadError, match=r"body\.weight") as err:
        load_encoder_weights(dst, path, strict=True)
    assert "(16, 4, 3, 3, 3)" in str(err.value) and "wide.pt" in str(err.value)
    _assert_same(dst.state_dict(), before)  # strict is all or nothing

    with caplog.at_level(logging.INFO, logger="volumed.encoders.weights"):
        report = load_encoder_weights(dst, path)
    assert report.mismatched == [("body.weight", (16, 4, 3, 3, 3), (8, 4, 3, 3, 3))]
    assert not report.ok and report.missing == [] and report.unexpected == [] and report.adapted == []
    assert torch.equal(dst.body.weight, before["body.weight"])  # never silently loaded
    for k, v in dst.state_dict().items():
        if k != "body.weight":
            assert torch.equal(v, src.state_dict()[k]), k
    table = report.format_table()
    assert "mismatched  1" in table and "checkpoint (16, 4, 3, 3, 3)  model (8, 4, 3, 3, 3)" in table
    levels = {r.levelno for r in caplog.records if r.name == "volumed.encoders.weights"}
    assert levels == {logging.INFO, logging.WARNING}
    assert any("body.weight" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_strict_error_truncates_long_key_lists():
    enc = create_encoder("stunet_tiny")
    with pytest.raises(WeightsLoadError) as err:
        load_encoder_weights(enc, {"unrelated.weight": torch.zeros(1)}, strict=True)
    msg = str(err.value)
    n = len(enc.state_dict())
    assert f"{n} missing" in msg and f"(+{n - 10} more)" in msg and "1 unexpected: unrelated.weight" in msg


def test_matching_checkpoint_logs_table_without_warning(caplog):
    src = _trained(TinyEncoder())
    with caplog.at_level(logging.INFO, logger="volumed.encoders.weights"):
        load_encoder_weights(TinyEncoder(), src.state_dict())
    records = [r for r in caplog.records if r.name == "volumed.encoders.weights"]
    assert [r.levelno for r in records] == [logging.INFO]
    assert "loaded      11 of 11 model tensors" in records[0].getMessage()


# ------------------------------------------------------------------ input-channel adaptation


def _stunet_features(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return model.eval()(x)


# STU-Net's first block always has a 1x1 shortcut reading the input (use_1x1conv in the original),
# so two tensors per model see the input-channel change: conv1 and the shortcut.
@pytest.mark.parametrize("c_ckpt, c_model", [(1, 4), (4, 1), (1, 3), (2, 6)])
def test_repeat_adaptation_keeps_the_output_for_a_replicated_input(c_ckpt, c_model):
    src = _trained(create_encoder("stunet_tiny", in_channels=c_ckpt))
    dst = create_encoder("stunet_tiny", in_channels=c_model)
    report = load_encoder_weights(dst, src.state_dict(), in_channels="repeat", strict=True)
    first = "stages.0.0.conv1.weight"
    assert report.ok and (first, f"repeat ({c_ckpt} -> {c_model} input channels)") in report.adapted
    assert [a.key for a in report.adapted] == [first, "stages.0.0.shortcut.weight"]
    x = torch.randn(1, 1, *STUNET_SPATIAL, generator=torch.Generator().manual_seed(0))
    expected_features = _stunet_features(src, x.repeat(1, c_ckpt, 1, 1, 1))
    for a, b in zip(expected_features, _stunet_features(dst, x.repeat(1, c_model, 1, 1, 1))):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    if c_model > c_ckpt:  # tiled and scaled
        expected = src.state_dict()[first].repeat(1, c_model // c_ckpt, 1, 1, 1) * (c_ckpt / c_model)
    else:  # c_model == 1: every filter folds onto the one channel
        expected = src.state_dict()[first].sum(1, keepdim=True)
    torch.testing.assert_close(dst.state_dict()[first], expected)


def test_mean_and_reinit_modes():
    src = _trained(TinyEncoder(in_channels=2))
    w = src.stem.weight.detach()

    mean = TinyEncoder(in_channels=4)
    report = load_encoder_weights(mean, src.state_dict(), in_channels="mean", strict=True)
    assert {a.key for a in report.adapted} == {"stem.weight", "skip.weight"}  # both convs reading the input
    expected = w.mean(1, keepdim=True).repeat(1, 4, 1, 1, 1) * (2 / 4)
    torch.testing.assert_close(mean.stem.weight.detach(), expected)

    rep = TinyEncoder(in_channels=4)
    load_encoder_weights(rep, src.state_dict(), in_channels="repeat")
    torch.testing.assert_close(rep.stem.weight.detach(), torch.cat([w, w], 1) / 2)  # channel order kept

    reinit = TinyEncoder(in_channels=4)
    init = reinit.stem.weight.detach().clone()
    report = load_encoder_weights(reinit, src.state_dict(), in_channels="reinit", strict=True)
    assert report.ok and "stem.weight" not in report.loaded and report.mismatched == []
    assert [a.key for a in report.adapted] == ["stem.weight", "skip.weight"]
    assert report.adapted[0].how.startswith("reinit (2 -> 4 input channels)")
    assert torch.equal(reinit.stem.weight, init) and torch.equal(reinit.body.weight, src.body.weight)

    with pytest.raises(ConfigError, match="in_channels"):
        load_encoder_weights(TinyEncoder(), src.state_dict(), in_channels="zero")


def test_adapt_input_channels_fold_and_tile():
    w = torch.arange(4.0).reshape(1, 4, 1, 1, 1)  # filters 0, 1, 2, 3
    assert adapt_input_channels(w, 2, "repeat").flatten().tolist() == [0 + 2, 1 + 3]
    assert adapt_input_channels(w, 2, "mean").flatten().tolist() == [3.0, 3.0]  # mean 1.5, times 4/2
    assert adapt_input_channels(w, 1, "repeat").flatten().tolist() == [6.0]
    assert adapt_input_channels(w[:, :2], 4, "repeat").flatten().tolist() == [0.0, 0.5, 0.0, 0.5]
    x = torch.randn(1, 1, 3, 3, 3)
    for c_new in (1, 2, 3, 4, 8):  # fewer channels, or a multiple of 4: exact for both modes
        for mode in ("repeat", "mean"):
            v = adapt_input_channels(w, c_new, mode)
            assert v.shape == (1, c_new, 1, 1, 1)
            # the response to a channel-replicated input is unchanged
            torch.testing.assert_close((v * x).sum(), (w * x).sum())
    with pytest.raises(ConfigError, match="conv weight"):
        adapt_input_channels(torch.zeros(8, 4), 2)


def test_pad_keeps_the_old_filters_and_gives_new_channels_zero_weight():
    w = torch.randn(8, 1, 3, 3, 3)
    v = adapt_input_channels(w, 3, "pad")
    assert v.shape == (8, 3, 3, 3, 3) and torch.equal(v[:, :1], w) and not v[:, 1:].any()
    x = torch.randn(1, 1, 5, 5, 5)
    extra = torch.randn(1, 2, 5, 5, 5)  # whatever the new channels hold, the response is the old one
    torch.testing.assert_close(F.conv3d(torch.cat([x, extra], 1), v), F.conv3d(x, w))
    assert torch.equal(adapt_input_channels(v, 1, "pad"), w)  # fewer channels: the first ones
    src = _trained(TinyEncoder())
    padded = TinyEncoder(in_channels=2)
    report = load_encoder_weights(padded, src.state_dict(), in_channels="pad")
    assert report.ok and [a.how for a in report.adapted] == ["pad (1 -> 2 input channels)"] * 2
    assert torch.equal(padded.stem.weight[:, :1], src.stem.weight) and not padded.stem.weight[:, 1:].any()


def test_wrong_width_elsewhere_is_not_taken_for_an_input_channel_change():
    state = dict(_trained(TinyEncoder()).state_dict())
    state["body.weight"] = torch.randn(8, 1, 3, 3, 3)  # dim 1 differs, but the stem matches
    report = load_encoder_weights(TinyEncoder(), state)
    assert report.adapted == [] and [m.key for m in report.mismatched] == ["body.weight"]

    state = dict(_trained(TinyEncoder(in_channels=2)).state_dict())
    state["body.weight"] = torch.randn(8, 3, 3, 3, 3)  # 3 -> 4 is not the input's 2 -> 4
    report = load_encoder_weights(TinyEncoder(in_channels=4), state)
    assert [a.key for a in report.adapted] == ["stem.weight", "skip.weight"]
    assert report.mismatched == [("body.weight", (8, 3, 3, 3, 3), (8, 4, 3, 3, 3))]


# ------------------------------------------------------------------------------- Swin naming


def _swin_checkpoint(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """``model``'s state dict with ``swinViT.`` replaced by ``prefix``."""
    assert all(k.startswith("swinViT.") for k in model.state_dict())
    return {prefix + k[len("swinViT.") :]: v for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "prefix, extra",
    [
        ("swin_vit.", {}),  # VoCo
        ("module.swinViT.", {"module.decoder1.conv.weight": torch.zeros(2, 2, 3, 3, 3)}),  # DDP SwinUNETR
        ("swinViT.", {"out.conv.conv.weight": torch.zeros(2, 2, 1, 1, 1)}),  # MONAI SwinUNETR
    ],
)
def test_swin_naming_variants_load_into_swin_tiny(prefix, extra):
    src = _trained(create_encoder("swin_tiny"))
    ckpt = {**_swin_checkpoint(src, prefix), **extra}
    dst = create_encoder("swin_tiny")
    report = load_encoder_weights(dst, {"state_dict": ckpt}, strict=True)
    assert report.missing == [] and report.mismatched == [] and report.unexpected == []
    assert report.ignored == list(extra)
    _assert_same(dst.state_dict(), src.state_dict())


@pytest.mark.parametrize(
    "prefix, old_name, new_name, prefix_map",
    [
        # the original self-supervised Swin UNETR weights: module.<layer>, mlp.fc1/fc2
        ("module.", ".mlp.fc", ".mlp.linear", {"module.": "swinViT."}),
        # MONAI's DAE checkpoints: encoder.layersN.0.0.blocks (see monai's filter_swinunetr)
        ("encoder.", "layers2.0.0.", "layers2.0.", {"encoder.": "swinViT."}),
    ],
)
def test_older_swin_layouts_load_into_swin_tiny(prefix, old_name, new_name, prefix_map):
    src = _trained(create_encoder("swin_tiny"))
    ckpt = {k.replace(new_name, old_name): v for k, v in _swin_checkpoint(src, prefix).items()}
    assert any(old_name in k for k in ckpt)
    dst = create_encoder("swin_tiny")
    report = load_encoder_weights(dst, {"state_dict": ckpt})
    assert report.ok and report.prefix_map == prefix_map and len(report.renames) == 1
    _assert_same(dst.state_dict(), src.state_dict())


# ------------------------------------------------------------------------------------ saving


def test_save_weights_refuses_to_overwrite_and_replaces_on_request(tmp_path):
    path = save_weights(_trained(TinyEncoder(), 1), tmp_path / "sub" / "w.safetensors")
    before = path.read_bytes()
    with pytest.raises(OutputExistsError) as err:
        save_weights(_trained(TinyEncoder(), 2), path)
    assert str(path) in str(err.value) and path.read_bytes() == before
    save_weights(_trained(TinyEncoder(), 2), path, overwrite=True)
    assert path.read_bytes() != before
    dst = TinyEncoder()
    load_encoder_weights(dst, path)
    _assert_same(dst.state_dict(), _trained(TinyEncoder(), 2).state_dict())
    assert sorted(p.name for p in path.parent.iterdir()) == ["w.safetensors"]


def test_save_weights_rejects_bad_input_and_leaves_nothing(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="suffix"):
        save_weights(TinyEncoder(), tmp_path / "w.ckpt")
    with pytest.raises(ConfigError, match="'epoch' is a int"):
        save_weights({"w": torch.zeros(1), "epoch": 3}, tmp_path / "w.pt")

    def crash(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_weights(TinyEncoder(), tmp_path / "w.pt")
    assert list(tmp_path.iterdir()) == []


def test_save_weights_handles_tied_and_view_tensors(tmp_path):
    base = torch.randn(4, 4)
    state = {"a": base, "tied": base, "row": base[1], "col": base[:, 2]}
    for name in ("t.safetensors", "t.pt"):
        path = save_weights(state, tmp_path / name)
        back = read_state_dict(path).state_dict
        assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    # the view of row 1 was written alone, not with the 16-value storage behind it
    assert torch.load(tmp_path / "t.pt", weights_only=True)["row"].untyped_storage().nbytes() == 4 * 4
