"""bench/bench_generalisation.py: the Dice of what `volumed segment --all` writes, and earlier
trainings of a run kept as repeats instead of being overwritten."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

import bench_generalisation  # noqa: E402

TERMS = ["liver", "aorta", "spleen", "stomach", "colon", "kidney_left"]


@pytest.mark.realdata
def test_evaluate_scores_the_masks_volumed_segment_all_writes(make_tiny_package, tmp_path, ts_dir):
    from volumed.inference.segment import segment
    from volumed.io import read_volume

    package = make_tiny_package(tmp_path, TERMS)
    scores = bench_generalisation.evaluate(package, ("dicom_slab",))["dicom_slab"]
    src = bench_generalisation._sources()["dicom_slab"]
    volume = read_volume(src.image, modality=src.modality)
    refs = bench_generalisation.reference_masks(src, volume, TERMS)
    scored = sorted(t for t in TERMS if t in refs and refs[t].sum() * np.prod(volume.spacing) / 1000 >= 1.0)
    assert sorted(scores["dice"]) == sorted(scores["dice_segment"]) == scored and len(scored) >= 4
    # The second figure is that of the files `volumed segment --all` writes, structure by structure.
    segment(src.image, [], all_terms=True, model_dir=package, out_dir=tmp_path / "out", progress=False)
    for t in scored:
        written = np.asarray(nib.load(str(tmp_path / "out" / "masks" / f"{t}.nii.gz")).dataobj).astype(bool)
        if written.shape != refs[t].shape:  # the slab's masks are written in the series' own order
            pytest.fail(f"{t}: written {written.shape}, reference {refs[t].shape}")
        assert scores["dice_segment"][t] == pytest.approx(bench_generalisation.dice(written, refs[t]), abs=1e-6)
    # The untrained network marks scattered fragments: post-processing changes some figure.
    assert any(abs(scores["dice"][t] - scores["dice_segment"][t]) > 1e-4 for t in scored)


def test_a_retrained_run_keeps_its_earlier_result_as_a_repeat(tmp_path, monkeypatch):
    results = tmp_path / "results"
    monkeypatch.setattr(bench_generalisation, "RESULTS", results)
    runs = tmp_path / "runs"
    (runs / "synthetic_only" / "package").mkdir(parents=True)
    (runs / "synthetic_only" / "package" / "model.safetensors").write_bytes(b"")
    info = {"steps": 100, "fit_wall_minutes": 1.0, "overrides": "", "parameters": 10}
    dice = {"value": 0.5}

    def fake_evaluate(package, scans, **kwargs):
        return {s: {"dice": {"liver": dice["value"]}, "too_small": {}, "seconds": 0.1} for s in scans}

    monkeypatch.setattr(bench_generalisation, "evaluate", fake_evaluate)
    monkeypatch.setattr(bench_generalisation, "run_info", lambda package: dict(info))
    monkeypatch.setattr(bench_generalisation, "baselines", lambda scans: {})
    argv = ["--variant", "M-hw", "--runs", str(runs), "--only", "synthetic_only", "--output", str(tmp_path / "B.md")]

    def stored() -> dict:
        return json.loads((results / "generalisation_M-hw.json").read_text())

    bench_generalisation.main(argv)
    assert "repeats" not in stored()
    bench_generalisation.main(argv)  # evaluated again, the same training: overwritten, no repeat
    assert "repeats" not in stored()
    info["steps"], dice["value"] = 200, 0.7  # trained again
    bench_generalisation.main(argv)
    doc = stored()
    assert doc["results"]["synthetic_only"]["run"]["steps"] == 200
    assert [r["run"]["steps"] for r in doc["repeats"]["synthetic_only"]] == [100]
    assert doc["repeats"]["synthetic_only"][0]["scans"]["example_ct_sm"]["dice"]["liver"] == 0.5
    text = (tmp_path / "B.md").read_text()
    assert "M-hw, synthetic CTs only (100 steps, repeat 1 of 2)" in text
    assert "M-hw, synthetic CTs only (200 steps, repeat 2 of 2)" in text


def test_the_recipe_table_shows_the_written_figure_where_it_differs(tmp_path, monkeypatch):
    """The comparison table gives each fold's raw Dice and, in brackets, the Dice of the masks as
    `volumed segment --all` writes them where that differs (a lobe the outline and the atlas
    place), so a reader sees what a user gets."""
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(bench_generalisation, "RESULTS", results)
    fold = {"scans": {"tcia_ccth_a01": {"dice": {"liver": 0.836, "lung_upper_lobe_right": 0.0},
                                        "dice_segment": {"liver": 0.836, "lung_upper_lobe_right": 0.726},
                                        "too_small": {}, "seconds": 1.0}},
            "run": {"steps": 700}, "evaluated": "2026-12-06"}
    (results / "generalisation_M-hw-ft.json").write_text(json.dumps({"results": {"loso_tcia_ccth_a01": fold}}))
    table = bench_generalisation.comparison({})
    rows = {line.split(" | ")[1]: line for line in table.splitlines() if line.startswith("| tcia_ccth_a01 |")}
    assert "| 0.000 (0.726) |" in rows["lung_upper_lobe_right"]
    assert "| **0.836** |" in rows["liver"] and "(" not in rows["liver"]
    assert "evaluated 2026-12-06" in bench_generalisation.report({"loso_tcia_ccth_a01": fold}, {}, "M-hw-ft")


def test_the_recipe_table_prints_a_folds_earlier_trainings(tmp_path, monkeypatch):
    """A fold trained again (another seed) keeps its earlier result under "repeats"; the comparison
    table prints those after "before:", since one seed moved a kidney by 0.35 (round 22)."""
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(bench_generalisation, "RESULTS", results)

    def fold(kidney):
        return {"scans": {"example_ct_sm": {"dice": {"kidney_left": kidney}, "dice_segment": {"kidney_left": kidney},
                                            "too_small": {}, "seconds": 1.0}}, "run": {"steps": 700}}

    doc = {"results": {"loso_example_ct_sm": fold(0.588)}, "repeats": {"loso_example_ct_sm": [fold(0.241)]}}
    (results / "generalisation_M-hw-ft-sb5.json").write_text(json.dumps(doc))
    table = bench_generalisation.comparison({})
    row = next(line for line in table.splitlines() if line.startswith("| example_ct_sm | kidney_left |"))
    assert "| 0.588; before: 0.241 |" in row


def test_a_fine_tuning_variant_has_no_synthetic_only_run():
    """A recipe that mixes real and synthetic patches cannot train without real CTs: the bench
    neither trains such a run (it failed at once) nor lists it as not run."""
    assert [r.name for r in bench_generalisation.runs("M-hw")][-1] == "synthetic_only"
    for variant in ("M-hw-ft", "M-ft2", "S-ft"):
        names = [r.name for r in bench_generalisation.runs(variant)]
        assert names == [f"loso_{s}" for s in bench_generalisation.SCANS], (variant, names)
    text = bench_generalisation.report({}, {}, "M-hw-ft")
    assert "`loso_tcia_ccth_a01`" in text and "synthetic_only" not in text
