"""Model-level quality check on MovieLens: the training and evaluation steps alone, in minutes.

Where ``bench.quality`` runs the whole pipeline, this calls ``train_models`` and ``evaluate``
directly on frames built here, to tune the models' hyperparameters quickly.

Protocol (Microsoft Recommenders' MovieLens table): a per-user stratified random split, 75%
of each user's ratings to train and 25% to test (seed 42, ``bench.quality.stratified_split``);
top 10 with the user's training items excluded; every test rating is relevant.

A random split has no "before" for a test rating, so the point-in-time features do not
apply: each training example's ``recent_items`` are the user's *other* training items
(newest first, ``training.max_history`` of them), and each test user's query reads all of
their training items. Context is the rating's hour; device is unknown.

Hyperparameters are chosen with ``--validation``: the training part is split again per user
(80/20, a different seed), the model trains on the 80% and is scored on the 20%; the test
part is not read. Without it the run scores the test part, to report a chosen setting.

Run: ``.venv/bin/python -m bench.quality_check [--set ml-100k] [--validation] [--split-seed 42]
[--override '{"epochs": 4}']``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pandas as pd

from bench.quality import PUBLISHED_100K, SHARED_DATA, stratified_split
from components.sources.movielens import load_movielens
from recsys.config import EvaluationConfig, TrainingConfig

# The movielens profile's training choices (conf/movielens.yaml): no validation split (the
# latest ratings of a random split are mostly other users'), a fixed number of epochs, one
# id table for history and candidates. On ml-100k: NDCG@10 0.396 retriever, 0.412 retriever
# + ranker, ~70 s of training on 2 CPU cores (BENCHMARKS.md lists the variants tried).
DEFAULT_OVERRIDES = {
    "validation_fraction": 0.0,
    "epochs": 4,
    "ranker_epochs": 2,
    "temperature": 0.07,
    "share_item_embeddings": True,
    # Every test user is known here: no need to train the OOV rows for unseen ids.
    "id_dropout": 0.0,
}
DEFAULT_RETRIEVAL_WEIGHT = 2.0


def with_history(
    rows: pd.DataFrame, history: pd.DataFrame, max_history: int, exclude_self: bool
) -> pd.DataFrame:
    """``recent_items`` per row: the user's items in ``history`` newest first, minus the row's own."""
    lists = history.sort_values("ts", ascending=False).groupby("user_id")["item_id"].apply(list).to_dict()
    recent = []
    for user, item in zip(rows["user_id"], rows["item_id"], strict=True):
        items = lists.get(user, [])
        if exclude_self:
            items = [i for i in items[: max_history + 1] if i != item]
        recent.append(" ".join(items[:max_history]))
    return rows.assign(recent_items=recent)


def to_frame(events: pd.DataFrame, users: pd.DataFrame, items: pd.DataFrame) -> pd.DataFrame:
    """Events joined with profile and item attributes: the columns of a training frame."""
    f = events.merge(users[["user_id", "age_bucket", "country", "signup_source"]], on="user_id", how="left")
    f = f.merge(items[["item_id", "category", "title", "description", "in_stock"]], on="item_id", how="left")
    return f.assign(hour=f["ts"].dt.hour.astype("int64"), session_items="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", default="ml-100k")
    parser.add_argument("--override", default="{}", help="JSON of training.* values")
    parser.add_argument("--retrieval-weight", type=float, default=DEFAULT_RETRIEVAL_WEIGHT)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--split-seed", type=int, default=42, help="seed of the 75/25 split")
    parser.add_argument(
        "--validation",
        action="store_true",
        help="score a validation split carved from the training part (for tuning), not the test part",
    )
    args = parser.parse_args()

    from components.evaluation.evaluate import evaluate
    from components.training.train import train_models

    started = time.perf_counter()
    data = load_movielens(SHARED_DATA / args.set)
    users, items, events = data["users"], data["items"], data["events"]
    train, test = stratified_split(events, seed=args.split_seed)
    if args.validation:
        # Tuning never reads the test part: the training part is split again.
        train, test = stratified_split(train, ratio=0.8, seed=args.split_seed + 1000)
    config = TrainingConfig(**{**DEFAULT_OVERRIDES, **json.loads(args.override)})
    train_frame = with_history(to_frame(train, users, items), train, config.max_history, exclude_self=True)
    test_frame = to_frame(test, users, items)
    queries = test_frame.sort_values("ts").drop_duplicates("user_id")
    queries = with_history(queries, train, config.max_history, exclude_self=False).set_index(
        "user_id", drop=False
    )
    out = args.out or Path(tempfile.mkdtemp(prefix="quality_check_"))
    train_models(config, train_frame, items, out / "train", log=print)
    trained = time.perf_counter()
    eval_config = EvaluationConfig(holdout_days=1, retrieval_weight=args.retrieval_weight)
    result = evaluate(
        eval_config, out / "train", train_frame, test_frame, items, out / "eval", queries=queries
    )
    scored = "validation" if args.validation else "test"
    print(
        f"\n{args.set}: {len(train):,} train / {len(test):,} {scored} ratings (split seed {args.split_seed})"
    )
    print(config.model_dump_json())
    print(f"{'model':18s} {'ndcg@10':>8s} {'prec@10':>8s} {'recall@10':>9s}")
    for model in ("retriever", "retriever_ranker", "popularity"):
        m = result["metrics"][model]["all"]
        print(f"{model:18s} {m['ndcg@10']:8.4f} {m['precision@10']:8.4f} {m['recall@10']:9.4f}")
    if args.set == "ml-100k":
        for name, m in PUBLISHED_100K.items():
            label = f"{name} (published)"
            print(f"{label:18s} {m['ndcg@10']:8.4f} {m['precision@10']:8.4f} {m['recall@10']:9.4f}")
    print(f"train {trained - started:.0f}s, total {time.perf_counter() - started:.0f}s; outputs in {out}")


if __name__ == "__main__":
    main()
