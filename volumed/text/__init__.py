"""volumed.text: offline text encoders for anatomy prompts (MiniLM default, any local HF folder)."""

from volumed.text.encoder import (
    MODALITIES,
    ModalityConditionedText,
    TextEncoder,
    default_cache_dir,
    default_model_available,
    default_model_dir,
    modality_ids,
    model_hash,
)

__all__ = [
    "MODALITIES",
    "ModalityConditionedText",
    "TextEncoder",
    "default_cache_dir",
    "default_model_available",
    "default_model_dir",
    "modality_ids",
    "model_hash",
]
