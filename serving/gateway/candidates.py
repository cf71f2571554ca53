"""Candidates down ``gateway.fallback_chain``: the model server's retrieval (query tower +
ScaNN), exact search over the version's exported embeddings in this process, segment
popularity, global popularity. Each step taken past the first is counted."""

from __future__ import annotations

import logging

import numpy as np

from recsys.config import Settings
from serving.clients import ModelServerError
from serving.gateway.catalog import RetrievalAssets
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.model_calls import OVERLOAD_CODES, ModelCalls
from serving.gateway.popularity import popularity
from serving.gateway.snapshot import Snapshot

log = logging.getLogger("serving.gateway")


class CandidateChain:
    """The first step of the fallback chain that answers gives the candidates.

    Args:
        settings: the configuration (``gateway.fallback_chain``, ``gateway.candidates``).
        model_calls: the retrieval model's calls, behind the breaker.
        metrics: where each fallback taken is counted.
    """

    def __init__(self, settings: Settings, model_calls: ModelCalls, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.model_calls = model_calls
        self.metrics = metrics

    async def candidates(
        self,
        snap: Snapshot,
        assets: RetrievalAssets,
        label: str,
        query: dict[str, np.ndarray],
        segment: str,
        allowed: np.ndarray,
        fallback: list[str],
        reasons: dict[int, str],
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """Candidates down the configured fallback chain; each step past the first is counted."""
        gw = self.settings.gateway
        catalog = snap.catalog
        overloaded = False
        out: tuple[np.ndarray, np.ndarray, str]
        for n, step in enumerate(gw.fallback_chain):
            if step == "exact" and overloaded:
                # Exact search is for a server that cannot load the index, not for one that is
                # slow or down: running the query tower here under overload would only add load.
                continue
            try:
                if step == "retrieval" and "item_rows" in assets.requirements.get("outputs", ()):
                    # Rows of this version's item list, mapped to the cache with one gather:
                    # no 1000 strings through the proto and a dict.
                    pred = await self.model_calls.call(
                        self.settings.push.retrieval_model, query, label, "retrieve", ("item_rows", "scores")
                    )
                    rows = pred.outputs["item_rows"][0][: gw.candidates].astype(np.int64)
                    sc = pred.outputs["scores"][0][: gw.candidates].astype(np.float32)
                    # A label can move between the snapshot and the call: rows are read with
                    # the item list of the version that answered (REST does not say: ours).
                    served = pred.version or assets.version
                    if served not in snap.to_catalog:
                        raise RuntimeError(f"version {served} answered, not in the gateway's snapshot yet")
                    to_catalog = snap.to_catalog[served]
                    ok = (rows >= 0) & (rows < len(to_catalog))
                    out = to_catalog[rows[ok]], sc[ok], step
                elif step == "retrieval":
                    pred = await self.model_calls.call(
                        self.settings.push.retrieval_model, query, label, "retrieve"
                    )
                    ids = pred.outputs["item_ids"][0][: gw.candidates]
                    sc = pred.outputs["scores"][0][: gw.candidates].astype(np.float32)
                    valid = [
                        (catalog.position[i], s)
                        for i, s in zip(ids, sc, strict=True)
                        if i in catalog.position
                    ]
                    pos = np.fromiter((v[0] for v in valid), dtype=np.int64, count=len(valid))
                    out = pos, np.fromiter((v[1] for v in valid), dtype=np.float32, count=len(valid)), step
                elif step == "exact":
                    rows, sc = assets.exact_search(query, gw.candidates)
                    out = snap.to_catalog[assets.version][rows], sc.astype(np.float32), step
                else:
                    out = popularity(catalog, segment, allowed, gw.candidates, reasons, step)
            except Exception as e:  # noqa: BLE001 - any failure moves down the chain
                log.warning("candidates from %s failed: %s", step, e)
                overloaded |= isinstance(e, ModelServerError) and e.code in OVERLOAD_CODES
                continue
            if n > 0:
                fallback.append(f"candidates:{out[2]}")
                self.metrics.fallback("candidates", out[2])
            return out
        fallback.append("candidates:none")
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32), "none"
