"""Similar items: neighbours of an item in the stable retrieval version's embedding space."""

from __future__ import annotations

from typing import Any

from serving.gateway.snapshot import Snapshot


class UnknownItem(LookupError):
    """An item id that the serving index does not hold."""


def similar_items(snap: Snapshot, retrieval_model: str, item_id: str, k: int) -> dict[str, Any]:
    """Content/taste neighbours of an item in the stable retrieval version's embedding space.

    Raises:
        UnknownItem: the stable retrieval version's index does not hold ``item_id``.
    """
    v = snap.versions.version(retrieval_model, "stable") or max(snap.versions.retrieval)
    assets = snap.versions.retrieval[v]
    row = assets.position.get(item_id)
    if row is None:
        raise UnknownItem(
            f"item_id {item_id!r} is not in the index of {retrieval_model} version {v} "
            f"({len(assets):,} items)"
        )
    out = []
    for r, sim, _ in assets.neighbours([row], min(len(assets), 4 * k + 10)):
        cp = int(snap.to_catalog[v][r])
        if snap.base_mask[cp]:
            out.append(
                {"item_id": str(assets.item_ids[r]), "score": round(sim, 6), "reason": "similar content"}
            )
        if len(out) == k:
            break
    return {"item_id": item_id, "model_versions": {retrieval_model: v}, "items": out}
