"""Posted events leave the online-store push to a bounded background queue.

The store's push stands blocked here (as a paused Redis holds it) so that what the request
path waits for shows: the durable append, not the push. The real store, paused with SIGSTOP,
is in tests/integration/test_reliability.py.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import recsys.online_features
from recsys.config import Settings
from recsys.event_log.sqlite import SqliteEventLog
from serving.gateway.event_ingest import EventIngest, OnlinePusher
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.schemas import Event
from serving.gateway.user_features import UserActivity


def _event(n: int) -> Event:
    return Event(
        event_id=f"e{n}", user_id=f"u{n % 3}", item_id=f"i{n}", event_type="click", ts=datetime.now(UTC)
    )


def _sample(metrics: GatewayMetrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


def _no_views(store: Any) -> Any:
    """The push source's writer, for a store that is not there (its pushes are stood in for)."""
    return lambda frame: None


@pytest.fixture
def blocked_store(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, list[str]]:
    """``push_event`` waits until released, then records the event it pushed."""
    release, pushed = threading.Event(), []

    def push_event(store: Any, rec: dict[str, Any], recent_items: int, write: Any) -> None:
        release.wait(30)
        pushed.append(rec["event_id"])

    monkeypatch.setattr(recsys.online_features, "push_event", push_event)
    monkeypatch.setattr(recsys.online_features, "online_pusher", _no_views)
    return release, pushed


def test_a_blocked_store_neither_holds_the_answer_nor_queues_without_bound(
    tmp_path: Path, blocked_store: tuple[threading.Event, list[str]]
) -> None:
    release, pushed = blocked_store
    settings = Settings.model_validate({"gateway": {"push_queue_size": 4}})
    metrics = GatewayMetrics()
    log = SqliteEventLog(tmp_path / "events.db")
    pusher = OnlinePusher(settings, None, threading.Lock(), metrics)
    ingest = EventIngest(settings, log, UserActivity(), pusher, metrics)
    pusher.start()
    try:
        t0 = time.monotonic()
        first = ingest.ingest([_event(n) for n in range(3)])
        assert first["accepted"] == 3 and first["push_queued"] is True
        # The push thread holds e0 (blocked) and 2 wait: 2 more fit, the rest are dropped.
        second = ingest.ingest([_event(n) for n in range(3, 8)])
        assert time.monotonic() - t0 < 5  # the store's 30 s block was never on this path
        assert second["accepted"] == 5 and second["push_queued"] is False
        assert _sample(metrics, "recsys_gateway_push_dropped_total") >= 1
        # Dropped from the push queue, never from the log: every accepted event is durable.
        assert sorted(log.event_ids()) == sorted(f"e{n}" for n in range(8))
        assert pusher.flush(timeout=0.2) is False  # still blocked
    finally:
        release.set()
    assert pusher.flush(timeout=10) is True
    dropped = int(_sample(metrics, "recsys_gateway_push_dropped_total"))
    assert len(pushed) + dropped == 8 and pushed[:3] == ["e0", "e1", "e2"]
    assert _sample(metrics, "recsys_gateway_push_queue") == 0
    pusher.stop()
    log.close()


def test_a_failing_push_is_counted_and_the_next_one_still_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pushed: list[str] = []

    def push_event(store: Any, rec: dict[str, Any], recent_items: int, write: Any) -> None:
        if rec["event_id"] == "e0":
            raise ConnectionError("store down")
        pushed.append(rec["event_id"])

    monkeypatch.setattr(recsys.online_features, "push_event", push_event)
    monkeypatch.setattr(recsys.online_features, "online_pusher", _no_views)
    settings, metrics = Settings(), GatewayMetrics()
    log = SqliteEventLog(tmp_path / "events.db")
    pusher = OnlinePusher(settings, None, threading.Lock(), metrics)
    pusher.start()
    try:
        out = EventIngest(settings, log, UserActivity(), pusher, metrics).ingest([_event(0), _event(1)])
        assert out["push_queued"] is True and pusher.flush(timeout=10)
        assert pushed == ["e1"] and _sample(metrics, "recsys_gateway_push_failures_total") == 1
    finally:
        pusher.stop()
        log.close()
