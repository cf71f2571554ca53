"""Posted events: appended durably to the event log before the answer, then pushed online.

The online-store push leaves the request path: accepted events go to a bounded queue that
one background thread writes to the store, so a slow or hung store (a paused Redis, a
materialization holding SQLite's write lock) never holds an event post, and pushes never
queue without bound. The event is durable before it is queued; a push that fails or is
dropped is counted, and the next feature rebuild brings the store up to date.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

from recsys.config import Settings
from recsys.event_log.base import EventLog
from serving.gateway.exploration import ExplorationBandit
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.schemas import Event
from serving.gateway.user_features import UserActivity

log = logging.getLogger("serving.gateway")
# A failing store logs one stack trace per this many seconds, not one per event.
PUSH_ERROR_LOG_INTERVAL_S = 30.0


class OnlinePusher:
    """Pushes accepted events to the online store from one background thread.

    Args:
        settings: the configuration (``features.recent_items``, ``gateway.push_queue_size``).
        store: the Feast online store the events are pushed to.
        store_lock: held for each push (a read-modify-write of the user's row).
        metrics: failed and dropped pushes, and the queue's depth.
    """

    def __init__(
        self, settings: Settings, store: Any, store_lock: threading.Lock, metrics: GatewayMetrics
    ) -> None:
        self.settings = settings
        self.store = store
        self.store_lock = store_lock
        self.metrics = metrics
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(settings.gateway.push_queue_size)
        self._thread: threading.Thread | None = None
        self._last_error_log = float("-inf")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._push_events, name="online-push", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread after the pushes queued so far (or at ``timeout``: the rebuild repairs)."""
        if self._thread is None:
            return
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout=timeout)

    def offer(self, records: Sequence[dict[str, Any]]) -> bool:
        """Queue ``records`` for their push without waiting; False when some were dropped (full)."""
        for n, rec in enumerate(records):
            try:
                self._queue.put_nowait(rec)
            except queue.Full:
                self.metrics.push_dropped.inc(len(records) - n)
                return False
        self.metrics.push_queue.set(self._queue.qsize())
        return True

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every push queued so far has been tried; False at ``timeout``."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def _push_events(self) -> None:
        from recsys.online_features import online_pusher, push_event

        write = None  # the push source's writer, its views resolved at the first push
        while True:
            rec = self._queue.get()
            try:
                if rec is None:
                    return
                with self.store_lock:
                    write = write or online_pusher(self.store)
                    push_event(self.store, rec, self.settings.features.recent_items, write)
            except Exception:  # noqa: BLE001 - the event is durable; the rebuild repairs the store
                self.metrics.push_failures.inc()
                self._log_failure(rec)
            finally:
                self._queue.task_done()
                self.metrics.push_queue.set(self._queue.qsize())

    def _log_failure(self, rec: dict[str, Any] | None) -> None:
        now = time.monotonic()
        event_id = rec["event_id"] if rec else None
        if now - self._last_error_log >= PUSH_ERROR_LOG_INTERVAL_S:
            self._last_error_log = now
            log.exception(
                "online-store push of event %s failed (counted; next trace in %.0f s)",
                event_id,
                PUSH_ERROR_LOG_INTERVAL_S,
            )


class EventIngest:
    """Takes a batch of events: durable append, the users' in-process activity, the push queue.

    Args:
        settings: the configuration (``features.recent_items``).
        event_log: the durable event log; idempotent by ``event_id``.
        activity: the gateway's memory of each user's events since it started.
        pusher: the online store's push queue.
        metrics: events accepted, duplicate, and failed pushes.
        exploration: the exploration slots' bandit, which learns from clicks naming a request.
    """

    def __init__(
        self,
        settings: Settings,
        event_log: EventLog,
        activity: UserActivity,
        pusher: OnlinePusher,
        metrics: GatewayMetrics,
        exploration: ExplorationBandit | None = None,
    ) -> None:
        self.settings = settings
        self.event_log = event_log
        self.activity = activity
        self.pusher = pusher
        self.metrics = metrics
        self.exploration = exploration

    def ingest(self, events: Sequence[Event]) -> dict[str, Any]:
        """Durable append first, then the user's in-process state, then the push queue."""
        records = [e.record() for e in events]
        result = self.event_log.append(records)  # on disk (fsync) before anything else
        accepted = set(result.accepted)
        statuses, taken = [], set()
        new: list[dict[str, Any]] = []
        for rec in records:
            first = rec["event_id"] in accepted and rec["event_id"] not in taken
            taken.add(rec["event_id"])
            statuses.append({"event_id": rec["event_id"], "status": "accepted" if first else "duplicate"})
            if first:
                new.append(rec)
        new.sort(key=lambda r: r["ts"])
        for rec in new:
            self.activity.update(rec)
        if self.exploration is not None:
            self.exploration.observe(new)  # duplicates were left out above
        queued = self.pusher.offer(new)
        n_dup = len(records) - len(new)
        self.metrics.events.labels(status="accepted").inc(len(new))
        self.metrics.events.labels(status="duplicate").inc(n_dup)
        return {"accepted": len(new), "duplicates": n_dup, "push_queued": queued, "results": statuses}
