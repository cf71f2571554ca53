"""The sequential protocol of ``bench.quality``: leave-last-out, full ranking, HR@10 and NDCG@10.

Each user's ratings in time order (ties kept in the data's order); the last is the test
item, the one before it the validation item. A system scores every catalog item for the
user, the user's history is masked, and the test item's rank gives HR@10 and NDCG@10.

The retrievers train through ``components.training.train.train_retriever`` on a frame
built here: one row per rating with the user's profile, the rating's hour, and
``recent_items`` as they stood just before the rating (newest first), which is what the
feature layer's point-in-time join gives. Queries go through the exported query tower's
``serving_default`` and the exported item embeddings, as serving does.

Selection: each tower has a small grid (``GRIDS``); a grid point trains on everything but
the last two items per user, with early stopping on the last tenth of those positives by
time (``training.early_stopping_metric``'s default: their NDCG@10 ranked over the catalog
for the sequential tower, their loss for the bag tower), and is scored on the validation
item. The best grid point on validation NDCG@10, with its early-stopped epoch count, then
trains on everything but the test item (no validation split) once per training seed, and
is scored on the test item. The test item chooses nothing.

Shuffled control (``shuffled_control``): the chosen recipe trained and queried once more per
seed on each user's training ratings in a random order (``shuffled_within_users``: the same
items at the same times, dealt out at random; the test item stays last). What a tower loses
there is what it reads from the order and recency of a user's items, the check of Klenitskiy
et al., "Does It Look Sequential?" (2024).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from components.sources.movielens import load_movielens
from recsys.config import TrainingConfig

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
K = 10
# The MovieLens profile's retriever settings (conf/movielens.yaml), shared by both towers.
BASE: dict[str, Any] = {
    "temperature": 0.07,
    "share_item_embeddings": True,
    "id_dropout": 0.0,
    "max_history": 50,
    "epochs": 30,
    "early_stopping_patience": 2,
    "validation_fraction": 0.1,
}
# What is tried per tower, on the validation item.
# The exact catalog softmax leads both grids (``--grid-points 2`` tries it beside in-batch;
# ``--grid-points 4`` the sequential tower's two with the history mean too).
GRIDS: dict[str, list[dict[str, Any]]] = {
    "bag": [
        {"query_tower": "bag", "negatives": "catalog"},
        {"query_tower": "bag"},
        {"query_tower": "bag", "negatives": "mixed"},
    ],
    "sequential": [
        {"query_tower": "sequential", "sequence_layers": 2, "sequence_dropout": 0.2, "negatives": "catalog"},
        {"query_tower": "sequential", "sequence_layers": 2, "sequence_dropout": 0.2},
        {
            "query_tower": "sequential",
            "sequence_layers": 2,
            "sequence_dropout": 0.2,
            "negatives": "catalog",
            "sequence_history_mean": True,
        },
        {
            "query_tower": "sequential",
            "sequence_layers": 2,
            "sequence_dropout": 0.2,
            "sequence_history_mean": True,
        },
        {"query_tower": "sequential", "sequence_dropout": 0.2, "sequence_item_ages": False},
        {"query_tower": "sequential", "sequence_layers": 2, "sequence_dropout": 0.5},
        {"query_tower": "sequential", "sequence_layers": 2, "sequence_dropout": 0.2, "negatives": "mixed"},
    ],
}


def leave_last_out(events: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(all but each user's last rating, each user's last) by time; one-rating users stay in the first."""
    ordered = events.sort_values(["ts"], kind="stable").reset_index(drop=True)
    position_from_end = ordered.groupby("user_id").cumcount(ascending=False)
    sizes = ordered.groupby("user_id")["user_id"].transform("size")
    last = (position_from_end == 0) & (sizes >= 2)
    return ordered[~last].reset_index(drop=True), ordered[last].reset_index(drop=True)


