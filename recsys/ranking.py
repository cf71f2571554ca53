"""How candidates become a list: score fusion, MMR diversity, exploration slots, and the
serving policy that says which of those steps serve.

The offline evaluation (its ``served`` replay), batch ``recsys recommend`` and the gateway
all order candidates with these functions and read the same pushed ``ServingPolicy``, so the
numbers the gate reads describe what serves. Everything here is pure (numpy in, numpy out).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from recsys.artifacts import SERVING_POLICY_FILE, assets_extra

# --------------------------------------------------------------------------------------------
# Score fusion
# --------------------------------------------------------------------------------------------


def rank01(x: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1], 1 for the best (ties broken by position, stably)."""
    x = np.asarray(x)
    if len(x) < 2:
        return np.ones(len(x), dtype=np.float64)
    # One stable sort and a scatter: the rank of each element (the argsort of an argsort).
    ranks = np.empty(len(x), dtype=np.int64)
    ranks[np.argsort(x, kind="stable")] = np.arange(len(x))
    return ranks / (len(x) - 1)


def rank_fusion(
    ranker_scores: np.ndarray, retrieval_scores: np.ndarray, retrieval_weight: float
) -> np.ndarray:
    """The ranker's rank plus ``retrieval_weight`` x the retriever's rank, each scaled to [0, 1].

    Rank fusion is robust to the two scores living on different scales. With a weight of 0
    the ranker's own scores are returned unchanged; with an infinite weight (the ranker not
    served) the retrieval scores are.
    """
    ranker_scores = np.asarray(ranker_scores, dtype=np.float64)
    if math.isinf(retrieval_weight):
        return np.asarray(retrieval_scores, dtype=np.float64)
    if retrieval_weight <= 0:
        return ranker_scores
    return rank01(ranker_scores) + retrieval_weight * rank01(np.asarray(retrieval_scores))


