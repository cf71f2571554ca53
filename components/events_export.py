"""The event log into the data lake, one Parquet file per UTC day, then out of the log.

``export_events`` reads the configured event log (SQLite or Redis Streams, through the
kernel's ``EventLog``) and writes each UTC day of events to
``<home>/lake/events/date=YYYY-MM-DD/part-0.parquet``: the events contract's columns plus
the serving context that training needs:

- ``arm`` and ``model_versions`` (JSON text, keys sorted) of the request that served it,
- ``position`` (0-based rank in the answer), ``candidate_source`` and ``score`` (what the
  served ranking scored it; drift monitoring's reference) of the impression.

An impression carries its context in its logged body; an outcome (a click tied to a
``request_id``) takes the arm and versions from the served-request record and the position
from the impression of the same request and item, in the log or in the lake's file of the
day before.

A day's file is the union of what it already held and what the log holds for that day,
one row per ``event_id`` (the lake's row wins), sorted by time then id, so a re-run writes
the same bytes, and an unchanged day is not rewritten at all. It is written to a hidden
temporary file, fsynced, renamed, its folder fsynced, then read back and its event ids
compared with the rows meant; only then is ``_manifest.json`` written (the day's record:
rows, path, whether the log was trimmed), and only then may the day leave the log.

Retention: a closed day (before today, UTC) older than ``event_export.keep_days`` whose
file is durable is trimmed from the log, naming exactly the event ids that the file was
verified to hold (``EventLog.trim_events``): an event logged after the read stays for the
next export. Today is never trimmed. Served-request records stay in the log (the canary
analysis reads them).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.config import Settings
from recsys.contracts import EVENTS, conform
from recsys.event_log import open_event_log
from recsys.event_log.base import EventLog
from recsys.layout import lake_events_day_dir, lake_events_dir
from recsys.storage import fsync_path
from recsys.timeutil import to_utc, utc_now

DATA_FILE = "part-0.parquet"
DAY_MANIFEST = "_manifest.json"  # "_": Parquet dataset readers skip it
CONTEXT_COLUMNS = ["arm", "model_versions", "position", "candidate_source", "score"]
COLUMNS = [*EVENTS.names, *(c for c in CONTEXT_COLUMNS if c not in EVENTS.names)]


def parse_day(value: str | date, option: str = "day") -> date:
    """A UTC day from ``YYYY-MM-DD``; a bad one raises ValueError naming the option and value."""
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(value)
    except (TypeError, ValueError):
        raise ValueError(f"{option}: {value!r} is not a day (YYYY-MM-DD)") from None


def day_bounds(day: date) -> tuple[datetime, datetime]:
    """``[00:00, next 00:00)`` of a UTC day."""
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return start, start + timedelta(days=1)


def export_events(
    settings: Settings,
    day: str | date | None = None,
    through: str | date | None = None,
    trim: bool | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Export the event log's days into the lake, then trim the exported closed days from it.

    Args:
        settings: the configuration (``gateway`` picks the log; ``event_export`` the retention).
        day: export this UTC day only.
        through: export every day in the log up to and including this one. Neither: through
            yesterday (every closed day).
        trim: trim exported days from the log; None: ``event_export.trim``.
        now: the current instant (tests); days from its UTC date on are open, never trimmed.

    Returns:
        The export's manifest: ``lake``, ``log``, ``days`` (per day: rows, new rows, path,
        written, trimmed) and ``trimmed`` (events removed from the log).
    """
    if day is not None and through is not None:
        raise ValueError("day and through: give one or neither")
    now = now or utc_now()
    today = now.astimezone(UTC).date()
    trim = settings.event_export.trim if trim is None else trim
    wanted_day = parse_day(day, "day") if day is not None else None
    last = parse_day(through, "through") if through is not None else today - timedelta(days=1)
    lake = lake_events_dir(settings)
    manifest: dict[str, Any] = {
        "lake": str(lake),
        "log": None,
        "through": (wanted_day or last).isoformat(),
        "days": {},
        "trimmed": 0,
    }
    log = _open_log(settings)
    if log is None:
        return manifest
    try:
        manifest["log"] = log.location
        if wanted_day is not None:
            days = [d for d in log.event_days() if d == wanted_day.isoformat()]
        else:
            days = [d for d in log.event_days() if d <= last.isoformat()]
        # One read over the span (a Redis log is scanned whole per read), split by UTC day.
        rows_by_day: dict[str, list[dict[str, Any]]] = {d: [] for d in days}
        if days:
            span = day_bounds(date.fromisoformat(days[0]))[0], day_bounds(date.fromisoformat(days[-1]))[1]
            for r in log.events_between(*span):
                if r["ts"][:10] in rows_by_day:
                    rows_by_day[r["ts"][:10]].append(r)
        requests = _request_context(log)
        shown = _impression_context(r for rows in rows_by_day.values() for r in rows)
        # Outcomes whose impression left the log already: the lake's previous days.
        for d in days:
            prev = (date.fromisoformat(d) - timedelta(days=1)).isoformat()
            if prev not in rows_by_day:
                shown = {**_lake_impressions(settings, prev), **shown}
        held: dict[str, list[str]] = {}
        for d in days:
            record, ids = _export_day(settings, d, rows_by_day[d], requests, shown)
            manifest["days"][d] = record
            held[d] = ids
        keep_from = today - timedelta(days=settings.event_export.keep_days)
        trimmable = [d for d in days if date.fromisoformat(d) < keep_from] if trim else []
        if trimmable:
            removed = set(
                log.trim_events(
                    {i for d in trimmable for i in held[d]},
                    day_bounds(date.fromisoformat(max(trimmable)))[1],
                )
            )
            manifest["trimmed"] = len(removed)
            for d in trimmable:
                n = sum(1 for i in held[d] if i in removed)
                record = manifest["days"][d]
                record["trimmed"] = n
                _write_day_manifest(
                    lake_events_day_dir(settings, d),
                    {**_day_fields(record), "trimmed": True},
                )
        for d in days:
            manifest["days"][d].setdefault("trimmed", 0)
    finally:
        log.close()
    return manifest


