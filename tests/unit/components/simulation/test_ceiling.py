"""The posterior policies that bound what a policy can learn of a simulated user."""

from __future__ import annotations

import numpy as np
import pandas as pd

from components.simulation.ceiling import PosteriorPolicy, group_prior
from components.simulation.loop import SimulatedUser, World, simulate
from components.simulation.policies import OraclePolicy, RandomPolicy, Recommendation, Request, Universe
from components.simulation.truth import SimulatedResponse, Truth
from components.sources.synthetic import draw_truth
from recsys.config import TrainingConfig
from tests.support.tiny_data import tiny_params


def test_group_prior_is_the_mean_taste_of_the_other_users_alike() -> None:
    truth = Truth(draw_truth(tiny_params(users=50, items=40)), TrainingConfig())
    ids = [str(u) for u in truth.synthetic.user_ids]
    users = pd.DataFrame({"user_id": ids, "age_bucket": ["a", "b"] * 25, "country": "DE"})
    prior = group_prior(truth, users)
    # The others of the user's group: the user's own taste is not in their prior.
    taste = truth.synthetic.taste
    assert np.allclose(prior[0], taste[2::2].mean(axis=0))
    assert np.allclose(prior[1], taste[3::2].mean(axis=0))
    # Alone in a group: every other user.
    users.loc[0, "country"] = "FR"
    assert np.allclose(group_prior(truth, users)[0], taste[1:].mean(axis=0))


def test_posterior_policy_learns_a_user_from_clicks_and_beats_random() -> None:
    truth = Truth(draw_truth(tiny_params(users=60, items=60)), TrainingConfig())
    t = truth.synthetic
    universe = Universe.of(truth.item_ids)
    ids = [str(i) for i in truth.item_ids]
    prior = np.tile(t.taste.mean(axis=0), (len(t.user_ids), 1))
    no_data = pd.DataFrame({"user_id": [], "item_id": [], "event_type": [], "ip": []})
    policy = PosteriorPolicy(truth, ids, prior, no_data, particles=3000, seed=0)
    user = str(t.user_ids[0])
    # Clicks on the user's favourite category, passes elsewhere: its items move to the top.
    favourite = int(np.argmax(t.taste[0]))
    liked = np.flatnonzero(t.item_primary == favourite)[:6]
    other = np.flatnonzero(t.item_primary != favourite)[:12]
    request = Request(user, 0, 5, np.ones(len(universe), dtype=bool), [])
    before = truth.item_positions(policy.recommend(request).item_ids)
    shown = [ids[i] for i in np.concatenate([liked, other])]
    clicks = np.concatenate([np.ones(len(liked), bool), np.zeros(len(other), bool)])
    zeros = np.zeros(len(shown))
    policy.observe(
        request, Recommendation(shown), SimulatedResponse(shown, pd.DataFrame(), clicks, zeros, zeros)
    )
    after = truth.item_positions(policy.recommend(request).item_ids)
    assert (t.item_primary[after] == favourite).mean() > (t.item_primary[before] == favourite).mean()
    # Over whole sessions it earns more than random on the same users and responses.
    users = [SimulatedUser(str(u), n, [], "mobile", 19) for n, u in enumerate(t.user_ids[:15])]
    world = World(truth, universe, users, popular_items=ids, recent_limit=20)
    fresh = PosteriorPolicy(truth, ids, prior, no_data, particles=2000, seed=0)
    records = simulate(world, [fresh, RandomPolicy(universe, 0), OraclePolicy(universe, truth)], 4, 5, 0)
    reward = records.groupby("policy")["expected_reward"].mean()
    assert reward["random"] < reward["posterior"] <= reward["oracle"]


def test_without_item_vectors_the_posterior_learns_categories_and_nothing_within_them() -> None:
    truth = Truth(draw_truth(tiny_params(users=60, items=60)), TrainingConfig())
    t = truth.synthetic
    ids = [str(i) for i in truth.item_ids]
    prior = np.tile(t.taste.mean(axis=0), (len(t.user_ids), 1))
    no_data = pd.DataFrame({"user_id": [], "item_id": [], "event_type": [], "ip": []})
    policy = PosteriorPolicy(truth, ids, prior, no_data, particles=2000, seed=0, item_latents=False)
    assert policy.name == "ceiling"
    user = str(t.user_ids[0])
    before = policy.expected_rewards(user)
    # Items of one category are worth the same to it, whatever their latent vectors.
    for c in np.unique(t.item_primary):
        assert np.ptp(before[t.item_primary == c]) < 1e-12
    knowing = PosteriorPolicy(truth, ids, prior, no_data, particles=2000, seed=0).expected_rewards(user)
    assert max(np.ptp(knowing[t.item_primary == c]) for c in np.unique(t.item_primary)) > 0
    # Clicks on one category and passes elsewhere lift that category to the top.
    favourite = int(np.argmax(t.taste[0]))
    liked = np.flatnonzero(t.item_primary == favourite)[:6]
    other = np.flatnonzero(t.item_primary != favourite)[:12]
    shown = [ids[i] for i in np.concatenate([liked, other])]
    clicks = np.concatenate([np.ones(len(liked), bool), np.zeros(len(other), bool)])
    zeros = np.zeros(len(shown))
    request = Request(user, 0, 5, np.ones(len(ids), dtype=bool), [])
    policy.observe(
        request, Recommendation(shown), SimulatedResponse(shown, pd.DataFrame(), clicks, zeros, zeros)
    )
    after = policy.expected_rewards(user)
    assert after[t.item_primary == favourite][0] == after.max() > before[t.item_primary == favourite][0]
