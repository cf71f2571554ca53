"""Exploration policies in the simulation: slots from the new items, learned from the simulated
clicks, and compared by reward, regret against the oracle and how fast new items are learned."""

from __future__ import annotations

import pandas as pd
import pytest

from components.simulation.exploration import (
    ExploringPolicy,
    exploration_summary,
    new_items,
    true_click_rates,
)
from components.simulation.loop import SimulatedUser, World, simulate
from components.simulation.policies import OraclePolicy, PopularityPolicy, Universe
from components.simulation.report import summarize, write_report
from components.simulation.truth import Truth
from components.sources.synthetic import draw_truth
from recsys.config import TrainingConfig
from tests.support.tiny_data import tiny_params

KINDS = ("uniform", "epsilon_greedy", "thompson", "linucb", "none")


@pytest.fixture(scope="module")
def run() -> tuple[World, list[ExploringPolicy], pd.DataFrame, list[str]]:
    truth = Truth(draw_truth(tiny_params(users=200, items=80)), TrainingConfig())
    universe = Universe.of(truth.item_ids)
    users = [SimulatedUser(u, n, [], "mobile", 19) for n, u in enumerate(truth.user_ids[:20])]
    world = World(truth, universe, users, popular_items=truth.item_ids[::-1], recent_limit=20)
    new = new_items(universe, world.popular_items, 10)
    rates = true_click_rates(truth, [u.user_id for u in users], new)
    # LinUCB's item embeddings: each item's truth affinity with the simulated users (what a
    # retrieval model's embedding approximates), for every new item but the last (which has
    # none, as an item newer than the retrieval version)
    embedding = truth.affinity([u.user_id for u in users], new[:-1]).T
    exploring = [
        ExploringPolicy(
            PopularityPolicy(universe, world.popular_items),
            universe,
            kind,
            new,
            rates,
            seed=0,
            features=(new[:-1], embedding),
        )
        for kind in KINDS
    ]
    plain = PopularityPolicy(universe, world.popular_items)
    records = simulate(world, [*exploring, plain, OraclePolicy(universe, truth)], 8, 6, seed=0)
    return world, exploring, records, new


def test_new_items_are_the_least_popular_and_their_rates_are_probabilities(run) -> None:
    world, exploring, _, new = run
    assert new == list(reversed(world.popular_items))[:10]
    rates = exploring[0].tracker.true_rate
    assert set(rates) == set(new) and all(0 < p < 1 for p in rates.values())


def test_slots_hold_new_items_and_none_is_the_base_policy(run) -> None:
    _, exploring, records, new = run
    by = {p: g.reset_index(drop=True) for p, g in records.groupby("policy")}
    assert by["popularity+none"]["items"].tolist() == by["popularity"]["items"].tolist()
    for kind in ("uniform", "epsilon_greedy", "thompson", "linucb"):
        lists = by[f"popularity+{kind}"]["items"].str.split()
        # position 3 of every list is a new item (one slot), and nothing else changed length
        assert all(items[3] in new and len(items) == 6 for items in lists)
    for p in exploring:
        expected = 0 if p.policy.kind == "none" else len(records[records["policy"] == p.name])
        assert p.posteriors.total_trials == expected


def test_summary_reports_reward_regret_and_learning_speed(run, tmp_path) -> None:
    _, exploring, records, _ = run
    summary = exploration_summary(records, exploring)
    assert list(summary) == [f"popularity+{k}" for k in KINDS]
    for name, s in summary.items():
        assert s["requests"] == 160 and s["regret_per_request"] > 0  # the oracle is the ceiling
        if name.endswith("none"):
            assert s["slot_trials"] == 0 and s["new_items_learned"] == 0
            assert s["median_requests_to_learned"] is None
        else:
            assert s["slot_trials"] == 160 and s["new_items_learned"] > 0
            assert 1 <= s["median_requests_to_learned"] <= 160
            assert s["slot_clicks"] >= s["new_items_clicked"]
    full = summarize(records)
    full["exploration"] = summary
    html = write_report(full, records, tmp_path)["report"].read_text()
    assert "Exploration policies" in html and "popularity+thompson" in html and "requests to learn" in html


def test_linucb_learns_on_the_given_embeddings(run) -> None:
    _, exploring, _, new = run
    (lin,) = [p for p in exploring if p.policy.kind == "linucb"]
    summary = lin.posteriors.summary()
    # one regression (the simulation has no segments) on the 20 users' affinities
    assert summary["dimension"] == 20 and summary["segments"] == 1
    assert summary["items_with_embedding"] == len(new) - 1  # the newest has none
    assert summary["trials"] == lin.tracker.requests == 160
