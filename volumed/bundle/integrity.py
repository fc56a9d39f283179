"""Is this bundle the one that was recorded? sha256 of the weights, MONAI version of the runtime.

The record is the bundle's ``large_files.yml`` in MONAI's own format (``path``, ``url``,
``hash_val``, ``hash_type``), one entry per weight file under ``models/``, so that
``python -m monai.bundle download_large_files`` checks the same hashes. A file that is committed
with the bundle has an empty ``url`` (MONAI then only checks the hash of the file that is there);
a file over 25 MB is not committed and its entry gives the URL to fetch it from.

Weights change when a model is retrained: :func:`record_hashes` (``volumed bundle hash BUNDLE``)
rewrites the record from the files present, keeping the URLs already recorded.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import yaml

from volumed.errors import ConfigError, WeightsLoadError
from volumed.io.atomic import atomic_write_text

__all__ = [
    "RECORD_NAME",
    "WEIGHT_SUFFIXES",
    "HashRecord",
    "weight_files",
    "sha256_file",
    "read_hash_records",
    "record_hashes",
    "verify_hashes",
    "check_monai_version",
]

log = logging.getLogger(__name__)

RECORD_NAME = "large_files.yml"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ts", ".onnx", ".ckpt", ".bin")
_HEADER = (
    "# sha256 of every weight file of this bundle, checked by volumed.bundle.load, `volumed run` and\n"
    "# `python -m monai.bundle download_large_files`. Rewrite it after replacing weights:\n"
    "#   volumed bundle hash bundles/{bundle}\n"
    "# url is empty for a file committed with the bundle; files over 25 MB are not committed and carry a url.\n"
)


@dataclass(frozen=True)
class HashRecord:
    """One weight file as recorded: ``path`` relative to the bundle root, its sha256, and where to
    download it from (``""`` when it is committed with the bundle)."""

    path: str
    sha256: str
    url: str = ""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_hash_records(bundle: str | Path) -> list[HashRecord]:
    """The records of ``bundle/large_files.yml``.

    Raises:
        ConfigError: the record is missing, unreadable, or an entry lacks ``path`` or a sha256
            ``hash_val`` (naming the file and the entry).
    """
    root = Path(bundle)
    file = root / RECORD_NAME
    if not file.is_file():
        raise ConfigError(f"no {RECORD_NAME}: the bundle records no sha256 of its weights (volumed bundle hash {root})", root)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"unreadable hash record ({err})", file) from err
    entries = data.get("large_files") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError("no 'large_files' list of weight files", file)
    records = []
    for k, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("path"):
            raise ConfigError(f"entry {k} has no 'path'", file)
        if str(entry.get("hash_type", "")).lower() != "sha256" or len(str(entry.get("hash_val", ""))) != 64:
            raise ConfigError(f"entry {k} ({entry['path']}): needs hash_type sha256 and a 64-digit hash_val", file)
        records.append(HashRecord(str(entry["path"]), str(entry["hash_val"]).lower(), str(entry.get("url") or "")))
    return records


def weight_files(root: Path) -> list[Path]:
    """The weight files (by suffix) under ``root/models``, sorted."""
    models = root / "models"
    return sorted(p for p in models.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES) if models.is_dir() else []


def record_hashes(bundle: str | Path, name: str | None = None) -> list[HashRecord]:
    """Write ``bundle/large_files.yml`` with the sha256 of every weight file under ``models/``
    (atomically; URLs already recorded for a path are kept). Returns the new records. ``name``:
    the bundle's folder name for the file's comment (default: ``bundle``'s own; a bundle staged
    in a temporary folder passes its final name).

    Raises:
        ConfigError: the bundle has no weight file under ``models/``.
    """
    root = Path(bundle)
    files = weight_files(root)
    if not files:
        raise ConfigError(f"no weight file ({', '.join(WEIGHT_SUFFIXES)}) under models/", root)
    urls = {}
    if (root / RECORD_NAME).is_file():
        try:
            urls = {r.path: r.url for r in read_hash_records(root)}
        except ConfigError:
            urls = {}  # a broken record is replaced whole
    records = [HashRecord(p.relative_to(root).as_posix(), sha256_file(p), urls.get(p.relative_to(root).as_posix(), "")) for p in files]
    body = {"large_files": [{"path": r.path, "url": r.url, "hash_val": r.sha256, "hash_type": "sha256"} for r in records]}
    atomic_write_text(root / RECORD_NAME, _HEADER.format(bundle=name or root.name) + yaml.safe_dump(body, sort_keys=False), overwrite=True)
    return records


def verify_hashes(bundle: str | Path) -> list[HashRecord]:
    """Check every recorded weight file against its sha256, and that no weight file under
    ``models/`` goes unrecorded. Returns the records.

    Raises:
        WeightsLoadError: a recorded file is missing, a hash differs, or a weight file has no
            record; the message names the file and both hashes, and says how to re-record.
        ConfigError: no readable record (see :func:`read_hash_records`).
    """
    root = Path(bundle)
    records = read_hash_records(root)
    recorded = {r.path for r in records}
    for r in records:
        path = root / r.path
        if not path.is_file():
            hint = f"download it from {r.url}" if r.url else "it should be committed with the bundle"
            raise WeightsLoadError(f"recorded weight file is missing ({hint})", path)
        actual = sha256_file(path)
        if actual != r.sha256:
            raise WeightsLoadError(
                f"sha256 mismatch: the file hashes to {actual}, but {RECORD_NAME} records {r.sha256}; refusing to load "
                f"weights that are not the bundle's. If you replaced them on purpose, run `volumed bundle hash {root}`",
                path,
            )
    extra = [p.relative_to(root).as_posix() for p in weight_files(root) if p.relative_to(root).as_posix() not in recorded]
    if extra:
        raise WeightsLoadError(f"weight file(s) with no sha256 in {RECORD_NAME}: {', '.join(extra)} (volumed bundle hash {root})", root)
    return records


def verify_bundle_package(model_dir: str | Path) -> list[HashRecord] | None:
    """When ``model_dir`` is a bundle's ``models/`` folder with a ``large_files.yml`` beside it,
    :func:`verify_hashes` of that bundle (so ``volumed segment --model BUNDLE/models`` and the
    default model refuse weights that are not the bundle's, as ``volumed run`` does); ``None``
    for a loose package (no record to check against).

    Raises:
        WeightsLoadError, ConfigError: as :func:`verify_hashes`.
    """
    path = Path(model_dir)
    if path.name != "models" or not (path.parent / RECORD_NAME).is_file():
        return None
    return verify_hashes(path.parent)


def _release(version: str) -> tuple[int, ...]:
    parts = []
    for piece in str(version).split("+")[0].split("."):
        digits = "".join(c for c in piece if c.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def check_monai_version(metadata: dict, *, installed: str | None = None, strict: bool = False) -> str | None:
    """Compare the installed MONAI with the bundle's ``monai_version``.

    Another major version is refused (``ConfigError``): the bundle's config names MONAI components
    whose arguments may have changed. Another minor or patch version gives a warning (returned and
    logged), or is refused too with ``strict``. Returns ``None`` when the versions agree.
    """
    import monai

    installed = installed or monai.__version__
    wanted = metadata.get("monai_version")
    if not wanted:
        raise ConfigError("bundle metadata has no monai_version", "configs/metadata.json")
    have, need = _release(installed), _release(wanted)
    if have[:3] == need[:3]:
        return None
    message = f"the bundle was made with MONAI {wanted}, MONAI {installed} is installed"
    if not have or not need or have[0] != need[0] or strict:
        raise ConfigError(f"{message}; refusing to run it (install monai=={wanted})", "configs/metadata.json")
    log.warning("%s; running it anyway", message)
    return message
