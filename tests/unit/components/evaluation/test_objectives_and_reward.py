"""The ranker's calibration table, the gate's reward and split conditions, and the reward of a
top-K under the generator's own truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components.evaluation.evaluate import gate
from components.evaluation.objectives import expected_calibration_error, reliability
from components.evaluation.reward import expected_reward_at_k, load_truth
from recsys.config import EvaluationConfig


def test_reliability_bins_compare_predicted_with_observed():
    predicted = np.array([0.05, 0.15, 0.12, 0.95, 0.91])
    observed = np.array([0, 1, 0, 1, 1])
    table = reliability(predicted, observed, bins=10)
    # Bins [0, .1): one impression, predicted .05, never clicked; [.1, .2): .135 vs 1 of 2;
    # [.9, 1]: .93 vs 2 of 2. Empty bins are left out.
    assert [(round(b["low"], 1), b["count"]) for b in table] == [(0.0, 1), (0.1, 2), (0.9, 2)]
    assert table[1]["predicted"] == pytest.approx(0.135) and table[1]["observed"] == pytest.approx(0.5)
    # ECE: (1 * .05 + 2 * .365 + 2 * .07) / 5.
    assert expected_calibration_error(table) == pytest.approx((0.05 + 2 * 0.365 + 2 * 0.07) / 5)
    # A prediction of exactly 1 falls in the last bin, not past it.
    assert reliability(np.array([1.0]), np.array([1.0]), bins=4)[0]["high"] == 1.0


def _metrics(served: float, popularity: float, rewards: dict | None = None, note: str | None = None) -> dict:
    return {
        "models": {"served": {"all": {"ndcg@10": served}}, "popularity": {"all": {"ndcg@10": popularity}}},
        "reward": {"systems": rewards} if rewards else {"systems": None},
        "split": {"note": note},
    }


def test_the_gate_reads_the_served_system_and_its_expected_reward():
    config = EvaluationConfig()
    assert config.gate_model == "served"
    assert gate(config, _metrics(0.3, 0.2))["blessed"]
    rewards = {"served": 0.10, "popularity": 0.12}
    refused = gate(config, _metrics(0.3, 0.2, rewards))
    assert (
        not refused["blessed"]
        and "expected reward 0.1000 does not beat popularity's 0.1200" in refused["reason"]
    )
    assert gate(config, _metrics(0.3, 0.2, {"served": 0.2, "popularity": 0.12}))["blessed"]


def test_where_the_truth_judges_the_metric_on_logged_positives_is_reported_not_decisive():
    rewards = {"served": 0.2, "popularity": 0.12}
    by_truth = gate(EvaluationConfig(judge="reward"), _metrics(0.1, 0.2, rewards))
    assert by_truth["blessed"] and "(reported; the generator's truth judges)" in by_truth["reason"]
    assert not gate(EvaluationConfig(judge="metric"), _metrics(0.1, 0.2, rewards))["blessed"]
    # Without truth the metric decides whatever the judge.
    assert not gate(EvaluationConfig(judge="reward"), _metrics(0.1, 0.2))["blessed"]


def test_the_gate_names_a_holdout_too_small_to_decide():
    note = "the time holdout has 3 users with a relevant item, fewer than min_holdout_users=50"
    verdict = gate(EvaluationConfig(), _metrics(0.3, 0.2, note=note))
    assert note in verdict["reason"]


def test_expected_reward_of_a_top_k_is_the_truths_own_mean(tmp_path: Path):
    from components.sources.synthetic import TRUTH_FOLDER, draw_truth, write_truth
    from tests.support.tiny_data import tiny_params

    write_truth(draw_truth(tiny_params()), tmp_path / "data" / TRUTH_FOLDER)
    truth, note = load_truth(tmp_path / "data")
    assert truth is not None and "generator truth" in note
    users = [str(u) for u in truth.user_ids[:3]]
    items = [str(i) for i in truth.item_ids[:6]]
    lists = {users[0]: items[:2], users[1]: items[2:4], users[2]: [items[4], "not-in-the-truth"]}
    reward = truth.expected_reward(users, items)
    # Mean over users of (sum of the top-2's expected reward) / 2; an unknown item earns 0.
    expected = np.mean([reward[0, :2].sum() / 2, reward[1, 2:4].sum() / 2, reward[2, 4] / 2])
    assert expected_reward_at_k(truth, lists, users, k=2, chunk=2) == pytest.approx(expected)


def test_data_without_a_truth_says_so(tmp_path: Path):
    truth, note = load_truth(tmp_path)
    assert truth is None and note.startswith("truth not available")
    assert load_truth(None)[1].startswith("truth not available")
