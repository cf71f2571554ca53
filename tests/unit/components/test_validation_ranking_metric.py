"""The retriever's validation ranking metric: NDCG@10 / recall@10 over the whole catalog.

Hand-made cases whose answers are counted by hand: the item embeddings are the identity,
so a query's scores are its own coordinates and the ranks can be read off.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from components.training.train import earlier_positives, full_ranking_metrics

NONE = np.zeros(0, dtype=np.int64)


def test_a_target_ranked_third_scores_one_over_log2_of_four() -> None:
    items = np.eye(5, dtype=np.float32)
    # Item 0 is the target; items 1 (0.9) and 3 (0.8) score above it: rank 2, the 3rd place.
    queries = np.array([[0.5, 0.9, 0.1, 0.8, 0.2]], dtype=np.float32)
    m = full_ranking_metrics(queries, items, np.array([0]), NONE, NONE)
    assert m["ndcg"] == pytest.approx(1 / math.log2(4))  # 0.5
    assert m["recall"] == 1.0
    # With a cut-off of 2 the 3rd place is a miss.
    m = full_ranking_metrics(queries, items, np.array([0]), NONE, NONE, k=2)
    assert m == {"ndcg": 0.0, "recall": 0.0}


def test_masked_items_leave_the_ranking_but_the_target_never_does() -> None:
    items = np.eye(5, dtype=np.float32)
    queries = np.array([[0.5, 0.9, 0.1, 0.8, 0.2]], dtype=np.float32)
    # Masking item 1 (seen before) lifts the target to 2nd place: 1 / log2(3).
    m = full_ranking_metrics(queries, items, np.array([0]), np.array([0]), np.array([1]))
    assert m["ndcg"] == pytest.approx(1 / math.log2(3))
    # A pair naming the target itself (a repeat) is ignored, and -1 (not in the catalog) too.
    m = full_ranking_metrics(queries, items, np.array([0]), np.array([0, 0]), np.array([0, -1]))
    assert m["ndcg"] == pytest.approx(0.5)


def test_means_over_queries_ties_and_unknown_targets() -> None:
    items = np.eye(3, dtype=np.float32)
    queries = np.array(
        [
            [1.0, 0.0, 0.0],  # target 0 first: gain 1
            [0.5, 0.5, 0.0],  # target 1 tied with item 0: ties count in the target's favour, gain 1
            [0.0, 0.0, 1.0],  # target not in the catalog (-1): a miss
            [0.9, 0.8, 0.1],  # target 2 last, but item 0 is masked: 2nd place, 1 / log2(3)
        ],
        dtype=np.float32,
    )
    targets = np.array([0, 1, -1, 2])
    # Chunks of one query: the masked pairs must reach the right rows; query 3 masks item 0.
    m = full_ranking_metrics(queries, items, targets, np.array([3]), np.array([0]), chunk=1)
    assert m["ndcg"] == pytest.approx((1 + 1 + 0 + 1 / math.log2(3)) / 4)
    assert m["recall"] == pytest.approx(3 / 4)


def test_earlier_positives_are_the_same_users_rows_before_the_target() -> None:
    # Rows in time order: a b a c a b.
    users = np.array(["a", "b", "a", "c", "a", "b"])
    # Held-out rows 4 (a's third) and 5 (b's second), and row 3 (c's first: nothing before).
    queries, rows = earlier_positives(users, np.array([4, 5, 3]))
    assert sorted(zip(queries.tolist(), rows.tolist(), strict=True)) == [(0, 0), (0, 2), (1, 1)]
