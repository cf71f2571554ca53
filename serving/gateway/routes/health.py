"""``GET /healthz`` (the process answers), ``GET /readyz`` (models and items loaded; the model
server's state), ``GET /metrics`` (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from serving.gateway.routes.dependencies import AccessChecks, CurrentGateway


def health_router(access: AccessChecks) -> APIRouter:
    router = APIRouter()

    @router.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz")
    def readyz(gateway: CurrentGateway) -> Any:
        ready, checks = gateway.readiness()
        return JSONResponse(status_code=200 if ready else 503, content={"ready": ready, **checks})

    @router.get("/metrics", dependencies=[access.read])
    def metrics(gateway: CurrentGateway) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return router
