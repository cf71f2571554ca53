"""Benchmark: offline quality on real MovieLens data, through the whole pipeline.

Protocol (close to Microsoft Recommenders' MovieLens benchmark): a per-user stratified
random split, 75% of each user's ratings to train and 25% to test (seed 42); the pipeline
runs on the train split as any user would run it, with the MovieLens profile
(``conf/movielens.yaml``: leave-one-out histories, since a random split has no "before"):
ingest a Parquet drop, validate, features, train, evaluate, gate, index, push;
`recsys recommend` gives the top 10 from the pushed models (retrieval re-ranked by the
ranker) with each user's training items excluded; every test rating counts as relevant.
Metrics: NDCG@10, Precision@10, Recall@10 and MAP@10 (MAP's denominator is the user's
number of relevant items, as in the published table), averaged over test users, beside a
popularity baseline on the same split.

The random split is repeated over ``--split-seeds`` (default 42, 43, 44): each seed's
numbers and their mean and spread (population standard deviation) are reported.

Time protocol (``--protocol time``): each user's latest quarter of ratings by time is the
test part (the earliest 75% train), the pipeline runs on the default profile
(``conf/recsys.yaml``, as a new user would run it), and the same top-10 metrics are
reported beside popularity; ``--train-seeds`` repeats the run with different training
seeds (the split is deterministic). Where the gate refuses the first model, `recsys
recommend` serves popularity with a note, and the row says so.

Sequential protocol (``--protocol sequential``), as SASRec-style papers report it:
leave-last-out (each user's last rating, by time, is the test item; the one before it the
validation item); each system ranks *every* catalog item for the user, with the user's
history masked; HR@10 (the test item in the top 10) and NDCG@10 (1 / log2(rank + 2) when
it is) averaged over users. Systems: popularity, the bag-of-items retriever and the
sequential retriever (``training.query_tower``), trained by ``train_retriever`` on a frame
built here (profile, the rating's hour, point-in-time recent items), scored through the
exported query tower and item embeddings, as serving does. Hyperparameters (a small grid
per tower, and the epoch count by early stopping on the last tenth of the training
positives by time) are chosen on the validation item with models trained without it; the
chosen recipe is then trained on everything but the test item, once per ``--train-seeds``;
``--shuffled-control`` trains it once more per seed on each user's ratings in a random order
(what the tower loses there is what it reads from the order).

Run: `.venv/bin/python -m bench.quality [--set ml-100k|ml-latest-small] [--home DIR]
[--protocol random|sequential|time|both] [--split-seeds 42 43 44] [--train-seeds 1 2 3]`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from components.evaluation.metrics import ndcg_at_k, precision_at_k, recall_at_k
from components.sources.movielens import load_movielens
from recsys.config import load_settings, profile_path
from recsys.storage import write_data_folder

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Microsoft Recommenders, MovieLens 100K, top-10 (their benchmark notebook).
PUBLISHED_100K = {
    "SAR": {"ndcg@10": 0.382, "precision@10": 0.331, "recall@10": 0.176, "map@10": 0.111},
    "NCF": {"ndcg@10": 0.396, "precision@10": 0.347, "recall@10": 0.181, "map@10": 0.108},
    "LightGCN": {"ndcg@10": 0.420, "precision@10": 0.363, "recall@10": 0.189, "map@10": 0.089},
    "BPR": {"ndcg@10": 0.442, "precision@10": 0.388, "recall@10": 0.213, "map@10": 0.132},
    "BiVAE": {"ndcg@10": 0.475, "precision@10": 0.412, "recall@10": 0.219, "map@10": 0.146},
}


def stratified_split(
    events: pd.DataFrame, ratio: float = 0.75, seed: int = 42
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per user, a random ``ratio`` of their ratings to train and the rest to test."""
    rng = np.random.default_rng(seed)
    events = events.sort_values(["user_id", "ts", "item_id"], kind="stable").reset_index(drop=True)
    order = rng.random(len(events))
    rank = pd.Series(order).groupby(events["user_id"].to_numpy()).rank(method="first").to_numpy()
    sizes = events.groupby("user_id")["user_id"].transform("size").to_numpy()
    in_train = rank <= np.round(ratio * sizes)
    return events[in_train].reset_index(drop=True), events[~in_train].reset_index(drop=True)


