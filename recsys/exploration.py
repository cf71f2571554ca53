"""Learning exploration: which items fill a list's exploration slots, and what the clicks teach.

An exploration slot shows an item the ranking would not (a new item nobody has engaged with
yet) so it can earn a signal. Which one is a bandit's choice (``gateway.exploration_policy``):

- ``uniform``: uniformly at random from the pool (the behaviour before the bandits);
- ``epsilon_greedy``: with probability ``epsilon`` a uniform pick, otherwise the arm of highest
  posterior mean (ties broken at random);
- ``thompson``: Thompson sampling: one draw from each arm's Beta posterior, the highest draws win;
- ``linucb``: a linear upper confidence bound on the item's embedding (``LinUCB``): one ridge
  regression of a click on the item's L2-normalised candidate-tower embedding, shared by all
  items (per segment), so a click on one item teaches about the items near it; the highest
  ``theta . x + alpha * sqrt(x' A^-1 x)`` win;
- ``none``: no exploration at all (the slots keep the ranked items).

Arms are ``(segment, item)`` pairs (the segment is the gateway's popularity segment, or ``""``
for per-item posteriors), each a Beta(alpha, beta) posterior of the click probability of an
impression in the slot: ``alpha = prior_alpha + clicks`` and ``beta = prior_beta + trials -
clicks``. ``BetaPosteriors`` counts an impression of a slot's item as a trial and a click that
names the same request as a success, each at most once per ``(request_id, item)``, so a
repeated impression or click event never counts twice. Memory is bounded: past ``max_arms``
arms the least recently touched is forgotten (it falls back to the prior), and past
``max_pending`` the oldest trials no longer wait for their click.

``LinUCB`` counts the same trials and clicks, once each per ``(request_id, item)``: a trial adds
``x x'`` to its segment's ``A`` when the impression is recorded (its reward 0 until told
otherwise), and the click that names it adds ``x`` to ``b``, which turns that trial's reward
into 1. Its memory is bounded the same way (items' embeddings, segments, pending trials).

Everything here is pure (no I/O, no clock, randomness from the caller's generator); a caller
that shares a ``BetaPosteriors`` between threads holds its own lock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

ExplorationKind = Literal["uniform", "epsilon_greedy", "thompson", "linucb", "none"]
EXPLORATION_KINDS: tuple[ExplorationKind, ...] = ("uniform", "epsilon_greedy", "thompson", "linucb", "none")
Arm = tuple[str, str]  # (segment, item_id)


class _SlotLearner:
    """What every slot learner does with a batch of observations, through its own
    ``record_trial`` and ``record_click``."""

    def record_trial(self, request_id: str, segment: str, item: str) -> bool:
        raise NotImplementedError

    def record_click(self, request_id: str, item: str) -> bool:
        raise NotImplementedError

    def update(self, observations: Iterable[tuple[str, str, str, bool]]) -> int:
        """Trials (and clicks) of ``(request_id, segment, item, clicked)``; how many counted."""
        n = 0
        for request_id, segment, item, clicked in observations:
            n += self.record_trial(request_id, segment, item)
            if clicked:
                self.record_click(request_id, item)
        return n


class BetaPosteriors(_SlotLearner):
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


class _Ridge:
    """One segment's ridge regression of a click on the embedding: ``A^-1`` and ``b``.

    ``A^-1`` is kept by Sherman-Morrison (``O(d^2)`` a trial, no solve at choose time).
    """

    __slots__ = ("a_inv", "b", "trials", "clicks")

    def __init__(self, dim: int, ridge: float) -> None:
        self.a_inv = np.eye(dim) / ridge
        self.b = np.zeros(dim)
        self.trials = 0
        self.clicks = 0

    def add(self, x: np.ndarray) -> None:
        """``A += x x'``: one more trial at ``x``."""
        ax = self.a_inv @ x
        self.a_inv -= np.outer(ax, ax) / (1.0 + float(x @ ax))

    @property
    def theta(self) -> np.ndarray:
        return self.a_inv @ self.b


