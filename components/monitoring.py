"""Drift monitoring: the latest serving window against the training window.

The **training window** is the last ``monitoring.training_window_days`` of the latest validated
data (what the serving models learned from) or of a given data folder; the **serving window**
is the event log's (the gateway's events and impressions) last
``monitoring.serving_window_hours`` before ``until``. Measured:

* per feature, the population stability index (PSI) of the serving window's distribution
  against the training window's: the category mix of impressions and of positives, the
  event-type mix, the device mix, the hour of day, the training-window popularity (quantile
  bins) of the served items; and the score of each model per arm, where impressions carry one;
* the label rate: click-through per impression overall, per arm and per segment (new users:
  not seen in the training window; heavy users: its most active ``heavy_user_fraction``; new
  items: not shown in it);
* catalog coverage: the share of the catalog the serving window showed.

A PSI above its threshold (``psi_threshold`` / ``psi_thresholds``) or CTR moved by more than
``max_ctr_relative_change`` is drift; the reasons say which and by how much.
``monitor_drift`` writes ``<home>/monitoring/<run key>/`` (``report.html``, ``metrics.json``,
``drift.prom``: Prometheus gauges in the textfile collector's format, ``manifest.json`` last)
and returns the manifest; the ``monitoring`` DAG triggers ``training_pipeline`` with the
reasons when ``drifted``.
"""

from __future__ import annotations

import html
import json
import shutil
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.config import MonitoringConfig, Settings
from recsys.contracts import CATEGORY_SEPARATOR
from recsys.feature_schema import POSITIVE_EVENT_TYPES
from recsys.layout import MANIFEST, latest_validated_dir, run_key_for
from recsys.storage import read_table, write_manifest
from recsys.timeutil import to_utc, utc_now

PSI_FEATURES = (
    "category_impressions",
    "category_positives",
    "event_type",
    "device",
    "hour",
    "item_popularity",
)
SEGMENTS = ("all", "new_users", "heavy_users", "new_items")
# Where a probability is 0 in one window, PSI's log is infinite: each bin gets this much
# (relative to one event) before the shares are taken.
PSI_SMOOTHING = 0.5


def monitoring_dir(settings: Settings) -> Path:
    """``<home>/monitoring``: one folder per monitoring run."""
    return settings.home / "monitoring"


# --------------------------------------------------------------------------------------------
# PSI
# --------------------------------------------------------------------------------------------


def psi(
    expected: Mapping[Any, float], actual: Mapping[Any, float], smoothing: float = PSI_SMOOTHING
) -> float:
    """Population stability index of ``actual`` against ``expected`` (counts per bin).

    ``sum((a - e) * ln(a / e))`` over the union of bins, with ``smoothing`` added to each
    bin's count so an empty bin gives a large, finite value. 0 for identical shares.
    """
    bins = sorted(set(expected) | set(actual), key=str)
    if not bins:
        return 0.0
    e = np.array([float(expected.get(b, 0.0)) for b in bins]) + smoothing
    a = np.array([float(actual.get(b, 0.0)) for b in bins]) + smoothing
    e, a = e / e.sum(), a / a.sum()
    return float(np.sum((a - e) * np.log(a / e)))


def threshold_for(config: MonitoringConfig, feature: str) -> float:
    """The PSI above which ``feature`` has drifted."""
    return float(config.psi_thresholds.get(feature, config.psi_threshold))


def judge_features(
    config: MonitoringConfig, counts: Mapping[str, tuple[Mapping[Any, float], Mapping[Any, float]]]
) -> dict[str, dict[str, Any]]:
    """Per feature: PSI, its threshold, the events behind each side, and whether it drifted
    (only judged with at least ``min_events`` on both sides)."""
    out: dict[str, dict[str, Any]] = {}
    for name, (ref, cur) in counts.items():
        n_ref, n_cur = float(sum(ref.values())), float(sum(cur.values()))
        value = psi(ref, cur)
        judged = n_ref >= config.min_events and n_cur >= config.min_events
        limit = threshold_for(config, name)
        out[name] = {
            "psi": round(value, 6),
            "threshold": limit,
            "reference_events": int(n_ref),
            "serving_events": int(n_cur),
            "judged": judged,
            "drifted": bool(judged and value > limit),
        }
    return out


# --------------------------------------------------------------------------------------------
# Reading the windows
# --------------------------------------------------------------------------------------------


