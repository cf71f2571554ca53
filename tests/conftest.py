"""Shared fixtures: tiny data from the project's own generator, built once per session."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from components.sources.synthetic import GenerateParams, generate_to_folder

TINY_END = datetime(2026, 11, 1, tzinfo=UTC)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_params(**overrides: object) -> GenerateParams:
    base = dict(users=200, items=80, days=6, seed=11, end_date=TINY_END, events_per_user_day=2.0)
    base.update(overrides)
    return GenerateParams(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small generated data folder (users, items, events); treat as read-only."""
    out = tmp_path_factory.mktemp("tiny") / "raw"
    generate_to_folder(tiny_params(), out)
    return out
