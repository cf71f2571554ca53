"""Benchmark: how the index and training grow on this machine, for docs/scaling.md.

Run: `.venv/bin/python -m bench.scale [--items 100000 1000000 5000000 --no-write]`.

Index: for each catalog size N, a clustered synthetic catalog of N x 65 float32 (the exported
D: 64 + the item-prior coordinate) built exactly as ``components.indexing.build_index``
builds it (``index_params`` then ``tune_to_recall`` to recall@100 >= 0.95 against exact
search, rebuilding when tuning moved the setting). Each size runs in a child process, so its
RSS and peak RSS are its own and not the previous size's leftovers. Measured: build time
(k-means tree + AH codebooks + tuning), the RSS the index adds, peak RSS, single-query
latency p50/p99 and batched queries/s, recall@100 on 200 fresh queries.

Training: the two-tower retriever of ``components.training.train`` on generated data, at the
production setting (64-d towers). Throughput is the *marginal* rate: positives x (5 - 1)
epochs / (time of a 5-epoch run - time of a 1-epoch run), after a discarded warm-up run, so
model building, vocabularies, tracing and SavedModel export (fixed costs) do not dilute it.

Prints tables and replaces this benchmark's section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DATE = "2026-11-29"
SECTION = "## Scale: index growth and training throughput"
DIM = 65
QUERIES = 200


def index_point(n: int) -> dict[str, Any]:
    """One catalog size, in this process: build, tune, measure."""
    from bench.scann_index import clustered_catalog, rss_gb
    from components.indexing import (
        build_searcher,
        exact_top_k,
        index_params,
        recall_at_k,
        search,
        tune_to_recall,
    )
    from recsys.config import IndexConfig

    config = IndexConfig()
    k = config.recall_k
    items, queries = clustered_catalog(n, DIM, QUERIES)
    # The exact reference in small query batches: a [batch, N] float32 block stays < 1 GB at 5M.
    exact_idx, _ = exact_top_k(items, queries, k, batch=max(8, min(256, 200_000_000 // (4 * n))))
    rng = np.random.default_rng(0)
    exact_ms = []
    for q in queries[rng.choice(QUERIES, size=10, replace=False)]:
        s = time.perf_counter()
        exact_top_k(items, q[None, :], k)
        exact_ms.append((time.perf_counter() - s) * 1000)
    rss0 = rss_gb()
    params = index_params(n, DIM, config)
    t0 = time.perf_counter()
    searcher = build_searcher(items, params)
    tuned, recall, tries = tune_to_recall(
        searcher, params, queries, exact_idx, config.recall_target, config.max_tuning_steps
    )
    if tuned != params:  # as build_index does: bake the tuned setting into the searcher
        del searcher
        searcher = build_searcher(items, tuned)
    build_s = time.perf_counter() - t0
    index_gb = rss_gb() - rss0
    search(searcher, queries[:50], k)  # warm threads and caches
    t0 = time.perf_counter()
    approx, _ = search(searcher, queries, k)
    batched_qps = len(queries) / (time.perf_counter() - t0)
    recall = recall_at_k(approx, exact_idx)
    single = []
    for q in queries:
        s = time.perf_counter()
        searcher.search(q, final_num_neighbors=k)
        single.append((time.perf_counter() - s) * 1000)
    return {
        "items": n,
        "dim": DIM,
        "num_leaves": tuned.num_leaves,
        "leaves_to_search": tuned.num_leaves_to_search,
        "reorder": tuned.reorder,
        "tuning_steps": len(tries) - 1,
        "build_s": round(build_s, 1),
        "catalog_gb": round(items.nbytes / 1e9, 2),
        "index_rss_gb": round(index_gb, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024, 2),
        "query_p50_ms": round(float(np.percentile(single, 50)), 3),
        "query_p99_ms": round(float(np.percentile(single, 99)), 3),
        "batched_qps": round(batched_qps),
        "exact_ms": round(float(np.median(exact_ms)), 1),
        "recall_at_100": round(recall, 4),
        "load_1m": round(os.getloadavg()[0], 2),
    }


def training_point(users: int, items: int, days: int, batch_size: int) -> dict[str, Any]:
    """Marginal examples/s of the retriever's fit at the production tower sizes."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from datetime import UTC, datetime

    from components.sources.synthetic import GenerateParams, generate
    from components.training.train import positives_frame, train_retriever
    from recsys.config import TrainingConfig

    tables = generate(
        GenerateParams(
            users=users, items=items, days=days, seed=7, end_date=datetime(2026, 11, 1, tzinfo=UTC)
        )
    )
    frame = (
        tables["events"].merge(tables["users"], on="user_id", how="left").merge(tables["items"], on="item_id")
    )
    frame["hour"] = frame["ts"].dt.hour
    seconds = {}
    # The first fit in a process pays for tracing and kernel warm-up: run it and throw it away.
    for epochs in (0, 1, 5):
        config = TrainingConfig(
            epochs=max(1, epochs), batch_size=batch_size, validation_fraction=0.0, early_stopping_patience=0
        )
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            train_retriever(config, frame, tables["items"], Path(tmp), log=lambda _: None)
            seconds[epochs] = time.perf_counter() - t0
    positives = len(positives_frame(frame, drop_repeats=True))
    return {
        "users": users,
        "items": items,
        "events": len(frame),
        "positives": positives,
        "batch_size": batch_size,
        "seconds_1_epoch": round(seconds[1], 1),
        "seconds_5_epochs": round(seconds[5], 1),
        "examples_per_s": round(4 * positives / max(1e-9, seconds[5] - seconds[1])),
        "load_1m": round(os.getloadavg()[0], 2),
    }


