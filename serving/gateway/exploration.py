"""The exploration slots' bandit in the gateway process (``recsys.exploration``).

``gateway.exploration_policy`` picks how the slots' new items are chosen. The learning
policies (``epsilon_greedy``, ``thompson``) read Beta posteriors of a slot impression's click
probability, per ``(segment, item)`` (or per item when ``exploration_by_segment`` is off):
each item served in a slot is a trial of its request, and a posted ``click`` event that
carries that ``request_id`` and item is its success. Both count once per
``(request_id, item)``, so a retried request or a repeated click event counts nothing more.
The state lives in this process only (bounded by ``exploration_max_arms``): a restart starts
from the prior, and replicas learn apart.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from recsys.config import Settings
from recsys.exploration import BetaPosteriors, ExplorationPolicy
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
        self.metrics = metrics
        self._lock = threading.Lock()

    def _segment(self, segment: str) -> str:
        return segment if self.by_segment else ""

    def choose(
        self,
        item_ids: np.ndarray,
        new_positions: np.ndarray,
        allowed: np.ndarray,
        exclude: set[int],
        n: int,
        segment: str,
        rng: np.random.Generator,
    ) -> np.ndarray:
        """Catalog positions of up to ``n`` new items for the slots, in slot order."""
        if self.policy.kind == "none" or n <= 0:
            return np.zeros(0, dtype=np.int64)
        if self.policy.kind == "uniform":  # as before the bandits: no posteriors read
            return sample_positions(new_positions, allowed, exclude, n, rng)
        pool = sample_positions(new_positions, allowed, exclude, max(n, self.pool), rng)
        ids = [str(item_ids[p]) for p in pool]
        with self._lock:
            chosen = self.policy.choose(ids, self.posteriors, self._segment(segment), n, rng)
        at = {item: p for item, p in zip(ids, pool.tolist(), strict=True)}
        return np.asarray([at[c] for c in chosen], dtype=np.int64)

    def served(self, request_id: str, segment: str, explored: Iterable[str]) -> None:
        """The slots' items of a served request: one trial each."""
        if not self.policy.learns:
            return
        with self._lock:
            n = sum(self.posteriors.record_trial(request_id, self._segment(segment), i) for i in explored)
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
            n = sum(self.posteriors.record_click(req, item) for req, item in clicks)
        if self.metrics is not None and n:
            self.metrics.exploration.labels(outcome="click").inc(n)
        return n

    def summary(self, top: int = 20) -> dict[str, Any]:
        """The policy and what its posteriors hold (``GET /v1/admin/exploration``)."""
        with self._lock:
            out = self.posteriors.summary(top)
        return {"policy": self.policy.kind, "by_segment": self.by_segment, **out}
