"""Start-up cost: ``import monai`` without importing ``transformers`` and ``scipy.signal``.

MONAI's ``__init__`` imports every submodule, and some call ``optional_import`` at module level,
which really imports the package when it is installed:

* ``monai.networks.nets.transchex`` imports ``transformers`` (installed for volumed's text
  encoder): 2.3 s of ``import monai`` on a 2-core machine (4.4 s -> 2.1 s), for a network
  (Transchex) volumed never uses;
* ``monai.data.ultrasound_confidence_map`` and ``monai.transforms.signal.array`` import
  ``scipy.signal`` (which pulls ``scipy.stats``; 0.5-0.7 s), for two transforms volumed never uses.

volumed imports ``transformers`` itself only when it needs a text model
(:class:`volumed.text.encoder.TextEncoder` on a cache miss, training, reports).

:func:`install` (called by ``volumed/__init__.py``) puts a finder in front of ``sys.meta_path``
that only acts on the first import of the top-level ``monai`` package: while MONAI's ``__init__``
runs, ``sys.modules[name]`` is ``None`` for each name of :data:`DEFERRED` not yet imported (an
import of it raises ``ImportError``, which ``optional_import`` turns into its placeholder), and
afterwards those entries are removed, so any later ``import transformers`` or ``import
scipy.signal`` works as usual. What is lost is what those module-level placeholders serve:
``monai.networks.nets.Transchex``, ``monai.data.UltrasoundConfidenceMap`` (and its transform),
``monai.transforms.SignalRemoveFrequency``. When ``monai`` is already imported, or
``VOLUMED_MONAI_FULL_IMPORT=1`` is set, nothing changes.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

_ENV = "VOLUMED_MONAI_FULL_IMPORT"
#: Imported by MONAI at import time for parts volumed never uses; see the module docstring.
DEFERRED = ("transformers", "scipy.signal")


class _MonaiLoader(importlib.abc.Loader):
    """MONAI's own loader, run with the :data:`DEFERRED` modules marked as not importable."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        # The module then looks exactly as if MONAI's loader had imported it.
        module.__loader__ = module.__spec__.loader = self.loader
        blocked = [name for name in DEFERRED if name not in sys.modules]
        for name in blocked:
            sys.modules[name] = None  # type: ignore[assignment]
        try:
            self.loader.exec_module(module)
        finally:
            for name in blocked:
                if name in sys.modules and sys.modules[name] is None:
                    del sys.modules[name]


class _MonaiFinder(importlib.abc.MetaPathFinder):
    """Finds ``monai`` as the other finders do, with :class:`_MonaiLoader` around its loader; once."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "monai":
            return None
        uninstall()
        # The spec the other finders would give (this one is already out of sys.meta_path).
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _MonaiLoader(spec.loader)
        return spec


def install() -> None:
    """Defer the :data:`DEFERRED` modules past MONAI's import (see the module docstring); idempotent."""
    if os.environ.get(_ENV, "") not in ("", "0") or "monai" in sys.modules:
        return
    if not any(isinstance(f, _MonaiFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MonaiFinder())


def uninstall() -> None:
    """Remove the finder (it acts once; also for tests)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _MonaiFinder)]
