"""The item-to-item source as serving reads it: scoring a history, the candidate union, the blend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys.neighbours import ItemNeighbours, read_item_neighbours
from recsys.ranking import blend_candidates, blend_sources, union_candidates


def _table() -> ItemNeighbours:
    # a -> b (0.5), c (0.2); b -> a (0.5), d (-0.4); c -> d (0.3); d: no neighbours.
    return ItemNeighbours(
        item_ids=np.array(["a", "b", "c", "d"], dtype=object),
        neighbours=np.array([[1, 2], [0, 3], [3, -1], [-1, -1]], dtype=np.int32),
        weights=np.array([[0.5, 0.2], [0.5, -0.4], [0.3, 0.0], [0.0, 0.0]], dtype=np.float32),
        l2=200.0,
    )


def test_a_history_scores_by_summed_weights_without_its_own_items():
    ids, scores = _table().score(["a", "c", "unknown"], top=10)
    # b gets 0.5 from a; d gets 0.3 from c; c is in the history, so it is not returned.
    assert ids.tolist() == ["b", "d"]
    assert np.allclose(scores, [0.5, 0.3])


def test_negative_totals_are_not_candidates_and_top_cuts():
    ids, _ = _table().score(["b", "c"], top=10)
    assert ids.tolist() == ["a"]  # d: -0.4 + 0.3 < 0
    assert _table().score(["a"], top=1)[0].tolist() == ["b"]
    assert len(_table().score([], top=5)[0]) == 0


def test_the_table_round_trips_and_is_absent_where_not_written(tmp_path: Path):
    assert read_item_neighbours(tmp_path) is None
    _table().save(tmp_path / "item_neighbours.npz")
    back = read_item_neighbours(tmp_path)
    assert back is not None and back.l2 == 200.0
    assert back.item_ids.tolist() == ["a", "b", "c", "d"]
    assert np.array_equal(back.neighbours, _table().neighbours)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError, match="disagree"):
        ItemNeighbours(np.array(["a"], dtype=object), np.zeros((2, 1), np.int32), np.zeros((2, 1)), 1.0)


def test_union_appends_the_neighbours_items_below_the_retrieval_cut():
    cands, retrieval, neighbour = union_candidates(
        np.array([7, 3, 5]), np.array([3.0, 2.0, 1.0]), np.array([5, 9]), np.array([0.8, 0.4])
    )
    assert cands.tolist() == [7, 3, 5, 9]
    assert retrieval.tolist() == [3.0, 2.0, 1.0, 1.0]  # 9: at the lowest retrieved score
    assert neighbour.tolist() == [0.0, 0.0, 0.8, 0.4]


def test_blend_at_zero_is_retrieval_and_at_one_the_neighbour_order():
    retrieval, neighbour = np.array([3.0, 2.0, 1.0, 1.0]), np.array([0.0, 0.0, 0.8, 0.4])
    assert np.array_equal(blend_sources(retrieval, neighbour, 0.0), retrieval)
    assert np.argsort(-blend_sources(retrieval, neighbour, 1.0), kind="stable").tolist() == [2, 3, 0, 1]
    half = blend_sources(retrieval, neighbour, 0.5)
    assert half.tolist() == pytest.approx([0.5, 0.25, 0.5, 0.25])


def test_the_strongest_source_names_the_history_item_that_points_most():
    # b is pointed at by a (0.5); d by c (0.3) and by b negatively; a by b (0.5).
    assert _table().strongest_sources(["a", "b", "c"], ["b", "d", "a", "zzz"]) == ["a", "c", "b", None]
    assert _table().strongest_sources([], ["b"]) == [None]


def test_blend_candidates_orders_best_first_and_names_what_the_neighbours_placed():
    cands, blended, placed = blend_candidates(
        np.array([7, 3, 5]), np.array([3.0, 2.0, 1.0]), np.array([5, 9]), np.array([0.8, 0.4]), 0.5
    )
    # 7: 0.5 (retrieval), 5: 0 + 0.5 (neighbours), 3: 0.25, 9: 0.25 (neighbours).
    assert cands.tolist() == [7, 5, 3, 9]
    assert blended.tolist() == pytest.approx([0.5, 0.5, 0.25, 0.25])
    assert placed.tolist() == [False, True, False, True]
