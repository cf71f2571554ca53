"""Learning exploration: which items fill a list's exploration slots, and what the clicks teach.

An exploration slot shows an item the ranking would not (a new item nobody has engaged with
yet) so it can earn a signal. Which one is a bandit's choice (``gateway.exploration_policy``):

- ``uniform``: uniformly at random from the pool (the behaviour before the bandits);
- ``epsilon_greedy``: with probability ``epsilon`` a uniform pick, otherwise the arm of highest
  posterior mean (ties broken at random);
- ``thompson``: Thompson sampling: one draw from each arm's Beta posterior, the highest draws win;
- ``none``: no exploration at all (the slots keep the ranked items).

Arms are ``(segment, item)`` pairs (the segment is the gateway's popularity segment, or ``""``
for per-item posteriors), each a Beta(alpha, beta) posterior of the click probability of an
impression in the slot: ``alpha = prior_alpha + clicks`` and ``beta = prior_beta + trials -
clicks``. ``BetaPosteriors`` counts an impression of a slot's item as a trial and a click that
names the same request as a success, each at most once per ``(request_id, item)``, so a
repeated impression or click event never counts twice. Memory is bounded: past ``max_arms``
arms the least recently touched is forgotten (it falls back to the prior), and past
``max_pending`` the oldest trials no longer wait for their click.

Everything here is pure (no I/O, no clock, randomness from the caller's generator); a caller
that shares a ``BetaPosteriors`` between threads holds its own lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

ExplorationKind = Literal["uniform", "epsilon_greedy", "thompson", "none"]
EXPLORATION_KINDS: tuple[ExplorationKind, ...] = ("uniform", "epsilon_greedy", "thompson", "none")
Arm = tuple[str, str]  # (segment, item_id)


class BetaPosteriors:
    """Per-``(segment, item)`` Beta posteriors of a slot impression's click probability.

    Args:
        prior_alpha: the prior's alpha (pseudo-clicks), > 0.
        prior_beta: the prior's beta (pseudo-non-clicks), > 0.
        max_arms: arms remembered; the least recently touched beyond it are forgotten.
        max_pending: trials remembered for their click (and for idempotency).
    """

    def __init__(
        self,
        prior_alpha: float = 1.0,
        prior_beta: float = 1.0,
        max_arms: int = 100_000,
        max_pending: int = 100_000,
    ) -> None:
        if prior_alpha <= 0 or prior_beta <= 0:
            raise ValueError(f"the Beta prior needs alpha, beta > 0; got {prior_alpha}, {prior_beta}")
        if max_arms < 1 or max_pending < 1:
            raise ValueError(f"max_arms and max_pending must be at least 1; got {max_arms}, {max_pending}")
        self.prior_alpha = float(prior_alpha)
        self.prior_beta = float(prior_beta)
        self.max_arms = max_arms
        self.max_pending = max_pending
        # arm -> [trials, clicks], least recently touched first.
        self._counts: OrderedDict[Arm, list[int]] = OrderedDict()
        # (request_id, item) -> [segment, clicked], oldest first.
        self._trials: OrderedDict[tuple[str, str], list[object]] = OrderedDict()
        self.total_trials = 0
        self.total_clicks = 0

    def __len__(self) -> int:
        return len(self._counts)

    def counts(self, segment: str, item: str) -> tuple[int, int]:
        """(trials, clicks) of an arm; (0, 0) when unknown or forgotten."""
        trials, clicks = self._counts.get((segment, item), (0, 0))
        return trials, clicks

    def params(self, segment: str, items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The posteriors' alpha and beta for ``items`` in ``segment`` (the prior where unknown)."""
        counts = np.asarray([self.counts(segment, i) for i in items], dtype=np.float64).reshape(-1, 2)
        alpha = self.prior_alpha + counts[:, 1]
        beta = self.prior_beta + counts[:, 0] - counts[:, 1]
        return alpha, beta

    def mean(self, segment: str, items: Sequence[str]) -> np.ndarray:
        """Posterior mean click probability of each item in ``segment``."""
        alpha, beta = self.params(segment, items)
        return alpha / (alpha + beta)

    def _touch(self, arm: Arm) -> list[int]:
        entry = self._counts.get(arm)
        if entry is None:
            entry = self._counts[arm] = [0, 0]
            while len(self._counts) > self.max_arms:
                self._counts.popitem(last=False)
        else:
            self._counts.move_to_end(arm)
        return entry

    def record_trial(self, request_id: str, segment: str, item: str) -> bool:
        """An impression of ``item`` in a slot of ``request_id``: one trial, once. True if counted."""
        key = (request_id, item)
        if key in self._trials:
            return False
        self._trials[key] = [segment, False]
        while len(self._trials) > self.max_pending:
            self._trials.popitem(last=False)
        self._touch((segment, item))[0] += 1
        self.total_trials += 1
        return True

    def record_click(self, request_id: str, item: str) -> bool:
        """A click on ``item`` after ``request_id`` showed it in a slot: one success, once.

        A click on an item that request did not explore (or whose trial was forgotten) is not
        the slot's and counts nothing. True if counted.
        """
        trial = self._trials.get((request_id, item))
        if trial is None or trial[1]:
            return False
        trial[1] = True
        segment = str(trial[0])
        entry = self._touch((segment, item))
        entry[1] = min(entry[1] + 1, entry[0])  # a forgotten-then-reset arm never exceeds its trials
        self.total_clicks += 1
        return True

    def update(self, observations: Iterable[tuple[str, str, str, bool]]) -> int:
        """Trials (and clicks) of ``(request_id, segment, item, clicked)``; how many counted."""
        n = 0
        for request_id, segment, item, clicked in observations:
            n += self.record_trial(request_id, segment, item)
            if clicked:
                self.record_click(request_id, item)
        return n

    def summary(self, top: int = 20) -> dict[str, object]:
        """What the posteriors hold: totals, and the arms with most trials (a small admin read)."""
        ranked = sorted(self._counts.items(), key=lambda kv: -kv[1][0])[:top]
        arms = [
            {
                "segment": seg,
                "item_id": item,
                "trials": t,
                "clicks": c,
                "mean": (self.prior_alpha + c) / (self.prior_alpha + self.prior_beta + t),
            }
            for (seg, item), (t, c) in ranked
        ]
        return {
            "arms": len(self._counts),
            "pending_trials": len(self._trials),
            "trials": self.total_trials,
            "clicks": self.total_clicks,
            "prior": {"alpha": self.prior_alpha, "beta": self.prior_beta},
            "top_arms": arms,
        }


