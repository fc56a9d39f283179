"""Training of the grounding head on phantom finding sentences, and its held-out evaluation."""

from __future__ import annotations

import json

from pathlib import Path

import lightning as L
import pytest
import torch

from volumed.data.grounding_datalist import load_grounding_datalist
from volumed.data.grounding_phantoms import write_grounding_phantoms
from volumed.errors import ConfigError
from volumed.inference.ground import GroundingPredictor, evaluate_grounding
from volumed.tasks.ground import (
    GroundingDataModule,
    GroundingModule,
    GroundingPatchDataset,
)

REPO = Path(__file__).resolve().parents[3]
ANATOMY = REPO / "bundles" / "volumed_promptseg_ct" / "models"
GROUND = REPO / "bundles" / "volumed_ground_ct" / "models"
TINY = dict(encoder_kwargs={"strides": [[2, 2, 2], [2, 2, 2], [2, 2, 1], [2, 2, 1], [1, 1, 1]]},
            decoder_kwargs={"embed_dim": 32, "num_layers": 1, "num_heads": 4, "pixel_dim": 16, "num_memory_levels": 2})
SHAPE, SPACING = (48, 48, 32), (6.0, 6.0, 6.0)  # the whole phantom field of view at 6 mm


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ground")
    train = write_grounding_phantoms(root / "train", 4, 0, shape=SHAPE, spacing=SPACING)
    test = write_grounding_phantoms(root / "test", 2, 1, shape=SHAPE, spacing=SPACING)
    return train, test


def test_patches_carry_the_sentences_whose_finding_they_hold_first(phantoms):
    dm = GroundingDataModule(str(phantoms[0]), target_spacing=SPACING, patch_size=(32, 32, 16))
    dm.setup("fit")
    case = dm.cases[0]
    assert not any(q.negated for q in case.queries)  # negated sentences never reach the model
    assert case.masks.shape[0] == len(case.queries) == case.sentence.shape[0] and case.sentence.shape[1] == 384
    ds = GroundingPatchDataset(dm.cases, (32, 32, 16), fg_rate=1.0, queries_per_patch=3, samples=30)
    for i in range(30):
        item = ds[i]
        assert item["image"].shape == (1, 32, 32, 16) and item["target"].shape == (3, 32, 32, 16)
        present = item["target"].flatten(1).amax(1) > 0
        assert present[0], "fg_rate=1: a finding in every patch, and its sentence comes first"
        assert present.tolist() == sorted(present.tolist(), reverse=True)
    with pytest.raises(ConfigError, match="datalist"):
        GroundingDataModule(None)


def test_anatomy_sentences_come_after_the_findings_and_train_the_location_query(tmp_path):
    path = write_grounding_phantoms(tmp_path / "a", 2, 0, shape=SHAPE, spacing=SPACING, anatomy=9)
    dm = GroundingDataModule(str(path), target_spacing=SPACING, patch_size=(32, 32, 16))
    dm.setup("fit")
    assert all(c.anatomy.sum() >= 5 and not c.anatomy[0] for c in dm.cases)
    ds = GroundingPatchDataset(dm.cases, (32, 32, 16), fg_rate=1.0, queries_per_patch=4, samples=30, anatomy_per_patch=1)
    for i in range(30):
        item = ds[i]
        anatomy, present = item["anatomy"], item["target"].flatten(1).amax(1) > 0
        assert present[0] and not anatomy[0], "the patch is centred on a finding, whose sentence comes first"
        # At most one distinct organ sentence (a short case repeats its sentences to fill the patch).
        assert len({tuple(row[:8].tolist()) for row in item["sentence"][anatomy]}) <= 1
        assert torch.all(present[anatomy]), "an anatomy sentence comes only with its organ in the patch"
    # The loss reaches an anatomy sentence's location query (and only through it).
    module = GroundingModule(encoder="stunet_tiny", **TINY, pos_weight=10.0, patch_size=(32, 32, 16))
    batch = {k: v[None] for k, v in ds[0].items()}
    assert bool(batch["anatomy"].any())
    module.compute_loss(batch).loss.backward()
    grad = module.net.location.location_proj.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0


