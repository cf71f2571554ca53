"""What the gateway knows of a user per request: the online store's row, and its own memory.

The row comes from the Feast online store with a deadline; when the store fails or is late
the last row read for the user stands in, else the defaults ("nothing known", which is what
a brand-new user looks like). ``UserActivity`` holds what the user did since this process
started, so an event posted a moment ago counts even if the store has not caught up.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

from recsys.config import Settings
from recsys.feature_schema import POSITIVE_EVENT_TYPES, RANKER_SERVICE, RETRIEVER_SERVICE

log = logging.getLogger("serving.gateway")
USER_VIEWS = ("user_profile", "user_engagement", "user_recent_items")
# Last good online row per user, used only while the store fails: a warm user keeps their
# personalization through a short outage. Bounded in users and age (stale beyond that).
FEATURE_CACHE_USERS = 50_000
FEATURE_CACHE_SECONDS = 600.0


class RowCache:
    """A bounded, thread-safe LRU of user rows with a maximum age."""

    def __init__(self, max_users: int, max_age_s: float) -> None:
        self.max_users, self.max_age_s = max_users, max_age_s
        self._rows: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, user_id: str, row: dict[str, Any]) -> None:
        with self._lock:
            self._rows.pop(user_id, None)
            self._rows[user_id] = (time.monotonic(), row)
            while len(self._rows) > self.max_users:
                self._rows.popitem(last=False)

    def get(self, user_id: str) -> dict[str, Any] | None:
        with self._lock:
            hit = self._rows.get(user_id)
        if hit is None or time.monotonic() - hit[0] > self.max_age_s:
            return None
        return hit[1]


class UserFeatures:
    """The user's online feature row, read with a deadline on a small pool of threads.

    Args:
        settings: the configuration (feature windows, ``gateway.feature_timeout_ms``).
        store: the Feast store whose user views the retrieval and ranking services read.
    """

    def __init__(self, settings: Settings, store: Any) -> None:
        from recsys.online_features import entity_row_reader, feature_defaults, service_features

        self.settings = settings
        refs = service_features(store, [RETRIEVER_SERVICE, RANKER_SERVICE])
        self.refs = [r for r in refs if r.split(":", 1)[0] in USER_VIEWS]
        self.defaults = feature_defaults(store, self.refs)
        self._user_row = entity_row_reader(store, self.refs, "user_id")
        windows = sorted(settings.features.windows_days)
        self.events_feature = f"user_events_{windows[-1]}d"
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="features")
        self._cache = RowCache(FEATURE_CACHE_USERS, FEATURE_CACHE_SECONDS)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _read_user(self, user_id: str) -> dict[str, Any]:
        # No store_lock: it orders the writers (a push reads, modifies and writes a row). The
        # stores' clients take concurrent reads (SQLite in serialized mode with a cursor per
        # read; Redis with a connection pool), and a read beside a push sees the row before or
        # after it. With the lock, reads queued behind each other under load (features stage
        # p50 ~8 ms instead of ~6 at 8 clients in bench/serving).
        return self._user_row(user_id)

    def read(self, user_id: str) -> tuple[dict[str, Any], bool, str]:
        """The user's online row with defaults filled: (row, known to the store, where it came from).

        The source is ``online``; or, when the store fails or misses its deadline, ``cached``
        (the last row read for this user within ``FEATURE_CACHE_SECONDS``) or ``defaults``.
        """
        future = self._pool.submit(self._read_user, user_id)
        try:
            raw = future.result(timeout=self.settings.gateway.feature_timeout_ms / 1000)
        except Exception as e:  # noqa: BLE001 - a broken store degrades, never to a 500
            if isinstance(e, FutureTimeout):
                future.cancel()
            return self._fallback_row(user_id, e)
        return self._online_row(user_id, raw)

    async def read_async(self, user_id: str) -> tuple[dict[str, Any], bool, str]:
        """``read`` from a running event loop: the loop serves other requests while the store
        answers on the pool, and the deadline is the loop's (``read`` with no loop running)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self.read(user_id)
        try:
            async with asyncio.timeout(self.settings.gateway.feature_timeout_ms / 1000):
                raw = await loop.run_in_executor(self._pool, self._read_user, user_id)
        except Exception as e:  # noqa: BLE001 - a broken store degrades, never to a 500
            return self._fallback_row(user_id, e)
        return self._online_row(user_id, raw)

    def _online_row(self, user_id: str, raw: dict[str, Any]) -> tuple[dict[str, Any], bool, str]:
        self._cache.put(user_id, raw)
        return self._with_defaults(raw, "online")

    def _fallback_row(self, user_id: str, error: Exception) -> tuple[dict[str, Any], bool, str]:
        """The last row read for the user, else the defaults, when the store failed or was late."""
        if not isinstance(error, FutureTimeout | asyncio.TimeoutError):
            log.warning("online feature read failed: %s: %s", type(error).__name__, error)
        cached = self._cache.get(user_id)
        return self._with_defaults(*((cached, "cached") if cached is not None else ({}, "defaults")))

    def _with_defaults(self, raw: dict[str, Any], source: str) -> tuple[dict[str, Any], bool, str]:
        known = any(v is not None for v in raw.values())
        row = {name: (raw.get(name) if raw.get(name) is not None else d) for name, d in self.defaults.items()}
        return row, known, source


