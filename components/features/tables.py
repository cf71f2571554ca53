"""The feature tables: what was known about each user and item, and since when.

A recommender needs to know, for a user and an item, what was true *at the moment of a
request*: how active the user had been, what they had just clicked, how popular the item
was. Training must see exactly what serving saw at that moment, or the model learns from
the future (leakage) and disappoints online. So every feature value here is time-stamped
with the moment it became known:

- daily snapshots (``user_engagement``, ``item_popularity``): one row per known entity per
  UTC day, stamped at the last microsecond of the day and counted from events up to then;
- static rows (``user_profile``, ``item_attributes``): stamped at signup / publication;
- ``user_recent_items``: one row per event that changed the user's recent items or session,
  stamped with that event's time. The gateway pushes the same rows in real time
  (``recsys.online_features.push_event``); both go through ``next_recent_state``;
- ``events``: the validated events themselves, stamped with their time: the source of the
  feature repo's ``BatchFeatureView``s, whose transformations Feast runs (no builder here).

The computations are pure (frames in, frames out); ``build_feature_tables`` is the step that
writes them under ``<home>/features/<table>/``. The Feast store that serves them is
``components.features.store``; the point-in-time training frame read from it is
``components.features.training_data``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.config import FeaturesConfig
from recsys.faults import failpoint
from recsys.feature_schema import (
    ITEM_ATTRIBUTE_FEATURES,
    POSITIVE_EVENT_TYPES,
    RECENT_ITEM_FEATURES,
    USER_PROFILE_FEATURES,
    item_popularity_features,
    user_engagement_features,
)
from recsys.manifests import FeaturesBuildManifest, FeatureTableFiles, Interval
from recsys.online_features import ONE_US, TIMESTAMP, next_recent_state
from recsys.storage import code_version, read_table, write_manifest
from recsys.timeutil import to_utc

DAY = pd.Timedelta(days=1)

# Tables written one file per UTC day (an interval rewrites exactly its days) and tables
# written whole (one row per entity; rewriting them never depends on the interval).
DAILY_TABLES = ("user_engagement", "item_popularity", "user_recent_items", "events")
WHOLE_TABLES = ("user_profile", "item_attributes")
TABLES = (*WHOLE_TABLES, *DAILY_TABLES)


# The columns of the ``events`` table (``ts`` as ``event_timestamp``): what a transformation
# in the feature repo can read. The request and position of an impression are left out.
EVENT_SOURCE_COLUMNS = ("event_id", "user_id", "item_id", "event_type", "value", "ts", "session_id", "device")


class FeatureRepoError(RuntimeError):
    """The feature repo and the configuration (or the built tables) disagree."""


# --------------------------------------------------------------------------------------------
# Pure computations: frames in, frames out. Unit-tested on hand-made frames.
# --------------------------------------------------------------------------------------------


def snapshot_stamp(day: pd.Timestamp) -> pd.Timestamp:
    """The time a daily snapshot is stamped with: the last microsecond of its UTC day.

    The snapshot counts events up to and including this instant, so a reader that asks "what
    was known strictly before t" gets it exactly when the whole day lies before t.
    """
    return to_utc(day).floor("D") + DAY - ONE_US


def window_counts(
    keys: pd.Series,
    ts: pd.Series,
    indicators: Mapping[str, np.ndarray],
    known_since: pd.Series,
    days: Sequence[pd.Timestamp],
    windows_days: Sequence[int],
    carry_in: bool = False,
) -> pd.DataFrame:
    """Daily snapshots of per-entity event counts over trailing windows, as change rows.

    The value of entity E on day D, per metric m and window w, is the number of E's events
    with ``indicators[m]`` true in the w whole days ending with D, i.e. with ``ts`` in
    ``[D + 1 day - w days, D + 1 day)``, stamped at the last microsecond of D. Of ``days``,
    a row is written on the day an entity becomes known (``known_since``: zeros until it
    acts) and on days whose values differ from the day before: a day with one of E's
    events, or the day an event leaves a window (so a user who goes quiet reads 0, not their
    last busy day). Between two rows the values are constant, so Feast's point-in-time join
    and the online store's latest row read exactly the daily values, while a history of
    years stays a few rows per event instead of a dense day x entity grid. Which rows a day
    gets depends on that day alone, so rebuilding one day rewrites it to the same rows.
    ``carry_in`` adds a row on the first of ``days`` for every entity known by then: a
    complete snapshot of that day (one day's features computed on their own).

    Args:
        keys: entity id of each event.
        ts: UTC timestamp of each event (same index as ``keys``).
        indicators: metric name -> 0/1 (or weights) per event.
        known_since: entity id (index) -> when it became known (signup, publication).
        days: the UTC days to snapshot (any order; day starts or any time within the day).
        windows_days: trailing window lengths in days.

    Returns:
        Columns ``key``, ``event_timestamp`` and ``{metric}_{w}d`` (int64), sorted by stamp, key.
    """
    day_list = sorted({to_utc(d).floor("D") for d in days})
    metric_cols = [f"{m}_{w}d" for w in windows_days for m in indicators]
    empty = pd.DataFrame(columns=["key", TIMESTAMP, *metric_cols])
    if not day_list or len(known_since) == 0:
        return empty
    wanted = np.array([_epoch_day(d) for d in day_list], dtype=np.int64)
    entities = pd.Index(known_since.index)
    known_day = _known_days(known_since)
    ent = entities.get_indexer(keys)
    ok = ent >= 0
    event_day = np.asarray((pd.DatetimeIndex(pd.to_datetime(ts, utc=True)).floor("D") - _EPOCH).days)
    ent, event_day = ent[ok].astype(np.int64), event_day[ok].astype(np.int64)
    weights = {m: np.asarray(ind, dtype=np.int64)[ok] for m, ind in indicators.items()}

    ce, cd = _candidate_rows(ent, event_day, known_day, wanted, windows_days, carry_in)
    if len(ce) == 0:
        return empty
    counts = _CumulativeCounts.of(ent, event_day, weights, cd, max(windows_days))
    values = counts.windows(ce, cd, windows_days)
    # A candidate whose values equal the day before's is no change: dropped, except the day the
    # entity becomes known (and the carried-in first day).
    previous = counts.windows(ce, cd - 1, windows_days)
    changed = np.zeros(len(ce), dtype=bool)
    for c in metric_cols:
        changed |= previous[c] != values[c]
    anchor = cd == known_day[ce]
    if carry_in:
        anchor |= cd == wanted[0]
    keep = changed | anchor
    part: dict[str, Any] = {"key": entities[ce[keep]]}
    part[TIMESTAMP] = pd.to_datetime(cd[keep], unit="D", utc=True) + DAY - ONE_US
    for c in metric_cols:
        part[c] = values[c][keep].astype(np.int64)
    out = pd.DataFrame(part)
    out[TIMESTAMP] = pd.to_datetime(out[TIMESTAMP], utc=True).astype("datetime64[us, UTC]")
    return out[["key", TIMESTAMP, *metric_cols]].sort_values([TIMESTAMP, "key"], ignore_index=True)


_EPOCH = pd.Timestamp("1970-01-01", tz="UTC")


def _epoch_day(day: pd.Timestamp) -> int:
    return (day - _EPOCH).days


def _known_days(known_since: pd.Series) -> np.ndarray:
    """Per entity, the first day whose end-of-day stamp is at or after it became known.

    An entity with no ``known_since`` is never known: no rows, as with a future signup.
    """
    since = pd.DatetimeIndex(pd.to_datetime(known_since, utc=True))
    never = np.iinfo(np.int64).max // 4
    known_day = np.where(since.isna(), never, np.asarray((since.floor("D") - _EPOCH).days.fillna(0)))
    return known_day.astype(np.int64)


def _candidate_rows(
    ent: np.ndarray,
    event_day: np.ndarray,
    known_day: np.ndarray,
    wanted: np.ndarray,
    windows_days: Sequence[int],
    carry_in: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (entity, day) rows whose values may have changed, of the ``wanted`` days.

    The day each entity becomes known, each event's day, and the day each event leaves each
    window (plus the first wanted day for every entity with ``carry_in``); only once the
    entity is known.
    """
    everyone = np.arange(len(known_day))
    cand_ent = [everyone]
    cand_day = [known_day]
    if carry_in:
        cand_ent.append(everyone)
        cand_day.append(np.maximum(known_day, wanted[0]))
    for shift in (0, *windows_days):
        cand_ent.append(ent)
        cand_day.append(event_day + shift)
    ce, cd = np.concatenate(cand_ent), np.concatenate(cand_day)
    keep = np.isin(cd, wanted) & (cd >= known_day[ce])
    pairs = np.unique(np.stack([ce[keep], cd[keep]], axis=1), axis=0)
    return pairs[:, 0], pairs[:, 1]


@dataclass(frozen=True)
class _CumulativeCounts:
    """Cumulative counts over events sorted by (entity, day): a trailing window is two look-ups.

    Days are relative to a base before every day looked up, so (entity, day) packs into one
    sortable integer.
    """

    sorted_key: np.ndarray
    cum: dict[str, np.ndarray]  # metric -> [0, running totals...] in ``sorted_key`` order
    base: int
    span: int

    @classmethod
    def of(
        cls,
        ent: np.ndarray,
        event_day: np.ndarray,
        weights: Mapping[str, np.ndarray],
        days: np.ndarray,
        longest_window: int,
    ) -> _CumulativeCounts:
        base = int(min(days.min(), event_day.min(initial=days.min()))) - longest_window - 1
        span = int(max(days.max(), event_day.max(initial=days.max()))) - base + 1
        order = np.lexsort((event_day, ent))
        sorted_key = ent[order] * span + (event_day[order] - base)
        cum = {m: np.concatenate([[0], np.cumsum(w[order])]) for m, w in weights.items()}
        return cls(sorted_key, cum, base, span)

    def _upto(self, ent: np.ndarray, day: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.sorted_key, ent * self.span + (day - self.base), side="right")

    def windows(self, ent: np.ndarray, day: np.ndarray, windows_days: Sequence[int]) -> dict[str, np.ndarray]:
        """``{metric}_{w}d`` of each (entity, day): the counts of the w days ending with ``day``."""
        end = self._upto(ent, day)
        out: dict[str, np.ndarray] = {}
        for w in windows_days:
            start = self._upto(ent, day - w)
            for m, cum in self.cum.items():
                out[f"{m}_{w}d"] = cum[end] - cum[start]
        return out


def user_engagement_table(
    events: pd.DataFrame, users: pd.DataFrame, days: Sequence[pd.Timestamp], windows_days: Sequence[int],
    carry_in: bool = False,
) -> pd.DataFrame:
    """Daily ``user_engagement`` rows: all events, positive events and purchases per window."""
    et = events["event_type"].astype(str)
    counts = window_counts(
        events["user_id"],
        events["ts"],
        {
            "events": np.ones(len(events), dtype=np.int64),
            "positives": et.isin(POSITIVE_EVENT_TYPES).to_numpy(),
            "purchases": (et == "purchase").to_numpy(),
        },
        users.set_index("user_id")["signup_ts"],
        days,
        windows_days,
        carry_in,
    )
    out = counts.rename(columns={"key": "user_id"})
    out = out.rename(columns={c: f"user_{c}" for c in out.columns if c not in ("user_id", TIMESTAMP)})
    return out[["user_id", TIMESTAMP, *user_engagement_features(list(windows_days))]]


def item_popularity_table(
    events: pd.DataFrame, items: pd.DataFrame, days: Sequence[pd.Timestamp], windows_days: Sequence[int],
    carry_in: bool = False,
) -> pd.DataFrame:
    """Daily ``item_popularity`` rows: impressions, positives and click-through per window.

    ``item_ctr_{w}d`` is clicks / impressions in the window (0.0 without impressions): the
    chance that showing the item gets a click, which a ranker weighs against its own score.
    """
    et = events["event_type"].astype(str)
    counts = window_counts(
        events["item_id"],
        events["ts"],
        {
            "impressions": (et == "impression").to_numpy(),
            "positives": et.isin(POSITIVE_EVENT_TYPES).to_numpy(),
            "clicks": (et == "click").to_numpy(),
        },
        items.set_index("item_id")["published_ts"],
        days,
        windows_days,
        carry_in,
    )
    out = counts.rename(columns={"key": "item_id"})
    for w in windows_days:
        imp, clicks = out[f"impressions_{w}d"], out.pop(f"clicks_{w}d")
        out[f"ctr_{w}d"] = np.where(imp > 0, clicks / imp.clip(lower=1), 0.0).astype(np.float32)
    out = out.rename(columns={c: f"item_{c}" for c in out.columns if c not in ("item_id", TIMESTAMP)})
    return out[["item_id", TIMESTAMP, *item_popularity_features(list(windows_days))]]


def user_profile_table(users: pd.DataFrame) -> pd.DataFrame:
    """``user_profile`` rows: one per user, known from signup on."""
    out = users[["user_id", *USER_PROFILE_FEATURES]].copy()
    for c in USER_PROFILE_FEATURES:
        out[c] = out[c].fillna("").astype(str)
    out[TIMESTAMP] = users["signup_ts"]
    return out.sort_values([TIMESTAMP, "user_id"], ignore_index=True)


def item_attributes_table(items: pd.DataFrame) -> pd.DataFrame:
    """``item_attributes`` rows: one per item, known from publication on."""
    out = items[["item_id", *ITEM_ATTRIBUTE_FEATURES]].copy()
    for c in ITEM_ATTRIBUTE_FEATURES:
        out[c] = out[c].astype(bool) if c == "in_stock" else out[c].fillna("").astype(str)
    out[TIMESTAMP] = items["published_ts"]
    return out.sort_values([TIMESTAMP, "item_id"], ignore_index=True)


def recent_items_table(
    events: pd.DataFrame,
    max_items: int,
    start: pd.Timestamp | None = None,
    end: pd.Timestamp | None = None,
) -> pd.DataFrame:
    """``user_recent_items`` rows: the state after each event in ``[start, end)`` that changed it.

    ``recent_item_times`` holds, aligned with ``recent_items``, the epoch seconds of the event
    that put each item there (``next_recent_state``).

    ``events`` must hold each user's whole history before ``end`` (the state carries over
    from earlier days). Events of a user are replayed in (ts, event_id) order; of several
    events at the same instant only the state after the last is kept, since nothing can
    read between them. An event that changes nothing (an impression in the same session)
    writes no row: a point-in-time reader gets the same answer from the previous row.
    """
    cols = ["user_id", TIMESTAMP, *RECENT_ITEM_FEATURES]
    if events.empty:
        return pd.DataFrame(columns=cols)
    ev = events.sort_values(["user_id", "ts", "event_id"], kind="stable")
    if end is not None:
        ev = ev[ev["ts"] < end]
    rows: list[tuple] = []
    current_user, state = None, None
    for user_id, item_id, event_type, ts, session_id in zip(
        ev["user_id"].astype(str),
        ev["item_id"].astype(str),
        ev["event_type"].astype(str),
        ev["ts"],
        ev["session_id"].astype(str),
        strict=True,
    ):
        if user_id != current_user:
            current_user, state = user_id, None
        event = {"item_id": item_id, "event_type": event_type, "session_id": session_id, "ts": ts}
        new = next_recent_state(state, event, max_items)
        if new != state and (start is None or ts >= start):
            if rows and rows[-1][0] == user_id and rows[-1][1] == ts:
                rows.pop()  # same user, same instant: keep only the state after the last one
            rows.append((user_id, ts, *(new[f] for f in RECENT_ITEM_FEATURES)))
        state = new
    out = pd.DataFrame(rows, columns=cols)
    out[TIMESTAMP] = pd.to_datetime(out[TIMESTAMP], utc=True).astype("datetime64[us, UTC]")
    return out.sort_values([TIMESTAMP, "user_id"], kind="stable", ignore_index=True)


# --------------------------------------------------------------------------------------------
# Step: build the feature tables
# --------------------------------------------------------------------------------------------


def build_feature_tables(
    config: FeaturesConfig,
    validated_dir: Path,
    out_dir: Path,
    start: datetime | None = None,
    end: datetime | None = None,
) -> dict[str, Any]:
    """Compute the feature tables for the UTC days in ``[start, end)`` from validated data.

    Daily tables get one file per day (``<table>/day=YYYY-MM-DD.parquet``), replaced when the
    day is rebuilt; the per-entity tables (profile, attributes) are rewritten whole from the
    validated users and items. Running the same interval twice writes identical files, and a
    backfill of an old interval leaves later days alone.

    Args:
        config: windows and the recent-items length.
        validated_dir: output of validation (``users/``, ``items/``, ``events/``).
        out_dir: the feature tables folder (``features_dir(settings)`` for the store to see it).
        start: first day (default: the first event's day). Rounded down to a UTC day.
        end: day after the last (default: the day after the last event). Rounded up.

    Returns:
        The manifest (also written to ``out_dir/manifest.json``): interval, rows and files.
    """
    validated_dir, out_dir = Path(validated_dir), Path(out_dir)
    users = read_table(validated_dir, "users")
    items = read_table(validated_dir, "items")
    start_day, end_day = _day_interval(validated_dir, start, end)
    days = list(pd.date_range(start_day, end_day - DAY, freq="D"))
    windows = list(config.windows_days)
    # Windows reach back max(windows) days; recent items need the whole history.
    events = pd.read_parquet(validated_dir / "events", filters=[("ts", "<", end_day.to_pydatetime())])
    window_events = events[events["ts"] >= start_day - max(windows) * DAY]
    tables = {
        "user_profile": user_profile_table(users),
        "item_attributes": item_attributes_table(items),
        "user_engagement": user_engagement_table(window_events, users, days, windows),
        "item_popularity": item_popularity_table(window_events, items, days, windows),
        "user_recent_items": recent_items_table(events, config.recent_items, start_day, end_day),
        "events": events_table(events[events["ts"] >= start_day]),
    }
    manifest = FeaturesBuildManifest(
        path=str(out_dir),
        validated=str(validated_dir),
        interval=Interval(start=start_day.isoformat(), end=end_day.isoformat()),
        windows_days=windows,
        recent_items=config.recent_items,
        tables=_write_tables(tables, out_dir, days),
        code_version=code_version(),
    )
    write_manifest(out_dir, manifest)
    return manifest.model_dump()


def events_table(events: pd.DataFrame) -> pd.DataFrame:
    """The events as the feature repo's ``events`` source reads them: ``ts`` is ``event_timestamp``."""
    out = events[[c for c in EVENT_SOURCE_COLUMNS if c in events.columns]].rename(columns={"ts": TIMESTAMP})
    return out.sort_values([TIMESTAMP, "event_id"], ignore_index=True)


def _day_interval(
    validated_dir: Path, start: datetime | None, end: datetime | None
) -> tuple[pd.Timestamp, pd.Timestamp]:
    """``[start, end)`` widened to whole UTC days; a side not given is the events' first or last day."""
    if start is None or end is None:
        ts = read_table(validated_dir, "events", columns=["ts"])["ts"]
        if ts.empty:
            raise FeatureRepoError(f"no events in {validated_dir}: pass --start and --end")
        start = ts.min() if start is None else start
        end = ts.max() + ONE_US if end is None else end
    start_day = to_utc(start).floor("D")
    end_day = to_utc(end).ceil("D")
    if end_day <= start_day:
        raise FeatureRepoError(f"empty interval [{start_day}, {end_day})")
    return start_day, end_day


def _write_tables(
    tables: Mapping[str, pd.DataFrame], out_dir: Path, days: Sequence[pd.Timestamp]
) -> dict[str, FeatureTableFiles]:
    """Whole tables as one file; daily tables one file per day of ``days``, other days untouched."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, FeatureTableFiles] = {}
    for name, df in tables.items():
        if written:
            failpoint("build_features.midway")  # some tables rewritten, others not yet
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        if name in WHOLE_TABLES:
            _write_parquet(df, folder / "part-0.parquet")
            written[name] = FeatureTableFiles(rows=len(df), files=["part-0.parquet"])
            continue
        files = []
        day_of_row = df[TIMESTAMP].dt.floor("D")
        for day in days:
            path = folder / f"day={day:%Y-%m-%d}.parquet"
            part = df[day_of_row == day]
            if part.empty:
                path.unlink(missing_ok=True)  # a rebuilt day with nothing in it has no file
                continue
            _write_parquet(part.reset_index(drop=True), path)
            files.append(path.name)
        written[name] = FeatureTableFiles(rows=len(df), files=files)
    return written


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    table = pa.Table.from_pandas(df, preserve_index=False)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)  # readers (Feast, a concurrent materialization) never see half a file
