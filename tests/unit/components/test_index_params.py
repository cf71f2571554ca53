"""Index parameters derived from the catalog size (pure: no ScaNN, no TensorFlow)."""

from __future__ import annotations

import numpy as np
import pytest

from components.indexing import exact_top_k, index_params, recall_at_k
from recsys.config import IndexConfig


def test_small_catalog_is_exact_and_says_so():
    p = index_params(1999, 64, IndexConfig())
    assert p.algorithm == "brute_force"
    assert p.num_leaves == 0 and p.reorder == 0
    assert p.k == 100


def test_k_is_capped_at_the_catalog():
    # 80 items cannot give 100 neighbours: the index asks for all 80.
    assert index_params(80, 16, IndexConfig()).k == 80


def test_one_million_items_match_the_measured_production_setting():
    # 4 x sqrt(1M) = 4000 leaves; ScaNN searches 5% of them = 200; reorder 4 x 100 = 400
    # (BENCHMARKS.md, the in-graph partitioned search).
    p = index_params(1_000_000, 64, IndexConfig())
    assert (p.algorithm, p.num_leaves, p.num_leaves_to_search, p.reorder) == ("scann", 4000, 200, 400)
    assert p.dimensions_per_block == 2
    # k-means trains on 50 items per leaf and merges leaves under a tenth of that (5).
    assert (p.training_sample_size, p.min_partition_size) == (200_000, 5)


@pytest.mark.parametrize("n", [2000, 5000, 20_000, 100_000, 3_000_000])
def test_leaves_grow_as_sqrt_n_and_search_has_a_floor(n):
    p = index_params(n, 32, IndexConfig())
    assert p.algorithm == "scann"
    # 4 sqrt(N) leaves, but none averaging under 16 items (2000 items: 125 leaves, not 179).
    assert p.num_leaves == min(round(4 * n**0.5), n // 16)
    # At least min_leaves_to_search (10) leaves, never more than there are.
    assert 10 <= p.num_leaves_to_search <= p.num_leaves
    # k-means keeps leaves at least this big, counted in its training sample: far below the
    # sample's average leaf.
    assert p.min_partition_size <= max(1, p.training_sample_size / p.num_leaves / 10)
    assert p.reorder == min(n, 400)


def test_brute_force_threshold_and_knobs_come_from_config():
    cfg = IndexConfig(
        brute_force_below=0, leaves_per_sqrt_n=1, leaves_to_search_fraction=0.2, reorder_multiplier=2,
        recall_k=10,
    )  # fmt: skip
    p = index_params(10_000, 8, cfg)
    assert p.algorithm == "scann"
    assert p.num_leaves == 100  # 1 x sqrt(10k)
    assert p.num_leaves_to_search == 20  # 20% of 100 leaves
    assert p.reorder == 20  # 2 x k


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="at least one item"):
        index_params(0, 8, IndexConfig())


def test_exact_top_k_and_recall():
    emb = np.eye(4, dtype=np.float32)
    q = np.array([[0.1, 0.9, 0.5, 0.0]], dtype=np.float32)
    idx, scores = exact_top_k(emb, q, 2)
    assert idx.tolist() == [[1, 2]]  # best first
    assert scores[0].tolist() == pytest.approx([0.9, 0.5])
    # One of the two exact neighbours found; a -1 pad counts as a miss.
    assert recall_at_k(np.array([[1, -1]]), idx) == 0.5
