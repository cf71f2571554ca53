"""Benchmark: how much of the oracle any policy can reach from what a user shows (BENCHMARKS.md).

Run after `make demo` (or any pipeline run on the synthetic source):
`.venv/bin/python -m bench.simulation_ceiling [--users 200 --seed 0 --particles 5000]`.

The oracle knows each user's true tastes and latent vector; a recommender only sees what the
user did. This measures the gap that leaves with a policy far better informed than any
trained model: it knows the generator itself (each item's true category and latent vector,
the response model, and the prior a user's tastes are drawn from, taken from the true tastes
of users of the same age bucket and country), and not the user. It keeps a posterior over the
user's tastes and latent vector (importance sampling: ``--particles`` draws from the prior,
weighted by the likelihood of the user's impressions' categories and clicks in the data,
then of every click and pass in the simulation's own requests), and shows the ``k`` allowed
items of highest posterior expected reward. Same users, seeds and responses as
`recsys simulate`; the table gives the expected reward per request number beside the oracle.

With ``--item-latents unknown`` the policy knows everything above except the items' latent
vectors: the within-category part of each response is noise to it (drawn as the generator
draws it, averaged over ``NOISE_DRAWS`` draws), so it learns the user's category tastes from
impressions, clicks and passes, and nothing within a category. That is the ceiling of a
learner whose item representations carry nothing of those vectors, which is what the
trained models' item embeddings are on the demo data (BENCHMARKS.md, "Simulation: what is
learnable").
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from components.simulation.loop import build_world, load_feature_source, simulate
from components.simulation.policies import OraclePolicy, Recommendation, Request, top_allowed
from components.simulation.truth import SimulatedResponse, Truth, latest_truth_dir, load_truth
from components.sources.synthetic import LATENT_DIM, affinity_of, response_odds
from recsys.config import settings_from_environment
from recsys.storage import read_table

# The generator's impressions pick a category by the user's taste, else (this share) an item
# by global popularity (components.sources.synthetic._draw_impressions).
TRENDING_SHARE = 0.15
# The generator's Dirichlet around a user's prior: alpha = 0.05 + 2 x prior.
DIRICHLET_FLOOR, DIRICHLET_SCALE = 0.05, 2.0
# Draws of the within-category part of the affinity a policy without item vectors averages
# over, and the grid of category parts its averaged click chance and reward are tabled on.
NOISE_DRAWS = 1024
CATEGORY_AFFINITY_GRID = np.linspace(-8.0, 1.0, 4001)


class PosteriorPolicy:
    """Top-k by posterior expected reward, knowing the generator but not the user."""

    name = "posterior"

    def __init__(
        self,
        truth: Truth,
        universe_ids: list[str],
        prior: np.ndarray,
        data: pd.DataFrame,
        particles: int,
        seed: int,
        item_latents: bool = True,
    ) -> None:
        self.truth, self.t = truth, truth.synthetic
        self.item_latents = item_latents
        self.universe_ids = universe_ids
        self.universe_pos = truth.item_positions(universe_ids)
        self.prior, self.data, self.particles = prior, data, particles
        self.rng = np.random.default_rng(seed)
        shown = data[data["event_type"] == "impression"]
        categories = self.t.item_primary[shown["ip"].to_numpy(dtype=np.int64)]
        self.category_share = np.bincount(categories, minlength=self.t.taste.shape[1]) / max(len(shown), 1)
        self._state: dict[str, list[np.ndarray]] = {}
        # Without item vectors: the click chance and reward of a category part, noise averaged.
        noisy = CATEGORY_AFFINITY_GRID[:, None] + self._within_category_noise(seed)[None, :]
        self._click_of_category = response_odds(noisy).click.mean(axis=1)
        self._reward_of_category = truth.expected_reward_of_affinity(noisy).mean(axis=1)

    def _within_category_noise(self, seed: int) -> np.ndarray:
        """Draws of the affinity's latent part for a random user and item, as the generator
        draws both vectors (the affinity with them less the affinity without them)."""
        rng = np.random.default_rng(seed + 1)
        shape = (NOISE_DRAWS, LATENT_DIM)
        users, items = rng.normal(0, 1, size=shape), rng.normal(0, 1, size=shape)
        ones, zeros = np.ones(NOISE_DRAWS), np.zeros(shape)
        scale = np.sqrt(LATENT_DIM)
        return affinity_of(ones, users / scale, items / scale) - affinity_of(ones, zeros, zeros)

    def recommend(self, request: Request) -> Recommendation:
        expected = self.expected_rewards(request.user_id)
        picked = top_allowed(expected, request.allowed, request.k)
        return Recommendation([self.universe_ids[p] for p in picked])

    def expected_rewards(self, user_id: str) -> np.ndarray:
        """Each universe item's posterior expected reward for ``user_id``."""
        taste, latent, log_w = self._posterior(user_id)
        w = np.exp(log_w - log_w.max())
        w /= w.sum()
        keep = w > 1e-8  # particles of negligible weight change nothing
        if self.item_latents:
            affinity = affinity_of(
                taste[keep][:, self.t.item_primary[self.universe_pos]],
                latent[keep][:, None, :],
                self.t.item_latent[self.universe_pos][None, :, :],
            )
            expected = w[keep] @ self.truth.expected_reward_of_affinity(affinity)
        else:
            # Every item of a category is worth the same: the category's reward, noise averaged.
            base = self._category_affinity(taste[keep])  # [P, C]
            per_category = np.interp(base, CATEGORY_AFFINITY_GRID, self._reward_of_category)
            expected = (w[keep] @ per_category)[self.t.item_primary[self.universe_pos]]
        return expected

    def observe(self, request: Request, shown: Recommendation, response: SimulatedResponse) -> None:
        del shown
        state = self._state[request.user_id]
        items = self.truth.item_positions(response.item_ids)
        state[2] = state[2] + self._click_log_likelihood(state[0], state[1], items, response.click)

    def _posterior(self, user_id: str) -> list[np.ndarray]:
        if user_id not in self._state:
            u = self.truth.user_positions([user_id])[0]
            taste = self.rng.dirichlet(DIRICHLET_FLOOR + DIRICHLET_SCALE * self.prior[u], size=self.particles)
            latent = self.rng.normal(0, 1, size=(self.particles, LATENT_DIM)) / np.sqrt(LATENT_DIM)
            mine = self.data[self.data["user_id"] == user_id]
            shown = mine[mine["event_type"] == "impression"]["ip"].to_numpy(dtype=np.int64)
            clicked = set(mine[mine["event_type"] == "click"]["ip"].tolist())
            log_w = np.zeros(self.particles)
            for c in self.t.item_primary[shown]:
                log_w += np.log((1 - TRENDING_SHARE) * taste[:, c] + TRENDING_SHARE * self.category_share[c])
            log_w += self._click_log_likelihood(taste, latent, shown, np.isin(shown, list(clicked)))
            self._state[user_id] = [taste, latent, log_w]
        return self._state[user_id]

    def _click_log_likelihood(
        self, taste: np.ndarray, latent: np.ndarray, items: np.ndarray, clicked: np.ndarray
    ) -> np.ndarray:
        if not len(items):
            return np.zeros(len(taste))
        if self.item_latents:
            primary, item_latent = self.t.item_primary[items], self.t.item_latent[items]
            affinity = affinity_of(taste[:, primary], latent[:, None, :], item_latent[None, :, :])
            p = response_odds(affinity).click
        else:
            base = self._category_affinity(taste)[:, self.t.item_primary[items]]  # [P, N]
            p = np.interp(base, CATEGORY_AFFINITY_GRID, self._click_of_category)
        p = np.clip(p, 1e-9, 1 - 1e-9)
        return np.where(np.asarray(clicked, dtype=bool)[None, :], np.log(p), np.log1p(-p)).sum(axis=1)

    def _category_affinity(self, taste: np.ndarray) -> np.ndarray:
        """[P, C] the affinity's category part: the affinity with both latent vectors zero."""
        p, c = taste.shape
        return affinity_of(taste, np.zeros((p, c, LATENT_DIM)), np.zeros((p, c, LATENT_DIM)))


