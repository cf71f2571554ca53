"""The recsys feature repo: entities, sources, feature views and the models' feature services.

Read top to bottom as Feast lays a repo out: Entity -> Source -> FeatureView -> FeatureService.
`recsys features build` computes the tables these sources read (``<home>/features/<table>/``,
one Parquet file per day); `feast apply` (or `recsys features apply`) registers the
definitions; materialization copies the latest row of each entity into the online store.

Time: every table row carries ``event_timestamp``, the moment its value became known. Batch
tables are daily snapshots stamped at the last microsecond of their day and computed from
events up to that moment; a recent-items row is stamped with the event that produced it.
Training data joins, for each event, only rows stamped strictly before the event
(``components.features.training_data.build_training_data``), so no event sees itself or the future.

Names come from ``recsys.feature_schema`` so training, serving and this repo agree.

To add a feature: compute its column in ``components/features.py`` (the table builder), add a
``Field`` to the view below, add the view to a service if it is new, then `feast apply`.
"""

import os
from datetime import timedelta

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource
from feast.data_format import ParquetFormat
from feast.types import Bool, Float32, Int64, String
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
    # A snapshot is replaced by the next day's; two days of ttl tolerate one late build
    # without serving counts from a week ago.
    ttl=timedelta(days=2),
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
    ttl=timedelta(days=2),
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
    features=[user_profile, user_engagement, item_attributes, item_popularity],
    tags={"model": "ranker"},
    description="The ranker scores one (user, item) pair: user, item and popularity features.",
)
