"""Exploration policies compared in the simulation: a base policy's list with exploration slots.

``ExploringPolicy`` is the gateway's exploration stage on a simulated policy: the base policy
(popularity, retrieval) fills the list, then the slots take new items as an exploration
policy of ``recsys.exploration`` chooses them (uniform, epsilon-greedy, Thompson, LinUCB,
none), and what the simulated user does with a slot's item (a click or not) updates the Beta
posteriors (LinUCB: its ridge regression on the items' embeddings, those of the pushed
retrieval version) exactly as the gateway's posted clicks do, once per ``(request, item)``. One policy per
exploration kind runs on the same users and seeds (``loop.simulate``), so their rewards
differ by the exploration alone.

For each new item, the tracker records how many of the policy's requests passed before the
item's first click in a slot, and before its posterior mean (LinUCB: the regression's
``theta . x``) came within ``tolerance`` of the
truth's click probability of the item (averaged over the simulated users): how fast a new
item's engagement is learned. ``exploration_summary`` puts them with reward per request and
regret against the oracle (its expected reward per request less the policy's).
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from components.simulation.policies import Policy, Recommendation, Request, Universe
from components.simulation.truth import SimulatedResponse, Truth
from components.sources.synthetic import response_odds
from recsys.exploration import BetaPosteriors, ExplorationKind, ExplorationPolicy, Learner, LinUCB
from recsys.ranking import insert_exploration

LEARNED_TOLERANCE = 0.05


def new_items(universe: Universe, popular_items: Sequence[str], limit: int) -> list[str]:
    """The items a simulation treats as new: those without a positive event in the data (the
    end of the popularity order), at most ``limit`` of them, least popular first."""
    ranked = [i for i in popular_items if i in universe.position]
    return list(reversed(ranked))[:limit]


def true_click_rates(truth: Truth, user_ids: Sequence[str], item_ids: Sequence[str]) -> dict[str, float]:
    """Each item's click probability of an impression under the truth, averaged over the users."""
    if not item_ids or not user_ids:
        return {}
    p = response_odds(truth.affinity(list(user_ids), list(item_ids))).click
    return dict(zip(item_ids, np.asarray(p).mean(axis=0).tolist(), strict=True))


@dataclass
class LearningTracker:
    """When each new item's first slot click came, and when its posterior came near the truth."""

    true_rate: Mapping[str, float]
    tolerance: float = LEARNED_TOLERANCE
    requests: int = 0
    first_click: dict[str, int] = field(default_factory=dict)
    learned: dict[str, int] = field(default_factory=dict)

    def after(self, posteriors: Learner, segment: str, items: Sequence[str], clicked: Sequence[bool]) -> None:
        """One request done; ``items`` were explored in it, ``clicked`` which got a click."""
        self.requests += 1
        for item, click in zip(items, clicked, strict=True):
            if click and item not in self.first_click:
                self.first_click[item] = self.requests
            if item in self.true_rate and item not in self.learned:
                mean = float(posteriors.mean(segment, [item])[0])
                if abs(mean - self.true_rate[item]) <= self.tolerance:
                    self.learned[item] = self.requests


