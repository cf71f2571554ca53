"""Batch feature rows: the context a query without a request carries."""

from __future__ import annotations

import pandas as pd

from components.features.rows import feature_rows, load_feature_source
from components.sources.synthetic import generate_to_folder
from recsys.config import FeaturesConfig
from tests.support.tiny_data import tiny_params


def test_batch_hour_is_the_users_usual_hour_of_activity(tmp_path) -> None:
    data = tmp_path / "data"
    generate_to_folder(tiny_params(users=60, items=30, days=5), data)
    src = load_feature_source(FeaturesConfig(), data, ["hour", "user_id"])
    events = pd.read_parquet(data / "events")
    users = sorted(events["user_id"].unique())[:20] + ["never-seen-user"]
    rows = feature_rows(src, {"user_id": "string", "hour": "int64"}, user_ids=users)
    for user, hour in zip(users, rows["hour"], strict=True):
        if user == "never-seen-user":
            assert hour == src.as_of.hour  # no history: the as-of hour
            continue
        counts = events[events["user_id"] == user]["ts"].dt.hour.value_counts()
        assert hour == min(h for h, n in counts.items() if n == counts.max())


def test_batch_recent_item_ages_are_measured_at_the_as_of_time(tmp_path) -> None:
    data = tmp_path / "data"
    generate_to_folder(tiny_params(users=40, items=30, days=5), data)
    src = load_feature_source(FeaturesConfig(), data, ["recent_items"])
    users = [*src.users.index[:15], "never-seen-user"]
    inputs = {"user_id": "string", "recent_items": "string", "recent_item_ages": "string"}
    rows = feature_rows(src, inputs, user_ids=users)
    as_of = int(src.as_of.timestamp())
    checked = 0
    for user, items, got in zip(users, rows["recent_items"], rows["recent_item_ages"], strict=True):
        if user == "never-seen-user":
            assert (items, got) == ("", "")
            continue
        stored = src.users.loc[user, "recent_item_times"]
        times = stored.split() if isinstance(stored, str) else []  # a user without positives: none
        assert len(times) == len(items.split())  # one time per item, aligned
        assert got.split() == [str(as_of - int(t)) for t in times]
        checked += len(times)
    assert checked > 0
