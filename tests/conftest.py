"""Shared fixtures: tiny data from the project's own generator, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.sources.synthetic import generate_to_folder
from tests.support.tiny_data import tiny_params


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated data folder (users, items, events); treat as read-only."""
    out = tmp_path_factory.mktemp("tiny") / "raw"
    generate_to_folder(tiny_params(), out)
    return out
