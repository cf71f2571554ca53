"""The model manager: which versions are loaded, loading and unloading them, labels, status.

This mirrors TF Serving's ``ServerCore`` and ``AspiredVersionsManager``:

- A *source* polls each model's base path every ``--file_system_poll_wait_seconds`` and,
  through the model's version policy, names the *aspired* versions (those that should
  serve). A new version dropped on disk is therefore picked up without a restart.
- The *availability-preserving policy* decides the next action per model: load the
  highest new aspired version; unload a version that is no longer aspired only once an
  aspired version is AVAILABLE (or when nothing is aspired any more). So with
  ``latest { num_versions: 1 }`` version 2 keeps serving until version 3 has loaded, and if
  version 3 fails to load, version 2 simply goes on serving.
- Loads run on background threads: SavedModel load, then warm-up, then AVAILABLE. A failed
  attempt is retried ``--max_num_load_retries`` times, ``--load_retry_interval_micros``
  apart; after the last one the version ends in state END with the error in its status.
- A *state monitor* remembers every version's last state (START, LOADING, AVAILABLE,
  UNLOADING, END) and health, which is what GetModelStatus reports, unloaded versions
  included.
- *Version labels* (``stable``, ``canary``) come from ``models.config`` and are checked at
  every config load *before* the model list changes: a label may only point at a version
  that is AVAILABLE right now. Moving ``canary`` to a version that is not loaded yet
  therefore takes two config updates: one that makes the version aspired (e.g. add it to a
  ``specific`` policy) and, once it is AVAILABLE, one that moves the label.
  ``--allow_version_labels_for_unavailable_models`` relaxes this for labels that are new
  (or keep their version), never for moving an existing label.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from serving.model_server import config as cfg
from serving.model_server.errors import ServingError, from_exception, invalid_argument, not_found
from serving.model_server.metrics import Metrics
from serving.model_server.servable import SERVE_TAG, Servable

log = logging.getLogger("serving.model_server")

START, LOADING, AVAILABLE, UNLOADING, END = "START", "LOADING", "AVAILABLE", "UNLOADING", "END"


@dataclass(frozen=True)
class VersionState:
    """One row of GetModelStatus: a version's manager state and its health."""

    version: int
    state: str
    error_code: str = "OK"
    error_message: str = ""


@dataclass
class CoreOptions:
    """The manager's share of ``tensorflow_model_server``'s flags (same names, same defaults)."""

    file_system_poll_wait_seconds: float = 1.0
    max_num_load_retries: int = 5
    load_retry_interval_micros: int = 60_000_000
    num_load_threads: int = 0
    allow_version_labels_for_unavailable_models: bool = False
    enable_model_warmup: bool = True
    num_request_iterations_for_warmup: int = 1
    saved_model_tags: tuple[str, ...] = (SERVE_TAG,)


@dataclass
class _Harness:
    """A version the manager knows of (TF's LoaderHarness): its state and, once ready, the servable."""

    model: str
    version: int
    path: Path
    aspired: bool = True
    state: str = "new"  # new | loading | ready | error | unloading
    servable: Servable | None = None
    error: ServingError | None = None
    cancel: threading.Event = field(default_factory=threading.Event)


