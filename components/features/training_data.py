"""Training data: one row per event, each feature as it was known strictly before the event.

``build_training_data`` joins, for each event, the latest feature row stamped *strictly
before* the event (Feast's point-in-time join is inclusive, so the join asks for the event's
time minus one microsecond). The event never contributes to its own features.

A ``BatchFeatureView`` of the repo has no table to join: Feast's offline stores join the
view's ``sink_source`` (which a materialization fills with each entity's latest row only)
and the local compute engine's retrieval ignores the entity rows' times, so the view's own
registered transformation is run here on its source rows, and its output joined the same
way (latest row at or before the time, within the view's ttl).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from components.features.tables import FeatureRepoError
from recsys.config import Settings
from recsys.feature_schema import RANKER_SERVICE, RETRIEVER_SERVICE
from recsys.item_ages import frame_ages
from recsys.online_features import (
    ONE_US,
    TIMESTAMP,
    feature_defaults,
    get_store,
    service_features,
    start_offline_engine,
)
from recsys.storage import read_table
from recsys.timeutil import to_utc

if TYPE_CHECKING:  # Feast costs seconds to import; only the functions that need it do.
    from feast import FeatureStore

EVENT_COLUMNS = (
    "event_id",
    "user_id",
    "item_id",
    "event_type",
    "value",
    "ts",
    "session_id",
    "device",
    "request_id",
    "position",
)


def build_training_data(
    settings: Settings,
    validated_dir: Path | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    event_types: Sequence[str] | None = None,
    services: Sequence[str] = (RETRIEVER_SERVICE, RANKER_SERVICE),
    store: FeatureStore | None = None,
    skip_views: Sequence[str] = (),
) -> pd.DataFrame:
    """One training row per event, with each feature as it was known strictly before the event.

    Columns: the event's own (``EVENT_COLUMNS``), context ``hour`` (0-23, UTC) and ``device``,
    then every feature of ``services`` (default: the retriever's and the ranker's, so both
    models train from one frame) under its schema name. The join is Feast's point-in-time
    ``get_historical_features`` at ``ts - 1 µs``: Feast takes rows stamped at or before the
    entity time, so this asks for rows stamped strictly before the event. It runs on the
    offline store of ``features.offline_store`` (DuckDB, file or Spark); all give the same frame.

    ``session_id`` is the event's session. The stored session (a feature of the same name) is
    only used to keep ``session_items`` when it is the event's session; items of an older
    session become "" (the gateway does the same with the request's session).

    Missing values are filled by ``feature_defaults`` (counts 0, rates 0.0, text "", False).
    Where ``recent_items`` is joined, ``recent_item_ages`` is added: the seconds from each of
    those items' ``recent_item_times`` to the event (``recsys.item_ages``), the query tower's
    input as the gateway computes it at the request's time.

    Args:
        settings: the store (registry, tables) under ``settings.home``.
        validated_dir: events to join (default ``settings.validated_dir``).
        start, end: keep events with ``start <= ts < end``.
        event_types: keep only these event types (e.g. positives and impressions).
        services: the feature services whose features to join.
        store: an open store to reuse (default: ``get_store(settings)``).
        skip_views: feature views of those services not to join (their columns are absent):
            views the models will not read, whose point-in-time join would only cost time.

    Returns:
        The frame, sorted by ``ts`` then ``event_id``.
    """
    start_offline_engine(settings)
    store = store or get_store(settings)
    events = _read_events(Path(validated_dir or settings.validated_dir), start, end, event_types)
    refs = [r for r in service_features(store, services) if r.split(":", 1)[0] not in set(skip_views)]
    _check_sources_fit_the_store(store, settings, {r.split(":", 1)[0] for r in refs})
    feats = _features_before(store, events, refs).rename(columns={"session_id": "_stored_session"})
    events = events.assign(event_id=events["event_id"].astype(str))
    out = events.merge(feats, on="event_id", how="left", validate="one_to_one")
    out.insert(out.columns.get_loc("ts") + 1, "hour", out["ts"].dt.hour.astype(np.int64))
    out = _fill_defaults(out, feature_defaults(store, refs))
    if "session_items" in out.columns:
        same = out["_stored_session"] == out["session_id"].astype(str)
        out["session_items"] = out["session_items"].where(same, "")
    if "recent_items" in out.columns:
        # The query's own input: the seconds from each recent item's time to the event's.
        times = out["recent_item_times"] if "recent_item_times" in out.columns else pd.Series("", out.index)
        out["recent_item_ages"] = frame_ages(out["recent_items"], times, out["ts"])
    out = out.drop(columns=["_stored_session"], errors="ignore")
    return out.sort_values(["ts", "event_id"], kind="stable", ignore_index=True)


def write_training_data(
    settings: Settings,
    out_dir: Path,
    interval_days: int,
    validated_dir: Path | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
    skip_views: Sequence[str] = (),
    progress: Callable[[int, int, int], None] | None = None,
) -> dict[str, Any]:
    """``build_training_data``'s frame written interval by interval: one Parquet part each.

    A row's features depend on its own event only, so the parts, read in order, are the frame
    of one whole join (tested), while the rows held at once are an interval's: at ten million
    events the whole frame (46 columns, most of them strings) does not fit in memory, its
    intervals do. Parts are named by their order and the folder's earlier parts are removed
    first, so a re-run for the same span writes the same files.

    Args:
        settings, validated_dir, start, end, skip_views: as ``build_training_data``.
        out_dir: the folder of the parts (``part-00000.parquet``, ...).
        interval_days: days of events per part (UTC, from the first event's day).
        progress: called after each interval with (intervals done, intervals, rows so far).

    Returns:
        ``{"path", "parts", "rows", "columns", "interval_days"}``.
    """
    if interval_days < 1:
        raise ValueError(f"interval_days must be >= 1, got {interval_days}")
    validated = Path(validated_dir or settings.validated_dir)
    bounds = _day_intervals(validated, interval_days, start, end)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*.parquet"):
        old.unlink()
    start_offline_engine(settings)
    store = get_store(settings)
    parts, rows, columns = 0, 0, []
    for n, (lo, hi) in enumerate(bounds, start=1):
        frame = build_training_data(settings, validated, start=lo, end=hi, store=store, skip_views=skip_views)
        if len(frame):
            frame.to_parquet(out_dir / f"part-{parts:05d}.parquet", index=False)
            parts, rows, columns = parts + 1, rows + len(frame), list(frame.columns)
        del frame
        if progress is not None:
            progress(n, len(bounds), rows)
    return {
        "path": str(out_dir),
        "parts": parts,
        "rows": rows,
        "columns": columns,
        "interval_days": interval_days,
    }


def _day_intervals(
    validated_dir: Path, days: int, start: datetime | None, end: datetime | None
) -> list[tuple[pd.Timestamp, pd.Timestamp]]:
    """``[lo, hi)`` spans of ``days`` UTC days covering the events' times within [start, end)."""
    ts = read_table(validated_dir, "events", columns=["ts"])["ts"]
    if ts.empty:
        return []
    first, last = to_utc(ts.min()), to_utc(ts.max())
    lo = max(first, to_utc(start)) if start is not None else first
    hi = min(last + ONE_US, to_utc(end)) if end is not None else last + ONE_US
    step, edge, bounds = pd.Timedelta(days=days), lo.floor("D"), []
    while edge < hi:
        bounds.append((max(edge, lo), min(edge + step, hi)))
        edge += step
    return bounds


def _check_sources_fit_the_store(store: FeatureStore, settings: Settings, views: set[str]) -> None:
    """Refuse, with the fix, a registry applied for another engine than ``features.offline_store``.

    Feast's Spark store reads only SparkSources and the embedded stores only FileSources;
    ``recsys features apply`` registers the kind the configured store reads.
    """
    spark = settings.features.offline_store == "spark"
    for view in sorted(views):
        source = store.get_feature_view(view).batch_source
        if (type(source).__name__ == "SparkSource") != spark:
            raise FeatureRepoError(
                f"feature view {view} is registered with a {type(source).__name__}, which "
                f"features.offline_store={settings.features.offline_store!r} does not read: "
                "run `recsys features apply` with this configuration first"
            )


def _read_events(
    validated_dir: Path, start: datetime | None, end: datetime | None, event_types: Sequence[str] | None
) -> pd.DataFrame:
    """The validated events with ``start <= ts < end`` of ``event_types``, ``EVENT_COLUMNS`` only."""
    filters = []
    if start is not None:
        filters.append(("ts", ">=", to_utc(start).to_pydatetime()))
    if end is not None:
        filters.append(("ts", "<", to_utc(end).to_pydatetime()))
    events = pd.read_parquet(validated_dir / "events", filters=filters or None)
    if "position" not in events.columns:  # validated before the contract had it
        events["position"] = pd.Series(np.nan, index=events.index, dtype="float64")
    if event_types is not None:
        events = events[events["event_type"].isin(list(event_types))]
    return events[list(EVENT_COLUMNS)].reset_index(drop=True)


def _features_before(store: FeatureStore, events: pd.DataFrame, refs: Sequence[str]) -> pd.DataFrame:
    """Per ``event_id``, the features ``refs`` (``view:name``) as of one microsecond before the event.

    One point-in-time query per feature view, over the distinct (key, time) pairs, merged
    back here, on the offline store of ``features.offline_store``. DuckDB (the default) runs
    each query as one SQL join; the file store (Dask) drops an entity row outright when its
    key has rows but all after the entity time (instead of returning nulls), which in one
    combined query would also lose the other views' values, and it collapses rows that
    share key and time (feast-dev/feast#6787). Per view and de-duplicated, both are
    harmless: a missing row means "nothing known yet" and gets the default later, the same
    on both stores (``_fill_defaults``: NaN and None alike, one type per column).
    """
    base = pd.DataFrame(
        {
            "event_id": events["event_id"].astype(str),
            "user_id": events["user_id"].astype(str),
            "item_id": events["item_id"].astype(str),
            TIMESTAMP: (events["ts"] - ONE_US).astype("datetime64[ns, UTC]"),
        }
    )
    by_view: dict[str, list[str]] = {}
    for ref in refs:
        view, name = ref.split(":", 1)
        by_view.setdefault(view, []).append(name)
    feats = base[["event_id"]].copy()
    for view, view_names in by_view.items():
        fv = store.get_feature_view(view)
        keys = [c.name for c in fv.entity_columns]
        pairs = base[[*keys, TIMESTAMP]].drop_duplicates(ignore_index=True)
        if fv.source_views and fv.feature_transformation is not None:
            got = _transformed_as_of(store, fv, view_names, pairs)
        elif store.config.offline_store.type == "duckdb" and type(fv.batch_source).__name__ == "FileSource":
            got = _asof_as_of(fv, view_names, pairs)
        else:
            got = _view_as_of(store, view, view_names, pairs)
        joined = base[["event_id", *keys, TIMESTAMP]].merge(got, on=[*keys, TIMESTAMP], how="left")
        feats = feats.merge(joined[["event_id", *view_names]], on="event_id", how="left")
    return feats


def _view_as_of(store: FeatureStore, view: str, names: list[str], pairs: pd.DataFrame) -> pd.DataFrame:
    """One feature view's ``names`` at each distinct (entity keys, time) row of ``pairs``."""
    keys = [c for c in pairs.columns if c != TIMESTAMP]
    if pairs.empty:
        got = pairs.assign(**{n: pd.Series(dtype=object) for n in names})
    else:
        with warnings.catch_warnings():
            # Dask compares object with string[pyarrow] key columns, equal for string ids.
            warnings.filterwarnings("ignore", message="Merging dataframes with merge column data type")
            # Ibis 12 calls DuckDB 2.0's renamed fetch_arrow_table(); the result is the same.
            warnings.filterwarnings("ignore", message="fetch_arrow_table", category=DeprecationWarning)
            got = store.get_historical_features(
                entity_df=pairs, features=[f"{view}:{n}" for n in names], full_feature_names=False
            ).to_df()
    return _one_row_per_key_and_time(got, keys, names)


def _one_row_per_key_and_time(got: pd.DataFrame, keys: list[str], names: list[str]) -> pd.DataFrame:
    """A join's answer as the merge back expects it: string keys, ns UTC times, one row each."""
    got[TIMESTAMP] = pd.to_datetime(got[TIMESTAMP], utc=True).astype("datetime64[ns, UTC]")
    for k in keys:
        got[k] = got[k].astype(str)
    return got[[*keys, TIMESTAMP, *names]].drop_duplicates([*keys, TIMESTAMP])


def _asof_as_of(fv: Any, names: list[str], pairs: pd.DataFrame) -> pd.DataFrame:
    """One file-sourced view's ``names`` at each (keys, time) of ``pairs``: DuckDB's ASOF JOIN.

    The same answer as Feast's point-in-time join (for each row the latest feature row stamped
    at or before its time, null where that row is older than the view's ttl), but Feast 0.67's
    DuckDB store gets it from an inequality join that pairs every entity row with every
    earlier feature row of its key and ranks them: at a million events (a user's recent items,
    one row per event) that passed 16 GB. An ASOF join keeps one match per row and sorts,
    so the join grows with the rows, not with their square.
    """
    import duckdb

    keys = [c for c in pairs.columns if c != TIMESTAMP]
    if pairs.empty:
        return pairs.assign(**{n: pd.Series(dtype=object) for n in names})
    source = fv.batch_source
    stamp = source.timestamp_field
    files = f"{Path(source.path)}/*.parquet"
    ttl = pd.Timedelta(fv.ttl) if fv.ttl else None
    q = '"{}"'.format
    fresh = f"f.{q(stamp)} >= p.{q(TIMESTAMP)} - to_microseconds({ttl // ONE_US})" if ttl else "TRUE"
    columns = ", ".join(f"CASE WHEN {fresh} THEN f.{q(n)} END AS {q(n)}" for n in names)
    on = " AND ".join([*(f"p.{q(k)} = f.{q(k)}" for k in keys), f"p.{q(TIMESTAMP)} >= f.{q(stamp)}"])
    # Rows after the latest time asked, or stale before the earliest, match nothing: reading
    # only the span between keeps an interval's join from sorting the whole history.
    lo = (pairs[TIMESTAMP].min() - ttl) if ttl else None
    span = f"{q(stamp)} <= $hi" + (f" AND {q(stamp)} >= $lo" if lo is not None else "")
    params = {"hi": pairs[TIMESTAMP].max().to_pydatetime()}
    if lo is not None:
        params["lo"] = lo.to_pydatetime()
    with duckdb.connect() as con:
        con.execute("SET TimeZone = 'UTC'")
        con.register("pairs", pairs)
        got = con.execute(
            f"SELECT {', '.join(f'p.{q(c)}' for c in pairs.columns)}, {columns} FROM pairs p "
            f"ASOF LEFT JOIN (SELECT * FROM read_parquet('{files}') WHERE {span}) f ON {on}",
            params,
        ).df()
    return _one_row_per_key_and_time(got, keys, names)


def _transformed_as_of(store: FeatureStore, fv: Any, names: list[str], pairs: pd.DataFrame) -> pd.DataFrame:
    """A transformed view's ``names`` at each (entity keys, time) row of ``pairs``.

    The transformation is the registered one, given what Feast's compute engine gives it on
    materialization: its source view's rows (join keys, features, timestamp) as the offline
    store reads them. They are read up to just after the latest time asked for, so rows
    stamped up to then exist (a window's end, as well as an event), and from two ttls before
    the earliest (what each row within ttl of a time needs; everything without a ttl).
    """
    from feast.infra.offline_stores.offline_utils import get_offline_store_from_config

    keys = [c for c in pairs.columns if c != TIMESTAMP]
    if pairs.empty:
        return pairs.assign(**{n: pd.Series(dtype=object) for n in names})
    (parent,) = fv.source_views
    source = parent.batch_source
    ttl = pd.Timedelta(fv.ttl) if fv.ttl else None
    lo, hi = pairs[TIMESTAMP].min(), pairs[TIMESTAMP].max()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="fetch_arrow_table", category=DeprecationWarning)
        rows = (
            get_offline_store_from_config(store.config.offline_store)
            .pull_all_from_table_or_query(
                config=store.config,
                data_source=source,
                join_key_columns=[c.name for c in parent.entity_columns],
                feature_name_columns=[f.name for f in parent.features],
                timestamp_field=source.timestamp_field,
                created_timestamp_column=source.created_timestamp_column or None,
                start_date=(lo - 2 * ttl).to_pydatetime() if ttl else None,
                end_date=(hi + ONE_US).to_pydatetime(),
            )
            .to_df()
        )
    out = fv.feature_transformation.udf(rows)
    out = out.assign(**{k: out[k].astype(str) for k in keys})
    out[TIMESTAMP] = pd.to_datetime(out[TIMESTAMP], utc=True).astype("datetime64[ns, UTC]")
    got = pd.merge_asof(
        pairs.sort_values(TIMESTAMP),
        out[[*keys, TIMESTAMP, *names]].sort_values(TIMESTAMP),
        on=TIMESTAMP,
        by=keys,
        direction="backward",
        allow_exact_matches=True,
        tolerance=ttl,
    )
    return got[[*keys, TIMESTAMP, *names]]


def _fill_defaults(out: pd.DataFrame, defaults: Mapping[str, Any]) -> pd.DataFrame:
    """Missing feature values take their default, and each column the default's type."""
    for name, default in defaults.items():
        col = "_stored_session" if name == "session_id" else name
        values = out[col].astype(object).where(out[col].notna(), default)
        if isinstance(default, bool):
            out[col] = values.astype(bool)
        elif isinstance(default, int):
            out[col] = values.astype(np.int64)
        elif isinstance(default, float):
            out[col] = values.astype(np.float32)
        else:
            out[col] = values.astype(str)
    return out
