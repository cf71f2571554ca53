"""The online feature store as the serving side and the pipeline both use it.

The feature definitions are the Feast repo in ``feature_repo/``; ``repo_config`` builds the
store from ``Settings`` (registry and SQLite file under ``settings.home``, or Redis), so the
online store is configuration, not an edited file. Reads: ``service_features`` names a
feature service's references, ``entity_row_reader`` reads one entity's row, and
``feature_defaults`` gives the value a missing feature takes.

Real-time pushes: a user who clicks something expects the next recommendation to know it.
Batch features arrive daily; the ``user_recent_items`` view is also fed through a Feast push
source, so the gateway's ``POST /v1/events`` (after the durable append) calls ``push_event``
(through an ``online_pusher``, the push source's views resolved once) and the next read for
that user already sees the event: no flush window. The new state is
computed by ``next_recent_state``, the same rule that rebuilds the view's batch table from the
event log, so the online value after a push is the value that training data joins for the
next event.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd

from recsys.feature_schema import (
    FEATURE_DEFAULTS_BY_KIND,
    POSITIVE_EVENT_TYPES,
    RECENT_ITEM_FEATURES,
)
from recsys.item_ages import UNKNOWN, epoch_seconds, split_times
from recsys.layout import FEATURE_REPO_DIR
from recsys.timeutil import to_utc

if TYPE_CHECKING:  # Feast costs seconds to import; only the functions that need it do.
    from feast import FeatureStore, RepoConfig

    from recsys.config import FeaturesConfig, Settings

TIMESTAMP = "event_timestamp"
ONE_US = pd.Timedelta(microseconds=1)
PUSH_SOURCE = "user_recent_items_push"
# Feast warns on every BatchFeatureView it builds, also each time it reads one from the
# registry: noise once the repo declares one.
EXPERIMENTAL_WARNING = "Batch feature views are experimental"
RECENT_VIEW = "user_recent_items"


def store_yaml(settings: Settings) -> dict[str, Any]:
    """The effective ``feature_store.yaml`` for these settings, as a dict.

    Same project and definitions as ``feature_repo/feature_store.yaml``, but the registry and
    the SQLite file are under ``settings.home``, the online store follows
    ``features.online_store`` and the offline store (where training data's point-in-time
    join runs) ``features.offline_store``. Absolute paths, so the file works wherever it is
    read from.
    """
    f = settings.features
    if f.online_store == "redis":
        online: dict[str, Any] = {"type": "redis", "connection_string": redis_connection_string(f)}
    else:
        online = {"type": "sqlite", "path": str(settings.feast_dir / "online_store.db")}
    engines: dict[str, Any] = {"offline_store": {"type": f.offline_store}}
    if f.offline_store == "spark":
        # Training data's join on the Spark offline store and materialization on the Spark
        # compute engine, both in sessions of `spark.master`.
        spark_conf = settings.spark.properties()
        engines = {
            "offline_store": {"type": "spark", "spark_conf": spark_conf},
            "batch_engine": {"type": "spark.engine", "spark_conf": spark_conf},
        }
    return {
        "project": f.project,
        "provider": "local",
        # The registry is re-read at most this often by a long-lived store (the gateway):
        # an apply reaches it within a minute without a restart.
        "registry": {"path": str(settings.feast_dir / "registry.db"), "cache_ttl_seconds": 60},
        "online_store": online,
        **engines,
        "entity_key_serialization_version": 3,
    }


def redis_connection_string(features: FeaturesConfig) -> str:
    """Feast's Redis connection string with the configured socket and connect timeouts.

    Feast hands the string's ``key=value`` options to the Redis client; without them a call
    to a hung server never returns. Options the string already names are kept as written.
    """
    conn = features.redis_connection_string
    named = {part.split("=", 1)[0].strip() for part in conn.split(",") if "=" in part}
    for option, seconds in (
        ("socket_timeout", features.redis_socket_timeout_seconds),
        ("socket_connect_timeout", features.redis_connect_timeout_seconds),
    ):
        if option not in named:
            conn += f",{option}={seconds:g}"
    return conn


def repo_config(settings: Settings) -> RepoConfig:
    """The Feast ``RepoConfig`` of these settings (see ``store_yaml``).

    ``repo_path`` is the feature repo, as for the `feast` CLI; the FileSource paths that
    ``apply_feature_repo`` registers are absolute, so they do not depend on it.
    """
    from feast import RepoConfig

    cfg = RepoConfig(**store_yaml(settings))
    cfg.repo_path = FEATURE_REPO_DIR
    return cfg


def start_offline_engine(settings: Settings) -> None:
    """Start the engine of ``features.offline_store`` in this process, where it has one.

    Spark's session must be started by the project (``recsys.spark``) before Feast's offline
    store or compute engine asks for one; the embedded stores need nothing. Only the steps
    that join or materialize call this, so a gateway never starts a JVM.
    """
    if settings.features.offline_store == "spark":
        from recsys.spark import spark_session

        spark_session(settings.spark)


def quiet_experimental_views() -> None:
    """Silence Feast's "Batch feature views are experimental" warning in this process.

    Feast warns on every construction of a ``BatchFeatureView``, the repo's loading and each
    registry read alike, and registry reads happen lazily inside any store call, so a scoped
    filter cannot cover them: the filter is process-wide (set again, it is not duplicated).
    """
    import warnings

    warnings.filterwarnings("ignore", message=EXPERIMENTAL_WARNING, category=RuntimeWarning)


def get_store(settings: Settings) -> FeatureStore:
    """A ``FeatureStore`` over the state under ``settings.home`` (no files are read yet)."""
    from feast import FeatureStore

    quiet_experimental_views()
    settings.feast_dir.mkdir(parents=True, exist_ok=True)
    return FeatureStore(config=repo_config(settings))


def service_features(store: FeatureStore, services: Sequence[str]) -> list[str]:
    """Feature references ``view:feature`` of the named services, in order, without repeats."""
    refs: list[str] = []
    for name in services:
        service = store.get_feature_service(name)
        for proj in service.feature_view_projections:
            for feat in proj.features:
                ref = f"{proj.name_to_use()}:{feat.name}"
                if ref not in refs:
                    refs.append(ref)
    return refs


def entity_row_reader(
    store: FeatureStore, refs: Sequence[str], join_key: str
) -> Callable[[str], dict[str, Any]]:
    """A reader of one entity's online values for ``refs`` (``view:feature``), by feature name.

    Gives what ``store.get_online_features(refs, [{join_key: id}]).to_dict()`` gives (None for
    a missing value), through each view's ``online_read`` on the store's provider: the views
    are resolved once here instead of on every call, and no response proto is built: the
    gateway reads a user this way on every request (cost in BENCHMARKS.md, "Measured costs
    behind design choices").
    """
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value
    from feast.type_map import feast_value_type_to_python_type

    by_view: dict[str, list[str]] = {}
    for ref in refs:
        view, feature = ref.split(":", 1)
        by_view.setdefault(view, []).append(feature)
    views = [(store.get_feature_view(view), names) for view, names in by_view.items()]
    # The provider get_online_features reads through (_get_provider is not public Feast API:
    # Feast is pinned, and a test compares this reader with get_online_features).
    provider, config = store._get_provider(), store.config

    def read(entity_id: str) -> dict[str, Any]:
        key = EntityKey(join_keys=[join_key], entity_values=[Value(string_val=entity_id)])
        out: dict[str, Any] = {}
        for view, names in views:
            # A copy: Redis's online_read appends its timestamp key to the list it is given.
            (_, values), *_ = provider.online_read(
                config=config, table=view, entity_keys=[key], requested_features=list(names)
            )
            for name in names:
                value = values.get(name) if values else None
                out[name] = feast_value_type_to_python_type(value) if value is not None else None
        return out

    return read


def feature_defaults(store: FeatureStore, refs: Sequence[str]) -> dict[str, Any]:
    """The value a missing feature takes, by its Feast type: 0, 0.0, "" or False.

    A missing value means "nothing known yet" (a new user, an item never shown): a count of
    0 and an empty text say exactly that, and a model sees the same default in training and
    serving (the gateway fills online nulls with this same function).
    """
    from feast.types import Bool, Float32, Float64, Int32, Int64

    dtypes = {}
    for fv in store.list_feature_views():
        for f in fv.schema:
            dtypes[f"{fv.name}:{f.name}"] = f.dtype
    out: dict[str, Any] = {}
    for ref in refs:
        dt = dtypes.get(ref)
        if dt in (Int64, Int32):
            kind = "count"
        elif dt in (Float32, Float64):
            kind = "rate"
        elif dt == Bool:
            kind = "flag"
        else:
            kind = "text"
        out[ref.split(":", 1)[1]] = FEATURE_DEFAULTS_BY_KIND[kind]
    return out


def next_recent_state(state: Mapping[str, Any] | None, event: Mapping[str, Any], max_items: int) -> dict:
    """The user's recent-items state after one event; the one rule for batch and real time.

    State: ``recent_items`` (distinct positive item ids, newest first, space-joined, at most
    ``max_items``), ``recent_item_times`` (aligned with it: the epoch seconds of each item's
    latest positive event, ``recsys.item_ages.UNKNOWN`` where a state written before the
    times were kept has none), ``session_id`` (the session of the user's latest event) and
    ``session_items`` (distinct positive items of that session, newest first). A new session
    starts with no items; an impression or a skip moves the session but adds no item.
    """
    state = state or {}
    recent = str(state.get("recent_items") or "").split()
    times = split_times(state.get("recent_item_times"), len(recent))
    session_id = str(state.get("session_id") or "")
    session_items = str(state.get("session_items") or "").split()
    event_session = str(event.get("session_id") or "")
    if event_session != session_id:
        session_id, session_items = event_session, []
    if str(event["event_type"]) in POSITIVE_EVENT_TYPES:
        item = str(event["item_id"])
        at = str(epoch_seconds(event["ts"])) if event.get("ts") is not None else UNKNOWN
        kept = [(i, t) for i, t in zip(recent, times, strict=True) if i != item]
        recent = [item, *[i for i, _ in kept]][:max_items]
        times = [at, *[t for _, t in kept]][:max_items]
        session_items = [item, *[i for i in session_items if i != item]][:max_items]
    return {
        "recent_items": " ".join(recent),
        "recent_item_times": " ".join(times),
        "session_id": session_id,
        "session_items": " ".join(session_items),
    }


def read_recent_state(store: FeatureStore, user_id: str) -> tuple[dict[str, str], pd.Timestamp | None]:
    """The user's current recent-items row in the online store and its timestamp (None: no row)."""
    resp = store.get_online_features(
        features=[f"{RECENT_VIEW}:{f}" for f in RECENT_ITEM_FEATURES],
        entity_rows=[{"user_id": str(user_id)}],
    )
    values = resp.to_dict()
    state = {f: values[f][0] or "" for f in RECENT_ITEM_FEATURES}
    # The proto keeps the stored time to the nanosecond; to_dict(include_event_timestamps=True)
    # truncates it to whole seconds, too coarse to order two events of one second.
    stamps = [
        pd.Timestamp(ts.seconds * 1_000_000_000 + ts.nanos, unit="ns", tz="UTC")
        for name, result in zip(resp.proto.metadata.feature_names.val, resp.proto.results, strict=True)
        if name in RECENT_ITEM_FEATURES
        for ts in result.event_timestamps[:1]
        if ts.seconds or ts.nanos  # an unset Timestamp (0) means "no row"
    ]
    return state, (max(stamps) if stamps else None)


def online_pusher(store: FeatureStore, push_source: str = PUSH_SOURCE) -> Callable[[pd.DataFrame], None]:
    """A writer of rows pushed to ``push_source`` into the online store.

    Writes what ``store.push(push_source, df, to=PushMode.ONLINE)`` writes (each view the push
    source feeds, through the provider's ``ingest_df``), with those views resolved once here:
    ``push`` lists every view and feature service of the registry and rebuilds each from its
    proto on every call, most of a push's cost (BENCHMARKS.md, "Measured costs behind design
    choices"). Resolved once, as ``entity_row_reader`` does: a later ``feast apply`` is seen by a
    new pusher. Where Feast would do more than write rows (a label view fed by the source, a
    feature service that precomputes online vectors), the writer is ``store.push`` itself.

    Raises:
        ValueError: when no view is fed by ``push_source``.
    """
    from feast.data_source import PushMode, PushSource

    def fed(source: Any) -> bool:
        return isinstance(source, PushSource) and source.name == push_source

    candidates = [*store.list_feature_views(), *store.list_stream_feature_views()]
    views = [fv for fv in candidates if fed(fv.stream_source)]
    if not views:
        raise ValueError(f"push_source: no feature view is fed by {push_source!r}")
    names = {fv.name for fv in views}
    label_views: list[Any] = getattr(store, "list_label_views", list)()
    precomputed = [s for s in store.list_feature_services() if getattr(s, "precompute_online", False)]
    more_than_rows = any(fed(getattr(lv, "source", None)) for lv in label_views) or any(
        p.name in names for s in precomputed for p in s.feature_view_projections
    )
    if more_than_rows:
        return lambda df: store.push(push_source, df, to=PushMode.ONLINE)
    # The provider push writes through (_get_provider is not public Feast API: Feast is pinned,
    # and a test compares what this writes with what store.push writes).
    provider = store._get_provider()

    def write(df: pd.DataFrame) -> None:
        for fv in views:
            provider.ingest_df(fv, df)

    return write


def push_event(
    store: FeatureStore,
    event: Mapping[str, Any],
    max_items: int = 20,
    write: Callable[[pd.DataFrame], None] | None = None,
) -> dict[str, Any]:
    """Push the effect of one accepted event into the online store (push source, ONLINE).

    Reads the user's current row, applies the event (a positive item goes to the front of
    ``recent_items`` and ``session_items``, its time to the front of ``recent_item_times``; a
    new ``session_id`` starts an empty session) and pushes the new row. Only the online store
    is written: the offline copy of this view is rebuilt from the event log by ``recsys
    features build``, which keeps one writer per file.

    The row is stamped with the event's time, or 1 µs after the stored row if that is later
    (an event that arrives late, or two at one instant): the Redis store ignores a write that
    is not newer than what it holds, SQLite would overwrite with an older state; stamping it
    newer makes both keep the state that includes every event pushed so far.

    Read-modify-write is not atomic: two events of one user pushed concurrently by two
    processes can lose one. The gateway pushes a user's events from one request at a time;
    the nightly rebuild from the event log repairs any loss.

    Args:
        store: an open store (``get_store``).
        event: an accepted event with at least user_id, item_id, event_type, ts, session_id.
        max_items: length of ``recent_items`` (``features.recent_items``).
        write: the push source's writer (``online_pusher``; default: ``store.push``, which
            resolves the source's views again on each call).

    Returns:
        The pushed row: user_id, event_timestamp, recent_items, recent_item_times, session_id,
        session_items.
    """
    from feast.data_source import PushMode

    user_id = str(event["user_id"])
    state, stored_at = read_recent_state(store, user_id)
    new = next_recent_state(state, event, max_items)
    stamp = to_utc(event["ts"])
    if stored_at is not None and stamp <= stored_at:
        stamp = stored_at + ONE_US
    row = {"user_id": user_id, TIMESTAMP: stamp, **new}
    frame = pd.DataFrame([row])
    if write is None:
        store.push(PUSH_SOURCE, frame, to=PushMode.ONLINE)
    else:
        write(frame)
    return row
