"""Canary analysis: does the newest model serve users at least as well as the stable one?

After a push, ``models.config`` labels two versions of each model: ``stable`` (most traffic)
and ``canary`` (the newest). The gateway assigns each user to an arm by a sticky hash —
``stable``, ``canary``, or a popularity ``holdout`` that no model serves — and logs every
request it answers with its arm, model versions, latency and status, plus impressions and
outcomes (click, add_to_cart, purchase, ...) as events carrying the ``request_id``
(``recsys.event_log.sqlite``). This module reads that log, measures each arm, and decides:

- ``rollback``: a guardrail broke (the canary's error rate or p99 latency above its limit —
  checked first, and acted on at once, even before a sample is large enough for a CTR
  test), or the canary is significantly worse than stable (or than the popularity holdout);
- ``promote``: the canary is significantly *not worse* than stable beyond a margin
  (a non-inferiority test);
- ``wait``: not enough requests or impressions yet, or the tests are inconclusive;
- ``noop``: no rollout in progress (no ``models.config``, or canary == stable).

The metric is click-through **per request** (the share of served requests with at least one
click): users are randomized into arms, and requests are much closer to independent trials
than the impressions inside one response, whose clicks are correlated (a user who clicks
one slot is likelier to click another). Click-through per impression is reported beside it.

Promotion sets ``stable := canary`` for both models (retrieval and ranking), rollback sets
``canary := stable``. Every decision, automatic (the ``canary_rollout`` DAG) or manual
(``recsys canary promote|rollback``), is appended with its numbers to
``<home>/canary/decisions.jsonl`` and gets an HTML report with a CTR plot.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
import pandas as pd

from recsys.config import CanaryConfig, Settings
from recsys.event_log import read_configured_log
from recsys.event_log.base import OUTCOME_COLUMNS
from recsys.event_log.sqlite import read_sqlite_log
from recsys.layout import canary_dir
from recsys.model_registry import RegistryError, move_labels, rollout_in_progress, serving_labels
from recsys.storage import code_version
from recsys.timeutil import optional_utc_iso, to_utc, utc_now

ARMS = ("stable", "canary", "holdout")
Decision = Literal["promote", "rollback", "wait", "noop"]
DECISIONS_FILE = "decisions.jsonl"
RULE = (
    "guardrails first: canary error rate > max_error_rate or canary p99 latency > max_p99_latency_ms "
    "(with >= guardrail_min_requests canary requests) -> rollback at once; "
    "canary or stable below min_requests_per_arm requests or min_impressions impressions -> wait; "
    "canary CTR/request significantly below stable's (one-sided pooled z-test, p < alpha) -> rollback; "
    "canary significantly below the holdout's (same test, holdout with enough requests) -> rollback; "
    "canary CTR/request significantly above stable's minus margin (one-sided non-inferiority z-test, "
    "p < alpha) -> promote; otherwise -> wait"
)


class CanaryError(RuntimeError):
    """The rollout cannot be changed as asked (no models.config, a missing version folder...)."""


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def normal_cdf(z: float) -> float:
    """Phi(z), the standard normal CDF, exact at +-inf."""
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion: stays inside [0, 1] and behaves at 0 or n successes.

    The plain Wald interval p +- z*sqrt(p(1-p)/n) collapses to a point at p = 0 and spills
    below 0 for small counts; Wilson's does neither, which matters for a young canary.
    """
    if trials <= 0:
        return (0.0, 1.0)
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def z_test_worse(x_new: int, n_new: int, x_base: int, n_base: int) -> tuple[float, float]:
    """One-sided two-proportion z-test of H1: p_new < p_base. Returns (z, p-value).

    Under H0 (p_new = p_base) both samples share one rate, so the standard error uses the
    pooled proportion x / n over both arms: z = (p_new - p_base) / sqrt(p(1-p)(1/n1 + 1/n2)),
    and the p-value is Phi(z) (small when the new arm is clearly lower).
    """
    if n_new <= 0 or n_base <= 0:
        return (0.0, 1.0)
    p_new, p_base = x_new / n_new, x_base / n_base
    pooled = (x_new + x_base) / (n_new + n_base)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_new + 1 / n_base))
    diff = p_new - p_base
    z = diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))
    return (z, normal_cdf(z))


