"""What a simulation measured, per policy: ``summary.json`` and a self-contained ``report.html``.

Reward per request is the objective-weighted sum over the shown items (``Truth``): realized
(what the simulated users did) and expected (what the truth expects of the shown items, the
same quantity without the response's noise). Requests of one user are not independent, so
intervals are over users: the 95% interval of a mean is the mean of per-user means ± 1.96
standard errors, and a share of the oracle's reward is bootstrapped over users (the same users
resampled for both policies, as every policy served the same users).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

Z95 = 1.959963984540054
BOOTSTRAP_SAMPLES = 2000
ORACLE = "oracle"


def summarize(
    records: pd.DataFrame, reference: str = ORACLE, seed: int = 0, setup: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Per policy: requests, users, reward per request (realized and expected, 95% intervals
    over users), click rate, clicks, engagement and purchases per request, requests per serving
    arm, and the share of ``reference``'s reward (bootstrap interval over users).

    Raises:
        ValueError: ``reference`` is not among the records' policies.
    """
    names = list(dict.fromkeys(records["policy"]))
    if reference not in names:
        raise ValueError(f"the reference policy {reference!r} was not simulated; policies: {names}")
    per_user = {
        metric: records.pivot_table(index="user_id", columns="policy", values=metric, aggfunc="mean")[names]
        for metric in ("reward", "expected_reward")
    }
    # Per request number (a user's first, second, ...): how fast each policy learns a user.
    by_request = (
        records.pivot_table(index="request", columns="policy", values="expected_reward", aggfunc="mean")
        if "request" in records
        else None
    )
    rng = np.random.default_rng(seed)
    n_users = len(per_user["reward"])
    resamples = rng.integers(0, n_users, size=(BOOTSTRAP_SAMPLES, n_users))
    policies: dict[str, Any] = {}
    for name in names:
        rows = records[records["policy"] == name]
        shown = int(rows["shown"].sum())
        entry: dict[str, Any] = {
            "requests": len(rows),
            "users": int(rows["user_id"].nunique()),
            "items_shown": shown,
            "reward_per_request": _mean_ci(per_user["reward"][name].to_numpy()),
            "expected_reward_per_request": _mean_ci(per_user["expected_reward"][name].to_numpy()),
            "click_rate": float(rows["clicks"].sum() / shown) if shown else 0.0,
            "clicks_per_request": float(rows["clicks"].mean()),
            "engagement_per_request": float(rows["engagement"].mean()),
            "purchases_per_request": float(rows["purchases"].mean()),
            "not_allowed": int(rows["not_allowed"].sum()),
            "unsimulated": int(rows["unsimulated"].sum()),
        }
        for metric, key in (("reward", "share_of_oracle"), ("expected_reward", "expected_share_of_oracle")):
            table = per_user[metric]
            entry[key] = _share(table[name].to_numpy(), table[reference].to_numpy(), resamples)
        if by_request is not None:
            share = by_request[name] / by_request[reference]
            entry["expected_share_by_request"] = [round(float(v), 4) for v in share.to_numpy()]
        arms = rows[rows["arm"] != ""]
        if len(arms):
            entry["arms"] = {
                str(arm): {"requests": len(g), "reward_per_request": float(g["reward"].mean())}
                for arm, g in arms.groupby("arm", sort=True)
            }
        policies[name] = entry
    return {"reference": reference, "seed": seed, "setup": dict(setup or {}), "policies": policies}


def _mean_ci(per_user: np.ndarray) -> dict[str, Any]:
    """Mean of per-user means and its 95% interval (normal, over users)."""
    mean = float(per_user.mean())
    half = Z95 * float(per_user.std(ddof=1)) / math.sqrt(len(per_user)) if len(per_user) > 1 else math.nan
    return {"mean": mean, "ci95": [mean - half, mean + half]}


