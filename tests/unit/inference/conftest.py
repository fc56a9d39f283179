"""Shared by the inference tests: a tiny untrained package for the module's ``TERMS`` (geometry and
plumbing do not depend on accuracy; built by ``make_tiny_package`` of tests/conftest.py, which the
bundle tests share) and the offline text encoder."""

from __future__ import annotations

from pathlib import Path

import pytest

from volumed.text.encoder import TextEncoder


@pytest.fixture(scope="module")
def package(request, tmp_path_factory, make_tiny_package) -> Path:
    """A tiny package (``make_tiny_package``, tests/conftest.py) for the test module's ``TERMS``."""
    return make_tiny_package(tmp_path_factory.mktemp("pkg"), request.module.TERMS)


@pytest.fixture(scope="module")
def text_encoder() -> TextEncoder:
    return TextEncoder()
