"""Top-K metrics on hand-made lists, with the expected values worked out in comments."""

from __future__ import annotations

import math

import pytest

from components.evaluation.evaluate import gate, popularity_ranking, retrieve
from components.evaluation.metrics import (
    coverage,
    hit_rate_at_k,
    ndcg_at_k,
    precision_at_k,
    recall_at_k,
    reciprocal_rank,
    summarize,
)
from components.evaluation.objectives import auc
from components.evaluation.splits import time_split
from recsys.config import EvaluationConfig

RANKED = ["a", "b", "c", "d", "e"]
RELEVANT = {"b", "e", "z"}  # "z" is relevant but never ranked


def test_precision_and_recall():
    # Top 2 = a, b: one hit. Precision 1/2; recall 1 of 3 relevant = 1/3.
    assert precision_at_k(RANKED, RELEVANT, 2) == pytest.approx(0.5)
    assert recall_at_k(RANKED, RELEVANT, 2) == pytest.approx(1 / 3)
    # Top 5 holds b and e: recall 2/3, precision 2/5.
    assert recall_at_k(RANKED, RELEVANT, 5) == pytest.approx(2 / 3)
    assert precision_at_k(RANKED, RELEVANT, 5) == pytest.approx(0.4)
    # A list shorter than k still divides precision by k: 2 hits / 10 slots.
    assert precision_at_k(RANKED, RELEVANT, 10) == pytest.approx(0.2)
    assert recall_at_k(RANKED, set(), 5) == 0.0


def test_hit_rate():
    assert hit_rate_at_k(RANKED, RELEVANT, 1) == 0.0  # "a" is not relevant
    assert hit_rate_at_k(RANKED, RELEVANT, 2) == 1.0


def test_ndcg():
    # Hits at ranks 2 and 5: DCG = 1/log2(3) + 1/log2(6). Three relevant items, k = 5: the
    # ideal list has hits at ranks 1, 2, 3: IDCG = 1 + 1/log2(3) + 1/log2(4).
    dcg = 1 / math.log2(3) + 1 / math.log2(6)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(RANKED, RELEVANT, 5) == pytest.approx(dcg / idcg)
    # A perfect list scores 1; with k = 1 only the first slot counts.
    assert ndcg_at_k(["b", "e", "z"], RELEVANT, 3) == pytest.approx(1.0)
    assert ndcg_at_k(RANKED, {"a"}, 1) == pytest.approx(1.0)
    assert ndcg_at_k(RANKED, {"b"}, 1) == 0.0


def test_reciprocal_rank():
    # First hit "b" at rank 2.
    assert reciprocal_rank(RANKED, RELEVANT) == pytest.approx(0.5)
    assert reciprocal_rank(RANKED, {"q"}) == 0.0


def test_coverage():
    # Top 2 of the two lists: {a, b} and {a, c} -> 3 distinct items of a 10-item catalog.
    assert coverage([["a", "b", "x"], ["a", "c"]], 10, 2) == pytest.approx(0.3)
    assert coverage([], 10, 2) == 0.0


def test_summarize_averages_over_users_with_relevant_items():
    ranked = {"u1": ["a", "b"], "u2": ["c", "d"], "u3": ["e"]}
    # u1: hit at rank 1 -> recall@1 = 1/1; u2: no hit -> 0; u3 has nothing relevant: skipped;
    # u4 ranked nothing -> 0. Mean over u1, u2, u4 = 1/3.
    relevant = {"u1": {"a"}, "u2": {"x"}, "u3": set(), "u4": {"a"}}
    out = summarize(ranked, relevant, [1])
    assert out["users"] == 3
    assert out["recall@1"] == pytest.approx(1 / 3)
    assert out["mrr"] == pytest.approx(1 / 3)


def test_auc():
    # Positives scored 0.9 and 0.4, negatives 0.5 and 0.1: of the 4 (positive, negative)
    # pairs, 3 are ordered right (0.9>0.5, 0.9>0.1, 0.4>0.1) -> 0.75. A tie counts half.
    assert auc([1, 0, 1, 0], [0.9, 0.5, 0.4, 0.1]) == pytest.approx(0.75)
    assert auc([1, 0], [0.3, 0.3]) == pytest.approx(0.5)
    assert math.isnan(auc([1, 1], [0.1, 0.2]))