class ServerCore:
    """Serves the models of a ``ModelServerConfig`` from their base paths, version by version.

    Args:
        options: polling, retry, warm-up and label settings.
        metrics: where load attempts and availability are counted.
        servable_loader: how one version folder becomes a ``Servable`` (the SavedModel loader).
    """

    def __init__(
        self,
        options: CoreOptions | None = None,
        metrics: Metrics | None = None,
        servable_loader: Callable[[str, int, Path, tuple[str, ...]], Servable] | None = None,
    ) -> None:
        self.options = options or CoreOptions()
        self.metrics = metrics or Metrics()
        self._load_servable = servable_loader or (lambda m, v, p, t: Servable.load(m, v, p, t))
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._config_lock = threading.Lock()  # one ReloadConfig at a time, as TF's config_mu_
        self._config: cfg.ModelServerConfig | None = None
        self._models: dict[str, cfg.ModelConfig] = {}
        self._labels: dict[str, dict[str, int]] | None = None
        self._harnesses: dict[tuple[str, int], _Harness] = {}
        self._monitor: dict[str, dict[int, VersionState]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, self.options.num_load_threads), thread_name_prefix="model-load"
        )
        self._thread: threading.Thread | None = None
        self._polled_once = False

    # --- configuration --------------------------------------------------------------

    @property
    def config(self) -> cfg.ModelServerConfig | None:
        return self._config

    def reload_config(self, new_config: cfg.ModelServerConfig, timeout: float | None = None) -> None:
        """Apply a config, as ``ServerCore::ReloadConfig`` (startup, file poll, HandleReloadConfigRequest).

        Order, as in TF Serving: validate; check the version labels against the versions
        available now; then add, update and remove models; then wait for *new* models to
        load (all models on the first config). A refused config changes nothing.

        Raises:
            ServingError: INVALID_ARGUMENT / FAILED_PRECONDITION for a refused config,
                UNKNOWN when a newly added model did not become available.
        """
        with self._config_lock:
            first = self._config is None
            if new_config.WhichOneof("config") is None:
                if first:
                    log.info("Taking no action for empty config.")
                    return
                raise ServingError(
                    "FAILED_PRECONDITION",
                    "Cannot transition to requested config. It is only legal to transition "
                    "from one ModelConfigList to another.",
                )
            cfg.validate_model_server_config(new_config, self._config)
            new_models = {m.name: m for m in new_config.model_config_list.config}
            with self._lock:
                labels = self._check_labels(new_models)
                added = [n for n in new_models if n not in self._models]
                self._config = new_config
                self._models = new_models
                self._labels = labels
                for (model, _), h in self._harnesses.items():
                    if model not in new_models:
                        h.aspired = False
                self._poll_filesystem()
                waiting = {n: self._aspired_now(n) for n in (list(new_models) if first else added)}
            self._ensure_thread()
            self._wake.set()
            self._await_loads(waiting, first, timeout)

    def _check_labels(self, new_models: dict[str, cfg.ModelConfig]) -> dict[str, dict[str, int]]:
        new_labels: dict[str, dict[str, int]] = {}
        for name, model in new_models.items():
            states = self._monitor.get(name, {})
            for label, version in cfg.version_labels(model).items():
                allow = False
                if self.options.allow_version_labels_for_unavailable_models:
                    existing = (self._labels or {}).get(name, {}).get(label)
                    allow = existing is None or existing == version
                state = states.get(version)
                if not allow and (state is None or state.state != AVAILABLE):
                    raise ServingError(
                        "FAILED_PRECONDITION",
                        f"Request to assign label to version {version} of model {name}, "
                        "which is not currently available for inference",
                    )
                new_labels.setdefault(name, {})[label] = version
        return new_labels

    def _aspired_now(self, model: str) -> list[int]:
        return [v for (m, v), h in self._harnesses.items() if m == model and h.aspired]

    def _await_loads(self, waiting: dict[str, list[int]], first: bool, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                pending = [
                    (m, v)
                    for m, versions in waiting.items()
                    for v in versions
                    if (h := self._harnesses.get((m, v))) is not None and h.state in ("new", "loading")
                ]
                if not pending or self._stop.is_set():
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise ServingError("DEADLINE_EXCEEDED", f"Timed out waiting for {pending} to load")
                self._changed.wait(timeout=0.5 if left is None else min(left, 0.5))
            failed = []
            for m, versions in waiting.items():
                if any(
                    self._monitor.get(m, {}).get(v, VersionState(v, END)).state == AVAILABLE for v in versions
                ):
                    continue
                for v in versions:
                    s = self._monitor.get(m, {}).get(v)
                    if s is not None and s.error_code != "OK":
                        failed.append(
                            f"{{name: {m} version: {v}}} due to error: {s.error_code}: {s.error_message}"
                        )
            if failed:
                what = "servable(s)" if first else "model(s)"
                raise ServingError(
                    "UNKNOWN", f"{len(failed)} {what} did not become available: {{{', '.join(failed)}}}"
                )

    # --- the source: polling base paths ---------------------------------------------

    def _poll_filesystem(self) -> None:
        """Recompute every model's aspired versions from disk (caller holds the lock)."""
        self._polled_once = True
        for name, model in self._models.items():
            on_disk = cfg.list_versions(model.base_path)
            if not on_disk:
                log.warning("No versions of servable %s found under base path %s", name, model.base_path)
            aspired = set(cfg.aspired_versions(model, on_disk))
            for (m, v), h in self._harnesses.items():
                if m == name:
                    h.aspired = v in aspired
            for v in aspired:
                if (name, v) not in self._harnesses:
                    self._harnesses[(name, v)] = _Harness(name, v, on_disk[v])
                    self._set_state(name, v, START)

    # --- the manager loop -----------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="model-manager", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        interval = self.options.file_system_poll_wait_seconds
        next_poll = time.monotonic() + interval if interval > 0 else float("inf")
        while not self._stop.is_set():
            with self._lock:
                if time.monotonic() >= next_poll:
                    self._poll_filesystem()
                    next_poll = time.monotonic() + interval
                self._manage()
            wait = None if next_poll == float("inf") else max(0.0, next_poll - time.monotonic())
            self._wake.wait(timeout=wait)
            self._wake.clear()

    def poll_now(self) -> None:
        """Poll the base paths at once (what the next poll tick would do)."""
        with self._lock:
            self._poll_filesystem()
        self._wake.set()

    def _manage(self) -> None:
        """Apply the availability-preserving policy to every model (caller holds the lock)."""
        models = {m for (m, _) in self._harnesses}
        for model in models:
            harnesses = [h for (m, _), h in self._harnesses.items() if m == model]
            for h in harnesses:
                # Versions no longer aspired that never served are simply forgotten; a retrying
                # load is cancelled.
                if not h.aspired and h.state in ("new", "error"):
                    del self._harnesses[(h.model, h.version)]
                    if h.state == "new":
                        self._set_state(model, h.version, END)
                elif not h.aspired and h.state == "loading":
                    h.cancel.set()
            while (action := self._next_action(model)) is not None:
                kind, h = action
                if kind == "unload":
                    self._unload(h)
                else:
                    h.state = "loading"
                    self._set_state(model, h.version, LOADING)
                    self._executor.submit(self._load, h)
            self.metrics.set_available(
                model, sum(1 for (m, _), h in self._harnesses.items() if m == model and h.state == "ready")
            )

    def _next_action(self, model: str) -> tuple[str, _Harness] | None:
        hs = [h for (m, _), h in self._harnesses.items() if m == model]
        has_aspired = any(h.aspired for h in hs)
        has_aspired_ready = any(h.aspired and h.state == "ready" for h in hs)
        unaspired_ready = [h for h in hs if not h.aspired and h.state == "ready"]
        if unaspired_ready and (not has_aspired or has_aspired_ready or len(unaspired_ready) > 1):
            return "unload", min(unaspired_ready, key=lambda h: h.version)
        new = [h for h in hs if h.aspired and h.state == "new"]
        if new:
            return "load", max(new, key=lambda h: h.version)
        return None

    def _unload(self, h: _Harness) -> None:
        h.state = "unloading"
        self._set_state(h.model, h.version, UNLOADING)
        # Requests in flight keep their own reference; the graph is freed when they finish.
        h.servable = None
        del self._harnesses[(h.model, h.version)]
        self._set_state(h.model, h.version, END)
        log.info("Unloaded servable version {name: %s version: %s}", h.model, h.version)

    def _load(self, h: _Harness) -> None:
        attempts = max(0, self.options.max_num_load_retries) + 1
        error: ServingError | None = None
        servable: Servable | None = None
        for attempt in range(attempts):
            warmup_s: float | None = None
            try:
                servable = self._load_servable(h.model, h.version, h.path, self.options.saved_model_tags)
                if self.options.enable_model_warmup:
                    t0 = time.perf_counter()
                    records = servable.warmup(self.options.num_request_iterations_for_warmup)
                    if records:
                        warmup_s = time.perf_counter() - t0
                        log.info(
                            "Finished reading warmup data for model at %s. Number of warmup records "
                            "read: %d.",
                            h.path,
                            records,
                        )
                error = None
                self.metrics.record_load(
                    model=h.model, version=h.version, path=str(h.path), code="OK", warmup_seconds=warmup_s
                )
                break
            except Exception as e:  # noqa: BLE001 - a failed load is the version's status, not a crash
                servable = None
                error = from_exception(e)
                self.metrics.record_load(
                    model=h.model, version=h.version, path=str(h.path), code=error.code, warmup_seconds=None
                )
                log.error("Loading servable: {name: %s version: %s} failed: %s", h.model, h.version, error)
                if attempt + 1 < attempts:
                    log.info(
                        "Retrying load of {name: %s version: %s} in %.1fs",
                        h.model,
                        h.version,
                        self.options.load_retry_interval_micros / 1e6,
                    )
                    if h.cancel.wait(self.options.load_retry_interval_micros / 1e6) or self._stop.is_set():
                        break
        with self._changed:
            if servable is not None:
                h.servable = servable
                h.state = "ready"
                self._set_state(h.model, h.version, AVAILABLE)
                log.info("Successfully loaded servable version {name: %s version: %s}", h.model, h.version)
            else:
                h.state = "error"
                err = error or ServingError("CANCELLED", "Load cancelled")
                self._set_state(h.model, h.version, END, err)
            self._changed.notify_all()
        self._wake.set()

    def _set_state(self, model: str, version: int, state: str, error: ServingError | None = None) -> None:
        self._monitor.setdefault(model, {})[version] = VersionState(
            version, state, error.code if error else "OK", error.message if error else ""
        )
        with self._changed:
            self._changed.notify_all()

    # --- requests -------------------------------------------------------------------

    def resolve_version(self, name: str, version: int | None = None, label: str | None = None) -> int | None:
        """The version a request names (by number, by label, or None for the latest)."""
        if label:
            with self._lock:
                if self._labels is None:
                    raise ServingError("UNAVAILABLE", f"Model labels does not init yet.{label}")
                v = self._labels.get(name, {}).get(label)
            if v is None:
                raise invalid_argument(f"Unrecognized servable version label: {label}")
            return v
        return version

    def get_servable(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The servable a ModelSpec asks for (``ServerCore::GetServableHandle``).

        Args:
            name: the model name.
            version: a specific version, or None.
            label: a version label, or None. Latest AVAILABLE version when neither is given.

        Raises:
            ServingError: INVALID_ARGUMENT for a missing name or unknown label, NOT_FOUND when
                the model or version is not AVAILABLE.
        """
        if not name:
            raise invalid_argument("ModelSpec has no name specified.")
        if version is not None and label:
            raise invalid_argument(
                f"Both model version ({version}) and model version label ({label}) cannot be supplied."
            )
        v = self.resolve_version(name, version, label)
        with self._lock:
            if v is not None:
                h = self._harnesses.get((name, v))
                if h is None or h.state != "ready" or h.servable is None:
                    raise not_found(f"Servable not found for request: Specific({name}, {v})")
                return h.servable
            ready = [
                h for (m, _), h in self._harnesses.items() if m == name and h.state == "ready" and h.servable
            ]
            if not ready:
                raise not_found(f"Servable not found for request: Latest({name})")
            best = max(ready, key=lambda h: h.version)
            assert best.servable is not None
            return best.servable

    def model_status(self, name: str, version: int | None = None) -> list[VersionState]:
        """GetModelStatus: every version the monitor has seen, highest first, or just one.

        Raises:
            ServingError: NOT_FOUND, with TF Serving's messages.
        """
        if not name:
            raise invalid_argument("Missing model name in request.")
        with self._lock:
            states = dict(self._monitor.get(name, {}))
        if version is not None:
            if version not in states:
                raise not_found(f"Could not find version {version} of model {name}")
            return [states[version]]
        if not states:
            raise not_found(f"Could not find any versions of model {name}")
        return [states[v] for v in sorted(states, reverse=True)]

    def labels(self, name: str) -> dict[str, int]:
        with self._lock:
            return dict((self._labels or {}).get(name, {}))

    def wait_until_settled(self, timeout: float = 10.0) -> bool:
        """Block until no version is loading (a test and CLI helper)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while any(h.state in ("new", "loading") for h in self._harnesses.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(timeout=min(left, 0.5))
        return True

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            for h in self._harnesses.values():
                h.cancel.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._executor.shutdown(wait=False, cancel_futures=True)