def time_split(events: pd.DataFrame, ratio: float = 0.75) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per user, the earliest ``ratio`` of their ratings (by time) to train, the latest to test."""
    events = events.sort_values(["user_id", "ts", "item_id"], kind="stable").reset_index(drop=True)
    rank = events.groupby("user_id").cumcount().to_numpy() + 1
    sizes = events.groupby("user_id")["user_id"].transform("size").to_numpy()
    in_train = rank <= np.round(ratio * sizes)
    return events[in_train].reset_index(drop=True), events[~in_train].reset_index(drop=True)


def average_precision_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    hits, total = 0, 0.0
    for i, item in enumerate(ranked[:k], start=1):
        if item in relevant:
            hits += 1
            total += hits / i
    return total / len(relevant) if relevant else 0.0


def score(recs: dict[str, list[str]], test: pd.DataFrame, k: int = 10) -> dict[str, float]:
    relevant = test.groupby("user_id")["item_id"].agg(set).to_dict()
    rows = []
    for user, rel in relevant.items():
        ranked = recs.get(user, [])
        rows.append(
            (
                ndcg_at_k(ranked, rel, k),
                precision_at_k(ranked, rel, k),
                recall_at_k(ranked, rel, k),
                average_precision_at_k(ranked, rel, k),
            )
        )
    m = np.mean(rows, axis=0)
    return {"ndcg@10": m[0], "precision@10": m[1], "recall@10": m[2], "map@10": m[3], "users": len(rows)}


def popularity_recs(train: pd.DataFrame, users: Sequence[str], k: int) -> dict[str, list[str]]:
    ranked = train["item_id"].value_counts().index.tolist()
    seen = train.groupby("user_id")["item_id"].agg(set).to_dict()
    out = {}
    for u in users:
        s = seen.get(u, set())
        out[u] = [i for i in ranked if i not in s][:k]
    return out


def run(
    dataset: str,
    home: Path,
    console: Console,
    overrides: dict[str, Any],
    split_seed: int = 42,
    split: str = "random",
    profile: str = "movielens",
) -> dict[str, Any]:
    from components.batch_recommend import recommend
    from components.pipeline import run_pipeline

    frames = load_movielens(SHARED_DATA / dataset)
    if split == "time":
        train, test = time_split(frames["events"])
    else:
        train, test = stratified_split(frames["events"], seed=split_seed)
    drop = home / "drop"
    write_data_folder({"users": frames["users"], "items": frames["items"], "events": train}, drop)
    interval_end = (pd.to_datetime(train["ts"], utc=True).max() + pd.Timedelta(days=1)).ceil("D")
    settings = load_settings(
        profile_path(profile),
        overrides={
            "home": str(home / "state"),
            "source.kind": "parquet",
            "source.path": str(drop),
            "validation.future_tolerance_seconds": 0,
            **overrides,
        },
    )
    t0 = time.perf_counter()
    manifests = run_pipeline(settings, interval_end.to_pydatetime(), console)
    pipeline_s = time.perf_counter() - t0
    pushed = "push" in manifests and not manifests["push"].get("skipped")
    if not pushed and split != "time":
        gate = manifests.get("gate", {})
        raise SystemExit(f"the gate refused the model, nothing to recommend from: {gate.get('reason')}")
    users = sorted(test["user_id"].unique())
    users_file = home / "users.txt"
    users_file.write_text("\n".join(users) + "\n")
    out = home / "recs.jsonl"
    validated = Path(manifests["validate"]["path"])
    recommend(settings, users_file, 10, out, data_dir=validated)
    recs = {r["user_id"]: r["items"] for r in map(json.loads, out.read_text().splitlines())}
    seen = train.groupby("user_id")["item_id"].agg(set).to_dict()
    leaked = sum(len(set(items) & seen.get(u, set())) for u, items in recs.items())
    model = score(recs, test)
    popularity = score(popularity_recs(train, users, 10), test)
    evaluation = manifests["evaluate"]
    return {
        "dataset": dataset,
        "split": split,
        "profile": profile,
        "pushed": pushed,
        "split_seed": split_seed,
        "ratings": {"train": len(train), "test": len(test)},
        "model": model,
        "popularity": popularity,
        "train_items_returned": leaked,
        "pipeline_seconds": pipeline_s,
        "gate": manifests["gate"],
        "time_holdout": evaluation.get("headline") or evaluation.get("blessing"),
    }


RANDOM_METRICS = ("ndcg@10", "precision@10", "recall@10", "map@10")


def spread(values: Sequence[float]) -> str:
    """``mean ± population standard deviation`` of per-seed values, three decimals."""
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def random_protocol_table(results: Sequence[dict[str, Any]]) -> Table:
    """Per seed and per data set: the pipeline and popularity rows, then mean ± spread."""
    seeds = sorted({r["split_seed"] for r in results})
    t = Table(title=f"MovieLens top-10, 75/25 per-user stratified random split (split seeds {seeds})")
    for c in ("data set", "split seed", "system", "NDCG@10", "Precision@10", "Recall@10", "MAP@10"):
        t.add_column(c, justify="left" if c in ("data set", "system") else "right")
    names = {"model": "recsys (retriever + ranker)", "popularity": "popularity"}
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        runs = [r for r in results if r["dataset"] == dataset]
        for r in runs:
            for system, name in names.items():
                t.add_row(
                    dataset, str(r["split_seed"]), name, *(f"{r[system][x]:.3f}" for x in RANDOM_METRICS)
                )
        for system, name in names.items():
            t.add_row(
                dataset, "mean ± sd", name, *(spread([r[system][x] for r in runs]) for x in RANDOM_METRICS)
            )
        if dataset == "ml-100k":
            for name, m in PUBLISHED_100K.items():
                t.add_row("ml-100k", "", f"{name} (published)", *(f"{m[x]:.3f}" for x in RANDOM_METRICS))
    return t


def time_protocol_table(results: Sequence[dict[str, Any]]) -> Table:
    """Per training seed: the served system (pushed, or popularity where refused) and popularity."""
    t = Table(title="MovieLens top-10, each user's latest quarter held out, default profile")
    for c in ("data set", "train seed", "system", "NDCG@10", "Precision@10", "Recall@10", "MAP@10"):
        t.add_column(c, justify="left" if c in ("data set", "system") else "right")
    for r in results:
        served = "recsys (served)" if r["pushed"] else "recsys (refused: popularity fallback)"
        for system, name in (("model", served), ("popularity", "popularity")):
            t.add_row(
                r["dataset"], str(r["train_seed"]), name, *(f"{r[system][x]:.3f}" for x in RANDOM_METRICS)
            )
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        runs = [r for r in results if r["dataset"] == dataset]
        for system, name in (("model", "recsys"), ("popularity", "popularity")):
            t.add_row(
                dataset, "mean ± sd", name, *(spread([r[system][x] for r in runs]) for x in RANDOM_METRICS)
            )
    return t


@contextmanager
def _home(root: Path | None, dataset: str, name: str) -> Iterator[Path]:
    """A run's state folder: ``root/dataset/name`` (kept) or a temporary one."""
    with tempfile.TemporaryDirectory() as tmp:
        home = root / dataset / name if root else Path(tmp)
        home.mkdir(parents=True, exist_ok=True)
        yield home


