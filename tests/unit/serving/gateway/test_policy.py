"""Serving policy rules on hand-made inputs."""

from collections import Counter

import numpy as np

from recsys.ranking import insert_exploration, mmr
from serving.gateway.policy import assign_arm


def test_arm_assignment_is_sticky_and_matches_fractions():
    fractions = {"canary": 0.1, "holdout": 0.05}
    arms = [assign_arm(f"u{i}", fractions) for i in range(20_000)]
    assert arms == [assign_arm(f"u{i}", fractions) for i in range(20_000)]
    c = Counter(arms)
    # Binomial std at n=20k, p=0.1 is ~0.002: 0.01 is a 5-sigma band.
    assert abs(c["canary"] / 20_000 - 0.10) < 0.01
    assert abs(c["holdout"] / 20_000 - 0.05) < 0.01


def test_growing_canary_moves_only_stable_users():
    small = {f"u{i}": assign_arm(f"u{i}", {"canary": 0.1, "holdout": 0.05}) for i in range(5000)}
    large = {f"u{i}": assign_arm(f"u{i}", {"canary": 0.3, "holdout": 0.05}) for i in range(5000)}
    for u, arm in small.items():
        if arm in ("canary", "holdout"):
            assert large[u] == arm
    assert sum(a == "canary" for a in large.values()) > sum(a == "canary" for a in small.values())


def test_mmr_with_lambda_one_is_top_k_by_relevance():
    rel = np.array([0.1, 0.9, 0.5, 0.7])
    emb = np.eye(4)
    assert mmr(rel, emb, 3, trade_off=1.0) == [1, 3, 2]


def test_mmr_skips_a_near_duplicate():
    # Items 0 and 1 are the same direction; 2 is orthogonal and a little less relevant.
    rel = np.array([1.0, 0.95, 0.8])
    emb = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]])
    # lambda 0.5: after picking 0, item 1 scores 0.5*0.75 - 0.5*1.0 < 0; item 2 scores 0.5*0 - 0 = 0.
    assert mmr(rel, emb, 2, trade_off=0.5) == [0, 2]
    assert mmr(rel, emb, 10, trade_off=0.5)[:2] == [0, 2]  # k larger than N is capped
    assert len(mmr(rel, emb, 10, trade_off=0.5)) == 3


def test_exploration_slot_keeps_the_head_and_no_duplicates():
    ranked = ["a", "b", "c", "d", "e"]
    out, explored = insert_exploration(ranked, ["new1", "c"], k=4, slots=1, position=2)
    assert out == ["a", "b", "new1", "c"]
    assert explored == {"new1"}
    # An exploration candidate already in the list is not inserted twice.
    out, explored = insert_exploration(ranked, ["b"], k=3, slots=1, position=1)
    assert out == ["a", "b", "c"] and explored == set()


def test_rank_fusion_orders_by_both_ranks_and_is_the_ranker_alone_at_weight_zero() -> None:
    import numpy as np

    from recsys.ranking import rank_fusion

    ranker = np.array([0.9, 0.1, 0.5])
    retrieval = np.array([1.0, 30.0, 2.0])  # another scale entirely
    assert np.array_equal(rank_fusion(ranker, retrieval, 0.0), ranker)
    fused = rank_fusion(ranker, retrieval, 2.0)
    # ranks in [0, 1]: ranker (1, 0, .5), retrieval (0, 1, .5) -> 1 + 0, 0 + 2, .5 + 1
    assert np.allclose(fused, [1.0, 2.0, 1.5])
    assert list(np.argsort(-fused)) == [1, 2, 0]


def test_sample_positions_draws_distinct_allowed_unexcluded_positions() -> None:
    from recsys.ranking import sample_positions

    candidates = np.arange(0, 1000, 2)  # the "new" items: even positions
    allowed = np.ones(1000, dtype=bool)
    allowed[:500] = False  # filtered or seen
    for seed in range(50):
        got = sample_positions(candidates, allowed, {600, 602}, 3, np.random.default_rng(seed))
        assert len(got) == 3 == len(set(got.tolist()))
        assert all(p % 2 == 0 and p >= 500 and p not in (600, 602) for p in got.tolist())
    same = [sample_positions(candidates, allowed, set(), 2, np.random.default_rng(7)) for _ in range(2)]
    assert same[0].tolist() == same[1].tolist()  # a request's seed gives the same exploration


def test_sample_positions_finds_a_sparse_pool_exactly() -> None:
    from recsys.ranking import sample_positions

    candidates = np.arange(10_000)
    allowed = np.zeros(10_000, dtype=bool)
    allowed[[17, 9_001, 5_000]] = True  # 3 of 10k qualify: random draws would miss them
    got = sample_positions(candidates, allowed, {5_000}, 5, np.random.default_rng(0))
    assert sorted(got.tolist()) == [17, 9_001]
    rng = np.random.default_rng(0)
    assert len(sample_positions(candidates, np.zeros(10_000, dtype=bool), set(), 1, rng)) == 0
    assert len(sample_positions(np.zeros(0, dtype=np.int64), allowed, set(), 1, rng)) == 0


def test_sample_positions_is_uniform_over_the_qualifying_set() -> None:
    from recsys.ranking import sample_positions

    candidates = np.arange(8)
    allowed = np.array([1, 0, 1, 1, 0, 1, 1, 0], dtype=bool)  # 0, 2, 3, 5, 6 qualify; 6 is excluded
    counts = np.zeros(8)
    for seed in range(4000):
        counts[sample_positions(candidates, allowed, {6}, 1, np.random.default_rng(seed))] += 1
    assert counts[[1, 4, 6, 7]].sum() == 0
    assert np.all(np.abs(counts[[0, 2, 3, 5]] - 1000) < 120)  # 4 equally likely, ~1000 each


def test_rank01_matches_the_rank_of_each_element_with_stable_ties() -> None:
    from recsys.ranking import rank01

    x = np.array([3.0, 1.0, 3.0, 2.0, 1.0])
    assert rank01(x).tolist() == [0.75, 0.0, 1.0, 0.5, 0.25]
    rng = np.random.default_rng(0)
    y = rng.integers(0, 20, size=500).astype(float)
    expected = np.argsort(np.argsort(y, kind="stable"), kind="stable") / (len(y) - 1)
    assert np.array_equal(rank01(y), expected)