def _share(policy: np.ndarray, reference: np.ndarray, resamples: np.ndarray) -> dict[str, Any]:
    """mean(policy) / mean(reference) over users, with a paired bootstrap 95% interval."""
    denominator = float(reference.mean())
    if denominator <= 0:
        return {"mean": math.nan, "ci95": [math.nan, math.nan]}
    boot = policy[resamples].mean(axis=1) / np.maximum(reference[resamples].mean(axis=1), 1e-12)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"mean": float(policy.mean()) / denominator, "ci95": [float(lo), float(hi)]}


def write_report(
    summary: Mapping[str, Any], records: pd.DataFrame, out_dir: Path, served: str = "served"
) -> dict[str, Path]:
    """``summary.json``, ``requests.parquet`` (one row per request) and ``report.html`` in
    ``out_dir``; where the summary holds ``served_share_of_ceiling``, the headline names it too."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "summary": out_dir / "summary.json",
        "requests": out_dir / "requests.parquet",
        "report": out_dir / "report.html",
    }
    paths["summary"].write_text(json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    records.to_parquet(paths["requests"], index=False)
    paths["report"].write_text(_html(summary, served))
    return paths


def _html(summary: Mapping[str, Any], served: str) -> str:
    policies: Mapping[str, Any] = summary["policies"]
    reference = summary["reference"]
    headline = ""
    if served in policies:
        share = policies[served]["share_of_oracle"]
        expected = policies[served]["expected_share_of_oracle"]
        headline = (
            f"<p class='headline'>The served system earns <b>{share['mean']:.1%}</b> of the "
            f"{html.escape(reference)}'s reward per request (95% interval {share['ci95'][0]:.1%} to "
            f"{share['ci95'][1]:.1%}); by expected reward of the items shown, {expected['mean']:.1%}.</p>"
        )
        if "served_share_of_ceiling" in summary:
            headline += (
                "<p>The ceiling (a learner of category tastes that knows the generator but not the "
                "items' latent vectors, which the data does not reveal): the served system reaches "
                f"<b>{summary['served_share_of_ceiling']:.0%}</b> of its expected reward.</p>"
            )
    cols = [
        ("requests", "requests"),
        ("users", "users"),
        ("reward / request", "reward_per_request"),
        ("expected reward / request", "expected_reward_per_request"),
        ("share of " + reference, "share_of_oracle"),
        ("click rate", "click_rate"),
        ("clicks / request", "clicks_per_request"),
        ("engagement / request", "engagement_per_request"),
        ("purchases / request", "purchases_per_request"),
        ("not allowed", "not_allowed"),
        ("unsimulated", "unsimulated"),
    ]
    head, body = _policy_rows(cols, policies)
    arms = "".join(
        f"<li>{html.escape(name)}: "
        + ", ".join(
            f"{html.escape(arm)} {a['requests']} requests, reward {a['reward_per_request']:.3f}"
            for arm, a in p["arms"].items()
        )
        + "</li>"
        for name, p in policies.items()
        if p.get("arms")
    )
    setup = "".join(
        f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in summary.get("setup", {}).items()
    )
    chart = _chart(policies, reference)
    by_request = _by_request_html(policies, reference)
    exploration = _exploration_html(summary.get("exploration") or {}, reference)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>recsys simulation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}.headline{{font-size:1.2em}}</style>
</head><body>
<h1>Simulation against the data's truth</h1>
{headline}
<p>Reward per request: the objective-weighted clicks and engagement of the shown items, as the
ranker's objectives weigh them. Intervals are 95%, over users.</p>
<img alt="reward per request" src="data:image/png;base64,{chart}">
<table><tr><th>policy</th>{head}</tr>{body}</table>
{by_request}
{f"<h2>Serving arms</h2><ul>{arms}</ul>" if arms else ""}
{exploration}
<h2>Setup</h2><ul>{setup}</ul>
</body></html>
"""


EXPLORATION_COLUMNS = (
    ("exploration", "exploration"),
    ("reward / request", "reward_per_request"),
    ("expected reward / request", "expected_reward_per_request"),
    ("regret / request", "regret_per_request"),
    ("slot impressions", "slot_trials"),
    ("slot clicks", "slot_clicks"),
    ("new items", "new_items"),
    ("clicked", "new_items_clicked"),
    ("learned", "new_items_learned"),
    ("median requests to first click", "median_requests_to_first_click"),
    ("median requests to learn", "median_requests_to_learned"),
)