def main() -> None:
    from bench.sequential_quality import run_sequential, sequential_table

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--set", dest="datasets", action="append", choices=["ml-100k", "ml-latest-small"])
    p.add_argument("--home", type=Path, default=None, help="Keep state here (default: a temp dir).")
    p.add_argument("--override", action="append", default=[], help="dotted.key=value (YAML value)")
    p.add_argument("--protocol", choices=["random", "sequential", "time", "both"], default="random")
    p.add_argument(
        "--split-seeds", type=int, nargs="+", default=[42, 43, 44], help="seeds of the 75/25 split"
    )
    p.add_argument(
        "--train-seeds", type=int, nargs="+", default=[1, 2, 3], help="training seeds (sequential protocol)"
    )
    p.add_argument("--towers", nargs="+", choices=["bag", "sequential"], default=["bag", "sequential"])
    p.add_argument("--grid-points", type=int, default=None, help="try only the first N points per tower")
    p.add_argument(
        "--shuffled-control",
        action="store_true",
        help="sequential protocol: also test each chosen recipe on histories in a random order",
    )
    args = p.parse_args()
    import yaml

    overrides = {}
    for o in args.override:
        key, _, value = o.partition("=")
        overrides[key] = yaml.safe_load(value)
    console = Console()
    datasets = args.datasets or ["ml-100k", "ml-latest-small"]
    report: dict[str, Any] = {}
    if args.protocol in ("random", "both"):
        results = []
        for dataset in datasets:
            for seed in args.split_seeds:
                console.print(f"[bold]{dataset}[/]: random 75/25 split, seed {seed}")
                with _home(args.home, dataset, f"seed-{seed}") as home:
                    results.append(run(dataset, home, console, overrides, split_seed=seed))
        console.print(random_protocol_table(results))
        for r in results:
            console.print(
                f"{r['dataset']} seed {r['split_seed']}: {r['ratings']['train']:,} train / "
                f"{r['ratings']['test']:,} test ratings; pipeline {r['pipeline_seconds']:.0f}s; "
                f"training items returned: {r['train_items_returned']}"
            )
        report["random"] = results
    if args.protocol == "time":
        timed = []
        for dataset in datasets:
            for seed in args.train_seeds:
                console.print(f"[bold]{dataset}[/]: latest quarter per user held out, train seed {seed}")
                with _home(args.home, dataset, f"time-{seed}") as home:
                    trained = {"training.seed": seed, **overrides}
                    result = run(dataset, home, console, trained, split="time", profile="recsys")
                    timed.append(result | {"train_seed": seed})
        console.print(time_protocol_table(timed))
        report["time"] = timed
    if args.protocol in ("sequential", "both"):
        sequential = []
        for dataset in datasets:
            with _home(args.home, dataset, "sequential") as home:
                sequential.append(
                    run_sequential(
                        dataset,
                        home,
                        console,
                        args.train_seeds,
                        args.towers,
                        args.grid_points,
                        args.shuffled_control,
                    )
                )
        console.print(sequential_table(sequential))
        report["sequential"] = sequential
    print(json.dumps(report, indent=2, default=lambda v: float(v) if isinstance(v, np.floating) else str(v)))


if __name__ == "__main__":
    main()
