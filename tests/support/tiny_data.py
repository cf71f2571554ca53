"""The tiny generated data set most tests run on: small enough for seconds, big enough to train."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from components.sources.synthetic import GenerateParams

# The end of the tiny data's period: runs, intervals and "now" of the tests are pinned to it.
TINY_END = datetime(2026, 11, 1, tzinfo=UTC)


def tiny_params(**overrides: object) -> GenerateParams:
    """The generator's parameters for the tiny data set, with ``overrides``."""
    base = dict(users=200, items=80, days=6, seed=11, end_date=TINY_END, events_per_user_day=2.0)
    base.update(overrides)
    return GenerateParams(**base)  # type: ignore[arg-type]


def joined_training_frame(data_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Events joined with their users and items (and the event's hour), and the items: the
    frame ``train_models`` takes, straight from generated data without the feature layer."""
    events = pd.read_parquet(data_dir / "events")
    users = pd.read_parquet(data_dir / "users")
    items = pd.read_parquet(data_dir / "items")
    frame = events.merge(users, on="user_id", how="left").merge(items, on="item_id", how="left")
    return frame.assign(hour=frame["ts"].dt.hour), items
