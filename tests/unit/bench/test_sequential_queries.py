"""The sequential protocol's queries carry the recent items' ages at the target's time."""

from __future__ import annotations

import pandas as pd

from bench.sequential_quality import queries


def test_queries_age_each_recent_item_from_the_targets_time() -> None:
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    history = pd.DataFrame(
        {
            "user_id": ["a", "a", "a"],
            "item_id": ["x1", "x2", "x1"],
            "ts": [t0, t0 + pd.Timedelta(hours=1), t0 + pd.Timedelta(hours=2)],
        }
    )
    targets = pd.DataFrame(
        {"user_id": ["a"], "item_id": ["x3"], "ts": [t0 + pd.Timedelta(hours=5)], "device": ["web"]}
    )
    users = pd.DataFrame({"user_id": ["a"], "age_bucket": ["18-24"], "country": ["US"]})
    q = queries(history, targets, users, max_history=10)
    # x1's latest rating (hour 2) counts: 3 hours before the target; x2, 4 hours.
    assert q["recent_items"].tolist() == ["x1 x2"]
    assert q["recent_item_ages"].tolist() == [f"{3 * 3600} {4 * 3600}"]
