"""Benchmark: how the index and training grow on this machine, for docs/scaling.md.

Run: `.venv/bin/python -m bench.scale [--items 100000 1000000 5000000 --no-write]`.

Index: for each catalog size N, a clustered synthetic catalog of N x 65 float32 (the exported
D: 64 + the item-prior coordinate) built exactly as ``components.indexing.build_index``
builds it (``index_params`` then ``tune_to_recall`` to recall@100 >= 0.95 against exact
search, rebuilding when tuning moved the setting). Each size runs in a child process, so its
RSS and peak RSS are its own and not the previous size's leftovers. Measured: build time
(k-means tree + AH codebooks + tuning), the RSS the index adds, peak RSS, single-query
latency p50/p99 and batched queries/s, recall@100 on 200 fresh queries.

Training: ``components.training.train.train_retriever`` (the pipeline's path: datasets,
fit, export) on generated data at the production setting (64-d towers), each event carrying
the user's recent items as the feature layer computes them (``recent_items_table``, as of
strictly before the event). Throughput is the *marginal* rate: positives x (5 - 1) epochs /
(time of a 5-epoch run - time of a 1-epoch run), after a discarded warm-up run, so model
building, vocabularies, encoding, tracing and SavedModel export (fixed costs) do not dilute
it. The machine is shared, so each batch size is measured ``--train-repeats`` times and the
best and the median are reported with the load average around them.

Prints tables and replaces this benchmark's sections of BENCHMARKS.md (``--no-index`` or
``--no-training`` to run one part).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

BENCH_DATE = "2026-11-29"
SECTION = "## Scale: index growth and training throughput"
TRAINING_SECTION = "## Scale: retriever training throughput in the pipeline"
DIM = 65
QUERIES = 200
TRAINING_EPOCHS = 6
# The fit's per-epoch log line: "[retriever] epoch 3: loss=... (2.1s)".
EPOCH_LINE = re.compile(r"\[retriever\] epoch (\d+):.*\(([\d.]+)s\)$")
# Recorded under the section's table: the rate before training encoded its inputs ahead.
TRAINING_NOTES = """
Before the steps took encoded integers (commit 5b485c6, this benchmark, same day, just before
the rows above): batch 512, epoch seconds 3.0, 3.1, 3.0, 2.9, 5.6, 4.5, 4.4, 4.4, 5.3, 4.0:
best 10,136, median 7,015 examples/s, load 2.54 -> 3.01. Every step then tokenized each
example's title and description, split its categories and its history and looked the strings
up, and removed accidental hits by comparing item-id strings (B x B per step); a per-example
shuffle buffer fed the batches. Now `_retriever_dataset` runs the towers' `encode` once, the
steps run `embed` on integers (the exported towers run `encode` then `embed` on strings), and
an epoch shuffles row indices and gathers whole batches. The default batch stays 512.
"""


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


def history_frame(users: int, items: int, days: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A generated training frame (seed 7) and its catalog, as the feature layer would give it.

    Each event is joined with its user and item and carries ``recent_items``: the user's
    recent-items state (``recent_items_table``, the feature layer's rule) as of strictly
    before the event, so the query tower reads histories of the length the pipeline sees.
    """
    from datetime import UTC, datetime

    from components.features.tables import recent_items_table
    from components.sources.synthetic import GenerateParams, generate
    from recsys.config import FeaturesConfig

    end_date = datetime(2026, 11, 1, tzinfo=UTC)
    tables = generate(GenerateParams(users=users, items=items, days=days, seed=7, end_date=end_date))
    events = tables["events"].assign(user_id=tables["events"]["user_id"].astype(str))
    frame = events.merge(tables["users"], on="user_id", how="left").merge(tables["items"], on="item_id")
    frame["hour"] = frame["ts"].dt.hour
    frame["ts"] = frame["ts"].astype("datetime64[us, UTC]")
    states = recent_items_table(events, FeaturesConfig().recent_items)
    states = states.rename(columns={states.columns[1]: "state_ts"})[["user_id", "state_ts", "recent_items"]]
    states["state_ts"] = states["state_ts"].astype("datetime64[us, UTC]")
    frame = pd.merge_asof(
        frame.sort_values("ts", kind="stable"),
        states.sort_values("state_ts", kind="stable"),
        left_on="ts",
        right_on="state_ts",
        by="user_id",
        allow_exact_matches=False,
    ).drop(columns=["state_ts"])
    frame["recent_items"] = frame["recent_items"].fillna("")
    return frame, tables["items"]


