"""The served system over a simulated session: state updates, the replay's discounts, the gate's check."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pytest

from components.evaluation.fusion import choose_policy
from components.evaluation.served_policy import Replay, Step, build_replay
from components.evaluation.session_replay import Session, session_rewards, with_clicks
from recsys.config import GatewayConfig

ITEMS = np.array(["a", "b", "c", "d", "e", "f"], dtype=object)


def test_a_response_moves_clicks_into_the_history_and_counts_the_rest_as_passed():
    session = Session.start({"u": ["x", "y"]}, {"u": {"x", "y"}})
    session.record("u", ["a", "b", "c"], np.array([False, True, True]), max_history=3)
    assert session.histories["u"] == ["c", "b", "x"]  # newest first, capped
    assert session.clicks["u"] == ["c", "b"]
    assert session.seen["u"] == {"x", "y", "b", "c"}
    assert session.passed["u"] == {"a": 1}
    session.record("u", ["a", "d"], np.array([False, False]), max_history=3)
    assert session.passed["u"] == {"a": 2, "d": 1}
    # A session starts from copies: the start state is not changed by what follows.
    start = Session.start({"v": ["x"]}, {"v": {"x"}})
    copy = Session.start(start.histories, start.seen)
    copy.record("v", ["a"], np.array([True]), max_history=5)
    assert start.histories == {"v": ["x"]} and start.seen == {"v": {"x"}}


def test_clicks_lead_the_query_history_with_an_age_of_zero():
    queries = pd.DataFrame(
        {"user_id": ["u", "v"], "recent_items": ["x y", ""], "recent_item_ages": ["60 120", ""]}
    ).set_index("user_id", drop=False)
    out = with_clicks(queries, {"u": ["b", "a"], "v": ["c"]}, max_history=3)
    assert out.loc["u", "recent_items"] == "b a x" and out.loc["u", "recent_item_ages"] == "0 0 60"
    assert out.loc["v", "recent_items"] == "c" and out.loc["v", "recent_item_ages"] == "0"
    assert queries.loc["u", "recent_items"] == "x y"  # the input is not changed


def _state_replay(session: Session, request: int, ranker: np.ndarray) -> Replay:
    """One user, retrieval order e > c > d > a > b > f; the ranker's own order is ``ranker``."""
    retrieval = np.array([0.4, 0.3, 0.8, 0.7, 0.9, 0.1])
    return build_replay(
        users=["u"],
        item_ids=ITEMS,
        item_embeddings=np.eye(6, dtype=np.float32),
        query_embeddings=retrieval[None, :].astype(np.float32),
        seen=session.seen,
        allowed=np.ones(6, dtype=bool),
        new_items=np.zeros(6, dtype=bool),
        ranker_scores=lambda user_items: {
            u: ranker[[list(ITEMS).index(i) for i in ids]] for u, ids in user_items.items()
        },
        gateway=GatewayConfig(mmr_trade_off=1.0, exploration_slots=0, session_item_decay=0.5),
        k=1,
        seed=request,
        passed_over=session.passed,
    )


def test_a_passed_over_item_is_discounted_as_the_gateway_does():
    session = Session.start({}, {"u": set()})
    ranker = np.zeros(6)
    step = Step(math.inf, mmr=False, explore=False)
    assert _state_replay(session, 0, ranker).serve("u", step) == ["e"]
    session.record("u", ["e"], np.array([False]), max_history=5)
    # e scaled to 1 and halved (0.5) falls behind c (scaled 0.875).
    assert _state_replay(session, 1, ranker).serve("u", step) == ["c"]


@dataclass
class _Users:
    """Deterministic simulated users for the unit tests: a user takes exactly the items with
    reward 1 (the generator's truth in the integration tests)."""

    reward: dict[str, float]

    @property
    def user_ids(self) -> list[str]:
        return ["u"]

    def expected_reward(self, user_ids: Sequence[str], item_ids: Sequence[str]) -> np.ndarray:
        return np.array([[self.reward.get(i, 0.0) for i in item_ids] for _ in user_ids])

    def has_items(self, item_ids: Sequence[str]) -> np.ndarray:
        return np.ones(len(item_ids), dtype=bool)

    def respond(self, rng: np.random.Generator, user_id: str, item_ids: Sequence[str]) -> object:
        @dataclass
        class _Response:
            click: np.ndarray

        return _Response(np.array([self.reward.get(i, 0.0) >= 1 for i in item_ids], dtype=bool))


# The ranker puts a, then b, then f first; retrieval order is e > c > d > a > b > f.
RANKER = np.array([0.9, 0.8, 0.0, 0.0, 0.1, 0.7])
START = Session.start({}, {"u": set()})


def _choose(taken: set[str], relevant: set[str], with_session: bool = True) -> Any:
    """``choose_policy`` on the first request (judged by the users' reward of the top item),
    with or without the 3-request session check; the user takes exactly ``taken``."""
    users = _Users({i: 1.0 for i in taken})

    def session_reward_of(step: Step) -> list[float]:
        return session_rewards(
            lambda s, r: _state_replay(s, r, RANKER), users, START, ["u"], step, 3, 1, 0, 5
        )

    def reward_of(lists: dict[str, list[str]]) -> float:
        return float(users.expected_reward(["u"], lists["u"][:1]).mean())

    return choose_policy(
        _state_replay(START, 0, RANKER), {"u": relevant}, [0.0], "ndcg@1", reward_of, "test",
        judge="reward", session_reward_of=session_reward_of if with_session else None,
    )  # fmt: skip


def test_a_ranker_that_wins_one_request_but_not_the_session_is_not_served():
    # The user takes a, c and d. The ranker's a is taken, then it serves b and f, which are
    # passed over. Retrieval order starts with e (passed over), then the session's discount
    # brings c and d, both taken.
    taken = {"a", "c", "d"}
    # One request alone: the ranker (weight 0) wins and would serve.
    assert _choose(taken, {"a"}, with_session=False).policy.retrieval_weight == 0.0
    # Over the session it loses, so retrieval order serves, and the report says why.
    checked = _choose(taken, {"a"})
    assert not checked.policy.ranker_served
    assert any(
        r.startswith("the ranker is not served: over a simulated session of 3 requests")
        for r in checked.policy.reasons
    )
    session = checked.policy.validation["session"]
    assert session["with_ranker"] == [1.0, 0.0, 0.0] and session["retrieval_order"] == [0.0, 1.0, 1.0]
    assert session["weight"] == "0"


def test_a_ranker_that_also_wins_the_session_serves():
    choice = _choose({"a", "b", "f"}, {"a"})
    assert choice.policy.retrieval_weight == 0.0
    assert any(r.startswith("session check passed") for r in choice.policy.reasons)
    assert choice.policy.validation["session"]["with_ranker"] == pytest.approx([1.0, 1.0, 1.0])


def test_where_retrieval_order_serves_the_session_still_reports_the_rankers_best_weight():
    choice = _choose({"c", "d"}, {"c"})  # neither first list earns anything: a tie, retrieval serves
    assert not choice.policy.ranker_served
    assert any(r.startswith("session check (the ranker not served)") for r in choice.policy.reasons)
    session = choice.policy.validation["session"]
    assert session["with_ranker"] == [0.0, 0.0, 0.0] and session["retrieval_order"] == [0.0, 1.0, 1.0]