def z_test_not_worse(x_new: int, n_new: int, x_base: int, n_base: int, margin: float) -> tuple[float, float]:
    """One-sided non-inferiority z-test of H1: p_new - p_base > -margin. Returns (z, p-value).

    The null hypothesis is "the new arm is worse by the margin or more" (p_new - p_base <=
    -margin): the two rates differ under it, so the standard error is unpooled (Wald):
    z = (p_new - p_base + margin) / sqrt(p_new(1-p_new)/n_new + p_base(1-p_base)/n_base),
    p-value = 1 - Phi(z). With margin 0 this is the superiority test of H1: p_new > p_base.
    """
    if n_new <= 0 or n_base <= 0:
        return (0.0, 1.0)
    p_new, p_base = x_new / n_new, x_base / n_base
    se = math.sqrt(p_new * (1 - p_new) / n_new + p_base * (1 - p_base) / n_base)
    shifted = p_new - p_base + margin
    z = shifted / se if se > 0 else (0.0 if shifted == 0 else math.copysign(math.inf, shifted))
    return (z, 1.0 - normal_cdf(z))


# --------------------------------------------------------------------------------------------
# Per-arm measurements
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmStats:
    """What one arm served and what users did with it, over the analysis window."""

    arm: str
    requests: int
    errors: int
    impressions: int  # distinct (request, item) pairs shown
    clicks: int  # distinct (request, item) pairs clicked among those shown
    clicked_requests: int  # requests with at least one click
    add_to_cart: int
    purchases: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    excluded_requests: int = 0  # served by other model versions than the ones labelled now

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def ctr_request(self) -> float:
        return self.clicked_requests / self.requests if self.requests else 0.0

    @property
    def ctr_impression(self) -> float:
        return self.clicks / self.impressions if self.impressions else 0.0

    def to_dict(self, confidence: float = 0.95) -> dict[str, Any]:
        lo, hi = wilson_interval(self.clicked_requests, self.requests, confidence)
        ilo, ihi = wilson_interval(self.clicks, self.impressions, confidence)
        return {
            **asdict(self),
            "error_rate": self.error_rate,
            "ctr_request": self.ctr_request,
            "ctr_request_ci": [lo, hi],
            "ctr_impression": self.ctr_impression,
            "ctr_impression_ci": [ilo, ihi],
        }


def _served_by(versions: Any, wanted: Mapping[str, int]) -> bool:
    """A request counts for an arm only if the versions that served it are the labelled ones.

    After a promotion a new canary starts from zero: requests of the previous canary must not
    vouch for it. A request that names no version for a model (e.g. a fallback that skipped
    it) does not contradict the label.
    """
    if not isinstance(versions, Mapping) or not wanted:
        return True
    return all(versions.get(m) in (None, v) for m, v in wanted.items())