def training_point(users: int, items: int, days: int, batch_size: int, repeats: int) -> dict[str, Any]:
    """Examples/s of ``train_retriever``'s epochs at the production tower sizes.

    ``repeats`` fits of ``TRAINING_EPOCHS`` epochs each; an epoch's rate is the positives over
    the seconds the fit's own epoch log reports. The first epoch of a fit traces the step
    and is left out, and so are model building, encoding and export (fixed costs that do
    not grow with the epochs).
    """
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from components.training.train import positives_frame, train_retriever
    from recsys.config import TrainingConfig

    frame, catalog = history_frame(users, items, days)
    positives = len(positives_frame(frame, drop_repeats=True))
    config = TrainingConfig(
        epochs=TRAINING_EPOCHS, batch_size=batch_size, validation_fraction=0.0, early_stopping_patience=0
    )
    load_before = os.getloadavg()[0]
    seconds: list[float] = []
    for _ in range(repeats):
        lines: list[str] = []
        with tempfile.TemporaryDirectory() as tmp:
            train_retriever(config, frame, catalog, Path(tmp), log=lines.append)
        epochs = [float(m.group(2)) for m in map(EPOCH_LINE.search, lines) if m]
        seconds += epochs[1:]
    rates = [positives / max(s, 1e-9) for s in seconds]
    return {
        "users": users,
        "items": items,
        "events": len(frame),
        "positives": positives,
        "mean_history": round(float(frame["recent_items"].str.split().str.len().mean()), 1),
        "batch_size": batch_size,
        "epoch_seconds": seconds,
        "best": round(max(rates)),
        "median": round(float(np.median(rates))),
        "load_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def _child(kind: str, arg: list[str]) -> dict[str, Any]:
    """Run one point in a fresh interpreter; its last stdout line is the JSON result."""
    cmd = [sys.executable, "-m", "bench.scale", "--child", kind, *arg]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render_index(index_rows: list[dict[str, Any]], machine: str) -> str:
    lines = [
        f"{SECTION} ({BENCH_DATE})",
        "",
        f"`.venv/bin/python -m bench.scale` (machine: {machine}; shared with other jobs, the 1-minute",
        "load average is recorded per row). Index: clustered synthetic catalog N x 65 float32, built",
        "as `build_index` builds it (derived parameters, tuned to recall@100 >= 0.95 against exact",
        f"search on {QUERIES} fresh queries); each size in its own process, the 5M point run once.",
        f"Training throughput has its own section ({TRAINING_SECTION[3:]}).",
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
    return "\n".join(lines) + "\n"


def render_training(train_rows: list[dict[str, Any]], machine: str, day: str) -> str:
    lines = [
        f"{TRAINING_SECTION} ({day})",
        "",
        f"`.venv/bin/python -m bench.scale --no-index` (machine: {machine}, shared with other jobs:",
        "the 1-minute load average before and after each row). `train_retriever` (64-d towers,",
        "in-batch softmax with logQ correction) on generated data (seed 7) whose events carry",
        "the feature layer's point-in-time `recent_items`. Examples/s of an epoch: positives /",
        f"the epoch's seconds in the fit's own log; {TRAINING_EPOCHS}-epoch fits, each fit's first",
        "epoch (tracing) left out, so building, encoding and export are not counted.",
        "",
        "| users | items | events | positives | mean history | batch | epoch s | best ex/s "
        "| median ex/s | load |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for r in train_rows:
        epochs = ", ".join(str(x) for x in r["epoch_seconds"])
        lines.append(
            f"| {r['users']:,} | {r['items']:,} | {r['events']:,} | {r['positives']:,} | {r['mean_history']} "
            f"| {r['batch_size']} | {epochs} | {r['best']:,} | {r['median']:,} "
            f"| {r['load_1m'][0]} -> {r['load_1m'][1]} |"
        )
    return "\n".join(lines) + "\n" + TRAINING_NOTES


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, nargs="+", default=[100_000, 1_000_000, 5_000_000])
    p.add_argument("--train-batches", type=int, nargs="+", default=[512, 1024, 4096])
    p.add_argument("--train-users", type=int, default=20_000)
    p.add_argument("--train-repeats", type=int, default=2, help="fits per batch size")
    p.add_argument("--no-index", action="store_true", help="skip the index sizes")
    p.add_argument("--no-training", action="store_true", help="skip the training throughput")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "index":
            out = index_point(int(rest[0]))
        else:
            out = training_point(*(int(x) for x in rest[:5]))
        print(json.dumps(out))
        return

    from bench.scann_index import BENCHMARKS, cpu_model, write_section

    memory_gb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    machine = f"{os.cpu_count()} cores, {cpu_model()}, {memory_gb:.0f} GB"
    sections = []
    if not args.no_index:
        index_rows = []
        for n in args.items:
            index_rows.append(_child("index", [str(n)]))
            print(json.dumps(index_rows[-1]), flush=True)
        sections.append((SECTION, render_index(index_rows, machine)))
    if not args.no_training:
        train_rows = []
        for b in args.train_batches:
            point = [args.train_users, 2000, 14, b, args.train_repeats]
            train_rows.append(_child("train", [str(x) for x in point]))
            print(json.dumps(train_rows[-1]), flush=True)
        sections.append((TRAINING_SECTION, render_training(train_rows, machine, date.today().isoformat())))
    for heading, body in sections:
        print(body)
        if not args.no_write:
            write_section(BENCHMARKS, heading, body)
            print(f"wrote {heading[3:]!r} to {BENCHMARKS}")


if __name__ == "__main__":
    main()