def _exploration_html(exploration: Mapping[str, Any], reference: str) -> str:
    """The exploration policies' table (``components.simulation.exploration``), if any ran."""
    if not exploration:
        return ""
    tolerance = next(iter(exploration.values())).get("learned_tolerance", 0.05)
    head, body = _policy_rows(EXPLORATION_COLUMNS, exploration)
    return f"""<h2>Exploration policies</h2>
<p>The same base list with its exploration slot filled by each policy from the new items, learning
from the simulated clicks. Regret: the {html.escape(reference)}'s expected reward per request less
the policy's. A new item is learned when its posterior mean click rate comes within {tolerance:g}
of the truth's (over the simulated users); requests count the policy's requests so far.</p>
<table><tr><th>policy</th>{head}</tr>{body}</table>"""


def _policy_rows(
    columns: Sequence[tuple[str, str]], rows: Mapping[str, Mapping[str, Any]]
) -> tuple[str, str]:
    """A policy table's header cells and its rows (one per policy; a missing value is blank)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c, _ in columns)
    body = "".join(
        f"<tr><th>{html.escape(name)}</th>"
        + "".join(f"<td>{_cell(row.get(key))}</td>" for _, key in columns)
        + "</tr>"
        for name, row in rows.items()
    )
    return head, body


def _cell(v: Any) -> str:
    if isinstance(v, Mapping) and "mean" in v:
        lo, hi = v["ci95"]
        return f"{v['mean']:.3f} <small>[{lo:.3f}, {hi:.3f}]</small>"
    if isinstance(v, float):
        return f"{v:.3f}"
    return html.escape(str(v))


def _by_request_html(policies: Mapping[str, Any], reference: str) -> str:
    """The share of the reference's expected reward by request number, per policy: a chart."""
    key = "expected_share_by_request"
    shares = {n: p[key] for n, p in policies.items() if p.get(key)}
    if not shares or max(len(v) for v in shares.values()) < 2:
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for name, values in shares.items():
        if name != reference:
            ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    ax.set_xlabel("request number of the user")
    ax.set_ylabel(f"share of the {reference}")
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.legend()
    return (
        f"<h2>By request number</h2><p>Each policy's expected reward on a user's first, second, ... "
        f"request as a share of the {html.escape(reference)}'s on the same users: how fast it learns a "
        f"user from what they take and pass over.</p>"
        f'<img alt="share by request number" src="data:image/png;base64,{_png(fig)}">'
    )


