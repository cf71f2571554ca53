"""Prometheus metrics at ``/monitoring/prometheus/metrics``, in two families.

1. TF Serving's own series, under the names its Prometheus exporter gives them (the
   monitoring path with ``/`` turned into ``:``): ``:tensorflow:serving:request_count``
   (model_name, status), ``:tensorflow:serving:request_latency`` (a histogram in
   microseconds by model_name, API, entrypoint), ``:tensorflow:serving:runtime_latency``,
   ``:tensorflow:cc:saved_model:load_attempt_count`` (model_path, status) and
   ``:tensorflow:serving:model_warmup_latency``. Dashboards built on these work unchanged
   against the production TF Serving image.
2. Extras of this stand-in only (``model_server_*``): requests and latency per model,
   version and signature, and load failures per version. TF Serving does not export
   these, so a dashboard that must also run against production should not depend on them.

Label values come only from what the server was configured with and loaded: a request for a
model the server never heard of is counted under ``UNKNOWN_MODEL`` (its version and signature
empty), so names in URLs cannot grow the series without bound.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# TF Serving's request latency buckets: exponential, 10us * 1.8^i, 33 of them (~ 2.6e9 us).
_TF_BUCKETS_US = [10.0 * 1.8**i for i in range(33)]
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# The model label of requests naming a model that is not in the server's configuration.
UNKNOWN_MODEL = "<unknown>"
# TF Serving's default PrometheusConfig path.
PROMETHEUS_PATH = "/monitoring/prometheus/metrics"


def _labels(names: Iterable[str], values: Iterable[str]) -> str:
    pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(names, values, strict=True))
    return "{" + pairs + "}" if pairs else ""


def _escape(v: str) -> str:
    return v.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


class _TfCounter:
    def __init__(self, name: str, labels: tuple[str, ...]) -> None:
        self.name, self.labels = name, labels
        self.values: dict[tuple[str, ...], float] = defaultdict(float)

    def inc(self, *values: str) -> None:
        self.values[values] += 1

    def render(self) -> list[str]:
        lines = [f"# TYPE {self.name} counter"]
        lines += [f"{self.name}{_labels(self.labels, k)} {v:g}" for k, v in sorted(self.values.items())]
        return lines


class _TfHistogram:
    def __init__(self, name: str, labels: tuple[str, ...]) -> None:
        self.name, self.labels = name, labels
        self.counts: dict[tuple[str, ...], list[int]] = {}
        self.sums: dict[tuple[str, ...], float] = defaultdict(float)

    def observe(self, value: float, *values: str) -> None:
        counts = self.counts.setdefault(values, [0] * (len(_TF_BUCKETS_US) + 1))
        i = next((j for j, b in enumerate(_TF_BUCKETS_US) if value <= b), len(_TF_BUCKETS_US))
        counts[i] += 1
        self.sums[values] += value

    def render(self) -> list[str]:
        lines = [f"# TYPE {self.name} histogram"]
        for key, counts in sorted(self.counts.items()):
            cumulative = 0
            for bound, c in zip([*_TF_BUCKETS_US, float("inf")], counts, strict=True):
                cumulative += c
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f"{self.name}_bucket{_labels((*self.labels, 'le'), (*key, le))} {cumulative}")
            lines.append(f"{self.name}_sum{_labels(self.labels, key)} {self.sums[key]:g}")
            lines.append(f"{self.name}_count{_labels(self.labels, key)} {cumulative}")
        return lines


class Metrics:
    """Every metric the model server exports; thread-safe; one instance per server."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Models the manager has configured (set_available, record_load): the only model labels.
        self._models: set[str] = set()
        self.request_count = _TfCounter(":tensorflow:serving:request_count", ("model_name", "status"))
        self.request_latency = _TfHistogram(
            ":tensorflow:serving:request_latency", ("model_name", "API", "entrypoint")
        )
        self.runtime_latency = _TfHistogram(
            ":tensorflow:serving:runtime_latency", ("model_name", "API", "runtime")
        )
        self.load_attempts = _TfCounter(
            ":tensorflow:cc:saved_model:load_attempt_count", ("model_path", "status")
        )
        self.warmup_latency = _TfHistogram(
            ":tensorflow:serving:model_warmup_latency", ("model_path", "status")
        )

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "model_server_requests",
            "Requests by model, version, signature, API, protocol and status code (stand-in extra).",
            ["model", "version", "signature", "api", "protocol", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "model_server_request_latency_seconds",
            "Request latency by model, version, signature, API and protocol (stand-in extra).",
            ["model", "version", "signature", "api", "protocol"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.load_failures = Counter(
            "model_server_load_failures",
            "Failed load attempts of a model version (stand-in extra).",
            ["model", "version", "code"],
            registry=self.registry,
        )
        self.available_versions = Gauge(
            "model_server_available_versions",
            "Versions of a model that are AVAILABLE (stand-in extra).",
            ["model"],
            registry=self.registry,
        )

    def record_request(
        self,
        *,
        model: str,
        version: int | None,
        signature: str,
        api: str,
        protocol: str,
        code: str,
        seconds: float,
    ) -> None:
        """Count one request. ``api`` is TF Serving's name: ``predict``, ``GetModelMetadata``, ...

        ``version`` and ``signature`` must be what served (None and "" when nothing did); a
        ``model`` the server is not configured with is counted as ``UNKNOWN_MODEL``.
        """
        entrypoint = "GRPC" if protocol == "grpc" else "REST"
        with self._lock:
            if model not in self._models:
                model, version, signature = UNKNOWN_MODEL, None, ""
            self.request_count.inc(model, code)
            self.request_latency.observe(seconds * 1e6, model, api, entrypoint)
            if code == "OK":
                self.runtime_latency.observe(seconds * 1e6, model, api, "TF2")
        v = "" if version is None else str(version)
        self.requests.labels(model, v, signature, api, protocol, code).inc()
        self.latency.labels(model, v, signature, api, protocol).observe(seconds)

    def record_load(
        self, *, model: str, version: int, path: str, code: str, warmup_seconds: float | None
    ) -> None:
        with self._lock:
            self._models.add(model)
            self.load_attempts.inc(path, "success" if code == "OK" else "fail")
            if warmup_seconds is not None:
                self.warmup_latency.observe(warmup_seconds * 1e6, path, code)
        if code != "OK":
            self.load_failures.labels(model, str(version), code).inc()

    def set_available(self, model: str, count: int) -> None:
        with self._lock:
            self._models.add(model)
        self.available_versions.labels(model).set(count)

    def render(self) -> bytes:
        """The Prometheus text page: TF Serving's series, then the stand-in's extras."""
        with self._lock:
            lines: list[str] = []
            for m in (
                self.request_count,
                self.request_latency,
                self.runtime_latency,
                self.load_attempts,
                self.warmup_latency,
            ):
                lines += m.render()
        return ("\n".join(lines) + "\n").encode() + generate_latest(self.registry)
