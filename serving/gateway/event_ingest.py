"""Posted events: appended durably to the event log before the answer, then pushed online."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

from recsys.config import Settings
from recsys.event_log.base import EventLog
from serving.gateway.exploration import ExplorationBandit
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.schemas import Event
from serving.gateway.user_features import UserActivity

log = logging.getLogger("serving.gateway")


class EventIngest:
    """Takes a batch of events: durable append, the users' in-process activity, the online store.

    Args:
        settings: the configuration (``features.recent_items``).
        event_log: the durable event log; idempotent by ``event_id``.
        activity: the gateway's memory of each user's events since it started.
        store: the Feast online store the events are pushed to.
        store_lock: held for each push (a read-modify-write of the user's row).
        metrics: events accepted, duplicate, and failed pushes.
        exploration: the exploration slots' bandit, which learns from clicks naming a request.
    """

    def __init__(
        self,
        settings: Settings,
        event_log: EventLog,
        activity: UserActivity,
        store: Any,
        store_lock: threading.Lock,
        metrics: GatewayMetrics,
        exploration: ExplorationBandit | None = None,
    ) -> None:
        self.settings = settings
        self.event_log = event_log
        self.activity = activity
        self.store = store
        self.store_lock = store_lock
        self.metrics = metrics
        self.exploration = exploration

    def ingest(self, events: Sequence[Event]) -> dict[str, Any]:
        """Durable append first, then the user's in-process state, then the online store."""
        from recsys.online_features import push_event

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
        pushed = True
        for rec in new:
            try:
                with self.store_lock:
                    push_event(self.store, rec, self.settings.features.recent_items)
            except Exception:  # noqa: BLE001 - the event is durable; the rebuild repairs the store
                pushed = False
                self.metrics.push_failures.inc()
                log.exception("push of event %s failed", rec["event_id"])
        n_dup = len(records) - len(new)
        self.metrics.events.labels(status="accepted").inc(len(new))
        self.metrics.events.labels(status="duplicate").inc(n_dup)
        return {"accepted": len(new), "duplicates": n_dup, "pushed": pushed, "results": statuses}
