"""The retrieval index: approximate nearest neighbours over the candidate (item) embeddings.

A two-tower retriever scores a user against an item with a dot product of their
embeddings, so "the best K items for this user" is a maximum inner product search over the
whole catalog. Exact search reads every item embedding per query (about 22 ms for 1M x 64
on this machine, memory bound); ScaNN answers the same question in a fraction of a
millisecond by

1. partitioning the catalog into ~sqrt(N) leaves (k-means) and searching only the few
   leaves nearest to the query (``num_leaves_to_search``);
2. scoring the items of those leaves with asymmetric hashing (AH): each item is stored as
   4-bit codes over blocks of 2 dimensions, and a query scores them through lookup tables;
3. re-scoring ("reordering") the best few hundred of those with the exact float embeddings.

Every step trades recall for speed, so the build *measures* recall@k against exact search
on a sample of queries every time and fails when it falls below ``index.recall_target``:
an index whose recall silently decays (a new embedding distribution, a bigger catalog)
is a quality regression no offline metric of the model would show.

Queries for that measurement are real query-tower embeddings when the caller passes them;
otherwise item embeddings plus Gaussian noise (norm ``index.query_noise`` times the mean
item norm). Perturbed items are a stand-in: they sit near the catalog, like real queries
of a trained two-tower model, but are easier than queries far from every item; callers
that can run the query tower should pass its outputs.

When the derived setting misses the target, the build first tunes it: it doubles the
leaves searched and the reorder count (query-time settings, no retraining) up to
``index.max_tuning_steps`` times, rebuilds with the first setting that reaches the target,
and records every try in the manifest. Only when that fails does the build fail.

Below ``index.brute_force_below`` items the index is exact (ScaNN's brute-force scorer): a
small catalog is scanned in microseconds and an ANN would only cost recall. The manifest
says which one was built.

The served retrieval model does not run ScaNN's ops by default (a stock TensorFlow Serving
lacks them): it searches the same k-means leaves with core TensorFlow ops and scores their
items exactly (``components.in_graph_index``). The build saves the searcher's partition for
it and measures, on the same queries, how many leaves that search needs for the target
(manifest ``partitioned``).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from recsys.artifacts import EMBEDDINGS_FILE, ITEM_IDS_FILE, PARTITION_FILE, SCANN_CONFIG_FILE, SCANN_DIR
from recsys.config import IndexConfig
from recsys.manifests import IndexManifest, PartitionedSearch, RecallQueries
from recsys.storage import code_version, read_manifest, write_manifest

# Leaves average at least this many items: below it, scoring a leaf's centroid costs about what
# scoring its items does, and the partition saves nothing.
MIN_AVERAGE_LEAF = 16


class IndexBuildError(RuntimeError):
    """The index could not be built from the training output (bad or empty embeddings)."""


class IndexRecallError(RuntimeError):
    """The index's measured recall is below the configured target; nothing was published."""


