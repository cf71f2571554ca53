"""Score fusion: how the ranker's scores and the retriever's combine into one order.

The offline evaluation (``retriever_ranker``), batch ``recsys recommend`` and the gateway all
order candidates with ``rank_fusion``, so the numbers the gate reads describe what serves.
"""

from __future__ import annotations

import numpy as np


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

    Rank fusion is robust to the two scores living on different scales. The offline
    evaluation (``retriever_ranker``), batch ``recsys recommend`` and the gateway all order
    candidates with this one function, so the numbers the gate reads describe what serves.
    With a weight of 0 the ranker's own scores are returned unchanged.
    """
    ranker_scores = np.asarray(ranker_scores, dtype=np.float64)
    if retrieval_weight <= 0:
        return ranker_scores
    return rank01(ranker_scores) + retrieval_weight * rank01(np.asarray(retrieval_scores))
