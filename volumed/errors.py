"""The project's exception hierarchy.

Every error a user can cause with bad input is a :class:`VolumedError`; its message names the
file and the problem. The CLI prints ``str(err)`` on one line and exits non-zero; programmatic
callers can catch the specific subclass.
"""

from __future__ import annotations

from pathlib import Path


class VolumedError(Exception):
    """Base class for errors caused by user input (files, arguments, configs)."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.problem = message
        super().__init__(f"{path}: {message}" if path is not None else message)


class VolumeReadError(VolumedError):
    """A file or folder could not be read as a volume (missing, truncated, wrong format)."""


class InvalidVolumeError(VolumedError):
    """The file was read, but its content is not a usable 3D volume (2D, 4D, NaN, empty axis)."""


class DicomSeriesError(VolumedError):
    """A DICOM folder does not hold exactly one complete, regularly spaced image series."""


class OutputExistsError(VolumedError):
    """An output file exists already and ``overwrite`` was not requested."""


class DatalistError(VolumedError):
    """A datalist (MSD JSON or CSV) has problems; the message lists all of them with row numbers."""

    def __init__(self, problems: list[str], path: str | Path | None = None):
        self.problems = list(problems)
        body = f"{len(problems)} problem(s):\n" + "\n".join(f"  - {p}" for p in problems)
        super().__init__(body, path)


class ConfigError(VolumedError):
    """A configuration or argument value is invalid."""


class ReportTextError(ConfigError):
    """A report or finding sentence cannot be parsed: empty, not English, or over the word limit."""


class WeightsLoadError(VolumedError):
    """A checkpoint could not be read, or did not fit the model with ``strict=True``."""


class UnknownTermError(VolumedError):
    """A text prompt names no known anatomy term; ``suggestions`` holds the nearest known terms."""

    def __init__(self, message: str, suggestions: tuple[str, ...] = (), path: str | Path | None = None):
        self.suggestions = tuple(suggestions)
        super().__init__(message, path)


class ReportTableError(DatalistError):
    """A CSV of reports cannot be used: not UTF-8, a missing column, empty reports, or a
    prediction file that does not pair with its reference (different lengths or ids)."""
