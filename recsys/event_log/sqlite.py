"""The gateway's event log: every accepted event, durable before the answer, once per event_id.

The embedded log is a SQLite database in WAL mode with ``synchronous=FULL``: a commit has
reached the disk when ``append`` returns, so an event answered with a 2xx survives a
SIGKILL of the gateway. ``event_id`` is the primary key, which makes a retried post
idempotent (the duplicate is counted, not stored twice). Production swaps in a broker
(Redis Streams) behind the same two methods.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Collection, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from recsys.contracts import EVENTS, conform
from recsys.event_log.base import COLUMNS, OUTCOME_COLUMNS, AppendResult, ServedRequest, event_record
from recsys.faults import ACK_BEFORE_WRITE, ACK_BEFORE_WRITE_DELAY_S, COMMIT_PER_ROW, armed
from recsys.timeutil import utc_iso

_INSERT_EVENT = (
    "INSERT OR IGNORE INTO events (event_id, user_id, item_id, event_type, value, ts,"
    " session_id, device, request_id, body) VALUES (?,?,?,?,?,?,?,?,?,?)"
)


_INSERT_REQUEST = (
    "INSERT OR REPLACE INTO requests (request_id, user_id, arm, versions, ts, latency_ms,"
    " status, fallback, items) VALUES (?,?,?,?,?,?,?,?,?)"
)


def _event_rows(events: Sequence[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            e["event_id"],
            e["user_id"],
            e["item_id"],
            e["event_type"],
            e.get("value"),
            utc_iso(e["ts"]),
            e["session_id"],
            e["device"],
            e.get("request_id"),
            json.dumps(e, default=str),
        )
        for e in events
    ]


def _request_rows(records: Sequence[ServedRequest]) -> list[tuple[Any, ...]]:
    return [
        (
            r.request_id,
            r.user_id,
            r.arm,
            json.dumps(r.versions),
            utc_iso(r.ts),
            r.latency_ms,
            r.status,
            r.fallback,
            json.dumps(r.items),
        )
        for r in records
    ]


class SqliteEventLog:
    """Append-only, idempotent, durable event log in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so a 2xx means the event is on disk.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS events ("
            " seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " event_id TEXT NOT NULL UNIQUE,"
            " user_id TEXT NOT NULL, item_id TEXT NOT NULL, event_type TEXT NOT NULL,"
            " value REAL, ts TEXT NOT NULL, session_id TEXT NOT NULL, device TEXT NOT NULL,"
            " request_id TEXT, body TEXT)"
        )
        # One row per served recommendation request: which arm and model versions answered,
        # how fast, and whether a fallback was used. Outcomes (clicks, purchases...) join to it
        # by request_id; the canary analysis reads both.
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS requests ("
            " request_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, arm TEXT NOT NULL,"
            " versions TEXT, ts TEXT NOT NULL, latency_ms REAL, status TEXT NOT NULL,"
            " fallback TEXT, items TEXT)"
        )

    def append(self, events: Sequence[dict[str, Any]]) -> AppendResult:
        """Store events in one transaction; already-logged event ids are reported, not stored."""
        rows = _event_rows(events)
        if armed(ACK_BEFORE_WRITE):
            writer = threading.Timer(ACK_BEFORE_WRITE_DELAY_S, self._insert_rows_one_by_one, (rows,))
            writer.daemon = True
            writer.start()
            return AppendResult([r[0] for r in rows], [])
        if armed(COMMIT_PER_ROW):
            return AppendResult(*self._insert_rows_one_by_one(rows))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                accepted, duplicates = self._insert_events(rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return AppendResult(accepted, duplicates)

    def _insert_events(self, rows: list[tuple[Any, ...]]) -> tuple[list[str], list[str]]:
        """Insert inside an open transaction; (accepted ids, duplicate ids)."""
        before = self._db.total_changes
        self._db.executemany(_INSERT_EVENT, rows)
        if self._db.total_changes - before == len(rows):
            return [r[0] for r in rows], []
        # Some ids were logged already (or repeat in the batch): redo row by row to tell
        # which, in a fresh transaction.
        self._db.execute("ROLLBACK")
        self._db.execute("BEGIN IMMEDIATE")
        accepted: list[str] = []
        duplicates: list[str] = []
        for row in rows:
            stored = self._db.execute(_INSERT_EVENT, row).rowcount == 1
            (accepted if stored else duplicates).append(row[0])
        return accepted, duplicates

    def _insert_rows_one_by_one(self, rows: list[tuple[Any, ...]]) -> tuple[list[str], list[str]]:
        """The broken log of the failpoints: each row committed on its own (no batch transaction)."""
        accepted: list[str] = []
        duplicates: list[str] = []
        with self._lock:
            for row in rows:
                stored = self._db.execute(_INSERT_EVENT, row).rowcount == 1  # autocommit
                (accepted if stored else duplicates).append(row[0])
        return accepted, duplicates

    def log_request(self, record: ServedRequest) -> None:
        """Record a served request (its impressions go through ``append`` as events)."""
        self.log_requests([record])

    def log_requests(self, records: Sequence[ServedRequest]) -> None:
        """Record served requests in one transaction (one fsync for a batch, not one each)."""
        if not records:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany(_INSERT_REQUEST, _request_rows(records))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def log_served(self, records: Sequence[ServedRequest], impressions: Sequence[dict[str, Any]]) -> None:
        """Served requests and their impressions, in one transaction that is not fsynced itself.

        Impressions carry no durability promise (nobody waits on them), so this commit skips the
        fsync that ``synchronous=FULL`` gives posted events: the WAL reaches the disk with
        the next posted event's commit or the next checkpoint. A crash can lose the last such
        batches, never a posted event. One commit instead of two fsynced ones halves the
        writer's wall time (BENCHMARKS.md, "Measured costs behind design choices").
        """
        if not records and not impressions:
            return
        rows = _event_rows(impressions)
        with self._lock:
            self._db.execute("PRAGMA synchronous=NORMAL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    # Impressions first: a request row then always has its impressions beside it.
                    if rows:
                        self._insert_events(rows)
                    if records:
                        self._db.executemany(_INSERT_REQUEST, _request_rows(records))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            finally:
                self._db.execute("PRAGMA synchronous=FULL")

    def requests_frame(self) -> pd.DataFrame:
        """Every served request: request_id, user_id, arm, versions, ts, latency_ms, status, fallback."""
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, user_id, arm, versions, ts, latency_ms, status, fallback FROM requests"
            ).fetchall()
        df = pd.DataFrame(
            rows,
            columns=["request_id", "user_id", "arm", "versions", "ts", "latency_ms", "status", "fallback"],
        )
        df["versions"] = df["versions"].map(lambda v: json.loads(v) if v else {})
        df["ts"] = pd.to_datetime(df["ts"], utc=True)
        return df

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]

    def event_ids(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT event_id FROM events ORDER BY seq")]

    def iter_since(self, seq: int = 0, batch: int = 10_000) -> Iterator[tuple[int, dict[str, Any]]]:
        """Events after sequence number ``seq``, oldest first (for export and replay)."""
        last = seq
        while True:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT seq, {', '.join(COLUMNS)} FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                    (last, batch),
                ).fetchall()
            if not rows:
                return
            for row in rows:
                last = row[0]
                yield last, dict(zip(COLUMNS, row[1:], strict=True))

    def to_frame(self) -> pd.DataFrame:
        """The whole log as a contract-shaped events frame (what ingest reads)."""
        rows = [e for _, e in self.iter_since(0)]
        df = pd.DataFrame(rows, columns=COLUMNS)
        return conform(df, EVENTS)

    def event_days(self) -> list[str]:
        """The UTC days of the logged events (``ts`` is stored as UTC ISO 8601, so its date prefix)."""
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT substr(ts, 1, 10) FROM events ORDER BY 1").fetchall()
        return [r[0] for r in rows]

    def events_between(self, start: datetime, end: datetime) -> list[dict[str, Any]]:
        """Events with ``start <= ts < end`` in log order, body extras included (``event_record``).

        ``ts`` is UTC ISO 8601 text, whose order is time order, so the bounds compare as text.
        """
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(COLUMNS)}, body FROM events WHERE ts >= ? AND ts < ? ORDER BY seq",
                (utc_iso(start), utc_iso(end)),
            ).fetchall()
        return [event_record(dict(zip(COLUMNS, row[:-1], strict=True)), row[-1]) for row in rows]

    def trim_events(self, event_ids: Collection[str], before: datetime) -> list[str]:
        """Delete the named events with ``ts`` before ``before``, in one transaction."""
        ids = sorted(set(event_ids))
        if not ids:
            return []
        cut = utc_iso(before)
        removed: list[str] = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for start in range(0, len(ids), 500):
                    chunk = ids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    removed += [
                        r[0]
                        for r in self._db.execute(
                            f"DELETE FROM events WHERE event_id IN ({marks}) AND ts < ? RETURNING event_id",
                            (*chunk, cut),
                        ).fetchall()
                    ]
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return sorted(removed)

    @property
    def location(self) -> str:
        """Where the log is (for /readyz and reports)."""
        return str(self.path)

    def outcomes_frame(self) -> pd.DataFrame:
        """Distinct (request_id, item_id, event_type) of events tied to a request (canary input)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT request_id, item_id, event_type FROM events WHERE request_id IS NOT NULL"
            ).fetchall()
        return pd.DataFrame(rows, columns=OUTCOME_COLUMNS)

    def close(self) -> None:
        with self._lock:
            self._db.close()


REQUEST_COLUMNS = ["request_id", "user_id", "arm", "versions", "ts", "latency_ms", "status"]


def read_sqlite_log(path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The gateway log's ``requests`` table and its request-tied events (impressions, outcomes).

    Reads the SQLite file directly (query-only) rather than through ``SqliteEventLog``, which
    would create an empty log where none exists yet; only distinct (request, item, type)
    triples are fetched, since a repeated click on the same slot is one click.
    """
    path = Path(path)
    if not path.is_file():
        return _empty_requests(), pd.DataFrame(columns=OUTCOME_COLUMNS)
    con = sqlite3.connect(path, timeout=30)
    try:
        con.execute("PRAGMA query_only = 1")
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "requests" not in tables:
            return _empty_requests(), pd.DataFrame(columns=OUTCOME_COLUMNS)
        requests = pd.read_sql_query(
            f"SELECT {', '.join(REQUEST_COLUMNS)} FROM requests", con
        )
        events = pd.read_sql_query(
            "SELECT DISTINCT request_id, item_id, event_type FROM events WHERE request_id IS NOT NULL",
            con,
        ) if "events" in tables else pd.DataFrame(columns=OUTCOME_COLUMNS)
    finally:
        con.close()
    requests["versions"] = requests["versions"].map(lambda v: json.loads(v) if v else {})
    return requests, events


def _empty_requests() -> pd.DataFrame:
    return pd.DataFrame(columns=REQUEST_COLUMNS)
