"""Top-K ranking metrics: pure functions over ranked id lists and sets of relevant ids.

Conventions (those of Microsoft Recommenders' ``python_evaluation``, so numbers compare with
its published MovieLens tables): relevance is binary; a user's metric is computed on their
own ranked list and relevant set, and a model's metric is the mean over users who have at
least one relevant item.

- ``precision@k``: hits in the top k / k.
- ``recall@k``: hits in the top k / number of relevant items (can stay below 1 when there
  are more relevant items than k).
- ``hit_rate@k``: 1 if any relevant item is in the top k.
- ``ndcg@k``: DCG of the top k (a hit at rank r is worth 1 / log2(r + 1)) divided by the
  DCG of an ideal list that puts min(k, |relevant|) hits first.
- ``mrr``: 1 / rank of the first relevant item anywhere in the list, 0 if none.
- ``coverage@k``: the share of the catalog that appears in at least one user's top k: a
  model that shows everyone the same ten items has a tiny coverage.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping, Sequence

import numpy as np


def _hits(ranked: Sequence[str], relevant: Collection[str], k: int) -> list[bool]:
    return [item in relevant for item in list(ranked)[:k]]


def precision_at_k(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """Share of the top ``k`` slots holding a relevant item (a short list still divides by k)."""
    return sum(_hits(ranked, relevant, k)) / k if k > 0 else 0.0


def recall_at_k(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """Share of the relevant items found in the top ``k``; 0 when nothing is relevant."""
    if not relevant:
        return 0.0
    return sum(_hits(ranked, relevant, k)) / len(relevant)


def hit_rate_at_k(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """1.0 when at least one relevant item is in the top ``k``."""
    return 1.0 if any(_hits(ranked, relevant, k)) else 0.0


def ndcg_at_k(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """Normalized discounted cumulative gain of the top ``k`` with binary relevance."""
    if not relevant or k <= 0:
        return 0.0
    dcg = sum(1.0 / math.log2(rank + 2) for rank, hit in enumerate(_hits(ranked, relevant, k)) if hit)
    ideal = sum(1.0 / math.log2(rank + 2) for rank in range(min(k, len(relevant))))
    return dcg / ideal


def reciprocal_rank(ranked: Sequence[str], relevant: Collection[str]) -> float:
    """1 / (1-based rank of the first relevant item); 0 when none is in the list."""
    for rank, item in enumerate(ranked, start=1):
        if item in relevant:
            return 1.0 / rank
    return 0.0


def coverage(ranked_lists: Iterable[Sequence[str]], catalog_size: int, k: int) -> float:
    """Share of a catalog of ``catalog_size`` items that appears in some list's top ``k``."""
    if catalog_size <= 0:
        return 0.0
    shown: set[str] = set()
    for ranked in ranked_lists:
        shown.update(list(ranked)[:k])
    return len(shown) / catalog_size


def metric_names(ks: Sequence[int]) -> list[str]:
    """The names ``summarize`` reports, in display order."""
    names = [f"{m}@{k}" for m in ("recall", "ndcg", "precision", "hit_rate") for k in ks]
    return [*names, "mrr"]


def summarize(
    ranked: Mapping[str, Sequence[str]], relevant: Mapping[str, Collection[str]], ks: Sequence[int]
) -> dict[str, float]:
    """Mean of every metric over the users of ``relevant`` that have relevant items.

    Args:
        ranked: user -> ranked item ids (best first). A user missing here ranked nothing.
        relevant: user -> relevant item ids.
        ks: the cut-offs.

    Returns:
        ``{"recall@10": ..., "ndcg@10": ..., ..., "mrr": ..., "users": n}``; zeros with
        ``users`` 0 when no user has a relevant item.
    """
    users = [u for u, rel in relevant.items() if rel]
    out: dict[str, float] = {}
    for name in metric_names(ks):
        metric, _, k = name.partition("@")
        values = []
        for u in users:
            lst, rel = ranked.get(u, ()), relevant[u]
            if metric == "recall":
                values.append(recall_at_k(lst, rel, int(k)))
            elif metric == "ndcg":
                values.append(ndcg_at_k(lst, rel, int(k)))
            elif metric == "precision":
                values.append(precision_at_k(lst, rel, int(k)))
            elif metric == "hit_rate":
                values.append(hit_rate_at_k(lst, rel, int(k)))
            else:
                values.append(reciprocal_rank(lst, rel))
        out[name] = float(np.mean(values)) if values else 0.0
    out["users"] = len(users)
    return out
