"""Candidates for a user with too few events for the models: popularity and content neighbours."""

from __future__ import annotations

import numpy as np

from serving.gateway.catalog import RetrievalAssets
from serving.gateway.popularity import popularity
from serving.gateway.snapshot import Snapshot


def cold_start(
    snap: Snapshot,
    assets: RetrievalAssets,
    recent_pos: np.ndarray,
    segment: str,
    allowed: np.ndarray,
    reasons: dict[int, str],
    n: int,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Segment popularity, interleaved with content neighbours of the items the user touched."""
    catalog = snap.catalog
    pop, _, pop_source = popularity(catalog, segment, allowed, n, reasons)
    rows = snap.to_version[assets.version][recent_pos]
    rows = rows[rows >= 0]
    neigh: list[int] = []
    for row_v, _sim, src in assets.neighbours(list(map(int, rows)), 4 * n):
        cp = int(snap.to_catalog[assets.version][row_v])
        if allowed[cp]:
            neigh.append(cp)
            reasons[cp] = f"similar to {assets.item_ids[src]}, which you just engaged with"
        if len(neigh) >= n:
            break
    if not neigh:
        return pop, -np.arange(len(pop), dtype=np.float32), pop_source
    merged: list[int] = []
    for a, b in zip(neigh, list(pop) + [None] * max(0, len(neigh) - len(pop)), strict=False):
        merged += [a] + ([int(b)] if b is not None else [])
    merged = list(dict.fromkeys(merged))
    return np.asarray(merged, dtype=np.int64), -np.arange(len(merged), dtype=np.float32), "cold_start"