def read_serving_events(settings: Settings, start: datetime, end: datetime) -> pd.DataFrame:
    """The configured event log's events with ``start <= ts < end`` (body extras included);
    an SQLite log that does not exist yet reads as empty (and is not created)."""
    if settings.gateway.event_log_backend == "sqlite" and not Path(settings.event_log_path).is_file():
        return pd.DataFrame(columns=["event_id", "user_id", "item_id", "event_type", "ts", "device"])
    from recsys.event_log import open_event_log

    log = open_event_log(settings, reader=True)
    try:
        rows = log.events_between(start, end)
    finally:
        log.close()
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=["event_id", "user_id", "item_id", "event_type", "ts", "device"])
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True, format="ISO8601")
    return frame


def with_served_scores(settings: Settings, reference: pd.DataFrame) -> pd.DataFrame:
    """``reference`` with the ``score`` each of its served impressions was given, from the lake
    (the training data holds served traffic without its scores); unchanged where none has one."""
    from components.events_export import read_lake_scores

    scores = read_lake_scores(settings)
    if scores.empty or reference.empty:
        return reference
    return reference.assign(score=reference["event_id"].astype(str).map(scores))


def _primary_category(items: pd.DataFrame) -> dict[str, str]:
    cats = items["category"].fillna("").astype(str).str.split(CATEGORY_SEPARATOR, regex=False).str[0]
    return dict(zip(items["item_id"].astype(str), cats, strict=True))


def _counts(values: pd.Series) -> dict[str, float]:
    return {str(k): float(v) for k, v in values.value_counts().items()}


def _ctr(frame: pd.DataFrame) -> dict[str, Any]:
    impressions = int((frame["event_type"] == "impression").sum())
    clicks = int((frame["event_type"] == "click").sum())
    return {
        "impressions": impressions,
        "clicks": clicks,
        "ctr": round(clicks / impressions, 6) if impressions else None,
    }


def _segments(frame: pd.DataFrame, known_users: set[str], heavy: set[str], known_items: set[str]) -> dict:
    users, items = frame["user_id"].astype(str), frame["item_id"].astype(str)
    masks = {
        "all": np.ones(len(frame), dtype=bool),
        "new_users": ~users.isin(known_users).to_numpy(),
        "heavy_users": users.isin(heavy).to_numpy(),
        "new_items": ~items.isin(known_items).to_numpy(),
    }
    return {name: _ctr(frame[mask]) for name, mask in masks.items()}


def _popularity_bins(reference: pd.DataFrame, bins: int) -> dict[str, int]:
    """Each item shown in the training window -> its popularity quantile bin (0: least shown)."""
    shown = reference.loc[reference["event_type"] == "impression", "item_id"].astype(str).value_counts()
    if shown.empty:
        return {}
    ranks = shown.rank(method="first", pct=True).to_numpy()
    codes = np.minimum((ranks * bins).astype(int), bins - 1)
    return dict(zip(shown.index, codes.tolist(), strict=True))


def _feature_counts(
    frame: pd.DataFrame, category_of: Mapping[str, str], popularity_bin: Mapping[str, int]
) -> dict[str, dict[str, float]]:
    imps = frame[frame["event_type"] == "impression"]
    positives = frame[frame["event_type"].isin(POSITIVE_EVENT_TYPES)]
    served_bins = imps["item_id"].astype(str).map(popularity_bin).dropna().astype(int)
    return {
        "category_impressions": _counts(imps["item_id"].astype(str).map(category_of).fillna("unknown")),
        "category_positives": _counts(positives["item_id"].astype(str).map(category_of).fillna("unknown")),
        "event_type": _counts(frame["event_type"].astype(str)),
        "device": _counts(frame["device"].fillna("unknown").astype(str)),
        "hour": _counts(pd.to_datetime(frame["ts"], utc=True).dt.hour.astype(str)),
        # Items the training window never showed have no bin; new items are a segment instead.
        "item_popularity": _counts(served_bins.astype(str)),
    }


