"""The Feast store of the feature tables, built from ``Settings``: register, materialize.

The feature definitions are the Feast repo in ``feature_repo/``; its FileSources are
re-rooted under ``<home>/features`` and the store (registry and online store under
``<home>/feast/``) is ``recsys.online_features.get_store``, so the online store (SQLite or
Redis) is configuration, not an edited file.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from components.features.tables import TABLES, FeatureRepoError
from recsys.config import Settings
from recsys.feature_schema import item_popularity_features, user_engagement_features
from recsys.layout import FEATURE_REPO_DIR, features_dir
from recsys.manifests import FeaturesApplyManifest, Interval, MaterializeManifest
from recsys.online_features import TIMESTAMP, get_store, start_offline_engine, store_yaml
from recsys.storage import code_version, write_manifest
from recsys.timeutil import to_utc


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
    if settings.features.offline_store == "spark":
        objects = as_spark_sources(objects)
    return objects


def as_spark_sources(objects: list[Any]) -> list[Any]:
    """The same definitions with every FileSource read by Spark (a SparkSource on its path).

    Feast's Spark offline store and compute engine read only SparkSources, and the repo
    declares FileSources (what the embedded stores read), so the engine stays configuration:
    each FileSource becomes one SparkSource with the same name, path, timestamp and
    description, wherever a view or a push source refers to it.
    """
    from feast import FeatureView, FileSource
    from feast.data_source import PushSource
    from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

    swapped: dict[int, Any] = {}

    def spark(src: Any) -> Any:
        if not isinstance(src, FileSource):
            return src
        if id(src) not in swapped:
            swapped[id(src)] = SparkSource(
                name=src.name,
                path=src.path,
                file_format="parquet",
                timestamp_field=src.timestamp_field,
                created_timestamp_column=src.created_timestamp_column or None,
                field_mapping=src.field_mapping,
                description=src.description,
                tags=src.tags,
                owner=src.owner,
            )
        return swapped[id(src)]

    out = [spark(o) for o in objects]
    for obj in out:
        if isinstance(obj, PushSource):
            obj.batch_source = spark(obj.batch_source)
        elif isinstance(obj, FeatureView):
            obj.batch_source = spark(obj.batch_source)
            if isinstance(getattr(obj, "data_source", None), FileSource):
                obj.data_source = spark(obj.data_source)
            if isinstance(obj.stream_source, PushSource):
                obj.stream_source.batch_source = spark(obj.stream_source.batch_source)
    return out


def apply_feature_repo(settings: Settings, repo_dir: Path = FEATURE_REPO_DIR) -> dict[str, Any]:
    """Register the feature repo's definitions (`feast apply`) for these settings.

    Objects that the repo no longer defines are removed from the registry. Also writes the
    effective ``<home>/feast/feature_store.yaml`` so the `feast` CLI (ui, serve) can be
    pointed at this exact store with ``-f``.

    Returns:
        The manifest (``<home>/feast/manifest.json``): names of what is registered.
    """
    from feast import Entity, FeatureService, FeatureView

    from recsys.online_features import quiet_experimental_views

    quiet_experimental_views()
    objects = load_definitions(settings, repo_dir)
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
    manifest = FeaturesApplyManifest(
        project=project,
        registry=str(settings.feast_dir / "registry.db"),
        online_store=settings.features.online_store,
        entities=sorted(o.name for o in objects if isinstance(o, Entity)),
        feature_views=sorted(o.name for o in objects if isinstance(o, FeatureView)),
        feature_services=sorted(o.name for o in objects if isinstance(o, FeatureService)),
        removed=sorted(o.name for o in stale),
        code_version=code_version(),
    )
    write_manifest(settings.feast_dir, manifest)
    return manifest.model_dump()


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
    start_offline_engine(settings)
    store = get_store(settings)
    online = [fv for fv in store.list_feature_views() if fv.online]
    views = [fv.name for fv in online]
    # A transformation over trailing windows needs the events of the largest window (its
    # ttl) before each row it writes; reading from two of them before the interval makes
    # every user's latest row complete (recsys.event_windows).
    derived = {fv.name: 2 * fv.ttl for fv in online if fv.source_views and fv.ttl}
    with warnings.catch_warnings():
        # Ibis 12 calls DuckDB 2.0's renamed fetch_arrow_table(); the result is the same.
        warnings.filterwarnings("ignore", message="fetch_arrow_table", category=DeprecationWarning)
        plain = [v for v in views if v not in derived]
        store.materialize(start_ts.to_pydatetime(), end_ts.to_pydatetime(), feature_views=plain)
        for name, lookback in derived.items():
            since = (start_ts - lookback).to_pydatetime()
            store.materialize(since, end_ts.to_pydatetime(), feature_views=[name])
    manifest = MaterializeManifest(
        online_store=settings.features.online_store,
        interval=Interval(start=start_ts.isoformat(), end=end_ts.isoformat()),
        feature_views=sorted(views),
        code_version=code_version(),
    )
    out = settings.feast_dir / "materialize"
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, manifest)
    return manifest.model_dump()
