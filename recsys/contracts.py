"""Data contracts: the columns, types and allowed values of users, items and events.

Every source (the synthetic generator, the MovieLens importer, the gateway's event log)
writes these tables, and validation checks them. Ids are strings everywhere, so ids from
any source (MovieLens integers, UUIDs) keep their spelling end to end. An item's
``category`` holds one or more categories joined by ``|``, the first being the primary one;
a flat string keeps the column usable by Feast, GX and Parquet readers alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

TABLES = ("users", "items", "events")

EVENT_TYPES = (
    "impression",
    "view",
    "click",
    "add_to_cart",
    "purchase",
    "rating",
    "like",
    "dislike",
    "skip",
)
DEVICES = ("mobile", "desktop", "tablet", "tv", "unknown")
AGE_BUCKETS = ("<18", "18-24", "25-34", "35-44", "45-54", "55+", "unknown")
CATEGORY_SEPARATOR = "|"
# Ids are printable tokens: no whitespace, no separators that break URLs or CSV.
ID_PATTERN = r"^[A-Za-z0-9_.:@-]{1,128}$"


def category_set(category: object) -> frozenset[str]:
    """An item's categories from its ``category`` value (``CATEGORY_SEPARATOR``-joined; a
    missing or empty value has none)."""
    if not isinstance(category, str) or not category:
        return frozenset()
    return frozenset(c for c in category.split(CATEGORY_SEPARATOR) if c)


@dataclass(frozen=True)
class Column:
    """One column of a contract: its logical type and whether it may be null."""

    name: str
    dtype: str  # "string", "float", "bool", "timestamp"
    nullable: bool = False
    required: bool = True  # an optional column may be absent from a drop; it is then null


@dataclass(frozen=True)
class TableContract:
    name: str
    key: str
    columns: tuple[Column, ...]
    time_column: str
    foreign_keys: dict[str, str] = field(default_factory=dict)  # column -> table

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def required_names(self) -> list[str]:
        return [c.name for c in self.columns if c.required]

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)


USERS = TableContract(
    name="users",
    key="user_id",
    time_column="signup_ts",
    columns=(
        Column("user_id", "string"),
        Column("age_bucket", "string"),
        Column("country", "string"),
        Column("signup_source", "string"),
        Column("signup_ts", "timestamp"),
        # Demographics that some sources carry (MovieLens); absent elsewhere.
        Column("gender", "string", nullable=True, required=False),
        Column("occupation", "string", nullable=True, required=False),
    ),
)

ITEMS = TableContract(
    name="items",
    key="item_id",
    time_column="published_ts",
    columns=(
        Column("item_id", "string"),
        Column("title", "string"),
        Column("category", "string"),
        Column("description", "string", nullable=True),
        Column("in_stock", "bool"),
        Column("published_ts", "timestamp"),
    ),
)

EVENTS = TableContract(
    name="events",
    key="event_id",
    time_column="ts",
    foreign_keys={"user_id": "users", "item_id": "items"},
    columns=(
        Column("event_id", "string"),
        Column("user_id", "string"),
        Column("item_id", "string"),
        Column("event_type", "string"),
        # A rating's stars, a view's dwell seconds; null for events that carry no value.
        Column("value", "float", nullable=True),
        Column("ts", "timestamp"),
        Column("session_id", "string"),
        Column("device", "string"),
        # Ties an outcome to the impression that caused it; null outside served traffic.
        Column("request_id", "string", nullable=True),
        # The 0-based rank of the shown item in its list (an impression's, and an outcome's
        # tied to one): the ranker's position feature. Null where no source logged it.
        Column("position", "float", nullable=True, required=False),
    ),
)

CONTRACTS: dict[str, TableContract] = {"users": USERS, "items": ITEMS, "events": EVENTS}


def conform(df: pd.DataFrame, contract: TableContract) -> pd.DataFrame:
    """Cast an already valid frame to the contract's dtypes and column order.

    Optional columns that are absent are added as nulls. This does not validate: a value
    that does not fit raises. Validation (``components.validation``) is the step that
    separates good rows from bad ones before this is called on untrusted data.
    """
    out = pd.DataFrame(index=df.index)
    for col in contract.columns:
        values = df[col.name] if col.name in df.columns else pd.Series(None, index=df.index)
        if col.dtype == "string":
            out[col.name] = values.astype("string")
        elif col.dtype == "float":
            out[col.name] = pd.to_numeric(values).astype("float64")
        elif col.dtype == "bool":
            out[col.name] = values.astype("bool")
        elif col.dtype == "timestamp":
            out[col.name] = pd.to_datetime(values, utc=True).astype("datetime64[us, UTC]")
    return out
