"""Atomic outputs: write to a temporary file in the target folder, then rename.

A crash, a full disk or an exception mid-write leaves no partial file under the final name, and
an existing output is never replaced unless the caller asked for ``overwrite=True``.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from volumed.errors import OutputExistsError


def check_creatable(path: str | Path) -> Path:
    """Raise :class:`OutputExistsError` if ``path`` cannot be created because one of its parent
    folders is a file (``-o notes.txt/out``), or the nearest existing folder is not writable."""
    p = Path(path)
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputExistsError(f"cannot create the output: {parent} is a file, not a folder", p)
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputExistsError(f"cannot create the output: no permission to write in {parent}", p)
            break
    return p


def check_writable(path: str | Path, overwrite: bool) -> Path:
    """Raise :class:`OutputExistsError` if ``path`` exists and ``overwrite`` is false, or if it
    cannot be created (:func:`check_creatable`)."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise OutputExistsError("output exists already; pass overwrite=True (--overwrite) to replace it", p)
    return check_creatable(p)


@contextmanager
def atomic_output(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``.

    The temporary name keeps the final suffixes (``.nii.gz``, ``.dcm``) so that writers which
    choose a format by extension behave as for the final name.
    """
    final = check_writable(path, overwrite)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{uuid.uuid4().hex[:12]}-{final.name}")
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"writer did not create {tmp}")
        # Re-check: another process may have created the output meanwhile.
        check_writable(final, overwrite)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes, *, overwrite: bool = False) -> Path:
    with atomic_output(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, *, overwrite: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)
