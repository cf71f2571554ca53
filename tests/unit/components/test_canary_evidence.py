"""Canary evidence that is the canary's: the window starts at its push, requests count by the
versions the model server said served them, and a canary whose model calls fail is charged
with its popularity fallbacks (and never opens stable's breaker)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

from components import canary
from recsys.artifacts import push_record_path
from recsys.config import load_settings
from recsys.event_log.base import ServedRequest
from recsys.event_log.sqlite import SqliteEventLog
from recsys.model_registry import MODELS_CONFIG, write_models_config
from serving.clients import ModelServerError, Prediction
from serving.gateway.model_calls import ModelCalls, run_sync

PUSHED_AT = datetime(2026, 11, 2, 12, tzinfo=UTC)


def _registry(base: Path, stable: int = 1, canary_version: int = 2) -> None:
    """Both models with stable and canary labels, each version with its push record."""
    models = {}
    for name in ("retrieval", "ranking"):
        for v, at in ((stable, PUSHED_AT - timedelta(days=7)), (canary_version, PUSHED_AT)):
            record = push_record_path(base, name, v)
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"version": v, "pushed_at": at.isoformat(), "model": name}))
        labels = {"stable": stable, "canary": canary_version}
        models[name] = {"base_path": str(base / name), "versions": [stable, canary_version], "labels": labels}
    write_models_config(base / MODELS_CONFIG, models)


def test_a_fresh_canary_with_historical_unversioned_requests_waits(tmp_path):
    settings = load_settings(overrides={"home": str(tmp_path)})
    _registry(settings.models_dir)
    log = SqliteEventLog(settings.event_log_path)
    # A day before the push: 2000 requests per arm logged without versions (an older gateway,
    # or fallbacks); the canary arm's were never clicked, stable's 10% were. Counted, they
    # would roll the fresh canary back (0% vs 10% on 2000 requests each) on traffic it never served.
    before = PUSHED_AT - timedelta(days=1)
    records, events = [], []
    for arm in ("stable", "canary"):
        for i in range(2000):
            rid = f"{arm}-{i}"
            records.append(ServedRequest(rid, f"u-{rid}", arm, {}, before + timedelta(seconds=i), 30.0, "ok"))
            common = {"user_id": f"u-{rid}", "request_id": rid, "session_id": "s", "device": "web",
                      "value": None}  # fmt: skip
            events += [
                {**common, "event_id": f"i-{rid}-{n}", "event_type": "impression", "item_id": f"it{n}",
                 "ts": before + timedelta(seconds=i)}
                for n in range(3)
            ]  # fmt: skip
            if arm == "stable" and i % 10 == 0:
                events.append({**common, "event_id": f"c-{rid}", "event_type": "click", "item_id": "it0",
                               "ts": before + timedelta(seconds=i + 5)})  # fmt: skip
    log.log_requests(records)
    log.append(events)
    log.close()

    analysis = canary.analyze(settings)

    assert analysis["window"]["since"] == PUSHED_AT.isoformat()
    assert analysis["arms"]["canary"]["requests"] == 0 and analysis["arms"]["stable"]["requests"] == 0
    assert analysis["decision"] == "wait", analysis["reason"]


class _CanaryTimesOut:
    """A model server whose canary version times out on every call; stable answers as version 1."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def predict(self, model, inputs, *, label=None, signature_name="", output_filter=()):
        self.calls.append((model, label))
        if label == "canary":
            raise ModelServerError("DEADLINE_EXCEEDED", "Deadline Exceeded")
        return Prediction({"scores": np.zeros((1, 3), np.float32)}, model, 1, signature_name)


def test_a_timing_out_canary_is_rolled_back_and_stable_keeps_its_breaker_closed():
    settings = load_settings(None)
    calls = ModelCalls(settings, _CanaryTimesOut())  # type: ignore[arg-type]
    t0 = pd.Timestamp(PUSHED_AT) + pd.Timedelta(minutes=1)
    rows = []
    # Alternate requests of both arms, as the gateway does: each calls retrieval with its label,
    # records the versions the answers named, and falls back to popularity when the call fails.
    for i in range(60):
        arm = "canary" if i % 2 else "stable"
        with calls.recording() as served:
            try:
                run_sync(calls.call("retrieval", {}, arm, "retrieve"))
                fallback = None
            except ModelServerError:
                fallback = "candidates:segment_popularity"
        rows.append((f"r{i}", f"u{i}", arm, dict(served), t0 + pd.Timedelta(seconds=i), 20.0, "ok", fallback))
    requests = pd.DataFrame(
        rows, columns=["request_id", "user_id", "arm", "versions", "ts", "latency_ms", "status", "fallback"]
    )
    events = pd.DataFrame(columns=["request_id", "item_id", "event_type"])

    # Stable was never refused: its breaker stayed closed through the canary's timeouts...
    assert not calls.breaker_open("retrieval", "stable") and calls.breaker_open("retrieval", "canary")
    assert (requests[requests["arm"] == "stable"]["versions"] == {"retrieval": 1}).all()
    serving = {"stable": {"retrieval": 1, "ranking": 1}, "canary": {"retrieval": 2, "ranking": 2}}
    analysis = canary.analyze_canary(settings.canary, (requests, events), serving=serving)

    # ...its fallback rate stays 0, and the canary, answered from popularity, is rolled back.
    assert analysis["arms"]["stable"]["fallback_rate"] == 0.0 and analysis["arms"]["stable"]["requests"] == 30
    assert analysis["arms"]["canary"]["fallbacks"] == 30
    assert analysis["decision"] == "rollback" and "fallback rate" in analysis["reason"]


def test_requests_count_by_the_versions_the_server_named():
    settings = load_settings(None)
    calls = ModelCalls(settings, _CanaryTimesOut())  # type: ignore[arg-type]
    with calls.recording() as served:
        run_sync(calls.call("ranking", {}, "stable", "rank"))
    # The answer said version 1, whatever the label was expected to point at.
    assert served == {"ranking": 1}
    with calls.recording() as outside:
        pass
    assert outside == {}
