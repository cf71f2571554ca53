"""The event log: every accepted event, durable before the answer, and every served request.

``open_event_log`` returns the configured backend (``gateway.event_log_backend``): SQLite in
one file (embedded) or Redis Streams (production). Both implement ``EventLog`` (``base``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from recsys.event_log.base import AppendResult, EventLog, ServedRequest

if TYPE_CHECKING:
    from recsys.config import Settings

__all__ = ["AppendResult", "EventLog", "ServedRequest", "open_event_log", "read_configured_log"]


def open_event_log(settings: Settings, reader: bool = False) -> EventLog:
    """The configured event log (``gateway.event_log_backend``).

    Args:
        settings: the configuration.
        reader: open only to read (the canary analysis): a reader acknowledges no event, so a
            Redis without per-write fsync is not refused.
    """
    gw = settings.gateway
    if gw.event_log_backend == "redis_streams":
        from recsys.event_log.redis_streams import RedisStreamsEventLog

        require = gw.event_log_require_fsync and not reader
        return RedisStreamsEventLog(
            gw.event_log_redis_url,
            gw.event_log_key_prefix,
            require_fsync=require,
            timeout=gw.event_log_redis_timeout_seconds,
        )
    from recsys.event_log.sqlite import SqliteEventLog

    return SqliteEventLog(settings.event_log_path)


def read_configured_log(settings: Settings) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """``(requests, events, location)`` from the backend ``gateway.event_log_backend`` names.

    SQLite is read from its file without creating one; Redis Streams through
    ``RedisStreamsEventLog`` opened as a reader (it acknowledges nothing, so it does not
    demand per-write fsync of the server).
    """
    if settings.gateway.event_log_backend == "sqlite":
        from recsys.event_log.sqlite import read_sqlite_log

        requests, events = read_sqlite_log(settings.event_log_path)
        return requests, events, str(settings.event_log_path)
    log = open_event_log(settings, reader=True)
    try:
        return log.requests_frame(), log.outcomes_frame(), log.location
    finally:
        log.close()
