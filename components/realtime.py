"""Real-time features: an accepted event updates the user's recent items and session at once.

A user who clicks something expects the next recommendation to know it. Batch features
arrive daily; the ``user_recent_items`` view is also fed through a Feast push source, so the
gateway's ``POST /v1/events`` (after the durable append) calls ``push_event`` and the next
``get_online_features`` for that user already sees the event: no flush window.

The new state is computed by ``components.features.next_recent_state``, the same rule that
rebuilds the view's batch table from the event log, so the online value after a push is the
value that training data joins for the next event.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd

from components.feature_schema import RECENT_ITEM_FEATURES
from components.features import ONE_US, PUSH_SOURCE, RECENT_VIEW, TIMESTAMP, next_recent_state, to_utc

if TYPE_CHECKING:
    from feast import FeatureStore


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


def push_event(store: FeatureStore, event: Mapping[str, Any], max_items: int = 20) -> dict[str, Any]:
    """Push the effect of one accepted event into the online store (push source, ONLINE).

    Reads the user's current row, applies the event (a positive item goes to the front of
    ``recent_items`` and ``session_items``; a new ``session_id`` starts an empty session) and
    pushes the new row. Only the online store is written: the offline copy of this view is
    rebuilt from the event log by ``recsys features build``, which keeps one writer per file.

    The row is stamped with the event's time, or 1 µs after the stored row if that is later
    (an event that arrives late, or two at one instant): the Redis store ignores a write that
    is not newer than what it holds, SQLite would overwrite with an older state; stamping it
    newer makes both keep the state that includes every event pushed so far.

    Read-modify-write is not atomic: two events of one user pushed concurrently by two
    processes can lose one. The gateway pushes a user's events from one request at a time;
    the nightly rebuild from the event log repairs any loss.

    Args:
        store: an open store (``components.features.get_store``).
        event: an accepted event with at least user_id, item_id, event_type, ts, session_id.
        max_items: length of ``recent_items`` (``features.recent_items``).

    Returns:
        The pushed row: user_id, event_timestamp, recent_items, session_id, session_items.
    """
    from feast.data_source import PushMode

    user_id = str(event["user_id"])
    state, stored_at = read_recent_state(store, user_id)
    new = next_recent_state(state, event, max_items)
    stamp = to_utc(event["ts"])
    if stored_at is not None and stamp <= stored_at:
        stamp = stored_at + ONE_US
    row = {"user_id": user_id, TIMESTAMP: stamp, **new}
    store.push(PUSH_SOURCE, pd.DataFrame([row]), to=PushMode.ONLINE)
    return row
