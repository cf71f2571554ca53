"""Pure feature computations on hand-made frames; each expected value is worked out in a comment."""

from __future__ import annotations

import numpy as np
import pandas as pd

from components.features.tables import (
    item_popularity_table,
    recent_items_table,
    snapshot_stamp,
    user_engagement_table,
    window_counts,
)
from recsys.online_features import next_recent_state

T = pd.Timestamp


def _events(rows: list[tuple]) -> pd.DataFrame:
    """(event_id, user_id, item_id, event_type, ts, session_id) tuples -> an events frame."""
    df = pd.DataFrame(rows, columns=["event_id", "user_id", "item_id", "event_type", "ts", "session_id"])
    df["ts"] = pd.to_datetime(df["ts"], utc=True, format="ISO8601")
    return df


def test_snapshot_is_stamped_at_the_last_microsecond_of_its_day() -> None:
    assert snapshot_stamp(T("2026-10-05 13:00", tz="UTC")) == T("2026-10-05 23:59:59.999999", tz="UTC")


def test_window_counts_over_trailing_days() -> None:
    # User a: events on Oct 1 (x2), Oct 2 (x1), Oct 4 (x1). User b signs up on Oct 3, no events.
    keys = pd.Series(["a", "a", "a", "a"])
    ts = pd.Series(
        pd.to_datetime(
            ["2026-10-01 08:00", "2026-10-01 23:59:59.999999", "2026-10-02 00:00", "2026-10-04 12:00"],
            utc=True,
            format="ISO8601",
        )
    )
    since = pd.Series(
        pd.to_datetime(["2026-09-01", "2026-10-03 10:00"], utc=True, format="ISO8601"), index=["a", "b"]
    )
    days = [T(f"2026-10-0{d}", tz="UTC") for d in (2, 3, 4)]
    out = window_counts(keys, ts, {"n": np.ones(4)}, since, days, [1, 3])
    got = {(r.key, r.event_timestamp.day): (r.n_1d, r.n_3d) for r in out.itertuples()}
    assert got == {
        # Oct 2: 1d = the Oct 2 event; 3d = Sep 30..Oct 2 = 2 (Oct 1, the last one at 23:59:59.999999) + 1.
        ("a", 2): (1, 3),
        # Oct 3: nothing that day; 3d = Oct 1..3 = 3. b signed up at 10:00, so it has a row: zeros.
        ("a", 3): (0, 3),
        ("b", 3): (0, 0),
        # Oct 4: 1d = 1; 3d = Oct 2..4 = 1 (Oct 2) + 1 (Oct 4); Oct 1 has left the window.
        ("a", 4): (1, 2),
        # b: still zeros on Oct 4, so no new row; its Oct 3 row stands (change rows only).
    }
    # b is absent on Oct 2: not signed up by that snapshot, so it has no row at all.
    assert set(out[out["event_timestamp"].dt.day == 2]["key"]) == {"a"}


