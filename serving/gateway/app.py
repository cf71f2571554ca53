"""The gateway's HTTP API (FastAPI; OpenAPI docs at ``/docs``).

- ``POST /v1/recommendations``: top-k items for a user, with score, reason, arm, model
  versions, fallbacks taken and per-stage timings (``serving.gateway.recommendation_flow``).
- ``POST /v1/events``: one event or ``{"events": [...]}``; validated (a 422 names each
  field and value refused), appended durably to the event log before the answer,
  idempotent by ``event_id``, then pushed to the online store.
- ``GET /v1/items/{item_id}/similar``: neighbours in the retrieval embedding space.
- ``GET /healthz`` (the process answers), ``GET /readyz`` (models and items loaded; the
  model server's state), ``GET /metrics`` (Prometheus).
- ``POST /v1/admin/reload``, ``POST /v1/admin/canary/promote|rollback``: put ``models.config``
  in service safely, move the canary labels (``serving.gateway.admin``).

Routes: one ``APIRouter`` per concern in ``serving.gateway.routes``, each given the app's
``Gateway`` by a dependency. Access (``serving.gateway.security``): events and admin need the
``X-API-Key`` header; reads too unless ``security.open_reads``; bodies above
``security.max_request_bytes`` get a 413.

The work is CPU-bound NumPy and blocking clients: it runs on the thread pool (plain ``def``
endpoints, or an explicit ``run_in_threadpool``), and the event loop only moves bytes.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from recsys.config import Settings
from serving.gateway.admin import ManualRollout
from serving.gateway.routes.admin import admin_router
from serving.gateway.routes.dependencies import access_checks
from serving.gateway.routes.events import events_router
from serving.gateway.routes.health import health_router
from serving.gateway.routes.items import items_router
from serving.gateway.routes.problems import invalid_request
from serving.gateway.routes.recommendations import recommendations_router
from serving.gateway.schemas import Event, EventBatch
from serving.gateway.security import ApiKeyGuard, BodyLimit
from serving.gateway.service import Gateway


def create_app(
    settings: Settings,
    gateway: Gateway | None = None,
    wait_ready: bool = False,
    environ: Mapping[str, str] | None = None,
    manual_rollout: ManualRollout | None = None,
) -> FastAPI:
    """The gateway app; its lifespan starts (and stops) the ``Gateway``'s background work.

    Args:
        settings: the configuration.
        gateway: a prepared gateway (default: one built from ``settings`` at startup).
        wait_ready: block startup until models and the item cache are loaded.
        environ: where the API key is read from (default ``os.environ``).
        manual_rollout: records a person's promote or rollback (``components.canary.manual``,
            passed in by the entry point); without it the admin canary actions are refused.
    """
    access = access_checks(ApiKeyGuard(settings.security, environ))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw = gateway or Gateway(settings)
        app.state.gateway = gw
        gw.start(wait=wait_ready)
        try:
            yield
        finally:
            gw.stop()

    app = FastAPI(
        title="recsys gateway",
        version="1",
        description="Recommendations and events for the recsys personalization engine.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=settings.security.max_request_bytes)
    app.exception_handler(RequestValidationError)(invalid_request)
    app.include_router(recommendations_router(settings, access))
    app.include_router(events_router(settings, access))
    app.include_router(items_router(settings, access))
    app.include_router(health_router(access))
    app.include_router(admin_router(access, manual_rollout))
    # EventBatch is documented through openapi_extra; make sure its schema is emitted.
    app.openapi = _openapi_with(app, (Event, EventBatch))  # type: ignore[method-assign]
    return app


def _openapi_with(app: FastAPI, extra_models: tuple[type[Any], ...]) -> Callable[[], dict[str, Any]]:
    """The app's OpenAPI document builder, with ``extra_models``' schemas among the components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in extra_models:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(js.pop("$defs", {}))
                comps[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def run_gateway(
    settings: Settings,
    host: str = "127.0.0.1",
    port: int = 8080,
    manual_rollout: ManualRollout | None = None,
) -> int:
    """Serve the gateway with uvicorn until interrupted (``recsys serve gateway``)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings, manual_rollout=manual_rollout)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    return 0
