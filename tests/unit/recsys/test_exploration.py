"""The exploration bandits: choices per policy, and posteriors that count each event once."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.exploration import EXPLORATION_KINDS, BetaPosteriors, ExplorationPolicy


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
        got = ExplorationPolicy(kind).choose(["a", "b", "c", "a"], BetaPosteriors(), "", 2, rng)
        assert len(got) == (0 if kind == "none" else 2) and len(set(got)) == len(got)
        assert ExplorationPolicy(kind).choose([], BetaPosteriors(), "", 2, rng) == []


def test_unknown_kind_and_bad_epsilon_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown exploration policy"):
        ExplorationPolicy("linucb")  # type: ignore[arg-type]
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
