"""Simulated reward: the generator's truth, where the data came from the generator.

Top-K metrics over logged positives can only credit items the old system happened to show;
the synthetic generator knows each user's expected reward for *any* item shown
(``components.simulation.truth``). Where that truth exists, the mean expected reward of a
system's top-K is the number a ranker, a fusion weight or a re-ranking step must not lower.
Where it does not (MovieLens, production data), everything here says "truth not available"
and the evaluation goes on without it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from recsys.config import TrainingConfig


class Truth(Protocol):
    """What the evaluation reads of the generator's truth."""

    def expected_reward(self, user_ids: Sequence[str], item_ids: Sequence[str]) -> np.ndarray:
        """[len(user_ids), len(item_ids)]: each user's expected reward if shown each item."""
        ...

    def has_items(self, item_ids: Sequence[str]) -> np.ndarray:
        """Which of ``item_ids`` the truth knows."""
        ...


def load_truth(data_dir: Path | None, training: TrainingConfig | None = None) -> tuple[Truth | None, str]:
    """The generator's truth for the data in ``data_dir``, and a sentence saying where it came
    from or why there is none.

    Args:
        data_dir: a data folder the generator wrote (its truth is in ``truth/`` beside the data).
        training: whose objective weights define the reward (the ranker's own); default the
            configuration's.
    """
    if data_dir is None:
        return None, "truth not available: no data folder given"
    try:
        from components.simulation.truth import load_truth as read_truth
        from components.simulation.truth import truth_dir
    except ImportError as e:
        return None, f"truth not available: {e}"
    path = truth_dir(Path(data_dir))
    if not path.exists():
        return None, f"truth not available: {path} does not exist (the data is not the generator's)"
    return read_truth(path, training), f"generator truth from {path}"


def expected_reward_at_k(
    truth: Truth, ranked: Mapping[str, Sequence[str]], users: Sequence[str], k: int, chunk: int = 256
) -> float:
    """Mean over ``users`` of the mean expected reward of their top-``k`` slots.

    An empty slot (a list shorter than ``k``) earns nothing: a system that shows less is not
    rewarded for it.
    """
    if not users:
        return float("nan")
    totals: list[float] = []
    for lo in range(0, len(users), chunk):
        group = list(users[lo : lo + chunk])
        lists = [list(ranked.get(u, ()))[:k] for u in group]
        items = list(dict.fromkeys(i for lst in lists for i in lst))
        if not items:
            totals += [0.0] * len(group)
            continue
        # An item the generator never made (added to the catalog later) has no truth: it earns 0.
        known = [i for i, ok in zip(items, truth.has_items(items), strict=True) if ok]
        column = {item: j for j, item in enumerate(known)}
        reward = np.asarray(truth.expected_reward(group, known), dtype=np.float64)
        for row, lst in enumerate(lists):
            cols = [column[i] for i in lst if i in column]
            totals.append(float(reward[row, cols].sum()) / k if cols else 0.0)
    return float(np.mean(totals))