def _score_counts(
    reference: pd.DataFrame, current: pd.DataFrame
) -> dict[str, tuple[dict[str, float], dict[str, float]]]:
    """Score distributions per arm where impressions carry a ``score``: the serving window's
    deciles of the training window's scores (absent where either side has none)."""
    out: dict[str, tuple[dict[str, float], dict[str, float]]] = {}
    if "score" not in reference or "score" not in current:
        return out
    ref_scores = pd.to_numeric(reference["score"], errors="coerce").dropna()
    if ref_scores.empty:
        return out
    edges = np.unique(np.quantile(ref_scores, np.linspace(0, 1, 11))[1:-1])
    ref_bins = _counts(pd.Series(np.searchsorted(edges, ref_scores)).astype(str))
    arms = current["arm"].fillna("unknown") if "arm" in current else pd.Series("all", index=current.index)
    for arm, rows in current.groupby(arms):
        scores = pd.to_numeric(rows["score"], errors="coerce").dropna()
        if not scores.empty:
            out[f"score_{arm}"] = (ref_bins, _counts(pd.Series(np.searchsorted(edges, scores)).astype(str)))
    return out


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def compare_windows(
    config: MonitoringConfig,
    reference: pd.DataFrame,
    current: pd.DataFrame,
    items: pd.DataFrame,
) -> dict[str, Any]:
    """The numbers and the verdict for two frames of events (events contract; ``arm`` and
    ``score`` columns used where present) and the catalog ``items``."""
    category_of = _primary_category(items)
    popularity_bin = _popularity_bins(reference, config.popularity_bins)
    ref_counts = _feature_counts(reference, category_of, popularity_bin)
    cur_counts = _feature_counts(current, category_of, popularity_bin)
    counts = {name: (ref_counts[name], cur_counts[name]) for name in PSI_FEATURES}
    counts.update(_score_counts(reference, current))
    features = judge_features(config, counts)

    activity = reference["user_id"].astype(str).value_counts()
    n_heavy = max(1, int(round(len(activity) * config.heavy_user_fraction))) if len(activity) else 0
    heavy = set(activity.index[:n_heavy])
    known_users = set(activity.index)
    known_items = set(reference.loc[reference["event_type"] == "impression", "item_id"].astype(str))
    label_rate = {
        "reference": _segments(reference, known_users, heavy, known_items),
        "serving": _segments(current, known_users, heavy, known_items),
    }
    arms = current["arm"].fillna("unknown") if "arm" in current else pd.Series("all", index=current.index)
    # Clicks carry no arm in their body: they take their request's (the impression's) arm.
    if "arm" in current and "request_id" in current:
        arm_of = current.dropna(subset=["arm"]).drop_duplicates("request_id").set_index("request_id")["arm"]
        arms = current["arm"].fillna(current["request_id"].map(arm_of)).fillna("unknown")
    label_rate["serving_by_arm"] = {str(arm): _ctr(rows) for arm, rows in current.groupby(arms)}

    catalog = len(items)
    served = current.loc[current["event_type"] == "impression", "item_id"].astype(str).nunique()
    served_ref = reference.loc[reference["event_type"] == "impression", "item_id"].astype(str).nunique()
    coverage = {
        "catalog_items": catalog,
        "serving_items_shown": int(served),
        "serving": round(served / catalog, 6) if catalog else None,
        "reference_items_shown": int(served_ref),
        "reference": round(served_ref / catalog, 6) if catalog else None,
    }

    reasons = [
        f"{name}: PSI {f['psi']:.3f} > {f['threshold']:g} "
        f"({f['reference_events']} training vs {f['serving_events']} serving events)"
        for name, f in features.items()
        if f["drifted"]
    ]
    ref_ctr, cur_ctr = label_rate["reference"]["all"]["ctr"], label_rate["serving"]["all"]["ctr"]
    ctr_change = None
    if ref_ctr and cur_ctr is not None:
        ctr_change = (cur_ctr - ref_ctr) / ref_ctr
        enough = label_rate["serving"]["all"]["impressions"] >= config.min_events
        if config.max_ctr_relative_change > 0 and enough and abs(ctr_change) > config.max_ctr_relative_change:
            reasons.append(
                f"ctr: {cur_ctr:.4f} vs {ref_ctr:.4f} in training ({ctr_change:+.1%}, "
                f"beyond ±{config.max_ctr_relative_change:.0%})"
            )
    return {
        "drifted": bool(reasons),
        "reasons": reasons,
        "features": features,
        "label_rate": label_rate,
        "ctr_relative_change": None if ctr_change is None else round(ctr_change, 6),
        "coverage": coverage,
        "events": {"reference": len(reference), "serving": len(current)},
    }


