"""The exploration slots' bandit in the gateway process (``recsys.exploration``).

``gateway.exploration_policy`` picks how the slots' new items are chosen. The learning
policies (``epsilon_greedy``, ``thompson``) read Beta posteriors of a slot impression's click
probability, per ``(segment, item)`` (or per item when ``exploration_by_segment`` is off):
each item served in a slot is a trial of its request, and a posted ``click`` event that
carries that ``request_id`` and item is its success. Both count once per
``(request_id, item)``, so a retried request or a repeated click event counts nothing more.
``linucb`` learns from the same trials and clicks a ridge regression of a click on the item's
unit embedding in the stable retrieval version (``snapshot.unit_rows``; one per segment, or
one in all): the request path passes the pool's embeddings to ``choose``, and a promotion to
another stable version starts it over, since a new version's embedding space is not the old.
The state lives in this process only (bounded by ``exploration_max_arms``): a restart starts
from the prior, and replicas learn apart.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from recsys.config import Settings
from recsys.exploration import BetaPosteriors, ExplorationPolicy, Learner, LinUCB
from recsys.ranking import sample_positions
from serving.gateway.metrics import GatewayMetrics


class ExplorationBandit:
    """The configured exploration policy and its posteriors, safe to share between threads."""

    def __init__(self, settings: Settings, metrics: GatewayMetrics | None = None) -> None:
        gw = settings.gateway
        self.policy = ExplorationPolicy(gw.exploration_policy, gw.exploration_epsilon)
        self.by_segment = gw.exploration_by_segment
        self.pool = gw.exploration_pool
        self.posteriors = BetaPosteriors(
            gw.exploration_prior_alpha,
            gw.exploration_prior_beta,
            max_arms=gw.exploration_max_arms,
            max_pending=gw.exploration_max_arms,
        )
        self.linucb = LinUCB(
            gw.exploration_linucb_alpha,
            gw.exploration_linucb_ridge,
            max_items=gw.exploration_max_arms,
            max_pending=gw.exploration_max_arms,
        )
        # What the policy reads and updates: the regression for linucb, else the posteriors.
        self.learner: Learner = self.linucb if self.policy.kind == "linucb" else self.posteriors
        self.metrics = metrics
        self._lock = threading.Lock()

    def _segment(self, segment: str) -> str:
        return segment if self.by_segment else ""

    @property
    def needs_features(self) -> bool:
        """Whether ``choose`` wants the pool's embeddings (``features``)."""
        return self.policy.kind == "linucb"

    def choose(
        self,
        item_ids: np.ndarray,
        new_positions: np.ndarray,
        allowed: np.ndarray,
        exclude: set[int],
        n: int,
        segment: str,
        rng: np.random.Generator,
        features: tuple[int, Callable[[np.ndarray], np.ndarray]] | None = None,
    ) -> np.ndarray:
        """Catalog positions of up to ``n`` new items for the slots, in slot order.

        ``features`` (for ``linucb``): the embedding space's key (the retrieval version) and
        the unit embeddings of catalog positions in it (zero rows where it lacks the item).
        """
        if self.policy.kind == "none" or n <= 0:
            return np.zeros(0, dtype=np.int64)
        if self.policy.kind == "uniform":  # as before the bandits: no posteriors read
            return sample_positions(new_positions, allowed, exclude, n, rng)
        pool = sample_positions(new_positions, allowed, exclude, max(n, self.pool), rng)
        ids = [str(item_ids[p]) for p in pool]
        rows = features[1](pool) if features is not None and self.needs_features else None
        with self._lock:
            if rows is not None and features is not None:
                self.linucb.set_features(ids, rows, space=features[0])
            chosen = self.policy.choose(ids, self.learner, self._segment(segment), n, rng)
        at = {item: p for item, p in zip(ids, pool.tolist(), strict=True)}
        return np.asarray([at[c] for c in chosen], dtype=np.int64)

    def served(self, request_id: str, segment: str, explored: Iterable[str]) -> None:
        """The slots' items of a served request: one trial each."""
        if not self.policy.learns:
            return
        with self._lock:
            n = sum(self.learner.record_trial(request_id, self._segment(segment), i) for i in explored)
        if self.metrics is not None and n:
            self.metrics.exploration.labels(outcome="trial").inc(n)

    def observe(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Newly accepted events: each click naming a request's slot item is a success."""
        if not self.policy.learns:
            return 0
        clicks = [
            (str(r["request_id"]), str(r["item_id"]))
            for r in records
            if r.get("event_type") == "click" and r.get("request_id")
        ]
        if not clicks:
            return 0
        with self._lock:
            n = sum(self.learner.record_click(req, item) for req, item in clicks)
        if self.metrics is not None and n:
            self.metrics.exploration.labels(outcome="click").inc(n)
        return n

    def summary(self, top: int = 20) -> dict[str, Any]:
        """The policy and what its posteriors (or regressions) hold (``GET /v1/admin/exploration``)."""
        with self._lock:
            out = self.learner.summary(top)
        return {"policy": self.policy.kind, "by_segment": self.by_segment, **out}
