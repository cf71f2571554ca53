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
  in service safely now, move the canary labels (``serving.gateway.admin``). Without them a
  changed ``models.config`` is put in service within ``gateway.refresh_seconds`` by the
  same checked reload (``serving.gateway.config_sync``).

Routes: one ``APIRouter`` per concern in ``serving.gateway.routes``, each given the app's
``Gateway`` by a dependency. Access (``serving.gateway.security``): events and admin need the
``X-API-Key`` header; reads too unless ``security.open_reads``; bodies above
``security.max_request_bytes`` get a 413. Beyond ``gateway.max_concurrent_requests`` in
flight (or the lower bound ``gateway.adaptive_concurrency_target_ms`` makes it follow,
``serving.gateway.admission``), a request is shed at once with 503 and ``Retry-After``
(``ConcurrencyLimit``), not queued; the probes and ``/metrics`` are never shed.

Startup never crash-loops on a dependency: the ``Gateway`` is built on a thread that retries
with backoff (one clear line per failed attempt, e.g. the event log's Redis unreachable)
while ``/healthz`` answers and everything else is a 503 naming the reason. With the model
server down the gateway serves popularity, marked, and ``/readyz`` is not ready until the
model server has answered once (``serving.gateway.readiness``).

A recommendation runs on the event loop: it waits for the online store (on a small pool,
with a deadline) and the model server (``grpc.aio``) without holding a thread, and its NumPy
stages run between those waits. Blocking work (event appends, admin actions) runs on the
thread pool.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool

from recsys.config import Settings
from serving.gateway.admin import ManualRollout
from serving.gateway.admission import AdaptiveLimit, Admission, FixedLimit
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
from serving.gateway.snapshot import collections_paused

log = logging.getLogger("serving.gateway")
# Backoff between attempts to build the gateway (its event log, its feature store): the first
# wait, doubled after each failure up to the last.
START_RETRY_SECONDS = (1.0, 30.0)
# Paths never shed by the concurrency limit: probes must answer under load, and /metrics shows it.
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# What a shed request is told to wait before trying again (seconds).
SHED_RETRY_AFTER_S = 1
# OpenBLAS's thread-count calls as NumPy's and SciPy's wheels (scipy_openblas, 64-bit ints or
# not) and a system OpenBLAS name them: prefix + get_num_threads / set_num_threads + suffix.
OPENBLAS_THREAD_CALLS = (
    ("scipy_openblas_", "64_"),
    ("scipy_openblas_", ""),
    ("openblas_", "64_"),
    ("openblas_", ""),
)
# A shed request's metric label: its route family (a fixed set, never the raw path).
SHED_ENDPOINTS = (("/v1/recommendations", "recommendations"), ("/v1/events", "events"),
                  ("/v1/items", "items"), ("/v1/admin", "admin"))  # fmt: skip


def shed_endpoint(path: str) -> str:
    """The metric label of a shed request's path: a known route family, or ``other``."""
    return next((name for prefix, name in SHED_ENDPOINTS if path.startswith(prefix)), "other")


class ConcurrencyLimit:
    """ASGI middleware: at most as many requests in flight as ``admission`` admits; the next is
    answered 503 with ``Retry-After`` at once, so overload is shed instead of queued without
    bound (a queued request would time out in the client anyway, after holding memory and a
    connection). ``admission`` is told each admitted request's latency: a ``FixedLimit``
    ignores it, an ``AdaptiveLimit`` moves its bound by it (``serving.gateway.admission``)."""

    def __init__(self, app: Any, admission: Admission, retry_after_s: int = SHED_RETRY_AFTER_S) -> None:
        self.app, self.admission, self.retry_after_s = app, admission, retry_after_s
        self.in_flight = 0  # only touched on the event loop: no lock needed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in UNLIMITED_PATHS:
            await self.app(scope, receive, send)
            return
        if not self.admission.admits(self.in_flight):
            body = json.dumps(
                {"detail": f"overloaded: {self.in_flight} requests in flight "
                 f"({self.admission.setting}); retry later"}
            ).encode()  # fmt: skip
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"retry-after", str(self.retry_after_s).encode()),
            ]
            await send({"type": "http.response.start", "status": 503, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            self._count_shed(scope)
            return
        self.in_flight += 1
        epoch = self.admission.epoch
        started = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if self.admission.record(time.perf_counter() - started, epoch):
                gateway = _started_gateway(scope)
                if gateway is not None:
                    gateway.metrics.concurrency_limit.set(self.admission.limit)

    @staticmethod
    def _count_shed(scope: dict[str, Any]) -> None:
        # The gateway (and its metrics) exists once started; a request shed before is not counted.
        gateway = _started_gateway(scope)
        if gateway is not None:
            path = shed_endpoint(scope.get("path", ""))
            gateway.metrics.shed.labels(endpoint=path).inc()
            gateway.metrics.requests.labels(endpoint=path, status="503").inc()


def _started_gateway(scope: dict[str, Any]) -> Any:
    """The app's ``Gateway`` once started (the lifespan sets it), else None."""
    return getattr(getattr(scope.get("app"), "state", None), "gateway", None)


def admission_policy(settings: Settings) -> Admission:
    """The in-flight bound the settings ask for: latency-driven under a target, else fixed."""
    g = settings.gateway
    if g.adaptive_concurrency_target_ms is None:
        return FixedLimit(g.max_concurrent_requests)
    return AdaptiveLimit(
        ceiling=g.max_concurrent_requests,
        floor=min(g.min_concurrent_requests, g.max_concurrent_requests),
        target_s=g.adaptive_concurrency_target_ms / 1000,
    )


class GatewayStarter:
    """Builds and starts the ``Gateway`` on a thread, retrying with backoff until it works.

    A dependency down at startup (the event log's Redis, say) is one clear log line per
    attempt and a 503 naming it (``reason``), not a crash with a stack trace that the
    orchestrator restarts into the same crash.

    Args:
        build: makes the gateway (``Gateway(settings)``); may raise while a dependency is down.
        on_ready: given the started gateway.
    """

    def __init__(self, build: Callable[[], Gateway], on_ready: Callable[[Gateway], None]) -> None:
        self.build, self.on_ready = build, on_ready
        self.gateway: Gateway | None = None
        self.reason = "starting"
        self.attempts = 0
        self.started = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gateway-start", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        delay, longest = START_RETRY_SECONDS
        while not self._stop.is_set():
            self.attempts += 1
            try:
                # Imports and the feature store's set-up make long-lived objects that automatic
                # collections would walk again and again; the first load settles the heap once.
                with collections_paused():
                    gw = self.build()
            except Exception as e:  # noqa: BLE001 - every cause is retried; the message names it
                self.reason = f"cannot start (attempt {self.attempts}): {type(e).__name__}: {e}"[:500]
                log.error("gateway %s; retrying in %.0f s", self.reason, delay)
                log.debug("start failure", exc_info=True)
                self._stop.wait(delay)
                delay = min(delay * 2, longest)
                continue
            if self._stop.is_set():
                gw.stop()
                return
            self.gateway = gw
            self.on_ready(gw)
            if self.attempts > 1:
                log.info("gateway started after %d attempts", self.attempts)
            self.started.set()
            return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self.gateway is not None:
            self.gateway.stop()


def create_app(
    settings: Settings,
    gateway: Gateway | None = None,
    wait_ready: bool = False,
    environ: Mapping[str, str] | None = None,
    manual_rollout: ManualRollout | None = None,
    build_gateway: Callable[[Settings], Gateway] = Gateway,
) -> FastAPI:
    """The gateway app; its lifespan starts (and stops) the ``Gateway``'s background work.

    Args:
        settings: the configuration.
        gateway: a prepared gateway (default: one built from ``settings`` at startup).
        wait_ready: block startup until models and the item cache are loaded.
        environ: where the API key is read from (default ``os.environ``).
        manual_rollout: records a person's promote or rollback (``components.canary.manual``,
            passed in by the entry point); without it the admin canary actions are refused.
        build_gateway: what builds the gateway when none is given, retried until it works.
    """
    access = access_checks(ApiKeyGuard(settings.security, environ))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if gateway is not None:
            app.state.gateway = gateway
            gateway.start(wait=wait_ready)
            try:
                yield
            finally:
                await _close_async_channel(gateway)
                gateway.stop()
            return

        def ready(gw: Gateway) -> None:
            gw.start(wait=wait_ready)
            app.state.gateway = gw

        starter = GatewayStarter(lambda: build_gateway(settings), ready)
        app.state.starter = starter
        starter.start()
        if wait_ready:
            await run_in_threadpool(starter.started.wait)
        try:
            yield
        finally:
            if starter.gateway is not None:
                await _close_async_channel(starter.gateway)
            await asyncio.to_thread(starter.stop)

    app = FastAPI(
        title="recsys gateway",
        version="1",
        description="Recommendations and events for the recsys personalization engine.",
        lifespan=lifespan,
    )
    app.add_middleware(BodyLimit, limit=settings.security.max_request_bytes)
    # Added last, so it runs first: a shed request costs no body read and no thread.
    app.add_middleware(ConcurrencyLimit, admission=admission_policy(settings))
    app.exception_handler(RequestValidationError)(invalid_request)
    app.include_router(recommendations_router(settings, access))
    app.include_router(events_router(settings, access))
    app.include_router(items_router(settings, access))
    app.include_router(health_router(access))
    app.include_router(admin_router(access, manual_rollout))
    # EventBatch is documented through openapi_extra; make sure its schema is emitted.
    app.openapi = _openapi_with(app, (Event, EventBatch))  # type: ignore[method-assign]
    return app


async def _close_async_channel(gateway: Gateway) -> None:
    """The model server client's ``grpc.aio`` channel closed on the loop it serves, if it has one."""
    close = getattr(getattr(gateway, "client", None), "close_async_channel", None)
    if close is not None:
        await close()


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


def set_blas_threads(threads: int) -> int | None:
    """Run NumPy's BLAS (OpenBLAS) on ``threads`` threads in this process; the number it ran
    on before, or None where no OpenBLAS is loaded (then nothing changes).

    The gateway's products are small (10 x 5, 1000 x 32 by 32 x 5) and many requests run at
    once on 2 cores: OpenBLAS's second thread took ~0.3 ms of CPU per request under load, for
    no gain in time (BENCHMARKS.md, "Serving: open loop"). Set at run time through the
    library NumPy loaded, because ``OPENBLAS_NUM_THREADS`` is read only when NumPy is first
    imported, before the gateway's own code runs.
    """
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return None
    paths = sorted(
        {ln.split()[-1] for ln in maps.splitlines() if "openblas" in ln.rsplit("/", 1)[-1].lower()}
    )
    before = None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix in OPENBLAS_THREAD_CALLS:
            get = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
            put = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
            if get is not None and put is not None:
                before = get() if before is None else before
                put(ctypes.c_int(threads))
                break
    return before


def run_gateway(
    settings: Settings,
    host: str = "127.0.0.1",
    port: int = 8080,
    manual_rollout: ManualRollout | None = None,
) -> int:
    """Serve the gateway with uvicorn until interrupted (``recsys serve gateway``)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if set_blas_threads(1) is None:
        log.info("NumPy's BLAS threads left as they are (no OpenBLAS found in this process)")
    app = create_app(settings, manual_rollout=manual_rollout)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    return 0