def read_lake_events(settings: Settings, before: datetime | None = None) -> pd.DataFrame:
    """The exported served traffic: every lake day's events (the events contract's columns,
    ``position`` included) with ``ts`` before ``before`` (all: None), sorted by time then id."""
    parts = [
        pd.read_parquet(path, columns=EVENTS.names)
        for path in sorted(lake_events_dir(settings).glob(f"date=*/{DATA_FILE}"))
        if (path.parent / DAY_MANIFEST).is_file()  # a day whose export finished
    ]
    if not parts:
        return conform(pd.DataFrame(columns=EVENTS.names), EVENTS)
    events = conform(pd.concat(parts, ignore_index=True), EVENTS)
    if before is not None:
        events = events[events["ts"] < to_utc(before)]
    return events.sort_values(["ts", "event_id"], kind="stable", ignore_index=True)


def read_lake_scores(settings: Settings) -> pd.Series:
    """event_id -> the score the served ranking gave, for the lake's impressions that have one."""
    parts = []
    for path in sorted(lake_events_dir(settings).glob(f"date=*/{DATA_FILE}")):
        df = pd.read_parquet(path)
        if "score" in df:
            parts.append(df.loc[df["score"].notna(), ["event_id", "score"]])
    if not parts:
        return pd.Series(dtype="float64")
    scored = pd.concat(parts, ignore_index=True)
    return pd.Series(scored["score"].to_numpy(dtype="float64"), index=scored["event_id"].astype(str))


def _open_log(settings: Settings) -> EventLog | None:
    """The configured log, opened to read and trim; None where a SQLite log was never created."""
    if settings.gateway.event_log_backend == "sqlite" and not settings.event_log_path.is_file():
        return None
    # It acknowledges no event, so a Redis without per-write fsync is not refused.
    return open_event_log(settings, reader=True)


def _request_context(log: EventLog) -> dict[str, tuple[str, str]]:
    """request_id -> (arm, model_versions as JSON text) from the log's served-request records."""
    frame = log.requests_frame()
    return {
        str(rid): (str(arm), _versions_text(versions))
        for rid, arm, versions in zip(frame["request_id"], frame["arm"], frame["versions"], strict=True)
    }


def _versions_text(versions: Any) -> str:
    if isinstance(versions, str):
        versions = json.loads(versions) if versions else {}
    return json.dumps(versions or {}, sort_keys=True)


def _impression_context(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """(request_id, item_id) -> the serving context an impression logged with it."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        if r.get("event_type") == "impression" and r.get("request_id"):
            out.setdefault((r["request_id"], r["item_id"]), _own_context(r))
    return out


def _own_context(r: dict[str, Any]) -> dict[str, Any]:
    """The context an event's logged body carries (the gateway's impressions carry all four)."""
    versions = r.get("model_versions")
    return {
        "arm": r.get("arm"),
        "model_versions": None if versions is None else _versions_text(versions),
        "position": r.get("position"),
        "candidate_source": r.get("candidate_source"),
        "score": r.get("score"),
    }


def _lake_impressions(settings: Settings, day: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The impressions' context in one exported day's file (empty where there is none)."""
    path = lake_events_day_dir(settings, day) / DATA_FILE
    if not path.is_file():
        return {}
    df = lake_frame(pd.read_parquet(path))  # a file written before a context column existed has it null
    df = df[(df["event_type"] == "impression") & df["request_id"].notna()]
    return {
        (r["request_id"], r["item_id"]): {c: _scalar(r[c]) for c in CONTEXT_COLUMNS}
        for r in df.to_dict("records")
    }


def _scalar(v: Any) -> Any:
    return None if v is pd.NA or v is None or (isinstance(v, float) and pd.isna(v)) else v


