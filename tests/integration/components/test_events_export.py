"""The event log's export on both backends (SQLite, and Redis Streams on a private redis-server):
traffic logged as the gateway logs it comes out in the lake exactly once, a re-run changes
nothing, and the trimmed log holds only what was not exported (today's events).

Served requests go through the gateway's own ``ImpressionWriter`` (its background thread
and batched ``log_served``); posted events through ``Event.record()`` and
``EventLog.append``, as ``EventIngest`` appends them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from components.events_export import export_events, exported_days
from recsys.config import Settings, load_settings
from recsys.event_log import open_event_log
from recsys.event_log.base import EventLog, ServedRequest
from recsys.layout import lake_events_dir
from serving.gateway.impressions import ImpressionWriter
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.schemas import Context, Event, RecommendationRequest
from tests.support.redis_server import aof_redis

pytestmark = pytest.mark.integration

NOW = datetime.now(UTC)
TODAY = NOW.replace(hour=0, minute=0, second=0, microsecond=0)
DAYS = [TODAY - timedelta(days=2), TODAY - timedelta(days=1), TODAY]  # two closed days, today


@pytest.fixture(params=["sqlite", "redis_streams"])
def settings(request, tmp_path: Path) -> Iterator[Settings]:
    overrides = {"home": str(tmp_path / "home"), "event_export.keep_days": 0}
    if request.param == "sqlite":
        yield load_settings(overrides=overrides)
        return
    with aof_redis(tmp_path / "redis") as server:
        yield load_settings(
            overrides={
                **overrides,
                "gateway.event_log_backend": "redis_streams",
                "gateway.event_log_redis_url": server.url,
                "gateway.event_log_key_prefix": "{t}:export",
            }
        )


def _traffic(settings: Settings, log: EventLog) -> dict[str, dict]:
    """Per day: 3 served requests (3 items each, through the impression writer) and clicks on
    the second item of each, one posted twice (a retry). Returns every event id -> its row."""
    writer = ImpressionWriter(settings, log, GatewayMetrics())
    writer.start()
    expected: dict[str, dict] = {}
    for d, day in enumerate(DAYS):
        for n in range(3):
            served_at = day + timedelta(hours=1 + n, seconds=d)
            rid = f"req-{d}-{n}"
            arm = ("stable", "canary", "holdout")[n]
            versions = {"retrieval": 1 + n, "ranking": 2} if arm != "holdout" else {}
            served = ServedRequest(
                rid, f"u{n}", arm, versions, served_at, 12.5, "ok",
                items=[f"i{k}" for k in range(3)], candidate_source="retrieval",
            )  # fmt: skip
            context = Context(device="mobile", session_id="s")
            req = RecommendationRequest(user_id=f"u{n}", k=3, context=context)
            items = [{"item_id": f"i{k}", "score": 1.0 - k / 10, "reason": "picked"} for k in range(3)]
            writer.log_served(served, req, items)
            for k in range(3):
                expected[f"{rid}:{k}"] = {"arm": arm, "position": k, "versions": versions, "day": d}
            click = Event(event_id=f"click-{d}-{n}", user_id=f"u{n}", item_id="i1", event_type="click",
                          ts=served_at + timedelta(seconds=30), device="mobile", request_id=rid)  # fmt: skip
            first = log.append([click.record()])
            retry = log.append([click.record()])
            assert first.accepted == [click.event_id] and retry.duplicates == [click.event_id]
            expected[click.event_id] = {"arm": arm, "position": 1, "versions": versions, "day": d}
        # An event outside served traffic.
        view = Event(event_id=f"view-{d}", user_id="u9", item_id="i7", event_type="view", value=42.0,
                     ts=day + timedelta(hours=23, minutes=59, seconds=59, microseconds=999_999))  # fmt: skip
        log.append([view.record()])
        expected[view.event_id] = {"arm": None, "position": None, "versions": None, "day": d}
    writer.flush()
    writer.stop()
    return expected


def _lake_bytes(settings: Settings) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(lake_events_dir(settings).rglob("*")) if p.is_file()}


def test_logged_traffic_comes_out_exactly_once_and_only_unexported_events_stay(settings: Settings) -> None:
    log = open_event_log(settings)
    try:
        expected = _traffic(settings, log)
        today_ids = {i for i, e in expected.items() if e["day"] == 2}
        assert set(log.event_ids()) == set(expected)  # everything was logged, once

        manifest = export_events(settings, now=NOW)
        closed = [d.date().isoformat() for d in DAYS[:2]]
        assert sorted(manifest["days"]) == closed
        lake = pd.read_parquet(lake_events_dir(settings))
        # Every event of a closed day exactly once; nothing of today's.
        assert lake["event_id"].is_unique
        assert set(lake["event_id"]) == set(expected) - today_ids
        assert len(lake) == len(expected) - len(today_ids) == 2 * (3 * 3 + 3 + 1)
        # Each row in its day's file, with its serving context.
        assert (lake["ts"].dt.strftime("%Y-%m-%d") == lake["date"].astype(str)).all()
        for row in lake.to_dict("records"):
            want = expected[row["event_id"]]
            assert row["date"] == closed[want["day"]]
            assert (None if pd.isna(row["arm"]) else row["arm"]) == want["arm"], row
            assert (None if pd.isna(row["position"]) else int(row["position"])) == want["position"], row
            if want["versions"] is not None:
                assert json.loads(row["model_versions"]) == want["versions"]
                assert row["candidate_source"] == "retrieval"
        assert lake.set_index("event_id").loc["view-0", "value"] == 42.0

        # The log holds exactly today's events: both the stream/table and the id index.
        assert set(log.event_ids()) == today_ids
        assert log.count() == len(today_ids)
        assert manifest["trimmed"] == len(expected) - len(today_ids)
        assert all(r["trimmed"] for r in exported_days(settings).values())

        # A re-run changes nothing: same bytes, nothing trimmed, today still in the log.
        before = _lake_bytes(settings)
        again = export_events(settings, now=NOW)
        assert again["days"] == {} and again["trimmed"] == 0
        assert _lake_bytes(settings) == before
        assert set(log.event_ids()) == today_ids

        # A retry of an exported event is logged again (its id left the index with it), and
        # the next export keeps the lake's one copy.
        retried = Event(
            event_id="click-0-1", user_id="u1", item_id="i1", event_type="click",
            ts=DAYS[0] + timedelta(hours=2, seconds=30), device="mobile", request_id="req-0-1",
        )  # fmt: skip
        assert log.append([retried.record()]).accepted == ["click-0-1"]
        third = export_events(settings, now=NOW)
        assert third["days"][closed[0]]["new"] == 0 and third["trimmed"] == 1
        assert _lake_bytes(settings) == before
        assert set(log.event_ids()) == today_ids

        # Tomorrow, today is closed: it is exported and leaves the log.
        tomorrow = export_events(settings, now=NOW + timedelta(days=1))
        assert list(tomorrow["days"]) == [DAYS[2].date().isoformat()]
        assert set(pd.read_parquet(lake_events_dir(settings))["event_id"]) == set(expected)
        assert log.count() == 0 and log.event_ids() == []
    finally:
        log.close()