class LinUCB(_SlotLearner):
    """A linear UCB bandit whose arms are items described by their embedding.

    Every item is the vector ``x`` of its candidate-tower embedding (L2-normalised), and the
    click probability of a slot impression is modelled as ``theta . x``: one ridge regression
    per segment (``""`` for one shared by all), ``A = ridge * I + sum x x'`` over its trials and
    ``b = sum reward * x``, ``theta = A^-1 b``. An item's score is ``theta . x + alpha *
    sqrt(x' A^-1 x)``, the estimate plus its uncertainty, and the highest scores fill the
    slots. Unlike the Beta posteriors, a click on one item raises the score of the items whose
    embeddings point the same way, so a new item near engaging ones is tried sooner.

    An item without an embedding (new since the retrieval version was trained) scores the
    prior's ``alpha * sqrt(1 / ridge)``, the uncertainty of a unit vector before any trial: the
    most a score's bonus can be. For exploration that is the right default: such an item is
    exactly what the slots exist for, nothing here can say it is worse than the rest, and its
    features arrive with the next retrieval version. Its trials count in the totals but teach
    the regression nothing.

    The regression is in one embedding space: ``set_features`` with another ``space`` (a new
    retrieval version) or another dimension starts over from the prior.

    Args:
        alpha: the weight of the uncertainty bonus, > 0.
        ridge: the ridge ``lambda`` (the prior's precision), > 0.
        max_items: items whose embedding is remembered; the least recently set are forgotten.
        max_pending: trials remembered for their click (and for idempotency).
        max_segments: segments with a regression; the least recently trained are forgotten.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        ridge: float = 1.0,
        max_items: int = 100_000,
        max_pending: int = 100_000,
        max_segments: int = 1_000,
    ) -> None:
        if alpha <= 0 or ridge <= 0:
            raise ValueError(f"LinUCB needs alpha, ridge > 0; got {alpha}, {ridge}")
        if min(max_items, max_pending, max_segments) < 1:
            raise ValueError("max_items, max_pending and max_segments must be at least 1")
        self.alpha = float(alpha)
        self.ridge = float(ridge)
        self.max_items = max_items
        self.max_pending = max_pending
        self.max_segments = max_segments
        self.dim: int | None = None
        self.space: int | str | None = None
        self._features: OrderedDict[str, np.ndarray] = OrderedDict()  # unit rows, float32
        self._ridges: OrderedDict[str, _Ridge] = OrderedDict()
        # (request_id, item) -> [its segment's regression (None: no embedding), x, clicked]
        self._trials: OrderedDict[tuple[str, str], list[Any]] = OrderedDict()
        self.total_trials = 0
        self.total_clicks = 0

    def __len__(self) -> int:
        return len(self._features)

    @property
    def prior_score(self) -> float:
        """The score of an item without an embedding (and of every item before any trial)."""
        return self.alpha * float(np.sqrt(1.0 / self.ridge))

    def _reset(self) -> None:
        self._features.clear()
        self._ridges.clear()
        self._trials.clear()  # their x are of the old space: their clicks count nothing now

    def set_features(self, items: Sequence[str], vectors: np.ndarray, space: int | str | None = None) -> None:
        """The embeddings of ``items`` (one row each, normalised here). A zero or non-finite row
        means the item has none. Another ``space`` or dimension than before starts over."""
        x = np.asarray(vectors, dtype=np.float64).reshape(len(items), -1)
        dim = x.shape[1]
        if self.dim is not None and (dim != self.dim or (space is not None and space != self.space)):
            self._reset()
        self.dim = dim
        if space is not None:
            self.space = space
        with np.errstate(invalid="ignore", over="ignore"):
            norms = np.linalg.norm(x, axis=1)
        ok = np.isfinite(norms) & (norms > 0)
        unit = (x / np.where(ok, norms, 1.0)[:, None]).astype(np.float32)
        for item, row, good in zip(items, unit, ok.tolist(), strict=True):
            key = str(item)
            if good:
                self._features[key] = row
                self._features.move_to_end(key)
            else:
                self._features.pop(key, None)
        while len(self._features) > self.max_items:
            self._features.popitem(last=False)

    def features(self, items: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``items``' unit embeddings (zeros where unknown) and which are known."""
        dim = self.dim or 0
        x = np.zeros((len(items), dim), dtype=np.float64)
        known = np.zeros(len(items), dtype=bool)
        for n, item in enumerate(items):
            row = self._features.get(str(item))
            if row is not None:
                x[n], known[n] = row, True
        return x, known

    def _state(self, segment: str) -> tuple[np.ndarray, np.ndarray]:
        """``(A^-1, theta)`` of ``segment`` (the prior's where it has no trials)."""
        r = self._ridges.get(segment)
        if r is None:
            dim = self.dim or 0
            return np.eye(dim) / self.ridge, np.zeros(dim)
        return r.a_inv, r.theta

    def scores(self, segment: str, items: Sequence[str]) -> np.ndarray:
        """Each item's upper confidence bound ``theta . x + alpha * sqrt(x' A^-1 x)``."""
        out = np.full(len(items), self.prior_score)
        x, known = self.features(items)
        if not known.any():
            return out
        a_inv, theta = self._state(segment)
        xk = x[known]
        var = np.einsum("ij,jk,ik->i", xk, a_inv, xk)
        out[known] = xk @ theta + self.alpha * np.sqrt(np.maximum(var, 0.0))
        return out

    def mean(self, segment: str, items: Sequence[str]) -> np.ndarray:
        """The regression's click probability ``theta . x`` of each item, clipped to [0, 1]
        (0, the prior's, for an item without an embedding)."""
        x, _ = self.features(items)
        _, theta = self._state(segment)
        return np.clip(x @ theta, 0.0, 1.0) if len(theta) else np.zeros(len(items))

    def _ridge(self, segment: str) -> _Ridge:
        r = self._ridges.get(segment)
        if r is None:
            r = self._ridges[segment] = _Ridge(self.dim or 0, self.ridge)
            while len(self._ridges) > self.max_segments:
                self._ridges.popitem(last=False)
        else:
            self._ridges.move_to_end(segment)
        return r

    def record_trial(self, request_id: str, segment: str, item: str) -> bool:
        """An impression of ``item`` in a slot of ``request_id``: ``A += x x'``, once. True if counted."""
        key = (request_id, item)
        if key in self._trials:
            return False
        row = self._features.get(item)
        x = None if row is None else row.astype(np.float64)
        r = None
        if x is not None:
            r = self._ridge(segment)
            r.add(x)
            r.trials += 1
        self._trials[key] = [r, x, False]
        while len(self._trials) > self.max_pending:
            self._trials.popitem(last=False)
        self.total_trials += 1
        return True

    def record_click(self, request_id: str, item: str) -> bool:
        """A click on ``item`` after ``request_id`` showed it in a slot: its trial's reward
        becomes 1 (``b += x``), once. A click on an item that request did not explore (or
        whose trial was forgotten) counts nothing. True if counted."""
        trial = self._trials.get((request_id, item))
        if trial is None or trial[2]:
            return False
        trial[2] = True
        r, x = trial[0], trial[1]
        if r is not None:
            r.b += x
            r.clicks += 1
        self.total_clicks += 1
        return True

    def summary(self, top: int = 20) -> dict[str, object]:
        """What the regressions hold: totals, dimension, and the segments with most trials."""
        ranked = sorted(self._ridges.items(), key=lambda kv: -kv[1].trials)[:top]
        segments = [
            {
                "segment": seg,
                "trials": r.trials,
                "clicks": r.clicks,
                "theta_norm": float(np.linalg.norm(r.theta)),
            }
            for seg, r in ranked
        ]
        return {
            "dimension": self.dim,
            "space": self.space,
            "items_with_embedding": len(self._features),
            "segments": len(self._ridges),
            "pending_trials": len(self._trials),
            "trials": self.total_trials,
            "clicks": self.total_clicks,
            "alpha": self.alpha,
            "ridge": self.ridge,
            "top_segments": segments,
        }


