"""The kernel's ordering rules: rank fusion at its extremes and the pushed serving policy."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from recsys.ranking import (
    ServingPolicy,
    category_taste,
    rank_fusion,
    read_serving_policy,
    session_feedback,
    taste_candidates,
    write_serving_policy,
)


def test_rank_fusion_at_weight_zero_and_infinity():
    ranker, retrieval = np.array([0.9, 0.1, 0.5]), np.array([1.0, 3.0, 2.0])
    assert np.array_equal(rank_fusion(ranker, retrieval, 0.0), ranker)
    # An infinite weight is the ranker not served: retrieval scores decide alone.
    assert np.array_equal(rank_fusion(ranker, retrieval, math.inf), retrieval)


def test_serving_policy_round_trips_beside_a_version(tmp_path: Path):
    version = tmp_path / "retrieval" / "3"
    assert read_serving_policy(version) is None  # a version pushed before policies existed
    policy = ServingPolicy(
        retrieval_weight=None, mmr=False, rank_depth=500, reasons=["the ranker lowered it"]
    )
    write_serving_policy(version, policy)
    back = read_serving_policy(version)
    assert back == policy and not back.ranker_served and back.fusion_weight == math.inf
    assert ServingPolicy(retrieval_weight=2.0, rank_depth=10).fusion_weight == 2.0


def test_a_bad_policy_is_refused_naming_the_field():
    with pytest.raises(ValidationError, match="retrieval_weight"):
        ServingPolicy(retrieval_weight=-1.0, rank_depth=10)


def test_category_taste_is_the_largest_share_of_recent_items_in_a_candidates_categories():
    recent = [frozenset({"jazz"}), frozenset({"jazz", "soul"}), frozenset({"rock"}), frozenset({"jazz"})]
    candidates = [frozenset({"jazz"}), frozenset({"soul", "rock"}), frozenset({"pop"}), frozenset()]
    taste = category_taste(candidates, recent)
    assert taste.tolist() == [0.75, 0.25, 0.0, 0.0]
    assert category_taste(candidates, []).tolist() == [0.0] * 4  # no history, no opinion


def test_taste_candidates_orders_best_first_and_names_what_the_taste_placed():
    scores, taste = np.array([3.0, 1.0, 2.0, 0.0]), np.array([0.0, 1.0, 0.2, 0.0])
    order, blended, placed = taste_candidates(scores, taste, 0.5)
    assert order.tolist() == [1, 0, 2, 3]
    assert np.all(np.diff(blended) <= 0)
    # item 1 is there for its category (0.5 of 1.0 against nothing from its score);
    # item 2's score part (0.5 x 2/3) outweighs its taste part (0.5 x 0.2).
    assert placed.tolist() == [True, False, False, False]


def test_session_feedback_sinks_items_passed_over() -> None:
    scores = np.array([4.0, 3.0, 2.0, 1.0])
    # Nothing passed over: the order is kept (scaled to [0, 1]).
    same = session_feedback(scores, np.zeros(4), 0.5)
    assert same.tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])
    # The best item passed over twice falls below the second and third (1 x 0.25 < 1/3);
    # passed over once it stays above the third (0.5 > 1/3).
    assert np.argsort(-session_feedback(scores, np.array([2, 0, 0, 0]), 0.5)).tolist() == [1, 2, 0, 3]
    assert np.argsort(-session_feedback(scores, np.array([1, 0, 0, 0]), 0.5)).tolist() == [1, 0, 2, 3]
    # Any scale, negative scores included, gives the same discount.
    shifted = session_feedback(scores * 10 - 100, np.array([1, 0, 0, 0]), 0.5)
    assert shifted.tolist() == pytest.approx([0.5, 2 / 3, 1 / 3, 0.0])
    # Off (decay 1) is the scaled scores whatever was passed over.
    assert session_feedback(scores, np.array([3, 3, 0, 0]), 1.0).tolist() == pytest.approx(same.tolist())
    assert session_feedback(np.zeros(0), np.zeros(0), 0.5).shape == (0,)