def shuffled_within_users(events: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Each user's times dealt out to their ratings at random, then sorted by time again.

    The items and the times of each user stay, the order between the items goes: the same
    history sets, with no sequence in them.
    """
    rng = np.random.default_rng(seed)
    times = events["ts"].to_numpy().copy()
    for rows in events.groupby("user_id").indices.values():
        times[rows] = times[rng.permutation(rows)]
    return events.assign(ts=times).sort_values("ts", kind="stable").reset_index(drop=True)


def with_point_in_time_history(frame: pd.DataFrame, max_history: int) -> pd.DataFrame:
    """``recent_items`` of each row: the user's distinct earlier items, newest first (rows in time order)."""
    recent = []
    state: dict[str, list[str]] = {}
    for user, item in zip(frame["user_id"].astype(str), frame["item_id"].astype(str), strict=True):
        history = state.setdefault(user, [])
        recent.append(" ".join(history[:max_history]))
        if item in history:
            history.remove(item)
        history.insert(0, item)
    return frame.assign(recent_items=recent)


def training_frame(
    events: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame, max_history: int
) -> pd.DataFrame:
    """Ratings with profile, item attributes, the hour and point-in-time ``recent_items``."""
    f = events.merge(users[["user_id", "age_bucket", "country"]], on="user_id", how="left")
    f = f.merge(items[["item_id", "category", "title", "description"]], on="item_id", how="left")
    f = f.assign(hour=f["ts"].dt.hour.astype("int64"))
    return with_point_in_time_history(f, max_history)


def queries(
    history: pd.DataFrame, targets: pd.DataFrame, users: pd.DataFrame, max_history: int
) -> pd.DataFrame:
    """One query row per target: the user's history newest first with the seconds from each
    item's (latest) rating to the target's (``recent_item_ages``), profile, the target's hour."""
    newest_first = history.sort_values("ts", ascending=False, kind="stable")
    newest = newest_first.drop_duplicates(["user_id", "item_id"], keep="first")
    lists = newest.groupby("user_id")["item_id"].agg(list).to_dict()
    times = newest.groupby("user_id")["ts"].agg(list).to_dict()
    q = targets[["user_id", "item_id", "ts", "device"]].merge(
        users[["user_id", "age_bucket", "country"]], on="user_id"
    )
    ages = [
        " ".join(str(int((at - t).total_seconds())) for t in times.get(u, [])[:max_history])
        for u, at in zip(q["user_id"], q["ts"], strict=True)
    ]
    return q.assign(
        recent_items=[" ".join(lists.get(u, [])[:max_history]) for u in q["user_id"]],
        recent_item_ages=ages,
        hour=q["ts"].dt.hour.astype("int64"),
    )


def rank_metrics(
    scores: np.ndarray, item_ids: Sequence[str], targets: Sequence[str], seen: Sequence[set[str]]
) -> dict[str, float]:
    """HR@10 and NDCG@10 of each row's target among all items, its seen items masked.

    The rank is the number of unmasked items scoring strictly above the target (ties in the
    target's favour, as the published protocols count them).
    """
    index = {item: n for n, item in enumerate(item_ids)}
    hits, gains = [], []
    for row, target, history in zip(scores, targets, seen, strict=True):
        row = row.copy()
        masked = [index[i] for i in history if i in index and i != target]
        row[masked] = -np.inf
        rank = int((row > row[index[target]]).sum()) if target in index else len(row)
        hits.append(rank < K)
        gains.append(1.0 / np.log2(rank + 2) if rank < K else 0.0)
    return {"hr@10": float(np.mean(hits)), "ndcg@10": float(np.mean(gains)), "users": len(hits)}


def popularity_metrics(
    history: pd.DataFrame, targets: pd.DataFrame, items: Sequence[str]
) -> dict[str, float]:
    """Every user gets the catalog by training count (their own history masked)."""
    counts = history["item_id"].value_counts().reindex(items, fill_value=0).to_numpy(dtype=np.float64)
    seen = history.groupby("user_id")["item_id"].agg(set).to_dict()
    scores = np.broadcast_to(counts, (len(targets), len(items)))
    return rank_metrics(
        scores, items, targets["item_id"].tolist(), [seen.get(u, set()) for u in targets["user_id"]]
    )


def retriever_metrics(
    model_dir: Path, history: pd.DataFrame, targets: pd.DataFrame, users: pd.DataFrame, max_history: int
) -> dict[str, float]:
    """The exported retriever: query tower on each target's query, dot product with every item."""
    import tensorflow as tf

    from components.training.train import load_signature, query_features_from_frame

    embeddings = pd.read_parquet(model_dir / "item_embeddings.parquet")
    item_ids = embeddings["item_id"].astype(str).tolist()
    matrix = np.stack(embeddings["embedding"].to_numpy())
    signature = load_signature(model_dir / "query_tower")
    q = queries(history, targets, users, max_history)
    inputs = query_features_from_frame(q)
    vectors = np.concatenate(
        [
            signature(**{k: tf.constant(v[lo : lo + 1024]) for k, v in inputs.items()})["embedding"].numpy()
            for lo in range(0, len(q), 1024)
        ]
    )
    seen = history.groupby("user_id")["item_id"].agg(set).to_dict()
    return rank_metrics(
        vectors @ matrix.T, item_ids, q["item_id"].tolist(), [seen.get(u, set()) for u in q["user_id"]]
    )


def train_and_score(
    config: TrainingConfig,
    frames: Mapping[str, pd.DataFrame],
    history: pd.DataFrame,
    targets: pd.DataFrame,
    out_dir: Path,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Train one retriever on ``history``; its metrics on ``targets``, epochs and seconds."""
    from components.training.train import train_retriever

    frame = training_frame(history, frames["users"], frames["items"], config.max_history)
    started = time.perf_counter()
    out = train_retriever(config, frame, frames["items"], out_dir, log=log)
    seconds = time.perf_counter() - started
    metrics = retriever_metrics(out_dir, history, targets, frames["users"], config.max_history)
    return {**metrics, "best_epoch": out["metrics"]["retriever_best_epoch"], "train_seconds": seconds}


def run_sequential(
    dataset: str,
    home: Path,
    console: Console,
    train_seeds: Sequence[int],
    towers: Sequence[str] = tuple(GRIDS),
    grid_points: int | None = None,
    shuffled_control: bool = False,
) -> dict[str, Any]:
    """The sequential protocol on one data set: selection on validation, then test per seed.

    ``towers`` and ``grid_points`` (the first N points of each grid) shorten a run on a
    small machine; the report says what was tried. ``shuffled_control`` adds the chosen
    recipe's test runs on order-free histories (``shuffled_within_users``).
    """
    from components.training.train import use_legacy_keras

    use_legacy_keras()
    frames = load_movielens(SHARED_DATA / dataset)
    events = frames["events"].assign(
        user_id=lambda f: f["user_id"].astype(str), item_id=lambda f: f["item_id"].astype(str)
    )
    frames = {**frames, "events": events}
    train, test = leave_last_out(events)
    fit, validation = leave_last_out(train)
    items = frames["items"]["item_id"].astype(str).tolist()
    result: dict[str, Any] = {
        "dataset": dataset,
        "users": int(test["user_id"].nunique()),
        "items": len(items),
        "ratings": len(events),
        "popularity": {
            "validation": popularity_metrics(fit, validation, items),
            "test": popularity_metrics(train, test, items),
        },
    }

    def log(line: str) -> None:
        console.print(f"  {line}", highlight=False)

    for tower in towers:
        grid = GRIDS[tower][:grid_points]
        tried = []
        for n, point in enumerate(grid):
            config = TrainingConfig.model_validate({**BASE, **point, "seed": train_seeds[0]})
            console.print(f"[bold]{dataset}[/] {tower}: validation run {n + 1}/{len(grid)} {point}")
            scored = train_and_score(config, frames, fit, validation, home / f"{tower}-select-{n}", log)
            console.print(f"  validation NDCG@10 {scored['ndcg@10']:.4f} HR@10 {scored['hr@10']:.4f}")
            tried.append({"parameters": point, **scored})
        chosen = max(tried, key=lambda r: r["ndcg@10"])
        epochs = chosen["best_epoch"]
        result[tower] = {"validation": tried, "chosen": chosen["parameters"], "epochs": epochs}
        # The history each test run trains on, per seed. The control deals each seed's own
        # order out, so its spread includes the shuffle's.
        variants: dict[str, Callable[[int], pd.DataFrame]] = {"test": lambda _: train}
        if shuffled_control:
            variants["shuffled"] = lambda seed: shuffled_within_users(train, seed)
        recipe = {**BASE, **chosen["parameters"], "epochs": epochs, "validation_fraction": 0.0}
        configs = {seed: TrainingConfig.model_validate({**recipe, "seed": seed}) for seed in train_seeds}
        for variant, history in variants.items():
            runs = []
            for seed, config in configs.items():
                console.print(f"[bold]{dataset}[/] {tower}: {variant} run, seed {seed}, {epochs} epochs")
                out_dir = home / f"{tower}-{variant}-{seed}"
                scored = train_and_score(config, frames, history(seed), test, out_dir, log)
                console.print(f"  test NDCG@10 {scored['ndcg@10']:.4f} HR@10 {scored['hr@10']:.4f}")
                runs.append({"seed": seed, **scored})
            result[tower][variant] = runs
    return result


def _mean_sd(values: Sequence[float]) -> str:
    return f"{np.mean(values):.4f} ± {np.std(values):.4f}"


def sequential_table(results: Sequence[dict[str, Any]]) -> Table:
    """Test HR@10 and NDCG@10 per data set and system: mean ± spread over training seeds."""
    t = Table(title="Leave-last-out, full ranking over all items, history masked (test item)")
    for c in ("data set", "system", "HR@10", "NDCG@10", "per seed NDCG@10", "train s / run"):
        t.add_column(c, justify="left" if c in ("data set", "system", "per seed NDCG@10") else "right")
    for r in results:
        pop = r["popularity"]["test"]
        t.add_row(r["dataset"], "popularity", f"{pop['hr@10']:.4f}", f"{pop['ndcg@10']:.4f}", "", "")
        for tower in (t for t in GRIDS if t in r):
            for variant in (v for v in ("test", "shuffled") if v in r[tower]):
                runs = r[tower][variant]
                control = ", each user's order shuffled" if variant == "shuffled" else ""
                t.add_row(
                    r["dataset"],
                    f"{tower} tower {r[tower]['chosen']}, {r[tower]['epochs']} epochs{control}",
                    _mean_sd([x["hr@10"] for x in runs]),
                    _mean_sd([x["ndcg@10"] for x in runs]),
                    " ".join(f"{x['ndcg@10']:.4f}" for x in runs),
                    f"{np.mean([x['train_seconds'] for x in runs]):.0f}",
                )
    return t
