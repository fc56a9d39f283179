"""The software a result was made with: recorded next to every checkpoint, package and output folder."""

from __future__ import annotations

import platform
from importlib import metadata


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def software_versions() -> dict[str, str]:
    """``{"volumed", "monai", "torch", "lightning", "numpy", "python", "cuda"}`` versions (strings).

    Read from the installed distributions' metadata, so nothing heavy is imported for it.
    """
    from volumed import __version__

    import torch

    return {
        "volumed": __version__,
        "monai": _version("monai"),
        "torch": torch.__version__,
        "lightning": _version("lightning"),
        "numpy": _version("numpy"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda or "none",
    }
