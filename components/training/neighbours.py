"""Item-to-item neighbours: an item-item regression fitted in closed form (EASE).

EASE (Steck, 2019) learns the item-item weight matrix ``B`` that best rebuilds each user's
positives from their other positives, with a zero diagonal and an L2 penalty:
``P = (X'X + l2 I)^-1``, ``B = -P / diag(P)``, ``diag(B) = 0``. It has one hyperparameter,
chosen here on a validation split carved from the training positives (never the gate's
holdout), and no training loop. The fit is cubic in the number of items, so it covers the
``neighbour_max_items`` items with the most positives; each keeps its ``neighbour_top_k``
largest weights by magnitude (signed: a negative weight says "users with this item do not
take that one"), and the table travels with the retrieval version
(``recsys.neighbours.ItemNeighbours``) as a second candidate source blended with retrieval.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from components.evaluation.metrics import ndcg_at_k
from recsys.artifacts import ITEM_NEIGHBOURS_FILE
from recsys.config import TrainingConfig
from recsys.neighbours import ItemNeighbours

VALIDATION_SHARE = 0.2  # of each user's positives, for choosing l2
VALIDATION_K = 10


def fit_item_neighbours(pairs: pd.DataFrame, l2: float, top_k: int, max_items: int) -> ItemNeighbours:
    """EASE on the (user_id, item_id) ``pairs``, kept to each item's ``top_k`` strongest weights."""
    items, x = _interactions(pairs, max_items)
    gram = (x.T @ x).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += l2
    p = np.linalg.inv(gram)
    b = p / -np.diag(p)
    b[np.diag_indices_from(b)] = 0.0
    return _sparsify(items, b, top_k, l2)


def choose_l2(
    pairs: pd.DataFrame, grid: Sequence[float], top_k: int, max_items: int, seed: int
) -> tuple[float, dict[str, float]]:
    """The l2 of ``grid`` with the best NDCG@10 on a per-user random fifth of ``pairs``.

    The carve is random within each user (users with three positives or more) because the
    source scores a user's whole history at once, whatever its order.

    Returns:
        The chosen l2, and each l2's validation NDCG@10 (keys as ``str(l2)``).
    """
    fit, held = _carve(pairs, seed)
    if held.empty or len(grid) == 1:
        return float(grid[0]), {}
    relevant = held.groupby("user_id")["item_id"].apply(set).to_dict()
    history = fit.groupby("user_id")["item_id"].apply(list).to_dict()
    scores: dict[str, float] = {}
    for l2 in grid:
        table = fit_item_neighbours(fit, l2, top_k, max_items)
        scores[f"{l2:g}"] = _validation_ndcg(table, history, relevant)
    best = max(grid, key=lambda l2: (scores[f"{l2:g}"], l2))
    return float(best), scores


def train_item_neighbours(
    config: TrainingConfig, training_frame: pd.DataFrame, out_dir: Path, log: Callable[[str], None]
) -> dict[str, Any]:
    """The train step's neighbour table: l2 chosen on validation, then fitted on all positives.

    Writes ``<out_dir>/item_neighbours.npz`` and returns its part of the train manifest.
    """
    started = time.perf_counter()
    pairs = _positive_pairs(training_frame)
    grid = sorted(set(config.neighbour_l2_grid))
    l2, scores = choose_l2(pairs, grid, config.neighbour_top_k, config.neighbour_max_items, config.seed)
    table = fit_item_neighbours(pairs, l2, config.neighbour_top_k, config.neighbour_max_items)
    path = table.save(Path(out_dir) / ITEM_NEIGHBOURS_FILE)
    seconds = round(time.perf_counter() - started, 1)
    log(
        f"[train] item neighbours: {len(table):,} items x {table.neighbours.shape[1]}, l2 {l2:g} chosen on "
        f"validation (NDCG@10 " + ", ".join(f"{k}: {v:.4f}" for k, v in scores.items()) + f") in {seconds}s"
    )
    return {
        "path": str(path),
        "items": len(table),
        "top_k": int(table.neighbours.shape[1]),
        "l2": l2,
        "validation_ndcg@10": scores,
        "seconds": seconds,
    }


