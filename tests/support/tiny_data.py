"""The tiny generated data set most tests run on: small enough for seconds, big enough to train."""

from __future__ import annotations

from datetime import UTC, datetime

from components.sources.synthetic import GenerateParams

# The end of the tiny data's period: runs, intervals and "now" of the tests are pinned to it.
TINY_END = datetime(2026, 11, 1, tzinfo=UTC)


def tiny_params(**overrides: object) -> GenerateParams:
    """The generator's parameters for the tiny data set, with ``overrides``."""
    base = dict(users=200, items=80, days=6, seed=11, end_date=TINY_END, events_per_user_day=2.0)
    base.update(overrides)
    return GenerateParams(**base)  # type: ignore[arg-type]
