"""Benchmark: where the served system's gap to the oracle comes from (BENCHMARKS.md, Simulation).

Run after `make demo` (or any pipeline run on the synthetic source):
`.venv/bin/python -m bench.simulation_gap [--users 200 --seed 0] [--simulation DIR]`.

On each sampled user's first request (history filtered as the gateway does), the expected
reward of the top 10 allowed items under several scorings: the truth (the oracle), the true
category taste alone, the true latent vectors alone, a rule over the data alone (the
categories of the user's past positives), the pushed retrieval model, popularity and random;
with the share of each top 10 in the user's two favourite categories and the rank correlation
of the retrieval model's scores with the true reward. With ``--simulation`` (a `recsys
simulate` output folder on the same users), the policies' shares by the users' history size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from components.simulation.loop import build_world, load_feature_source
from components.simulation.policies import Request, RetrievalPolicy, top_allowed
from components.simulation.retrieval import PushedQueryEmbedder
from components.simulation.truth import latest_truth_dir, load_truth
from recsys.config import settings_from_environment
from recsys.contracts import CATEGORY_SEPARATOR
from recsys.feature_schema import POSITIVE_EVENT_TYPES
from recsys.storage import read_table

K = 10


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--simulation", type=Path, default=None, help="a `recsys simulate` output folder")
    args = p.parse_args()
    settings = settings_from_environment(None)
    truth_folder = latest_truth_dir(settings)
    validated = truth_folder.parent.parent / "validate"
    truth = load_truth(truth_folder, settings.training)
    source = load_feature_source(settings, validated)
    world = build_world(settings, truth, source, validated, args.users, args.seed)
    t = truth.synthetic
    universe = [str(i) for i in world.universe.item_ids]
    primary_true = t.item_primary[truth.item_positions(universe)]
    events = read_table(validated, "events", columns=["user_id", "item_id", "event_type"])
    positives = events[events["event_type"].astype(str).isin(POSITIVE_EVENT_TYPES)]
    items = read_table(validated, "items", columns=["item_id", "category"]).set_index("item_id")
    primary_data = items["category"].str.split(CATEGORY_SEPARATOR).str[0]
    popular = {i: n for n, i in enumerate(world.popular_items)}
    popularity = -np.array([popular.get(i, len(popular)) for i in universe], dtype=np.float64)
    retrieval = RetrievalPolicy(
        world.universe, PushedQueryEmbedder(settings.models_dir, settings.push.retrieval_model, source)
    )
    rows = []
    for user in world.users:
        u = truth.user_positions([user.user_id])[0]
        reward = truth.expected_reward([user.user_id], universe)[0]
        allowed = ~world.universe.mask(user.recent_items)
        mine = positives[positives["user_id"] == user.user_id]
        per_category = mine["item_id"].map(primary_data).value_counts()
        request = Request(user.user_id, 0, K, allowed, user.recent_items, user.device, user.hour)
        scorings = {
            "oracle": reward,
            "true category taste only": t.taste[u][primary_true] + 1e-9 * popularity,
            "true latent vectors only": t.item_latent[truth.item_positions(universe)] @ t.user_latent[u],
            "past positives' categories (data)": np.array(
                [per_category.get(primary_data.get(i, ""), 0) for i in universe], dtype=np.float64
            )
            + 1e-6 * popularity,
            "pushed retrieval model": retrieval.scores(request),
            "popularity": popularity,
        }
        favourite = set(np.argsort(-t.taste[u])[:2])
        row = {"user_id": user.user_id, "positives": mine["item_id"].nunique()}
        for name, scores in scorings.items():
            top = top_allowed(scores, allowed, K)
            row[f"reward:{name}"] = reward[top].sum()
            row[f"favourite:{name}"] = np.mean([primary_true[j] in favourite for j in top])
        row["reward:random"] = reward[allowed].mean() * K
        row["spearman"] = pd.Series(scorings["pushed retrieval model"][allowed]).corr(
            pd.Series(reward[allowed]), method="spearman"
        )
        rows.append(row)
    df = pd.DataFrame(rows)
    _print(df, args.simulation)


def _print(df: pd.DataFrame, simulation: Path | None) -> None:
    console = Console()
    oracle = df["reward:oracle"].mean()
    t = Table(
        title=f"first request, top {K}: expected reward, share of the oracle, in the 2 favourite categories"
    )
    for c in ("scoring", "expected reward", "share of oracle", "in favourite categories"):
        t.add_column(c, justify="left" if c == "scoring" else "right")
    for col in [c for c in df.columns if c.startswith("reward:")]:
        name = col.split(":", 1)[1]
        fav = df.get(f"favourite:{name}")
        t.add_row(
            name,
            f"{df[col].mean():.3f}",
            f"{df[col].mean() / oracle:.1%}",
            "-" if fav is None else f"{fav.mean():.0%}",
        )
    console.print(t)
    console.print(
        f"retrieval score vs true reward: Spearman mean {df['spearman'].mean():.3f}; users' positives "
        f"in the data: mean {df['positives'].mean():.2f}, median {df['positives'].median():.0f}"
    )
    if simulation is None:
        return
    records = pd.read_parquet(simulation / "requests.parquet")
    per_user = records.pivot_table(index="user_id", columns="policy", values="reward", aggfunc="mean")
    bucket = pd.cut(
        df.set_index("user_id")["positives"], [-1, 0, 2, 5, 10**9], labels=["0", "1-2", "3-5", "6+"]
    )
    grouped = per_user.join(bucket.rename("history")).groupby("history", observed=True)
    b = Table(title="share of the oracle by the user's positives in the data")
    b.add_column("positives")
    b.add_column("users", justify="right")
    policies = [p for p in per_user.columns if p != "oracle"]
    for p in policies:
        b.add_column(p, justify="right")
    for name, g in grouped:
        b.add_row(str(name), str(len(g)), *(f"{g[p].mean() / g['oracle'].mean():.1%}" for p in policies))
    console.print(b)


if __name__ == "__main__":
    main()
