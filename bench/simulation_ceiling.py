"""Benchmark: how much of the oracle any policy can reach from what a user shows (BENCHMARKS.md).

Run after `make demo` (or any pipeline run on the synthetic source):
`.venv/bin/python -m bench.simulation_ceiling [--users 200 --seed 0 --particles 5000]
[--item-latents known|unknown]`.

Runs the posterior policy of ``components.simulation.ceiling`` (it knows the generator, not
the user) beside the oracle on the same users, seeds and responses as `recsys simulate`, and
prints the expected reward per request number. ``--item-latents known`` (the default) gives
it the items' latent vectors too, which no model learns from the demo data; ``unknown`` is
`recsys simulate`'s ``ceiling`` policy, the ceiling of a learner of category tastes.
"""

from __future__ import annotations

import argparse
from typing import Any

import pandas as pd
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from components.simulation.ceiling import ceiling_policy
from components.simulation.loop import build_world, load_feature_source, simulate
from components.simulation.policies import OraclePolicy
from components.simulation.truth import latest_truth_dir, load_truth
from recsys.config import settings_from_environment


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--users", type=int, default=200)
    p.add_argument("--requests-per-user", type=int, default=10)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--particles", type=int, default=5000)
    p.add_argument(
        "--item-latents",
        choices=("known", "unknown"),
        default="known",
        help="whether the policy knows the items' latent vectors (unknown: categories only)",
    )
    args = p.parse_args()
    settings = settings_from_environment(None)
    truth_folder = latest_truth_dir(settings)
    validated = truth_folder.parent.parent / "validate"
    truth = load_truth(truth_folder, settings.training)
    world = build_world(
        settings, truth, load_feature_source(settings, validated), validated, args.users, args.seed
    )
    universe = [str(i) for i in world.universe.item_ids]
    policies: list[Any] = [
        ceiling_policy(truth, universe, validated, args.particles, args.seed, args.item_latents == "known"),
        OraclePolicy(world.universe, truth),
    ]
    console = Console()
    with Progress(console=console) as progress:
        task = progress.add_task("requests", total=len(policies) * len(world.users) * args.requests_per_user)
        records = simulate(
            world, policies, args.requests_per_user, args.k, args.seed, lambda _: progress.advance(task)
        )
    _print(console, records, args, policies[0].name)


def _print(console: Console, records: pd.DataFrame, args: argparse.Namespace, name: str) -> None:
    per_request = records.pivot_table(index="request", columns="policy", values="expected_reward")
    table = Table(
        title=f"expected reward per request, {args.users} users, seed {args.seed}, {args.particles} "
        f"particles, item latent vectors {args.item_latents}"
    )
    for c in ("request", name, "oracle", "share"):
        table.add_column(c, justify="right")
    for n, row in per_request.iterrows():
        table.add_row(
            str(n),
            f"{row[name]:.3f}",
            f"{row['oracle']:.3f}",
            f"{row[name] / row['oracle']:.1%}",
        )
    total = records.groupby("policy")["expected_reward"].mean()
    table.add_row(
        "all",
        f"{total[name]:.3f}",
        f"{total['oracle']:.3f}",
        f"{total[name] / total['oracle']:.1%}",
    )
    console.print(table)
    console.print(
        f"the {name} policy (knows the generator, not the user) reaches "
        f"{total[name] / total['oracle']:.1%} of the oracle's expected reward"
    )


if __name__ == "__main__":
    main()
