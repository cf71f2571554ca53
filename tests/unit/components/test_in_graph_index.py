"""The in-graph partitioned search on tiny hand-made data, against brute force.

Five leaves over 23 items in 4 dimensions, of sizes 9, 0, 2, 7 and 5: an empty leaf, and
leaves too small to fill k, so padding shows. The reference is plain NumPy: score every
item of the query's best leaves, sort, pad.
"""

from __future__ import annotations

import numpy as np
import pytest

from components.in_graph_index import (
    LeafPartition,
    LeafTables,
    PartitionError,
    exact_index,
    fewest_leaves_for,
    fewest_leaves_holding,
    items_searched,
    leaf_order,
    partitioned_index,
    read_scann_partition,
    recall_by_leaves,
    searcher_partition,
)
from components.indexing import exact_top_k, partitioned_setting, recall_at_k

SIZES = [9, 0, 2, 7, 5]


@pytest.fixture(scope="module")
def data() -> tuple[LeafPartition, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    centroids = rng.normal(size=(5, 4)).astype(np.float32)
    leaf_of_item = np.repeat(np.arange(5), SIZES).astype(np.int32)
    rng.shuffle(leaf_of_item)  # catalog rows are not in leaf order
    items = (centroids[leaf_of_item] + 0.3 * rng.normal(size=(23, 4))).astype(np.float32)
    queries = rng.normal(size=(6, 4)).astype(np.float32)
    return LeafPartition(centroids, leaf_of_item), items, queries


def _brute_force(
    partition: LeafPartition, items: np.ndarray, queries: np.ndarray, leaves: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows and scores of each query's top k among the items of its best ``leaves`` leaves."""
    rows_out = np.full((len(queries), k), -1)
    scores_out = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for n, q in enumerate(queries):
        best = np.argsort(-(partition.centroids @ q), kind="stable")[:leaves]
        rows = np.flatnonzero(np.isin(partition.leaf_of_item, best))
        scores = items[rows] @ q
        order = np.argsort(-scores, kind="stable")[:k]
        rows_out[n, : len(order)] = rows[order]
        scores_out[n, : len(order)] = scores[order]
    return rows_out, scores_out


def _search(module, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow as tf

    run = tf.function(lambda q: module.search(q, k), input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    scores, rows = run(tf.constant(queries))
    return rows.numpy(), scores.numpy()


@pytest.mark.parametrize("leaves", [1, 2, 3, 5])
def test_a_batch_of_queries_matches_brute_force_over_the_searched_leaves(data, leaves):
    partition, items, queries = data
    index = partitioned_index(LeafTables.build(partition, items), leaves)
    rows, scores = _search(index, queries, k=6)
    want_rows, want_scores = _brute_force(partition, items, queries, leaves, k=6)
    assert rows.shape == (6, 6) and rows.dtype == np.int32
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)


def test_fewer_candidates_than_k_are_padded_after_the_real_ones(data):
    partition, items, queries = data
    # One leaf holds at most 9 items: asking for 10 always pads, by a leaf's shortfall.
    rows, scores = _search(partitioned_index(LeafTables.build(partition, items), 1), queries, k=10)
    best = np.argmax(queries @ partition.centroids.T, axis=1)
    for n, leaf in enumerate(best):
        real = SIZES[leaf]
        assert (rows[n, :real] >= 0).all() and (rows[n, real:] == -1).all()
        assert np.isfinite(scores[n, :real]).all() and np.isneginf(scores[n, real:]).all()
        assert set(rows[n, :real]) == set(np.flatnonzero(partition.leaf_of_item == leaf))


def test_k_above_the_catalog_returns_every_item_then_padding(data):
    partition, items, queries = data
    exact_rows, exact_scores = exact_top_k(items, queries, 23)
    for module in (partitioned_index(LeafTables.build(partition, items), 5), exact_index(items)):
        rows, scores = _search(module, queries, k=30)
        np.testing.assert_array_equal(rows[:, :23], exact_rows)
        np.testing.assert_allclose(scores[:, :23], exact_scores, rtol=1e-5, atol=1e-6)
        assert (rows[:, 23:] == -1).all() and np.isneginf(scores[:, 23:]).all()


def test_leaves_to_search_beyond_the_partition_is_all_leaves_and_an_empty_batch_works(data):
    partition, items, queries = data
    index = partitioned_index(LeafTables.build(partition, items), 50)
    rows, _ = _search(index, queries, k=5)
    np.testing.assert_array_equal(rows, exact_top_k(items, queries, 5)[0])
    empty_rows, empty_scores = _search(index, queries[:0], k=5)
    assert empty_rows.shape == (0, 5) and empty_scores.shape == (0, 5)


def test_recall_by_leaves_is_the_recall_the_graph_gets(data):
    partition, items, queries = data
    exact_rows, _ = exact_top_k(items, queries, 4)
    order = leaf_order(partition, queries)
    recalls = recall_by_leaves(partition, order, exact_rows)
    tables = LeafTables.build(partition, items)
    for leaves in range(1, 6):
        rows, _ = _search(partitioned_index(tables, leaves), queries, k=4)
        assert recalls[leaves - 1] == pytest.approx(recall_at_k(rows, exact_rows))
        searched = items_searched(partition, order, leaves)
        assert searched.tolist() == [int(np.isin(partition.leaf_of_item, o[:leaves]).sum()) for o in order]
    assert recalls[-1] == 1.0
    # The fewest leaves reaching a target; all of them (exact) when nothing short of that does.
    assert fewest_leaves_for(np.array([0.5, 0.9, 0.96, 1.0]), 0.95) == 3
    assert fewest_leaves_for(np.array([0.5, 0.9]), 0.95) == 2


def test_tables_refuse_embeddings_of_another_catalog(data):
    partition, items, _ = data
    with pytest.raises(PartitionError, match="22 embeddings for a partition of 23 items"):
        LeafTables.build(partition, items[:22])


def test_the_partition_is_read_back_from_a_serialized_scann_searcher(tmp_path):
    from scann import scann_ops_pybind

    rng = np.random.default_rng(0)
    items = rng.normal(size=(400, 8)).astype(np.float32)
    searcher = (
        scann_ops_pybind.builder(items, 10, "dot_product")
        .tree(num_leaves=6, num_leaves_to_search=2, training_sample_size=400, min_partition_size=5)
        .score_brute_force()
        .build()
    )
    partition = searcher_partition(searcher)
    assert partition.centroids.shape == (6, 8) and partition.leaf_of_item.shape == (400,)
    assert partition.sizes().sum() == 400
    # ScaNN assigns each item to its nearest centroid (squared L2).
    nearest = np.argmin(((items[:, None, :] - partition.centroids[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(partition.leaf_of_item, nearest)
    partition.save(tmp_path / "partition.npz")
    again = LeafPartition.load(tmp_path / "partition.npz")
    np.testing.assert_array_equal(again.leaf_of_item, partition.leaf_of_item)
    # A brute-force searcher has no leaves to read.
    flat = scann_ops_pybind.builder(items, 10, "dot_product").score_brute_force().build()
    (tmp_path / "flat").mkdir()
    flat.serialize(str(tmp_path / "flat"), relative_path=True)
    with pytest.raises(PartitionError, match="no partition"):
        read_scann_partition(tmp_path / "flat")


def test_fewest_leaves_holding_covers_the_candidates_for_nearly_every_query() -> None:
    # Leaves of 10, 20, 30 and 40 items; every query searches them in one order.
    leaf_of_item = np.repeat(np.arange(4), [10, 20, 30, 40]).astype(np.int32)
    partition = LeafPartition(np.eye(4, dtype=np.float32), leaf_of_item)
    order = np.tile(np.array([[3, 2, 1, 0]]), (100, 1))
    assert fewest_leaves_holding(partition, order, 40) == 1
    assert fewest_leaves_holding(partition, order, 41) == 2
    assert fewest_leaves_holding(partition, order, 95) == 4
    # More than the catalog: every leaf, not an error.
    assert fewest_leaves_holding(partition, order, 1000) == 4
    # One query in a hundred may fall short; two may not.
    reversed_order = np.array([[0, 1, 2, 3]])
    assert fewest_leaves_holding(partition, np.concatenate([order[:99], reversed_order]), 41) == 2
    assert (
        fewest_leaves_holding(partition, np.concatenate([order[:98], reversed_order.repeat(2, 0)]), 41) == 3
    )


def test_partitioned_setting_searches_enough_leaves_for_the_candidates() -> None:
    rng = np.random.default_rng(0)
    leaf_of_item = rng.integers(0, 50, size=2000).astype(np.int32)
    centroids = rng.normal(size=(50, 8)).astype(np.float32)
    partition = LeafPartition(centroids, leaf_of_item)
    queries = rng.normal(size=(200, 8)).astype(np.float32)
    order = leaf_order(partition, queries)
    exact = np.zeros((200, 1), dtype=np.int64)  # an item every query finds in its leaves
    for_recall = partitioned_setting(partition, queries, exact, target=0.0)
    with_candidates = partitioned_setting(partition, queries, exact, target=0.0, candidates=500)
    assert for_recall.leaves_to_search == 1
    assert with_candidates.leaves_for_recall == 1
    assert with_candidates.leaves_to_search > 1
    held = items_searched(partition, order, with_candidates.leaves_to_search)
    assert (held >= 500).mean() >= 0.99
    fewer = items_searched(partition, order, with_candidates.leaves_to_search - 1)
    assert (fewer >= 500).mean() < 0.99