def test_window_counts_write_change_rows_that_replay_the_daily_values() -> None:
    """Sparse rows over a long span read back, as a point-in-time join does, the dense values."""
    rng = np.random.default_rng(5)
    start = T("2020-01-01", tz="UTC")
    n = 300
    keys = pd.Series(rng.choice(["a", "b", "c", "d"], size=n))
    ts = pd.Series(start + pd.to_timedelta(rng.integers(0, 400 * 24, size=n), unit="h"))
    since = pd.Series(
        pd.to_datetime(["2019-06-01", "2020-02-01", "2020-06-15", "2031-01-01"], utc=True), index=list("abcd")
    )
    days = list(pd.date_range("2019-12-20", "2021-02-10", freq="D", tz="UTC"))
    windows = [1, 7, 30]
    out = window_counts(keys, ts, {"n": np.ones(n)}, since, days, windows)
    assert len(out) < len(days) * 3 / 2  # far fewer rows than a dense day x entity grid
    assert "d" not in set(out["key"])  # known only after the last day
    event_day = pd.DatetimeIndex(ts).floor("D")
    for key in "abc":
        rows = out[out["key"] == key].set_index("event_timestamp")
        for day in days[::7]:
            if day < since[key].floor("D"):
                assert not len(rows[rows.index <= day + pd.Timedelta(days=1)])  # not known yet: no row
                continue
            stamp = day + pd.Timedelta(days=1) - pd.Timedelta(microseconds=1)
            upto = rows[rows.index <= stamp]
            for w in windows:
                lo = day - pd.Timedelta(days=w - 1)
                expected = int(((keys == key) & (event_day >= lo) & (event_day <= day)).sum())
                # No row yet reads as the default, 0 (the entity has done nothing so far).
                got = int(upto.iloc[-1][f"n_{w}d"]) if len(upto) else 0
                assert got == expected, (key, day, w)
    # One day rebuilt alone gets exactly the rows the long build wrote for it.
    day = days[200]
    alone = window_counts(keys, ts, {"n": np.ones(n)}, since, [day], windows)
    same = out[out["event_timestamp"].dt.floor("D") == day].reset_index(drop=True)
    pd.testing.assert_frame_equal(alone, same)
    # carry_in: a complete snapshot of the day, one row per entity known by then.
    snap = window_counts(keys, ts, {"n": np.ones(n)}, since, [day], windows, carry_in=True)
    assert sorted(snap["key"]) == ["a", "b", "c"]

def test_user_engagement_counts_positives_and_purchases() -> None:
    ev = _events(
        [
            ("e1", "a", "i1", "impression", "2026-10-01 10:00", "s1"),
            ("e2", "a", "i1", "click", "2026-10-01 10:01", "s1"),
            ("e3", "a", "i1", "purchase", "2026-10-01 10:02", "s1"),
            ("e4", "a", "i2", "skip", "2026-10-01 10:03", "s1"),
        ]
    )
    users = pd.DataFrame({"user_id": ["a"], "signup_ts": pd.to_datetime(["2026-01-01"], utc=True)})
    row = user_engagement_table(ev, users, [T("2026-10-01", tz="UTC")], [1]).iloc[0]
    # 4 events; click and purchase are positive (impression and skip are not); one purchase.
    assert (row.user_events_1d, row.user_positives_1d, row.user_purchases_1d) == (4, 2, 1)


def test_item_ctr_is_clicks_per_impression() -> None:
    ev = _events(
        [
            ("e1", "a", "i1", "impression", "2026-10-01 10:00", "s1"),
            ("e2", "b", "i1", "impression", "2026-10-01 11:00", "s2"),
            ("e3", "c", "i1", "impression", "2026-10-01 12:00", "s3"),
            ("e4", "d", "i1", "impression", "2026-10-01 13:00", "s4"),
            ("e5", "a", "i1", "click", "2026-10-01 10:00:05", "s1"),
            ("e6", "a", "i1", "view", "2026-10-01 10:00:10", "s1"),
            ("e7", "z", "i2", "rating", "2026-10-01 09:00", "s9"),
        ]
    )
    items = pd.DataFrame(
        {"item_id": ["i1", "i2"], "published_ts": pd.to_datetime(["2026-01-01"] * 2, utc=True)}
    )
    out = item_popularity_table(ev, items, [T("2026-10-01", tz="UTC")], [7]).set_index("item_id")
    # i1: 4 impressions, 1 click -> ctr 0.25; click and view are both positives -> 2.
    assert out.loc["i1", "item_impressions_7d"] == 4
    assert out.loc["i1", "item_positives_7d"] == 2
    assert out.loc["i1", "item_ctr_7d"] == np.float32(0.25)
    # i2 was rated but never shown: ctr is 0.0, not a division by zero.
    assert out.loc["i2", "item_ctr_7d"] == 0.0 and out.loc["i2", "item_positives_7d"] == 1


