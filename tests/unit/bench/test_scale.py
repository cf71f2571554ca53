"""The training-throughput part of ``bench.scale``: its data, its log parsing, its table."""

from __future__ import annotations

from bench.scale import EPOCH_LINE, history_frame, render_training


def test_epoch_line_reads_the_fits_own_epoch_seconds() -> None:
    # The format of train._epoch_logger's line for the retriever.
    match = EPOCH_LINE.search("[retriever] epoch 3: loss=1.2345 (2.1s)")
    assert match is not None and match.group(2) == "2.1"
    assert EPOCH_LINE.search("[ranker] epoch 3: loss=1.2345 (2.1s)") is None


def test_history_is_the_users_state_strictly_before_each_event() -> None:
    frame, catalog = history_frame(users=40, items=20, days=3)
    first = frame.sort_values(["ts", "event_id"]).groupby("user_id").head(1)
    # Nothing is known of a user before their first event.
    assert (first["recent_items"] == "").all()
    assert (frame["recent_items"] != "").any()
    assert set(frame["item_id"]) <= set(catalog["item_id"])


def test_training_table_reports_best_and_median_with_the_load() -> None:
    row = {
        "users": 10, "items": 5, "events": 100, "positives": 40, "mean_history": 1.5, "batch_size": 8,
        "epoch_seconds": [2.0, 1.0], "best": 40, "median": 30, "load_1m": [1.0, 2.0],
    }  # fmt: skip
    table = render_training([row], "2 cores", "2026-12-03")
    assert "| 10 | 5 | 100 | 40 | 1.5 | 8 | 2.0, 1.0 | 40 | 30 | 1.0 -> 2.0 |" in table
