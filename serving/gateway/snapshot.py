"""The models and item cache a request reads, loaded off the request path and swapped whole.

A background thread first puts a changed ``models.config`` in service on the model server
(``apply_config``: ``serving.gateway.config_sync``), then reloads model versions when
``models.config`` changes and the item cache when a materialization lands, warms each new
(retrieval, ranking) version pair with one request, then swaps the new ``Snapshot`` in: a
request that took the previous one keeps it to the end.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from recsys.config import Settings
from serving.gateway.catalog import (
    ItemCatalog,
    ModelVersions,
    RetrievalAssets,
    build_item_catalog,
    load_model_versions,
)
from serving.gateway.model_calls import ModelCalls
from serving.gateway.schemas import RecommendationRequest

log = logging.getLogger("serving.gateway")
FIRST_LOAD_TIMEOUT_S = 300.0
RETRY_SECONDS = 1.0  # between attempts while nothing has loaded yet
# While a snapshot is rebuilt beside traffic, the refresh thread pauses after each step of the
# item cache's build (a chunk of items read, a derived column) for this many times as long as
# the step took (``Pacer``): it then holds the GIL about a third of the time, and the requests
# the rest (BENCHMARKS.md, "a materialization mid-traffic").
REBUILD_PAUSE_RATIO = 2.0


class NotReady(RuntimeError):
    """The gateway has not loaded its models and item cache yet."""


def import_tensorflow_once() -> None:
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


@contextlib.contextmanager
def collections_paused() -> Iterator[None]:
    """No automatic garbage collection inside the block (it is back as it was after).

    For the start, before anything is frozen: the imports, the feature store and the first
    snapshot make hundreds of thousands of long-lived objects, and each automatic full
    collection on the way walks all of them so far with the GIL held, dozens of times as the
    heap grows (BENCHMARKS.md, "the gateway's start"). ``settle_heap`` collects once after the
    first load instead, which finds the same garbage. A later rebuild needs no pause: the
    heap is frozen by then, and a collection walks only what was made since.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


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


@dataclass
class Snapshot:
    """Models and item cache that one request uses from start to end (swapped whole)."""

    versions: ModelVersions
    catalog: ItemCatalog
    # Per retrieval version: catalog position of each of its rows, and the reverse (-1: absent).
    to_catalog: dict[int, np.ndarray]
    to_version: dict[int, np.ndarray]
    base_mask: np.ndarray  # business rules: in stock, not an excluded category

    def unit_rows(self, assets: RetrievalAssets, pos: np.ndarray) -> np.ndarray:
        """Unit embeddings of catalog positions in ``assets``' space (zeros where it lacks the item)."""
        rows = self.to_version[assets.version][pos]
        emb = assets.unit[np.maximum(rows, 0)]
        emb[rows < 0] = 0.0
        return emb


