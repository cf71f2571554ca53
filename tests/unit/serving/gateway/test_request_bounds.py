"""Bounded requests and startup of the gateway app, on a stand-in ``Gateway`` (no servers).

The app is the real one (``create_app``: routes, validation, middlewares); the gateway behind
it records what reaches it, so each test sees what the HTTP layer lets through.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from recsys.config import Settings, load_settings
from serving.gateway import app as gateway_app
from serving.gateway.app import create_app
from serving.gateway.catalog import ItemCatalog
from serving.gateway.metrics import GatewayMetrics

KEY = "unit-key"
AUTH = {"X-API-Key": KEY}


class StubGateway:
    """What the routes call on a gateway; ``recommend_async`` waits while ``hold`` is clear."""

    def __init__(self) -> None:
        self.metrics = GatewayMetrics()
        self.ingested: list[Any] = []
        self.hold = threading.Event()
        self.hold.set()
        self.stopped = False

    def start(self, wait: bool = False) -> None:
        pass

    def stop(self) -> None:
        self.stopped = True

    def ingest(self, events: list[Any]) -> dict[str, Any]:
        self.ingested += events
        results = [{"event_id": e.event_id, "status": "accepted"} for e in events]
        return {"accepted": len(events), "duplicates": 0, "push_queued": True, "results": results}

    async def recommend_async(self, req: Any) -> dict[str, Any]:
        # Waits on the loop, as the gateway's request does while the model server answers.
        for _ in range(2000):
            if self.hold.is_set():
                break
            await asyncio.sleep(0.005)
        return {
            "request_id": "r", "user_id": req.user_id, "arm": "stable", "model_versions": {},
            "cold_start": False, "fallback": [], "candidate_source": "stub", "counts": {},
            "items": [], "timings_ms": {},
        }  # fmt: skip

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        return True, {}


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    return load_settings(overrides={"home": str(tmp_path), **overrides})


@pytest.fixture
def client(tmp_path: Path) -> Any:
    stub = StubGateway()
    app = create_app(_settings(tmp_path), gateway=stub, environ={"RECSYS_API_KEY": KEY})
    with TestClient(app) as c:
        c.stub = stub  # type: ignore[attr-defined]
        yield c


def _event(ts: str, n: int = 0) -> dict[str, Any]:
    return {"event_id": f"e{n}", "user_id": "u1", "item_id": "i1", "event_type": "click", "ts": ts}


# --- request lists and strings --------------------------------------------------------------


def test_request_lists_and_strings_are_capped_naming_field_and_bound(client: Any) -> None:
    # The configured bound (gateway.max_filter_categories, 50 by default) is named in the 422.
    r = client.post("/v1/recommendations", json={"user_id": "u1", "filters": {"categories": ["c"] * 51}})
    assert r.status_code == 422
    [p] = r.json()["detail"]
    assert (
        p["field"] == "filters.categories"
        and p["value"] == 51
        and "max_filter_categories = 50" in p["message"]
    )
    # The schema's own caps: a category name of 129 characters, a list past 1000 entries.
    long_name = {"user_id": "u1", "filters": {"exclude_categories": ["x" * 129]}}
    assert client.post("/v1/recommendations", json=long_name).status_code == 422
    huge = {"user_id": "u1", "filters": {"categories": ["c"] * 1001}}
    assert client.post("/v1/recommendations", json=huge).status_code == 422
    # Within the bounds the request reaches the gateway.
    ok = {"user_id": "u1", "filters": {"categories": ["c"] * 50, "exclude_categories": ["d"]}}
    assert client.post("/v1/recommendations", json=ok).status_code == 200
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert schema["Filters"]["properties"]["categories"]["maxItems"] == 1000


def test_a_category_filter_is_an_index_lookup_that_caches_nothing_per_request() -> None:
    cats = ["books|music", "music", "", "pets"]
    catalog = ItemCatalog(
        item_ids=np.array(["a", "b", "c", "d"], dtype=object),
        position={"a": 0, "b": 1, "c": 2, "d": 3},
        columns={"category": np.array(cats, dtype=object)},
        in_stock=np.ones(4, dtype=bool),
        category_sets=[frozenset(c.split("|")) - {""} for c in cats],
        positives=np.zeros(4, dtype=np.float32),
        new=np.zeros(4, dtype=bool),
        global_popular=np.arange(4),
        segment_popular={},
        source_mtime=0.0,
    )
    # The index is built with the catalog: each category to the positions that carry it.
    assert {c: p.tolist() for c, p in catalog.category_index.items()} == {
        "books": [0], "music": [0, 1], "pets": [3],
    }  # fmt: skip
    assert catalog.category_mask("music").tolist() == [True, True, False, False]
    sizes = {k: len(v) for k, v in vars(catalog).items() if isinstance(v, dict)}
    for n in range(1000):  # distinct values a client may send
        assert not catalog.category_mask(f"nope-{n}").any()
    # Nothing grew: no per-value cache (it would hold a catalog-sized mask per distinct string).
    assert {k: len(v) for k, v in vars(catalog).items() if isinstance(v, dict)} == sizes
    mask = catalog.category_mask("pets")
    mask[:] = True  # a caller changing its mask does not change the next answer
    assert catalog.category_mask("pets").tolist() == [False, False, False, True]


# --- events: timestamps and nesting ---------------------------------------------------------


@pytest.mark.parametrize(
    "ts",
    [
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00+01:00",  # year 0 in UTC: astimezone() would overflow
        "9999-12-31T23:59:59Z",
        "9999-12-31T23:59:59-01:00",  # year 10000 in UTC
        "1969-12-31T23:59:59Z",
    ],
)
def test_timestamps_at_the_calendar_edges_are_422s_naming_the_value(client: Any, ts: str) -> None:
    r = client.post("/v1/events", json={"events": [_event(ts)]}, headers=AUTH)
    assert r.status_code == 422, r.text
    [p] = r.json()["detail"]
    assert p["field"] == "events[0].ts" and p["value"] == ts and ts[:10] in p["message"]
    assert client.stub.ingested == []


def test_a_future_timestamp_beyond_the_configured_skew_is_refused(client: Any) -> None:
    now = datetime.now(UTC)
    far = (now + timedelta(days=1)).isoformat()
    r = client.post("/v1/events", json=_event(far), headers=AUTH)
    assert r.status_code == 422
    [p] = r.json()["detail"]
    assert p["field"] == "ts" and p["value"] == far
    assert "300 s ahead" in p["message"] and "gateway.max_event_future_skew_seconds" in p["message"]
    # Within the skew (a client clock a minute fast) it is taken.
    near = (now + timedelta(seconds=60)).isoformat()
    assert client.post("/v1/events", json=_event(near), headers=AUTH).status_code == 200
    assert len(client.stub.ingested) == 1


@pytest.mark.parametrize("depth", [5_000, 200_000])
def test_deeply_nested_json_is_a_422_never_a_5xx(client: Any, depth: int) -> None:
    body = "[" * depth + "]" * depth
    r = client.post("/v1/events", content=body, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 422, r.text
    inside = '{"events": [{"event_id": ' + "[" * depth + "]" * depth + "}]}"
    r = client.post("/v1/events", content=inside, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 422, r.text
    for_recs = '{"user_id": "u1", "filters": {"categories": ' + "[" * depth + "]" * depth + "}}"
    r = client.post("/v1/recommendations", content=for_recs, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text


# --- load shedding -------------------------------------------------------------------------


def test_requests_beyond_the_concurrency_limit_get_503_with_retry_after(tmp_path: Path) -> None:
    stub = StubGateway()
    settings = _settings(tmp_path, **{"gateway.max_concurrent_requests": 2})
    app = create_app(settings, gateway=stub, environ={"RECSYS_API_KEY": KEY})
    app.state.gateway = stub  # the lifespan would set it; the ASGI transport does not run it

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            stub.hold.clear()  # two requests hold the gateway...
            held = [
                asyncio.create_task(c.post("/v1/recommendations", json={"user_id": f"u{n}"})) for n in (1, 2)
            ]
            await asyncio.sleep(0.3)
            shed = await c.post("/v1/recommendations", json={"user_id": "u3"})  # ...the third is shed
            probe = await c.get("/healthz")  # probes never are
            stub.hold.set()
            return [shed, probe, *await asyncio.gather(*held)]

    shed, probe, *held = asyncio.run(scenario())
    assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
    assert "gateway.max_concurrent_requests" in shed.json()["detail"]
    assert probe.status_code == 200 and [r.status_code for r in held] == [200, 200]
    # Counted, by route family: shed load shows on /metrics, not only in clients' logs.
    sample = stub.metrics.registry.get_sample_value
    assert sample("recsys_gateway_shed_total", {"endpoint": "recommendations"}) == 1
    assert sample("recsys_gateway_requests_total", {"endpoint": "recommendations", "status": "503"}) == 1


# --- startup with a dependency down ----------------------------------------------------------


def test_startup_retries_a_dependency_down_with_a_clear_error_not_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(gateway_app, "START_RETRY_SECONDS", (0.05, 0.1))
    stub, attempts = StubGateway(), []
    redis_up = threading.Event()

    def build(settings: Settings) -> Any:
        attempts.append(1)
        if not redis_up.is_set():
            # What redis-py raises for the event log's Redis when nothing listens.
            raise ConnectionError("Error 111 connecting to 127.0.0.1:6390. Connection refused.")
        return stub

    app = create_app(_settings(tmp_path), environ={"RECSYS_API_KEY": KEY}, build_gateway=build)
    with caplog.at_level(logging.INFO, logger="serving.gateway"), TestClient(app) as c:
        assert c.get("/healthz").status_code == 200  # the process is up and answers
        deadline = datetime.now(UTC) + timedelta(seconds=10)
        while len(attempts) < 3 and datetime.now(UTC) < deadline:
            threading.Event().wait(0.02)
        r = c.get("/readyz")
        assert r.status_code == 503 and "Connection refused" in r.json()["detail"]
        r = c.post("/v1/recommendations", json={"user_id": "u1"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        redis_up.set()  # the dependency comes back: the gateway starts by itself
        while getattr(app.state, "gateway", None) is None and datetime.now(UTC) < deadline:
            threading.Event().wait(0.02)
        assert c.post("/v1/recommendations", json={"user_id": "u1"}).status_code == 200
    assert stub.stopped
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) >= 2 and all(r.exc_info is None for r in errors)  # one line each, no trace
    assert "Connection refused" in errors[0].getMessage() and "retrying in" in errors[0].getMessage()
