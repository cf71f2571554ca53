"""The Redis Streams event log keeps the SQLite log's promises, on a real redis-server.

A private Redis with ``appendonly yes`` and ``appendfsync always`` (the production setting):
idempotency by event_id within a batch, across calls and across two concurrent clients;
acknowledged events survive a SIGKILL of the server; a server without per-write fsync is
refused, naming the setting; and the canary analysis, configured for either backend, reads
the same numbers from the same traffic.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from components.canary import analyze
from recsys.config import load_settings
from recsys.event_log import open_event_log
from recsys.event_log.base import ServedRequest
from recsys.event_log.redis_streams import EventLogDurabilityError, RedisStreamsEventLog
from recsys.event_log.sqlite import SqliteEventLog
from tests.support.redis_server import aof_redis

pytestmark = pytest.mark.integration
T0 = datetime(2026, 11, 20, 12, tzinfo=UTC)


def event(event_id: str, event_type: str = "click", request_id: str | None = None, item: str = "i1") -> dict:
    return {
        "event_id": event_id, "user_id": "u1", "item_id": item, "event_type": event_type, "value": None,
        "ts": T0.isoformat(), "session_id": "s1", "device": "mobile", "request_id": request_id,
    }  # fmt: skip


@pytest.fixture
def redis_aof(tmp_path: Path):
    with aof_redis(tmp_path / "redis") as server:
        yield server


def test_append_is_idempotent_by_event_id(redis_aof) -> None:
    log = RedisStreamsEventLog(redis_aof.url, "{t}:log")
    assert log.fsync == {"appendonly": "yes", "appendfsync": "always"}
    first = log.append([event("e1"), event("e2"), event("e1")])
    assert first.accepted == ["e1", "e2"] and first.duplicates == ["e1"]
    again = log.append([event("e2"), event("e3", "view")])
    assert again.accepted == ["e3"] and again.duplicates == ["e2"]
    assert log.count() == 3 and log.event_ids() == ["e1", "e2", "e3"]
    frame = log.to_frame()
    assert list(frame["event_id"]) == ["e1", "e2", "e3"] and set(frame["event_type"]) == {"click", "view"}
    log.close()


def test_two_clients_racing_on_the_same_ids_store_each_once(redis_aof) -> None:
    ids = [f"e{n}" for n in range(300)]
    results = []

    def post() -> None:
        log = RedisStreamsEventLog(redis_aof.url, "{t}:race", batch=50)
        results.append(log.append([event(i) for i in ids]))
        log.close()

    threads = [threading.Thread(target=post) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Every id was accepted by exactly one of the two clients, and stored once.
    accepted = results[0].accepted + results[1].accepted
    assert sorted(accepted) == sorted(ids)
    assert RedisStreamsEventLog(redis_aof.url, "{t}:race").count() == len(ids)


def test_acknowledged_events_survive_a_sigkill_of_redis(redis_aof) -> None:
    log = RedisStreamsEventLog(redis_aof.url, "{t}:durable")
    log.append([event(f"d{n}") for n in range(50)])
    log.log_request(ServedRequest("r1", "u1", "stable", {"ranking": 1}, T0, 12.5, "ok"))
    log.close()
    redis_aof.kill()  # no shutdown, no save: only the append-only file is left
    redis_aof.start()
    back = RedisStreamsEventLog(redis_aof.url, "{t}:durable")
    assert back.count() == 50 and back.event_ids() == [f"d{n}" for n in range(50)]
    assert back.append([event("d7")]).duplicates == ["d7"]  # the id index came back too
    assert list(back.requests_frame()["request_id"]) == ["r1"]
    back.close()


def test_a_redis_that_does_not_fsync_every_write_is_refused(tmp_path: Path) -> None:
    with aof_redis(tmp_path / "redis") as server:
        server.stop()
        server.start(appendfsync="everysec")
        with pytest.raises(EventLogDurabilityError, match="appendfsync='everysec'"):
            RedisStreamsEventLog(server.url, "{t}:log")
        # A reader (the canary analysis) acknowledges nothing: it may open it.
        RedisStreamsEventLog(server.url, "{t}:log", require_fsync=False).close()


def _traffic(log) -> None:
    """Two arms' requests with impressions and clicks, as the gateway logs them."""
    for n in range(40):
        arm = "canary" if n % 2 else "stable"
        rid = f"req-{n}"
        served = [ServedRequest(rid, f"u{n}", arm, {"retrieval": 1, "ranking": 1}, T0 + timedelta(seconds=n),
                                20.0 + n, "error" if n == 5 else "ok")]  # fmt: skip
        shown = [event(f"{rid}:{k}", "impression", rid, item=f"i{k}") for k in range(3)]
        clicks = [event(f"{rid}:c", "click", rid, item="i1")] if n % 3 == 0 else []
        if n % 2:
            log.log_requests(served)
            log.append(shown + clicks)
        else:  # as the gateway's impression writer does
            log.log_served(served, shown)
            log.append(clicks)


def test_canary_analysis_reads_either_backend_with_the_same_numbers(redis_aof, tmp_path: Path) -> None:
    base = {"home": str(tmp_path / "home")}
    sqlite_settings = load_settings(overrides=base)
    redis_settings = load_settings(
        overrides={
            **base,
            "gateway.event_log_backend": "redis_streams",
            "gateway.event_log_redis_url": redis_aof.url,
            "gateway.event_log_key_prefix": "{t}:canary",
        }
    )
    sqlite_log = open_event_log(sqlite_settings)
    redis_log = open_event_log(redis_settings)
    assert isinstance(sqlite_log, SqliteEventLog) and isinstance(redis_log, RedisStreamsEventLog)
    for log in (sqlite_log, redis_log):
        _traffic(log)
        log.close()
    from_sqlite = analyze(sqlite_settings)
    from_redis = analyze(redis_settings)
    assert from_redis["source"].startswith("redis://127.0.0.1:")
    assert from_sqlite["source"].endswith("events.db")
    assert from_redis["arms"]["stable"]["requests"] == 20 and from_redis["arms"]["canary"]["errors"] == 1
    assert from_redis["arms"]["stable"]["clicked_requests"] == 7
    assert from_redis["arms"] == from_sqlite["arms"]