def _child(kind: str, arg: list[str]) -> dict[str, Any]:
    """Run one point in a fresh interpreter; its last stdout line is the JSON result."""
    cmd = [sys.executable, "-m", "bench.scale", "--child", kind, *arg]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render(index_rows: list[dict[str, Any]], train_rows: list[dict[str, Any]], machine: str) -> str:
    lines = [
        f"{SECTION} ({BENCH_DATE})",
        "",
        f"`.venv/bin/python -m bench.scale` (machine: {machine}; shared with other jobs, the 1-minute",
        "load average is recorded per row). Index: clustered synthetic catalog N x 65 float32, built",
        "as `build_index` builds it (derived parameters, tuned to recall@100 >= 0.95 against exact",
        f"search on {QUERIES} fresh queries); each size in its own process, the 5M point run once.",
        "",
        "| items | leaves / searched / reorder | build s | catalog GB | index RSS GB | peak RSS GB "
        "| query p50 ms | query p99 ms | batched q/s | exact ms/query | recall@100 | load |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in index_rows:
        lines.append(
            f"| {r['items']:,} | {r['num_leaves']} / {r['leaves_to_search']} / {r['reorder']} "
            f"| {r['build_s']} "
            f"| {r['catalog_gb']} | {r['index_rss_gb']} | {r['peak_rss_gb']} | {r['query_p50_ms']} "
            f"| {r['query_p99_ms']} | {r['batched_qps']:,} | {r['exact_ms']} | {r['recall_at_100']} "
            f"| {r['load_1m']} |"
        )
    lines += [
        "",
        "Training: `components.training.train.train_retriever` (64-d towers, in-batch softmax with logQ",
        "correction) on generated data; examples/s is the marginal fit rate: positives x 4 /",
        "(5-epoch run - 1-epoch run), after a discarded warm-up fit, so graph building, tracing",
        "and export are not counted.",
        "",
        "| users | items | events | positives | batch | 1 epoch s | 5 epochs s | examples/s | load |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in train_rows:
        lines.append(
            f"| {r['users']:,} | {r['items']:,} | {r['events']:,} | {r['positives']:,} | {r['batch_size']} "
            f"| {r['seconds_1_epoch']} | {r['seconds_5_epochs']} | {r['examples_per_s']:,} | {r['load_1m']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    p.add_argument("--train-batches", type=int, nargs="+", default=[512, 4096])
    p.add_argument("--train-users", type=int, default=20_000)
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "index":
            out = index_point(int(rest[0]))
        else:
            out = training_point(int(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]))
        print(json.dumps(out))
        return

    from bench.scann_index import BENCHMARKS, cpu_model, write_section

    memory_gb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    machine = f"{os.cpu_count()} cores, {cpu_model()}, {memory_gb:.0f} GB"
    index_rows = []
    for n in args.items:
        index_rows.append(_child("index", [str(n)]))
        print(json.dumps(index_rows[-1]), flush=True)
    train_rows = []
    for b in args.train_batches:
        train_rows.append(_child("train", [str(args.train_users), "2000", "14", str(b)]))
        print(json.dumps(train_rows[-1]), flush=True)
    section = render(index_rows, train_rows, machine)
    print(section)
    if not args.no_write:
        write_section(BENCHMARKS, SECTION, section)
        print(f"wrote the section to {BENCHMARKS}")


if __name__ == "__main__":
    main()
