"""The exploration bandits: choices per policy, and posteriors that count each event once."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.exploration import EXPLORATION_KINDS, BetaPosteriors, ExplorationPolicy, LinUCB


def _play(kind: str, rounds: int, seed: int, p: dict[str, float], epsilon: float = 0.1) -> list[str]:
    """``rounds`` one-slot requests against arms of click probability ``p``; the arms chosen."""
    policy = ExplorationPolicy(kind, epsilon)  # type: ignore[arg-type]
    post = BetaPosteriors()
    rng = np.random.default_rng(seed)
    chosen = []
    for r in range(rounds):
        (item,) = policy.choose(list(p), post, "seg", 1, rng)
        post.update([(f"req{r}", "seg", item, bool(rng.random() < p[item]))])
        chosen.append(item)
    return chosen


def test_thompson_concentrates_on_the_better_arm() -> None:
    chosen = _play("thompson", 400, seed=7, p={"good": 0.30, "bad": 0.05})
    late = chosen[-200:]
    assert late.count("good") / len(late) > 0.9
    # and it did try the worse arm early
    assert "bad" in chosen[:50]


def test_uniform_does_not_learn() -> None:
    chosen = _play("uniform", 400, seed=7, p={"good": 0.30, "bad": 0.05})
    assert 0.4 < chosen[-200:].count("good") / 200 < 0.6


def test_epsilon_greedy_explores_at_rate_epsilon() -> None:
    policy = ExplorationPolicy("epsilon_greedy", epsilon=0.2)
    post = BetaPosteriors()
    # one arm known to be best; 4 others unseen
    post.update([(f"r{n}", "", "best", n < 80) for n in range(100)])  # mean 0.8 > the prior 0.5
    pool = ["best", "a", "b", "c", "d"]
    rng = np.random.default_rng(3)
    picks = [policy.choose(pool, post, "", 1, rng)[0] for _ in range(5000)]
    off = sum(p != "best" for p in picks) / len(picks)
    # a uniform pick lands on a non-best arm 4 times in 5
    assert off == pytest.approx(0.2 * 4 / 5, abs=0.02)


def test_epsilon_zero_is_greedy_and_ties_break_at_random() -> None:
    policy = ExplorationPolicy("epsilon_greedy", epsilon=0.0)
    rng = np.random.default_rng(0)
    picks = {policy.choose(["a", "b", "c"], BetaPosteriors(), "", 1, rng)[0] for _ in range(200)}
    assert picks == {"a", "b", "c"}


def test_none_picks_nothing_and_every_kind_respects_n() -> None:
    rng = np.random.default_rng(0)
    assert ExplorationPolicy("none").choose(["a", "b"], BetaPosteriors(), "", 2, rng) == []
    for kind in EXPLORATION_KINDS:
        learner = LinUCB() if kind == "linucb" else BetaPosteriors()
        got = ExplorationPolicy(kind).choose(["a", "b", "c", "a"], learner, "", 2, rng)
        assert len(got) == (0 if kind == "none" else 2) and len(set(got)) == len(got)
        assert ExplorationPolicy(kind).choose([], learner, "", 2, rng) == []


def test_unknown_kind_and_bad_epsilon_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown exploration policy"):
        ExplorationPolicy("exp3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epsilon"):
        ExplorationPolicy("epsilon_greedy", epsilon=1.5)
    with pytest.raises(ValueError, match="prior"):
        BetaPosteriors(prior_alpha=0)


def test_updates_are_idempotent_per_request_and_item() -> None:
    post = BetaPosteriors(prior_alpha=2, prior_beta=3)
    assert post.record_trial("r1", "FR", "x")
    assert not post.record_trial("r1", "FR", "x")  # the same impression again
    assert post.record_click("r1", "x")
    assert not post.record_click("r1", "x")  # a repeated click event
    assert post.counts("FR", "x") == (1, 1)
    alpha, beta = post.params("FR", ["x", "unseen"])
    assert alpha.tolist() == [3.0, 2.0] and beta.tolist() == [3.0, 3.0]
    # a click naming a request that did not explore the item counts nothing
    assert not post.record_click("r2", "x")
    assert not post.record_click("r1", "y")
    # another request is another trial; segments are separate arms
    post.update([("r2", "FR", "x", False), ("r3", "DE", "x", True), ("r3", "DE", "x", True)])
    assert post.counts("FR", "x") == (2, 1) and post.counts("DE", "x") == (1, 1)
    assert post.total_trials == 3 and post.total_clicks == 2


def test_memory_is_bounded() -> None:
    post = BetaPosteriors(max_arms=3, max_pending=2)
    for n in range(5):
        post.record_trial(f"r{n}", "", f"i{n}")
    assert len(post) == 3 and post.counts("", "i0") == (0, 0)  # forgotten: the prior again
    assert post.counts("", "i4") == (1, 0)
    assert not post.record_click("r0", "i0")  # its trial no longer waits for a click
    assert post.record_click("r4", "i4")
    summary = post.summary(top=2)
    assert summary["arms"] == 3 and summary["pending_trials"] == 2 and len(summary["top_arms"]) == 2  # type: ignore[arg-type]


def _linear_world(seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """20 arms whose click probability is linear in known features: 0.6 x the first
    coordinate of a unit vector with non-negative coordinates (so in [0, 0.6])."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(size=(20, 5)))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return [f"i{n}" for n in range(20)], x, 0.6 * x[:, 0]


