"""``configs/metadata.json`` of a MONAI bundle: read it and check it against the project's schema.

The schema (``volumed/bundle/schema/metadata.schema.json``) is written from the MONAI Bundle
Specification, because the official ``meta_schema`` is a download. JSON Schema cannot say
everything the specification means, so :func:`metadata_problems` adds three checks by hand:
the changelog holds an entry for ``version``; ``num_channels`` equals the number of entries of a
non-empty ``channel_def``; every ``spatial_shape`` expression evaluates to a positive size (with
``n = p = 1``, as ``monai.bundle verify_net_in_out`` evaluates it).
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from volumed.errors import ConfigError

__all__ = ["SCHEMA_PATH", "METADATA_NAME", "read_metadata", "metadata_problems", "validate_metadata", "channel_names"]

SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "metadata.schema.json"
METADATA_NAME = "configs/metadata.json"
_EXPRESSION = re.compile(r"^[0-9np*+ ()]+$")


@lru_cache(maxsize=1)
def _schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def read_metadata(path: str | Path) -> dict:
    """The metadata of a bundle folder (its ``configs/metadata.json``) or of a metadata file.

    Raises:
        ConfigError: the file is missing, unreadable or not a JSON object (naming the file).
    """
    path = Path(path)
    file = path / METADATA_NAME if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"not a MONAI bundle: {METADATA_NAME} is missing", path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"unreadable bundle metadata ({err})", file) from err
    if not isinstance(data, dict):
        raise ConfigError(f"bundle metadata must be a JSON object, got {type(data).__name__}", file)
    return data


def _spatial_size(value: Any) -> int | None:
    """A ``spatial_shape`` entry at ``n = p = 1``; ``None`` when it does not evaluate to a size."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if value == "*":
        return 1
    if not isinstance(value, str) or not _EXPRESSION.fullmatch(value):
        return None
    try:
        # Only digits, n, p, *, +, spaces and parentheses reach eval, with no builtins.
        size = eval(value, {"__builtins__": {}}, {"n": 1, "p": 1})  # noqa: S307
    except Exception:  # noqa: BLE001 - any syntax error is "not an expression"
        return None
    return int(size) if isinstance(size, int) and size > 0 else None


def metadata_problems(metadata: dict) -> list[str]:
    """Every way ``metadata`` departs from the schema and the specification, one line each
    (``where: problem``); empty when it is valid."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(_schema())
    problems = [
        f"{'/'.join(str(p) for p in err.absolute_path) or '(top level)'}: {err.message}"
        for err in sorted(validator.iter_errors(metadata), key=lambda e: [str(p) for p in e.absolute_path])
    ]
    version, changelog = metadata.get("version"), metadata.get("changelog")
    if isinstance(version, str) and isinstance(changelog, dict) and version not in changelog:
        problems.append(f"changelog: has no entry for version {version!r}")
    formats = metadata.get("network_data_format")
    for side in ("inputs", "outputs"):
        tensors = formats.get(side) if isinstance(formats, dict) else None
        for name, spec in (tensors or {}).items() if isinstance(tensors, dict) else ():
            if not isinstance(spec, dict):
                continue
            where = f"network_data_format/{side}/{name}"
            channels = spec.get("channel_def")
            if isinstance(channels, dict) and channels and isinstance(spec.get("num_channels"), int):
                if len(channels) != spec["num_channels"]:
                    problems.append(f"{where}: num_channels is {spec['num_channels']} but channel_def names {len(channels)}")
            for k, value in enumerate(spec.get("spatial_shape") or []):
                if _spatial_size(value) is None:
                    problems.append(f"{where}/spatial_shape/{k}: {value!r} is not a size, '*' or an expression of n and p")
    return problems


def validate_metadata(path: str | Path) -> dict:
    """Read a bundle's metadata and check it; return it when valid.

    Raises:
        ConfigError: naming the file and listing every problem.
    """
    path = Path(path)
    metadata = read_metadata(path)
    problems = metadata_problems(metadata)
    if problems:
        file = path / METADATA_NAME if path.is_dir() else path
        raise ConfigError(f"{len(problems)} problem(s) with the bundle metadata: " + "; ".join(problems), file)
    return metadata


def channel_names(metadata: dict, output: str = "pred") -> list[str]:
    """Names of an output's channels in channel order (``channel_def`` of ``output``)."""
    channels = metadata["network_data_format"]["outputs"][output]["channel_def"]
    return [channels[k] for k in sorted(channels, key=int)]