@dataclass
class UserState:
    """One user's activity in this process: items touched, recent positive items, event count,
    and how often each item was served to them lately (oldest first)."""

    seen: set[str] = field(default_factory=set)
    recent: list[str] = field(default_factory=list)
    events: int = 0
    shown: dict[str, int] = field(default_factory=dict)

    def passed_over(self) -> dict[str, int]:
        """The items served lately and not engaged with since, and how often each was served."""
        return {i: n for i, n in self.shown.items() if i not in self.seen}


class UserActivity:
    """What each user did since this process started, for requests that follow at once.

    The online store also gets every event (a push), but a push can fail or lag; this keeps
    the gateway's own answer consistent with what it has accepted. Bounded (least recently
    active users are forgotten first); the nightly feature rebuild is the source of truth.
    """

    def __init__(self, max_users: int = 100_000, max_items: int = 20, max_shown: int = 200) -> None:
        self.max_users, self.max_items, self.max_shown = max_users, max_items, max_shown
        self._users: OrderedDict[str, UserState] = OrderedDict()
        self._lock = threading.Lock()

    def update(self, event: dict[str, Any]) -> None:
        if event["event_type"] == "impression":
            return  # shown is not touched: it neither counts as activity nor hides the item
        with self._lock:
            st = self._most_recent(event["user_id"])
            st.events += 1
            st.seen.add(event["item_id"])
            if event["event_type"] in POSITIVE_EVENT_TYPES:
                st.recent = [event["item_id"], *[i for i in st.recent if i != event["item_id"]]][
                    : self.max_items
                ]

    def get(self, user_id: str) -> UserState:
        with self._lock:
            st = self._users.get(user_id)
            return UserState(set(st.seen), list(st.recent), st.events, dict(st.shown)) if st else UserState()

    def served(self, user_id: str, item_ids: list[str]) -> None:
        """Items the gateway served the user: the session feedback's impressions.

        The gateway's own answer, not posted ``impression`` events: it knows what it served
        whether or not a client posts impressions, and counting both would count twice. The
        ``max_shown`` items served most recently are kept.
        """
        if not item_ids or self.max_shown <= 0:
            return
        with self._lock:
            st = self._most_recent(user_id)
            for item in item_ids:
                st.shown[item] = st.shown.pop(item, 0) + 1
            while len(st.shown) > self.max_shown:
                del st.shown[next(iter(st.shown))]

    def _most_recent(self, user_id: str) -> UserState:
        """The user's state, made the most recently active (the least recent beyond
        ``max_users`` forgotten); the caller holds the lock."""
        st = self._users.pop(user_id, None) or UserState()
        self._users[user_id] = st
        while len(self._users) > self.max_users:
            self._users.popitem(last=False)
        return st