@dataclass(frozen=True)
class ExplorationPolicy:
    """How exploration items are chosen from a pool (``EXPLORATION_KINDS``).

    Args:
        kind: the policy.
        epsilon: ``epsilon_greedy``'s chance of a uniform pick per slot.
    """

    kind: ExplorationKind = "uniform"
    epsilon: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in EXPLORATION_KINDS:
            raise ValueError(f"unknown exploration policy {self.kind!r}; one of {EXPLORATION_KINDS}")
        if not 0 <= self.epsilon <= 1:
            raise ValueError(f"epsilon must be in [0, 1]; got {self.epsilon}")

    @property
    def learns(self) -> bool:
        """Whether the choice reads the posteriors (and so is worth their upkeep)."""
        return self.kind in ("epsilon_greedy", "thompson")

    def choose(
        self,
        pool: Sequence[str],
        posteriors: BetaPosteriors,
        segment: str,
        n: int,
        rng: np.random.Generator,
    ) -> list[str]:
        """Up to ``n`` distinct items of ``pool`` for the slots, in slot order."""
        items = list(dict.fromkeys(str(i) for i in pool))
        n = min(n, len(items))
        if n <= 0 or self.kind == "none":
            return []
        if self.kind == "uniform":
            return [items[i] for i in rng.choice(len(items), size=n, replace=False)]
        alpha, beta = posteriors.params(segment, items)
        if self.kind == "thompson":
            draws = rng.beta(alpha, beta)
            return [items[i] for i in np.argsort(-draws, kind="stable")[:n]]
        # epsilon-greedy, slot by slot; the random tie-break keeps unseen arms (equal means) fair.
        mean = alpha / (alpha + beta)
        order = np.lexsort((rng.random(len(items)), -mean))
        left = list(order)
        out: list[str] = []
        for _ in range(n):
            at = int(rng.integers(len(left))) if rng.random() < self.epsilon else 0
            out.append(items[left.pop(at)])
        return out