def arm_stats(
    requests: pd.DataFrame,
    events: pd.DataFrame,
    serving: Mapping[str, Mapping[str, int]] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> dict[str, ArmStats]:
    """Measure every arm over requests served in ``[since, until)``.

    Args:
        requests: one row per served request (request_id, arm, versions, ts, latency_ms, status).
        events: impressions and outcomes with their request_id (request_id, item_id, event_type);
            outcomes count whenever they arrive, since a click belongs to the request it follows.
        serving: {"stable": {model: version}, "canary": {...}}: requests of an arm served by
            other versions are left out (and counted as ``excluded_requests``).
        since, until: the window on the request time; None leaves that side open.

    Returns:
        {arm: ArmStats} for stable, canary and holdout (zeros where an arm served nothing).
    """
    req = requests.copy()
    if len(req):
        req["ts"] = pd.to_datetime(req["ts"], utc=True, format="ISO8601")
        if since is not None:
            req = req[req["ts"] >= to_utc(since)]
        if until is not None:
            req = req[req["ts"] < to_utc(until)]
    ev = events.drop_duplicates(OUTCOME_COLUMNS) if len(events) else events
    shown = ev[ev["event_type"] == "impression"]
    clicked = ev[ev["event_type"] == "click"]
    # A click counts for per-impression CTR only on an item that request showed.
    clicks_on_shown = clicked.merge(shown[["request_id", "item_id"]], on=["request_id", "item_id"])
    per_request = pd.DataFrame(
        {
            "impressions": shown.groupby("request_id").size(),
            "clicks": clicks_on_shown.groupby("request_id").size(),
            "any_click": clicked.groupby("request_id").size(),
            "add_to_cart": ev[ev["event_type"] == "add_to_cart"].groupby("request_id").size(),
            "purchases": ev[ev["event_type"] == "purchase"].groupby("request_id").size(),
        }
    )
    out: dict[str, ArmStats] = {}
    for arm in ARMS:
        rows = req[req["arm"] == arm]
        wanted = (serving or {}).get(arm, {})
        keep = np.array([_served_by(v, wanted) for v in rows["versions"]], dtype=bool)
        excluded = int((~keep).sum())
        rows = rows[keep]
        counts = per_request.reindex(rows["request_id"]).fillna(0)
        lat = pd.to_numeric(rows["latency_ms"], errors="coerce").dropna().to_numpy(dtype=float)
        out[arm] = ArmStats(
            arm=arm,
            requests=len(rows),
            errors=int((rows["status"] != "ok").sum()),
            impressions=int(counts["impressions"].sum()),
            clicks=int(counts["clicks"].sum()),
            clicked_requests=int((counts["any_click"] > 0).sum()),
            add_to_cart=int(counts["add_to_cart"].sum()),
            purchases=int(counts["purchases"].sum()),
            latency_p50_ms=_percentile(lat, 50),
            latency_p95_ms=_percentile(lat, 95),
            latency_p99_ms=_percentile(lat, 99),
            excluded_requests=excluded,
        )
    return out


def _percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


# --------------------------------------------------------------------------------------------
# The decision
# --------------------------------------------------------------------------------------------


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
    """Error rate and p99 latency of the canary against their limits.

    Guardrails need no comparison and no large sample: a canary that fails requests or is
    slow hurts users now, so it rolls back as soon as ``guardrail_min_requests`` requests show it.
    """
    broken: list[str] = []
    checked = canary.requests >= config.guardrail_min_requests
    if checked and canary.error_rate > config.max_error_rate:
        rate, limit = canary.error_rate, config.max_error_rate
        broken.append(f"error rate {rate:.2%} ({canary.errors}/{canary.requests}) > {limit:.2%}")
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


# --------------------------------------------------------------------------------------------
# Analysis, records and reports
# --------------------------------------------------------------------------------------------


def analyze_canary(
    config: CanaryConfig,
    source: Path | tuple[pd.DataFrame, pd.DataFrame],
    since: datetime | None = None,
    until: datetime | None = None,
    serving: Mapping[str, Mapping[str, int]] | None = None,
) -> dict[str, Any]:
    """Measure each arm and decide what to do with the canary: the decision manifest.

    Args:
        config: the ``canary`` section (alpha, minimum samples, guardrails, margin).
        source: the gateway's event log (a SQLite path) or frames ``(requests, events)`` as
            ``read_event_log`` returns them.
        since, until: window on request time, ``[since, until)``; None leaves a side open.
        serving: the labelled versions (``serving_labels``). When given and stable == canary
            for every model there is no rollout, and the decision is ``noop``. Requests served
            by other versions than these are left out.

    Returns:
        {decision, reason, arms: {arm: numbers}, tests, guardrails, rule, window, serving,
        config, analyzed_at}.
    """
    requests, events = read_sqlite_log(Path(source)) if isinstance(source, str | Path) else source
    stats = arm_stats(requests, events, serving, since, until)
    verdict = decide(stats, config)
    if serving is not None and not rollout_in_progress(serving):
        why = "no models.config" if not serving else "canary and stable are the same versions"
        verdict = {**verdict, "decision": "noop", "reason": f"no rollout in progress: {why}"}
    return {
        **verdict,
        "arms": {arm: s.to_dict(1 - config.alpha) for arm, s in stats.items()},
        "window": {"since": optional_utc_iso(since), "until": optional_utc_iso(until)},
        "serving": dict(serving) if serving is not None else None,
        "source": str(source) if isinstance(source, str | Path) else "frames",
        "config": config.model_dump(),
        "analyzed_at": utc_now().isoformat(),
    }


def analyze(
    settings: Settings, since: datetime | None = None, until: datetime | None = None
) -> dict[str, Any]:
    """``analyze_canary`` on the configured event log and the labels of ``models.config``."""
    requests, events, location = read_configured_log(settings)
    out = analyze_canary(settings.canary, (requests, events), since, until, serving_labels(settings))
    return {**out, "source": location}


def record_decision(
    settings: Settings,
    analysis: Mapping[str, Any],
    action: str,
    decided_by: str,
    labels: Mapping[str, Any] | None = None,
    note: str = "",
) -> dict[str, Any]:
    """Append the decision with its numbers to ``<home>/canary/decisions.jsonl``, write its report.

    Args:
        analysis: what ``analyze_canary`` returned.
        action: what was done: promote, rollback, wait, noop or skipped.
        decided_by: ``auto`` (the DAG), ``manual`` (the CLI) or another name of who decided.
        labels: ``move_labels``'s before/after when labels moved.
        note: a person's reason for a manual decision, or why an action was skipped.

    Returns:
        The record (also the last line of the file), with the report's path.
    """
    out = canary_dir(settings)
    stamp = utc_now()
    report_dir = out / "reports" / f"{stamp.strftime('%Y%m%dT%H%M%S%f')}-{action}"
    # An hourly "no rollout" needs a line in the log, not a page of empty bars.
    with_report = action != "noop"
    record = {
        "recorded_at": stamp.isoformat(),
        "action": action,
        "decided_by": decided_by,
        "note": note,
        "labels": dict(labels) if labels else None,
        "report": str(report_dir / "index.html") if with_report else None,
        "code_version": code_version(),
        **{k: v for k, v in analysis.items() if k != "rule"},
        "rule": analysis.get("rule", RULE),
    }
    if with_report:
        write_report(record, report_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / DECISIONS_FILE, "a") as f:
        f.write(json.dumps(record, default=str, sort_keys=True) + "\n")
    return record


def read_decisions(settings: Settings) -> list[dict[str, Any]]:
    path = canary_dir(settings) / DECISIONS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_ctr(arms: Mapping[str, Mapping[str, Any]], path: Path, confidence: float) -> Path:
    """Bars of CTR per request and per impression for each arm, with Wilson intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"stable": "#4c72b0", "canary": "#dd8452", "holdout": "#8c8c8c"}
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric, title in (
        (axes[0], "ctr_request", "CTR per request"),
        (axes[1], "ctr_impression", "CTR per impression"),
    ):
        names = [a for a in ARMS if a in arms]
        values = [arms[a][metric] for a in names]
        # Clipped at 0: a rate outside its own interval (more clicks than impressions, where
        # Wilson's bound stops at 1) would give a negative bar, which matplotlib refuses.
        lo = [max(0.0, arms[a][metric] - arms[a][f"{metric}_ci"][0]) for a in names]
        hi = [max(0.0, arms[a][f"{metric}_ci"][1] - arms[a][metric]) for a in names]
        ax.bar(names, values, yerr=[lo, hi], capsize=6, color=[colors[a] for a in names])
        for i, a in enumerate(names):
            n = arms[a]["requests" if metric == "ctr_request" else "impressions"]
            ax.annotate(
                f"n={n:,}", (i, 0), xytext=(0, 3), textcoords="offset points", ha="center", fontsize=8
            )
        ax.set_title(f"{title} ({confidence:.0%} CI)")
        ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_report(record: Mapping[str, Any], out_dir: Path) -> Path:
    """A small self-contained HTML page: the decision, the table per arm, the tests, the plot."""
    import html

    out_dir.mkdir(parents=True, exist_ok=True)
    confidence = 1 - float(record["config"]["alpha"])
    plot_ctr(record["arms"], out_dir / "ctr.png", confidence)
    cols = [
        "requests", "errors", "error_rate", "impressions", "clicks", "clicked_requests", "ctr_request",
        "ctr_impression", "add_to_cart", "purchases", "latency_p95_ms", "latency_p99_ms", "excluded_requests",
    ]  # fmt: skip

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
        return html.escape(str(v))

    rows = "".join(
        f"<tr><th>{arm}</th>" + "".join(f"<td>{cell(a[c])}</td>" for c in cols) + "</tr>"
        for arm, a in record["arms"].items()
    )
    tests = "".join(
        f"<li><b>{html.escape(name)}</b>: difference {t['difference']:+.4f}; "
        f"worse z={t['worse']['z']:.2f} p={t['worse']['p']:.3g}; "
        f"not-worse (margin {t['not_worse']['margin']}) "
        f"z={t['not_worse']['z']:.2f} p={t['not_worse']['p']:.3g}</li>"
        for name, t in record.get("tests", {}).items()
    )
    style = "body{font-family:sans-serif;margin:2em} td,th{padding:4px 8px;text-align:right}"
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>canary {html.escape(record['action'])}</title><style>{style}</style></head><body>
<h1>canary: {html.escape(record['action'])} <small>({html.escape(record['decided_by'])})</small></h1>
<p><b>analysis says:</b> {html.escape(record['decision'])} &mdash; {html.escape(record['reason'])}</p>
<p>{html.escape(record.get('note') or '')}</p>
<p>window [{record['window']['since']}, {record['window']['until']}); recorded {record['recorded_at']};
labels {html.escape(json.dumps(record.get('labels')))};
serving {html.escape(json.dumps(record.get('serving')))}</p>
<table><tr><th>arm</th>{''.join(f'<th>{c}</th>' for c in cols)}</tr>{rows}</table>
<h2>tests (alpha {record['config']['alpha']})</h2><ul>{tests}</ul>
<p>guardrails: {html.escape(json.dumps(record.get('guardrails')))}</p>
<img src="ctr.png" alt="CTR per arm">
<h2>rule</h2><p>{html.escape(record['rule'])}</p>
</body></html>"""
    path = out_dir / "index.html"
    path.write_text(page)
    return path


def _move_labels(settings: Settings, action: Literal["promote", "rollback"]) -> dict[str, Any]:
    try:
        return move_labels(settings, action)
    except RegistryError as e:
        raise CanaryError(str(e)) from None


def apply(settings: Settings, analysis: Mapping[str, Any], decided_by: str = "auto") -> dict[str, Any]:
    """Carry out an analysis' decision and record it; labels move only for promote / rollback.

    An analysis made on other labels than today's (someone promoted in between) is not acted
    on: it is recorded as ``skipped``, since its numbers vouch for versions no longer in rollout.
    """
    decision = analysis["decision"]
    if decision in ("promote", "rollback"):
        now = serving_labels(settings)
        if analysis.get("serving") is not None and now != analysis["serving"]:
            note = f"models.config changed since the analysis (then {analysis['serving']}, now {now})"
            return record_decision(settings, analysis, "skipped", decided_by, note=note)
        moved = _move_labels(settings, decision)
        return record_decision(settings, analysis, decision, decided_by, labels=moved)
    return record_decision(settings, analysis, decision, decided_by)


def manual(settings: Settings, action: Literal["promote", "rollback"], reason: str = "") -> dict[str, Any]:
    """A person's promote or rollback (``recsys canary promote|rollback``), recorded with the
    numbers the analysis shows at that moment, whatever they say."""
    analysis = analyze(settings)
    moved = _move_labels(settings, action)
    return record_decision(settings, analysis, action, "manual", labels=moved, note=reason)


# --------------------------------------------------------------------------------------------
# What the canary_rollout DAG's tasks call
# --------------------------------------------------------------------------------------------


def run_guardrails(settings: Settings, until: datetime | None = None) -> dict[str, Any]:
    """Guardrails only, acted on at once: roll back if the canary is failing or slow.

    Returns {"rolled_back": bool, "guardrails": ..., "record": ... (when one was written)}.
    """
    analysis = analyze(settings, until=until)
    if analysis["decision"] == "noop" or analysis["guardrails"]["ok"]:
        return {"rolled_back": False, "guardrails": analysis["guardrails"], "decision": analysis["decision"]}
    record = apply(settings, {**analysis, "decision": "rollback"}, decided_by="auto:guardrails")
    rolled_back = record["action"] == "rollback"
    return {"rolled_back": rolled_back, "guardrails": analysis["guardrails"], "record": record}


def run_analysis(settings: Settings, until: datetime | None = None, out_dir: Path | None = None) -> Path:
    """Analyze and write the decision manifest to ``analysis.json``; returns its path.

    The file lands in ``out_dir`` or ``<home>/canary/runs/<until>/`` (``latest`` without an
    end), so a re-run of the same interval replaces its own analysis.
    """
    analysis = analyze(settings, until=until)
    key = to_utc(until).strftime("%Y-%m-%dT%H%M%S") if until is not None else "latest"
    out_dir = out_dir or canary_dir(settings) / "runs" / key
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "analysis.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(analysis, indent=2, default=str))
    tmp.replace(path)
    return path


def run_decision(settings: Settings, analysis_path: Path) -> dict[str, Any]:
    """Act on a written analysis (promote, roll back, or only record a wait / noop)."""
    analysis = json.loads(Path(analysis_path).read_text())
    return apply(settings, analysis, decided_by="auto")
