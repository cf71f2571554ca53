"""Benchmark: the retrieval index over a 1M x 64 catalog, with the production parameters.

Run: `.venv/bin/python -m bench.scann_index [--items N --dim D --queries Q --no-write]`.

The catalog is clustered like trained item embeddings (items gather around a few thousand
taste directions, with popularity-like spread in their norms), not uniform noise, on which
no index can beat a scan. Queries are fresh draws from the same mixture (users near
tastes), not catalog rows: a validation set to tune on and a separate test set to report
on, plus perturbed catalog rows (what the index step measures with when it has no real
queries) on the test side. The index parameters come from ``components.indexing``
(``index_params``, ``tune_to_recall``, ``partitioned_setting``), the functions
``build_index`` uses, so the numbers prove the production setting.

Two sections of BENCHMARKS.md, each replaced:

- ScaNN (``scann_ops_pybind``, all cores) vs exact NumPy search. Target: recall@100 >= 0.95
  at >= 10x the queries/s of exact search.
- The served default: the in-graph partitioned search over ScaNN's leaves in core
  TensorFlow ops (``components.in_graph_index``) vs exact search in the graph (a
  ``tf.function`` doing ``query @ items^T`` and ``top_k``), both as the retrieval SavedModel
  runs them. Target: recall@100 >= 0.95 on the test queries at >= 20x exact's queries/s,
  one query at a time and batched.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from components.indexing import (
    build_searcher,
    exact_top_k,
    index_params,
    partitioned_setting,
    perturbed_queries,
    recall_at_k,
    search,
    tune_to_recall,
)
from recsys.config import IndexConfig

BENCH_DATE = "2026-12-04"
SECTION = "## Retrieval index: ScaNN vs exact search"
IN_GRAPH_SECTION = "## Retrieval index: in-graph partitioned search (core TensorFlow ops) vs exact"
BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
CATALOG_SEED = 7
PERTURBED_SEED = 11
BATCH = 256  # queries per call in the batched runs (exact's [256, 1M] scores: 1 GB)
CURVE = (5, 10, 20, 40, 80, 160)  # leaves searched, for the recall table


def clustered_catalog(
    n: int, dim: int, n_queries: int, seed: int = CATALOG_SEED, clusters: int = 2000
) -> tuple[np.ndarray, np.ndarray]:
    """Items and queries from one Gaussian mixture: centres, per-item spread, lognormal norms."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # Zipf-like cluster sizes: a few big tastes, a long tail.
    weights = 1.0 / np.arange(1, clusters + 1) ** 0.8
    weights /= weights.sum()

    def draw(m: int, spread: float) -> np.ndarray:
        c = rng.choice(clusters, size=m, p=weights)
        x = centres[c] + rng.normal(scale=spread, size=(m, dim)).astype(np.float32) / np.sqrt(dim)
        return x.astype(np.float32)

    items = draw(n, 0.6)
    items *= rng.lognormal(0.0, 0.25, size=(n, 1)).astype(np.float32)  # popular items score higher
    return items, draw(n_queries, 0.8)


def rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"Model name:\s*(.+)", out)
        return m.group(1).strip() if m else "unknown"
    except OSError:
        return "unknown"


def load_average() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


@dataclass(frozen=True)
class QuerySets:
    """Validation (tuning) and test (reporting) queries, with their exact top k."""

    validation: np.ndarray
    test: np.ndarray
    perturbed: np.ndarray
    exact_validation: np.ndarray
    exact_test: np.ndarray
    exact_perturbed: np.ndarray


