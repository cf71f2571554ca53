"""The quality benchmark's protocols: leave-last-out, full-ranking metrics, seeds and spread."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from bench.quality import random_protocol_table, spread, stratified_split, time_split
from bench.sequential_quality import (
    leave_last_out,
    popularity_metrics,
    rank_metrics,
    shuffled_within_users,
    with_point_in_time_history,
)


def _events() -> pd.DataFrame:
    ts = pd.to_datetime("2026-01-01", utc=True) + pd.to_timedelta([5, 1, 3, 2, 4, 9], unit="h")
    return pd.DataFrame(
        {"user_id": ["a", "a", "a", "b", "b", "c"], "item_id": ["x3", "x1", "x2", "y1", "y2", "z1"], "ts": ts}
    )


def test_leave_last_out_holds_out_each_users_newest_rating() -> None:
    train, test = leave_last_out(_events())
    assert sorted(zip(test["user_id"], test["item_id"], strict=True)) == [("a", "x3"), ("b", "y2")]
    # c has one rating: nothing to predict it from, so it stays in training.
    assert sorted(train["item_id"]) == ["x1", "x2", "y1", "z1"]


def test_history_is_what_came_strictly_before_newest_first() -> None:
    ordered = _events().sort_values("ts", kind="stable")
    out = with_point_in_time_history(ordered, max_history=1)
    by_item = dict(zip(out["item_id"], out["recent_items"], strict=True))
    assert by_item == {"x1": "", "y1": "", "x2": "x1", "y2": "y1", "x3": "x2", "z1": ""}


def test_the_shuffled_control_keeps_each_users_items_and_times_and_loses_the_order() -> None:
    n = 40
    ts = pd.to_datetime("2026-01-01", utc=True) + pd.to_timedelta(np.arange(2 * n), unit="h")
    events = pd.DataFrame(
        {"user_id": ["a"] * n + ["b"] * n, "item_id": [f"i{k}" for k in range(2 * n)], "ts": ts}
    )
    out = shuffled_within_users(events, seed=0)
    for user in ("a", "b"):
        before, after = events[events["user_id"] == user], out[out["user_id"] == user]
        assert sorted(after["item_id"]) == sorted(before["item_id"])
        assert sorted(after["ts"]) == sorted(before["ts"])
        # Items no longer come in their old order (40 items: a draw keeping it has odds 1 / 40!).
        assert after.sort_values("ts")["item_id"].tolist() != before["item_id"].tolist()
    assert out["ts"].is_monotonic_increasing
    assert out.equals(shuffled_within_users(events, seed=0))


def test_rank_counts_only_unmasked_items_above_the_target() -> None:
    items = ["a", "b", "c", "d"]
    scores = np.array([[4.0, 3.0, 2.0, 1.0]])
    # Target c: a and b score higher; a is in the history, so c is second (rank 1).
    out = rank_metrics(scores, items, ["c"], [{"a"}])
    assert out["hr@10"] == 1.0
    assert out["ndcg@10"] == pytest.approx(1 / np.log2(3))
    unmasked = rank_metrics(scores, items, ["c"], [set()])
    assert unmasked["ndcg@10"] == pytest.approx(1 / np.log2(4))


def test_a_target_beyond_ten_scores_zero() -> None:
    items = [f"i{n}" for n in range(20)]
    scores = np.arange(20, 0, -1, dtype=float)[np.newaxis]
    out = rank_metrics(scores, items, ["i15"], [set()])
    assert (out["hr@10"], out["ndcg@10"]) == (0.0, 0.0)


def test_popularity_ranks_by_training_count_with_the_users_history_masked() -> None:
    history = pd.DataFrame({"user_id": ["u", "v", "v", "w"], "item_id": ["p", "p", "q", "q"]})
    targets = pd.DataFrame({"user_id": ["u"], "item_id": ["q"]})
    # p and q have two ratings each; u's own p is masked, so q comes first.
    assert popularity_metrics(history, targets, ["p", "q", "r"])["ndcg@10"] == pytest.approx(1.0)


def test_split_seeds_give_different_splits_of_the_same_size() -> None:
    events = pd.DataFrame(
        {
            "user_id": ["u"] * 8 + ["v"] * 4,
            "item_id": [f"i{n}" for n in range(12)],
            "ts": pd.date_range("2026-01-01", periods=12, freq="h", tz="UTC"),
        }
    )
    first, _ = stratified_split(events, seed=42)
    second, _ = stratified_split(events, seed=43)
    assert len(first) == len(second) == 9  # 75% of 8 and of 4
    assert set(first["item_id"]) != set(second["item_id"])


def test_the_random_protocol_reports_each_seed_and_the_spread() -> None:
    def result(seed: int, ndcg: float) -> dict:
        metrics = {"ndcg@10": ndcg, "precision@10": 0.3, "recall@10": 0.2, "map@10": 0.1}
        return {"dataset": "ml-latest-small", "split_seed": seed, "model": metrics, "popularity": metrics}

    table = random_protocol_table([result(42, 0.30), result(43, 0.32)])
    seeds = list(table.columns[1].cells)
    assert seeds == ["42", "42", "43", "43", "mean ± sd", "mean ± sd"]
    assert list(table.columns[3].cells)[4] == spread([0.30, 0.32]) == "0.310 ± 0.010"


def test_the_time_split_holds_out_each_users_latest_quarter() -> None:
    events = pd.DataFrame(
        {
            "user_id": ["u"] * 8 + ["v"] * 4,
            "item_id": [f"i{n}" for n in range(12)],
            "ts": pd.date_range("2026-01-01", periods=12, freq="h", tz="UTC")[::-1],
        }
    )
    train, test = time_split(events)
    assert len(train) == 9 and len(test) == 3
    for user, part in test.groupby("user_id"):
        assert part["ts"].min() > train[train["user_id"] == user]["ts"].max()
