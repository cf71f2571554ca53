"""Benchmark: ScaNN vs exact top-100 over a 1M x 64 catalog, with the production parameters.

Run: `.venv/bin/python -m bench.scann_index [--items N --dim D --queries Q --no-write]`.

The catalog is clustered like trained item embeddings (items gather around a few thousand
taste directions, with popularity-like spread in their norms), not uniform noise, on which
no index can beat a scan. Queries are fresh draws from the same mixture (users near
tastes), not catalog rows. The index parameters come from ``components.indexing.index_params``
and ``tune_to_recall``, the functions ``build_index`` uses, so the numbers prove the
production setting. Target: recall@100 >= 0.95 at >= 10x the queries/s of exact search.
Prints a table and replaces this benchmark's section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from components.indexing import build_searcher, exact_top_k, index_params, recall_at_k, search, tune_to_recall
from recsys.config import IndexConfig

BENCH_DATE = "2026-11-23"
SECTION = "## Retrieval index: ScaNN vs exact search"
BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def clustered_catalog(
    n: int, dim: int, n_queries: int, seed: int = 7, clusters: int = 2000
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = p.parse_args()
    console = Console()
    config = IndexConfig()
    k = config.recall_k

    with console.status("generating the catalog"):
        items, queries = clustered_catalog(args.items, args.dim, args.queries)
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
        t0 = time.perf_counter()
        exact_idx, _ = exact_top_k(items, queries, k)
        exact_batched_qps = len(queries) / (time.perf_counter() - t0)
        singles = queries[:50]
        t0 = time.perf_counter()
        for q in singles:
            exact_top_k(items, q[None, :], k)
        exact_single_qps = len(singles) / (time.perf_counter() - t0)

    with console.status("tuning and searching"):
        tuned, recall, tries = tune_to_recall(
            searcher, params, queries, exact_idx, config.recall_target, config.max_tuning_steps
        )
        if tuned != params:  # as build_index does: bake the tuned setting into the searcher
            t0 = time.perf_counter()
            searcher = build_searcher(items, tuned)
            build_s += time.perf_counter() - t0
        search(searcher, queries[:100], k)  # warm caches and threads
        t0 = time.perf_counter()
        approx_idx, _ = search(searcher, queries, k)
        scann_batched_qps = len(queries) / (time.perf_counter() - t0)
        recall = recall_at_k(approx_idx, exact_idx)
        t0 = time.perf_counter()
        for q in queries[:1000]:
            searcher.search(q, final_num_neighbors=k)
        scann_single_qps = min(1000, len(queries)) / (time.perf_counter() - t0)

    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    speedup_batched = scann_batched_qps / exact_batched_qps
    speedup_single = scann_single_qps / exact_single_qps
    ok = recall >= config.recall_target and speedup_batched >= 10 and speedup_single >= 10
    machine = f"{os.cpu_count()} cores, {cpu_model()}"

    title = f"top-{k} over {len(items):,} x {args.dim} (clustered), {len(queries):,} queries; {machine}"
    t = Table(title=title)
    for c in ("search", "queries/s batched", "queries/s single", "ms/query single", "recall@100"):
        t.add_column(c, justify="left" if c == "search" else "right")
    t.add_row("exact (BLAS + argpartition)", f"{exact_batched_qps:,.0f}", f"{exact_single_qps:,.0f}",
              f"{1000 / exact_single_qps:.2f}", "1.000")
    t.add_row("ScaNN", f"{scann_batched_qps:,.0f}", f"{scann_single_qps:,.0f}",
              f"{1000 / scann_single_qps:.3f}", f"{recall:.3f}")
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
    if args.no_write:
        return
    section = f"""{SECTION} ({BENCH_DATE})

`.venv/bin/python -m bench.scann_index` ({len(items):,} items x {args.dim} d, clustered synthetic
catalog, seed 7; {len(queries):,} queries from the same mixture; machine: {machine}).
Parameters as `build_index` sets them: derived by `components.indexing.index_params`
({params.num_leaves_to_search} leaves searched, reorder {params.reorder}), then `tune_to_recall`
({len(tries) - 1} doubling steps to reach 0.95): {setting}. Load average during the run:
{os.getloadavg()[0]:.1f} on 2 cores (other jobs shared the machine).

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
    console.print(f"wrote the section to {BENCHMARKS}")


def write_section(path: Path, heading: str, body: str) -> None:
    """Replace this benchmark's section (from its heading to the next ``## ``) or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(heading)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        nxt = text.find("\n## ", start + len(heading))
        text = text[:start] + body + (text[nxt + 1 :] if nxt >= 0 else "")
        text = text.replace(body + "## ", body + "\n## ")
    path.write_text(text)


if __name__ == "__main__":
    main()