def group_prior(truth: Truth, users: pd.DataFrame) -> np.ndarray:
    """Each user's taste prior: the mean true taste of the users of the same age bucket and country."""
    frame = pd.DataFrame({"user_id": [str(u) for u in truth.synthetic.user_ids]}).merge(
        users.astype({"user_id": str}), on="user_id", how="left"
    )
    keys = frame[["age_bucket", "country"]].astype(str).agg("|".join, axis=1)
    prior = np.empty_like(truth.synthetic.taste)
    for _, idx in frame.groupby(keys).indices.items():
        prior[idx] = truth.synthetic.taste[idx].mean(axis=0)
    return prior


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
    events = read_table(validated, "events", columns=["user_id", "item_id", "event_type"])
    events = events[events["item_id"].astype(str).isin(set(truth.item_ids))]
    events = events.assign(ip=truth.item_positions(events["item_id"].astype(str).tolist()))
    prior = group_prior(truth, read_table(validated, "users", columns=["user_id", "age_bucket", "country"]))
    universe = [str(i) for i in world.universe.item_ids]
    policies: list[Any] = [
        PosteriorPolicy(
            truth, universe, prior, events, args.particles, args.seed, args.item_latents == "known"
        ),
        OraclePolicy(world.universe, truth),
    ]
    console = Console()
    with Progress(console=console) as progress:
        task = progress.add_task("requests", total=len(policies) * len(world.users) * args.requests_per_user)
        records = simulate(
            world, policies, args.requests_per_user, args.k, args.seed, lambda _: progress.advance(task)
        )
    _print(console, records, args)


def _print(console: Console, records: pd.DataFrame, args: argparse.Namespace) -> None:
    per_request = records.pivot_table(index="request", columns="policy", values="expected_reward")
    table = Table(
        title=f"expected reward per request, {args.users} users, seed {args.seed}, {args.particles} "
        f"particles, item latent vectors {args.item_latents}"
    )
    for c in ("request", "posterior", "oracle", "share"):
        table.add_column(c, justify="right")
    for n, row in per_request.iterrows():
        table.add_row(
            str(n),
            f"{row['posterior']:.3f}",
            f"{row['oracle']:.3f}",
            f"{row['posterior'] / row['oracle']:.1%}",
        )
    total = records.groupby("policy")["expected_reward"].mean()
    table.add_row(
        "all",
        f"{total['posterior']:.3f}",
        f"{total['oracle']:.3f}",
        f"{total['posterior'] / total['oracle']:.1%}",
    )
    console.print(table)
    console.print(
        f"the posterior policy (knows the generator, not the user) reaches "
        f"{total['posterior'] / total['oracle']:.1%} of the oracle's expected reward"
    )


if __name__ == "__main__":
    main()
