"""One registry and one factory for every 3D encoder (timm's ``create_model`` pattern).

An *encoder* is an ``nn.Module`` whose ``forward(x)`` takes ``x`` of shape ``(B, C, X, Y, Z)``
(volumed's axis order: ``Z`` is the slice axis after RAS orientation) and returns a list of
feature maps, finest first. ``module.feature_info`` describes them: one :class:`FeatureInfo` per
returned map, with its channel count and its stride per axis relative to the input.

Every preset takes ``use_checkpoint=True`` (``create_encoder(name, use_checkpoint=True)``, or
``encoder_kwargs: {use_checkpoint: true}`` in a recipe): gradient checkpointing, which recomputes
the encoder's stages or blocks in the backward pass instead of keeping their activations. The
gradients are the same; :mod:`volumed.memory` estimates what it saves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from volumed.errors import ConfigError


@dataclass(frozen=True)
class FeatureInfo:
    """One feature map of an encoder: ``channels`` and ``stride`` ``(sx, sy, sz)`` in voxels."""

    channels: int
    stride: tuple[int, int, int]


@dataclass(frozen=True)
class EncoderSpec:
    """A registered preset: ``builder(in_channels=..., **kwargs)`` returns the encoder module."""

    name: str
    builder: Callable[..., nn.Module]
    family: str
    description: str
    default_kwargs: dict


_REGISTRY: dict[str, EncoderSpec] = {}


def register_encoder(name: str, *, family: str, description: str, **default_kwargs):
    """Decorator registering ``builder`` under ``name`` with preset keyword arguments."""

    def deco(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is registered twice")
        _REGISTRY[name] = EncoderSpec(name, builder, family, description, dict(default_kwargs))
        return builder

    return deco


def _ensure_loaded() -> None:
    # Importing the family modules runs their @register_encoder decorators.
    import volumed.encoders  # noqa: F401


def list_encoders() -> list[str]:
    """Names of all registered presets, sorted."""
    _ensure_loaded()
    return sorted(_REGISTRY)


def get_encoder_spec(name: str) -> EncoderSpec:
    _ensure_loaded()
    if name not in _REGISTRY:
        import difflib

        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown encoder {name!r}.{hint} Known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create_encoder(name: str, in_channels: int = 1, **overrides) -> nn.Module:
    """Build the preset ``name`` with ``in_channels`` input channels; ``overrides`` replace preset kwargs."""
    spec = get_encoder_spec(name)
    kwargs = {**spec.default_kwargs, **overrides}
    return spec.builder(in_channels=in_channels, **kwargs)
