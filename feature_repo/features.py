"""The recsys feature repo: entities, sources, feature views and the models' feature services.

Read top to bottom as Feast lays a repo out: Entity -> Source -> FeatureView -> FeatureService.
`recsys features build` computes the tables these sources read (``<home>/features/<table>/``,
one Parquet file per day) and copies the events there; `feast apply` (or `recsys features
apply`) registers the definitions; materialization copies the latest row of each entity into
the online store, running the batch feature views' transformations on the way.

Time: every table row carries ``event_timestamp``, the moment its value became known. Batch
tables are daily snapshots stamped at the last microsecond of their day and computed from
events up to that moment; a recent-items row is stamped with the event that produced it.
Training data joins, for each event, only rows stamped strictly before the event
(``components.features.training_data.build_training_data``), so no event sees itself or the future.

Names come from ``recsys.feature_schema`` so training, serving and this repo agree.

To add a feature: declare a ``BatchFeatureView`` below whose transformation reads the
``events`` view (see "Batch feature views"), list it in a service, then `recsys features apply`:
Feast's compute engine computes it on materialization, training data runs the same
transformation. The daily-snapshot families (``user_engagement``, ``item_popularity``) and the
profile, attribute and recent-items tables are still built by ``components/features/tables.py``
(README, "Add a feature and use it", says why); a column there also needs a ``Field`` here.
"""

import inspect
import os
from datetime import timedelta

import pandas as pd
from feast import BatchFeatureView, Entity, FeatureService, FeatureView, Field, FileSource, PushSource
from feast.data_format import ParquetFormat
from feast.types import Bool, Float32, Float64, Int64, String
from feast.value_type import ValueType

from recsys.feature_schema import (
    ITEM_ATTRIBUTE_FEATURES,
    RANKER_SERVICE,
    RECENT_ITEM_FEATURES,
    RETRIEVER_CANDIDATE_SERVICE,
    RETRIEVER_SERVICE,
    USER_PROFILE_FEATURES,
)

# Trailing windows of the engagement and popularity views. Must equal `features.windows_days`
# of the config (the table builder makes one column per window); `recsys features apply`
# refuses a mismatch instead of registering columns that the tables do not have.
WINDOWS_DAYS = (1, 7, 30)
CHANGE_ROW_TTL = timedelta(days=max(WINDOWS_DAYS) + 1)

# Where the feature tables are. Feast resolves a relative FileSource path against this folder,
# so "../var" is the default runtime home and `feast apply` works on a fresh checkout;
# RECSYS_HOME (absolute) moves it, as it moves all state. The project code re-roots each path
# under Settings.home by its last part, the table name, so keep that equal to the folder name.
_HOME = os.environ.get("RECSYS_HOME") or "../var"


def _table(name: str) -> str:
    return f"{_HOME}/features/{name}"


# --- Entities: the keys features hang on ---------------------------------------------------

user = Entity(
    name="user",
    join_keys=["user_id"],
    value_type=ValueType.STRING,
    description="A person who sees and acts on recommendations.",
)
item = Entity(
    name="item",
    join_keys=["item_id"],
    value_type=ValueType.STRING,
    description="Something that can be recommended.",
)
event = Entity(
    name="event",
    join_keys=["event_id"],
    value_type=ValueType.STRING,
    description="One logged interaction: the rows batch transformations start from.",
)

# --- Sources: Parquet tables written by `recsys features build` ----------------------------
# Each path is a folder of Parquet files (one per day). The format is named: the DuckDB offline
# store reads a source only when it says Parquet or its path ends in ".parquet".

