"""``volumed.bundle.load(path)``: a checked bundle as a Python object."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from volumed.errors import ConfigError

__all__ = ["Bundle", "load", "INFERENCE_CONFIG"]

INFERENCE_CONFIG = "configs/inference.json"


@dataclass
class Bundle:
    """A loaded bundle.

    Attributes:
        root: the bundle folder.
        metadata: ``configs/metadata.json`` (valid against the project's schema).
        version: the bundle's version.
        network: the network with the bundle's weights, eval mode, on the requested device.
        config: the model package's config (``models/config.json``: preprocessing, patch, terms; for
            a CT-CLIP bundle ``models/clip.json``).
        hashes: ``{path relative to root: sha256}`` of the weights as checked.
        warnings: e.g. a MONAI minor version other than the bundle's.
    """

    root: Path
    metadata: dict
    version: str
    network: torch.nn.Module
    config: object
    hashes: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def inference_config(self) -> Path:
        """``configs/inference.json`` (what ``python -m monai.bundle run`` and ``volumed run`` execute)."""
        return self.root / INFERENCE_CONFIG

    @property
    def labels(self) -> list[str]:
        """Names of the network's output channels for the default prompts (``channel_def``)."""
        from volumed.bundle.metadata import channel_names

        return channel_names(self.metadata)


def check_bundle(path: str | Path, *, strict_monai: bool = False) -> tuple[Path, dict, list[str], dict[str, str]]:
    """The cheap checks of :func:`load`, without building the network: the folder and its
    ``configs/inference.json``, the metadata against the schema, MONAI's version, the weights' sha256.

    Returns ``(root, metadata, warnings, hashes)``. Raises ``ConfigError`` / ``WeightsLoadError``
    naming the file and the problem.
    """
    from volumed.bundle.integrity import RECORD_NAME, weight_files, check_monai_version, verify_hashes
    from volumed.bundle.metadata import validate_metadata

    root = Path(path)
    if not root.is_dir():
        raise ConfigError("not a bundle folder (it does not exist or is a file)", root)
    if not (root / INFERENCE_CONFIG).is_file():
        raise ConfigError(f"not a runnable bundle: {INFERENCE_CONFIG} is missing", root)
    metadata = validate_metadata(root)
    warning = check_monai_version(metadata, strict=strict_monai)
    if not (root / RECORD_NAME).exists() and not weight_files(root):
        raise ConfigError(
            f"this bundle ships configs only: no trained weights under models/ and no {RECORD_NAME}. Train it with "
            f"its configs/train.json, put the weights in models/ and record them with `volumed bundle hash {root}`",
            root,
        )
    records = verify_hashes(root)
    return root, metadata, [warning] if warning else [], {r.path: r.sha256 for r in records}


def _network(model_dir: Path, config, build_model) -> torch.nn.Module:
    """The untrained network of a bundle's ``models/``: a grounding package (``grounding.json``)
    gives a :class:`~volumed.heads.grounding.GroundingModel`, a segmentation package its segmenter."""
    from volumed.heads.grounding import is_grounding_package

    if is_grounding_package(model_dir):
        from volumed.bundle.ground import network_from_package

        return network_from_package(model_dir)
    return build_model(config)


def load(path: str | Path, *, device: str | torch.device = "cpu", strict_monai: bool = False) -> Bundle:
    """Check a bundle and load its network.

    Checks, in order, before any weight is read: the folder holds ``configs/inference.json`` and a
    ``configs/metadata.json`` valid against the project's schema; the installed MONAI matches
    ``monai_version`` (another major version is refused, another minor or patch version warns,
    or is refused with ``strict_monai``); every weight file's sha256 matches ``large_files.yml``.
    The weights are then read as safetensors (never unpickled) into the network described by
    ``models/config.json``, strictly (every key, every shape).

    Raises:
        ConfigError: missing or invalid files, MONAI version refused.
        WeightsLoadError: a weight file's sha256 differs from the record (the message names the
            file and both hashes), a recorded file is missing, or the weights do not fit.
    """
    from volumed.encoders.weights import load_encoder_weights
    from volumed.inference.package import WEIGHTS_NAME, build_model, read_config

    from volumed.heads.clip import build_clip_model, is_clip_package, read_clip_config

    root, metadata, warnings, hashes = check_bundle(path, strict_monai=strict_monai)
    if is_clip_package(root / "models"):  # a CT-CLIP bundle: clip.json instead of config.json
        config = read_clip_config(root / "models")
        network = build_clip_model(config)
    else:
        config = read_config(root / "models")
        network = _network(root / "models", config, build_model)
    load_encoder_weights(network, root / "models" / WEIGHTS_NAME, key_map=None, strict=True)
    network = network.to(torch.device(device)).eval()
    return Bundle(root=root, metadata=metadata, version=str(metadata["version"]), network=network, config=config,
                  hashes=hashes, warnings=warnings)
