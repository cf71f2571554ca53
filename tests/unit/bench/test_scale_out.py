"""The scale-out part of ``bench.scale``: its generated data and its table."""

from __future__ import annotations

import argparse

from bench.scale import SCALE_EVENT_MIX, failure_cause, render_scale, scale_frames, scale_sizes
from recsys.contracts import CONTRACTS, DEVICES, conform


def test_scale_data_has_the_requested_events_valid_under_the_contracts() -> None:
    frames = scale_frames(5_000, seed=3)
    events, users, items = frames["events"], frames["users"], frames["items"]
    assert len(events) == 5_000
    assert (len(users), len(items)) == scale_sizes(5_000)
    for name, frame in frames.items():
        assert frame.equals(conform(frame, CONTRACTS[name]))  # the contract's columns and types
    assert events["event_id"].is_unique and users["user_id"].is_unique and items["item_id"].is_unique
    assert set(events["user_id"]) <= set(users["user_id"]) and set(events["item_id"]) <= set(items["item_id"])
    assert set(events["event_type"]) <= set(SCALE_EVENT_MIX) and set(events["device"]) <= set(DEVICES)
    assert events["ts"].is_monotonic_increasing
    assert events["ts"].min() > max(users["signup_ts"].max(), items["published_ts"].max())
    ratings = events.loc[events["event_type"] == "rating", "value"]
    assert ratings.between(1, 5).all() and events.loc[events["event_type"] == "click", "value"].isna().all()
    # Zipf popularity: the most popular item gets far more than an even share.
    assert events["item_id"].value_counts().iloc[0] > 5 * len(events) / len(items)


def test_scale_data_is_the_same_for_the_same_seed() -> None:
    a, b = scale_frames(2_000, seed=5), scale_frames(2_000, seed=5)
    assert all(a[name].equals(b[name]) for name in a)
    assert not a["events"].equals(scale_frames(2_000, seed=6)["events"])


def test_scale_table_shows_each_step_stopped_and_skipped_ones_with_the_load() -> None:
    size = {
        "events": 1_000_000,
        "data": {"events": 1_000_000, "seconds": 60.0, "peak_rss_gb": 1.0, "load_1m": [1.0, 2.0]},
        "build": {"table_rows": {"a": 10, "b": 5}, "seconds": 90.0, "peak_rss_gb": 3.0,
                  "load_1m": [2.0, 2.5]},
        "steps": [
            {"store": "duckdb", "step": "join", "rows": 1_000_000, "seconds": 30.0, "peak_rss_gb": 2.5,
             "load_1m": [2.0, 3.0], "timed_out": False},
            {"store": "file", "step": "join", "limit_s": 600, "timed_out": True, "why": "time",
             "seconds": 600.2, "peak_rss_gb": 9.1, "load_1m": [3.0, 6.0]},
            {"store": "spark", "step": "join", "skipped": "no time"},
        ],
        "same_rows": True,
    }  # fmt: skip
    args = argparse.Namespace(
        scale_timeout=1800,
        scale_max_rss_gb=16.0,
        scale_spark_driver_memory="8g",
        scale_spark_big_from=10_000_000,
        scale_notes="",
    )
    table = render_scale([size], "2 cores", "cmd", args)
    assert "| 1,000,000 | 25,000 / 5,000 | build | - | 90.0 | 3.0 | 2.0 -> 2.5 | 15 feature rows |" in table
    assert "| join | duckdb | 30.0 | 2.5 | 2.0 -> 3.0 | 1,000,000 |" in table
    assert "| join | file | > 10 min (stopped) | 9.1 | 3.0 -> 6.0 | - |" in table
    assert "| join | spark | skipped: no time | - | - | - |" in table


def test_failure_cause_is_the_jvms_out_of_memory_line_or_the_last_error() -> None:
    jvm = "Traceback\n  ...\njava.lang.OutOfMemoryError: Java heap space\n\tat x\n"
    jvm += "py4j.protocol.Py4JError: An error\n"
    assert failure_cause(jvm) == "java.lang.OutOfMemoryError: Java heap space"
    assert failure_cause("Traceback\n  File x\nValueError: bad\n") == "ValueError: bad"
