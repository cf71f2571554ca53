"""Per-arm measurements: what each arm (stable, canary, holdout) served and what users did."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from components.canary.stats import wilson_interval
from recsys.event_log.base import OUTCOME_COLUMNS
from recsys.timeutil import to_utc

ARMS = ("stable", "canary", "holdout")


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
    fallbacks: int = 0  # answered from popularity because the arm's model calls failed

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def fallback_rate(self) -> float:
        return self.fallbacks / self.requests if self.requests else 0.0

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
            "fallback_rate": self.fallback_rate,
            "ctr_request": self.ctr_request,
            "ctr_request_ci": [lo, hi],
            "ctr_impression": self.ctr_impression,
            "ctr_impression_ci": [ilo, ihi],
        }


# A request's fallback entries that mean "the arm's models did not answer: popularity did".
POPULARITY_FALLBACKS = ("candidates:segment_popularity", "candidates:global_popularity", "candidates:none")


def _served_by(versions: Any, wanted: Mapping[str, int]) -> bool:
    """A request counts for an arm only if the versions that served it are the labelled ones.

    ``versions`` are those the model server's answers named (``ServedRequest.versions``).
    After a promotion a new canary starts from zero: requests of the previous canary must not
    vouch for it. A request that names no version for a model (a fallback whose model call
    failed, a cold start) does not contradict the label: it counts for the arm, so a canary
    whose calls fail is charged with its fallbacks. Requests from before the canary was pushed
    are outside the analysis window (``analyze``), so old unversioned requests never count.
    """
    if not isinstance(versions, Mapping) or not wanted:
        return True
    return all(versions.get(m) in (None, v) for m, v in wanted.items())


def _fell_back(fallback: Any) -> bool:
    """Whether a request's candidates came from popularity because its model calls failed."""
    return isinstance(fallback, str) and any(f in POPULARITY_FALLBACKS for f in fallback.split(","))


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
    req = _requests_in_window(requests, since, until)
    per_request = _outcomes_per_request(events)
    out: dict[str, ArmStats] = {}
    for arm in ARMS:
        rows = req[req["arm"] == arm]
        wanted = (serving or {}).get(arm, {})
        keep = np.array([_served_by(v, wanted) for v in rows["versions"]], dtype=bool)
        out[arm] = _measure(arm, rows[keep], per_request, excluded=int((~keep).sum()))
    return out


def _requests_in_window(
    requests: pd.DataFrame, since: datetime | None, until: datetime | None
) -> pd.DataFrame:
    req = requests.copy()
    if len(req):
        req["ts"] = pd.to_datetime(req["ts"], utc=True, format="ISO8601")
        if since is not None:
            req = req[req["ts"] >= to_utc(since)]
        if until is not None:
            req = req[req["ts"] < to_utc(until)]
    return req


def _outcomes_per_request(events: pd.DataFrame) -> pd.DataFrame:
    """Per request_id: impressions, clicks on shown items, any click, carts and purchases."""
    ev = events.drop_duplicates(OUTCOME_COLUMNS) if len(events) else events
    shown = ev[ev["event_type"] == "impression"]
    clicked = ev[ev["event_type"] == "click"]
    # A click counts for per-impression CTR only on an item that request showed.
    clicks_on_shown = clicked.merge(shown[["request_id", "item_id"]], on=["request_id", "item_id"])
    return pd.DataFrame(
        {
            "impressions": shown.groupby("request_id").size(),
            "clicks": clicks_on_shown.groupby("request_id").size(),
            "any_click": clicked.groupby("request_id").size(),
            "add_to_cart": ev[ev["event_type"] == "add_to_cart"].groupby("request_id").size(),
            "purchases": ev[ev["event_type"] == "purchase"].groupby("request_id").size(),
        }
    )


def _measure(arm: str, rows: pd.DataFrame, per_request: pd.DataFrame, excluded: int) -> ArmStats:
    """One arm's numbers from its requests and the outcomes of each."""
    counts = per_request.reindex(rows["request_id"]).fillna(0)
    lat = pd.to_numeric(rows["latency_ms"], errors="coerce").dropna().to_numpy(dtype=float)
    return ArmStats(
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
        fallbacks=int(rows["fallback"].map(_fell_back).sum()) if "fallback" in rows else 0,
    )


def _percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None