def test_recent_state_dedupes_caps_and_resets_the_session() -> None:
    s = None
    s = next_recent_state(s, {"item_id": "i1", "event_type": "click", "session_id": "s1"}, 3)
    s = next_recent_state(s, {"item_id": "i2", "event_type": "impression", "session_id": "s1"}, 3)
    # An impression adds nothing; an event without a time leaves its item's time unknown.
    assert s == {"recent_items": "i1", "recent_item_times": "-1", "session_id": "s1", "session_items": "i1"}
    s = next_recent_state(s, {"item_id": "i2", "event_type": "view", "session_id": "s2"}, 3)
    # New session: its items start empty; recent items carry over.
    assert s["recent_items"] == "i2 i1" and s["recent_item_times"] == "-1 -1"
    assert (s["session_id"], s["session_items"]) == ("s2", "i2")
    for item in ("i3", "i1", "i4"):
        s = next_recent_state(s, {"item_id": item, "event_type": "purchase", "session_id": "s2"}, 3)
    # i1 moves to the front instead of repeating; only the 3 newest are kept.
    assert s["recent_items"] == "i4 i1 i3"


def test_recent_state_keeps_each_items_time_aligned_with_it() -> None:
    t0 = T("2026-10-01 10:00", tz="UTC")
    s = None
    for minutes, item in ((0, "i1"), (1, "i2"), (2, "i3"), (3, "i1"), (4, "i4")):
        ts = t0 + pd.Timedelta(minutes=minutes)
        s = next_recent_state(s, {"item_id": item, "event_type": "click", "session_id": "s1", "ts": ts}, 3)
    at = int(t0.timestamp())
    # i1 moved to the front with the time of its latest click (minute 3); i2 fell off with its time.
    assert s["recent_items"] == "i4 i1 i3"
    assert s["recent_item_times"] == f"{at + 240} {at + 180} {at + 120}"
    # An impression moves nothing, times included.
    shown = {"item_id": "i9", "event_type": "impression", "session_id": "s1", "ts": t0}
    assert next_recent_state(s, shown, 3) == s
    # A state stored before times were kept: its items' times are unknown, the new item's known.
    old = {"recent_items": "a b", "session_id": "s1", "session_items": ""}
    s = next_recent_state(old, {"item_id": "c", "event_type": "click", "session_id": "s1", "ts": t0}, 3)
    assert (s["recent_items"], s["recent_item_times"]) == ("c a b", f"{at} -1 -1")


def test_recent_items_table_has_a_row_per_change_and_carries_state_into_the_interval() -> None:
    ev = _events(
        [
            ("e1", "a", "i1", "click", "2026-10-01 10:00", "s1"),
            ("e2", "a", "i2", "impression", "2026-10-02 09:00", "s1"),  # no change: no row
            ("e3", "a", "i2", "click", "2026-10-02 09:01", "s1"),
            ("e4", "a", "i3", "click", "2026-10-02 09:01", "s1"),  # same instant as e3: one row
            ("e5", "a", "i9", "impression", "2026-10-03 09:00", "s2"),  # after the interval
        ]
    )
    out = recent_items_table(ev, 5, start=T("2026-10-02", tz="UTC"), end=T("2026-10-03", tz="UTC"))
    # Only Oct 2 rows; e1 (Oct 1) is not written but its i1 is remembered.
    assert out[["event_timestamp", "recent_items", "session_items"]].values.tolist() == [
        [T("2026-10-02 09:01", tz="UTC"), "i3 i2 i1", "i3 i2 i1"],
    ]
    # Each item's time, aligned with the ids: e4 and e3 at 09:01, e1 (remembered) at Oct 1 10:00.
    e3 = int(T("2026-10-02 09:01", tz="UTC").timestamp())
    e1 = int(T("2026-10-01 10:00", tz="UTC").timestamp())
    assert out["recent_item_times"].tolist() == [f"{e3} {e3} {e1}"]
