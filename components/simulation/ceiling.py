"""The learner's ceiling: a posterior policy that knows the generator but not the user.

The oracle knows each user's true tastes and latent vector; a recommender only sees what the
user did. ``PosteriorPolicy`` is far better informed than any trained model: it knows the
generator itself (each item's true primary category and, unless told otherwise, latent
vector, the response model, and the prior a user's tastes are drawn from, taken from the true
tastes of the other users of the same age bucket and country), and not the user. It keeps a posterior
over the user's tastes and latent vector (importance sampling: ``particles`` draws from the
prior, weighted by the likelihood of the user's impressions' categories and clicks in the
data, then of every click and pass of the simulation's own requests) and shows the ``k``
allowed items of highest posterior expected reward.

Without the items' latent vectors (``item_latents=False``, the simulation's ``ceiling``
policy) the within-category part of each response is noise to it, drawn as the generator
draws it and averaged (its click chance and reward tabled over the category part), so it
learns the user's category tastes and nothing within a category: the ceiling of a learner
whose item representations carry nothing of those vectors, which is what every model's item
embeddings are on the demo data (BENCHMARKS.md, "Simulation: what the demo data lets a
learner know").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from components.simulation.policies import Recommendation, Request, top_allowed
from components.simulation.truth import SimulatedResponse, Truth
from components.sources.synthetic import LATENT_DIM, affinity_of, response_odds
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
    """Top-k by posterior expected reward, knowing the generator but not the user: named
    ``ceiling`` without the items' latent vectors, ``posterior`` with them."""

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
        self.name = "posterior" if item_latents else "ceiling"
        self.universe_ids = universe_ids
        self.universe_pos = truth.item_positions(universe_ids)
        self.prior, self.data, self.particles = prior, data, particles
        self.rng = np.random.default_rng(seed)
        shown = data[data["event_type"] == "impression"]
        categories = self.t.item_primary[shown["ip"].to_numpy(dtype=np.int64)]
        self.category_share = np.bincount(categories, minlength=self.t.taste.shape[1]) / max(len(shown), 1)
        self._state: dict[str, list[np.ndarray]] = {}
        # Each user's rows of ``data``, found once rather than by a scan per user.
        self._rows_of = data.groupby(data["user_id"].astype(str)).indices
        if not item_latents:
            # The click chance and reward of a category part, the within-category noise averaged.
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
            mine = self.data.iloc[self._rows_of.get(user_id, np.zeros(0, dtype=np.int64))]
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
    """Each user's taste prior: the mean true taste of the other users of the same age bucket
    and country (all other users where the user is alone in their group), so that the prior
    holds nothing of the user's own taste."""
    frame = pd.DataFrame({"user_id": [str(u) for u in truth.synthetic.user_ids]}).merge(
        users.astype({"user_id": str}), on="user_id", how="left"
    )
    keys = frame[["age_bucket", "country"]].astype(str).agg("|".join, axis=1)
    taste = truth.synthetic.taste
    prior = (taste.sum(axis=0) - taste) / max(len(taste) - 1, 1)
    for _, idx in frame.groupby(keys).indices.items():
        if len(idx) > 1:
            prior[idx] = (taste[idx].sum(axis=0) - taste[idx]) / (len(idx) - 1)
    return prior


def ceiling_policy(
    truth: Truth,
    universe_ids: list[str],
    validated_dir: Path,
    particles: int,
    seed: int,
    item_latents: bool = False,
) -> PosteriorPolicy:
    """The posterior policy over the validated data's events and users (the truth's items only)."""
    events = read_table(validated_dir, "events", columns=["user_id", "item_id", "event_type"])
    events = events[events["item_id"].astype(str).isin(set(truth.item_ids))]
    events = events.assign(ip=truth.item_positions(events["item_id"].astype(str).tolist()))
    users = read_table(validated_dir, "users", columns=["user_id", "age_bucket", "country"])
    prior = group_prior(truth, users)
    return PosteriorPolicy(truth, universe_ids, prior, events, particles, seed, item_latents)
