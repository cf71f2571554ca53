"""Trailing-window change rows on hand-made events."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd

from recsys.event_windows import trailing_counts


def _events() -> pd.DataFrame:
    t0 = pd.Timestamp("2026-10-01 10:00", tz="UTC")
    return pd.DataFrame(
        {
            "user_id": ["a", "a", "b", "a"],
            "event_type": ["click", "impression", "click", "click"],
            "event_timestamp": [
                t0,
                t0 + timedelta(minutes=30),
                t0 + timedelta(hours=3),
                t0 + timedelta(hours=5),
            ],
        }
    )


def test_rows_at_each_event_and_when_it_leaves_the_window_up_to_the_last_event() -> None:
    out = trailing_counts(
        _events(),
        key="user_id",
        counts={"events": lambda e: e["event_type"].notna(), "clicks": lambda e: e["event_type"] == "click"},
        windows={"1h": timedelta(hours=1)},
        rates={"ctr": ("clicks", "events")},
    )
    a = out[out["user_id"] == "a"].set_index("event_timestamp")
    t0 = pd.Timestamp("2026-10-01 10:00", tz="UTC")
    # 10:00 enters, 10:30 enters, 11:00 the first leaves, 11:30 the second leaves (zeros),
    # 15:00 enters; its leaving (16:00) is after the last event, so not written.
    hours = [0, 0.5, 1, 1.5, 5]
    assert list(a.index) == [t0 + timedelta(hours=h) for h in hours]
    assert a["user_events_1h"].tolist() == [1, 2, 1, 0, 1]
    assert a["user_clicks_1h"].tolist() == [1, 1, 0, 0, 1]
    assert a["user_ctr_1h"].tolist() == [1.0, 0.5, 0.0, 0.0, 1.0]
    b = out[out["user_id"] == "b"]
    assert b["event_timestamp"].tolist() == [t0 + timedelta(hours=3), t0 + timedelta(hours=4)]
    assert b["user_events_1h"].tolist() == [1, 0]
    assert str(out["user_events_1h"].dtype) == "int64" and str(out["user_ctr_1h"].dtype) == "float32"


def test_no_events_give_no_rows_with_the_columns() -> None:
    out = trailing_counts(
        _events().iloc[:0],
        key="user_id",
        counts={"events": lambda e: e["event_type"].notna()},
        windows={"1h": timedelta(hours=1)},
    )
    assert out.empty and list(out.columns) == ["user_id", "event_timestamp", "user_events_1h"]