class ExploringPolicy:
    """``base``'s list with ``slots`` exploration items from ``pool`` at ``position``.

    Args:
        base: the policy that ranks the list.
        universe: the world's items (what ``Request.allowed`` masks).
        kind: the exploration policy (``recsys.exploration.EXPLORATION_KINDS``).
        pool: the new items the slots choose among (those allowed and not already listed).
        true_rate: the truth's click probability of each new item (the learning tracker's target).
        seed: with the user and request, seeds each choice.
        slots, position: as ``gateway.exploration_slots`` and ``exploration_position``.
        epsilon, prior_alpha, prior_beta: as the gateway's settings.
        features: for ``linucb``, item ids and their embeddings (the pushed retrieval
            version's); a pool item without one scores the prior's maximal uncertainty.
        linucb_alpha, linucb_ridge: as ``gateway.exploration_linucb_alpha`` and ``_ridge``.
    """

    def __init__(
        self,
        base: Policy,
        universe: Universe,
        kind: ExplorationKind,
        pool: Sequence[str],
        true_rate: Mapping[str, float],
        seed: int,
        slots: int = 1,
        position: int = 3,
        epsilon: float = 0.1,
        prior_alpha: float = 1.0,
        prior_beta: float = 1.0,
        features: tuple[Sequence[str], np.ndarray] | None = None,
        linucb_alpha: float = 1.0,
        linucb_ridge: float = 1.0,
    ) -> None:
        self.base = base
        self._positions = universe.position
        self.name = f"{base.name}+{kind}"
        self.policy = ExplorationPolicy(kind, epsilon)
        self.pool = list(pool)
        self.seed = seed
        self.slots, self.position = slots, position
        self.posteriors: Learner = BetaPosteriors(prior_alpha, prior_beta)
        if kind == "linucb":
            self.posteriors = LinUCB(linucb_alpha, linucb_ridge)
            if features is not None:
                self.posteriors.set_features(list(features[0]), features[1])
        self.tracker = LearningTracker(true_rate)

    @staticmethod
    def _request_id(request: Request) -> str:
        return f"{request.user_id}:{request.number}"

    def recommend(self, request: Request) -> Recommendation:
        shown = self.base.recommend(request)
        ranked = list(shown.item_ids)
        listed = set(ranked[: request.k])
        at = self._positions
        pool = [i for i in self.pool if i not in listed and i in at and request.allowed[at[i]]]
        rng = np.random.default_rng([self.seed, zlib.crc32(request.user_id.encode()), request.number])
        chosen = self.policy.choose(pool, self.posteriors, "", self.slots, rng)
        if not chosen:
            return Recommendation(ranked[: request.k], shown.arm, {**shown.details, "explored": []})
        items, explored = insert_exploration(ranked, chosen, request.k, self.slots, self.position)
        details = {**shown.details, "explored": [i for i in items if i in explored]}
        return Recommendation(items, shown.arm, details)

    def observe(self, request: Request, shown: Recommendation, response: SimulatedResponse) -> None:
        self.base.observe(request, shown, response)
        explored = list(shown.details.get("explored", []))
        clicked = {i for i, c in zip(response.item_ids, response.click.tolist(), strict=True) if c}
        request_id = self._request_id(request)
        for item in explored:
            self.posteriors.update([(request_id, "", item, item in clicked)])
        self.tracker.after(self.posteriors, "", explored, [i in clicked for i in explored])


def exploration_summary(
    records: pd.DataFrame, policies: Sequence[ExploringPolicy], reference: str = "oracle"
) -> dict[str, Any]:
    """Per exploring policy: reward and expected reward per request, regret per request against
    ``reference`` (its expected reward per request less the policy's, same users and requests),
    slot trials and clicks, and how fast the new items were learned."""
    ref = records[records["policy"] == reference].set_index(["user_index", "request"])["expected_reward"]
    out: dict[str, Any] = {}
    for p in policies:
        rows = records[records["policy"] == p.name].set_index(["user_index", "request"])
        regret = (ref.reindex(rows.index) - rows["expected_reward"]).dropna()
        t = p.tracker
        n_items = len(t.true_rate)
        out[p.name] = {
            "exploration": p.policy.kind,
            "requests": len(rows),
            "reward_per_request": float(rows["reward"].mean()) if len(rows) else 0.0,
            "expected_reward_per_request": float(rows["expected_reward"].mean()) if len(rows) else 0.0,
            "regret_per_request": float(regret.mean()) if len(regret) else float("nan"),
            "slot_trials": p.posteriors.total_trials,
            "slot_clicks": p.posteriors.total_clicks,
            "new_items": n_items,
            "new_items_clicked": len(t.first_click),
            "new_items_learned": len(t.learned),
            "median_requests_to_first_click": _median(t.first_click.values()),
            "median_requests_to_learned": _median(t.learned.values()),
            "learned_tolerance": t.tolerance,
        }
    return out


def _median(values: Any) -> float | None:
    v = list(values)
    return float(np.median(v)) if v else None