class SnapshotRefresher:
    """Loads the snapshot, keeps it current on a background thread, and hands it to requests.

    Args:
        settings: the configuration (models dir, push model names, gateway business rules).
        store: the Feast store the item cache is read from. The rebuild after a
            materialization reads it without the pushes' lock (pushes write user rows, the
            cache reads item views) and swaps in when done, so events and requests go on.
        model_calls: the model server client and the input builders, for the warm-up.
        user_defaults: a user row with nothing known, for the warm-up requests.
        apply_config: called on the refresh thread before each refresh once a snapshot
            serves: applies a changed ``models.config`` to the model server, so the gateway's
            snapshot moves to new labels only after the server has (or has refused them).
    """

    def __init__(
        self,
        settings: Settings,
        store: Any,
        model_calls: ModelCalls,
        user_defaults: dict[str, Any],
        apply_config: Callable[[], object] | None = None,
    ) -> None:
        self.settings = settings
        self.apply_config = apply_config
        self.store = store
        self.model_calls = model_calls
        self.user_defaults = user_defaults
        self.current: Snapshot | None = None
        self.load_error: str | None = None
        self.warm_up_results: dict[str, str] = {}  # last warm-up per label: "ok in N ms" or the error
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the refresh thread (initial load, then a reload check every ``refresh_seconds``)."""
        import_tensorflow_once()
        self._thread = threading.Thread(target=self._refresh_loop, name="gateway-refresh", daemon=True)
        self._thread.start()

    def wait_loaded(self, timeout: float = FIRST_LOAD_TIMEOUT_S) -> None:
        """Block until the first load has served a snapshot or failed (or ``timeout`` passed)."""
        deadline = time.monotonic() + timeout
        while self.current is None and self.load_error is None and time.monotonic() < deadline:
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            if self.current is not None and self.apply_config is not None:
                self.apply_config()
            try:
                self.refresh()
                self.load_error = None
            except Exception as e:  # noqa: BLE001 - keep serving the last good snapshot
                error = f"{type(e).__name__}: {e}"
                # One trace per distinct failure, not one per retry (every second while a
                # dependency is down before the first load); /readyz shows the error meanwhile.
                if error != self.load_error:
                    log.exception("gateway refresh failed")
                else:
                    log.debug("gateway refresh failed again: %s", error)
                self.load_error = error
            self._stop.wait(self.settings.gateway.refresh_seconds if self.current else RETRY_SECONDS)

    def get(self) -> Snapshot:
        """The snapshot now serving; ``NotReady`` before the first load."""
        snap = self.current
        if snap is None:
            raise NotReady(self.load_error or "loading models and the item cache")
        return snap

    # --- refresh -----------------------------------------------------------------------

    def _materialize_mtime(self) -> float:
        path = self.settings.feast_dir / "materialize" / "manifest.json"
        return path.stat().st_mtime if path.is_file() else 0.0

    def refresh(self) -> bool:
        """Reload model versions when models.config changed, items when a materialization landed."""
        from recsys.model_registry import MODELS_CONFIG

        current = self.current
        config = self.settings.models_dir / MODELS_CONFIG
        mtime = config.stat().st_mtime if config.is_file() else 0.0
        mat = self._materialize_mtime()
        if current is not None and current.versions.mtime == mtime and current.catalog.source_mtime == mat:
            return False
        # The first load serves nothing yet: built at full speed, with no automatic collections.
        first = current is None
        with collections_paused() if first else contextlib.nullcontext():
            snap, stable = self._build(current, mat, 0.0 if first else REBUILD_PAUSE_RATIO)
            # Before the snapshot serves (and before /readyz says ready, on the first load):
            # the model calls warmed, TensorFlow and the query tower loaded (not in the first
            # fallback request), and, on the first load, the heap settled. Each of these holds
            # the GIL for hundreds of milliseconds; done after the swap, they stalled the first
            # second of traffic a ready gateway took (BENCHMARKS.md).
            self.warm_up(snap, previous=current)
            if "exact" in self.settings.gateway.fallback_chain:
                stable.query_tower()
        if first:
            settle_heap()
            self.current = snap
        else:
            self.current = snap
            # The replaced snapshot is collectable only once it no longer serves.
            del current
            settle_heap()
        return True

    def _build(
        self, current: Snapshot | None, mat: float, pause_ratio: float
    ) -> tuple[Snapshot, RetrievalAssets]:
        """The snapshot of the model versions and item cache on disk now (the item cache of
        ``current`` when its items and materialization are the same), and its stable
        retrieval version; the item cache read with ``pause_ratio`` (``read_item_features``)."""
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
            catalog = build_item_catalog(
                self.settings, self.store, np.asarray(ids, dtype=object), mat, pause_ratio
            )
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
        return Snapshot(versions, catalog, to_catalog, to_version, mask), stable

    def warm_up(
        self, snap: Snapshot, previous: Snapshot | None = None, timeout: float = 5.0
    ) -> dict[str, str]:
        """One request per labelled (retrieval, ranking) version pair, with a long deadline.

        A fresh gateway's first model call pays for the gRPC connection and the signature
        metadata; under load that can pass the request deadline, and the breaker would then
        skip the model for a second. Warming here moves that cost before traffic. Pairs the
        previous snapshot already served are not warmed again. The first failure ends the
        warm-up without blocking: the request path has its own fallbacks.
        """
        p = self.settings.push
        calls, client = self.model_calls, self.model_calls.client
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
                    query = calls.query_inputs(assets.inputs, row, [], req)
                    client.predict(
                        p.retrieval_model, query, label=label, signature_name="retrieve", timeout=timeout
                    )
                ranking = calls.ranking_request(snap.versions, kv, {}, row, snap.catalog, pos)
                if ranking is not None:
                    columns, signature = ranking
                    client.predict(
                        p.ranking_model, columns, label=label, signature_name=signature, timeout=timeout
                    )
                done[label] = f"{versions}: ok in {(time.perf_counter() - t0) * 1000:.0f} ms"
            except Exception as e:  # noqa: BLE001 - requests have fallbacks; warming is best effort
                done[label] = f"{versions}: {type(e).__name__}: {e}"[:200]
                log.warning("warm-up of %s failed: %s", label, done[label])
                break
        if done:
            log.info("warm-up: %s", done)
            self.warm_up_results.update(done)
        return done