Learner = BetaPosteriors | LinUCB  # what a learning policy reads and updates


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
        return self.kind in ("epsilon_greedy", "thompson", "linucb")

    def choose(
        self,
        pool: Sequence[str],
        posteriors: Learner,
        segment: str,
        n: int,
        rng: np.random.Generator,
    ) -> list[str]:
        """Up to ``n`` distinct items of ``pool`` for the slots, in slot order.

        ``posteriors`` is a ``LinUCB`` for ``linucb``, ``BetaPosteriors`` for the others.
        """
        items = list(dict.fromkeys(str(i) for i in pool))
        n = min(n, len(items))
        if n <= 0 or self.kind == "none":
            return []
        if self.kind == "uniform":
            return [items[i] for i in rng.choice(len(items), size=n, replace=False)]
        if self.kind == "linucb":
            if not isinstance(posteriors, LinUCB):
                raise TypeError(f"linucb chooses with a LinUCB, not {type(posteriors).__name__}")
            # Rounded so that equal scores (items without an embedding, all at the prior's)
            # tie exactly and the random key breaks the tie.
            scores = np.round(posteriors.scores(segment, items), 12)
            return [items[i] for i in np.lexsort((rng.random(len(items)), -scores))[:n]]
        if not isinstance(posteriors, BetaPosteriors):
            raise TypeError(f"{self.kind} chooses with BetaPosteriors, not {type(posteriors).__name__}")
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