def union_candidates(
    retrieved: np.ndarray,
    retrieval_scores: np.ndarray,
    neighbours: np.ndarray,
    neighbour_scores: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two candidate sources as one list: the retrieved items in their order, then the
    neighbour source's items retrieval did not return.

    An item only the neighbours found gets the lowest retrieval score of the list (retrieval
    ranked it below its cut, and serving does not know by how much); an item the neighbours
    did not find gets a neighbour score of 0.

    Returns:
        candidates (positions or ids, as given), their retrieval scores, their neighbour scores.
    """
    retrieved = np.asarray(retrieved)
    retrieval_scores = np.asarray(retrieval_scores, dtype=np.float64)
    neighbours = np.asarray(neighbours)
    extra = ~np.isin(neighbours, retrieved)
    floor = retrieval_scores.min() if len(retrieval_scores) else 0.0
    candidates = np.concatenate([retrieved, neighbours[extra]])
    retrieval = np.concatenate([retrieval_scores, np.full(int(extra.sum()), floor)])
    neighbour = np.zeros(len(candidates), dtype=np.float64)
    if len(neighbours):
        index = {c: n for n, c in enumerate(candidates.tolist())}
        at = np.fromiter((index[c] for c in neighbours.tolist()), dtype=np.int64, count=len(neighbours))
        neighbour[at] = np.asarray(neighbour_scores, dtype=np.float64)
    return candidates, retrieval, neighbour


def blend_sources(
    retrieval_scores: np.ndarray, neighbour_scores: np.ndarray, neighbour_weight: float
) -> np.ndarray:
    """The candidate score: ``(1 - w)`` x retrieval + ``w`` x neighbour score, each scaled to
    [0, 1] over the candidates (retrieval by min-max, the non-negative neighbour scores by
    their maximum). With ``w = 0`` the retrieval scores are returned unchanged.

    The category taste joins the same way, on top of that blend: ``blend_sources(blended,
    taste, taste_weight)``."""
    retrieval = np.asarray(retrieval_scores, dtype=np.float64)
    if neighbour_weight <= 0:
        return retrieval
    span = retrieval.max() - retrieval.min() if len(retrieval) else 0.0
    r01 = (retrieval - retrieval.min()) / span if span > 0 else np.zeros_like(retrieval)
    nb = np.asarray(neighbour_scores, dtype=np.float64)
    top = nb.max() if len(nb) else 0.0
    n01 = nb / top if top > 0 else np.zeros_like(nb)
    return (1.0 - neighbour_weight) * r01 + neighbour_weight * n01


def blend_candidates(
    retrieved: np.ndarray,
    retrieval_scores: np.ndarray,
    neighbours: np.ndarray,
    neighbour_scores: np.ndarray,
    neighbour_weight: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two sources joined (``union_candidates``), blended (``blend_sources``), best first.

    Returns:
        The candidates, their blended scores, and where the neighbour part of the blend
        outweighs the retrieval part (the item-to-item source is what placed the item).
    """
    candidates, retrieval, neighbour = union_candidates(
        retrieved, retrieval_scores, neighbours, neighbour_scores
    )
    blended = blend_sources(retrieval, neighbour, neighbour_weight)
    retrieval_part = blend_sources(retrieval, np.zeros_like(neighbour), neighbour_weight)
    placed = (neighbour > 0) & (blended - retrieval_part >= retrieval_part)
    order = np.argsort(-blended, kind="stable")
    return candidates[order], blended[order], placed[order]


def category_taste(
    candidate_categories: Sequence[frozenset[str]], recent_categories: Sequence[frozenset[str]]
) -> np.ndarray:
    """How well each candidate fits the categories of the user's recent items, in [0, 1]: the
    largest share of those items that carry one of the candidate's categories.

    A user's few positives say more about the categories they like than about the items
    themselves, and a share needs no training, so a user with one positive already has a
    taste; an empty history gives zeros (no opinion).
    """
    out = np.zeros(len(candidate_categories), dtype=np.float64)
    if not recent_categories:
        return out
    counts: dict[str, int] = {}
    for cats in recent_categories:
        for c in cats:
            counts[c] = counts.get(c, 0) + 1
    n = len(recent_categories)
    for i, cats in enumerate(candidate_categories):
        if cats:
            out[i] = max(counts.get(c, 0) for c in cats) / n
    return out


def taste_candidates(
    scores: np.ndarray, taste: np.ndarray, taste_weight: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The candidates re-scored with the category taste's share (``blend_sources``), best first.

    Returns:
        The order (positions into ``scores``), the blended scores in that order, and where the
        taste part of the blend outweighs the rest (the category taste placed the item).
    """
    blended = blend_sources(scores, taste, taste_weight)
    rest = blend_sources(scores, np.zeros_like(blended), taste_weight)
    placed = (np.asarray(taste) > 0) & (blended - rest >= rest)
    order = np.argsort(-blended, kind="stable")
    return order, blended[order], placed[order]


# --------------------------------------------------------------------------------------------
# Session feedback: what the user was shown and passed over
# --------------------------------------------------------------------------------------------


def session_feedback(scores: np.ndarray, passed_over: np.ndarray, item_decay: float) -> np.ndarray:
    """The candidates' scores discounted by what this user was served lately and did not take.

    Passing an item over is evidence against it that the models never saw: a user who was
    shown an item twice and took it neither time is less likely to take it the third time
    than the scores say, and showing it again costs a slot. The scores are min-max scaled to
    [0, 1] first (so the discount means the same on any scale), then each is multiplied by
    ``item_decay ** passed_over``; ``item_decay = 1`` keeps the order.

    Args:
        scores: [N] the candidates' scores, higher is better.
        passed_over: [N] how often each candidate was served to the user and not engaged with.
        item_decay: in (0, 1], the factor per time an item was passed over.
    """
    s = np.asarray(scores, dtype=np.float64)
    if not len(s):
        return s
    span = s.max() - s.min()
    out = (s - s.min()) / span if span > 0 else np.ones_like(s)
    return out * item_decay ** np.asarray(passed_over, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Re-ranking: MMR diversity and exploration
# --------------------------------------------------------------------------------------------


def unit_directions(embeddings: np.ndarray) -> np.ndarray:
    """Embeddings without an item-bias last coordinate, L2-normalized: what MMR compares.

    Training with ``item_bias`` appends a learned prior to L2-normalized tower outputs, so
    the first D-1 coordinates of every row have unit norm; that is how the bias column is
    recognised here (an un-normalized model keeps all its coordinates).
    """
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim == 2 and emb.shape[1] > 2:
        head = np.linalg.norm(emb[:, :-1], axis=1)
        if len(head) and np.allclose(head, 1.0, atol=1e-3):
            emb = emb[:, :-1]
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.where(norms > 0, norms, 1.0)


def mmr(
    relevance: np.ndarray,
    embeddings: np.ndarray,
    k: int,
    trade_off: float,
) -> list[int]:
    """Maximal marginal relevance: pick k indices balancing relevance and novelty.

    Each step picks argmax of ``trade_off * rel(i) - (1 - trade_off) * max_j sim(i, j)`` over
    the already picked j, with cosine similarity. ``trade_off=1`` is plain top-k by relevance.
    Relevance is min-max scaled first so the two terms share a range. The picks are greedy,
    so the first k of a longer pick are the pick of k.

    Args:
        relevance: [N] scores, higher is better.
        embeddings: [N, D] item vectors used for similarity.
        k: how many to pick (capped at N).
        trade_off: lambda in [0, 1].

    Returns:
        Picked indices into the candidate arrays, in order.
    """
    n = len(relevance)
    k = min(k, n)
    if k <= 0:
        return []
    rel = np.asarray(relevance, dtype=np.float64)
    span = rel.max() - rel.min()
    rel = (rel - rel.min()) / span if span > 0 else np.zeros_like(rel)
    emb = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    emb = emb / np.where(norms > 0, norms, 1.0)
    picked: list[int] = []
    max_sim = np.full(n, -np.inf)
    available = np.ones(n, dtype=bool)
    for _ in range(k):
        penalty = np.where(np.isfinite(max_sim), max_sim, 0.0)
        score = trade_off * rel - (1.0 - trade_off) * penalty
        score[~available] = -np.inf
        best = int(np.argmax(score))
        picked.append(best)
        available[best] = False
        max_sim = np.maximum(max_sim, emb @ emb[best])
    return picked


def insert_exploration(
    ranked: Sequence[str], explore: Sequence[str], k: int, slots: int, position: int
) -> tuple[list[str], set[str]]:
    """Place up to ``slots`` exploration items (e.g. new items) into a top-k list.

    They go at ``position`` (0-based) and after, replacing the tail of the ranked list, so
    exploitation keeps the head. Items already in the list are not duplicated.

    Returns:
        The final list of at most k ids, and the ids that came from exploration.
    """
    chosen = [e for e in explore if e not in set(ranked[:k])][:slots]
    head = [r for r in ranked if r not in chosen][: max(0, k - len(chosen))]
    pos = min(position, len(head))
    out = head[:pos] + chosen + head[pos:]
    return out[:k], set(chosen) & set(out[:k])


def sample_positions(
    candidates: np.ndarray,
    allowed: np.ndarray,
    exclude: set[int],
    n: int,
    rng: np.random.Generator,
    draws_per_pick: int = 8,
) -> np.ndarray:
    """Up to ``n`` distinct positions drawn uniformly from ``candidates`` that are ``allowed``
    (a mask over all positions) and not in ``exclude``.

    Random draws, keeping the first ``n`` distinct ones that qualify, are uniform sampling
    without replacement from the qualifying set, and they touch a few entries instead of
    building that set: on a 100k catalog where most items count as new, the mask and the
    scan cost ~0.45 ms a request. When the draws find too few (a sparse set: strict filters,
    few new items), the set is built and sampled exactly, so nothing qualifying is missed.
    """
    if n <= 0 or len(candidates) == 0:
        return np.zeros(0, dtype=np.int64)
    draws = candidates[rng.integers(len(candidates), size=draws_per_pick * n)]
    picked = [d for d in dict.fromkeys(draws[allowed[draws]].tolist()) if d not in exclude][:n]
    if len(picked) == n:
        return np.asarray(picked, dtype=np.int64)
    pool = candidates[allowed[candidates]]
    if exclude:
        pool = pool[~np.isin(pool, list(exclude))]
    return rng.choice(pool, size=min(n, len(pool)), replace=False).astype(np.int64)


# --------------------------------------------------------------------------------------------
# The serving policy a pushed version carries
# --------------------------------------------------------------------------------------------


class ServingPolicy(BaseModel):
    """Which ordering steps serve with a pushed version, as the evaluation chose and gated them.

    ``neighbour_weight`` is the item-to-item source's share of the candidate score,
    ``taste_weight`` the category taste's share and ``retrieval_weight`` the fusion weight,
    all picked on a validation split; None means the
    ranker is not served (retrieval order alone: the ranker lowered the validation metric or,
    with the generator's truth, the expected reward). ``mmr`` false means MMR is not served.
    ``reasons`` say why each choice was made; ``validation`` holds the grid's scores.
    """

    model_config = ConfigDict(extra="forbid")

    retrieval_weight: float | None = Field(..., ge=0)
    # The item-to-item source's share of the candidate score (``blend_sources``); 0: the
    # retriever's candidates alone (also for versions pushed without neighbours).
    neighbour_weight: float = Field(0.0, ge=0, le=1)
    # The category taste's share of that candidate score (``blend_sources``, after the neighbour
    # blend); 0: not served (also for versions pushed before it existed).
    taste_weight: float = Field(0.0, ge=0, le=1)
    mmr: bool = True
    rank_depth: int = Field(..., ge=1)
    reasons: list[str] = []
    validation: dict[str, Any] = {}

    @property
    def ranker_served(self) -> bool:
        """False when the retrieval order serves alone."""
        return self.retrieval_weight is not None

    @property
    def fusion_weight(self) -> float:
        """The weight for ``rank_fusion``: infinite when the ranker is not served."""
        return math.inf if self.retrieval_weight is None else self.retrieval_weight


def serving_policy_path(version_dir: Path) -> Path:
    """``<version>/assets.extra/serving_policy.json`` of a pushed retrieval version."""
    return assets_extra(Path(version_dir)) / SERVING_POLICY_FILE


def read_serving_policy(version_dir: Path) -> ServingPolicy | None:
    """The policy pushed with a retrieval version; None for a version pushed without one."""
    path = serving_policy_path(version_dir)
    if not path.is_file():
        return None
    return ServingPolicy.model_validate(json.loads(path.read_text()))


def write_serving_policy(version_dir: Path, policy: ServingPolicy) -> Path:
    """Write the policy beside a (not yet published) retrieval version's SavedModel."""
    path = serving_policy_path(version_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(policy.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
    return path
