"""What a served request leaves behind: its record (arm, versions, latency) and one
``impression`` event per item shown, written to the event log by one background thread.

Impressions are not worth a disk flush per request (posted events are): records queue up
and are written in batches, one wake-up and one commit per window.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from recsys.config import Settings
from recsys.event_log.base import EventLog, ServedRequest
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.policy import assign_arm
from serving.gateway.schemas import RecommendationRequest

log = logging.getLogger("serving.gateway")
IMPRESSION_WRITE_INTERVAL_S = 0.02
MAX_BATCH_EVENTS = 5000


class ImpressionWriter:
    """Queues served requests with their impressions; a background thread appends them in batches.

    Args:
        settings: the configuration (arm fractions and salt, for a failed request's arm).
        event_log: where the records and impressions are appended.
        metrics: impressions queued per arm, and append failures.
    """

    def __init__(self, settings: Settings, event_log: EventLog, metrics: GatewayMetrics) -> None:
        self.settings = settings
        self.event_log = event_log
        self.metrics = metrics
        self._queue: queue.Queue[tuple[ServedRequest, list[dict[str, Any]]] | None] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._write_impressions, name="impressions", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then end the thread."""
        self._stop.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def log_served(
        self, served: ServedRequest, req: RecommendationRequest, items: Sequence[dict[str, Any]]
    ) -> None:
        """Queue a served request's record and an impression per item shown."""
        ts = served.ts.isoformat()
        session = req.context.session_id or served.request_id
        records = [
            {
                "event_id": f"{served.request_id}:{n}",
                "user_id": req.user_id,
                "item_id": it["item_id"],
                "event_type": "impression",
                "value": None,
                "ts": ts,
                "session_id": session,
                "device": req.context.device,
                "request_id": served.request_id,
                # Beyond the contract's columns, kept in the log's body for canary analysis.
                "arm": served.arm,
                "position": n,
                "model_versions": served.versions,
                "reason": it["reason"],
                # What the served ranking scored it (None in an exploration slot): drift
                # monitoring compares its distribution with the training window's.
                "score": it.get("score"),
            }
            for n, it in enumerate(items)
        ]
        if served.candidate_source is not None:
            for rec in records:
                rec["candidate_source"] = served.candidate_source
        self._queue.put((served, records))
        self.metrics.impressions.labels(arm=served.arm).inc(len(records))

    def log_failed_request(self, user_id: str, latency_ms: float) -> None:
        """Record a request that ended in an error, so the canary guardrail counts it for its arm."""
        gw = self.settings.gateway
        arm = assign_arm(user_id, gw.arm_fractions, gw.arm_salt)
        served = ServedRequest(
            request_id=uuid.uuid4().hex,
            user_id=user_id,
            arm=arm,
            versions={},
            ts=datetime.now(UTC),
            latency_ms=round(latency_ms, 3),
            status="error",
        )
        self._queue.put((served, []))

    def _write_impressions(self) -> None:
        done = False
        while not done:
            first = self._queue.get()
            pending = [] if first is None else [first]
            done = first is None
            n_events = sum(len(r) for _, r in pending)
            while not done and n_events < MAX_BATCH_EVENTS:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    done = True
                else:
                    pending.append(more)
                    n_events += len(more[1])
            if not pending:
                continue
            batch = [e for _, records in pending for e in records]
            try:
                self.event_log.log_served([served for served, _ in pending], batch)
            except Exception:  # noqa: BLE001
                self.metrics.impression_log_failures.inc()
                log.exception("impression log append failed")
            # Let the next requests' records gather before the next write: one wake-up and one
            # commit per window instead of per request. Impressions carry no promise of
            # durability at the answer.
            self._stop.wait(IMPRESSION_WRITE_INTERVAL_S)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until the impressions queued so far are written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