def _with_context(
    rows: list[dict[str, Any]],
    requests: dict[str, tuple[str, str]],
    shown: dict[tuple[str, str], dict[str, Any]],
) -> pd.DataFrame:
    """The day's rows as a lake frame: contract columns plus the serving context."""
    out = []
    for r in rows:
        ctx = _own_context(r)
        rid = r.get("request_id")
        if rid:
            impression = shown.get((rid, r["item_id"]), {})
            arm, versions = requests.get(rid, (None, None))
            for c, fallback in (
                ("arm", impression.get("arm") or arm),
                ("model_versions", impression.get("model_versions") or versions),
                ("position", impression.get("position")),
                ("candidate_source", impression.get("candidate_source")),
            ):
                if ctx[c] is None:
                    ctx[c] = fallback
        out.append({**{c: r.get(c) for c in EVENTS.names}, **ctx})
    df = pd.DataFrame(out, columns=COLUMNS)
    # The log's ts is UTC ISO 8601 text, with or without fractional seconds.
    df["ts"] = pd.to_datetime(df["ts"], utc=True, format="ISO8601")
    return lake_frame(df)


def lake_frame(df: pd.DataFrame) -> pd.DataFrame:
    """The lake's columns and dtypes, rows sorted by time then event_id."""
    out = conform(df, EVENTS)
    for c in ("arm", "model_versions", "candidate_source"):
        out[c] = df[c].astype("string") if c in df else pd.Series(pd.NA, index=df.index, dtype="string")
    position = df["position"] if "position" in df else pd.Series(None, index=df.index)
    out["position"] = pd.to_numeric(position).astype("Int64")
    score = df["score"] if "score" in df else pd.Series(None, index=df.index)
    out["score"] = pd.to_numeric(score).astype("float64")
    out = out.sort_values(["ts", "event_id"], kind="stable").reset_index(drop=True)
    return out[COLUMNS]


def _export_day(
    settings: Settings,
    day: str,
    rows: list[dict[str, Any]],
    requests: dict[str, tuple[str, str]],
    shown: dict[tuple[str, str], dict[str, Any]],
) -> tuple[dict[str, Any], list[str]]:
    """Merge one day's logged rows into its lake file; (the day's record, the log ids it holds)."""
    folder = lake_events_day_dir(settings, day)
    path = folder / DATA_FILE
    logged = _with_context(rows, requests, shown).drop_duplicates("event_id", keep="first")
    before = lake_frame(pd.read_parquet(path)) if path.is_file() else lake_frame(logged.iloc[0:0])
    new = logged[~logged["event_id"].isin(set(before["event_id"]))]
    merged = lake_frame(pd.concat([before, new], ignore_index=True)) if len(new) else before
    written = len(new) > 0 or not path.is_file()
    if written:
        folder.mkdir(parents=True, exist_ok=True)
        _write_durably(merged, path)
    # Read back what is on disk: only ids the file holds may leave the log.
    on_disk = pq.read_table(path, columns=["event_id"]).column("event_id").to_pylist()
    if len(on_disk) != len(set(on_disk)) or set(on_disk) != set(merged["event_id"]):
        raise RuntimeError(f"{path}: read back {len(on_disk)} event ids, expected {len(merged)}")
    held = set(on_disk)
    record = {
        "day": day,
        "path": str(path),
        "rows": len(on_disk),
        "from_log": len(logged),
        "new": len(new),
        "written": written,
        "sha256": _sha256(path),
    }
    previous = _read_day_manifest(folder)
    _write_day_manifest(folder, {**_day_fields(record), "trimmed": bool(previous.get("trimmed"))})
    return record, [i for i in logged["event_id"] if i in held]


def _day_fields(record: dict[str, Any]) -> dict[str, Any]:
    """What a day's ``_manifest.json`` keeps (no run-dependent numbers, so a re-run leaves it)."""
    return {k: record[k] for k in ("day", "path", "rows", "sha256")}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_durably(df: pd.DataFrame, path: Path) -> None:
    """Temporary file (hidden from dataset readers), fsync, rename, fsync of the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp, compression="zstd")
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def _read_day_manifest(folder: Path) -> dict[str, Any]:
    path = folder / DAY_MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def _write_day_manifest(folder: Path, content: dict[str, Any]) -> None:
    """Atomic and durable; left alone when it would not change (a re-run touches nothing)."""
    path = folder / DAY_MANIFEST
    if _read_day_manifest(folder) == content:
        return
    text = json.dumps(content, indent=2, sort_keys=True) + "\n"
    tmp = folder / f".{DAY_MANIFEST}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(folder)


def exported_days(settings: Settings) -> dict[str, dict[str, Any]]:
    """The lake's exported days and their records (``_manifest.json``), by day."""
    lake = lake_events_dir(settings)
    out = {}
    for folder in sorted(lake.glob("date=*")):
        record = _read_day_manifest(folder)
        if record:
            out[folder.name.removeprefix("date=")] = record
    return out
