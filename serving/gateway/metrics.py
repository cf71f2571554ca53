"""The gateway's Prometheus metrics: latency per stage, traffic per arm, every fallback taken.

One registry per app (not the process-global one), so several gateways in one process (the
tests) keep their own counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Sub-millisecond to a second: the stages live between 0.1 ms (filtering) and the timeouts.
BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.004,
    0.006,
    0.008,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.stage = Histogram(
            "recsys_gateway_stage_seconds",
            "Time per stage of a recommendation request.",
            ["stage"],
            registry=r,
            buckets=BUCKETS,
        )
        self.requests = Counter(
            "recsys_gateway_requests",
            "HTTP requests by endpoint and status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.arm = Counter(
            "recsys_gateway_arm_requests", "Recommendation requests by arm.", ["arm"], registry=r
        )
        self.impressions = Counter(
            "recsys_gateway_impressions", "Items shown (impressions logged) by arm.", ["arm"], registry=r
        )
        self.fallbacks = Counter(
            "recsys_gateway_fallbacks",
            "Degraded paths taken: which stage fell back and to what (candidates:exact, "
            "features:defaults, ranking:skipped, ...).",
            ["stage", "to"],
            registry=r,
        )
        self.candidate_source = Counter(
            "recsys_gateway_candidate_source",
            "Where a request's candidates came from.",
            ["source"],
            registry=r,
        )
        self.cold_start = Counter("recsys_gateway_cold_start", "Requests routed to cold start.", registry=r)
        self.events = Counter(
            "recsys_gateway_events",
            "Posted events by outcome (accepted, duplicate, invalid).",
            ["status"],
            registry=r,
        )
        self.push_failures = Counter(
            "recsys_gateway_push_failures", "Accepted events whose online-store push failed.", registry=r
        )
        self.push_dropped = Counter(
            "recsys_gateway_push_dropped",
            "Accepted events not pushed to the online store because the push queue was full.",
            registry=r,
        )
        self.push_queue = Gauge(
            "recsys_gateway_push_queue", "Accepted events waiting for their online-store push.", registry=r
        )
        self.concurrency_limit = Gauge(
            "recsys_gateway_concurrency_limit",
            "Requests admitted at once: the adaptive limit (gateway.adaptive_concurrency_target_ms), "
            "set when it moves.",
            registry=r,
        )
        self.shed = Counter(
            "recsys_gateway_shed",
            "Requests answered 503 at once because gateway.max_concurrent_requests were in flight.",
            ["endpoint"],
            registry=r,
        )
        self.model_config_applies = Counter(
            "recsys_gateway_model_config_applies",
            "Writes of models.config the gateway put in service on the model server, by outcome "
            "(applied, in_sync: already served, refused: labels put back, unreachable, error).",
            ["result"],
            registry=r,
        )
        self.impression_log_failures = Counter(
            "recsys_gateway_impression_log_failures", "Impression batches the event log refused.", registry=r
        )

        self.exploration = Counter(
            "recsys_gateway_exploration",
            "The exploration bandit's observations: slot impressions (trial) and their clicks (click).",
            ["outcome"],
            registry=r,
        )

    def fallback(self, stage: str, to: str) -> None:
        self.fallbacks.labels(stage=stage, to=to).inc()
