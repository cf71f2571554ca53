"""The evaluation's HTML report: verdict, split, serving policy, each step's contribution, the
ranker's objectives, simulated reward, and per-slice charts (PNG beside it and embedded).

Every section reads ``metrics.json``'s structure, so the page says exactly what the gate read.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from components.evaluation.metrics import metric_names

STYLE = """body{font-family:sans-serif;margin:2em;max-width:1100px}
table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}.no{color:#a00}.yes{color:#070}"""


def _num(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _delta(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:+.4f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _embed(png: Path, alt: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _split_section(metrics: Mapping[str, Any]) -> str:
    split = metrics.get("split") or {}
    holdout = metrics["holdout"]
    counts = ", ".join(f"{name}: {n}" for name, n in (split.get("users") or {}).items())
    note = split.get("note")
    return (
        "<h2>Holdout</h2>"
        f"<p>Split asked for: <b>{html.escape(str(split.get('requested', '?')))}</b>; used: "
        f"<b>{html.escape(str(split.get('used', '?')))}</b> (users with a relevant item per split tried: "
        f"{html.escape(counts) or '—'}; at least {split.get('min_users', '?')} needed to decide).</p>"
        + (f'<p class="no">{html.escape(note)}</p>' if note else "")
        + f"<p>Evaluated from {html.escape(str(holdout['start']))}: {holdout['users']} users, "
        f"{holdout['relevant_pairs']} relevant (user, item) pairs; "
        f"catalog {metrics['catalog_items']} items.</p>"
    )


def _policy_section(metrics: Mapping[str, Any]) -> str:
    policy = metrics.get("serving_policy") or {}
    validation = policy.get("validation") or {}
    metric = validation.get("metric", "")
    weight = policy.get("retrieval_weight")
    served = "retrieval order alone (ranker not served)" if weight is None else f"fusion weight {weight:g}"
    share = policy.get("neighbour_weight") or 0.0
    served += f", item-to-item share {share:g}" if share else ", no item-to-item source"
    taste = policy.get("taste_weight") or 0.0
    served += f", category taste share {taste:g}" if taste else ", no category taste"
    reasons = "".join(f"<li>{html.escape(r)}</li>" for r in policy.get("reasons", []))
    grid = validation.get("grid") or []
    table = _table(
        ["retrieval weight", f"validation {metric}", "validation expected reward"],
        [
            [html.escape(row["weight"]), _num(row.get(metric)), _num(row.get("expected_reward"))]
            for row in grid
        ],
    )
    shares = validation.get("neighbour_grid") or []
    share_table = _share_table("item-to-item share", "neighbour_weight", shares, metric)
    tastes = validation.get("taste_grid") or []
    taste_table = _share_table("category taste share", "taste_weight", tastes, metric)
    gw = metrics.get("gateway") or {}
    mmr = "served" if policy.get("mmr", True) else "<b>not served</b>"
    return (
        "<h2>Serving policy (pushed with the model)</h2>"
        f"<p>Served: <b>{html.escape(served)}</b>; MMR {mmr}"
        f" (trade-off {gw.get('mmr_trade_off')}, depth {gw.get('mmr_depth')}); "
        f"{gw.get('exploration_slots')} exploration slot(s) from position {gw.get('exploration_position')}; "
        f"{gw.get('candidates')} candidates ranked.</p>"
        f"<ul>{reasons}</ul>"
        + (f"<p>Item-to-item share of the candidate score on validation:</p>{share_table}" if shares else "")
        + (f"<p>Category taste share on validation (after that share):</p>{taste_table}" if tastes else "")
        + (f"<p>Fusion weights on validation (at the chosen share):</p>{table}" if grid else "")
        + _session_table(validation.get("session") or {})
    )


def _session_table(session: Mapping[str, Any]) -> str:
    """The session check: expected reward per request with the ranker and with retrieval order."""
    if not session:
        return ""
    requests = int(session["requests"])
    rows = [
        [label, *(_num(v) for v in session[key]), _num(float(np.mean(session[key])))]
        for label, key in (
            (f"fusion weight {html.escape(str(session['weight']))}", "with_ranker"),
            ("retrieval order alone", "retrieval_order"),
        )
    ]
    return (
        f"<p>Simulated session on validation ({requests} requests per user, the served system as "
        "configured, each request retrieving and ranking again after the simulated clicks):</p>"
        + _table(["expected reward", *(f"request {r + 1}" for r in range(requests)), "mean"], rows)
    )


def _share_table(title: str, key: str, rows: list[dict[str, Any]], metric: str) -> str:
    """One candidate-score share grid: each share's validation metric and expected reward."""
    return _table(
        [title, f"validation {metric}", "validation expected reward"],
        [[f"{row[key]:g}", _num(row.get(metric)), _num(row.get("expected_reward"))] for row in rows],
    )


def _steps_section(metrics: Mapping[str, Any]) -> str:
    steps = metrics.get("steps") or []
    if not steps:
        return ""
    metric = next(k for k in steps[0] if "@" in k or k == "mrr")
    rows = [
        [
            html.escape(row["step"]),
            '<span class="yes">yes</span>' if row["served"] else '<span class="no">no</span>',
            html.escape(row["weight"]),
            _num(row[metric]),
            _delta(row.get(f"{metric}_uplift")),
            _num(row.get("expected_reward")),
            _delta(row.get("expected_reward_uplift")),
        ]
        for row in steps
    ]
    return (
        "<h2>What each step contributes (holdout)</h2>"
        "<p>Each step on top of the served steps before it; a step that is not served is measured "
        "anyway (the ranker at its best validation weight, MMR as configured) to show its cost. "
        "Exploration slots cost offline metrics by design: they show new items to learn about them.</p>"
        + _table(
            ["step", "served", "fusion weight", metric, "change", "expected reward", "change"],
            rows,
        )
    )


def _reliability_png(out_dir: Path, bins: Sequence[Mapping[str, float]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    ax.plot([0, 1], [0, 1], color="#999", linestyle="--", label="calibrated")
    ax.plot([b["predicted"] for b in bins], [b["observed"] for b in bins], marker="o", label="ranker")
    ax.set_xlabel("predicted click probability")
    ax.set_ylabel("observed click rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = out_dir / "reliability.png"
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def _objectives_section(out_dir: Path, metrics: Mapping[str, Any]) -> str:
    ranker = metrics.get("ranker")
    if not ranker:
        return "<h2>Ranker objectives</h2><p>No holdout impressions or positives to check the ranker on.</p>"
    parts = [
        "<h2>Ranker objectives (holdout)</h2>",
        f"<p>Click AUC on {ranker['examples']} {html.escape(ranker['source'].replace('_', ' '))}: "
        f"<b>{_num(ranker.get('click_auc'))}</b> "
        f"(popularity first: {_num(ranker.get('popularity_click_auc'))}).</p>",
    ]
    calibration = ranker.get("calibration")
    if calibration:
        bins = calibration["bins"]
        parts.append(
            f"<p>Calibration: mean predicted click probability {_num(calibration['mean_predicted'])} vs "
            f"observed click rate {_num(calibration['observed_rate'])}; expected calibration error "
            f"{_num(calibration['ece'])}.</p>"
        )
        if bins:
            parts.append(_embed(_reliability_png(out_dir, bins), "reliability"))
            parts.append(
                _table(
                    ["predicted in", "impressions", "mean predicted", "observed"],
                    [
                        [
                            f"[{b['low']:.1f}, {b['high']:.1f})",
                            str(b["count"]),
                            _num(b["predicted"]),
                            _num(b["observed"]),
                        ]
                        for b in bins
                    ],
                )
            )
    else:
        parts.append(f"<p>{html.escape(ranker.get('calibration_note') or 'Calibration not measured.')}</p>")
    engagement = ranker.get("engagement")
    if engagement:
        parts.append(
            f"<p>Engagement: mean predicted {_num(engagement['mean_predicted'])} vs observed "
            f"{_num(engagement['observed_mean'])} (RMSE {_num(engagement['rmse'])}).</p>"
        )
    return "".join(parts)


def _reward_section(metrics: Mapping[str, Any], models: Sequence[str]) -> str:
    reward = metrics.get("reward") or {}
    if not reward.get("available"):
        return f"<h2>Simulated reward</h2><p>{html.escape(reward.get('note') or 'truth not available')}.</p>"
    systems = reward.get("systems") or {}
    return (
        f"<h2>Simulated reward</h2><p>{html.escape(reward['note'])}: mean expected reward of each "
        f"system's top {reward['k']} for the holdout users.</p>"
        + _table(["system", "expected reward"], [[html.escape(m), _num(systems.get(m))] for m in models])
    )


def _slice_sections(
    out_dir: Path, metrics: Mapping[str, Any], models: Sequence[str], slices: Sequence[str]
) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_model = metrics["models"]
    names = metric_names(metrics["ks"])
    sections = []
    for slice_name in slices:
        n_users = by_model[models[0]][slice_name]["users"]
        fig, ax = plt.subplots(figsize=(10, 3.6))
        width = 0.8 / len(models)
        x = np.arange(len(names))
        for i, model in enumerate(models):
            ax.bar(x + i * width, [by_model[model][slice_name][n] for n in names], width, label=model)
        ax.set_xticks(x + width * (len(models) - 1) / 2, names, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(f"{slice_name} ({n_users} users)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        png = out_dir / f"metrics_{slice_name}.png"
        fig.savefig(png, dpi=90)
        plt.close(fig)
        table = _table(
            ["", *models],
            [[html.escape(m), *(f"{by_model[model][slice_name][m]:.4f}" for model in models)] for m in names],
        )
        sections.append(
            f"<h2>{html.escape(slice_name)} — {n_users} users</h2>{_embed(png, slice_name)}{table}"
        )
    return "".join(sections)


def write_report(
    out_dir: Path,
    metrics: Mapping[str, Any],
    blessing: Mapping[str, Any],
    models: Sequence[str],
    slices: Sequence[str],
) -> Path:
    """``report.html`` (and its PNGs) in ``out_dir``; returns its path."""
    out_dir = Path(out_dir)
    by_model = metrics["models"]
    k0 = metrics["ks"][0]
    cov = "".join(f"<li>{html.escape(m)}: {by_model[m]['all'][f'coverage@{k0}']:.3f}</li>" for m in models)
    verdict = "blessed" if blessing["blessed"] else "not blessed"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Evaluation</title>
<style>{STYLE}</style></head><body>
<h1>Offline evaluation of the served system: {verdict}</h1>
<p>Gate on <b>{html.escape(str(blessing["model"]))}</b> {html.escape(str(blessing["metric"]))}:
{html.escape(blessing["reason"])}</p>
{_split_section(metrics)}
{_policy_section(metrics)}
{_steps_section(metrics)}
{_reward_section(metrics, models)}
{_objectives_section(out_dir, metrics)}
<h2>Catalog coverage@{k0}</h2><ul>{cov}</ul>
{_slice_sections(out_dir, metrics, models, slices)}
</body></html>
"""
    path = out_dir / "report.html"
    path.write_text(page)
    return path
