"""``POST /v1/recommendations``."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Response

from recsys.config import Settings
from serving.gateway.routes.dependencies import AccessChecks, CurrentGateway
from serving.gateway.routes.problems import problem
from serving.gateway.schemas import RecommendationRequest, RecommendationResponse
from serving.gateway.snapshot import NotReady


def recommendations_router(settings: Settings, access: AccessChecks) -> APIRouter:
    router = APIRouter()

    # Fields the answer leaves out stay out (an item's ``attribution`` without ``explain``),
    # rather than appearing as null.
    @router.post(
        "/v1/recommendations",
        response_model=RecommendationResponse,
        response_model_exclude_unset=True,
        dependencies=[access.read],
    )
    async def recommendations(req: RecommendationRequest, gateway: CurrentGateway) -> Any:
        """Top-k items for a user: retrieve, filter, rank, diversify, explore; with
        ``explain``, each item's attribution of the ranker's score."""
        g = gateway
        problems = _over_limits(settings, req)
        if problems:
            g.metrics.requests.labels(endpoint="recommendations", status="422").inc()
            return problem(422, problems)
        started = time.perf_counter()
        try:
            # On the event loop: the request waits for the store and the model server without
            # holding a thread (grpc.aio), and a thread hand-off per request costs more CPU than
            # the stages' NumPy work it would move off the loop (BENCHMARKS.md).
            out = await g.recommend_async(req)
        except NotReady as e:
            g.metrics.requests.labels(endpoint="recommendations", status="503").inc()
            return problem(503, f"not ready: {e}")
        except Exception:
            # Counted against the user's arm: the canary's error-rate guardrail reads it.
            g.metrics.requests.labels(endpoint="recommendations", status="500").inc()
            g.log_failed_request(req.user_id, (time.perf_counter() - started) * 1000)
            raise
        # Checked against the response model and written by pydantic's serializer in one step;
        # FastAPI would check it, turn it into plain data, then encode that with ``json``.
        body = RecommendationResponse.model_validate(out).model_dump_json(exclude_unset=True)
        g.metrics.requests.labels(endpoint="recommendations", status="200").inc()
        return Response(body, media_type="application/json")

    return router


def _over_limits(settings: Settings, req: RecommendationRequest) -> list[dict[str, Any]]:
    """The configured bounds a request passes (the schema's caps are checked before this):
    ``k``, the filter lists and the excluded ids, each refusal naming field, value and bound."""
    gw = settings.gateway
    out = []
    if req.k is not None and req.k > gw.max_k:
        out.append({"field": "k", "value": req.k, "message": f"k may be at most gateway.max_k = {gw.max_k}"})
    sizes = {
        "filters.categories": (len(req.filters.categories), "max_filter_categories"),
        "filters.exclude_categories": (len(req.filters.exclude_categories), "max_filter_categories"),
        "exclude_item_ids": (len(req.exclude_item_ids), "max_exclude_item_ids"),
    }
    for field, (n, name) in sizes.items():
        bound = getattr(gw, name)
        if n > bound:
            out.append({"field": field, "value": n, "message": f"at most gateway.{name} = {bound} entries"})
    return out
