"""What an event log is, whatever holds it: the records it keeps and the calls it answers.

The gateway appends every accepted event (durable before the answer, once per ``event_id``)
and every served request with its impressions; the canary analysis and the export read them
back. ``recsys.event_log.sqlite`` (embedded) and ``recsys.event_log.redis_streams``
(production) implement ``EventLog``; ``recsys.event_log.open_event_log`` picks one.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import pandas as pd

from recsys.contracts import EVENTS

# The log's own columns: the contract's required ones. The serving context of an impression
# (its rank among them) rides in the logged body, as the export reads it.
COLUMNS = EVENTS.required_names
# What ``outcomes_frame`` holds: each distinct (request, item, event type) tied to a request.
OUTCOME_COLUMNS = ["request_id", "item_id", "event_type"]


@dataclass(frozen=True)
class AppendResult:
    accepted: list[str]  # event ids stored by this call
    duplicates: list[str]  # event ids already in the log (a retry): not stored again


@dataclass(frozen=True)
class ServedRequest:
    """What the gateway answered one recommendation request with."""

    request_id: str
    user_id: str
    arm: str  # stable | canary | holdout
    versions: dict[str, int | None]  # model name -> version that served (None: not used)
    ts: Any
    latency_ms: float
    status: str  # ok | error
    fallback: str | None = None  # the fallback used, if any
    items: list[str] = field(default_factory=list)
    # Where the candidates came from (retrieval, exact, segment_popularity, ...), when the
    # caller says: each impression of the request carries it into the log and the export.
    candidate_source: str | None = None


class EventLog(Protocol):
    """What the gateway, the canary analysis and the export need of an event log.

    Implemented by ``SqliteEventLog`` (embedded) and ``RedisStreamsEventLog`` (production);
    ``gateway.event_log_backend`` picks one.
    """

    @property
    def location(self) -> str: ...

    def append(self, events: Sequence[dict[str, Any]]) -> AppendResult: ...

    def log_request(self, record: ServedRequest) -> None: ...

    def log_requests(self, records: Sequence[ServedRequest]) -> None: ...

    def log_served(self, records: Sequence[ServedRequest], impressions: Sequence[dict[str, Any]]) -> None: ...

    def requests_frame(self) -> pd.DataFrame: ...

    def outcomes_frame(self) -> pd.DataFrame: ...

    def count(self) -> int: ...

    def event_ids(self) -> list[str]: ...

    def to_frame(self) -> pd.DataFrame: ...

    def event_days(self) -> list[str]:
        """The UTC days (``YYYY-MM-DD``, sorted) that the logged events' ``ts`` fall on."""
        ...

    def events_between(self, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """Logged events with ``start <= ts < end``, in log order, as ``event_record`` gives them."""
        ...

    def trim_events(self, event_ids: Collection[str], before: datetime) -> list[str]:
        """Remove logged events whose id is in ``event_ids`` and whose ``ts`` is before ``before``.

        Only what the caller names goes (the export names what its lake files durably hold),
        so an event logged since it read the log is never lost. The ids leave the
        de-duplication index with their events: a retry of a trimmed event is accepted again,
        and the export's merge by event_id keeps the lake's copy. Returns the removed ids.
        """
        ...

    def close(self) -> None: ...


def event_record(columns: dict[str, Any], body: str | None) -> dict[str, Any]:
    """A logged event as one dict: what the poster sent beyond the contract (the body's
    extra keys: an impression's arm, position, model_versions...) and the contract's columns
    as the log normalised them (``ts`` in UTC ISO 8601, ``value`` a float or None, an absent
    ``request_id`` None)."""
    out: dict[str, Any] = {}
    if body:
        try:
            extra = json.loads(body)
        except ValueError:
            extra = None
        if isinstance(extra, dict):
            out.update(extra)
    for c in COLUMNS:
        v = columns.get(c)
        out[c] = None if v == "" and c in ("value", "request_id") else v
    if out.get("value") is not None:
        out["value"] = float(out["value"])
    return out
