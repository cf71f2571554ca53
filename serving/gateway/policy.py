"""Pure serving policy: arm assignment, filtering, MMR diversity, exploration.

Kept free of I/O so each rule has a unit test with hand-checked numbers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

ARMS = ("stable", "canary", "holdout")


def assign_arm(user_id: str, fractions: Mapping[str, float], salt: str = "recsys") -> str:
    """Sticky arm of a user: a hash of (salt, user id) mapped onto the arms' fractions.

    The same user always lands in the same arm while fractions and salt stay the same, and
    growing the canary fraction only moves users from stable into canary (the holdout slice
    sits at the top of the hash range and does not move).
    """
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    holdout = fractions.get("holdout", 0.0)
    canary = fractions.get("canary", 0.0)
    if u >= 1.0 - holdout:
        return "holdout"
    if u < canary:
        return "canary"
    return "stable"


def mmr(
    relevance: np.ndarray,
    embeddings: np.ndarray,
    k: int,
    trade_off: float,
) -> list[int]:
    """Maximal marginal relevance: pick k indices balancing relevance and novelty.

    Each step picks argmax of ``trade_off * rel(i) - (1 - trade_off) * max_j sim(i, j)`` over
    the already picked j, with cosine similarity. ``trade_off=1`` is plain top-k by relevance.
    Relevance is min-max scaled first so the two terms share a range.

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
