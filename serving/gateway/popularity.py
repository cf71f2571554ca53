"""Popular items as candidates: the holdout arm's list, a fallback, and cold start's base."""

from __future__ import annotations

import numpy as np

from serving.gateway.catalog import ItemCatalog


def popularity(
    catalog: ItemCatalog,
    segment: str,
    allowed: np.ndarray,
    n: int,
    reasons: dict[int, str],
    source: str | None = None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Up to ``n`` allowed items, popular in ``segment`` first, then globally: (positions, scores, source).

    ``source="global_popularity"`` skips the segment. Each item's reason goes to ``reasons``
    unless it has one already.
    """
    seg = catalog.segment_popular.get(segment) if segment else None
    if seg is not None and len(seg) and source != "global_popularity":
        pos = seg[allowed[seg]][:n]
        # Segment favourites first, then global popularity for the rest of the list.
        rest = catalog.global_popular[allowed[catalog.global_popular]]
        rest = rest[~np.isin(rest, pos)][: max(0, n - len(pos))]
        for q in pos:
            reasons.setdefault(int(q), f"popular in {segment}")
        pos = np.concatenate([pos, rest])
        out_source = "segment_popularity"
    else:
        pos = catalog.global_popular[allowed[catalog.global_popular]][:n]
        out_source = "global_popularity"
    for q in pos:
        reasons.setdefault(int(q), "popular right now")
    scores = -np.arange(len(pos), dtype=np.float32)  # rank order as a score
    return pos, scores, out_source
