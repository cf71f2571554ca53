"""The gateway's event log on Redis Streams: the production twin of ``SqliteEventLog``.

Several gateway replicas append to one log, and the canary analysis and the pipeline read it,
so it lives on a broker rather than in one replica's file. The promises are the SQLite log's:

- **idempotent by event_id**: one Lua script checks the id in a hash (``<prefix>:ids``, event
  id -> stream entry id) and only then ``XADD``s the event to ``<prefix>:events``; a script
  runs atomically, so two replicas posting the same retried event store it once, and a batch
  that repeats an id stores it once (the repeat is a duplicate), as SQLite's ``INSERT OR
  IGNORE`` in one transaction does.
- **durable before the 2xx**: Redis writes the script's effects to its append-only file, and
  with ``appendfsync always`` it fsyncs that file before it sends the reply, so a returned
  ``append`` has reached the disk, like SQLite's ``synchronous=FULL`` commit. That is a
  property of the server, not of this client: the log checks ``appendonly`` and
  ``appendfsync`` when it opens and refuses a server that would answer before the fsync
  (``everysec`` loses up to a second of acknowledged events on a crash). A server that
  will not answer ``CONFIG GET`` (renamed, or denied by an ACL, as managed services do)
  cannot be checked, and is refused as well: durability is verified, never assumed
  (``gateway.event_log_require_fsync: false`` is the operator's explicit choice to accept
  it). (Redis 7.2's ``WAITAOF`` would make the wait explicit per call; the installed server
  is 7.0.)
- **a batch is all or nothing**: every event of a batch is turned into script arguments
  before anything is sent, and the script calls (one per ``batch`` events) go in one
  ``MULTI``/``EXEC``, so no other client sees part of a batch and a batch that cannot be sent
  whole (a malformed event, a connection lost before ``EXEC``) stores nothing.

Keys share the ``{...}`` hash tag of the prefix, so on Redis Cluster the script's keys sit in
one slot. Served requests go to ``<prefix>:requests`` (a stream; a re-logged request id is
read back as its last record, as SQLite's ``INSERT OR REPLACE`` keeps the last).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Collection, Iterator, Sequence
from datetime import datetime
from typing import Any, cast
from urllib.parse import urlsplit

import pandas as pd

from recsys.contracts import EVENTS, conform
from recsys.event_log.base import COLUMNS, AppendResult, ServedRequest, event_record
from recsys.faults import ACK_BEFORE_WRITE, ACK_BEFORE_WRITE_DELAY_S, COMMIT_PER_ROW, armed
from recsys.timeutil import utc_iso

log = logging.getLogger(__name__)

REQUEST_COLUMNS = ["request_id", "user_id", "arm", "versions", "ts", "latency_ms", "status", "fallback"]

# KEYS[1]: the id hash, KEYS[2]: the events stream. ARGV: the number of events, then per event
# its id, its number of field/value pairs and the pairs. Returns 1 (stored) or 0 (duplicate)
# per event. Atomic: nothing else runs on the server between the check and the XADD.
APPEND_SCRIPT = """
local n = tonumber(ARGV[1])
local pos = 2
local out = {}
for e = 1, n do
  local id = ARGV[pos]
  local nf = tonumber(ARGV[pos + 1])
  pos = pos + 2
  if redis.call('HEXISTS', KEYS[1], id) == 1 then
    out[e] = 0
  else
    local args = {KEYS[2], '*'}
    for j = 0, 2 * nf - 1 do
      args[#args + 1] = ARGV[pos + j]
    end
    local entry = redis.call('XADD', unpack(args))
    redis.call('HSET', KEYS[1], id, entry)
    out[e] = 1
  end
  pos = pos + 2 * nf
end
return out
"""


class EventLogDurabilityError(RuntimeError):
    """The Redis server would acknowledge an event before it is on disk."""


class RedisStreamsEventLog:
    """Append-only, idempotent event log on Redis Streams (same methods as ``SqliteEventLog``).

    Args:
        url: the server, ``redis://[:password@]host:port/db``.
        prefix: key prefix (``<prefix>:events``, ``<prefix>:ids``, ``<prefix>:requests``).
        require_fsync: refuse a server without ``appendonly yes`` and ``appendfsync always``;
            readers (the canary analysis) pass False, since they do not acknowledge anything.
        batch: events per script call; bounds one script's arguments. The calls of one
            ``append`` still run as one ``MULTI``/``EXEC`` (all or nothing).
        timeout: seconds a connect or a reply may take before the call fails.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "{recsys}:eventlog",
        require_fsync: bool = True,
        batch: int = 500,
        timeout: float = 10.0,
    ) -> None:
        import redis

        self.url = url
        self.prefix = prefix
        self.events_key = f"{prefix}:events"
        self.ids_key = f"{prefix}:ids"
        self.requests_key = f"{prefix}:requests"
        self.batch = batch
        self._client = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=timeout, socket_connect_timeout=timeout
        )
        self._script = self._client.register_script(APPEND_SCRIPT)
        self._lock = threading.Lock()
        self.fsync = self._check_fsync(require_fsync)

    @property
    def location(self) -> str:
        """Where the log is, without the password (for /readyz and reports)."""
        parts = urlsplit(self.url)
        host = parts.hostname or "?"
        return f"redis://{host}:{parts.port or 6379}{parts.path or ''} {self.events_key}"

    def _check_fsync(self, required: bool) -> dict[str, str] | None:
        import redis

        try:
            # The sync client's stubs type every reply as "Awaitable | Any".
            got = {
                **cast(dict[str, str], self._client.config_get("appendonly")),
                **cast(dict[str, str], self._client.config_get("appendfsync")),
            }
        except redis.ResponseError as e:  # CONFIG renamed or denied (ACL, managed services)
            if required:
                raise EventLogDurabilityError(
                    f"gateway.event_log_redis_url: cannot verify that {self.location} fsyncs every write "
                    f"(CONFIG GET appendonly/appendfsync answered {e}); allow CONFIG GET for the "
                    "gateway's user, or set gateway.event_log_require_fsync: false to accept an "
                    "unverified server"
                ) from e
            log.warning(
                "cannot read the Redis persistence settings of %s (%s): durability unchecked",
                self.location,
                e,
            )
            return None
        ok = got.get("appendonly") == "yes" and got.get("appendfsync") == "always"
        if required and not ok:
            raise EventLogDurabilityError(
                f"gateway.event_log_redis_url: {self.location} has appendonly={got.get('appendonly')!r}, "
                f"appendfsync={got.get('appendfsync')!r}; an acknowledged event must be on disk, which "
                "needs appendonly yes and appendfsync always (or gateway.event_log_require_fsync: false "
                "to accept losing up to a second of events on a crash)"
            )
        return got

    def append(self, events: Sequence[dict[str, Any]]) -> AppendResult:
        """Store events, all or none; ids already in the log (or earlier in this batch) are duplicates.

        Every event becomes script arguments first (a malformed one raises before anything is
        sent); the script calls then run in one ``MULTI``/``EXEC``, in order, so a later call
        sees the ids of an earlier one and no reader sees part of the batch.
        """
        if not events:
            return AppendResult([], [])
        ids = [str(e["event_id"]) for e in events]
        calls = [_script_args(events[at : at + self.batch]) for at in range(0, len(events), self.batch)]
        keys = [self.ids_key, self.events_key]
        if armed(ACK_BEFORE_WRITE):  # the broken log of a test: answers first, writes later
            writer = threading.Timer(ACK_BEFORE_WRITE_DELAY_S, self._run_calls_one_by_one, (keys, calls))
            writer.daemon = True
            writer.start()
            return AppendResult(ids, [])
        if armed(COMMIT_PER_ROW):  # the broken log of a test: each call on its own
            replies = self._run_calls_one_by_one(keys, calls)
        else:
            with self._lock:
                pipe = self._client.pipeline(transaction=True)
                for argv in calls:
                    self._script(keys=keys, args=argv, client=pipe)
                replies = pipe.execute()
        flags = [flag for reply in replies for flag in reply]
        accepted: list[str] = []
        duplicates: list[str] = []
        for event_id, stored in zip(ids, flags, strict=True):
            (accepted if stored == 1 else duplicates).append(event_id)
        return AppendResult(accepted, duplicates)

    def _run_calls_one_by_one(self, keys: list[str], calls: list[list[Any]]) -> list[Any]:
        with self._lock:
            return [self._script(keys=keys, args=argv) for argv in calls]

    def log_request(self, record: ServedRequest) -> None:
        """Record a served request (its impressions go through ``append`` as events)."""
        self.log_requests([record])

    def log_served(self, records: Sequence[ServedRequest], impressions: Sequence[dict[str, Any]]) -> None:
        """Served requests and their impressions (impressions first, as the SQLite log)."""
        if impressions:
            self.append(impressions)
        self.log_requests(records)

    def log_requests(self, records: Sequence[ServedRequest]) -> None:
        """Record served requests in one round trip (MULTI/EXEC: all or none)."""
        if not records:
            return
        with self._lock:
            pipe = self._client.pipeline(transaction=True)
            for r in records:
                pipe.xadd(
                    self.requests_key,
                    {
                        "request_id": r.request_id,
                        "user_id": r.user_id,
                        "arm": r.arm,
                        "versions": json.dumps(r.versions),
                        "ts": utc_iso(r.ts),
                        "latency_ms": repr(float(r.latency_ms)),
                        "status": r.status,
                        "fallback": r.fallback or "",
                        "items": json.dumps(r.items),
                    },
                )
            pipe.execute()

    def _scan(self, key: str, page: int = 10_000) -> Iterator[tuple[str, dict[str, str]]]:
        """Every entry of a stream, oldest first, in pages (XRANGE with an exclusive start)."""
        start = "-"
        while True:
            reply = self._client.xrange(key, min=start, max="+", count=page)
            rows = cast(list[tuple[str, dict[str, str]]], reply)
            if not rows:
                return
            yield from rows
            start = "(" + rows[-1][0]

    def requests_frame(self) -> pd.DataFrame:
        """Every served request, one row per request id (the last record of an id wins)."""
        rows = [
            {**f, "latency_ms": float(f["latency_ms"]), "fallback": f.get("fallback") or None}
            for _, f in self._scan(self.requests_key)
        ]
        df = pd.DataFrame(rows, columns=[*REQUEST_COLUMNS, "items"])[REQUEST_COLUMNS]
        df = df.drop_duplicates("request_id", keep="last").reset_index(drop=True)
        df["versions"] = df["versions"].map(lambda v: json.loads(v) if v else {})
        df["ts"] = pd.to_datetime(df["ts"], utc=True, format="ISO8601")
        return df

    def outcomes_frame(self) -> pd.DataFrame:
        """Distinct (request_id, item_id, event_type) of events tied to a request (canary input)."""
        rows = [
            (f["request_id"], f["item_id"], f["event_type"])
            for _, f in self._scan(self.events_key)
            if f.get("request_id")
        ]
        return pd.DataFrame(rows, columns=["request_id", "item_id", "event_type"]).drop_duplicates(
            ignore_index=True
        )

    def count(self) -> int:
        return int(cast(int, self._client.hlen(self.ids_key)))

    def event_ids(self) -> list[str]:
        return [f["event_id"] for _, f in self._scan(self.events_key)]

    def to_frame(self) -> pd.DataFrame:
        """The whole log as a contract-shaped events frame (what ingest reads)."""
        rows = [{c: f.get(c) for c in COLUMNS} for _, f in self._scan(self.events_key)]
        df = pd.DataFrame(rows, columns=COLUMNS)
        df["value"] = pd.to_numeric(df["value"].replace("", None), errors="coerce")
        df["request_id"] = df["request_id"].replace("", None)
        return conform(df, EVENTS)

    def event_days(self) -> list[str]:
        """The UTC days of the logged events' ``ts`` (stored as UTC ISO 8601: its date prefix)."""
        return sorted({f["ts"][:10] for _, f in self._scan(self.events_key)})

    def events_between(self, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """Events with ``start <= ts < end`` in stream order, body extras included.

        A stream entry's id is when it was added, not the event's ``ts`` (a late event is added
        after later ones), so the whole stream is read; the export trims it to what is new.
        """
        lo, hi = utc_iso(start), utc_iso(end)
        return [event_record(f, f.get("body")) for _, f in self._scan(self.events_key) if lo <= f["ts"] < hi]

    def trim_events(self, event_ids: Collection[str], before: datetime) -> list[str]:
        """Remove the named events before ``before``: ``XTRIM MINID`` over the stream's prefix
        of named entries, ``XDEL`` for named entries behind an unnamed one, and their ids out of
        the id hash, in one MULTI/EXEC.

        A stream entry's id is when it was added, not the event's ``ts``: the prefix of a day is
        cut with ``MINID``, and a closed day's events added after an open day's (late events,
        impressions written by the batching thread) are deleted one by one. ``MINID`` is the
        entry just after the last one read, so an entry added meanwhile (its id is higher) stays.
        """
        ids = set(event_ids)
        cut = utc_iso(before)
        prefix: list[str] = []
        scattered: list[tuple[str, str]] = []  # (entry id, event id)
        last = None
        in_prefix = True
        for entry, f in self._scan(self.events_key):
            named = f.get("event_id") in ids and f["ts"] < cut
            if in_prefix and named:
                prefix.append(f["event_id"])
                last = entry
                continue
            in_prefix = False
            if named:
                scattered.append((entry, f["event_id"]))
        removed = prefix + [e for _, e in scattered]
        if not removed:
            return []
        with self._lock:
            pipe = self._client.pipeline(transaction=True)
            if last is not None:
                ms, seq = last.split("-")
                pipe.xtrim(self.events_key, minid=f"{ms}-{int(seq) + 1}", approximate=False)
            for start in range(0, len(scattered), 1000):
                pipe.xdel(self.events_key, *[entry for entry, _ in scattered[start : start + 1000]])
            for start in range(0, len(removed), 1000):
                pipe.hdel(self.ids_key, *removed[start : start + 1000])
            pipe.execute()
        return sorted(removed)

    def close(self) -> None:
        with self._lock:
            self._client.close()


def _script_args(chunk: Sequence[dict[str, Any]]) -> list[Any]:
    """``APPEND_SCRIPT``'s ARGV for a chunk of events (raises on a malformed event)."""
    argv: list[Any] = [len(chunk)]
    for e in chunk:
        fields = _event_fields(e)
        argv += [e["event_id"], len(fields)]
        for k, v in fields.items():
            argv += [k, v]
    return argv


def _event_fields(e: dict[str, Any]) -> dict[str, str]:
    """An event as stream fields: the contract's columns (strings; a null is left out) + body."""
    out: dict[str, str] = {}
    for c in COLUMNS:
        v = e.get(c)
        if v is None:
            continue
        out[c] = utc_iso(v) if c == "ts" else str(v)
    out["body"] = json.dumps(e, default=str)
    return out
