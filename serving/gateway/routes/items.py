"""``GET /v1/items/{item_id}/similar``."""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Query

from recsys.config import Settings
from recsys.contracts import ID_PATTERN
from serving.gateway.routes.dependencies import AccessChecks, CurrentGateway
from serving.gateway.routes.problems import problem
from serving.gateway.similar import UnknownItem
from serving.gateway.snapshot import NotReady


def items_router(settings: Settings, access: AccessChecks) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/items/{item_id}/similar", dependencies=[access.read])
    def similar(
        item_id: str, gateway: CurrentGateway, k: int = Query(10, ge=1, le=settings.gateway.max_k)
    ) -> Any:
        """Items nearest to ``item_id`` in the retrieval model's embedding space."""
        if not re.fullmatch(ID_PATTERN, item_id):
            return problem(
                422, [{"field": "item_id", "value": item_id, "message": f"must match {ID_PATTERN}"}]
            )
        try:
            return gateway.similar(item_id, k)
        except NotReady as e:
            return problem(503, f"not ready: {e}")
        except UnknownItem as e:
            return problem(404, str(e))

    return router
