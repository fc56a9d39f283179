"""Start-up cost: ``import monai`` without importing ``transformers``.

MONAI's ``__init__`` imports every submodule, and ``monai.networks.nets.transchex`` calls
``optional_import("transformers")`` at module level, which really imports it when it is installed
(as it is for volumed's text encoder): about 2 s of every ``volumed`` command that touches MONAI,
for a network (Transchex) volumed never uses. volumed imports ``transformers`` itself only when it
needs a text model (:class:`volumed.text.encoder.TextEncoder` on a cache miss, training, reports).

:func:`install` (called by ``volumed/__init__.py``) puts a finder in front of ``sys.meta_path``
that only acts on the first import of the top-level ``monai`` package: while MONAI's ``__init__``
runs, ``sys.modules["transformers"]`` is ``None`` (an import of it raises ``ImportError``, which
``optional_import`` turns into its placeholder), and afterwards the entry is removed, so any later
``import transformers`` works as usual. The only thing lost is ``monai.networks.nets.Transchex``,
whose module keeps the placeholder. When ``transformers`` or ``monai`` is already imported, or
``VOLUMED_MONAI_WITH_TRANSFORMERS=1`` is set, nothing changes.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

_ENV = "VOLUMED_MONAI_WITH_TRANSFORMERS"


class _MonaiLoader(importlib.abc.Loader):
    """MONAI's own loader, run with ``transformers`` marked as not importable."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        # The module then looks exactly as if MONAI's loader had imported it.
        module.__loader__ = module.__spec__.loader = self.loader
        blocked = "transformers" not in sys.modules
        if blocked:
            sys.modules["transformers"] = None  # type: ignore[assignment]
        try:
            self.loader.exec_module(module)
        finally:
            if blocked and "transformers" in sys.modules and sys.modules["transformers"] is None:
                del sys.modules["transformers"]


class _MonaiFinder(importlib.abc.MetaPathFinder):
    """Finds ``monai`` as the other finders do, with :class:`_MonaiLoader` around its loader; once."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "monai":
            return None
        uninstall()
        if "transformers" in sys.modules:
            return None
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
    """Defer ``transformers`` past MONAI's import (see the module docstring); idempotent."""
    if os.environ.get(_ENV, "") not in ("", "0") or "monai" in sys.modules:
        return
    if not any(isinstance(f, _MonaiFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MonaiFinder())


def uninstall() -> None:
    """Remove the finder (it acts once; also for tests)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _MonaiFinder)]