def _chart(policies: Mapping[str, Any], reference: str) -> str:
    """Bars of realized and expected reward per request per policy, with intervals: a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names: Sequence[str] = list(policies)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(names)), 3.6))
    for offset, key, label, color in (
        (-0.2, "reward_per_request", "realized", "#4c72b0"),
        (0.2, "expected_reward_per_request", "expected", "#dd8452"),
    ):
        means = [policies[n][key]["mean"] for n in names]
        err = [
            [max(0.0, m - policies[n][key]["ci95"][0]) for n, m in zip(names, means, strict=True)],
            [max(0.0, policies[n][key]["ci95"][1] - m) for n, m in zip(names, means, strict=True)],
        ]
        ax.bar(x + offset, means, width=0.4, yerr=err, capsize=4, label=label, color=color)
    ax.axhline(policies[reference]["reward_per_request"]["mean"], color="#555", lw=0.8, ls="--")
    ax.set_xticks(x, names)
    ax.set_ylabel("reward per request")
    ax.legend()
    return _png(fig)


# --- the closed loop (``recsys simulate --loop``) ------------------------------------------------


def summarize_loop(
    records: pd.DataFrame,
    retrains: Sequence[Mapping[str, Any]],
    served: str,
    reference: str = ORACLE,
    setup: Mapping[str, Any] | None = None,
    versions: Mapping[int, Mapping[str, Mapping[str, int]]] | None = None,
) -> dict[str, Any]:
    """Per round and serving arm of ``served``: requests, users, reward per request (realized and
    expected) and its share of ``reference``'s expected reward on the same users that round,
    and the model versions that served the arm (``versions``: round -> arm -> {model: version});
    each round's retrain (``retrains``, by ``after_round``) beside it.

    ``records`` are ``simulate``'s with a ``round`` column.
    """
    by_round = {int(r["after_round"]): dict(r) for r in retrains}
    rows, arms = [], list(dict.fromkeys(records.loc[records["policy"] == served, "arm"]))
    for number, rec in records.groupby("round", sort=True):
        ref = rec[rec["policy"] == reference]
        ref_user = ref.groupby("user_id")["expected_reward"].mean()
        per_arm = {}
        for arm, got in rec[rec["policy"] == served].groupby("arm", sort=False):
            users = got["user_id"].unique()
            oracle = float(ref_user.reindex(users).mean())
            expected = float(got["expected_reward"].mean())
            per_arm[str(arm)] = {
                "requests": len(got),
                "users": len(users),
                "reward_per_request": float(got["reward"].mean()),
                "expected_reward_per_request": expected,
                "click_rate": float(got["clicks"].sum() / max(1, got["shown"].sum())),
                "share_of_oracle": expected / oracle if oracle > 0 else math.nan,
                "versions": dict((versions or {}).get(int(number), {}).get(str(arm), {})),
            }
        rows.append(
            {
                "round": int(number),
                "arms": per_arm,
                "oracle_expected_reward_per_request": float(ref["expected_reward"].mean()),
                "retrain": by_round.get(int(number)),
            }
        )
    return {
        "served": served, "reference": reference, "arms": arms, "rounds": rows, "setup": dict(setup or {})
    }  # fmt: skip


def summarize_versions(records: pd.DataFrame) -> dict[str, Any]:
    """Each version the loop pushed, served to the same users from the same state (``records``
    of one served pass per version, with a ``version`` column): expected and realized reward
    per request, and each version's paired difference from the first one's.

    Paired over users: every pass starts from the same user states and draws each response
    from the same seed, so a user's difference is the versions' alone; its 95% interval is
    over users (mean of per-user differences ± 1.96 standard errors).
    """
    versions = sorted(int(v) for v in records["version"].unique())
    per_user = records.groupby(["version", "user_id"])["expected_reward"].mean().unstack(0)
    first = versions[0]
    rows = []
    for v in versions:
        got = records[records["version"] == v]
        difference = (per_user[v] - per_user[first]).dropna().to_numpy()
        rows.append(
            {
                "version": v,
                "requests": len(got),
                "users": int(got["user_id"].nunique()),
                "expected_reward_per_request": float(got["expected_reward"].mean()),
                "reward_per_request": float(got["reward"].mean()),
                "click_rate": float(got["clicks"].sum() / max(1, got["shown"].sum())),
                "minus_first": _mean_ci(difference) if v != first else None,
            }
        )
    return {"first": first, "versions": rows}


def write_loop_report(summary: Mapping[str, Any], records: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """``summary.json``, ``requests.parquet`` and ``report.html`` (the reward curve per arm and
    round) under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "summary": out_dir / "summary.json",
        "records": out_dir / "requests.parquet",
        "report": out_dir / "report.html",
    }
    paths["summary"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    records.to_parquet(paths["records"], index=False)
    paths["report"].write_text(_loop_html(summary))
    return paths


def _loop_html(summary: Mapping[str, Any]) -> str:
    arms, rounds = summary["arms"], summary["rounds"]
    head = "".join(f"<th>{html.escape(a)}: expected reward (share of oracle)</th>" for a in arms)
    body = ""
    cell = "<td>{expected_reward_per_request:.3f} ({share_of_oracle:.0%}), {users} users{served_by}</td>"
    for row in rounds:
        cells = "".join(
            cell.format(**row["arms"][a], served_by=_served_by(row["arms"][a].get("versions")))
            if a in row["arms"]
            else "<td></td>"
            for a in arms
        )
        retrain = row.get("retrain")
        then = (
            ""
            if retrain is None
            else f"retrained on {retrain['served_events']} served events; "
            + ("not pushed" if retrain["pushed_version"] is None else f"pushed v{retrain['pushed_version']}")
            + f": {html.escape(str(retrain['reason']))}"
        )
        body += (
            f"<tr><th>{row['round']}</th>{cells}"
            f"<td>{row['oracle_expected_reward_per_request']:.3f}</td>"
            f"<td style='text-align:left'>{then}</td></tr>"
        )
    setup = "".join(
        f"<li>{html.escape(str(k))}: {html.escape(str(v))}</li>" for k, v in summary.get("setup", {}).items()
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>recsys closed loop</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:80em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}</style></head><body>
<h1>The closed loop against the data's truth</h1>
<p>Each round the same simulated users ask the gateway for items and respond as the truth says;
then the event log is exported, the models are retrained on the source plus that served traffic,
gated and, if blessed, pushed and promoted for the next round. Expected reward per request: what
the truth expects of the shown items (objective-weighted), per serving arm; the oracle's on the
same users the same round is the reference.</p>
<img alt="reward per round" src="data:image/png;base64,{_loop_chart(summary)}">
<table><tr><th>round</th>{head}<th>oracle</th><th>then</th></tr>{body}</table>
{_versions_html(summary.get("versions_compared"))}
<h2>Setup</h2><ul>{setup}</ul>
</body></html>
"""


def paired_text(difference: Mapping[str, Any] | None) -> str:
    """A paired difference with its interval, ``+0.030 (-0.006 to +0.067)``; ``-`` for none."""
    if difference is None:
        return "-"
    lo, hi = difference["ci95"]
    return f"{difference['mean']:+.3f} ({lo:+.3f} to {hi:+.3f})"


def _versions_html(compared: Mapping[str, Any] | None) -> str:
    """The versions served to the same users from the same state, paired with the first."""
    if not compared:
        return ""
    rows = ""
    for r in compared["versions"]:
        paired = html.escape(paired_text(r["minus_first"]))
        rows += (
            f"<tr><th>v{r['version']}</th><td>{r['expected_reward_per_request']:.3f}</td>"
            f"<td>{r['reward_per_request']:.3f}</td><td>{r['click_rate']:.3f}</td>"
            f"<td>{paired}</td><td>{r['users']}</td></tr>"
        )
    return f"""<h2>Each version on the same users</h2>
<p>After the last round, every version the loop served answers one more round for all the users
(no holdout, no canary), each pass starting from the same user states, the same requests and
response seeds: the difference from v{compared["first"]} is the versions' alone, paired per user
(95% interval over users).</p>
<table><tr><th>version</th><th>expected reward / request</th><th>reward / request</th>
<th>click rate</th><th>minus v{compared["first"]}, per user (95% CI)</th><th>users</th></tr>{rows}</table>"""


def _served_by(versions: Mapping[str, int] | None) -> str:
    if not versions:
        return ""
    shown = ", ".join(f"{html.escape(m)} v{v}" for m, v in sorted(versions.items()))
    return f"<br><small>{shown}</small>"


def _loop_chart(summary: Mapping[str, Any]) -> str:
    """Expected reward per request by round: one line per arm and the oracle's, a base64 PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [r["round"] for r in summary["rounds"]]
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for arm in summary["arms"]:
        ys = [r["arms"].get(arm, {}).get("expected_reward_per_request", math.nan) for r in summary["rounds"]]
        ax.plot(rounds, ys, marker="o", label=arm)
    oracle = [r["oracle_expected_reward_per_request"] for r in summary["rounds"]]
    ax.plot(rounds, oracle, marker="o", ls="--", color="#555", label=summary["reference"])
    ax.set_xticks(rounds)
    ax.set_xlabel("round")
    ax.set_ylabel("expected reward per request")
    ax.legend()
    return _png(fig)


def _png(fig: Any) -> str:
    """A matplotlib figure as a base64 PNG for an ``<img>``; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()
