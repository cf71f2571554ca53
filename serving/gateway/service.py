"""The gateway's work, apart from HTTP: recommend, take events, find similar items.

A recommendation request goes through these stages (each timed, each with a way out):

1. **arm**: a sticky hash of the user id picks ``stable``, ``canary`` or the popularity
   ``holdout`` (``policy.assign_arm``); the arm names the model label to call.
2. **features**: the user's row from the Feast online store (profile, engagement counts,
   recent items), with a deadline; on a miss the request goes on with defaults ("nothing
   known"), which is exactly what a brand-new user looks like. Items the user touched
   since the last push are merged in from the gateway's own memory, so an event posted a
   moment ago counts even if the store has not caught up.
3. **candidates**: users with fewer than ``cold_start_min_events`` events get popularity in
   their segment blended with content neighbours of what they touched; everyone else gets
   ~1000 candidates down ``fallback_chain``: the model server's retrieval (query tower +
   ScaNN), exact search over the version's exported embeddings in this process, segment
   popularity, global popularity. Each step taken past the first is counted.
4. **filter**: already seen, excluded by the request, out of stock, business rules.
5. **rank**: one batched predict of every surviving candidate against the ranker; the
   objectives' outputs are combined with the configured weights (or the model's ``score``).
6. **re-rank**: MMR over the top of the ranked list for diversity, then exploration slots
   for new items nobody has engaged with yet, so they can earn a signal.
7. **log**: each shown item becomes an ``impression`` event with the request id and the arm
   (written by a background thread: impressions are not worth a disk flush per request;
   posted events are).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import queue
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from recsys.config import Settings
from recsys.event_log import open_event_log
from recsys.event_log.base import EventLog, ServedRequest
from recsys.feature_schema import (
    POSITIVE_EVENT_TYPES,
    RANK_CANDIDATES_SIGNATURE,
    RANKER_SERVICE,
    RETRIEVER_SERVICE,
)
from recsys.ranking import rank_fusion
from serving.clients import ModelServerClient, ModelServerError
from serving.gateway.catalog import (
    ItemCatalog,
    ModelVersions,
    RetrievalAssets,
    build_item_catalog,
    load_model_versions,
)
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.policy import assign_arm, insert_exploration, mmr, sample_positions
from serving.gateway.schemas import Event, RecommendationRequest

log = logging.getLogger("serving.gateway")
USER_VIEWS = ("user_profile", "user_engagement", "user_recent_items")
# A dependency that failed hard is not called again for this long (a tiny circuit breaker):
# a dead model server then costs one timeout per window, not one per request.
BREAKER_SECONDS = {"UNAVAILABLE": 1.0, "DEADLINE_EXCEEDED": 1.0, "NOT_FOUND": 5.0, "FAILED_PRECONDITION": 5.0}
# Failures that mean "the server is down or too busy", as opposed to "cannot serve this model".
OVERLOAD_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")
SIMILAR_REASON_MIN = 0.5  # cosine above which "similar to X" is a fair explanation
# Last good online row per user, used only while the store fails: a warm user keeps their
# personalization through a short outage. Bounded in users and age (stale beyond that).
FEATURE_CACHE_USERS = 50_000
FEATURE_CACHE_SECONDS = 600.0
IMPRESSION_WRITE_INTERVAL_S = 0.02


def _import_tensorflow_once() -> None:
    """Import TensorFlow and the TF Serving protos now, in one thread, before any other runs.

    Otherwise the refresh thread (loading the query tower) and a request thread (the model
    server client's protos) import them at the same moment, and Python's per-module import
    locks can deadlock (``_DeadlockError``): the refresh fails and the request gets a 500.
    """
    import tensorflow  # noqa: F401
    from tensorflow_serving.apis import (  # noqa: F401
        get_model_metadata_pb2,
        get_model_status_pb2,
        model_management_pb2,
        model_service_pb2_grpc,
        predict_pb2,
        prediction_service_pb2_grpc,
    )

    from serving.model_server import errors, tensors  # noqa: F401


def settle_heap() -> None:
    """Collect once, then exempt every object alive now from later collections (``gc.freeze``).

    The gateway holds a large, long-lived heap (~580k tracked objects: TensorFlow and Feast
    modules, the item cache, the model versions). A full collection walks all of it with the
    GIL held: 250-340 ms on the 2-core bench machine, a stall of every request in flight. One
    ran about every second while the item cache and the query tower loaded, into the first
    seconds of traffic, and one runs whenever enough objects made at request time (cached rows
    per user, say) have survived. Frozen, that heap is no longer walked (a full collection then
    sees ~20k objects). Called after each snapshot swap, which therefore costs one full
    collection on the refresh thread; unfreezing first lets the replaced snapshot's cycles be
    collected, so a refresh leaks nothing.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class NotReady(RuntimeError):
    """The gateway has not loaded its models and item cache yet."""


class UnknownItem(LookupError):
    """An item id that the serving index does not hold."""


class _RowCache:
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


@dataclass
class _UserState:
    seen: set[str] = field(default_factory=set)
    recent: list[str] = field(default_factory=list)
    events: int = 0


class UserActivity:
    """What each user did since this process started, for requests that follow at once.

    The online store also gets every event (a push), but a push can fail or lag; this keeps
    the gateway's own answer consistent with what it has accepted. Bounded (least recently
    active users are forgotten first); the nightly feature rebuild is the source of truth.
    """

    def __init__(self, max_users: int = 100_000, max_items: int = 20) -> None:
        self.max_users, self.max_items = max_users, max_items
        self._users: OrderedDict[str, _UserState] = OrderedDict()
        self._lock = threading.Lock()

    def update(self, event: dict[str, Any]) -> None:
        if event["event_type"] == "impression":
            return  # shown is not touched: it neither counts as activity nor hides the item
        with self._lock:
            st = self._users.pop(event["user_id"], None) or _UserState()
            self._users[event["user_id"]] = st
            st.events += 1
            st.seen.add(event["item_id"])
            if event["event_type"] in POSITIVE_EVENT_TYPES:
                st.recent = [event["item_id"], *[i for i in st.recent if i != event["item_id"]]][
                    : self.max_items
                ]
            while len(self._users) > self.max_users:
                self._users.popitem(last=False)

    def get(self, user_id: str) -> _UserState:
        with self._lock:
            st = self._users.get(user_id)
            return _UserState(set(st.seen), list(st.recent), st.events) if st else _UserState()


@dataclass
class _Snapshot:
    """Models and item cache that one request uses from start to end (swapped whole)."""

    versions: ModelVersions
    catalog: ItemCatalog
    # Per retrieval version: catalog position of each of its rows, and the reverse (-1: absent).
    to_catalog: dict[int, np.ndarray]
    to_version: dict[int, np.ndarray]
    base_mask: np.ndarray  # business rules: in stock, not an excluded category


class Timer:
    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.ms: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.ms[stage] = round(self.ms.get(stage, 0.0) + (now - self.last) * 1000, 3)
        self.last = now


class Gateway:
    """The recommendation gateway's state and logic; ``serving.gateway.app`` puts HTTP on it.

    Args:
        settings: the configuration (``gateway`` section, feature store, model base path).
        store: a Feast store (default: ``recsys.online_features.get_store(settings)``).
        client: a model server client (default: from ``gateway.model_server_*``).
        event_log: the durable event log (default: ``open_event_log(settings)``, by backend).
    """

    def __init__(
        self,
        settings: Settings,
        store: Any = None,
        client: ModelServerClient | None = None,
        event_log: EventLog | None = None,
    ) -> None:
        from recsys.online_features import entity_row_reader, feature_defaults, get_store, service_features

        self.settings = settings
        gw = settings.gateway
        self.metrics = GatewayMetrics()
        self.store = store if store is not None else get_store(settings)
        # Pushes read-modify-write a user's row, and the item cache reads whole views: they take
        # this lock; per-request reads do not (see _read_user).
        self.store_lock = threading.Lock()
        refs = service_features(self.store, [RETRIEVER_SERVICE, RANKER_SERVICE])
        self.user_refs = [r for r in refs if r.split(":", 1)[0] in USER_VIEWS]
        self.user_defaults = feature_defaults(self.store, self.user_refs)
        self._user_row = entity_row_reader(self.store, self.user_refs, "user_id")
        windows = sorted(settings.features.windows_days)
        self.events_feature = f"user_events_{windows[-1]}d"
        host = gw.model_server_host
        self.client = client or ModelServerClient(
            rest_url=f"http://{host}:{gw.model_server_rest_port}",
            grpc_target=f"{host}:{gw.model_server_grpc_port}",
            timeout=gw.model_timeout_ms / 1000,
            transport=gw.protocol,
        )
        # SQLite file or Redis Streams, by gateway.event_log_backend; the same promises either way.
        self.event_log = event_log or open_event_log(settings)
        self.activity = UserActivity(max_items=settings.features.recent_items)
        self._snapshot: _Snapshot | None = None
        self._load_error: str | None = None
        self._feature_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="features")
        self._feature_cache = _RowCache(FEATURE_CACHE_USERS, FEATURE_CACHE_SECONDS)
        self._broken: dict[str, tuple[float, str]] = {}
        # What a served request leaves behind: its record (arm, versions, latency) and its
        # impressions, written together by one background thread.
        self._impressions: queue.Queue[tuple[ServedRequest, list[dict[str, Any]]] | None] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._status_cache: tuple[float, dict[str, Any]] | None = None
        self._warm_up: dict[str, str] = {}  # last warm-up per label: "ok in N ms" or the error

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, wait: bool = False) -> None:
        """Start the background threads: initial load + refresh, and the impression writer."""
        _import_tensorflow_once()
        for target, name in (
            (self._refresh_loop, "gateway-refresh"),
            (self._write_impressions, "impressions"),
        ):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        if wait:
            deadline = time.monotonic() + 300
            while self._snapshot is None and self._load_error is None and time.monotonic() < deadline:
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._impressions.put(None)
        for t in self._threads:
            t.join(timeout=10)
        self._feature_pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        self.event_log.close()

    def _materialize_mtime(self) -> float:
        path = self.settings.feast_dir / "materialize" / "manifest.json"
        return path.stat().st_mtime if path.is_file() else 0.0

    def refresh(self) -> bool:
        """Reload model versions when models.config changed, items when a materialization landed."""
        from recsys.model_registry import MODELS_CONFIG

        current = self._snapshot
        config = self.settings.models_dir / MODELS_CONFIG
        mtime = config.stat().st_mtime if config.is_file() else 0.0
        mat = self._materialize_mtime()
        if current is not None and current.versions.mtime == mtime and current.catalog.source_mtime == mat:
            return False
        p = self.settings.push
        versions = load_model_versions(
            self.settings.models_dir,
            p.retrieval_model,
            p.ranking_model,
            current.versions if current else None,
        )
        stable = versions.retrieval[versions.version(p.retrieval_model, "stable") or max(versions.retrieval)]
        ids = list(stable.item_ids)
        known = set(map(str, ids))
        for assets in versions.retrieval.values():
            ids += [i for i in assets.item_ids if str(i) not in known]
            known.update(map(str, assets.item_ids))
        if (
            current is not None
            and current.catalog.source_mtime == mat
            and len(current.catalog) == len(ids)
            and all(current.catalog.position.get(str(i)) == n for n, i in enumerate(ids))
        ):
            catalog = current.catalog
        else:
            t0 = time.perf_counter()
            with self.store_lock:
                catalog = build_item_catalog(self.settings, self.store, np.asarray(ids, dtype=object), mat)
            log.info("item cache: %d items in %.1fs", len(catalog), time.perf_counter() - t0)
        to_catalog, to_version = {}, {}
        for v, assets in versions.retrieval.items():
            to_catalog[v] = catalog.positions(assets.item_ids)
            rev = np.full(len(catalog), -1, dtype=np.int64)
            rev[to_catalog[v]] = np.arange(len(assets))
            to_version[v] = rev
        mask = (
            catalog.in_stock.copy()
            if self.settings.gateway.exclude_out_of_stock
            else np.ones(len(catalog), bool)
        )
        for c in self.settings.gateway.excluded_categories:
            mask &= ~catalog.category_mask(c)
        snap = _Snapshot(versions, catalog, to_catalog, to_version, mask)
        # Before the snapshot serves (and before /readyz says ready, on the first load).
        self.warm_up(snap, previous=current)
        self._snapshot = snap
        if "exact" in self.settings.gateway.fallback_chain:
            stable.query_tower()  # load TensorFlow and the tower now, not in the first fallback request
        del current
        settle_heap()
        return True

    def warm_up(
        self, snap: _Snapshot, previous: _Snapshot | None = None, timeout: float = 5.0
    ) -> dict[str, str]:
        """One request per labelled (retrieval, ranking) version pair, with a long deadline.

        A fresh gateway's first model call pays for the gRPC connection and the signature
        metadata; under load that can pass the request deadline, and the breaker would then
        skip the model for a second. Warming here moves that cost before traffic. Pairs the
        previous snapshot already served are not warmed again. The first failure ends the
        warm-up without blocking: the request path has its own fallbacks.
        """
        p = self.settings.push
        served_before = set()
        if previous is not None:
            pv = previous.versions
            served_before = {
                (pv.version(p.retrieval_model, label), pv.version(p.ranking_model, label))
                for label in ("stable", "canary")
            }
        req = RecommendationRequest(user_id="gateway-warmup")
        row = dict(self.user_defaults)
        pos = np.arange(min(len(snap.catalog), 8))
        done: dict[str, str] = {}
        for label in ("stable", "canary"):
            rv = snap.versions.version(p.retrieval_model, label)
            kv = snap.versions.version(p.ranking_model, label)
            if (rv, kv) in served_before:
                continue
            served_before.add((rv, kv))
            versions, t0 = f"retrieval {rv}, ranking {kv}", time.perf_counter()
            try:
                assets = snap.versions.retrieval.get(rv) if rv is not None else None
                if assets is not None:
                    query = self.query_inputs(assets.inputs, row, [], req)
                    self.client.predict(
                        p.retrieval_model, query, label=label, signature_name="retrieve", timeout=timeout
                    )
                ranking = self.ranking_request(snap.versions, kv, {}, row, snap.catalog, pos)
                if ranking is not None:
                    columns, signature = ranking
                    self.client.predict(
                        p.ranking_model, columns, label=label, signature_name=signature, timeout=timeout
                    )
                done[label] = f"{versions}: ok in {(time.perf_counter() - t0) * 1000:.0f} ms"
            except Exception as e:  # noqa: BLE001 - requests have fallbacks; warming is best effort
                done[label] = f"{versions}: {type(e).__name__}: {e}"[:200]
                log.warning("warm-up of %s failed: %s", label, done[label])
                break
        if done:
            log.info("warm-up: %s", done)
            self._warm_up.update(done)
        return done

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
                self._load_error = None
            except Exception as e:  # noqa: BLE001 - keep serving the last good snapshot
                self._load_error = f"{type(e).__name__}: {e}"
                log.exception("gateway refresh failed")
            self._stop.wait(self.settings.gateway.refresh_seconds if self._snapshot else 1.0)

    def snapshot(self) -> _Snapshot:
        snap = self._snapshot
        if snap is None:
            raise NotReady(self._load_error or "loading models and the item cache")
        return snap

    # --- features ----------------------------------------------------------------------

    def _read_user(self, user_id: str) -> dict[str, Any]:
        # No store_lock: it orders the writers (a push reads, modifies and writes a row). The
        # stores' clients take concurrent reads (SQLite in serialized mode with a cursor per
        # read; Redis with a connection pool), and a read beside a push sees the row before or
        # after it. With the lock, reads queued behind each other under load (features stage
        # p50 ~8 ms instead of ~6 at 8 clients in bench/serving).
        return self._user_row(user_id)

    def user_features(self, user_id: str) -> tuple[dict[str, Any], bool, str]:
        """The user's online row with defaults filled: (row, known to the store, where it came from).

        The source is ``online``; or, when the store fails or misses its deadline, ``cached``
        (the last row read for this user within ``FEATURE_CACHE_SECONDS``) or ``defaults``.
        """
        future = self._feature_pool.submit(self._read_user, user_id)
        source = "online"
        try:
            raw = future.result(timeout=self.settings.gateway.feature_timeout_ms / 1000)
            self._feature_cache.put(user_id, raw)
        except Exception as e:  # noqa: BLE001 - a broken store degrades, never to a 500
            if isinstance(e, FutureTimeout):
                future.cancel()
            else:
                log.warning("online feature read failed: %s: %s", type(e).__name__, e)
            cached = self._feature_cache.get(user_id)
            raw, source = (cached, "cached") if cached is not None else ({}, "defaults")
        known = any(v is not None for v in raw.values())
        row = {
            name: (raw.get(name) if raw.get(name) is not None else d)
            for name, d in self.user_defaults.items()
        }
        return row, known, source

    # --- model calls -------------------------------------------------------------------

    def _call(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        label: str,
        signature: str,
        output_filter: Sequence[str] = (),
    ) -> Any:
        now = time.monotonic()
        for key in ("*", model):
            until, code = self._broken.get(key, (0.0, ""))
            if until > now:
                # The same code that opened the breaker: the fallback chain reads it.
                raise ModelServerError(code, f"{model}: skipped while the breaker is open")
        try:
            return self.client.predict(
                model, inputs, label=label, signature_name=signature, output_filter=output_filter
            )
        except ModelServerError as e:
            wait = BREAKER_SECONDS.get(e.code)
            if wait:
                self._broken["*" if e.code in OVERLOAD_CODES else model] = (now + wait, e.code)
            raise

    @staticmethod
    def _column(value: Any, dtype: str, n: int) -> np.ndarray:
        if dtype == "string":
            out = np.empty(n, dtype=object)
            out[:] = str(value)
            return out
        return np.full(n, value, dtype=np.int64 if dtype.startswith("int") else np.float32)

    def query_inputs(
        self, inputs: dict[str, str], row: dict[str, Any], recent: list[str], req: RecommendationRequest
    ) -> dict[str, np.ndarray]:
        """One query row for the query tower, from the user's features and the request context."""
        ctx = req.context
        values = {
            **row,
            "user_id": req.user_id,
            "recent_items": " ".join(recent),
            "hour": ctx.hour if ctx.hour is not None else datetime.now(UTC).hour,
            "device": ctx.device,
        }
        return {
            name: self._column(values.get(name, "" if t == "string" else 0), t, 1)
            for name, t in inputs.items()
        }

    def ranker_inputs(
        self,
        inputs: dict[str, str],
        query: dict[str, np.ndarray],
        row: dict[str, Any],
        catalog: ItemCatalog,
        pos: np.ndarray,
        user_inputs: frozenset[str] = frozenset(),
    ) -> dict[str, np.ndarray]:
        """Columns for the ranker: the item side gathered from the cache for every candidate;
        the user side once (``user_inputs``, the ``rank_candidates`` signature) or repeated
        on every row (pair rows, the ``rank`` signature)."""
        out: dict[str, np.ndarray] = {}
        for name, dtype in inputs.items():
            if name not in user_inputs and (name == "item_id" or name in catalog.columns):
                out[name] = catalog.request_column(name, dtype)[pos]
                continue
            value = query[name][0] if name in query else row.get(name, "" if dtype == "string" else 0)
            out[name] = self._column(value, dtype, 1 if name in user_inputs else len(pos))
        return out

    def ranking_request(
        self,
        versions: ModelVersions,
        version: int | None,
        query: dict[str, np.ndarray],
        row: dict[str, Any],
        catalog: ItemCatalog,
        pos: np.ndarray,
    ) -> tuple[dict[str, np.ndarray], str] | None:
        """The ranking call for a version: its columns and signature (None: inputs not known).

        ``rank_candidates`` (user side once) where the version has it, else pair rows to ``rank``.
        """
        key = version if version is not None else -1
        inputs = versions.ranking_inputs.get(key)
        if not inputs:
            return None
        user_inputs = versions.ranking_user_inputs.get(key, frozenset())
        signature = RANK_CANDIDATES_SIGNATURE if user_inputs else "rank"
        return self.ranker_inputs(inputs, query, row, catalog, pos, user_inputs), signature

    # --- recommendations ---------------------------------------------------------------

    def recommend(self, req: RecommendationRequest) -> dict[str, Any]:
        gw = self.settings.gateway
        snap = self.snapshot()
        catalog, versions = snap.catalog, snap.versions
        timer = Timer()
        request_id = uuid.uuid4().hex
        k = min(req.k or gw.default_k, gw.max_k)
        arm = assign_arm(req.user_id, gw.arm_fractions, gw.arm_salt)
        label = "stable" if arm == "holdout" else arm
        fallback: list[str] = []
        timer.lap("arm")

        row, _known, feature_source = self.user_features(req.user_id)
        if feature_source != "online":
            fallback.append(f"features:{feature_source}")
            self.metrics.fallback("features", feature_source)
        act = self.activity.get(req.user_id)
        stored_recent = str(row.get("recent_items") or "").split()
        recent = list(dict.fromkeys([*act.recent, *stored_recent]))[: self.settings.features.recent_items]
        seen = set(recent) | act.seen | set(req.exclude_item_ids)
        n_events = int(row.get(self.events_feature) or 0) + act.events
        segment = str(row.get(gw.segment_feature) or "")
        timer.lap("features")

        allowed = snap.base_mask.copy()
        if req.filters.categories:
            keep = np.zeros(len(catalog), dtype=bool)
            for c in req.filters.categories:
                keep |= catalog.category_mask(c)
            allowed &= keep
        for c in req.filters.exclude_categories:
            allowed &= ~catalog.category_mask(c)
        allowed[catalog.positions(seen)] = False

        p = self.settings.push
        rv = versions.version(p.retrieval_model, label)
        assets = versions.retrieval.get(rv) if rv is not None else None
        if assets is None:
            assets = versions.retrieval[max(versions.retrieval)]
            rv = assets.version
        model_versions: dict[str, int] = {}
        recent_pos = catalog.positions(recent)
        cold = arm != "holdout" and n_events < gw.cold_start_min_events
        if cold:
            self.metrics.cold_start.inc()
        query: dict[str, np.ndarray] = {}
        reasons: dict[int, str] = {}

        if arm == "holdout":
            pos, scores, source = self._popularity(catalog, segment, allowed, gw.candidates, reasons)
        elif cold:
            pos, scores, source = self._cold_start(snap, assets, recent_pos, segment, allowed, reasons)
        else:
            query = self.query_inputs(assets.inputs, row, recent, req)
            pos, scores, source = self._candidates(
                snap, assets, label, query, segment, allowed, fallback, reasons
            )
            if source in ("retrieval", "exact"):
                model_versions[p.retrieval_model] = rv
        self.metrics.candidate_source.labels(source=source).inc()
        timer.lap("candidates")

        counts = {"retrieved": len(pos)}
        keep = allowed[pos]
        pos, scores = pos[keep], scores[keep]
        counts["ranked"] = 0
        timer.lap("filter")

        if source in ("retrieval", "exact") and len(pos):
            ranked = self._rank(versions, label, query, row, catalog, pos)
            if ranked is None:
                fallback.append("ranking:skipped")
                self.metrics.fallback("ranking", "skipped")
            else:
                # The same fusion of ranker and retrieval ranks that the gate evaluated.
                scores = rank_fusion(ranked, scores, self.settings.evaluation.retrieval_weight)
                counts["ranked"] = len(pos)
                model_versions[p.ranking_model] = versions.version(p.ranking_model, label) or 0
        timer.lap("ranking")

        if len(pos) < k:
            # The ANN returned fewer than asked (or filters removed most): fill from popularity.
            extra_mask = allowed.copy()
            extra_mask[pos] = False
            more = catalog.global_popular[extra_mask[catalog.global_popular]][: k - len(pos)]
            if len(more):
                fallback.append("candidates:topped_up_popularity")
                self.metrics.fallback("candidates", "topped_up_popularity")
                low = (scores.min() if len(scores) else 0.0) - 1.0
                pos = np.concatenate([pos, more])
                scores = np.concatenate([scores, low - np.arange(len(more), dtype=np.float32) * 1e-3])
                for m in more:
                    reasons.setdefault(int(m), "popular right now")

        depth = min(len(pos), max(gw.mmr_depth, k))
        top = np.argsort(-scores, kind="stable")[:depth]
        emb = self._unit(snap, assets, pos[top])
        picked = top[mmr(scores[top], emb, k, gw.mmr_trade_off)] if gw.mmr_trade_off < 1 else top[:k]
        ranked_ids = [str(catalog.item_ids[i]) for i in pos[picked]]
        score_of = {
            str(catalog.item_ids[i]): float(s) for i, s in zip(pos[picked], scores[picked], strict=True)
        }
        timer.lap("mmr")

        explored: set[str] = set()
        if gw.exploration_slots and arm != "holdout":
            rng = np.random.default_rng(int(hashlib.sha256(request_id.encode()).hexdigest()[:16], 16))
            chosen = sample_positions(
                catalog.new_positions, allowed, set(pos[picked].tolist()), gw.exploration_slots, rng
            )
            if len(chosen):
                ranked_ids, explored = insert_exploration(
                    ranked_ids,
                    [str(catalog.item_ids[c]) for c in chosen],
                    k,
                    gw.exploration_slots,
                    gw.exploration_position,
                )
        shown = [catalog.position[item] for item in ranked_ids]
        pairs = zip(ranked_ids, shown, strict=True)
        unexplained = [i for item, i in pairs if item not in explored and i not in reasons]
        explained = self._reasons(snap, assets, unexplained, recent_pos, catalog)
        items = []
        for item, i in zip(ranked_ids, shown, strict=True):
            if item in explored:
                items.append({"item_id": item, "score": None, "reason": "new item: exploring"})
                continue
            reason = reasons.get(i) or explained[i]
            items.append({"item_id": item, "score": round(score_of[item], 6), "reason": reason})
        timer.lap("explore")

        self.metrics.arm.labels(arm=arm).inc()
        served = ServedRequest(
            request_id=request_id,
            user_id=req.user_id,
            arm=arm,
            versions=dict(model_versions),
            ts=datetime.now(UTC),
            latency_ms=round((time.perf_counter() - timer.start) * 1000, 3),
            status="ok",
            fallback=",".join(fallback) or None,
            items=[it["item_id"] for it in items],
        )
        self._log_impressions(served, req, items)
        timer.lap("log")
        timer.ms["total"] = round((time.perf_counter() - timer.start) * 1000, 3)
        for stage, ms in timer.ms.items():
            self.metrics.stage.labels(stage=stage).observe(ms / 1000)
        return {
            "request_id": request_id,
            "user_id": req.user_id,
            "arm": arm,
            "model_versions": model_versions,
            "cold_start": cold,
            "fallback": fallback,
            "candidate_source": source,
            "counts": counts,
            "items": items,
            "timings_ms": timer.ms,
        }

    def _unit(self, snap: _Snapshot, assets: RetrievalAssets, pos: np.ndarray) -> np.ndarray:
        rows = snap.to_version[assets.version][pos]
        emb = assets.unit[np.maximum(rows, 0)]
        emb[rows < 0] = 0.0
        return emb

    def _reasons(
        self,
        snap: _Snapshot,
        assets: RetrievalAssets,
        positions: Sequence[int],
        recent_pos: np.ndarray,
        catalog: ItemCatalog,
    ) -> dict[int, str]:
        """A reason per item: its closest recent item when similar enough, else the model's pick."""
        out = dict.fromkeys(positions, "picked for you: predicted to engage you")
        if len(recent_pos) and positions:
            # One [items x recent] product for the whole list.
            sims = self._unit(snap, assets, np.asarray(positions)) @ self._unit(snap, assets, recent_pos).T
            best = sims.argmax(axis=1)
            for i, j, sim in zip(positions, best, sims[np.arange(len(positions)), best], strict=True):
                if sim >= SIMILAR_REASON_MIN:
                    out[i] = f"similar to {catalog.item_ids[recent_pos[j]]}, which you engaged with"
        return out

    def _popularity(
        self,
        catalog: ItemCatalog,
        segment: str,
        allowed: np.ndarray,
        n: int,
        reasons: dict[int, str],
        source: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray, str]:
        seg = catalog.segment_popular.get(segment) if segment else None
        if seg is not None and len(seg) and source != "global_popularity":
            pos = seg[allowed[seg]][:n]
            # Segment favourites first, then global popularity for the rest of the list.
            rest = catalog.global_popular[allowed[catalog.global_popular]]
            rest = rest[~np.isin(rest, pos)][: max(0, n - len(pos))]
            for q in pos:
                reasons.setdefault(int(q), f"popular in {segment}")
            pos = np.concatenate([pos, rest])
            out_source = "segment_popularity"
        else:
            pos = catalog.global_popular[allowed[catalog.global_popular]][:n]
            out_source = "global_popularity"
        for q in pos:
            reasons.setdefault(int(q), "popular right now")
        scores = -np.arange(len(pos), dtype=np.float32)  # rank order as a score
        return pos, scores, out_source

    def _cold_start(
        self,
        snap: _Snapshot,
        assets: RetrievalAssets,
        recent_pos: np.ndarray,
        segment: str,
        allowed: np.ndarray,
        reasons: dict[int, str],
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """Segment popularity, interleaved with content neighbours of the items the user touched."""
        catalog = snap.catalog
        n = self.settings.gateway.mmr_depth
        pop, _, pop_source = self._popularity(catalog, segment, allowed, n, reasons)
        rows = snap.to_version[assets.version][recent_pos]
        rows = rows[rows >= 0]
        neigh: list[int] = []
        for row_v, _sim, src in assets.neighbours(list(map(int, rows)), 4 * n):
            cp = int(snap.to_catalog[assets.version][row_v])
            if allowed[cp]:
                neigh.append(cp)
                reasons[cp] = f"similar to {assets.item_ids[src]}, which you just engaged with"
            if len(neigh) >= n:
                break
        if not neigh:
            return pop, -np.arange(len(pop), dtype=np.float32), pop_source
        merged: list[int] = []
        for a, b in zip(neigh, list(pop) + [None] * max(0, len(neigh) - len(pop)), strict=False):
            merged += [a] + ([int(b)] if b is not None else [])
        merged = list(dict.fromkeys(merged))
        return np.asarray(merged, dtype=np.int64), -np.arange(len(merged), dtype=np.float32), "cold_start"

    def _candidates(
        self,
        snap: _Snapshot,
        assets: RetrievalAssets,
        label: str,
        query: dict[str, np.ndarray],
        segment: str,
        allowed: np.ndarray,
        fallback: list[str],
        reasons: dict[int, str],
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """Candidates down the configured fallback chain; each step past the first is counted."""
        gw = self.settings.gateway
        catalog = snap.catalog
        overloaded = False
        for n, step in enumerate(gw.fallback_chain):
            if step == "exact" and overloaded:
                # Exact search is for a server that cannot load the index, not for one that is
                # slow or down: running the query tower here under overload would only add load.
                continue
            try:
                if step == "retrieval" and "item_rows" in assets.requirements.get("outputs", ()):
                    # Rows of this version's item list, mapped to the cache with one gather:
                    # no 1000 strings through the proto and a dict.
                    pred = self._call(
                        self.settings.push.retrieval_model, query, label, "retrieve", ("item_rows", "scores")
                    )
                    rows = pred.outputs["item_rows"][0][: gw.candidates].astype(np.int64)
                    sc = pred.outputs["scores"][0][: gw.candidates].astype(np.float32)
                    # A label can move between the snapshot and the call: rows are read with
                    # the item list of the version that answered (REST does not say: ours).
                    served = pred.version or assets.version
                    if served not in snap.to_catalog:
                        raise RuntimeError(f"version {served} answered, not in the gateway's snapshot yet")
                    to_catalog = snap.to_catalog[served]
                    ok = (rows >= 0) & (rows < len(to_catalog))
                    out = to_catalog[rows[ok]], sc[ok], step
                elif step == "retrieval":
                    pred = self._call(self.settings.push.retrieval_model, query, label, "retrieve")
                    ids = pred.outputs["item_ids"][0][: gw.candidates]
                    sc = pred.outputs["scores"][0][: gw.candidates].astype(np.float32)
                    valid = [
                        (catalog.position[i], s)
                        for i, s in zip(ids, sc, strict=True)
                        if i in catalog.position
                    ]
                    pos = np.fromiter((v[0] for v in valid), dtype=np.int64, count=len(valid))
                    out = pos, np.fromiter((v[1] for v in valid), dtype=np.float32, count=len(valid)), step
                elif step == "exact":
                    rows, sc = assets.exact_search(query, gw.candidates)
                    out = snap.to_catalog[assets.version][rows], sc.astype(np.float32), step
                else:
                    out = self._popularity(catalog, segment, allowed, gw.candidates, reasons, step)
            except Exception as e:  # noqa: BLE001 - any failure moves down the chain
                log.warning("candidates from %s failed: %s", step, e)
                overloaded |= isinstance(e, ModelServerError) and e.code in OVERLOAD_CODES
                continue
            if n > 0:
                fallback.append(f"candidates:{out[2]}")
                self.metrics.fallback("candidates", out[2])
            return out
        fallback.append("candidates:none")
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32), "none"

    def _rank(
        self,
        versions: ModelVersions,
        label: str,
        query: dict[str, np.ndarray],
        row: dict[str, Any],
        catalog: ItemCatalog,
        pos: np.ndarray,
    ) -> np.ndarray | None:
        """One batched predict of all candidates; the weighted objective per candidate, or None."""
        model = self.settings.push.ranking_model
        try:
            ranking = self.ranking_request(versions, versions.version(model, label), query, row, catalog, pos)
            if ranking is None:
                return None
            columns, signature = ranking
            # Only the combined score crosses the wire, unless the gateway weighs objectives itself.
            only = () if self.settings.gateway.objective_weights else ("score",)
            pred = self._call(model, columns, label, signature, only)
        except Exception as e:  # noqa: BLE001 - an unranked list beats no list
            log.warning("ranking failed: %s", e)
            return None
        weights = self.settings.gateway.objective_weights
        if weights:
            return sum(
                w * pred.outputs[o].astype(np.float32) for o, w in weights.items() if o in pred.outputs
            )
        return pred.outputs["score"].astype(np.float32)

    # --- impressions -------------------------------------------------------------------

    def _log_impressions(
        self, served: ServedRequest, req: RecommendationRequest, items: Sequence[dict[str, Any]]
    ) -> None:
        ts = served.ts.isoformat()
        session = req.context.session_id or served.request_id
        records = [
            {
                "event_id": f"{served.request_id}:{n}",
                "user_id": req.user_id,
                "item_id": it["item_id"],
                "event_type": "impression",
                "value": None,
                "ts": ts,
                "session_id": session,
                "device": req.context.device,
                "request_id": served.request_id,
                # Beyond the contract's columns, kept in the log's body for canary analysis.
                "arm": served.arm,
                "position": n,
                "model_versions": served.versions,
                "reason": it["reason"],
            }
            for n, it in enumerate(items)
        ]
        self._impressions.put((served, records))
        self.metrics.impressions.labels(arm=served.arm).inc(len(records))

    def log_failed_request(self, user_id: str, latency_ms: float) -> None:
        """Record a request that ended in an error, so the canary guardrail counts it for its arm."""
        gw = self.settings.gateway
        arm = assign_arm(user_id, gw.arm_fractions, gw.arm_salt)
        served = ServedRequest(
            request_id=uuid.uuid4().hex,
            user_id=user_id,
            arm=arm,
            versions={},
            ts=datetime.now(UTC),
            latency_ms=round(latency_ms, 3),
            status="error",
        )
        self._impressions.put((served, []))

    def _write_impressions(self) -> None:
        done = False
        while not done:
            first = self._impressions.get()
            pending = [] if first is None else [first]
            done = first is None
            n_events = sum(len(r) for _, r in pending)
            while not done and n_events < 5000:
                try:
                    more = self._impressions.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    done = True
                else:
                    pending.append(more)
                    n_events += len(more[1])
            if not pending:
                continue
            batch = [e for _, records in pending for e in records]
            try:
                self.event_log.log_served([served for served, _ in pending], batch)
            except Exception:  # noqa: BLE001
                self.metrics.impression_log_failures.inc()
                log.exception("impression log append failed")
            # Let the next requests' records gather before the next write: one wake-up and one
            # commit per window instead of per request. Impressions carry no promise of
            # durability at the answer.
            self._stop.wait(IMPRESSION_WRITE_INTERVAL_S)

    def flush_impressions(self, timeout: float = 5.0) -> None:
        """Wait until the impressions queued so far are written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while not self._impressions.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)

    # --- events ------------------------------------------------------------------------

    def ingest(self, events: Sequence[Event]) -> dict[str, Any]:
        """Durable append first, then the user's in-process state, then the online store."""
        from recsys.online_features import push_event

        records = [e.record() for e in events]
        result = self.event_log.append(records)  # on disk (fsync) before anything else
        accepted = set(result.accepted)
        statuses, taken = [], set()
        new: list[dict[str, Any]] = []
        for rec in records:
            first = rec["event_id"] in accepted and rec["event_id"] not in taken
            taken.add(rec["event_id"])
            statuses.append({"event_id": rec["event_id"], "status": "accepted" if first else "duplicate"})
            if first:
                new.append(rec)
        new.sort(key=lambda r: r["ts"])
        for rec in new:
            self.activity.update(rec)
        pushed = True
        for rec in new:
            try:
                with self.store_lock:
                    push_event(self.store, rec, self.settings.features.recent_items)
            except Exception:  # noqa: BLE001 - the event is durable; the rebuild repairs the store
                pushed = False
                self.metrics.push_failures.inc()
                log.exception("push of event %s failed", rec["event_id"])
        n_dup = len(records) - len(new)
        self.metrics.events.labels(status="accepted").inc(len(new))
        self.metrics.events.labels(status="duplicate").inc(n_dup)
        return {"accepted": len(new), "duplicates": n_dup, "pushed": pushed, "results": statuses}

    # --- similar items -----------------------------------------------------------------

    def similar(self, item_id: str, k: int) -> dict[str, Any]:
        """Content/taste neighbours of an item in the stable retrieval version's embedding space."""
        snap = self.snapshot()
        p = self.settings.push
        v = snap.versions.version(p.retrieval_model, "stable") or max(snap.versions.retrieval)
        assets = snap.versions.retrieval[v]
        row = assets.position.get(item_id)
        if row is None:
            raise UnknownItem(
                f"item_id {item_id!r} is not in the index of {p.retrieval_model} version {v} "
                f"({len(assets):,} items)"
            )
        out = []
        for r, sim, _ in assets.neighbours([row], min(len(assets), 4 * k + 10)):
            cp = int(snap.to_catalog[v][r])
            if snap.base_mask[cp]:
                out.append(
                    {"item_id": str(assets.item_ids[r]), "score": round(sim, 6), "reason": "similar content"}
                )
            if len(out) == k:
                break
        return {"item_id": item_id, "model_versions": {p.retrieval_model: v}, "items": out}

    # --- health ------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when models and items are loaded; the model server's state is reported."""
        snap = self._snapshot
        checks: dict[str, Any] = {"event_log": self.event_log.location}
        if snap is None:
            checks["models"] = self._load_error or "loading"
            return False, checks
        checks["models"] = snap.versions.labels
        checks["items"] = len(snap.catalog)
        now = time.monotonic()
        if self._status_cache is None or now - self._status_cache[0] > 2.0:
            server: dict[str, Any] = {}
            for model in (self.settings.push.retrieval_model, self.settings.push.ranking_model):
                try:
                    states = self.client.status(model, timeout=0.5)
                    server[model] = {str(s.version): s.state for s in states}
                except ModelServerError as e:
                    server[model] = f"{e.code}: {e.message[:200]}"
            self._status_cache = (now, server)
        checks["model_server"] = self._status_cache[1]
        degraded = [
            m
            for m, s in checks["model_server"].items()
            if not isinstance(s, dict) or "AVAILABLE" not in s.values()
        ]
        checks["degraded"] = degraded
        checks["warm_up"] = dict(self._warm_up)
        return True, checks
