"""The served system over a session of requests: what a one-request replay cannot see.

The gateway learns a user within a session: a click joins the user's recent items (the query
tower reads them, the category taste counts them, the item-to-item source follows them) and
leaves the candidates, and an item served and passed over is discounted
(``recsys.ranking.session_feedback``). A step that orders a first list well can still keep the
later lists from following the session: a ranker that reads no session signal, fused at a
large weight, decides the order among the candidates whatever the clicks said.

Where the generator's truth exists, ``session_rewards`` plays each validation user through a
few requests: the list served under a step (``Replay.lists`` on the session's state, built
again for every request by the caller's ``replay_of``), the simulated user's response drawn
from the truth, the state updated as the gateway updates it, and each request's expected
reward. The draws are one random stream per (user, request), the same for every step compared,
so two steps differ only where their lists do.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd

from components.evaluation.reward import expected_reward_at_k
from components.evaluation.served_policy import Replay, Step


class SimulatedUsers(Protocol):
    """What a session reads of the generator's truth (``components.simulation.truth.Truth``)."""

    @property
    def user_ids(self) -> list[str]: ...

    def expected_reward(self, user_ids: Sequence[str], item_ids: Sequence[str]) -> np.ndarray: ...

    def has_items(self, item_ids: Sequence[str]) -> np.ndarray: ...

    def respond(self, rng: np.random.Generator, user_id: str, item_ids: Sequence[str]) -> Any: ...


@dataclass
class Session:
    """What the gateway knows of each user at a request of their session.

    Attributes:
        histories: user -> recent positives, newest first (the session's clicks, then training's).
        seen: user -> items with a positive or a click (never served again).
        clicks: user -> the session's clicks, newest first.
        passed: user -> item id -> how often it was served and passed over.
    """

    histories: dict[str, list[str]]
    seen: dict[str, set[str]]
    clicks: dict[str, list[str]] = field(default_factory=dict)
    passed: dict[str, dict[str, int]] = field(default_factory=dict)

    @classmethod
    def start(cls, histories: Mapping[str, Sequence[str]], seen: Mapping[str, set[str]]) -> Session:
        """A session's first request: the users' training histories, nothing served yet."""
        return cls({u: list(h) for u, h in histories.items()}, {u: set(s) for u, s in seen.items()})

    def record(self, user: str, shown: Sequence[str], clicked: np.ndarray, max_history: int) -> None:
        """A response: clicked items join the history and ``seen``; the rest count as passed over."""
        took = [i for i, c in zip(shown, clicked, strict=True) if c]
        history = self.histories.get(user, [])
        self.histories[user] = [*reversed(took), *[i for i in history if i not in took]][:max_history]
        self.clicks[user] = [*reversed(took), *self.clicks.get(user, [])]
        self.seen.setdefault(user, set()).update(took)
        passed = self.passed.setdefault(user, {})
        for item in shown:
            if item not in self.seen[user]:
                passed[item] = passed.get(item, 0) + 1


# The served candidates and scores at a session's state, for request number ``r`` (0-based).
ReplayOf = Callable[[Session, int], Replay]


def session_rewards(
    replay_of: ReplayOf,
    truth: SimulatedUsers,
    start: Session,
    users: Sequence[str],
    step: Step,
    requests: int,
    k: int,
    seed: int,
    max_history: int,
) -> list[float]:
    """Mean expected reward of the top-``k`` at each request of a ``requests``-long session.

    Args:
        replay_of: builds the replay of the session's state (retrieval, sources, ranker).
        start: the state at the first request (it is copied, not changed).
        step: the served system the lists follow.
        max_history: the recent items the gateway keeps per user.
    """
    session = Session.start(start.histories, start.seen)
    out: list[float] = []
    for r in range(requests):
        lists = replay_of(session, r).lists(step)
        out.append(expected_reward_at_k(truth, lists, users, k))
        for user in users:
            shown = list(lists.get(user, ()))[:k]
            shown = [i for i, ok in zip(shown, truth.has_items(shown), strict=True) if ok]
            rng = np.random.default_rng([seed, zlib.crc32(user.encode()), r])
            response = truth.respond(rng, user, shown)
            session.record(user, shown, np.asarray(response.click, dtype=bool), max_history)
    return out


def with_clicks(queries: pd.DataFrame, clicks: Mapping[str, Sequence[str]], max_history: int) -> pd.DataFrame:
    """``queries`` (one row per user) with each user's session clicks, newest first, ahead of
    their ``recent_items`` (and, where the rows carry them, ages of 0 s ahead of their
    ``recent_item_ages``: clicked just now), as the gateway's query reads them."""
    out = queries.copy()
    users = out["user_id"].astype(str).tolist()
    out["recent_items"] = [
        " ".join([*clicks.get(u, []), *str(items or "").split()][:max_history])
        for u, items in zip(users, out["recent_items"], strict=True)
    ]
    if "recent_item_ages" in out.columns:
        out["recent_item_ages"] = [
            " ".join([*(["0"] * len(clicks.get(u, []))), *str(ages or "").split()][:max_history])
            for u, ages in zip(users, out["recent_item_ages"], strict=True)
        ]
    return out
