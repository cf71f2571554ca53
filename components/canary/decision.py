"""The decision rule: guardrails, then the tests of the canary against stable and the holdout."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from components.canary.arms import ArmStats
from components.canary.stats import z_test_not_worse, z_test_worse
from recsys.config import CanaryConfig

Decision = Literal["promote", "rollback", "wait", "noop"]
RULE = (
    "guardrails first: canary error rate > max_error_rate, canary popularity-fallback rate > "
    "max_fallback_rate or canary p99 latency > max_p99_latency_ms "
    "(with >= guardrail_min_requests canary requests) -> rollback at once; "
    "canary or stable below min_requests_per_arm requests or min_impressions impressions -> wait; "
    "canary CTR/request significantly below stable's (one-sided pooled z-test, p < alpha) -> rollback; "
    "canary significantly below the holdout's (same test, holdout with enough requests) -> rollback; "
    "canary CTR/request significantly above stable's minus margin (one-sided non-inferiority z-test, "
    "p < alpha) -> promote; otherwise -> wait"
)


def compare(new: ArmStats, base: ArmStats, config: CanaryConfig, margin: float) -> dict[str, Any]:
    """Both one-sided tests of ``new`` against ``base`` on click-through per request."""
    counts = (new.clicked_requests, new.requests, base.clicked_requests, base.requests)
    z_w, p_w = z_test_worse(*counts)
    z_n, p_n = z_test_not_worse(*counts, margin)
    return {
        "metric": "ctr_request",
        "new": new.arm,
        "base": base.arm,
        "difference": new.ctr_request - base.ctr_request,
        "relative_lift": (new.ctr_request / base.ctr_request - 1) if base.ctr_request else None,
        "worse": {
            "test": "one-sided pooled two-proportion z-test, H1: new < base",
            "z": z_w,
            "p": p_w,
            "significant": p_w < config.alpha,
        },
        "not_worse": {
            "test": f"one-sided non-inferiority z-test (unpooled), H1: new - base > -{margin}",
            "margin": margin,
            "z": z_n,
            "p": p_n,
            "significant": p_n < config.alpha,
        },
    }


def check_guardrails(canary: ArmStats, config: CanaryConfig) -> dict[str, Any]:
    """Error rate, popularity-fallback rate and p99 latency of the canary against their limits.

    Guardrails need no comparison and no large sample: a canary that fails requests, whose
    model calls fail or time out (its users answered from popularity), or that is slow hurts
    users now, so it rolls back as soon as ``guardrail_min_requests`` requests show it.
    """
    broken: list[str] = []
    checked = canary.requests >= config.guardrail_min_requests
    if checked and canary.error_rate > config.max_error_rate:
        rate, limit = canary.error_rate, config.max_error_rate
        broken.append(f"error rate {rate:.2%} ({canary.errors}/{canary.requests}) > {limit:.2%}")
    if checked and canary.fallback_rate > config.max_fallback_rate:
        rate, limit = canary.fallback_rate, config.max_fallback_rate
        broken.append(f"fallback rate {rate:.2%} ({canary.fallbacks}/{canary.requests}) > {limit:.2%}")
    if checked and canary.latency_p99_ms is not None and canary.latency_p99_ms > config.max_p99_latency_ms:
        broken.append(f"p99 latency {canary.latency_p99_ms:.1f} ms > {config.max_p99_latency_ms:g} ms")
    return {"checked": checked, "ok": not broken, "broken": broken}


def decide(stats: Mapping[str, ArmStats], config: CanaryConfig) -> dict[str, Any]:
    """Apply the rule (``RULE``) to measured arms: promote, rollback or wait, with the reason.

    In order, the first that holds wins:

    1. a guardrail is broken (``check_guardrails``) -> ``rollback``;
    2. canary or stable has fewer than ``min_requests_per_arm`` requests or
       ``min_impressions`` impressions -> ``wait``;
    3. the canary's CTR per request is significantly below stable's (pooled z-test,
       p < alpha) -> ``rollback``;
    4. the holdout has at least ``min_requests_per_arm`` requests and the canary is
       significantly below it -> ``rollback`` (a model worse than popularity is broken);
    5. the canary is significantly not worse than stable by more than ``margin``
       (non-inferiority z-test, p < alpha) -> ``promote``;
    6. otherwise -> ``wait`` (inconclusive: more traffic will tell).

    Rollback is tested before promotion, so a canary significantly (if slightly) worse is
    never promoted even where the margin would tolerate it.
    """
    canary, stable, holdout = stats["canary"], stats["stable"], stats["holdout"]
    guardrails = check_guardrails(canary, config)
    tests: dict[str, Any] = {"canary_vs_stable": compare(canary, stable, config, config.margin)}
    holdout_ready = holdout.requests >= config.min_requests_per_arm
    if holdout.requests:
        tests["canary_vs_holdout"] = compare(canary, holdout, config, 0.0)

    def result(decision: Decision, reason: str) -> dict[str, Any]:
        return {"decision": decision, "reason": reason, "guardrails": guardrails, "tests": tests,
                "rule": RULE}  # fmt: skip

    if not guardrails["ok"]:
        return result("rollback", "guardrail broken: " + "; ".join(guardrails["broken"]))
    short = [
        f"{a.arm} has {a.requests} requests (< {config.min_requests_per_arm})"
        for a in (canary, stable)
        if a.requests < config.min_requests_per_arm
    ] + [
        f"{a.arm} has {a.impressions} impressions (< {config.min_impressions})"
        for a in (canary, stable)
        if a.impressions < config.min_impressions
    ]
    if short:
        return result("wait", "not enough data: " + "; ".join(short))
    vs_stable = tests["canary_vs_stable"]
    ctr = f"CTR/request canary {canary.ctr_request:.4f} vs stable {stable.ctr_request:.4f}"
    p_worse, p_not_worse = vs_stable["worse"]["p"], vs_stable["not_worse"]["p"]
    if vs_stable["worse"]["significant"]:
        return result("rollback", f"canary significantly worse than stable: {ctr}, p={p_worse:.3g}")
    if holdout_ready and tests["canary_vs_holdout"]["worse"]["significant"]:
        p = tests["canary_vs_holdout"]["worse"]["p"]
        return result(
            "rollback",
            f"canary significantly worse than the popularity holdout: CTR/request "
            f"{canary.ctr_request:.4f} vs {holdout.ctr_request:.4f}, p={p:.3g}",
        )
    if vs_stable["not_worse"]["significant"]:
        return result(
            "promote",
            f"canary not worse than stable beyond margin {config.margin}: {ctr}, p={p_not_worse:.3g}",
        )
    return result(
        "wait",
        f"inconclusive: {ctr}; worse p={p_worse:.3g}, not-worse p={p_not_worse:.3g}",
    )
