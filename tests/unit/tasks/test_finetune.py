"""``volumed finetune``: what each method trains, LoRA merging, term and shot selection, bad input,
and few-shot fine-tuning of the default bundle on the real thorax crop for structures it never saw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from volumed.cli import main
from volumed.errors import ConfigError, OutputExistsError
from volumed.inference.package import PromptSegConfig, build_model, read_config
from volumed.tasks.finetune import apply_method, count_parameters, finetune, lora_targets, merge_lora
from volumed.tasks.promptseg_data import LabelSource, restrict_terms

REPO = Path(__file__).resolve().parents[3]
BUNDLE = REPO / "bundles" / "volumed_promptseg_ct"
CROP = "totalsegmentator_thorax_crops/pulmonary"
# Landmark masks of the crop that the default model was never trained on (0.5-1.1 mL each).
NEW_TERMS = {
    "pulmonary valve annulus": "pul_annulus.nii.gz",
    "pulmonary artery bifurcation": "pul_bifurcation.nii.gz",
    "pulmonary sinotubular junction": "pul_sinotubular_junction.nii.gz",
}


def _tiny_net():
    cfg = PromptSegConfig(
        encoder="stunet_tiny",
        encoder_kwargs={"channels": [8, 16, 32, 32, 32, 32], "strides": [[2, 2, 2], [2, 2, 2], [2, 2, 1], [2, 2, 1], [1, 1, 1]]},
        decoder_kwargs={"embed_dim": 32, "num_layers": 1, "num_heads": 4, "pixel_dim": 16, "num_memory_levels": 2},
    )  # fmt: skip
    torch.manual_seed(0)
    return build_model(cfg)


def _forward(net, x):
    queries = net.condition(torch.randn(2, 384, generator=torch.Generator().manual_seed(1)), "CT")
    return net.segmenter(x, queries)


def test_freeze_encoder_trains_everything_but_the_encoder():
    net = apply_method(_tiny_net(), "freeze-encoder")
    assert not any(p.requires_grad for p in net.segmenter.encoder.parameters())
    assert all(p.requires_grad for p in net.segmenter.decoder.parameters())
    trainable, total = count_parameters(net)
    assert 0 < trainable < total
    assert count_parameters(apply_method(_tiny_net(), "full"))[0] == total


def test_lora_trains_adapters_only_and_merges_back_to_the_same_function_and_keys():
    net = _tiny_net()
    keys = set(net.state_dict())
    targets = lora_targets(net, 4)
    assert targets and all("cross_attn" not in t for t in targets)
    apply_method(net, "lora", lora_rank=4)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    assert any("lora_A" in n for n in trainable)
    # Besides the adapters, only layers too narrow for rank 4 (the 1-channel stem) or 1x1x1 train;
    # attention stays frozen.
    for n in trainable:
        if "lora_" in n:
            continue
        module = net.get_submodule(n.rpartition(".")[0])
        assert "cross_attn" not in n
        assert isinstance(module, torch.nn.Conv3d) and (tuple(module.kernel_size) == (1, 1, 1) or module.in_channels <= 4), n
    # Adapters start as a no-op (B = 0); give them weights, then merging must keep the function.
    with torch.no_grad():
        for n, p in net.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    net.eval()
    x = torch.rand(1, 1, 32, 32, 16)
    with torch.no_grad():
        before = _forward(net, x)
        merged = merge_lora(net)
        after = _forward(merged, x)
    assert set(merged.state_dict()) == keys  # the bundle's architecture again
    assert torch.allclose(before, after, atol=1e-4)
    assert before.abs().max() > 0


def test_restrict_terms_keeps_masks_with_their_terms_and_names_unknown_terms(tmp_path):
    a = LabelSource(image=tmp_path / "a.nii.gz", modality="CT", terms=("heart", "pulmonary artery", "liver"),
                    masks=(tmp_path / "heart.nii.gz", tmp_path / "pa.nii.gz"), absent=("liver",))  # fmt: skip
    b = LabelSource(image=tmp_path / "b.nii.gz", modality="CT", terms=("liver",), masks=(tmp_path / "liver.nii.gz",))
    (kept,) = restrict_terms([a, b], ["pulmonary artery"])
    assert kept.terms == ("pulmonary artery",) and kept.masks == (tmp_path / "pa.nii.gz",) and kept.absent == ()
    both = restrict_terms([a, b], ["liver"])
    assert [s.terms for s in both] == [("liver",), ("liver",)] and both[0].masks == () and both[0].absent == ("liver",)
    with pytest.raises(ConfigError, match=r"\['spleen'\] are annotated by no datalist entry; annotated: \['heart', 'liver'"):
        restrict_terms([a, b], ["spleen"])


def test_bad_requests_are_refused_before_any_training(tmp_path, shared_data):
    datalist = _crop_datalist(tmp_path, shared_data)
    with pytest.raises(ConfigError, match="unknown fine-tuning method 'dora'"):
        finetune(BUNDLE, datalist, method="dora", bundles_dir=tmp_path)
    with pytest.raises(ConfigError, match="--shots must be at least 1"):
        finetune(BUNDLE, datalist, shots=0, bundles_dir=tmp_path)
    with pytest.raises(ConfigError, match="datalist does not exist"):
        finetune(BUNDLE, tmp_path / "nope.json", bundles_dir=tmp_path)
    (tmp_path / "taken").mkdir()
    with pytest.raises(OutputExistsError, match="bundle exists already"):
        finetune(BUNDLE, datalist, name="taken", bundles_dir=tmp_path)
    with pytest.raises(OutputExistsError, match="needs --overwrite"):
        finetune(BUNDLE, datalist, name=BUNDLE.name, bundles_dir=BUNDLE.parent)
    # A name `volumed bundle new` would refuse is refused before training, not after it.
    with pytest.raises(ConfigError, match=r"--name: bundle name must be letters, digits, '_' or '-', got 'my.bundle'"):
        finetune(BUNDLE, datalist, name="my.bundle", bundles_dir=tmp_path, work_dir=tmp_path / "work", max_steps=1, val_every=1)
    assert not (tmp_path / "work").exists()


def _crop_datalist(tmp_path: Path, shared_data: Path) -> Path:
    path = tmp_path / "crop.json"
    path.write_text(json.dumps({
        "dataroot": str(shared_data / CROP), "modality": {"0": "CT"},
        "training": [{"image": "ct_cropped.nii.gz", "masks": NEW_TERMS}],
    }))  # fmt: skip
    return path


def test_few_shot_finetuning_learns_structures_the_default_model_never_saw(tmp_path, shared_data, capsys):
    """One real CT (the contrast thorax crop), three landmark structures absent from the default
    model's training: 60 steps of full fine-tuning through the CLI must raise their Dice on that
    crop well above the starting model's, and end in a valid, loadable, versioned bundle."""
    from safetensors.torch import load_file

    from volumed.bundle import load as load_bundle
    from volumed.bundle.metadata import read_metadata

    datalist = _crop_datalist(tmp_path, shared_data)
    base_meta = read_metadata(BUNDLE)
    argv = ["finetune", "--bundle", str(BUNDLE), "--datalist", str(datalist), "--name", "crop_landmarks",
            "--bundles-dir", str(tmp_path / "bundles"), "--work-dir", str(tmp_path / "work"), "--shots", "1",
            "--max-steps", "60", "--val-every", "20", "--patience", "3", "--no-progress", "--threads", "2"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "loaded      122 of 122 model tensors" in out
    n_params = sum(int(np.prod(t.shape)) for t in load_file(BUNDLE / "models" / "model.safetensors").values())
    assert f"{n_params:,} of {n_params:,} parameters trained" in out, out

    package = read_config(tmp_path / "bundles" / "crop_landmarks" / "models")
    info = package.training["finetune"]
    start, best = info["start_dice"], info["best_dice"]
    assert set(start) == set(best) == set(NEW_TERMS)
    assert max(start.values()) < 0.1  # free text the model never saw: nearly nothing found
    assert np.mean(list(best.values())) >= np.mean(list(start.values())) + 0.08, (start, best)
    # The package keeps the bundle's terms and adds the new ones; the bundle is a new version.
    assert set(NEW_TERMS) <= set(package.terms) and {"liver", "heart"} <= set(package.terms)
    meta = read_metadata(tmp_path / "bundles" / "crop_landmarks")
    assert meta["version"] != base_meta["version"] and "fine-tuned (full, 60 steps)" in meta["changelog"][meta["version"]]
    assert load_bundle(tmp_path / "bundles" / "crop_landmarks") is not None  # sha256 and metadata checks pass
    logs = tmp_path / "work"
    assert list(logs.glob("logs/version_0/metrics.csv")) and list(logs.glob("tensorboard/version_0/events.out.tfevents.*"))
    assert "val/dice" in (next(logs.glob("logs/version_0/metrics.csv"))).read_text().splitlines()[0]


def test_a_bundle_that_fine_tuned_below_its_start_is_flagged(tmp_path, monkeypatch, capsys):
    """Lightning keeps the best checkpoint *of the run*; when every one scores below the base
    bundle on a term, the user is told so (and the changelog says it), not left to compare."""
    import volumed.tasks.finetune as ft

    result = ft.FinetuneResult(bundle=tmp_path / "b", version="0.6.0", method="full", terms=["liver", "spleen"], steps=40,
                               stopped_early=True, start_dice={"liver": 0.91, "spleen": 0.40},
                               best_dice={"liver": 0.88, "spleen": 0.75})
    assert result.below_start == ["liver"] and ft.below_start({"a": 0.5}, {"a": 0.5}) == []
    monkeypatch.setattr(ft, "finetune", lambda *a, **k: result)
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "--bundle", str(BUNDLE), "--datalist", str(tmp_path / "d.json"), "--name", "x", "--no-progress"])
    assert exit_info.value.code == 0
    captured = capsys.readouterr()
    assert "liver: 0.910 -> 0.880" in captured.out
    assert "scores below" in captured.err and "for liver:" in captured.err and "spleen" not in captured.err