def test_time_split_cuts_at_whole_days():
    import pandas as pd

    ts = pd.to_datetime(
        ["2026-10-01T10:00Z", "2026-10-02T23:59Z", "2026-10-03T00:00Z", "2026-10-03T15:00Z"], utc=True
    )
    events = pd.DataFrame({"event_id": list("abcd"), "ts": ts})
    # Last event on Oct 3: the cut is the end of Oct 3 minus 1 day = Oct 3 00:00.
    train, holdout = time_split(events, 1)
    assert list(train["event_id"]) == ["a", "b"]
    assert list(holdout["event_id"]) == ["c", "d"]


def test_retrieve_excludes_seen_and_orders_by_dot_product():
    import numpy as np

    items = np.array(["a", "b", "c"], dtype=object)
    emb = np.array([[1.0, 0.0], [0.5, 0.0], [0.0, 1.0]], dtype=np.float32)
    q = np.array([[1.0, 0.2]], dtype=np.float32)
    # Scores: a 1.0, b 0.5, c 0.2; "a" is seen -> b, c.
    ranked, scores = retrieve(q, items, emb, ["u"], {"u": {"a"}}, depth=5)
    assert ranked["u"] == ["b", "c"]
    assert scores["u"].tolist() == pytest.approx([0.5, 0.2])


def test_popularity_counts_distinct_users_and_skips_seen():
    import numpy as np
    import pandas as pd

    train = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u3", "u3"],
            "item_id": ["a", "a", "b", "b", "a"],
            "event_type": ["click", "view", "click", "click", "impression"],
        }
    )
    # a: one distinct user (u1; the impression does not count); b: two users -> b, a, c.
    items = np.array(["a", "b", "c"], dtype=object)
    out = popularity_ranking(train, items, ["u1", "u9"], {"u1": {"a"}}, depth=3)
    assert out["u9"] == ["b", "a", "c"]
    assert out["u1"] == ["b", "c"]


def _metrics(model_value: float, popularity_value: float) -> dict:
    return {
        "models": {
            "retriever_ranker": {"all": {"ndcg@10": model_value}},
            "popularity": {"all": {"ndcg@10": popularity_value}},
        }
    }


def test_gate_needs_to_beat_popularity_and_keep_up_with_serving():
    config = EvaluationConfig(gate_metric="ndcg@10", gate_model="retriever_ranker", gate_margin=0.02)
    assert gate(config, _metrics(0.30, 0.20))["blessed"]
    lost = gate(config, _metrics(0.19, 0.20))
    assert not lost["blessed"] and "does not beat popularity" in lost["reason"]
    # Serving at 0.31: 0.30 is within the 0.02 margin; 0.28 trails by 0.03 > 0.02.
    assert gate(config, _metrics(0.30, 0.20), _metrics(0.31, 0.2))["blessed"]
    worse = gate(config, _metrics(0.28, 0.20), _metrics(0.31, 0.2))
    assert not worse["blessed"] and "beyond the margin" in worse["reason"]
    assert worse["serving"] == pytest.approx(0.31)


def test_where_the_truth_judges_the_serving_model_is_compared_on_expected_reward():
    config = EvaluationConfig(gate_metric="ndcg@10", gate_model="retriever_ranker", gate_reward_margin=0.02)

    def with_reward(ndcg: float, reward: float) -> dict:
        return {
            **_metrics(ndcg, 0.10),
            "reward": {"systems": {"retriever_ranker": reward, "popularity": 0.08}},
        }

    # Far behind on logged positives (which favour the model that chose what was shown), ahead
    # on the truth's reward: blessed, and the reason says which number decided.
    ahead = gate(config, with_reward(0.12, 0.28), with_reward(0.24, 0.25))
    assert ahead["blessed"] and "within the serving model's 0.2500" in ahead["reason"]
    assert ahead["serving_reward"] == pytest.approx(0.25)
    # 0.246 is within 2% of 0.25; 0.244 is not, whatever its ndcg.
    assert gate(config, with_reward(0.12, 0.246), with_reward(0.24, 0.25))["blessed"]
    behind = gate(config, with_reward(0.40, 0.244), with_reward(0.24, 0.25))
    assert not behind["blessed"] and "worse than the serving model's 0.2500" in behind["reason"]
    # Judged by the metric, the metric still decides against the serving model.
    by_metric = config.model_copy(update={"judge": "metric"})
    assert not gate(by_metric, with_reward(0.12, 0.28), with_reward(0.24, 0.25))["blessed"]


def test_unknown_gate_metric_is_refused():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        EvaluationConfig(gate_metric="auc@10")
