"""Instants are UTC everywhere: the one place where a time is read and normalised.

Data drops, requests and config give times as strings, naive datetimes, aware datetimes or
pandas Timestamps; every module turns them into UTC here, so a naive time means UTC in every
path and two spellings of one instant compare equal.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pandas as pd


def utc_now() -> datetime:
    """The current instant, timezone-aware UTC."""
    return datetime.now(UTC)


def to_utc(value: datetime | str | pd.Timestamp) -> pd.Timestamp:
    """A pandas Timestamp in UTC; a naive value is taken as UTC."""
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def utc_series(values: pd.Series) -> pd.Series:
    """A datetime Series in UTC; naive values are taken as UTC."""
    if values.dt.tz is not None:
        return values.dt.tz_convert("UTC")
    return values.dt.tz_localize("UTC")


def utc_iso(ts: Any) -> str:
    """The instant as UTC ISO 8601; naive times are UTC."""
    if isinstance(ts, str):
        # The common case (the gateway's own records): the standard library parses it faster
        # than pandas, which stays the path for every other spelling.
        try:
            d = datetime.fromisoformat(ts)
        except ValueError:
            d = None
        if d is not None:
            return (d.astimezone(UTC) if d.tzinfo else d.replace(tzinfo=UTC)).isoformat()
    elif isinstance(ts, datetime) and not isinstance(ts, pd.Timestamp):
        return (ts.astimezone(UTC) if ts.tzinfo else ts.replace(tzinfo=UTC)).isoformat()
    return to_utc(pd.Timestamp(ts)).isoformat()


def optional_utc_iso(value: datetime | str | None) -> str | None:
    """``utc_iso`` that lets None through (an open end of a window)."""
    return None if value is None else to_utc(value).isoformat()