user_profile_source = FileSource(
    name="user_profile",
    path=_table("user_profile"),
    timestamp_field="event_timestamp",
    file_format=ParquetFormat(),
    description="One row per user, stamped at signup: demographics do not change over time.",
)
user_engagement_source = FileSource(
    name="user_engagement",
    path=_table("user_engagement"),
    timestamp_field="event_timestamp",
    file_format=ParquetFormat(),
    description="Daily snapshots: one row per signed-up user per day, counts over trailing windows.",
)
item_attributes_source = FileSource(
    name="item_attributes",
    path=_table("item_attributes"),
    timestamp_field="event_timestamp",
    file_format=ParquetFormat(),
    description="One row per item, stamped at publication.",
)
item_popularity_source = FileSource(
    name="item_popularity",
    path=_table("item_popularity"),
    timestamp_field="event_timestamp",
    file_format=ParquetFormat(),
    description="Daily snapshots: one row per published item per day, counts over trailing windows.",
)
user_recent_items_source = FileSource(
    name="user_recent_items",
    path=_table("user_recent_items"),
    timestamp_field="event_timestamp",
    file_format=ParquetFormat(),
    description="One row per event: the user's recent items and session right after it.",
)
events_source = FileSource(
    name="events",
    path=_table("events"),
    timestamp_field="event_timestamp",
    file_format=ParquetFormat(),
    description="The validated events, one row per event, stamped with its time.",
)
# Real time: the gateway pushes the new recent-items row of a user on every accepted event
# (recsys.online_features.push_event). The batch source is the same table rebuilt from the
# event log, which is what training reads and what materialization restores.
user_recent_items_push = PushSource(
    name="user_recent_items_push",
    batch_source=user_recent_items_source,
)

# --- Feature views ---------------------------------------------------------------------------

# ttl=0 means "no expiry": a profile or an item's attributes stay valid from their timestamp on.
user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=timedelta(0),
    schema=[Field(name=f, dtype=String) for f in USER_PROFILE_FEATURES],
    source=user_profile_source,
    online=True,
    tags={"team": "recsys", "kind": "batch"},
    description="Who the user is: age bucket, country, how they signed up.",
)

user_engagement = FeatureView(
    name="user_engagement",
    entities=[user],
    # The table has a row whenever a count changes (an event, or one leaving a window), so
    # while any count is non-zero the latest row is less than the longest window old, and
    # after that it holds zeros: a ttl of the longest window (and a day) reads every value
    # exactly. A shorter one read a count unchanged for longer as 0; none at all makes the
    # point-in-time join pair each event with every earlier row of its entity.
    ttl=CHANGE_ROW_TTL,
    schema=[
        Field(name=f"user_{kind}_{w}d", dtype=Int64)
        for w in WINDOWS_DAYS
        for kind in ("events", "positives", "purchases")
    ],
    source=user_engagement_source,
    online=True,
    tags={"team": "recsys", "kind": "batch", "windows_days": ",".join(map(str, WINDOWS_DAYS))},
    description="How active the user is: events, positive events and purchases per trailing window.",
)

item_attributes = FeatureView(
    name="item_attributes",
    entities=[item],
    ttl=timedelta(0),
    schema=[Field(name=f, dtype=Bool if f == "in_stock" else String) for f in ITEM_ATTRIBUTE_FEATURES],
    source=item_attributes_source,
    online=True,
    tags={"team": "recsys", "kind": "batch"},
    description="What the item is: categories ('|'-joined, primary first), title, description, stock.",
)

item_popularity = FeatureView(
    name="item_popularity",
    entities=[item],
    ttl=CHANGE_ROW_TTL,  # change rows, as user_engagement
    schema=[
        Field(name=name, dtype=Float32 if kind == "ctr" else Int64)
        for w in WINDOWS_DAYS
        for kind, name in (
            ("impressions", f"item_impressions_{w}d"),
            ("positives", f"item_positives_{w}d"),
            ("ctr", f"item_ctr_{w}d"),
        )
    ],
    source=item_popularity_source,
    online=True,
    tags={"team": "recsys", "kind": "batch", "windows_days": ",".join(map(str, WINDOWS_DAYS))},
    description="How popular the item is: impressions, positives and clicks per impression per window.",
)

user_recent_items = FeatureView(
    name="user_recent_items",
    entities=[user],
    ttl=timedelta(0),
    schema=[Field(name=f, dtype=String) for f in RECENT_ITEM_FEATURES],
    source=user_recent_items_push,
    online=True,
    tags={"team": "recsys", "kind": "push"},
    description=(
        "What the user just did: last distinct positive item ids (newest first, space-joined), "
        "the current session id and the positive items of that session."
    ),
)

