"""The simulation loop, the baseline policies and the summary, on a truth drawn in memory.

The gateway's policy and the pushed retrieval model are exercised by the integration test
(``tests/integration/entrypoints/test_simulate.py``); here the world is built by hand so
each rule can be checked exactly: what a request may show, what a user's events carry into
their next request, common random numbers across policies, and the oracle as the ceiling.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from components.simulation.loop import SimulatedUser, World, simulate
from components.simulation.policies import (
    OraclePolicy,
    PopularityPolicy,
    RandomPolicy,
    Recommendation,
    Request,
    Universe,
    top_allowed,
)
from components.simulation.report import summarize, write_report
from components.simulation.truth import SimulatedResponse, Truth
from components.sources.synthetic import draw_truth
from recsys.config import TrainingConfig
from tests.support.tiny_data import tiny_params


@pytest.fixture(scope="module")
def world() -> World:
    truth = Truth(draw_truth(tiny_params(users=300, items=120)), TrainingConfig())
    universe = Universe.of(truth.item_ids)
    # Two recent items of history for every user: never shown to them.
    users = [
        SimulatedUser(u, n, [truth.item_ids[n % 120], truth.item_ids[(n + 1) % 120]], "mobile", 19)
        for n, u in enumerate(truth.user_ids[:40])
    ]
    return World(truth, universe, users, popular_items=truth.item_ids[::-1], recent_limit=20)


class Recording:
    """Wraps a policy and keeps every request it saw and what it showed."""

    def __init__(self, inner, name: str | None = None) -> None:
        self.inner, self.name = inner, name or inner.name
        self.seen: list[tuple[Request, list[str], SimulatedResponse]] = []

    def recommend(self, request: Request) -> Recommendation:
        return self.inner.recommend(request)

    def observe(self, request: Request, shown: Recommendation, response: SimulatedResponse) -> None:
        self.seen.append((request, shown.item_ids, response))


def test_top_allowed_takes_the_best_allowed_in_order():
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.3])
    allowed = np.array([True, False, True, True, True])
    assert top_allowed(scores, allowed, 2).tolist() == [3, 2]  # 1 is best but not allowed
    assert top_allowed(scores, allowed, 10).tolist() == [3, 2, 4, 0]  # fewer than k allowed


def test_requests_never_show_history_or_what_the_user_touched_and_carry_recent_items(world):
    oracle = Recording(OraclePolicy(world.universe, world.truth))
    simulate(world, [oracle], requests_per_user=4, k=10, seed=1)
    by_user: dict[str, list] = {}
    for request, shown, response in oracle.seen:
        by_user.setdefault(request.user_id, []).append((request, shown, response))
    history = {u.user_id: u.recent_items for u in world.users}
    carried = 0
    for user, requests in by_user.items():
        assert requests[0][0].recent_items == history[user]
        touched: set[str] = set()
        for (request, shown, response), nxt in zip(requests, [*requests[1:], None], strict=True):
            assert not set(shown) & set(history[user]), "history shown again"
            assert not set(shown) & touched, "an item the user acted on shown again"
            assert not request.allowed[[world.universe.position[i] for i in request.recent_items]].any()
            assert len(request.recent_items) <= world.recent_limit
            events = response.events
            touched |= set(events.loc[events["event_type"] != "impression", "item_id"])
            positive = events[events["event_type"].isin(["click", "view", "like", "rating", "add_to_cart"])]
            if nxt is not None and len(positive):
                # The newest positive leads the next request's recent items.
                assert nxt[0].recent_items[0] == positive["item_id"].iloc[-1]
                carried += 1
    assert carried > 10


def test_same_seed_same_records_and_identical_policies_get_identical_responses(world):
    a = simulate(world, [RandomPolicy(world.universe, 3)], 2, 5, seed=9)
    b = simulate(world, [RandomPolicy(world.universe, 3)], 2, 5, seed=9)
    pd.testing.assert_frame_equal(a, b)
    # Common random numbers: a twin policy under another name shows the same items and the
    # users do the same with them, request by request.
    twin = RandomPolicy(world.universe, 3)
    twin.name = "random-twin"
    both = simulate(world, [RandomPolicy(world.universe, 3), twin], 2, 5, seed=9)
    cols = ["user_id", "request", "reward", "clicks", "expected_reward"]
    first, second = (both[both["policy"] == p][cols] for p in ("random", "random-twin"))
    pd.testing.assert_frame_equal(first.reset_index(drop=True), second.reset_index(drop=True))
    other_seed = simulate(world, [RandomPolicy(world.universe, 3)], 2, 5, seed=10)
    assert not np.allclose(other_seed["reward"], a["reward"])


def test_the_oracle_is_the_ceiling_and_random_is_far_below(world):
    policies = [
        RandomPolicy(world.universe, 0),
        PopularityPolicy(world.universe, world.popular_items),
        OraclePolicy(world.universe, world.truth),
    ]
    records = simulate(world, policies, requests_per_user=3, k=10, seed=0)
    mean = records.groupby("policy")[["expected_reward", "reward"]].mean()
    assert (mean.loc["oracle", "expected_reward"] >= mean["expected_reward"]).all()
    assert mean.loc["random", "reward"] < 0.5 * mean.loc["oracle", "reward"]
    # Every request showed k allowed, simulatable items.
    assert (records["shown"] == 10).all() and (records["not_allowed"] == 0).all()
    assert (records["unsimulated"] == 0).all()
    # On the first request (nothing touched yet) the oracle's expected reward is the top-k
    # sum of the truth's expectations over the allowed items, exactly.
    user = world.users[0]
    first = records[(records["policy"] == "oracle") & (records["user_id"] == user.user_id)].iloc[0]
    expected = world.truth.expected_reward([user.user_id], world.truth.item_ids)[0]
    expected[world.universe.mask(user.recent_items)] = -np.inf
    assert first["expected_reward"] == pytest.approx(np.sort(expected)[-10:].sum())


def test_summary_shares_come_from_the_measured_rewards_and_the_report_is_written(world, tmp_path):
    policies = [RandomPolicy(world.universe, 0), OraclePolicy(world.universe, world.truth)]
    records = simulate(world, policies, requests_per_user=2, k=5, seed=0)
    summary = summarize(records, seed=0, setup={"users": len(world.users)})
    p = summary["policies"]
    oracle_mean = records[records["policy"] == "oracle"]["reward"].mean()
    random_mean = records[records["policy"] == "random"]["reward"].mean()
    # Every user made the same number of requests: the mean of per-user means is the mean.
    assert p["random"]["reward_per_request"]["mean"] == pytest.approx(random_mean)
    assert p["random"]["share_of_oracle"]["mean"] == pytest.approx(random_mean / oracle_mean)
    assert p["oracle"]["share_of_oracle"]["mean"] == pytest.approx(1.0)
    # By request number: the oracle is its own reference each time; random's first request is
    # its first request's mean over the oracle's.
    assert p["oracle"]["expected_share_by_request"] == [1.0, 1.0]
    first = records[records["request"] == 0].groupby("policy")["expected_reward"].mean()
    random_first = p["random"]["expected_share_by_request"][0]
    assert random_first == pytest.approx(first["random"] / first["oracle"], abs=1e-4)
    lo, hi = p["random"]["share_of_oracle"]["ci95"]
    assert lo <= p["random"]["share_of_oracle"]["mean"] <= hi
    lo, hi = p["random"]["reward_per_request"]["ci95"]
    assert lo < random_mean < hi
    clicks = records[records["policy"] == "random"]
    assert p["random"]["click_rate"] == pytest.approx(clicks["clicks"].sum() / clicks["shown"].sum())
    paths = write_report(summary, records, tmp_path)
    page = paths["report"].read_text()
    assert "random" in page and "oracle" in page and "data:image/png;base64," in page
    assert "By request number" in page
    assert json.loads(paths["summary"].read_text())["policies"]["random"]["requests"] == len(clicks)
    assert len(pd.read_parquet(paths["requests"])) == len(records)
    with pytest.raises(ValueError, match="reference policy 'oracle' was not simulated"):
        summarize(records[records["policy"] == "random"])


def test_bad_arguments_are_refused_by_name(world):
    with pytest.raises(ValueError, match="--requests-per-user and --k"):
        simulate(world, [RandomPolicy(world.universe, 0)], 0, 10, seed=0)
    twin = RandomPolicy(world.universe, 1)
    with pytest.raises(ValueError, match="policy names must differ"):
        simulate(world, [RandomPolicy(world.universe, 0), twin], 1, 10, seed=0)


class ArmedPolicy:
    """Random items; users of even index on arm "stable", odd on "holdout"."""

    name = "served"

    def __init__(self, universe: Universe) -> None:
        self.random = RandomPolicy(universe, 3)

    def recommend(self, request: Request) -> Recommendation:
        arm = "stable" if sum(map(ord, request.user_id)) % 2 == 0 else "holdout"
        return Recommendation(self.random.recommend(request).item_ids, arm=arm)

    def observe(self, request: Request, shown: Recommendation, response: SimulatedResponse) -> None:
        pass


def test_a_later_round_carries_what_users_did_and_draws_fresh_responses(world):
    states: dict = {}
    first = simulate(world, [OraclePolicy(world.universe, world.truth)], 2, 5, seed=0, states=states)
    touched = {u: set(s.touched) for (_, u), s in states.items()}
    assert any(touched.values())
    later = Recording(OraclePolicy(world.universe, world.truth))
    again = simulate(world, [later], 2, 5, seed=0, states={("oracle", u): s for (_, u), s in states.items()},
                     first_request=2)  # fmt: skip
    assert sorted(again["request"].unique()) == [2, 3]
    for request, shown, _ in later.seen:
        # What a user touched in the first round is never shown in the second.
        assert not touched[request.user_id] & set(shown)
    fresh = simulate(world, [OraclePolicy(world.universe, world.truth)], 2, 5, seed=0)
    assert fresh["items"].tolist() == first["items"].tolist()  # no state: the same first round


def test_the_loop_summary_is_per_round_and_arm_against_the_oracle_on_the_same_users(world, tmp_path):
    from components.simulation.report import summarize_loop, write_loop_report

    rounds = []
    for r in (1, 2):
        policies = [ArmedPolicy(world.universe), OraclePolicy(world.universe, world.truth)]
        rounds.append(simulate(world, policies, 2, 5, seed=r).assign(round=r))
    records = pd.concat(rounds, ignore_index=True)
    retrain = {"after_round": 1, "served_events": 7, "blessed": True, "reason": "ok", "pushed_version": 3}
    versions = {2: {"stable": {"retrieval": 2, "ranking": 2}, "canary": {"retrieval": 3}}}
    summary = summarize_loop(records, [retrain], served="served", setup={"rounds": 2}, versions=versions)
    assert [row["round"] for row in summary["rounds"]] == [1, 2]
    assert set(summary["arms"]) == {"stable", "holdout"}
    row = summary["rounds"][1]
    served = records[(records["round"] == 2) & (records["policy"] == "served")]
    oracle = records[(records["round"] == 2) & (records["policy"] == "oracle")]
    for arm, got in served.groupby("arm"):
        on_same = oracle[oracle["user_id"].isin(got["user_id"])]["expected_reward"].mean()
        assert row["arms"][arm]["expected_reward_per_request"] == pytest.approx(got["expected_reward"].mean())
        assert row["arms"][arm]["share_of_oracle"] == pytest.approx(got["expected_reward"].mean() / on_same)
        assert row["arms"][arm]["requests"] == len(got)
    assert summary["rounds"][0]["retrain"]["pushed_version"] == 3 and row["retrain"] is None
    assert row["arms"]["stable"]["versions"] == {"retrieval": 2, "ranking": 2}
    assert row["arms"]["holdout"]["versions"] == {} == summary["rounds"][0]["arms"]["stable"]["versions"]
    paths = write_loop_report(summary, records, tmp_path)
    page = paths["report"].read_text()
    assert "pushed v3" in page and "holdout" in page and "data:image/png;base64," in page
    assert "ranking v2, retrieval v2" in page