def test_pos_weight_voxels_raises_only_a_small_findings_positive_weight(monkeypatch):
    """A finding of 2 voxels weighs as much as one of pos_weight_voxels (8); a 16-voxel finding
    keeps pos_weight; an anatomy sentence's organ keeps weight 1 (gradients at logit 0)."""
    module = GroundingModule(**TINY, pos_weight=10.0, pos_weight_voxels=8, patch_size=(8, 8, 8))
    logits = torch.zeros(1, 3, 8, 8, 8, requires_grad=True)
    target = torch.zeros(1, 3, 8, 8, 8)
    target[0, 0, :2, 0, 0] = 1  # 2 voxels
    target[0, 1, :4, :4, 0] = 1  # 16 voxels
    target[0, 2, :2, 0, 0] = 1  # an organ, 2 voxels
    monkeypatch.setattr(module, "forward", lambda *args, **kwargs: logits)
    batch = {"image": torch.zeros(1, 1, 8, 8, 8), "sentence": torch.zeros(1, 3, 4), "location": torch.zeros(1, 3, 4),
             "has_location": torch.ones(1, 3, dtype=torch.bool), "modality": torch.zeros(1, dtype=torch.long),
             "anatomy": torch.tensor([[False, False, True]]), "target": target}
    module.compute_loss(batch).bce.backward()
    n = logits.numel()
    # d/dx of -w*log(sigmoid(x)) at x = 0 is -w/2, over the mean's n voxels.
    assert float(logits.grad[0, 0, 0, 0, 0]) == pytest.approx(-10.0 * 8 / 2 / 2 / n)
    assert float(logits.grad[0, 1, 0, 0, 0]) == pytest.approx(-10.0 / 2 / n)
    assert float(logits.grad[0, 2, 0, 0, 0]) == pytest.approx(-1.0 / 2 / n)
    assert float(logits.grad[0, 0, 5, 5, 5]) == pytest.approx(0.5 / n)  # background unchanged
    with pytest.raises(ConfigError, match="pos_weight_voxels"):
        GroundingModule(**TINY, pos_weight_voxels=8)


