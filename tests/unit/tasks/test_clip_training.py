"""CT-CLIP training on phantom pairs, the package it exports, and `volumed classify` with it."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from volumed.errors import ConfigError, OutputExistsError, VolumedError
from volumed.text.encoder import default_model_available

REPO = Path(__file__).resolve().parents[3]
needs_text = pytest.mark.skipif(not default_model_available(), reason="the default MiniLM text model is not installed")

# The recipe of configs/train_clip-cpu.yaml, smaller: 32 x 32 x 24 phantoms at 9 x 9 x 8 mm (the
# whole field of view), a CT-ViT with 4-voxel patches (8 x 8 x 6 tokens).
DATA = dict(phantom_shape=(32, 32, 24), phantom_spacing=(9.0, 9.0, 8.0), input_size=(32, 32, 24), batch_size=16)
MODEL = dict(encoder="ctvit_tiny", encoder_kwargs={"patch_size": 4, "depth_patch_size": 4}, embed_dim=128,
             findings=["Lung nodule"], input_size=(32, 32, 24))


# The goal's recipe (configs/train_clip-cpu.yaml, docs/clip.md "Phantom result"): the 3 mm chest
# cohort (nodules >= 20 mm, 3-7 voxels), the plain CNN with max pooling, negated sentences dropped.
GOAL_DATA = dict(phantom_shape=(96, 96, 64), phantom_spacing=(3.0, 3.0, 3.0), phantom_field_of_view="chest",
                 min_nodule_mm=20.0, input_size=(80, 64, 48), batch_size=16, negated="drop")
GOAL_STEPS = 300  # the recipe's (configs/train_clip-cpu.yaml); 150 steps of a 150-step schedule gave 0.73
GOAL_MODEL = dict(encoder="cnn_tiny", pooling="max", embed_dim=128, findings=["Lung nodule"], input_size=(80, 64, 48),
                  negated="drop")


def _fit(max_steps: int, phantom_cases: int, phantom_val_cases: int, tmp_path: Path, shuffle_reports: bool = False,
         data: dict | None = None, model: dict | None = None):
    from volumed.tasks.clip import ClipDataModule, ClipModule

    torch.set_num_threads(1)
    L.seed_everything(0)
    dm = ClipDataModule(phantom_cases=phantom_cases, phantom_val_cases=phantom_val_cases, **(data or DATA))
    dm.setup("fit")
    if shuffle_reports:  # the control: reports that do not describe their volume
        perm = torch.randperm(len(dm.train_set.reports), generator=torch.Generator().manual_seed(1))
        dm.train_set.reports = [dm.train_set.reports[i] for i in perm]
        dm.train_set.texts = dm.train_set.texts[perm]
    module = ClipModule(**(model or MODEL), lr=3e-3, warmup_steps=5)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        check_val_every_n_epoch=10_000, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    return dm, module


def _held_out_auroc(dm, module) -> float:
    from volumed.heads.clip import zero_shot_probabilities
    from volumed.metrics.classification import score_binary
    from volumed.text.labels import label_report

    module.eval()
    present, absent = module._prompts
    with torch.no_grad():
        images = torch.stack([dm.val_set[i]["image"] for i in range(len(dm.val_set))])
        p = zero_shot_probabilities(module.net.embed_image(images), module.net.embed_text(present),
                                    module.net.embed_text(absent), module.net.scale)[:, 0]
    labels = [label_report(r).labels["Lung nodule"] for r in dm.val_set.reports]
    assert 0 < sum(labels) < len(labels)  # held-out phantoms of both classes
    return float(score_binary("Lung nodule", p, labels).auroc)


def test_train_clip_command_parses(capsys):
    from volumed.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "clip", "--config", str(REPO / "configs" / "train_clip-cpu.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    # The recipe's keys all exist; the model's input size, text model and negation are linked to
    # the data's, so they are printed once, under data.
    assert "  input_size:\n  - 80\n  - 64\n  - 48\n" in printed and printed.count("input_size:") == 1
    assert printed.count("negated: drop") == 1
    assert "encoder: cnn_tiny" in printed and "phantom_cases: 192" in printed and "pooling: max" in printed


def test_data_module_needs_data():
    from volumed.tasks.clip import ClipDataModule, fit_to_size

    with pytest.raises(ConfigError, match="datalist"):
        ClipDataModule(datalist=None, phantom_cases=0)
    with pytest.raises(ConfigError, match="phantom_report"):
        ClipDataModule(phantom_report="long")
    with pytest.raises(ConfigError, match="data.negated"):
        ClipDataModule(negated="ignore")
    x = torch.arange(2 * 6 * 4 * 2, dtype=torch.float32).reshape(2, 6, 4, 2)
    y = fit_to_size(x, (4, 6, 2))
    assert y.shape == (2, 4, 6, 2) and torch.equal(y[:, :, 1:5], x[:, 1:5])  # central crop along x, air-padded y
    assert float(y[:, :, 0].abs().sum()) == 0.0


@needs_text
def test_short_training_exports_a_package_that_classify_reads(tmp_path):
    from volumed.cli import main
    from volumed.data.phantoms import make_case
    from volumed.inference.classify import classify
    from volumed.io.writer import write_nifti
    from volumed.text.labels import ABNORMALITIES

    dm, module = _fit(3, 8, 0, tmp_path)
    assert dm.train_set.texts.shape == (8, 384) and dm.train_set[0]["image"].shape == (1, 32, 32, 24)
    pkg = module.export_package(tmp_path / "pkg", {"steps": 3})
    cfg = json.loads((pkg / "clip.json").read_text())
    assert cfg["input_size"] == [32, 32, 24] and cfg["text_model_hash"] and cfg["training"]["steps"] == 3

    # A volume twice the input size along z is embedded in two tiles, not resized.
    case = make_case(5, shape=(32, 32, 48), spacing=(9.0, 9.0, 4.0))
    image = tmp_path / "ct.nii.gz"
    write_nifti(case.image, image, dtype=np.int16)
    out = tmp_path / "out.json"
    result = classify(image, ["Liver cyst", "lung nodule"], model_dir=pkg, output=out)
    names = [f.finding for f in result.findings]
    assert names == ["Lung nodule", "Liver cyst"]  # the package's list, then the new user finding only
    assert result.tiles == 2 and result.model_shape == (32, 32, 48)
    saved = json.loads(out.read_text())
    assert [f["finding"] for f in saved["findings"]] == names
    assert all(0.0 <= f["probability"] <= 1.0 for f in saved["findings"])
    assert saved["findings"][1]["present_prompt"] == "Liver cyst is present." and saved["findings"][1]["source"] == "user"
    with pytest.raises(OutputExistsError):
        classify(image, model_dir=pkg, output=out)
    with pytest.raises(VolumedError):  # the reader's error for a missing image, before any network work
        classify(tmp_path / "missing.nii.gz", model_dir=pkg)
    with pytest.raises(ConfigError, match="clip.json"):
        classify(image, model_dir=tmp_path)
    # The command: a table on stdout, the JSON file; a package without findings lists CT-RATE's 18.
    code = None
    try:
        main(["classify", str(image), "--model", str(pkg), "--finding", "Renal cyst", "-o", str(tmp_path / "cli.json")])
    except SystemExit as err:
        code = err.code
    assert code in (None, 0)
    assert json.loads((tmp_path / "cli.json").read_text())["findings"][-1]["finding"] == "Renal cyst"
    assert len(ABNORMALITIES) == 18


@pytest.mark.slow
@needs_text
def test_held_out_phantom_zero_shot_auroc_reaches_0_9(tmp_path):
    """After a short CPU training, zero-shot "Lung nodule" AUROC >= 0.9 on held-out phantoms
    (phantom_seed + 1), and the controls stay below: untrained, and trained on shuffled reports."""
    dm, module = _fit(GOAL_STEPS, 192, 32, tmp_path, data=GOAL_DATA, model=GOAL_MODEL)
    trained = _held_out_auroc(dm, module)
    from volumed.tasks.clip import ClipModule

    L.seed_everything(0)
    module0 = ClipModule(**GOAL_MODEL)
    module0.finding_names, module0._prompts = module.finding_names, module._prompts
    untrained = _held_out_auroc(dm, module0)
    dm_s, module_s = _fit(GOAL_STEPS, 192, 32, tmp_path, shuffle_reports=True, data=GOAL_DATA, model=GOAL_MODEL)
    shuffled = _held_out_auroc(dm_s, module_s)
    assert untrained < 0.9 and shuffled < 0.9, (untrained, shuffled)
    assert trained >= 0.9, f"held-out zero-shot AUROC {trained:.3f} (untrained {untrained:.3f}, shuffled {shuffled:.3f})"


CLIP_BUNDLE = REPO / "bundles" / "volumed_clip_ct" / "models"


@needs_text
@pytest.mark.skipif(not (CLIP_BUNDLE / "model.safetensors").is_file(), reason="no CLIP bundle weights")
@pytest.mark.parametrize("seed", [1, 2])
def test_the_shipped_bundle_separates_held_out_nodule_phantoms(seed):
    """Issue 19 item 4 on the CPU-trained bundle (configs/train_clip-cpu.yaml, 8 minutes, trained on
    seed 0's cohort), as `volumed classify` scores an image (ClipClassifier: the package's
    preprocessing, tiles, prompt pair): zero-shot "Lung nodule" AUROC >= 0.9 on 32 held-out
    phantoms of the recipe's chest cohort. Seed 1 is the run's validation cohort, seed 2 one no run
    has seen (measured: 1.000 on both)."""
    import yaml

    from volumed.data.report_phantoms import make_report_cohort
    from volumed.inference.classify import ClipClassifier
    from volumed.metrics.classification import score_binary

    assert json.loads((CLIP_BUNDLE / "clip.json").read_text())["training"]["data"] == "phantom report cohort(n=192, seed=0)"
    data = yaml.safe_load((REPO / "configs" / "train_clip-cpu.yaml").read_text())["data"]
    cohort = make_report_cohort(32, seed, shape=data["phantom_shape"], spacing=data["phantom_spacing"],
                                min_nodule_mm=data["min_nodule_mm"], field_of_view=data["phantom_field_of_view"])
    classifier = ClipClassifier.from_package(CLIP_BUNDLE)
    probs = [float(classifier.probabilities(classifier.model_image(p.case.image), ["Lung nodule"])[0][0]) for p in cohort]
    labels = [p.nodule for p in cohort]
    assert sum(labels) == 16
    assert score_binary("Lung nodule", probs, labels).auroc >= 0.9
