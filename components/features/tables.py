"""The feature layer: feature tables from validated data, the Feast store, training data.

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
  (``recsys.online_features.push_event``); both go through ``next_recent_state``.

``build_training_data`` then joins, for each event, the latest row stamped *strictly before*
the event (Feast's point-in-time join is inclusive, so the join asks for the event's time
minus one microsecond). The event never contributes to its own features.

The tables live under ``<home>/features/<table>/``; Feast's registry and the SQLite online
store under ``<home>/feast/``. The feature definitions are the Feast repo in ``feature_repo/``;
``repo_config`` builds the same store from ``Settings`` so the online store (SQLite or Redis)
is configuration, not an edited file.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from recsys.config import FeaturesConfig, Settings
from recsys.faults import failpoint
from recsys.feature_schema import (
    ITEM_ATTRIBUTE_FEATURES,
    POSITIVE_EVENT_TYPES,
    RANKER_SERVICE,
    RECENT_ITEM_FEATURES,
    RETRIEVER_SERVICE,
    USER_PROFILE_FEATURES,
    item_popularity_features,
    user_engagement_features,
)
from recsys.layout import FEATURE_REPO_DIR, features_dir
from recsys.online_features import (
    ONE_US,
    TIMESTAMP,
    feature_defaults,
    get_store,
    next_recent_state,
    service_features,
    store_yaml,
)
from recsys.storage import code_version, read_table, write_manifest
from recsys.timeutil import to_utc

if TYPE_CHECKING:  # Feast costs seconds to import; only the functions that need it do.
    from feast import FeatureStore

DAY = pd.Timedelta(days=1)

# Tables written one file per UTC day (an interval rewrites exactly its days) and tables
# written whole (one row per entity; rewriting them never depends on the interval).
DAILY_TABLES = ("user_engagement", "item_popularity", "user_recent_items")
WHOLE_TABLES = ("user_profile", "item_attributes")
TABLES = (*WHOLE_TABLES, *DAILY_TABLES)


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
    epoch = pd.Timestamp("1970-01-01", tz="UTC")
    wanted = np.array([(d - epoch).days for d in day_list], dtype=np.int64)
    entities = pd.Index(known_since.index)
    since = pd.DatetimeIndex(pd.to_datetime(known_since, utc=True))
    # The first day whose end-of-day stamp is at or after the entity became known.
    # (An entity with no known_since is never known: no rows, as with a future signup.)
    never = np.iinfo(np.int64).max // 4
    known_day = np.where(since.isna(), never, np.asarray((since.floor("D") - epoch).days.fillna(0)))
    known_day = known_day.astype(np.int64)

    event_day = np.asarray((pd.DatetimeIndex(pd.to_datetime(ts, utc=True)).floor("D") - epoch).days)
    ent = entities.get_indexer(keys)
    ok = ent >= 0
    ent, event_day = ent[ok].astype(np.int64), event_day[ok].astype(np.int64)
    weights = {m: np.asarray(ind, dtype=np.int64)[ok] for m, ind in indicators.items()}

    # Candidate (entity, day) rows: the day each entity becomes known, each event's day, and
    # the day each event leaves each window (plus the first day for every entity: carry_in).
    first_day = wanted[0]
    cand_ent = [np.arange(len(entities))]
    cand_day = [known_day]
    if carry_in:
        cand_ent.append(np.arange(len(entities)))
        cand_day.append(np.maximum(known_day, first_day))
    for shift in (0, *windows_days):
        cand_ent.append(ent)
        cand_day.append(event_day + shift)
    ce, cd = np.concatenate(cand_ent), np.concatenate(cand_day)
    # Only requested days, only once the entity is known.
    keep = np.isin(cd, wanted) & (cd >= known_day[ce])
    ce, cd = ce[keep], cd[keep]
    if len(ce) == 0:
        return empty
    pairs = np.unique(np.stack([ce, cd], axis=1), axis=0)
    ce, cd = pairs[:, 0], pairs[:, 1]

    # Cumulative counts over events sorted by (entity, day): a window is two look-ups.
    # Days relative to a base before everything, so (entity, day) packs into one sortable int.
    base = int(min(cd.min(), event_day.min(initial=cd.min()))) - max(windows_days) - 1
    span = int(max(cd.max(), event_day.max(initial=cd.max()))) - base + 1
    order = np.lexsort((event_day, ent))
    sorted_key = ent[order] * span + (event_day[order] - base)
    cum = {m: np.concatenate([[0], np.cumsum(w[order])]) for m, w in weights.items()}

    def upto(day: np.ndarray) -> np.ndarray:
        return np.searchsorted(sorted_key, ce * span + (day - base), side="right")

    end = upto(cd)
    values: dict[str, np.ndarray] = {}
    for w in windows_days:
        start = upto(cd - w)
        for m in indicators:
            values[f"{m}_{w}d"] = cum[m][end] - cum[m][start]
    # A candidate whose values equal the day before's is no change: dropped, except the day the
    # entity becomes known (and the carried-in first day).
    before = upto(cd - 1)
    changed = np.zeros(len(ce), dtype=bool)
    for w in windows_days:
        start_before = upto(cd - 1 - w)
        for m in indicators:
            changed |= (cum[m][before] - cum[m][start_before]) != values[f"{m}_{w}d"]
    anchor = cd == known_day[ce]
    if carry_in:
        anchor |= cd == first_day
    keep = changed | anchor
    part: dict[str, Any] = {"key": entities[ce[keep]]}
    part[TIMESTAMP] = pd.to_datetime(cd[keep], unit="D", utc=True) + DAY - ONE_US
    for c in metric_cols:
        part[c] = values[c][keep].astype(np.int64)
    out = pd.DataFrame(part)
    out[TIMESTAMP] = pd.to_datetime(out[TIMESTAMP], utc=True).astype("datetime64[us, UTC]")
    return out[["key", TIMESTAMP, *metric_cols]].sort_values([TIMESTAMP, "key"], ignore_index=True)


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
        new = next_recent_state(
            state, {"item_id": item_id, "event_type": event_type, "session_id": session_id}, max_items
        )
        if new != state and (start is None or ts >= start):
            if rows and rows[-1][0] == user_id and rows[-1][1] == ts:
                rows.pop()  # same user, same instant: keep only the state after the last one
            rows.append((user_id, ts, new["recent_items"], new["session_id"], new["session_items"]))
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
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Any] = {}
    for name, df in tables.items():
        if written:
            failpoint("build_features.midway")  # some tables rewritten, others not yet
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        if name in WHOLE_TABLES:
            _write_parquet(df, folder / "part-0.parquet")
            written[name] = {"rows": len(df), "files": ["part-0.parquet"]}
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
        written[name] = {"rows": len(df), "files": files}
    manifest = {
        "step": "features.build",
        "path": str(out_dir),
        "validated": str(validated_dir),
        "interval": {"start": start_day.isoformat(), "end": end_day.isoformat()},
        "windows_days": windows,
        "recent_items": config.recent_items,
        "tables": written,
        "code_version": code_version(),
    }
    write_manifest(out_dir, manifest)
    return manifest


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    table = pa.Table.from_pandas(df, preserve_index=False)
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)  # readers (Feast, a concurrent materialization) never see half a file


# --------------------------------------------------------------------------------------------
# The Feast store, built from Settings
# --------------------------------------------------------------------------------------------


def load_definitions(settings: Settings, repo_dir: Path = FEATURE_REPO_DIR) -> list[Any]:
    """The Feast objects of the feature repo, with FileSource paths under ``settings.home``.

    Each ``*.py`` of the repo is executed afresh (as `feast apply` does), and every FileSource
    is re-rooted to ``<home>/features/<last part of its path>``: the repo's own paths point at
    the default home for the CLI; here the home is whatever the settings say.
    """
    from feast import Entity, FeatureService, FeatureView, FileSource
    from feast.data_source import DataSource, PushSource
    from feast.repo_operations import get_repo_files

    objects: list[Any] = []
    for i, path in enumerate(get_repo_files(Path(repo_dir))):
        spec = importlib.util.spec_from_file_location(f"_recsys_feature_repo_{i}_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for obj in vars(module).values():
            if isinstance(obj, Entity | DataSource | FeatureView | FeatureService) and not any(
                obj is o for o in objects
            ):
                objects.append(obj)
    root = features_dir(settings)
    sources = [o for o in objects if isinstance(o, DataSource)]
    for fv in (o for o in objects if isinstance(o, FeatureView)):
        sources += [fv.batch_source, fv.stream_source]
    sources += [s.batch_source for s in sources if isinstance(s, PushSource)]
    for src in sources:
        if isinstance(src, FileSource):
            src.file_options.uri = str(root / Path(src.path).name)
    return objects


def apply_feature_repo(settings: Settings) -> dict[str, Any]:
    """Register the feature repo's definitions (`feast apply`) for these settings.

    Objects that the repo no longer defines are removed from the registry. Also writes the
    effective ``<home>/feast/feature_store.yaml`` so the `feast` CLI (ui, serve) can be
    pointed at this exact store with ``-f``.

    Returns:
        The manifest (``<home>/feast/manifest.json``): names of what is registered.
    """
    from feast import Entity, FeatureService, FeatureView

    objects = load_definitions(settings)
    _check_windows(objects, settings.features.windows_days)
    store = get_store(settings)
    project = settings.features.project
    names = {(type(o).__name__, o.name) for o in objects}
    registered = [
        *store.list_feature_services(),
        *store.list_feature_views(),
        *store.list_entities(),
    ]
    stale = [o for o in registered if (type(o).__name__, o.name) not in names]
    store.apply(objects, objects_to_delete=stale, partial=False)
    (settings.feast_dir / "feature_store.yaml").write_text(
        "# Written by `recsys features apply` from the settings; use with `feast -f`.\n"
        + yaml.safe_dump(store_yaml(settings), sort_keys=False)
    )
    manifest = {
        "step": "features.apply",
        "project": project,
        "registry": str(settings.feast_dir / "registry.db"),
        "online_store": settings.features.online_store,
        "entities": sorted(o.name for o in objects if isinstance(o, Entity)),
        "feature_views": sorted(o.name for o in objects if isinstance(o, FeatureView)),
        "feature_services": sorted(o.name for o in objects if isinstance(o, FeatureService)),
        "removed": sorted(o.name for o in stale),
        "code_version": code_version(),
    }
    write_manifest(settings.feast_dir, manifest)
    return manifest


def _check_windows(objects: Iterable[Any], windows_days: Sequence[int]) -> None:
    from feast import FeatureView

    wanted = {
        "user_engagement": user_engagement_features(list(windows_days)),
        "item_popularity": item_popularity_features(list(windows_days)),
    }
    for fv in objects:
        if isinstance(fv, FeatureView) and fv.name in wanted:
            have = [f.name for f in fv.schema]
            if sorted(have) != sorted(wanted[fv.name]):
                raise FeatureRepoError(
                    f"feature view {fv.name} has {have} but features.windows_days={list(windows_days)} "
                    f"builds {wanted[fv.name]}: change WINDOWS_DAYS in feature_repo/ or the config"
                )


def table_time_range(settings: Settings) -> tuple[pd.Timestamp, pd.Timestamp]:
    """The earliest and latest ``event_timestamp`` over the built feature tables."""
    lo, hi = None, None
    for name in TABLES:
        folder = features_dir(settings) / name
        if not folder.exists() or not any(folder.glob("*.parquet")):
            continue
        col = pq.read_table(folder, columns=[TIMESTAMP]).column(TIMESTAMP)
        if len(col) == 0:
            continue
        mn, mx = to_utc(pc.min(col).as_py()), to_utc(pc.max(col).as_py())
        lo = mn if lo is None else min(lo, mn)
        hi = mx if hi is None else max(hi, mx)
    if lo is None or hi is None:
        raise FeatureRepoError(
            f"no feature tables under {features_dir(settings)}: run `recsys features build`"
        )
    return lo, hi


def materialize(
    settings: Settings, start: datetime | None = None, end: datetime | None = None
) -> dict[str, Any]:
    """Load the latest feature row of each entity stamped in ``[start, end]`` into the online store.

    A scheduler passes its interval (with some overlap before it, so a late rebuild of the
    previous day is picked up); by default the whole span of the built tables is loaded,
    which a first run or a fresh online store needs (profiles are stamped at signup, years
    back). Writing the same rows again leaves the same values.

    ``user_recent_items`` is also pushed in real time. Redis keeps whichever row is newer, so
    materializing never undoes a push; Feast's SQLite store overwrites, so on SQLite (the
    development store) a materialization puts back the batch state of that view for users
    who had newer pushed events, until their next event.

    Returns:
        The manifest (``<home>/feast/materialize/manifest.json``).
    """
    if start is None or end is None:
        lo, hi = table_time_range(settings)
        start = lo if start is None else start
        end = hi if end is None else end
    start_ts, end_ts = to_utc(start), to_utc(end)
    store = get_store(settings)
    views = [fv.name for fv in store.list_feature_views()]
    store.materialize(start_ts.to_pydatetime(), end_ts.to_pydatetime(), feature_views=views)
    manifest = {
        "step": "features.materialize",
        "online_store": settings.features.online_store,
        "interval": {"start": start_ts.isoformat(), "end": end_ts.isoformat()},
        "feature_views": sorted(views),
        "code_version": code_version(),
    }
    out = settings.feast_dir / "materialize"
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, manifest)
    return manifest


# --------------------------------------------------------------------------------------------
# Training data: point-in-time join
# --------------------------------------------------------------------------------------------

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
    entity time, so this asks for rows stamped strictly before the event.

    ``session_id`` is the event's session. The stored session (a feature of the same name) is
    only used to keep ``session_items`` when it is the event's session; items of an older
    session become "" (the gateway does the same with the request's session).

    Missing values are filled by ``feature_defaults`` (counts 0, rates 0.0, text "", False).

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
    store = store or get_store(settings)
    validated_dir = Path(validated_dir or settings.validated_dir)
    filters = []
    if start is not None:
        filters.append(("ts", ">=", to_utc(start).to_pydatetime()))
    if end is not None:
        filters.append(("ts", "<", to_utc(end).to_pydatetime()))
    events = pd.read_parquet(validated_dir / "events", filters=filters or None)
    if event_types is not None:
        events = events[events["event_type"].isin(list(event_types))]
    events = events[list(EVENT_COLUMNS)].reset_index(drop=True)

    refs = [r for r in service_features(store, services) if r.split(":", 1)[0] not in set(skip_views)]
    base = pd.DataFrame(
        {
            "event_id": events["event_id"].astype(str),
            "user_id": events["user_id"].astype(str),
            "item_id": events["item_id"].astype(str),
            TIMESTAMP: (events["ts"] - ONE_US).astype("datetime64[ns, UTC]"),
        }
    )
    # One point-in-time query per feature view, over the distinct (key, time) pairs, merged
    # back here. Feast's Dask offline store drops an entity row outright when its key has
    # rows but all after the entity time (instead of returning nulls), which in one combined
    # query would also lose the other views' values; and it collapses rows that share key
    # and time (feast-dev/feast#6787). Per view and de-duplicated, both are harmless: a
    # missing row means "nothing known yet" and gets the default below.
    by_view: dict[str, list[str]] = {}
    for ref in refs:
        view, name = ref.split(":", 1)
        by_view.setdefault(view, []).append(name)
    feats = base[["event_id"]].copy()
    for view, view_names in by_view.items():
        keys = [c.name for c in store.get_feature_view(view).entity_columns]
        pairs = base[[*keys, TIMESTAMP]].drop_duplicates(ignore_index=True)
        if pairs.empty:
            got = pairs.assign(**{n: pd.Series(dtype=object) for n in view_names})
        else:
            with warnings.catch_warnings():
                # Dask compares object with string[pyarrow] key columns, equal for string ids.
                warnings.filterwarnings("ignore", message="Merging dataframes with merge column data type")
                got = store.get_historical_features(
                    entity_df=pairs, features=[f"{view}:{n}" for n in view_names], full_feature_names=False
                ).to_df()
        got[TIMESTAMP] = pd.to_datetime(got[TIMESTAMP], utc=True).astype("datetime64[ns, UTC]")
        for k in keys:
            got[k] = got[k].astype(str)
        got = got[[*keys, TIMESTAMP, *view_names]].drop_duplicates([*keys, TIMESTAMP])
        joined = base[["event_id", *keys, TIMESTAMP]].merge(got, on=[*keys, TIMESTAMP], how="left")
        feats = feats.merge(joined[["event_id", *view_names]], on="event_id", how="left")
    feats = feats.rename(columns={"session_id": "_stored_session"})
    events = events.assign(event_id=events["event_id"].astype(str))
    out = events.merge(feats, on="event_id", how="left", validate="one_to_one")
    out.insert(out.columns.get_loc("ts") + 1, "hour", out["ts"].dt.hour.astype(np.int64))

    defaults = feature_defaults(store, refs)
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
    if "session_items" in out.columns:
        same = out["_stored_session"] == out["session_id"].astype(str)
        out["session_items"] = out["session_items"].where(same, "")
    out = out.drop(columns=["_stored_session"], errors="ignore")
    return out.sort_values(["ts", "event_id"], kind="stable", ignore_index=True)
