"""The served-system replay and the serving-policy choice on hand-made candidates and scores."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from components.evaluation.fusion import choose_policy
from components.evaluation.served_policy import (
    Replay,
    Step,
    build_replay,
    business_rules,
    head_rerank,
    new_item_mask,
)
from recsys.config import GatewayConfig
from recsys.neighbours import ItemNeighbours

ITEMS = np.array(["a", "b", "c", "d", "e", "f"], dtype=object)
# a and b point the same way (near duplicates); the others are orthogonal to each other.
EMBEDDINGS = np.array(
    [[1, 0, 0, 0], [1, 0.01, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 1, 1, 0]], dtype=np.float32
)


def _replay(gateway: GatewayConfig, ranker: dict[str, np.ndarray] | None = None, k: int = 4) -> Replay:
    # One user whose retrieval order is a > b > c > d > e (f was seen) and a ranker that
    # prefers the reverse.
    return Replay(
        users=["u"],
        item_ids=ITEMS,
        candidates={"u": np.array([0, 1, 2, 3, 4])},
        retrieval={"u": np.array([0.9, 0.8, 0.7, 0.6, 0.5])},
        ranker=ranker if ranker is not None else {"u": np.array([0.1, 0.2, 0.3, 0.4, 0.5])},
        unit=EMBEDDINGS,
        allowed=np.ones(len(ITEMS), dtype=bool),
        seen={"u": np.array([5])},
        new_items=np.array([4]),
        gateway=gateway,
        k=k,
        seed=0,
    )


def test_fusion_weight_orders_from_ranker_alone_to_retrieval_alone():
    replay = _replay(GatewayConfig(mmr_trade_off=1.0, exploration_slots=0))
    assert replay.serve("u", Step(math.inf, mmr=False, explore=False)) == ["a", "b", "c", "d"]
    assert replay.serve("u", Step(0.0, mmr=False, explore=False)) == ["e", "d", "c", "b"]
    # Weight 2: ranks in [0, 1]; a: 0 + 2*1 = 2, b: .25 + 2*.75 = 1.75, c: 1.5, d: 1.25, e: 1.
    assert replay.serve("u", Step(2.0, mmr=False, explore=False)) == ["a", "b", "c", "d"]


def test_mmr_skips_the_near_duplicate_as_the_gateway_does():
    replay = _replay(GatewayConfig(mmr_trade_off=0.5, mmr_depth=5, exploration_slots=0), k=3)
    plain = replay.serve("u", Step(math.inf, mmr=False, explore=False))
    diverse = replay.serve("u", Step(math.inf, mmr=True, explore=False))
    assert plain == ["a", "b", "c"]
    assert diverse[0] == "a" and "b" not in diverse  # b is a's near duplicate


def test_exploration_puts_a_new_item_at_its_position_and_counts_against_the_list():
    gateway = GatewayConfig(mmr_trade_off=1.0, exploration_slots=1, exploration_position=1)
    replay = _replay(gateway, k=3)
    replay.new_items = np.array([3, 4])  # d and e are new; the top 3 (a, b, c) hold neither
    served = replay.serve("u", Step(math.inf, mmr=False, explore=True))
    assert served[0] == "a" and served[1] in {"d", "e"} and served[2] == "b"
    # Seen items are never explored: only f is new, and the user saw it.
    replay.new_items = np.array([5])
    assert replay.serve("u", Step(math.inf, mmr=False, explore=True)) == ["a", "b", "c"]


def test_business_rules_and_new_items_mirror_the_gateway_catalog():
    items = pd.DataFrame(
        {
            "item_id": ["a", "b", "c"],
            "category": ["games", "pets|books", "books"],
            "in_stock": [True, True, False],
            "published_ts": pd.to_datetime(["2026-09-01", "2026-10-20", "2026-11-05"], utc=True),
        }
    )
    ids = np.array(["a", "b", "c", "z"], dtype=object)  # z: not in the item table
    allowed = business_rules(items, ids, GatewayConfig(excluded_categories=["pets"]))
    assert allowed.tolist() == [True, False, False, True]
    train = pd.DataFrame(
        {"item_id": ["a"], "event_type": ["impression"], "ts": pd.to_datetime(["2026-10-25"], utc=True)}
    )
    as_of = pd.Timestamp("2026-11-01", tz="UTC")
    # b: published within 7 days of the newest item published before as_of (b itself);
    # c and z: never shown. a: shown, old.
    assert new_item_mask(items, train, ids, as_of, new_item_days=7).tolist() == [False, True, True, True]


def test_build_replay_filters_seen_and_rules_after_retrieval_and_scores_once():
    calls = []

    def scores(user_items):
        calls.append({u: list(v) for u, v in user_items.items()})
        return {u: np.arange(len(v), dtype=np.float32) for u, v in user_items.items()}

    allowed = np.ones(len(ITEMS), dtype=bool)
    allowed[2] = False  # c is out of stock
    replay = build_replay(
        users=["u"],
        item_ids=ITEMS,
        item_embeddings=EMBEDDINGS,
        query_embeddings=np.array([[1.0, 0.5, 0.2, 0.1]], dtype=np.float32),
        seen={"u": {"a"}},
        allowed=allowed,
        new_items=np.zeros(len(ITEMS), dtype=bool),
        ranker_scores=scores,
        gateway=GatewayConfig(candidates=4),
        k=3,
        seed=0,
        also_score={"u": ["b", "c"]},
    )
    # Top 4 by dot product: b (1.005), a (1.0), f (0.7), c (0.5); a seen, c out of stock.
    assert [ITEMS[p] for p in replay.candidates["u"]] == ["b", "f"]
    assert calls == [{"u": ["b", "f", "c"]}]  # one ranker pass, the extra item beside
    assert replay.ranker_score_of("u") == {"b": 0.0, "f": 1.0, "c": 2.0}


def test_head_rerank_reorders_only_the_head():
    replay = _replay(GatewayConfig())
    out = head_rerank(replay, {"u": ["a", "b", "c", "d", "e"]}, depth=3, weight=0.0)
    # Ranker alone on the head a, b, c (scores .1, .2, .3): c, b, a; d and e keep their places.
    assert out["u"] == ["c", "b", "a", "d", "e"]


def _policy_replay() -> Replay:
    """Two users; the ranker finds u1's relevant item, retrieval finds u2's."""
    return Replay(
        users=["u1", "u2"],
        item_ids=ITEMS,
        candidates={"u1": np.array([0, 1, 2]), "u2": np.array([0, 1, 2])},
        retrieval={"u1": np.array([0.9, 0.8, 0.7]), "u2": np.array([0.9, 0.8, 0.7])},
        ranker={"u1": np.array([0.1, 0.2, 0.9]), "u2": np.array([0.1, 0.2, 0.9])},
        unit=EMBEDDINGS,
        allowed=np.ones(len(ITEMS), dtype=bool),
        seen={},
        new_items=np.zeros(0, dtype=np.int64),
        gateway=GatewayConfig(mmr_trade_off=0.5, mmr_depth=3),
        k=3,
        seed=0,
    )


def test_the_ranker_is_not_served_when_it_lowers_the_validation_metric():
    # Both users' relevant item is a, first in retrieval order; the ranker puts c first.
    # At weight 0.5 the fused scores are a .5, b .75, c 1: c first too.
    choice = choose_policy(_policy_replay(), {"u1": {"a"}, "u2": {"a"}}, [0.0, 0.5], "ndcg@1", None, "test")
    assert choice.policy.retrieval_weight is None and not choice.policy.ranker_served
    reasons = choice.policy.reasons
    assert any("the ranker is not served: it lowered validation ndcg@1 from 1.0000" in r for r in reasons)
    assert [row["weight"] for row in choice.grid] == ["0", "0.5", "retrieval only"]
    assert choice.policy.mmr  # no truth: MMR serves as configured


def test_the_best_weight_serves_and_truth_vetoes_a_step_that_lowers_reward():
    relevant = {"u1": {"c"}, "u2": {"c"}}
    choice = choose_policy(_policy_replay(), relevant, [0.0, 1.0], "ndcg@1", None, "test")
    assert choice.policy.retrieval_weight == 0.0  # the ranker alone puts c first

    # A truth that rewards only a: every weight that puts c first lowers the expected reward.
    def reward_of(lists):
        return float(np.mean([lists[u][0] == "a" for u in lists]))

    vetoed = choose_policy(_policy_replay(), relevant, [0.0, 1.0], "ndcg@1", reward_of, "test")
    assert not vetoed.policy.ranker_served
    assert any("lowered the validation expected reward" in r for r in vetoed.policy.reasons)
    assert vetoed.grid[-1]["expected_reward"] == pytest.approx(1.0)


def test_where_the_truth_judges_the_weight_with_the_best_expected_reward_serves():
    # The logged positives say c (the ranker's pick); the truth rewards only a (retrieval's).
    relevant = {"u1": {"c"}, "u2": {"c"}}

    def reward_of(lists):
        return float(np.mean([lists[u][0] == "a" for u in lists]))

    by_truth = choose_policy(
        _policy_replay(), relevant, [0.0, 1.0], "ndcg@1", reward_of, "test", judge="reward"
    )
    assert not by_truth.policy.ranker_served
    assert any("no fusion weight raised the validation expected reward" in r for r in by_truth.policy.reasons)

    # A truth that rewards c: the ranker alone (weight 0) serves, by reward, not by the metric.
    def rewards_c(lists):
        return float(np.mean([lists[u][0] == "c" for u in lists]))

    chosen = choose_policy(
        _policy_replay(), {"u1": {"a"}, "u2": {"a"}}, [0.0, 1.0], "ndcg@1", rewards_c, "test", judge="reward"
    )
    assert chosen.policy.retrieval_weight == 0.0
    assert any("serves by the generator's truth" in r for r in chosen.policy.reasons)


def test_truth_leaves_out_mmr_that_lowers_reward():
    # Reward is the share of a and b in the top 2: MMR (trade-off .5) swaps b, a's near
    # duplicate, for c, so it lowers the reward.
    def reward_of(lists):
        return float(np.mean([len({"a", "b"} & set(lists[u][:2])) / 2 for u in lists]))

    choice = choose_policy(_policy_replay(), {"u1": {"a"}, "u2": {"a"}}, [1.0], "ndcg@1", reward_of, "test")
    assert not choice.policy.mmr
    assert any(r.startswith("MMR is not served") for r in choice.policy.reasons)
    assert choice.mmr["with"]["expected_reward"] < choice.mmr["without"]["expected_reward"]


def _neighbours_of_e() -> ItemNeighbours:
    """a (the user's history) points at e strongly and at d weakly; c is out of stock."""
    ids = ITEMS
    neighbours = np.full((len(ids), 3), -1, dtype=np.int32)
    weights = np.zeros((len(ids), 3), dtype=np.float32)
    neighbours[0], weights[0] = [4, 3, 2], [0.9, 0.1, 0.8]
    return ItemNeighbours(ids, neighbours, weights, l2=1.0)


def test_the_neighbour_source_joins_the_candidates_and_its_share_orders_them():
    allowed = np.ones(len(ITEMS), dtype=bool)
    allowed[2] = False
    replay = build_replay(
        users=["u"],
        item_ids=ITEMS,
        item_embeddings=EMBEDDINGS,
        query_embeddings=np.array([[0.0, 1.0, 0.0, 0.0]], dtype=np.float32),
        seen={"u": {"a"}},
        allowed=allowed,
        new_items=np.zeros(len(ITEMS), dtype=bool),
        ranker_scores=None,
        gateway=GatewayConfig(candidates=2, neighbour_candidates=5, mmr_trade_off=1.0, exploration_slots=0),
        k=3,
        seed=0,
        neighbours=_neighbours_of_e(),
        histories={"u": ["a"]},
    )
    # Retrieval's top 2: c (1.0, out of stock) and f (1.0); then b (0.01); e and d come from a.
    assert [ITEMS[p] for p in replay.candidates["u"]] == ["f", "e", "d"]
    assert replay.serve("u", Step(math.inf, mmr=False, explore=False)) == ["f"]  # no share: retrieval alone
    assert replay.serve("u", Step(math.inf, mmr=False, explore=False, blend=1.0)) == ["e", "d", "f"]

    choice = choose_policy(replay, {"u": {"e"}}, [0.0], "ndcg@1", None, "test", neighbour_weights=[0.5, 1.0])
    assert choice.policy.neighbour_weight == 0.5  # ties go to the smaller share
    assert [row["neighbour_weight"] for row in choice.policy.validation["neighbour_grid"]] == [0.0, 0.5, 1.0]
    assert any("item-to-item source serves with a 0.5 share" in r for r in choice.policy.reasons)


def test_the_category_taste_reorders_the_candidates_and_its_share_is_chosen():
    # The user took a (jazz); retrieval ranks b > c > d > e > f; d and f are jazz too.
    categories = [frozenset({"jazz"}), frozenset({"rock"}), frozenset({"pop"}), frozenset({"jazz"}),
                  frozenset(), frozenset({"jazz", "pop"})]  # fmt: skip
    replay = build_replay(
        users=["u"],
        item_ids=ITEMS,
        item_embeddings=EMBEDDINGS,
        query_embeddings=np.array([[1.0, 0.6, 0.3, 0.2]], dtype=np.float32),
        seen={"u": {"a"}},
        allowed=np.ones(len(ITEMS), dtype=bool),
        new_items=np.zeros(len(ITEMS), dtype=bool),
        ranker_scores=None,
        gateway=GatewayConfig(candidates=6, mmr_trade_off=1.0, exploration_slots=0),
        k=3,
        seed=0,
        histories={"u": ["a"]},
        item_categories=categories,
    )
    assert replay.taste is not None
    assert dict(zip(ITEMS[replay.candidates["u"]], replay.taste["u"], strict=True)) == {
        "b": 0.0, "f": 1.0, "c": 0.0, "d": 1.0, "e": 0.0,
    }  # fmt: skip
    assert replay.serve("u", Step(math.inf, mmr=False, explore=False)) == ["b", "f", "c"]
    assert replay.serve("u", Step(math.inf, mmr=False, explore=False, taste=1.0)) == ["f", "d", "b"]

    choice = choose_policy(replay, {"u": {"d"}}, [0.0], "ndcg@3", None, "test", taste_weights=[0.5, 1.0])
    # Half the score is enough to lift d into the top 3; ties go to the smaller share.
    assert choice.policy.taste_weight == 0.5
    assert [row["taste_weight"] for row in choice.policy.validation["taste_grid"]] == [0.0, 0.5, 1.0]
    assert any("category taste serves with a 0.5 share" in r for r in choice.policy.reasons)
    unchanged = choose_policy(replay, {"u": {"b"}}, [0.0], "ndcg@3", None, "test", taste_weights=[0.5])
    assert unchanged.policy.taste_weight == 0.0
    assert any(r.startswith("the category taste is not served") for r in unchanged.policy.reasons)
