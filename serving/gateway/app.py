"""The gateway's HTTP API (FastAPI; OpenAPI docs at ``/docs``).

- ``POST /v1/recommendations``: top-k items for a user, with score, reason, arm, model
  versions, fallbacks taken and per-stage timings (``serving.gateway.service``).
- ``POST /v1/events``: one event or ``{"events": [...]}``; validated (a 422 names each
  field and value refused), appended durably to the event log before the answer,
  idempotent by ``event_id``, then pushed to the online store.
- ``GET /v1/items/{item_id}/similar``: neighbours in the retrieval embedding space.
- ``GET /healthz`` (the process answers), ``GET /readyz`` (models and items loaded; the
  model server's state), ``GET /metrics`` (Prometheus).
- ``POST /v1/admin/reload``, ``POST /v1/admin/canary/promote|rollback``: put ``models.config``
  in service safely, move the canary labels (``serving.gateway.admin``).

Access (``serving.gateway.security``): events and admin need the ``X-API-Key`` header; reads
too unless ``security.open_reads``; bodies above ``security.max_request_bytes`` get a 413.

The work is CPU-bound NumPy and blocking clients: it runs on the thread pool (plain ``def``
endpoints, or an explicit ``run_in_threadpool``), and the event loop only moves bytes.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from recsys.config import Settings
from recsys.contracts import ID_PATTERN
from serving.gateway.admin import AdminRefused, ManualRollout, move_canary, reload_models
from serving.gateway.schemas import (
    AdminRequest,
    Event,
    EventBatch,
    EventsResponse,
    RecommendationRequest,
    RecommendationResponse,
    validation_problems,
)
from serving.gateway.security import Access, ApiKeyGuard, BodyLimit, api_key_header
from serving.gateway.service import Gateway, NotReady, UnknownItem

log = logging.getLogger("serving.gateway")


def _problem(status: int, detail: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


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
    state: dict[str, Gateway] = {}
    guard = ApiKeyGuard(settings.security, environ)

    def requires(access: Access) -> Callable[[str | None], Awaitable[None]]:
        # async: the check never blocks, and FastAPI would run a plain def dependency on the
        # thread pool, one more thread hop per request before the endpoint's own.
        async def check(key: str | None = Security(api_key_header)) -> None:
            guard.check(access, key)

        return check

    read, write, admin = (Depends(requires(a)) for a in ("read", "write", "admin"))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gw = gateway or Gateway(settings)
        state["gw"] = gw
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

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err["loc"] if p != "body"]
            problems.append(
                {"field": ".".join(loc), "value": _short(err.get("input")), "message": err["msg"]}
            )
        if request.url.path.startswith("/v1/events") and "gw" in state:
            state["gw"].metrics.events.labels(status="invalid").inc()
        return _problem(422, problems)

    def gw() -> Gateway:
        return state["gw"]

    @app.post("/v1/recommendations", response_model=RecommendationResponse, dependencies=[read])
    async def recommendations(req: RecommendationRequest) -> Any:
        """Top-k items for a user: retrieve, filter, rank, diversify, explore."""
        g = gw()
        if req.k is not None and req.k > settings.gateway.max_k:
            g.metrics.requests.labels(endpoint="recommendations", status="422").inc()
            message = f"k may be at most gateway.max_k = {settings.gateway.max_k}"
            return _problem(422, [{"field": "k", "value": req.k, "message": message}])
        started = time.perf_counter()
        try:
            # The work runs on the thread pool (blocking model calls, NumPy); the endpoint itself
            # is async so that FastAPI checks the answer against the response model here, in the
            # event loop, rather than in a second trip to the thread pool per request.
            out = await run_in_threadpool(g.recommend, req)
        except NotReady as e:
            g.metrics.requests.labels(endpoint="recommendations", status="503").inc()
            return _problem(503, f"not ready: {e}")
        except Exception:
            # Counted against the user's arm: the canary's error-rate guardrail reads it.
            g.metrics.requests.labels(endpoint="recommendations", status="500").inc()
            g.log_failed_request(req.user_id, (time.perf_counter() - started) * 1000)
            raise
        g.metrics.requests.labels(endpoint="recommendations", status="200").inc()
        return out

    @app.post(
        "/v1/events",
        response_model=EventsResponse,
        dependencies=[write],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "oneOf": [
                                {"$ref": "#/components/schemas/Event"},
                                {"$ref": "#/components/schemas/EventBatch"},
                            ]
                        }
                    }
                },
            }
        },
    )
    async def events(request: Request) -> Any:
        """One event, or ``{"events": [...]}``: durable, idempotent by event_id, then pushed online."""
        g = gw()
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            g.metrics.events.labels(status="invalid").inc()
            return _problem(422, [{"field": "body", "value": None, "message": f"not JSON: {e}"}])
        if isinstance(body, dict) and "events" in body:
            raw, prefix = body["events"], "events"
        elif isinstance(body, list):
            raw, prefix = body, "events"
        else:
            raw, prefix = [body], ""
        if not isinstance(raw, list) or not raw:
            g.metrics.events.labels(status="invalid").inc()
            return _problem(422, [{"field": prefix or "body", "value": _short(raw), "message": "no events"}])
        limit = settings.gateway.max_batch_events
        if len(raw) > limit:
            g.metrics.events.labels(status="invalid").inc(len(raw))
            return _problem(
                422,
                [{"field": "events", "value": len(raw), "message": f"at most {limit} events per request"}],
            )
        parsed: list[Event] = []
        problems: list[dict[str, Any]] = []
        for n, item in enumerate(raw):
            try:
                parsed.append(Event.model_validate(item))
            except ValidationError as e:
                problems += validation_problems(e, f"{prefix}[{n}]" if prefix else "")
        if problems:
            # All or nothing: a batch with one bad event stores none, so a retry is simple.
            g.metrics.events.labels(status="invalid").inc(len(raw))
            return _problem(422, problems)
        out = await run_in_threadpool(g.ingest, parsed)
        g.metrics.requests.labels(endpoint="events", status="200").inc()
        return out

    @app.get("/v1/items/{item_id}/similar", dependencies=[read])
    def similar(item_id: str, k: int = Query(10, ge=1, le=settings.gateway.max_k)) -> Any:
        """Items nearest to ``item_id`` in the retrieval model's embedding space."""
        import re

        if not re.fullmatch(ID_PATTERN, item_id):
            return _problem(
                422, [{"field": "item_id", "value": item_id, "message": f"must match {ID_PATTERN}"}]
            )
        try:
            return gw().similar(item_id, k)
        except NotReady as e:
            return _problem(503, f"not ready: {e}")
        except UnknownItem as e:
            return _problem(404, str(e))

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> Any:
        ready, checks = gw().readiness()
        return JSONResponse(status_code=200 if ready else 503, content={"ready": ready, **checks})

    @app.get("/metrics", dependencies=[read])
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(gw().metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def _admin(action: Callable[[], dict[str, Any]]) -> Any:
        async def run() -> Any:
            try:
                return await run_in_threadpool(action)
            except AdminRefused as e:
                return _problem(409, {"action": e.action, "problems": e.problems, **e.detail})

        return run()

    @app.post("/v1/admin/reload", dependencies=[admin])
    async def admin_reload() -> Any:
        """Apply models.load.config then models.config to the model server; refresh the gateway.

        409 when a labelled version failed to load or lacks the signature the gateway calls:
        the labels that were serving stay, and the answer names each model, version and error.
        """
        return await _admin(lambda: reload_models(gw()))

    @app.post("/v1/admin/canary/{action}", dependencies=[admin])
    async def admin_canary(action: Literal["promote", "rollback"], body: AdminRequest | None = None) -> Any:
        """``promote`` (stable := canary, only if the canary serves) or ``rollback`` (canary := stable)."""
        reason = body.reason if body else ""
        return await _admin(lambda: move_canary(gw(), action, reason, manual_rollout))

    # EventBatch is documented through openapi_extra; make sure its schema is emitted.
    app.openapi_schema = None
    _extra_models = (Event, EventBatch)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in _extra_models:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(js.pop("$defs", {}))
                comps[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _short(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        # A body sent as text/plain reaches validation as raw bytes, which JSON cannot carry.
        value = bytes(value).decode("utf-8", errors="replace")
    text = json.dumps(value, default=str)
    return value if len(text) <= 200 else text[:200] + "..."


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