def monitor_drift(
    settings: Settings,
    until: datetime | None = None,
    data: Path | None = None,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Compare the serving window ending at ``until`` with the training window; write the report.

    Args:
        settings: the configuration (``monitoring`` section, the event log, the home).
        until: end of the serving window (default: now).
        data: the training data (a data folder of users/items/events); default: the latest
            pipeline run's validated data.
        out_dir: where to write (default ``<home>/monitoring/<run key of until>``); replaced.

    Returns:
        The manifest: ``drifted``, ``reasons``, ``windows``, ``features`` (PSI per feature),
        ``label_rate``, ``coverage``, and the paths of ``report``, ``metrics`` and ``prometheus``.
    """
    config = settings.monitoring
    end = to_utc(until) if until is not None else to_utc(utc_now()).floor("h")
    start = end - pd.Timedelta(hours=config.serving_window_hours)
    data_dir = Path(data) if data is not None else latest_validated_dir(settings)

    events = read_table(data_dir, "events")
    events["ts"] = pd.to_datetime(events["ts"], utc=True)
    items = read_table(data_dir, "items", columns=["item_id", "category"])
    # The training window: the data's last days before the serving window.
    train_end = min(events["ts"].max() + pd.Timedelta(microseconds=1), start) if len(events) else start
    train_start = train_end - pd.Timedelta(days=config.training_window_days)
    reference = with_served_scores(
        settings, events[(events["ts"] >= train_start) & (events["ts"] < train_end)]
    )
    current = read_serving_events(settings, start.to_pydatetime(), end.to_pydatetime())

    result = compare_windows(config, reference, current, items)
    out = Path(out_dir) if out_dir is not None else monitoring_dir(settings) / run_key_for(end)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    windows = {
        "training": {"start": train_start.isoformat(), "end": train_end.isoformat(), "data": str(data_dir)},
        "serving": {"start": start.isoformat(), "end": end.isoformat(), "log": _log_location(settings)},
    }
    measured_at = utc_now().isoformat()
    metrics = {**result, "windows": windows, "config": config.model_dump(), "measured_at": measured_at}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    write_prometheus(metrics, out / "drift.prom")
    (out / "report.html").write_text(render_report(metrics))
    manifest = {
        "path": str(out),
        "drifted": result["drifted"],
        "reasons": result["reasons"],
        "windows": windows,
        "features": {k: v["psi"] for k, v in result["features"].items()},
        "ctr": {
            "reference": result["label_rate"]["reference"]["all"]["ctr"],
            "serving": result["label_rate"]["serving"]["all"]["ctr"],
        },
        "coverage": result["coverage"]["serving"],
        "events": result["events"],
        "report": str(out / "report.html"),
        "metrics": str(out / "metrics.json"),
        "prometheus": str(out / "drift.prom"),
    }
    write_manifest(out, manifest)
    return manifest


def read_monitoring_manifest(path: Path) -> dict[str, Any]:
    """A monitoring run's manifest (``<run folder>/manifest.json``)."""
    return dict(json.loads((Path(path) / MANIFEST).read_text()))


def _log_location(settings: Settings) -> str:
    gw = settings.gateway
    return str(settings.event_log_path) if gw.event_log_backend == "sqlite" else gw.event_log_key_prefix


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def write_prometheus(metrics: Mapping[str, Any], path: Path) -> Path:
    """Gauges in the Prometheus text format (for node_exporter's textfile collector)."""
    from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

    registry = CollectorRegistry()
    drifted = Gauge("recsys_drift_detected", "1 when the last monitoring run found drift", registry=registry)
    drifted.set(1.0 if metrics["drifted"] else 0.0)
    feature_psi = Gauge(
        "recsys_drift_psi", "Population stability index, serving vs training window", ["feature"],
        registry=registry,
    )  # fmt: skip
    limit = Gauge("recsys_drift_psi_threshold", "PSI threshold per feature", ["feature"], registry=registry)
    for name, f in metrics["features"].items():
        feature_psi.labels(feature=name).set(f["psi"])
        limit.labels(feature=name).set(f["threshold"])
    ctr = Gauge("recsys_ctr", "Clicks per impression", ["window", "segment"], registry=registry)
    for window in ("reference", "serving"):
        for segment, numbers in metrics["label_rate"][window].items():
            if numbers["ctr"] is not None:
                ctr.labels(window=window, segment=segment).set(numbers["ctr"])
    by_arm = Gauge("recsys_ctr_by_arm", "Serving window clicks per impression", ["arm"], registry=registry)
    for arm, numbers in metrics["label_rate"]["serving_by_arm"].items():
        if numbers["ctr"] is not None:
            by_arm.labels(arm=arm).set(numbers["ctr"])
    coverage = Gauge("recsys_catalog_coverage", "Share of the catalog shown", ["window"], registry=registry)
    for window in ("reference", "serving"):
        if metrics["coverage"][window] is not None:
            coverage.labels(window=window).set(metrics["coverage"][window])
    write_to_textfile(str(path), registry)
    return path


def render_report(metrics: Mapping[str, Any]) -> str:
    """The run's page: the verdict and reasons, PSI per feature, label rates, coverage."""
    esc = html.escape
    verdict = "DRIFT: retraining" if metrics["drifted"] else "no drift"
    reasons = "".join(f"<li>{esc(r)}</li>" for r in metrics["reasons"]) or "<li>none</li>"
    feature_rows = "".join(
        f"<tr{' class=drift' if f['drifted'] else ''}><td>{esc(name)}</td><td>{f['psi']:.4f}</td>"
        f"<td>{f['threshold']:g}</td><td>{f['reference_events']}</td><td>{f['serving_events']}</td>"
        f"<td>{'yes' if f['judged'] else 'too few events'}</td></tr>"
        for name, f in metrics["features"].items()
    )

    def ctr_rows(table: Mapping[str, Mapping[str, Any]]) -> str:
        return "".join(
            f"<tr><td>{esc(str(k))}</td><td>{v['impressions']}</td><td>{v['clicks']}</td>"
            f"<td>{_rate(v['ctr'])}</td></tr>"
            for k, v in table.items()
        )

    lr, cov, win = metrics["label_rate"], metrics["coverage"], metrics["windows"]
    head = "<tr><th>{}</th><th>impressions</th><th>clicks</th><th>CTR</th></tr>"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>recsys drift monitoring</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px}}tr.drift{{background:#fdd}}</style></head><body>
<h1>Drift monitoring: {esc(verdict)}</h1>
<p>training window {esc(win["training"]["start"])} – {esc(win["training"]["end"])}
({esc(win["training"]["data"])}); serving window {esc(win["serving"]["start"])} –
{esc(win["serving"]["end"])} ({esc(win["serving"]["log"])}).
Events: {metrics["events"]["reference"]} training, {metrics["events"]["serving"]} serving.</p>
<h2>Reasons</h2><ul>{reasons}</ul>
<h2>Population stability index per feature</h2>
<table><tr><th>feature</th><th>PSI</th><th>threshold</th><th>training events</th>
<th>serving events</th><th>judged</th></tr>{feature_rows}</table>
<h2>Label rate (clicks per impression)</h2>
<h3>training window</h3><table>{head.format("segment")}{ctr_rows(lr["reference"])}</table>
<h3>serving window</h3><table>{head.format("segment")}{ctr_rows(lr["serving"])}</table>
<h3>serving window per arm</h3><table>{head.format("arm")}{ctr_rows(lr["serving_by_arm"])}</table>
<h2>Catalog coverage</h2><p>serving: {cov["serving_items_shown"]} of {cov["catalog_items"]} items
({cov["serving"]}); training window: {cov["reference_items_shown"]} ({cov["reference"]}).</p>
</body></html>
"""


def _rate(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def summary_line(manifest: Mapping[str, Any]) -> str:
    """One line for logs and the CLI."""
    if manifest["drifted"]:
        return "drift: " + "; ".join(manifest["reasons"])
    return "no drift (" + ", ".join(f"{k} PSI {v:.3f}" for k, v in manifest["features"].items()) + ")"


def retrain_conf(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The ``training_pipeline`` run's conf for a drift: the reason and where the report is."""
    return {
        "reason": "drift: " + "; ".join(manifest["reasons"]),
        "monitoring_report": manifest["report"],
        "serving_window_end": manifest["windows"]["serving"]["end"],
    }


__all__ = [
    "compare_windows",
    "judge_features",
    "monitor_drift",
    "monitoring_dir",
    "psi",
    "retrain_conf",
    "summary_line",
]
