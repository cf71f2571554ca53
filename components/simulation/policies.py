"""The recommenders a simulation compares, each answering "show this user k items".

Every policy picks from the same allowed items (``Request.allowed``: the catalog the system
may show, less what the user already engaged with, as the gateway filters it), so their
rewards differ only by how they choose:

- ``RandomPolicy``: uniformly at random (the floor);
- ``PopularityPolicy``: most positive events in the data first (the usual baseline);
- ``RetrievalPolicy``: exact top-k by the pushed retrieval model's dot product (the two-tower
  model alone: no ranker, no diversity, no exploration);
- ``OraclePolicy``: top-k by the truth's expected reward (the reference of every share; what
  a learner could reach is ``components.simulation.ceiling``'s).

The served system (the gateway) is a policy too; it lives with the entry point that reaches it,
since pipeline steps do not import serving.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from components.simulation.truth import SimulatedResponse, Truth


@dataclass(frozen=True)
class Universe:
    """The items a simulation may show: in the serving catalog and known to the truth."""

    item_ids: np.ndarray  # [N] str
    position: Mapping[str, int]

    @classmethod
    def of(cls, item_ids: Sequence[str]) -> Universe:
        ids = np.asarray([str(i) for i in item_ids], dtype=object)
        return cls(ids, {i: n for n, i in enumerate(ids)})

    def __len__(self) -> int:
        return len(self.item_ids)

    def mask(self, item_ids: Sequence[str] | set[str]) -> np.ndarray:
        """A boolean mask of the universe, True at ``item_ids`` (ids outside it are ignored)."""
        out = np.zeros(len(self), dtype=bool)
        idx = [self.position[i] for i in item_ids if i in self.position]
        out[idx] = True
        return out


@dataclass(frozen=True)
class Request:
    """One recommendation request of a simulated user.

    Attributes:
        user_id: who asks.
        number: this user's request number (0, 1, ...).
        k: how many items to show.
        allowed: [len(universe)] the items this request may show.
        recent_items: the user's recent positive items, newest first (what the simulation
            added, then the data's), as the gateway's query reads them.
        device: the user's usual device (the request context).
        hour: the user's usual hour of activity, UTC (the request context).
    """

    user_id: str
    number: int
    k: int
    allowed: np.ndarray
    recent_items: list[str]
    device: str = "unknown"
    hour: int = 0


@dataclass(frozen=True)
class Recommendation:
    """The items a policy shows, best first, and the serving arm that chose them (if any)."""

    item_ids: list[str]
    arm: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


class Policy(Protocol):
    """A recommender under simulation."""

    name: str

    def recommend(self, request: Request) -> Recommendation: ...

    def observe(self, request: Request, shown: Recommendation, response: SimulatedResponse) -> None:
        """What the user did with what was shown (a policy that learns online uses it)."""
        ...


def top_allowed(scores: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    """Universe positions of the ``k`` best-scored allowed items, best first (ties: lower position)."""
    candidates = np.flatnonzero(allowed)
    order = np.argsort(-scores[candidates], kind="stable")[:k]
    return candidates[order]


class _ScoredPolicy:
    """A policy that scores every universe item for a user and shows the top allowed ones."""

    name = "scored"

    def __init__(self, universe: Universe) -> None:
        self.universe = universe

    def scores(self, request: Request) -> np.ndarray:
        raise NotImplementedError

    def recommend(self, request: Request) -> Recommendation:
        picked = top_allowed(self.scores(request), request.allowed, request.k)
        return Recommendation([str(i) for i in self.universe.item_ids[picked]])

    def observe(self, request: Request, shown: Recommendation, response: SimulatedResponse) -> None:
        del request, shown, response  # these policies do not learn online


class RandomPolicy(_ScoredPolicy):
    """Allowed items uniformly at random (seeded: the same seed gives the same lists)."""

    name = "random"

    def __init__(self, universe: Universe, seed: int) -> None:
        super().__init__(universe)
        self.rng = np.random.default_rng(seed)

    def scores(self, request: Request) -> np.ndarray:
        return self.rng.random(len(self.universe))


class PopularityPolicy(_ScoredPolicy):
    """The most popular allowed items: ``order`` is item ids, most popular first."""

    name = "popularity"

    def __init__(self, universe: Universe, order: Sequence[str]) -> None:
        super().__init__(universe)
        rank = np.full(len(universe), len(order), dtype=np.float64)
        for n, item in enumerate(order):
            pos = universe.position.get(str(item))
            if pos is not None and rank[pos] == len(order):
                rank[pos] = n
        self._scores = -rank

    def scores(self, request: Request) -> np.ndarray:
        return self._scores


class OraclePolicy(_ScoredPolicy):
    """The reference: the allowed items of highest expected reward under the truth."""

    name = "oracle"

    def __init__(self, universe: Universe, truth: Truth) -> None:
        super().__init__(universe)
        self.truth = truth
        self._cache: dict[str, np.ndarray] = {}

    def scores(self, request: Request) -> np.ndarray:
        if request.user_id not in self._cache:
            ids = [str(i) for i in self.universe.item_ids]
            self._cache[request.user_id] = self.truth.expected_reward([request.user_id], ids)[0]
        return self._cache[request.user_id]


class QueryEmbedder(Protocol):
    """The retrieval model's query side and the item embeddings it searches."""

    item_ids: np.ndarray

    def item_scores(self, user_id: str, recent_items: Sequence[str]) -> np.ndarray:
        """Dot products of the user's query embedding with every item (``item_ids`` order)."""
        ...


class RetrievalPolicy(_ScoredPolicy):
    """The retrieval model alone: exact top-k by query . item over the allowed items."""

    name = "retrieval"

    def __init__(self, universe: Universe, embedder: QueryEmbedder) -> None:
        super().__init__(universe)
        self.embedder = embedder
        model_ids = [str(i) for i in embedder.item_ids]
        # Universe position of each of the model's items (-1: outside the universe).
        self._to_universe = np.array([universe.position.get(i, -1) for i in model_ids], dtype=np.int64)

    def scores(self, request: Request) -> np.ndarray:
        raw = self.embedder.item_scores(request.user_id, request.recent_items)
        out = np.full(len(self.universe), -np.inf)
        known = self._to_universe >= 0
        out[self._to_universe[known]] = raw[known]
        return out