@dataclass(frozen=True)
class Speed:
    """Queries/s of one search, batched and one query per call."""

    batched_qps: float
    single_qps: float

    @property
    def single_ms(self) -> float:
        return 1000 / self.single_qps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=1000, help="in each of the validation and test sets")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args()
    console = Console()
    config = IndexConfig()
    k = config.recall_k
    load_before = load_average()

    with console.status("generating the catalog"):
        items, drawn = clustered_catalog(args.items, args.dim, 2 * args.queries)
    rss0 = rss_gb()
    params = index_params(len(items), args.dim, config)
    with console.status(f"building ScaNN ({params.num_leaves} leaves)"):
        t0 = time.perf_counter()
        searcher = build_searcher(items, params)
        build_s = time.perf_counter() - t0
    index_rss = rss_gb() - rss0
    with tempfile.TemporaryDirectory() as tmp:
        searcher.serialize(tmp, relative_path=True)
        disk_mb = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file()) / 1e6

    with console.status("exact search (reference)"):
        validation, test = drawn[: args.queries], drawn[args.queries :]
        perturbed = perturbed_queries(items, args.queries // 2, config.query_noise, PERTURBED_SEED)
        exact_validation, _ = exact_top_k(items, validation, k)
        t0 = time.perf_counter()
        exact_test, _ = exact_top_k(items, test, k)
        exact_batched_qps = len(test) / (time.perf_counter() - t0)
        exact_perturbed, _ = exact_top_k(items, perturbed, k)
        t0 = time.perf_counter()
        for q in test[:50]:
            exact_top_k(items, q[None, :], k)
        exact_single_qps = 50 / (time.perf_counter() - t0)
    sets = QuerySets(validation, test, perturbed, exact_validation, exact_test, exact_perturbed)

    with console.status("tuning ScaNN on the validation queries, searching the test queries"):
        tuned, _, tries = tune_to_recall(
            searcher, params, validation, exact_validation, config.recall_target, config.max_tuning_steps
        )
        if tuned != params:  # as build_index does: bake the tuned setting into the searcher
            t0 = time.perf_counter()
            searcher = build_searcher(items, tuned)
            build_s += time.perf_counter() - t0
        search(searcher, test[:100], k)  # warm caches and threads
        t0 = time.perf_counter()
        approx_idx, _ = search(searcher, test, k)
        scann_batched_qps = len(test) / (time.perf_counter() - t0)
        recall = recall_at_k(approx_idx, exact_test)
        t0 = time.perf_counter()
        for q in test:
            searcher.search(q, final_num_neighbors=k)
        scann_single_qps = len(test) / (time.perf_counter() - t0)

    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    speedup_batched = scann_batched_qps / exact_batched_qps
    speedup_single = scann_single_qps / exact_single_qps
    ok = recall >= config.recall_target and speedup_batched >= 10 and speedup_single >= 10
    machine = f"{os.cpu_count()} cores, {cpu_model()}"

    title = f"top-{k} over {len(items):,} x {args.dim} (clustered), {len(test):,} test queries; {machine}"
    t = Table(title=title)
    for c in ("search", "queries/s batched", "queries/s single", "ms/query single", "recall@100"):
        t.add_column(c, justify="left" if c == "search" else "right")
    t.add_row("exact (BLAS + argpartition)", f"{exact_batched_qps:,.0f}", f"{exact_single_qps:,.0f}",
              f"{1000 / exact_single_qps:.2f}", "1.000")  # fmt: skip
    t.add_row("ScaNN", f"{scann_batched_qps:,.0f}", f"{scann_single_qps:,.0f}",
              f"{1000 / scann_single_qps:.3f}", f"{recall:.3f}")  # fmt: skip
    console.print(t)
    setting = (
        f"{tuned.num_leaves} leaves, search {tuned.num_leaves_to_search}, AH {tuned.dimensions_per_block} "
        f"dims/block, reorder {tuned.reorder}"
    )
    console.print(
        f"{setting}; build {build_s:.1f}s; index RSS {index_rss:.2f} GB, on disk {disk_mb:.0f} MB; "
        f"peak RSS {peak_gb:.1f} GB; speedup {speedup_batched:.1f}x batched, {speedup_single:.1f}x single; "
        f"target {'met' if ok else 'MISSED'}"
    )
    in_graph = in_graph_section(console, items, searcher, sets, config, machine)
    load_after = load_average()
    console.print(f"load average before {load_before}, after {load_after} on {os.cpu_count()} cores")
    if args.no_write:
        return
    section = f"""{SECTION} ({BENCH_DATE})

`.venv/bin/python -m bench.scann_index` ({len(items):,} items x {args.dim} d, clustered synthetic
catalog, seed {CATALOG_SEED}; {len(validation):,} validation and {len(test):,} test queries from the
same mixture; machine: {machine}). Parameters as `build_index` sets them: derived by
`components.indexing.index_params` ({params.num_leaves} leaves, {params.num_leaves_to_search} searched,
reorder {params.reorder}, k-means on {params.training_sample_size:,} items), then `tune_to_recall` on the
validation queries ({len(tries) - 1} doubling steps to reach 0.95): {setting}. Recall and speed are
the test queries'. Load average (1, 5, 15 min) {load_before} before the run and {load_after} after
it, on {os.cpu_count()} cores: other jobs shared the machine.

| search | queries/s batched | queries/s single | ms/query single | recall@100 |
| --- | ---: | ---: | ---: | ---: |
| exact (NumPy BLAS dot + argpartition) | {exact_batched_qps:,.0f} | {exact_single_qps:,.0f} \
| {1000 / exact_single_qps:.2f} | 1.000 |
| ScaNN | {scann_batched_qps:,.0f} | {scann_single_qps:,.0f} | {1000 / scann_single_qps:.3f} | {recall:.3f} |

Build {build_s:.1f} s; the index adds {index_rss:.2f} GB of RSS ({disk_mb:.0f} MB serialized; the
float32 catalog itself is {items.nbytes / 1e9:.2f} GB); peak RSS {peak_gb:.1f} GB. Speed-up
{speedup_batched:.1f}x batched and {speedup_single:.1f}x single-query; target (recall@100 >= 0.95 at
>= 10x exact queries/s): {"met" if ok else "missed"}.
"""
    write_section(BENCHMARKS, SECTION, section)
    in_graph = in_graph.replace("{load_before}", load_before).replace("{load_after}", load_after)
    write_section(BENCHMARKS, IN_GRAPH_SECTION, in_graph, after=SECTION)
    console.print(f"wrote both sections to {BENCHMARKS}")


def graph_speed(run: Callable[[Any], Any], queries: np.ndarray, singles: int) -> Speed:
    """Queries/s of ``run`` (a ``tf.function`` over a [B, D] batch): batches of ``BATCH`` over
    ``queries``, then its first ``singles`` queries one per call."""
    import tensorflow as tf

    run(tf.constant(queries[:BATCH]))  # trace once, warm the kernels
    t0 = time.perf_counter()
    for start in range(0, len(queries), BATCH):
        run(tf.constant(queries[start : start + BATCH]))
    batched = len(queries) / (time.perf_counter() - t0)
    run(tf.constant(queries[:1]))
    t0 = time.perf_counter()
    for n in range(singles):
        run(tf.constant(queries[n : n + 1]))
    return Speed(batched, singles / (time.perf_counter() - t0))


def in_graph_section(
    console: Console, items: np.ndarray, searcher: Any, sets: QuerySets, config: IndexConfig, machine: str
) -> str:
    """Measure the in-graph searches; print them; the BENCHMARKS.md section (``{load_*}`` left to fill)."""
    import tensorflow as tf

    from components.in_graph_index import (
        LeafTables,
        exact_index,
        items_searched,
        leaf_order,
        partitioned_index,
        recall_by_leaves,
        searcher_partition,
    )

    k = config.recall_k
    dim = items.shape[1]
    with console.status("the partition: leaves to search, chosen on the validation queries"):
        partition = searcher_partition(searcher)
        chosen = partitioned_setting(partition, sets.validation, sets.exact_validation, config.recall_target)
        leaves = chosen.leaves_to_search
        order_test = leaf_order(partition, sets.test)
        test_curve = recall_by_leaves(partition, order_test, sets.exact_test)
        order_validation = leaf_order(partition, sets.validation)
        validation_curve = recall_by_leaves(partition, order_validation, sets.exact_validation)
        tables = LeafTables.build(partition, items)
    spec = [tf.TensorSpec([None, dim], tf.float32)]
    exact_module = exact_index(items)
    exact_run = tf.function(lambda q: exact_module.search(q, k), input_signature=spec)
    part_module = partitioned_index(tables, leaves)
    part_run = tf.function(lambda q: part_module.search(q, k), input_signature=spec)

    with console.status("in-graph search: partitioned (recall, speed)"):
        batches = [sets.test[s : s + BATCH] for s in range(0, len(sets.test), BATCH)]
        found = np.concatenate([part_run(tf.constant(b))[1].numpy() for b in batches])
        recall_test = recall_at_k(found, sets.exact_test)
        found_perturbed = part_run(tf.constant(sets.perturbed))[1].numpy()
        recall_perturbed = recall_at_k(found_perturbed, sets.exact_perturbed)
        part_speed = graph_speed(part_run, sets.test, singles=len(sets.test))
    with console.status("in-graph search: exact (speed)"):
        exact_found = exact_run(tf.constant(sets.test[:BATCH]))[1].numpy()
        exact_recall = recall_at_k(exact_found, sets.exact_test[:BATCH])
        exact_speed = graph_speed(exact_run, sets.test, singles=50)

    speedup_batched = part_speed.batched_qps / exact_speed.batched_qps
    speedup_single = part_speed.single_qps / exact_speed.single_qps
    ok = recall_test >= config.recall_target and speedup_batched >= 20 and speedup_single >= 20
    scored = items_searched(partition, order_test, leaves)
    sizes = partition.sizes()
    t = Table(title=f"in-graph top-{k}, {len(sets.test):,} test queries; {machine}")
    for c in (
        "search (TensorFlow graph)",
        "queries/s batched",
        "queries/s single",
        "ms/query single",
        "recall@100",
    ):
        t.add_column(c, justify="left" if c.startswith("search") else "right")
    t.add_row("exact: matmul + top_k", f"{exact_speed.batched_qps:,.0f}", f"{exact_speed.single_qps:,.0f}",
              f"{exact_speed.single_ms:.2f}", f"{exact_recall:.3f}")  # fmt: skip
    t.add_row(f"partitioned: {leaves} of {partition.num_leaves} leaves", f"{part_speed.batched_qps:,.0f}",
              f"{part_speed.single_qps:,.0f}", f"{part_speed.single_ms:.3f}",
              f"{recall_test:.3f}")  # fmt: skip
    console.print(t)
    console.print(
        f"chosen on validation: {leaves} leaves (validation recall {chosen.recall_at_k:.4f}); test recall "
        f"{recall_test:.4f}, perturbed-item queries {recall_perturbed:.4f}; items scored per query "
        f"{scored.mean():,.0f} (max {scored.max():,}); speedup {speedup_batched:.1f}x batched, "
        f"{speedup_single:.1f}x single; target {'met' if ok else 'MISSED'}"
    )
    curve_rows = "\n".join(
        f"| {n}{' (chosen)' if n == leaves else ''} | {items_searched(partition, order_test, n).mean():,.0f} "
        f"| {validation_curve[n - 1]:.4f} | {test_curve[n - 1]:.4f} |"
        for n in sorted({*CURVE, leaves})
        if n <= partition.num_leaves
    )
    padded = partition.num_leaves * int(sizes.max())
    return f"""{IN_GRAPH_SECTION} ({BENCH_DATE})

`.venv/bin/python -m bench.scann_index` (the same run as the ScaNN section: {len(items):,} items x
{dim} d, seed {CATALOG_SEED}; machine: {machine}; `nproc` {os.cpu_count()}; load average (1, 5, 15 min)
{{load_before}} before the run and {{load_after}} after it: other jobs shared the machine, and both
searches ran under the same load). Both searches are what the retrieval SavedModel runs
(`components.in_graph_index`, core TensorFlow ops only): exact is `query @ items^T` and `top_k`;
partitioned scores the query against ScaNN's {partition.num_leaves:,} centroids (the searcher
above, read from its serialized partitioner), takes the best leaves, scores their items exactly and
takes the top k. Leaves to search chosen as `build_index` chooses them
(`components.indexing.partitioned_setting`: the fewest whose recall@100 reaches 0.95) on the
{len(sets.validation):,} validation queries; everything else measured on the {len(sets.test):,} test
queries. Batched: {BATCH} queries per call; single: one query per call ({len(sets.test):,} calls
partitioned, 50 exact).

| search (TensorFlow graph) | queries/s batched | queries/s single | ms/query single | recall@100 |
| --- | ---: | ---: | ---: | ---: |
| exact: matmul + top_k | {exact_speed.batched_qps:,.0f} | {exact_speed.single_qps:,.0f} \
| {exact_speed.single_ms:.2f} | {exact_recall:.3f} |
| partitioned: {leaves} of {partition.num_leaves:,} leaves | {part_speed.batched_qps:,.0f} \
| {part_speed.single_qps:,.0f} | {part_speed.single_ms:.3f} | {recall_test:.3f} |

Speed-up {speedup_batched:.1f}x batched and {speedup_single:.1f}x single-query; recall@100 on the test
queries {recall_test:.4f} (validation {chosen.recall_at_k:.4f}; {len(sets.perturbed):,} perturbed catalog
rows, noise {config.query_noise}, seed {PERTURBED_SEED}: {recall_perturbed:.4f}). Target (recall@100 >= 0.95
at >= 20x exact in-graph queries/s, single and batched): {"met" if ok else "missed"}. A query scores
{scored.mean():,.0f} items on average (max {scored.max():,}) of {len(items):,}. Leaves are unequal:
{sizes.mean():,.0f} items on average, {sizes.max():,} in the largest, so a padded
[leaves, largest leaf] matrix would hold {padded / len(items):.1f}x the catalog; the graph stores the
items sorted by leaf and gathers each searched leaf as a run of rows instead.

Recall@100 against the leaves searched (exact scoring, so recall is the share of the exact top 100
in the searched leaves):

| leaves searched | items scored per query (test) | recall@100 validation | recall@100 test |
| ---: | ---: | ---: | ---: |
{curve_rows}
"""


def write_section(path: Path, heading: str, body: str, after: str | None = None) -> None:
    """Replace this benchmark's section (from its heading to the next ``## ``), or add it: after
    the section headed ``after`` when there is one, else at the end."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading)
    before = text.find(after) if after is not None else -1
    if start < 0 and before >= 0:
        nxt = text.find("\n## ", before + len(after or ""))
        at = nxt + 1 if nxt >= 0 else len(text)
        text = text[:at].rstrip("\n") + "\n\n" + body + ("\n" + text[at:] if nxt >= 0 else "")
    elif start < 0:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + body + (text[nxt + 1 :] if nxt >= 0 else "")
        text = text.replace(body + "## ", body + "\n## ")
    path.write_text(text)


if __name__ == "__main__":
    main()