# --- Batch feature views: features computed by Feast from the events -------------------------
# A BatchFeatureView's transformation runs in Feast's compute engine on materialization
# (local by default, Spark in production) and, on the same rows, for training data
# (components.features.training_data). Adding a feature here needs no builder and no schema
# module: declare it, list it in a service, `recsys features apply`.
#
# Two Feast 0.67 limits shape these declarations (README, "To add a feature"):
# - The DuckDB and file offline stores read only a view's declared columns from its source,
#   so a transformation reads the events through the `events` view below, whose schema names
#   the columns it may use, not from `events_source` directly.
# - The local engine has no time-windowed Aggregation; windows are a transformation
#   (recsys.event_windows.trailing_counts: exact change rows, no daily snapshot).
# A transformation is stored in the registry as its source text and run from it: it must
# import what it uses inside its body.

# The rows transformations read; never served (one row per event).
events = FeatureView(
    name="events",
    entities=[event],
    ttl=timedelta(0),
    schema=[
        Field(name="user_id", dtype=String),
        Field(name="item_id", dtype=String),
        Field(name="event_type", dtype=String),
        Field(name="value", dtype=Float64),
        Field(name="session_id", dtype=String),
    ],
    source=events_source,
    online=False,
    tags={"team": "recsys", "kind": "events"},
    description="The events as batch transformations read them.",
)


def user_activity_counts(events: pd.DataFrame) -> pd.DataFrame:
    from datetime import timedelta

    from recsys.event_windows import trailing_counts
    from recsys.feature_schema import POSITIVE_EVENT_TYPES

    return trailing_counts(
        events,
        key="user_id",
        counts={
            "events": lambda e: e["event_type"].notna(),
            "positives": lambda e: e["event_type"].isin(POSITIVE_EVENT_TYPES),
        },
        windows={"1h": timedelta(hours=1), "24h": timedelta(hours=24)},
        rates={"positive_rate": ("positives", "events")},
    )


# Intraday windows, exact to the event: what a daily snapshot cannot say ("busy right now").
user_activity = BatchFeatureView(
    name="user_activity",
    mode="pandas",
    entities=[user],
    source=[events],
    # Where Feast would write the view's rows with offline=True; training data computes
    # them instead (a materialization writes only each user's latest row).
    sink_source=FileSource(
        name="user_activity",
        path=_table("user_activity"),
        timestamp_field="event_timestamp",
        file_format=ParquetFormat(),
    ),
    udf=user_activity_counts,
    udf_string=inspect.getsource(user_activity_counts),
    # The largest window: a row with a non-zero count is always replaced within it, and a
    # materialization reads the events from two of it before its interval.
    ttl=timedelta(hours=24),
    schema=[
        *(Field(name=f"user_{m}_{w}", dtype=Int64) for w in ("1h", "24h") for m in ("events", "positives")),
        *(Field(name=f"user_positive_rate_{w}", dtype=Float32) for w in ("1h", "24h")),
    ],
    online=True,
    offline=False,
    tags={"team": "recsys", "kind": "batch_transformation"},
    description="How active the user is right now: events, positives and their rate over 1 and 24 hours.",
)

# --- Feature services: one per model; models fetch by service name ---------------------------

retriever_v1 = FeatureService(
    name=RETRIEVER_SERVICE,
    features=[user_profile, user_engagement, user_recent_items],
    tags={"model": "retriever", "tower": "query"},
    description="The two-tower retriever's query tower: one user's row per request.",
)
# The candidate tower embeds items offline (at index build), not per request, so its features
# are a separate service: a request for one user then never reads the whole catalog.
retriever_candidates_v1 = FeatureService(
    name=RETRIEVER_CANDIDATE_SERVICE,
    features=[item_attributes, item_popularity],
    tags={"model": "retriever", "tower": "candidate"},
    description="The retriever's candidate tower: item content, and popularity for the logQ correction.",
)
ranker_v1 = FeatureService(
    name=RANKER_SERVICE,
    features=[user_profile, user_engagement, item_attributes, item_popularity, user_activity],
    tags={"model": "ranker"},
    description="The ranker scores one (user, item) pair: user, item and popularity features.",
)