@dataclass(frozen=True)
class IndexParams:
    """ScaNN parameters for one catalog, derived from its size by ``index_params``."""

    algorithm: Literal["scann", "brute_force"]
    num_items: int
    dim: int
    k: int  # neighbours per query for the recall measurement (capped at the catalog)
    num_leaves: int
    num_leaves_to_search: int
    min_partition_size: int
    training_sample_size: int
    dimensions_per_block: int
    anisotropic_quantization_threshold: float
    reorder: int  # exact re-scoring of this many hashed candidates (0 = none)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def index_params(num_items: int, dim: int, config: IndexConfig, k: int | None = None) -> IndexParams:
    """Derive the index parameters from the catalog size; pure, so the bench proves them.

    - ``num_leaves ≈ leaves_per_sqrt_n x sqrt(N)`` (4 sqrt(N); at most N / 16) balances the
      two costs of a query: scoring the leaf centroids (grows with the number of leaves) and
      scoring the items of the searched leaves (N / num_leaves each). ScaNN's rule of thumb
      is sqrt(N); the served search (``components.in_graph_index``) scores centroids with
      one dense matmul but gathers each searched item, so it gains from finer leaves: 1M
      items give 4,000 leaves of ~250 items.
    - k-means trains on a sample of at least 50 items per leaf (and 100k), and merges leaves
      that get fewer than a tenth of that average, counted in the sample (where ScaNN
      counts them).
    - ``num_leaves_to_search`` (ScaNN's) is a fraction of the leaves (5%: 200 of 4,000),
      with a floor, since at small N a handful of leaves holds too few items to find k good
      ones. The in-graph search measures its own count (``build_index``).
    - AH with ``dimensions_per_block`` = 2 and an anisotropic threshold of 0.2 is ScaNN's
      recommended setting for dot-product search.
    - ``reorder = reorder_multiplier * k`` (400 for k = 100) exact re-scores.

    Args:
        num_items: catalog size N.
        dim: embedding dimension D.
        config: the ``index`` section.
        k: neighbours per query; default ``config.recall_k``. Capped at N.

    Returns:
        The parameters; ``algorithm`` is ``brute_force`` below ``config.brute_force_below``.
    """
    if num_items < 1 or dim < 1:
        raise ValueError(f"an index needs at least one item and one dimension, got N={num_items}, D={dim}")
    k = min(k or config.recall_k, num_items)
    if num_items < config.brute_force_below:
        return IndexParams("brute_force", num_items, dim, k, 0, 0, 0, 0, 0, 0.0, 0)
    num_leaves = round(config.leaves_per_sqrt_n * math.sqrt(num_items))
    num_leaves = max(2, min(num_leaves, num_items // MIN_AVERAGE_LEAF))
    to_search = math.ceil(num_leaves * config.leaves_to_search_fraction)
    to_search = min(num_leaves, max(config.min_leaves_to_search, to_search))
    sample = min(num_items, max(100_000, 50 * num_leaves))
    # k-means merges leaves with fewer sample points than this: a tenth of the sample's
    # average leaf. (A floor of 50 against 25 sample points per leaf, 4,000 leaves trained on
    # 100k, cost the partition most of what the finer leaves gain.)
    min_partition = max(1, min(50, sample // (10 * num_leaves)))
    return IndexParams(
        algorithm="scann",
        num_items=num_items,
        dim=dim,
        k=k,
        num_leaves=num_leaves,
        num_leaves_to_search=to_search,
        min_partition_size=min_partition,
        training_sample_size=sample,
        dimensions_per_block=config.dimensions_per_block,
        anisotropic_quantization_threshold=0.2,
        reorder=min(num_items, config.reorder_multiplier * k),
    )


def build_searcher(embeddings: np.ndarray, params: IndexParams) -> Any:
    """Build a ``scann_ops_pybind`` searcher (dot product) over ``embeddings`` with ``params``."""
    from scann import scann_ops_pybind

    db = np.ascontiguousarray(embeddings, dtype=np.float32)
    builder = scann_ops_pybind.builder(db, params.k, "dot_product")
    if params.algorithm == "brute_force":
        return builder.score_brute_force().build()
    builder = builder.tree(
        num_leaves=params.num_leaves,
        num_leaves_to_search=params.num_leaves_to_search,
        training_sample_size=params.training_sample_size,
        min_partition_size=params.min_partition_size,
    )
    builder = builder.score_ah(
        params.dimensions_per_block,
        anisotropic_quantization_threshold=params.anisotropic_quantization_threshold,
        training_sample_size=params.training_sample_size,
    )
    return builder.reorder(params.reorder).build()


def search(
    searcher: Any, queries: np.ndarray, k: int, params: IndexParams | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` row indices and scores for a batch of queries (ScaNN, all cores).

    With ``params``, its leaves-to-search and reorder count override the searcher's defaults.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    extra = {}
    if params is not None and params.algorithm == "scann":
        extra = {"leaves_to_search": params.num_leaves_to_search, "pre_reorder_num_neighbors": params.reorder}
    idx, scores = searcher.search_batched_parallel(q, final_num_neighbors=k, **extra)
    return np.asarray(idx, dtype=np.int64), np.asarray(scores, dtype=np.float32)


def tune_to_recall(
    searcher: Any, params: IndexParams, queries: np.ndarray, exact_idx: np.ndarray, target: float, steps: int
) -> tuple[IndexParams, float, list[dict[str, Any]]]:
    """Double leaves-to-search and reorder until recall@k reaches ``target`` (at most ``steps``).

    Returns the first setting that reaches it (else the last tried), its recall, and the tries.
    """
    tries: list[dict[str, Any]] = []
    for step in range(steps + 1):
        recall = recall_at_k(search(searcher, queries, params.k, params)[0], exact_idx)
        tries.append(
            {
                "leaves_to_search": params.num_leaves_to_search,
                "reorder": params.reorder,
                "recall": round(recall, 5),
            }
        )
        grown = replace(
            params,
            num_leaves_to_search=min(params.num_leaves, 2 * params.num_leaves_to_search),
            reorder=min(params.num_items, 2 * params.reorder),
        )
        if recall >= target or params.algorithm != "scann" or grown == params or step == steps:
            return params, recall, tries
        params = grown
    raise AssertionError("unreachable")


def exact_top_k(
    embeddings: np.ndarray, queries: np.ndarray, k: int, batch: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """Exact dot-product top-``k`` (BLAS matmul + argpartition), best first: the reference.

    Queries go in batches so that the [batch, N] score block stays a few hundred MB at 1M items.
    """
    k = min(k, embeddings.shape[0])
    out_idx = np.empty((len(queries), k), dtype=np.int64)
    out_scores = np.empty((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), batch):
        scores = queries[start : start + batch] @ embeddings.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        part_scores = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        out_idx[start : start + batch] = np.take_along_axis(part, order, axis=1)
        out_scores[start : start + batch] = np.take_along_axis(part_scores, order, axis=1)
    return out_idx, out_scores


def recall_at_k(approx: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top-k that the approximate top-k also holds.

    Padding (ScaNN returns fewer than k when the searched leaves hold fewer items) counts as
    a miss, since a caller asked for k and got fewer.
    """
    if exact.size == 0:
        return 1.0
    k = exact.shape[1]
    hits = [len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(hits) / k)


def perturbed_queries(embeddings: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    """``n`` item embeddings plus Gaussian noise of norm ≈ ``noise`` x the mean item norm."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(embeddings), size=min(n, len(embeddings)), replace=False)
    base = embeddings[rows]
    scale = noise * float(np.linalg.norm(embeddings, axis=1).mean()) / math.sqrt(embeddings.shape[1])
    return (base + rng.normal(0.0, scale, size=base.shape)).astype(np.float32)


def read_item_embeddings(train_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Item ids (str) and embeddings (float32 [N, D]) of a training output, checked."""
    path = Path(train_dir) / "item_embeddings.parquet"
    if not path.is_file():
        raise IndexBuildError(f"no item_embeddings.parquet in {train_dir}: the training step did not finish")
    df = pd.read_parquet(path)
    if df.empty:
        raise IndexBuildError(f"{path} holds no items: nothing to index")
    ids = df["item_id"].astype(str).to_numpy()
    dup = pd.Index(ids)[pd.Index(ids).duplicated()].unique()
    if len(dup):
        raise IndexBuildError(f"{path}: duplicate item ids {list(dup[:5])}")
    lengths = df["embedding"].map(len)
    if lengths.nunique() != 1:
        raise IndexBuildError(f"{path}: embeddings of different lengths {sorted(lengths.unique())[:5]}")
    emb = np.stack(df["embedding"].to_numpy()).astype(np.float32)
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise IndexBuildError(f"{path}: non-finite embeddings for items {list(ids[bad][:5])}")
    return ids, emb


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _latency(searcher: Any, queries: np.ndarray, k: int) -> dict[str, float]:
    """Batched queries/s and single-query p50/p95 in ms (one query at a time, as a request)."""
    t0 = time.perf_counter()
    search(searcher, queries, k)
    batched = len(queries) / max(time.perf_counter() - t0, 1e-9)
    singles = []
    for q in queries[: min(len(queries), 200)]:
        t0 = time.perf_counter()
        searcher.search(q, final_num_neighbors=k)
        singles.append((time.perf_counter() - t0) * 1000)
    return {
        "batched_qps": round(batched, 1),
        "single_ms_p50": round(float(np.percentile(singles, 50)), 4),
        "single_ms_p95": round(float(np.percentile(singles, 95)), 4),
    }


@dataclass(frozen=True)
class _RecallQueries:
    """The query embeddings recall is measured with, and where they came from."""

    embeddings: np.ndarray
    source: Literal["query_embeddings", "perturbed_item_embeddings"]


@dataclass(frozen=True)
class _MeasuredIndex:
    """A searcher whose parameters reached (or were the last tried for) the recall target."""

    searcher: Any
    params: IndexParams
    recall: float
    tries: list[dict[str, Any]]
    build_seconds: float
    exact_qps: float
    exact_idx: np.ndarray  # the recall queries' exact top k (rows), the reference


def build_index(
    config: IndexConfig,
    train_dir: Path,
    out_dir: Path,
    queries: np.ndarray | None = None,
    candidates: int = 0,
) -> dict[str, Any]:
    """Build the ScaNN index over a training output's item embeddings, measured and persisted.

    Args:
        config: the ``index`` section (recall target, derivation knobs).
        train_dir: the training step's folder (``item_embeddings.parquet``, ``manifest.json``).
        out_dir: replaced by this build: ``scann/`` (the serialized searcher), the embeddings
            and ids in index order (for exact-search fallbacks), the ScaNN config text, the
            searcher's partition (``partition.npz``: centroids and each item's leaf, for the
            in-graph search), and ``manifest.json`` last.
        queries: real query embeddings [Q, D] to measure recall with (a sample of
            ``config.eval_queries`` is used); None: perturbed item embeddings.
        candidates: the items a served query asks for (``gateway.candidates``): the in-graph
            search's leaves hold at least that many for 99% of the recall queries.

    Returns:
        The manifest: algorithm and parameters, recall@k against exact search with its
        target and query source, build seconds, query latency (ScaNN and exact), and
        ``partitioned``: the in-graph search's leaves-to-search, the fewest leaves whose
        recall@k on the same queries reaches the target, with that recall and its cost.

    Raises:
        IndexRecallError: recall below ``config.recall_target`` (names both); nothing written.
        IndexBuildError: missing, empty or inconsistent embeddings.
    """
    train_dir, out_dir = Path(train_dir), Path(out_dir)
    train_manifest = read_manifest(train_dir)
    ids, emb = read_item_embeddings(train_dir)
    derived = index_params(len(ids), emb.shape[1], config)
    recall_queries = _recall_queries(config, emb, queries)
    measured = _build_to_recall(config, emb, derived, recall_queries)
    _check_recall(config, measured, recall_queries)
    latency = _latency(measured.searcher, recall_queries.embeddings, measured.params.k)
    _write_index(out_dir, measured.searcher, ids, emb)
    params = measured.params
    partitioned = None
    if params.algorithm == "scann":
        partitioned = _measure_partition(
            config, out_dir, recall_queries.embeddings, measured.exact_idx, candidates
        )
    manifest = IndexManifest(
        path=str(out_dir),
        train_dir=str(train_dir),
        train_manifest_sha256=file_sha256(train_dir / "manifest.json"),
        train_code_version=train_manifest.get("code_version"),
        algorithm=params.algorithm,
        exact=params.algorithm == "brute_force",
        why=(
            f"N={params.num_items} < index.brute_force_below={config.brute_force_below}: exact search"
            if params.algorithm == "brute_force"
            else "ScaNN: k-means tree, asymmetric hashing, exact reorder"
        ),
        params=params.as_dict(),
        derived_params=derived.as_dict(),
        tuning=measured.tries,
        num_items=params.num_items,
        embedding_dim=params.dim,
        recall_k=params.k,
        recall_at_k=round(measured.recall, 5),
        recall_target=config.recall_target,
        recall_queries=RecallQueries(
            count=len(recall_queries.embeddings),
            source=recall_queries.source,
            noise=config.query_noise if queries is None else None,
        ),
        build_seconds=round(measured.build_seconds, 3),
        latency=latency,
        exact_qps=round(measured.exact_qps, 1),
        files={
            "scann": SCANN_DIR,
            "embeddings": EMBEDDINGS_FILE,
            "item_ids": ITEM_IDS_FILE,
            "scann_config": SCANN_CONFIG_FILE,
        }
        | ({"partition": PARTITION_FILE} if partitioned is not None else {}),
        partitioned=partitioned,
        code_version=code_version(),
    )
    write_manifest(out_dir, manifest)
    return manifest.model_dump()


def _recall_queries(config: IndexConfig, emb: np.ndarray, queries: np.ndarray | None) -> _RecallQueries:
    """A sample of ``config.eval_queries`` real queries, or perturbed items without any."""
    if queries is None:
        perturbed = perturbed_queries(emb, config.eval_queries, config.query_noise, config.seed)
        return _RecallQueries(perturbed, "perturbed_item_embeddings")
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != emb.shape[1]:
        raise IndexBuildError(
            f"query embeddings of shape {q.shape} do not match the items' dimension {emb.shape[1]}"
        )
    rng = np.random.default_rng(config.seed)
    sample = q[rng.choice(len(q), size=min(len(q), config.eval_queries), replace=False)]
    return _RecallQueries(sample, "query_embeddings")


def _build_to_recall(
    config: IndexConfig, emb: np.ndarray, derived: IndexParams, queries: _RecallQueries
) -> _MeasuredIndex:
    """Build with the derived parameters, measure recall against exact search, and tune.

    A tuned setting that reaches the target is built again, so that the persisted index and
    the SavedModel built from its config search like the measured one; then re-measured.
    """
    import scann  # noqa: F401  (its import, seconds on first use, is not build time)

    t0 = time.perf_counter()
    searcher = build_searcher(emb, derived)
    build_seconds = time.perf_counter() - t0
    q = queries.embeddings
    t0 = time.perf_counter()
    exact_idx, _ = exact_top_k(emb, q, derived.k)
    exact_qps = len(q) / max(time.perf_counter() - t0, 1e-9)
    params, recall, tries = tune_to_recall(
        searcher, derived, q, exact_idx, config.recall_target, config.max_tuning_steps
    )
    if recall >= config.recall_target and params != derived:
        t0 = time.perf_counter()
        searcher = build_searcher(emb, params)
        build_seconds += time.perf_counter() - t0
        recall = recall_at_k(search(searcher, q, params.k)[0], exact_idx)
    return _MeasuredIndex(searcher, params, recall, tries, build_seconds, exact_qps, exact_idx)


def _measure_partition(
    config: IndexConfig, out_dir: Path, queries: np.ndarray, exact_idx: np.ndarray, candidates: int
) -> PartitionedSearch:
    """Save the written searcher's partition for the in-graph search and choose its leaves."""
    from components.in_graph_index import read_scann_partition

    partition = read_scann_partition(out_dir / SCANN_DIR)
    partition.save(out_dir / PARTITION_FILE)
    return partitioned_setting(partition, queries, exact_idx, config.recall_target, candidates)


def partitioned_setting(
    partition: Any, queries: np.ndarray, exact_idx: np.ndarray, target: float, candidates: int = 0
) -> PartitionedSearch:
    """The in-graph search's leaves-to-search over ``partition`` (a ``LeafPartition``).

    That search scores every candidate exactly, so its recall@k at n leaves is the share of
    the exact top k (``exact_idx``, the ``queries``' reference) lying in each query's best n
    leaves: computed here for every n from the leaves' ranks, and the fewest n that reach
    ``target`` are kept (all leaves, exact search, always do); more where those leaves would
    hold fewer than ``candidates`` items for more than 1% of the queries.
    """
    from components.in_graph_index import (
        fewest_leaves_for,
        fewest_leaves_holding,
        items_searched,
        leaf_order,
        recall_by_leaves,
    )

    order = leaf_order(partition, queries)
    recalls = recall_by_leaves(partition, order, exact_idx)
    for_recall = fewest_leaves_for(recalls, target)
    leaves = max(for_recall, fewest_leaves_holding(partition, order, candidates))
    searched = items_searched(partition, order, leaves)
    sizes = partition.sizes()
    curve = [n for n in (2**i for i in range(32)) if n < partition.num_leaves] + [partition.num_leaves]
    return PartitionedSearch(
        num_leaves=partition.num_leaves,
        leaves_to_search=leaves,
        leaves_for_recall=for_recall,
        candidates=candidates,
        recall_at_k=round(float(recalls[leaves - 1]), 5),
        recall_target=target,
        items_searched_mean=round(float(searched.mean()), 1),
        items_searched_max=int(searched.max()),
        leaf_items_mean=round(float(sizes.mean()), 1),
        leaf_items_max=int(sizes.max()),
        recall_by_leaves={str(n): round(float(recalls[n - 1]), 5) for n in curve},
    )


def _check_recall(config: IndexConfig, measured: _MeasuredIndex, queries: _RecallQueries) -> None:
    """Refuse an index below the recall target, naming both and what to change."""
    if measured.recall >= config.recall_target:
        return
    params = measured.params
    raise IndexRecallError(
        f"index recall@{params.k} = {measured.recall:.4f} is below the target {config.recall_target} "
        f"({params.algorithm}, N={params.num_items}, leaves {params.num_leaves_to_search}/"
        f"{params.num_leaves}, reorder {params.reorder} after {len(measured.tries) - 1} tuning steps; "
        f"{len(queries.embeddings)} {queries.source}); "
        "raise index.leaves_to_search_fraction or index.reorder_multiplier, or lower index.recall_target"
    )


def _write_index(out_dir: Path, searcher: Any, ids: np.ndarray, emb: np.ndarray) -> None:
    """Replace ``out_dir`` with the serialized searcher, its config, the embeddings and ids."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / SCANN_DIR).mkdir()
    # Relative paths inside the assets: the folder can move (a copied run, a mounted volume).
    searcher.serialize(str(out_dir / SCANN_DIR), relative_path=True)
    np.save(out_dir / EMBEDDINGS_FILE, emb)
    (out_dir / ITEM_IDS_FILE).write_text(json.dumps(ids.tolist()))
    (out_dir / SCANN_CONFIG_FILE).write_text(searcher.config())


def load_index(index_dir: Path) -> tuple[Any, np.ndarray, np.ndarray]:
    """The persisted searcher, item ids and embeddings of an index folder (for the gateway)."""
    from scann import scann_ops_pybind

    index_dir = Path(index_dir)
    read_manifest(index_dir)
    searcher = scann_ops_pybind.load_searcher(str(index_dir / SCANN_DIR))
    ids = np.asarray(json.loads((index_dir / ITEM_IDS_FILE).read_text()), dtype=object)
    return searcher, ids, np.load(index_dir / EMBEDDINGS_FILE)
