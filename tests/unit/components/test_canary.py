"""The canary's statistics and decision rule on hand-made counts (expected values worked out below)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from components import canary
from components.canary import (
    ArmStats,
    arm_stats,
    decide,
    normal_cdf,
    wilson_interval,
    z_test_not_worse,
    z_test_worse,
)
from recsys.config import CanaryConfig, load_settings

CONFIG = CanaryConfig(
    alpha=0.05,
    min_requests_per_arm=1000,
    min_impressions=5000,
    max_error_rate=0.02,
    max_p99_latency_ms=250,
    guardrail_min_requests=20,
    margin=0.01,
)


def arm(name: str, requests: int, clicked: int, errors: int = 0, p99: float = 80.0, impressions: int = -1):
    """An arm with ``clicked`` of ``requests`` requests clicked, 10 impressions per request by default."""
    impressions = 10 * requests if impressions < 0 else impressions
    return ArmStats(
        arm=name, requests=requests, errors=errors, impressions=impressions, clicks=clicked,
        clicked_requests=clicked, add_to_cart=0, purchases=0,
        latency_p50_ms=20.0, latency_p95_ms=60.0, latency_p99_ms=p99,
    )  # fmt: skip


def test_normal_cdf_known_points():
    # Phi(0) = 1/2; Phi(1.6449) = 0.95 (the one-sided 5% critical value); Phi(-1.96) = 0.025.
    assert normal_cdf(0.0) == 0.5
    assert normal_cdf(1.6449) == pytest.approx(0.95, abs=1e-4)
    assert normal_cdf(-1.96) == pytest.approx(0.025, abs=1e-4)
    assert normal_cdf(math.inf) == 1.0 and normal_cdf(-math.inf) == 0.0


def test_z_test_worse_by_hand():
    # canary 80/1000 = 0.08, stable 100/1000 = 0.10. Pooled p = 180/2000 = 0.09;
    # SE = sqrt(0.09 * 0.91 * (1/1000 + 1/1000)) = sqrt(0.0001638) = 0.012798;
    # z = (0.08 - 0.10) / 0.012798 = -1.5627; one-sided p = Phi(-1.5627) = 0.0591 (not < 0.05).
    z, p = z_test_worse(80, 1000, 100, 1000)
    assert z == pytest.approx(-1.5627, abs=1e-3)
    assert p == pytest.approx(0.0591, abs=1e-3)
    # Ten times the traffic at the same rates: SE shrinks by sqrt(10), z = -4.94, p ~ 4e-7.
    z, p = z_test_worse(800, 10000, 1000, 10000)
    assert z == pytest.approx(-1.5627 * math.sqrt(10), abs=1e-2)
    assert p < 1e-6


def test_z_test_not_worse_by_hand():
    # canary 550/5000 = 0.11, stable 500/5000 = 0.10, margin 0.01 (unpooled: H0 has unequal rates).
    # SE = sqrt(0.11*0.89/5000 + 0.10*0.90/5000) = sqrt(1.958e-5 + 1.8e-5) = 0.0061302;
    # z = (0.11 - 0.10 + 0.01) / 0.0061302 = 3.2625; p = 1 - Phi(3.2625) = 0.00055.
    z, p = z_test_not_worse(550, 5000, 500, 5000, margin=0.01)
    assert z == pytest.approx(3.2625, abs=1e-3)
    assert p == pytest.approx(0.00055, abs=5e-5)
    # Equal rates with margin 0 is no evidence at all: z = 0, p = 1/2.
    assert z_test_not_worse(500, 5000, 500, 5000, margin=0.0) == (0.0, 0.5)


def test_degenerate_counts_do_not_divide_by_zero():
    # No clicks anywhere: the rates are equal, nothing is worse (z = 0, p = 1/2).
    assert z_test_worse(0, 1000, 0, 1000) == (0.0, 0.5)
    # ...and with a margin the canary is certainly within it (SE 0, positive shift: z = +inf).
    assert z_test_not_worse(0, 1000, 0, 1000, margin=0.01)[1] == 0.0
    # An empty arm gives no evidence either way.
    assert z_test_worse(0, 0, 10, 100) == (0.0, 1.0)


def test_wilson_interval_by_hand():
    # 0 of 10 at 95%: z = 1.95996, centre = (z^2/20) / (1 + z^2/10) = 0.19207 / 1.38415 = 0.13876,
    # half width the same, so [0, 0.2775] (Wald would give the useless [0, 0]).
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)
    # 50 of 100: symmetric around 0.5, a little narrower than Wald's +-0.098: [0.4038, 0.5962].
    lo, hi = wilson_interval(50, 100)
    assert (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))


def _stats(canary_arm: ArmStats, stable_arm: ArmStats, holdout_arm: ArmStats | None = None):
    return {"canary": canary_arm, "stable": stable_arm, "holdout": holdout_arm or arm("holdout", 0, 0)}


def test_promote_when_not_worse_beyond_margin():
    # The numbers of test_z_test_not_worse_by_hand: p = 0.00055 < 0.05, worse-test p ~ 0.95.
    out = decide(_stats(arm("canary", 5000, 550), arm("stable", 5000, 500)), CONFIG)
    assert out["decision"] == "promote", out["reason"]
    assert out["tests"]["canary_vs_stable"]["not_worse"]["p"] == pytest.approx(0.00055, abs=5e-5)


def test_equal_ctr_is_promoted_only_with_enough_power():
    # Equal CTR 0.10: z = 0.01 / SE. At 1000 per arm SE = sqrt(2 * 0.09 / 1000) = 0.01342,
    # z = 0.745, p = 0.23: inconclusive -> wait. At 20000 per arm SE = 0.0030, z = 3.33 -> promote.
    small = decide(_stats(arm("canary", 1000, 100), arm("stable", 1000, 100)), CONFIG)
    assert small["decision"] == "wait" and small["reason"].startswith("inconclusive")
    big = decide(_stats(arm("canary", 20000, 2000), arm("stable", 20000, 2000)), CONFIG)
    assert big["decision"] == "promote"


def test_rollback_when_significantly_worse():
    # 800/10000 vs 1000/10000: z = -4.94 (see test_z_test_worse_by_hand) -> rollback.
    out = decide(_stats(arm("canary", 10000, 800), arm("stable", 10000, 1000)), CONFIG)
    assert out["decision"] == "rollback" and "worse than stable" in out["reason"]


def test_rollback_checked_before_promotion():
    # 0.098 vs 0.100 at 400k requests each: significantly worse (z = -2.99) although within
    # the 0.01 margin (the non-inferiority test would pass): rollback wins.
    out = decide(_stats(arm("canary", 400_000, 39_200), arm("stable", 400_000, 40_000)), CONFIG)
    assert out["tests"]["canary_vs_stable"]["not_worse"]["significant"]
    assert out["decision"] == "rollback"


def test_rollback_when_worse_than_popularity_holdout():
    # Canary 0.10 = stable 0.10 but the popularity holdout gets 0.13 at 5000 requests:
    # pooled p = 0.115, SE = sqrt(0.115*0.885*(1/5000 + 1/5000)) = 0.00638, z = -4.70 -> rollback.
    stats = _stats(arm("canary", 5000, 500), arm("stable", 5000, 500), arm("holdout", 5000, 650))
    out = decide(stats, CONFIG)
    assert out["decision"] == "rollback" and "holdout" in out["reason"]
    assert out["tests"]["canary_vs_holdout"]["worse"]["z"] == pytest.approx(-4.70, abs=0.01)


def test_wait_below_minimum_sample():
    out = decide(_stats(arm("canary", 999, 500), arm("stable", 5000, 100)), CONFIG)
    assert out["decision"] == "wait" and "canary has 999 requests" in out["reason"]
    # Enough requests but too few impressions (3 per request: 3000 < 5000).
    out = decide(_stats(arm("canary", 1000, 100, impressions=3000), arm("stable", 5000, 500)), CONFIG)
    assert out["decision"] == "wait" and "3000 impressions" in out["reason"]


def test_guardrails_roll_back_at_once_below_minimum_sample():
    # 30 requests (far below 1000), 3 errors: 10% > 2% -> rollback now.
    out = decide(_stats(arm("canary", 30, 3, errors=3), arm("stable", 30, 3)), CONFIG)
    assert out["decision"] == "rollback" and "error rate 10.00%" in out["reason"]
    # p99 latency 400 ms > 250 ms, even with a better CTR.
    out = decide(_stats(arm("canary", 5000, 900, p99=400), arm("stable", 5000, 500)), CONFIG)
    assert out["decision"] == "rollback" and "p99 latency 400.0 ms" in out["reason"]
    # 10 requests are below guardrail_min_requests (20): 5 errors are not yet a rate -> wait.
    out = decide(_stats(arm("canary", 10, 0, errors=5), arm("stable", 30, 3)), CONFIG)
    assert out["decision"] == "wait" and not out["guardrails"]["checked"]


def _frames():
    """Requests of three arms and their events; one old-canary request to be left out."""
    t = pd.Timestamp("2026-10-31T12:00:00Z")
    requests = pd.DataFrame(
        [
            ("r1", "u1", "stable", {"retrieval": 1, "ranking": 1}, t, 10.0, "ok"),
            ("r2", "u2", "stable", {"retrieval": 1, "ranking": 1}, t, 30.0, "ok"),
            ("r3", "u3", "canary", {"retrieval": 2, "ranking": 2}, t, 20.0, "ok"),
            ("r4", "u4", "canary", {"retrieval": 2, "ranking": None}, t, 40.0, "error"),
            ("r5", "u5", "canary", {"retrieval": 3, "ranking": 3}, t, 90.0, "ok"),  # another canary
            ("r6", "u6", "holdout", {}, t + pd.Timedelta(days=2), 5.0, "ok"),  # after `until`
        ],
        columns=["request_id", "user_id", "arm", "versions", "ts", "latency_ms", "status"],
    )
    events = pd.DataFrame(
        [
            ("r1", "a", "impression"), ("r1", "b", "impression"), ("r1", "a", "click"),
            ("r1", "a", "click"),  # a repeated click on one slot is one click
            ("r1", "a", "purchase"),
            ("r2", "a", "impression"), ("r2", "b", "impression"),
            ("r3", "c", "impression"), ("r3", "z", "click"),  # clicked an item it did not show
            ("r5", "c", "impression"), ("r5", "c", "click"),
        ],
        columns=["request_id", "item_id", "event_type"],
    )  # fmt: skip
    return requests, events


def test_arm_stats_join_outcomes_by_request_and_filter_versions():
    requests, events = _frames()
    serving = {"stable": {"retrieval": 1, "ranking": 1}, "canary": {"retrieval": 2, "ranking": 2}}
    stats = arm_stats(requests, events, serving, until=pd.Timestamp("2026-11-01T00:00:00Z"))
    s, c, h = stats["stable"], stats["canary"], stats["holdout"]
    # stable: 2 requests, 4 impressions, 1 clicked slot (r1/a, counted once), 1 purchase.
    assert (s.requests, s.impressions, s.clicks, s.clicked_requests, s.purchases) == (2, 4, 1, 1, 1)
    assert s.ctr_request == 0.5 and s.ctr_impression == 0.25
    # canary: r5 was served by version 3, not the labelled 2 -> excluded; r4 (ranking None) counts.
    assert (c.requests, c.excluded_requests, c.errors, c.error_rate) == (2, 1, 1, 0.5)
    # r3's click on an item it did not show makes the request clicked, but no impression CTR.
    assert (c.impressions, c.clicks, c.clicked_requests) == (1, 0, 1)
    # Latency percentiles over [20, 40] (linear): p50 = 30, p99 = 20 + 0.99 * 20 = 39.8.
    assert c.latency_p50_ms == 30.0 and c.latency_p99_ms == pytest.approx(39.8)
    # holdout's only request is after `until`.
    assert h.requests == 0 and h.latency_p99_ms is None


def test_decision_record_and_report(tmp_path):
    settings = load_settings(overrides={"home": str(tmp_path)})
    requests, events = _frames()
    analysis = canary.analyze_canary(settings.canary, (requests, events))
    record = canary.record_decision(settings, analysis, "wait", "manual", note="looking")
    lines = (tmp_path / "canary" / "decisions.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["arms"]["stable"]["requests"] == 2
    report = Path(record["report"])
    assert report.is_file() and "canary: wait" in report.read_text()
    png = report.parent / "ctr.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert canary.read_decisions(settings)[-1]["note"] == "looking"
