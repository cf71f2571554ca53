"""A decision's page: the table per arm, the tests, and a plot of click-through with intervals."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from components.canary.arms import ARMS


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
        "ctr_impression", "add_to_cart", "purchases", "latency_p95_ms", "latency_p99_ms", "fallbacks",
        "excluded_requests",
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