def refit_like(table: ItemNeighbours, training_frame: pd.DataFrame, max_items: int) -> ItemNeighbours:
    """The same recipe (l2, top-k) fitted on other events: a validation replay's neighbours must
    not have seen the validation positives."""
    pairs = _positive_pairs(training_frame)
    return fit_item_neighbours(pairs, table.l2, int(table.neighbours.shape[1]), max_items)


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------


def _positive_pairs(training_frame: pd.DataFrame) -> pd.DataFrame:
    """The distinct (user_id, item_id) pairs with a positive event: the regression's rows."""
    from components.training.train import positives_frame

    positives = positives_frame(training_frame, drop_repeats=True)
    return positives[["user_id", "item_id"]].astype(str).drop_duplicates().reset_index(drop=True)


def _interactions(pairs: pd.DataFrame, max_items: int) -> tuple[np.ndarray, sparse.csr_matrix]:
    """The ``max_items`` items with the most users (ties by id) and the binary user x item matrix."""
    counts = pairs.groupby("item_id").size()
    counts = counts.reset_index(name="n").sort_values(["n", "item_id"], ascending=[False, True])
    items = counts["item_id"].to_numpy(dtype=object)[:max_items]
    kept = pairs[pairs["item_id"].isin(set(items))]
    item_index = pd.Index(items)
    users = pd.Index(kept["user_id"].unique())
    x = sparse.csr_matrix(
        (
            np.ones(len(kept), dtype=np.float32),
            (users.get_indexer(kept["user_id"]), item_index.get_indexer(kept["item_id"])),
        ),
        shape=(len(users), len(items)),
    )
    return items, x


def _sparsify(items: np.ndarray, b: np.ndarray, top_k: int, l2: float) -> ItemNeighbours:
    """Each row's ``top_k`` weights by magnitude (row i: item i's weight towards each item)."""
    n = len(items)
    k = min(top_k, max(n - 1, 0))
    if k == 0:
        return ItemNeighbours(items, np.full((n, 0), -1, np.int32), np.zeros((n, 0), np.float32), l2)
    strength = np.abs(b)
    strength[np.diag_indices_from(strength)] = -1.0  # an item is never its own neighbour
    top = np.argpartition(-strength, k - 1, axis=1)[:, :k]
    weights = np.take_along_axis(b, top, axis=1)
    order = np.argsort(-weights, axis=1, kind="stable")
    top, weights = np.take_along_axis(top, order, axis=1), np.take_along_axis(weights, order, axis=1)
    empty = np.abs(weights) < 1e-6  # rounding noise of the inverse, not evidence
    top[empty], weights[empty] = -1, 0.0
    return ItemNeighbours(items, top.astype(np.int32), weights.astype(np.float32), l2)


def _carve(pairs: pd.DataFrame, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(fit, held): a random ``VALIDATION_SHARE`` of the positives of each user with three or more."""
    rng = np.random.default_rng(seed)
    order = pd.Series(rng.random(len(pairs)), index=pairs.index)
    rank = order.groupby(pairs["user_id"]).rank(method="first")
    size = pairs.groupby("user_id")["item_id"].transform("size")
    held = (size >= 3) & (rank <= np.floor(size * VALIDATION_SHARE).clip(lower=1))
    return pairs[~held].reset_index(drop=True), pairs[held].reset_index(drop=True)


def _validation_ndcg(
    table: ItemNeighbours, history: Mapping[str, list[str]], relevant: Mapping[str, set[str]]
) -> float:
    values = []
    for user, items in relevant.items():
        ranked, _ = table.score(history.get(user, []), VALIDATION_K)
        values.append(ndcg_at_k([str(i) for i in ranked], items, VALIDATION_K))
    return float(np.mean(values)) if values else 0.0