def test_phantom_training_lowers_the_loss_and_exports_a_package_that_grounds(phantoms, tmp_path):
    L.seed_everything(0)
    dm = GroundingDataModule(str(phantoms[0]), target_spacing=SPACING, patch_size=(32, 32, 16), batch_size=2,
                             fg_rate=0.9, samples_per_epoch=60)
    module = GroundingModule(**TINY, lr=3e-3, pos_weight=10.0, overlap=0.0, patch_size=(32, 32, 16))
    dm.setup("fit")
    fixed = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        before = float(module.compute_loss(fixed).loss)
    trainer = L.Trainer(max_steps=30, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    with torch.no_grad():
        after = float(module.compute_loss(fixed).loss)
    assert after < before, (before, after)
    pkg = module.export_package(tmp_path / "pkg", {"steps": 30})
    predictor = GroundingPredictor.from_package(pkg)
    assert predictor.config.preprocessing["target_spacing"] == list(SPACING)
    assert set(predictor.grounding.finding_types) <= {"nodule", "lesion", "cyst"} and predictor.grounding.locations
    metrics, rows = evaluate_grounding(predictor, load_grounding_datalist(phantoms[1]))
    assert metrics.n_present > 0 and metrics.n_absent > 0 and len(rows) == metrics.n_present + metrics.n_absent
    assert 0.0 <= metrics.hit_rate <= 1.0 and 0.0 <= metrics.false_positive_rate <= 1.0
    negated = [s for _, text, s in rows if text.startswith("No ")]
    assert negated and not any(s.false_positive for s in negated)  # never predicted
    # The command: the same scores as a table and a JSON record, one row per finding.
    from volumed.cli import main

    out = tmp_path / "scores.json"
    args = ["evaluate-grounding", str(phantoms[1]), "--model", str(pkg), "--section", "training", "-o", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code in (0, None)
    record = json.loads(out.read_text())
    assert record["summary"]["n_present"] == metrics.n_present and record["summary"]["n_absent"] == metrics.n_absent
    assert record["summary"]["hit_rate"] == pytest.approx(metrics.hit_rate)
    assert len(record["findings"]) == len(rows) and {"text", "dice", "hit", "false_positive"} <= set(record["findings"][0])
    with pytest.raises(SystemExit) as exit_info:  # an existing output is refused
        main(args)
    assert exit_info.value.code == 2


def test_train_ground_command_parses(capsys):
    from volumed.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "ground", "--data.phantoms", "2", "--trainer.max_steps", "5", "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "phantoms: 2" in printed and "pos_weight: null" in printed
    # The shipped recipe: every key is an argument of GroundingModule / GroundingDataModule.
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "ground", "--config", str(REPO / "configs" / "train_ground-cpu.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "pos_weight: 100.0" in printed and "init_weights: bundles/volumed_promptseg_ct/models/model.safetensors" in printed
    assert "phantom_anatomy: 9" in printed


def test_the_recipe_is_the_anatomy_models_network_plus_the_stride_1_level():
    """configs/train_ground-cpu.yaml starts from the default segmenter's weights: its encoder and
    decoder must be that network's (else the weights do not load), with the stride-1 level added;
    the FPN weights then land on their own levels (fpn_level_key_map), only level 0's lateral new."""
    import yaml

    from volumed.encoders.weights import load_encoder_weights
    from volumed.tasks.ground import GroundingModule, _fpn_key_map

    recipe = yaml.safe_load((REPO / "configs" / "train_ground-cpu.yaml").read_text())["model"]
    anatomy = json.loads((ANATOMY / "config.json").read_text())
    assert recipe["encoder"] == anatomy["encoder"] and recipe["encoder_kwargs"] == anatomy["encoder_kwargs"]
    levels = recipe["decoder_kwargs"]["pixel_levels"]
    assert levels[0] == 0 and levels[1:] == anatomy["decoder_kwargs"]["pixel_levels"]
    assert {k: v for k, v in recipe["decoder_kwargs"].items() if k != "pixel_levels"} == \
        {k: v for k, v in anatomy["decoder_kwargs"].items() if k != "pixel_levels"}
    module = GroundingModule(encoder=recipe["encoder"], encoder_kwargs=recipe["encoder_kwargs"],
                             decoder_kwargs=recipe["decoder_kwargs"])
    weights = str(ANATOMY / "model.safetensors")
    report = load_encoder_weights(module.net, weights, key_map=_fpn_key_map(weights, module.net.segmenter.decoder), strict=False)
    assert report.mismatched == [] and report.unexpected == []
    assert sorted(k for k in report.missing if k.startswith("segmenter.")) == [
        "segmenter.decoder.fpn.inner_blocks.0.bias", "segmenter.decoder.fpn.inner_blocks.0.weight"]
    # The same levels: names as they are; a bare weights file (no config.json beside it): the same.
    same = GroundingModule(encoder=recipe["encoder"], encoder_kwargs=recipe["encoder_kwargs"],
                           decoder_kwargs=anatomy["decoder_kwargs"])
    assert _fpn_key_map(weights, same.net.segmenter.decoder) is None


def test_fpn_key_map_refuses_weights_whose_memory_levels_cannot_be_placed(tmp_path):
    from volumed.errors import ConfigError
    from volumed.tasks.ground import GroundingModule, _fpn_key_map

    anatomy = json.loads((ANATOMY / "config.json").read_text())
    anatomy["decoder_kwargs"]["num_memory_levels"] = 3  # the recipe's decoder reads 2
    (tmp_path / "config.json").write_text(json.dumps(anatomy))
    module = GroundingModule(encoder=anatomy["encoder"], encoder_kwargs=anatomy["encoder_kwargs"],
                             decoder_kwargs={**anatomy["decoder_kwargs"], "num_memory_levels": 2, "pixel_levels": [0, 1, 2, 3, 4, 5]})
    with pytest.raises(ConfigError, match="memory level") as info:
        _fpn_key_map(str(tmp_path / "model.safetensors"), module.net.segmenter.decoder)
    assert "config.json" in str(info.value)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable model config"):
        _fpn_key_map(str(tmp_path / "model.safetensors"), module.net.segmenter.decoder)
    assert _fpn_key_map(str(tmp_path / "bare" / "weights.pt"), module.net.segmenter.decoder) is None


@pytest.mark.slow
@pytest.mark.skipif(not (ANATOMY / "model.safetensors").is_file(), reason="no anatomy model in bundles/ to start from")
def test_the_recipes_first_phase_grounds_most_held_out_lesions(tmp_path):
    """The first of `make train-ground`'s five phases, configs/train_ground-cpu.yaml from the
    default segmenter's weights (8000 steps: 55-80 minutes on two cores), finds most held-out
    phantom lesions: measured 18 of 22 on seed 1 (0.82; 160 of 189 over the five held-out sets)
    from segmenter 0.8.0 in 7684 steps, 0.77 from segmenter 0.5.0. The issue's 0.9 takes all five
    phases; the shipped bundle's figures are asserted by
    test_the_shipped_bundle_hits_0_9_of_held_out_phantom_lesions."""
    import yaml

    recipe = yaml.safe_load((REPO / "configs" / "train_ground-cpu.yaml").read_text())
    model, data = dict(recipe["model"]), dict(recipe["data"])
    model["init_weights"] = str(REPO / model["init_weights"])
    test = write_grounding_phantoms(tmp_path / "test", 10, 1)
    L.seed_everything(recipe["seed_everything"])
    dm = GroundingDataModule(phantom_dir=str(tmp_path / "train"), **data)
    module = GroundingModule(**model, patch_size=tuple(data["patch_size"]))
    L.Trainer(max_steps=recipe["trainer"]["max_steps"], accelerator="cpu", logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path).fit(module, datamodule=dm)
    predictor = GroundingPredictor.from_package(module.export_package(tmp_path / "pkg"))
    metrics, _ = evaluate_grounding(predictor, load_grounding_datalist(test))
    assert metrics.n_present == 22 and metrics.hit_rate >= 0.7


@pytest.mark.skipif(not (GROUND / "model.safetensors").is_file(), reason="no grounding bundle weights")
@pytest.mark.parametrize("seed, n_cases, lesions", [(9, 30, 67), (1, 10, 22)], ids=["seed9", "seed1"])
def test_the_shipped_bundle_hits_0_9_of_held_out_phantom_lesions(tmp_path, seed, n_cases, lesions):
    """Issue 19 item 3 on the CPU-trained bundle (`make train-ground`'s five phases) as `volumed
    ground` runs it (default search regions from the default segmenter), on phantoms of seeds it
    never trained on: 30 cases of seed 9 (67 lesions; bundle 0.6.0 with segmenter 0.8.0: 65 hit,
    24 of 90 sentences about a lesion-free organ answered with a mask), and the 10 of seed 1 that
    every grounding model has been scored on since 0.2.0 (22 lesions; 20 hit, 4 of 30)."""
    assert seed not in json.loads((GROUND / "grounding.json").read_text())["training"]["phantom_seeds"]
    cases = load_grounding_datalist(write_grounding_phantoms(tmp_path, n_cases, seed))
    metrics, _ = evaluate_grounding(GroundingPredictor.from_package(GROUND), cases)
    # One negated and two absent sentences per case.
    assert metrics.n_present == lesions and metrics.n_absent == 3 * n_cases
    assert metrics.hit_rate >= 0.9
    assert metrics.false_positive_rate <= 0.3 and metrics.mean_dice >= 0.7


def test_input_windows_start_from_a_package_unchanged_and_travel_in_its_config(tmp_path):
    """A soft-tissue window as a second input channel (--model.input_windows): loaded from a
    package without it, the network answers as the package does (the new channel starts at zero
    weight), and the exported package rebuilds the windowed network from its config.json."""
    from volumed.heads.grounding import load_grounding_package
    from volumed.inference.package import PromptSegConfig

    torch.manual_seed(0)
    plain = GroundingModule(**TINY, patch_size=(32, 32, 16))
    plain.model_config.preprocessing = {"ct_window": [-1000.0, 1000.0]}
    src = plain.export_package(tmp_path / "plain")
    windowed = GroundingModule(**TINY, patch_size=(32, 32, 16), init_weights=str(src / "model.safetensors"),
                               input_windows=[[-160, 240]])
    image = torch.rand(1, 1, 64, 64, 32)
    s, loc, has = torch.randn(2, 384), torch.randn(2, 384), torch.tensor([True, False])
    with torch.no_grad():
        torch.testing.assert_close(windowed.net.eval()(image, s, loc, has), plain.net.eval()(image, s, loc, has))
    windowed.model_config.preprocessing = {"ct_window": [-1000.0, 1000.0]}
    pkg = windowed.export_package(tmp_path / "windowed")
    assert json.loads((pkg / "config.json").read_text())["input_windows"] == [[-160.0, 240.0]]
    model, config, _ = load_grounding_package(pkg)
    assert config.input_windows == [[-160.0, 240.0]] and model.segmenter.input_windows.windows == ((-160.0, 240.0),)
    first = next(k for k, v in model.state_dict().items() if v.ndim >= 3)
    assert model.state_dict()[first].shape[1] == 2
    with pytest.raises(ConfigError, match="input_windows"):
        PromptSegConfig.from_dict({"encoder": "stunet_tiny", "input_windows": [[240, -160]]})


def _flags(command: str) -> dict[str, str]:
    """``--key value`` pairs of a `volumed train ground` command line (backslash continuations joined)."""
    words = command.replace("\\\n", " ").split()
    return {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}


@pytest.mark.skipif(not (GROUND / "grounding.json").is_file(), reason="no grounding bundle record")
def test_make_train_ground_runs_the_phases_the_shipped_bundle_records():
    """`make train-ground` must retrain what ships: five phases of the recipe, each from the weights
    of the one before, the last two with the hyperparameters and phantom sets that
    `models/grounding.json` records for bundle 0.6.0's own last two runs (their output folders,
    thread counts and time limits aside), then the bundle and the bench."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    printed = subprocess.run(["make", "-n", "-o", "venv", "-o", ".venv/bin/.installed", "train-ground", "RUNS=r"],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
    phases = [_flags(line) for line in printed.replace("\\\n", " ").splitlines() if "train ground" in line]
    assert len(phases) == 5
    assert all(p["--config"] == "configs/train_ground-cpu.yaml" for p in phases)
    assert "--model.init_weights" not in phases[0]  # the recipe's own start: the default segmenter
    for k in range(1, 5):
        assert phases[k]["--model.init_weights"] == f"{phases[k - 1]['--out']}/package/model.safetensors"
    record = json.loads((GROUND / "grounding.json").read_text())["training"]
    ignore = {"--out", "--model.init_weights", "--num_threads", "--trainer.max_time"}
    for phase, run in ((phases[3], record["previous_stage"]), (phases[4], record)):
        recorded = {k: v for k, v in _flags(run["command"]).items() if k not in ignore}
        assert {k: v for k, v in phase.items() if k not in ignore} == recorded
    assert f"--from-checkpoint {phases[4]['--out']}/package" in printed and "bench_grounding_findings.py" in printed