def _play_linear(kind: str, rounds: int, seed: int) -> tuple[LinUCB, list[int]]:
    items, x, p = _linear_world(seed)
    model = LinUCB()
    model.set_features(items, x)
    policy = ExplorationPolicy(kind)  # type: ignore[arg-type]
    rng = np.random.default_rng(seed + 1)
    chosen = []
    for r in range(rounds):
        (item,) = policy.choose(items, model, "", 1, rng)
        j = items.index(item)
        model.update([(f"req{r}", "", item, bool(rng.random() < p[j]))])
        chosen.append(j)
    return model, chosen


def test_linucb_learns_a_linear_click_rate() -> None:
    _, _, p = _linear_world(0)
    best = int(np.argmax(p))  # 0.51; the next best 0.30, the mean 0.25
    model, chosen = _play_linear("linucb", 600, seed=0)
    late = chosen[300:]
    # uniform lands on the best of 20 arms 1 time in 20; LinUCB, having learned theta, ~all the time
    assert late.count(best) / len(late) > 0.8
    _, uniform = _play_linear("uniform", 600, seed=0)
    assert uniform[300:].count(best) / 300 < 0.1
    assert p[late].mean() > p[uniform[300:]].mean() + 0.15
    # and its estimate of the best arm's click rate is near the truth
    assert float(model.mean("", ["i" + str(best)])[0]) == pytest.approx(p[best], abs=0.1)


def test_linucb_scores_are_the_ridge_regression_bound() -> None:
    model = LinUCB(alpha=2.0, ridge=4.0)
    model.set_features(["a", "b"], np.asarray([[3.0, 0.0], [0.0, 1.0]]))  # normalised: e1, e2
    # before any trial: theta = 0 and x' A^-1 x = 1/ridge for every unit x
    assert model.scores("", ["a", "b", "new"]).tolist() == pytest.approx([1.0, 1.0, 1.0])
    model.update([("r1", "", "a", True), ("r2", "", "a", False)])
    # A = diag(4 + 2, 4), b = (1, 0): theta = (1/6, 0); a: 1/6 + 2 sqrt(1/6); b untouched
    got = model.scores("", ["a", "b", "new"])
    assert got.tolist() == pytest.approx([1 / 6 + 2 * np.sqrt(1 / 6), 1.0, 1.0])
    assert model.mean("", ["a", "new"]).tolist() == pytest.approx([1 / 6, 0.0])
    # an item without an embedding keeps the prior's (maximal) bonus: picked over "a" now
    assert ExplorationPolicy("linucb").choose(["a", "new"], model, "", 1, np.random.default_rng(0)) == ["new"]
    # another segment has its own regression
    assert model.scores("FR", ["a"]).tolist() == pytest.approx([1.0])


def test_linucb_counts_each_trial_and_click_once() -> None:
    model = LinUCB()
    model.set_features(["x", "y"], np.eye(2))
    assert model.record_trial("r1", "", "x")
    assert not model.record_trial("r1", "", "x")  # the same impression again
    assert model.record_click("r1", "x")
    assert not model.record_click("r1", "x")  # a repeated click event
    # a click on an unseen trial (another request, another item) counts nothing
    assert not model.record_click("r2", "x") and not model.record_click("r1", "y")
    assert model.total_trials == 1 and model.total_clicks == 1
    # one trial, one click: A = diag(2, 1), b = (1, 0)
    assert model.mean("", ["x", "y"]).tolist() == pytest.approx([0.5, 0.0])
    summary = model.summary()
    assert summary["dimension"] == 2 and summary["trials"] == 1 and summary["clicks"] == 1
    # a trial of an item without an embedding counts, and teaches nothing
    assert model.record_trial("r3", "", "new") and model.record_click("r3", "new")
    assert model.mean("", ["x"]).tolist() == pytest.approx([0.5])


def test_linucb_memory_is_bounded_and_a_new_space_starts_over() -> None:
    model = LinUCB(max_items=3, max_pending=2, max_segments=2)
    model.set_features([f"i{n}" for n in range(5)], np.eye(5))
    assert len(model) == 3 and model.features(["i0"])[1].tolist() == [False]
    for n in range(3):
        model.record_trial(f"r{n}", f"s{n}", "i4")
    assert model.summary()["segments"] == 2 and model.summary()["pending_trials"] == 2
    assert not model.record_click("r0", "i4")  # its trial no longer waits for a click
    assert model.record_click("r2", "i4")
    # a zero row is "no embedding"; another retrieval version is another space: the prior again
    model.set_features(["i4"], np.zeros((1, 5)))
    assert model.features(["i4"])[1].tolist() == [False]
    model.set_features(["i3"], np.ones((1, 5)), space=2)
    model.set_features(["i3"], np.ones((1, 5)), space=3)
    assert model.summary()["segments"] == 0 and model.summary()["pending_trials"] == 0
    model.set_features(["i3"], np.ones((1, 4)), space=3)  # another dimension too
    assert model.dim == 4
    with pytest.raises(ValueError, match="alpha, ridge"):
        LinUCB(ridge=0)
    with pytest.raises(TypeError, match="LinUCB"):
        ExplorationPolicy("linucb").choose(["a"], BetaPosteriors(), "", 1, np.random.default_rng(0))
