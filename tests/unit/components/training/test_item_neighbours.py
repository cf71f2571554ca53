"""EASE neighbours: fitted on co-occurrence, l2 chosen on a validation carve of the positives."""

from __future__ import annotations

import numpy as np
import pandas as pd

from components.training.neighbours import choose_l2, fit_item_neighbours


def _two_tastes(users_per_group: int = 30, seed: int = 0) -> pd.DataFrame:
    """Half the users take items of {a1..a4}, half of {b1..b4}: each item of their group with
    probability 0.7, at least one."""
    rng = np.random.default_rng(seed)
    rows = []
    for group in ("a", "b"):
        for u in range(users_per_group):
            taken = np.flatnonzero(rng.random(4) < 0.7)
            for item in taken if len(taken) else [0]:
                rows.append((f"{group}-user{u}", f"{group}{item + 1}"))
    return pd.DataFrame(rows, columns=["user_id", "item_id"])


def test_neighbours_follow_co_occurrence():
    table = fit_item_neighbours(_two_tastes(), l2=1.0, top_k=7, max_items=100)
    ids, scores = table.score(["a1", "a2"], top=8)
    # Only the other items of the same taste score above zero.
    assert set(ids.tolist()) == {"a3", "a4"} and (scores > 0).all()
    # Each row keeps its top_k weights by magnitude, never the item itself.
    row = table.rows(["b2"])[0]
    assert table.neighbours.shape == (8, 7) and row not in table.neighbours[row].tolist()


def test_max_items_keeps_the_items_with_most_users():
    pairs = pd.concat([_two_tastes(), pd.DataFrame({"user_id": ["x"], "item_id": ["rare"]})])
    table = fit_item_neighbours(pairs, l2=1.0, top_k=2, max_items=8)
    assert "rare" not in set(table.item_ids.tolist()) and len(table) == 8


def test_l2_is_chosen_from_the_grid_on_validation_and_repeats():
    pairs = _two_tastes()
    l2, scores = choose_l2(pairs, [0.5, 5.0, 5000.0], top_k=3, max_items=100, seed=1)
    assert l2 in (0.5, 5.0, 5000.0) and set(scores) == {"0.5", "5", "5000"}
    assert scores[f"{l2:g}"] == max(scores.values())
    assert choose_l2(pairs, [0.5, 5.0, 5000.0], top_k=3, max_items=100, seed=1) == (l2, scores)
