"""What an event log is, whatever holds it: the records it keeps and the calls it answers.

The gateway appends every accepted event (durable before the answer, once per ``event_id``)
and every served request with its impressions; the canary analysis and the export read them
back. ``recsys.event_log.sqlite`` (embedded) and ``recsys.event_log.redis_streams``
(production) implement ``EventLog``; ``recsys.event_log.open_event_log`` picks one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pandas as pd

from recsys.contracts import EVENTS

COLUMNS = [c.name for c in EVENTS.columns]
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

    def close(self) -> None: ...
