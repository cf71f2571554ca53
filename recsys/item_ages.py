"""When each recent item happened, and how long before a query: the state and the query input.

The ``user_recent_items`` state holds ``recent_items`` (item ids, newest first) and, aligned
with it, ``recent_item_times``: the epoch seconds of the positive event that put each item
there (its latest one), ``UNKNOWN`` where the time is not known (a row written before the
times were kept). The query tower reads ``recent_item_ages``: for the same items in the same
order, the whole seconds between each item's time and the query's (the request, or the
training example's event), ``UNKNOWN`` where the time is not known. All three are
space-joined strings, so they travel through Feast, frames and SavedModel signatures as the
item ids do.

Training measures ages from the example's own time, serving from the request's: a query
never sees an item's future.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

import pandas as pd

# A time or an age that is not known (the tower's "unknown age" bucket).
UNKNOWN = "-1"


def epoch_seconds(ts: datetime | pd.Timestamp | str | float | int) -> int:
    """Whole epoch seconds of a time (a timestamp, an ISO string, or seconds already)."""
    if isinstance(ts, int | float):
        return int(ts)
    stamp = pd.Timestamp(ts)
    if stamp.tzinfo is None:
        stamp = stamp.tz_localize("UTC")
    return int(stamp.timestamp())


def _tokens(text: object) -> list[str]:
    """A space-joined string's tokens; nothing for a missing value (None, NaN)."""
    return text.split() if isinstance(text, str) else []


def split_times(text: object, n: int) -> list[str]:
    """A space-joined ``recent_item_times`` (or ages) as ``n`` tokens: cut, or padded with ``UNKNOWN``."""
    tokens = _tokens(text)[:n]
    return tokens + [UNKNOWN] * (n - len(tokens))


def ages(times: Iterable[str], now: int) -> str:
    """Seconds from each time to ``now`` (``UNKNOWN`` stays unknown; a time after ``now`` is age 0)."""
    out = []
    for t in times:
        try:
            seconds = int(float(t))
        except ValueError:
            seconds = -1
        out.append(UNKNOWN if seconds < 0 else str(max(now - seconds, 0)))
    return " ".join(out)


def ages_of(items: Sequence[str], stored_items: object, stored_times: object, now: int) -> str:
    """``recent_item_ages`` of ``items`` from a stored state (``recent_items``, ``recent_item_times``).

    ``items`` may differ from the stored list (the gateway puts the user's events it has seen
    itself in front): each item takes the time stored for it, ``UNKNOWN`` when it has none.
    """
    stored = _tokens(stored_items)
    time_of = dict(zip(reversed(stored), reversed(split_times(stored_times, len(stored))), strict=True))
    return ages((time_of.get(i, UNKNOWN) for i in items), now)


def frame_ages(recent_items: pd.Series, recent_item_times: pd.Series, at: pd.Series) -> list[str]:
    """``recent_item_ages`` of each row: its items' times (aligned, newest first) against ``at``."""
    now = (pd.to_datetime(at, utc=True) - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
    return [
        ages(split_times(times, len(_tokens(items))), int(t))
        for items, times, t in zip(recent_items, recent_item_times, now, strict=True)
    ]
