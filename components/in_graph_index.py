"""The retrieval index as core TensorFlow ops: ScaNN's leaves, searched inside the SavedModel.

A SavedModel holding ScaNN's custom ops runs only on a TensorFlow Serving built with them;
stock ``tensorflow/serving`` answers "Op type not registered 'Scann...'" (TFRS issue #182),
and the published ``google/tf-serving-scann`` image stopped at TensorFlow 2.11. The default
retrieval model therefore keeps the part of ScaNN that cuts the work, the k-means partition
of the catalog into leaves that ScaNN's builder trained in the index step, and searches it
with ops every TensorFlow build registers:

1. score the query against every leaf centroid (one matmul) and keep the best
   ``leaves_to_search`` leaves, as ScaNN's tree does for a dot-product searcher;
2. gather those leaves' items: the items are stored sorted by leaf, so a leaf is one
   contiguous run ``[start, start + size)`` and the candidates are a ragged range of rows,
   not a padded ``[leaves, largest leaf]`` matrix whose size the largest leaf would set
   (k-means leaves are unequal: at 1M items the largest holds about 13x the average);
3. score them exactly (float32 dot products) and keep the top ``k``; a query whose searched
   leaves hold fewer than ``k`` items gets its real candidates first, then rows of ``-1``
   with score ``-inf``, which the export turns into the retrieval model's padding.

What it leaves out is ScaNN's asymmetric hashing and reordering: every candidate is scored
exactly, so the only approximation is which leaves are searched, and recall@k is the share
of the exact top k whose leaf is among the searched ones. ``recall_by_leaves`` computes
that for every leaves-to-search count from the leaves' ranks alone, so the index step keeps
the smallest count that reaches its recall target without running the graph.

Queries come in a batch: step 1 is one matmul for the batch; steps 2-3 run per query
(``tf.map_fn``, iterations in parallel) so each query gathers only its own candidates and
the memory a batch holds does not grow with its widest query times its size.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The share of queries whose searched leaves must hold the candidates the gateway asks for.
CANDIDATE_SHARE = 0.99


class PartitionError(RuntimeError):
    """A ScaNN searcher's partition is not the one-level k-means tree this search reads."""


@dataclass(frozen=True)
class LeafPartition:
    """A catalog split into leaves: each leaf's centroid and each item's leaf.

    Attributes:
        centroids: float32 [L, D], the k-means centres ScaNN trained (leaf ``j`` is row ``j``).
        leaf_of_item: int32 [N], the leaf of catalog row ``i`` (the index's row order).
    """

    centroids: np.ndarray
    leaf_of_item: np.ndarray

    @property
    def num_leaves(self) -> int:
        return int(self.centroids.shape[0])

    def sizes(self) -> np.ndarray:
        """Items per leaf, int64 [L] (a leaf may be empty)."""
        return np.bincount(self.leaf_of_item, minlength=self.num_leaves)

    def save(self, path: Path) -> None:
        np.savez(Path(path), centroids=self.centroids, leaf_of_item=self.leaf_of_item)

    @classmethod
    def load(cls, path: Path) -> LeafPartition:
        with np.load(Path(path)) as f:
            return cls(f["centroids"].astype(np.float32), f["leaf_of_item"].astype(np.int32))


def read_scann_partition(scann_dir: Path) -> LeafPartition:
    """The partition of a serialized ``scann_ops_pybind`` searcher (``searcher.serialize``).

    ScaNN writes its assets' list to ``scann_assets.pbtxt``: the partitioner
    (``SerializedPartitioner`` proto, whose k-means tree root holds the centroids) and the
    tokenization (``datapoint_to_token.npy``, each datapoint's leaf).

    Raises:
        PartitionError: no partition (a brute-force searcher), a multi-level tree, a projected
            partitioner, or datapoints spilled to several leaves.
    """
    from google.protobuf import text_format
    from scann.partitioning import partitioner_pb2
    from scann.scann_ops import scann_assets_pb2

    scann_dir = Path(scann_dir)
    assets = text_format.Parse((scann_dir / "scann_assets.pbtxt").read_text(), scann_assets_pb2.ScannAssets())
    paths = {scann_assets_pb2.ScannAsset.AssetType.Name(a.asset_type): a.asset_path for a in assets.assets}
    if "PARTITIONER" not in paths or "TOKENIZATION_NPY" not in paths:
        raise PartitionError(f"the searcher in {scann_dir} has no partition (assets: {sorted(paths)})")
    serialized = partitioner_pb2.SerializedPartitioner()
    serialized.ParseFromString((scann_dir / Path(paths["PARTITIONER"]).name).read_bytes())
    if serialized.uses_projection or not serialized.HasField("kmeans"):
        raise PartitionError(f"the searcher in {scann_dir} has a projected or non-k-means partitioner")
    if serialized.kmeans.HasField("next_bottom_up_level"):
        raise PartitionError(f"the searcher in {scann_dir} has a multi-level partition")
    root = serialized.kmeans.kmeans_tree.root
    if any(len(child.children) for child in root.children):
        raise PartitionError(f"the searcher in {scann_dir} has a k-means tree deeper than one level")
    centres = [np.asarray(c.float_dimension or c.dimension, dtype=np.float32) for c in root.centers]
    # The token of a datapoint is its leaf's id; children[j] is centre j's leaf.
    leaf_ids = [child.leaf_id for child in root.children] or list(range(len(centres)))
    centroids = np.empty((len(centres), len(centres[0]) if centres else 0), dtype=np.float32)
    for centre, leaf in zip(centres, leaf_ids, strict=True):
        centroids[leaf] = centre
    tokens = np.load(scann_dir / Path(paths["TOKENIZATION_NPY"]).name)
    if tokens.ndim != 1:
        raise PartitionError(f"datapoints of {scann_dir} are spilled to several leaves ({tokens.shape})")
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= len(centroids)):
        raise PartitionError(f"{scann_dir}: leaf ids outside [0, {len(centroids)})")
    return LeafPartition(centroids, tokens.astype(np.int32))


def searcher_partition(searcher: Any) -> LeafPartition:
    """The partition of a built ``scann_ops_pybind`` searcher (serialized to a scratch folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        searcher.serialize(tmp, relative_path=True)
        return read_scann_partition(Path(tmp))


def leaf_order(partition: LeafPartition, queries: np.ndarray) -> np.ndarray:
    """Each query's leaves, best first by dot product with the centroids: int [Q, L].

    Ties go to the lower leaf, as ``tf.math.top_k`` breaks them in the graph.
    """
    scores = np.asarray(queries, dtype=np.float32) @ partition.centroids.T
    return np.argsort(-scores, axis=1, kind="stable")


def recall_by_leaves(partition: LeafPartition, order: np.ndarray, exact_idx: np.ndarray) -> np.ndarray:
    """Recall@k of the partitioned search for every leaves-to-search count: float [L].

    Element ``n - 1`` is the share of the exact top k (``exact_idx``, rows of the catalog)
    whose leaf is among each query's best ``n`` leaves (``order`` from ``leaf_order``).
    Candidates are scored exactly, so a true neighbour in a searched leaf is always found.
    """
    q, num_leaves = order.shape
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(num_leaves)[None, :].repeat(q, axis=0), axis=1)
    found_at = np.take_along_axis(rank, partition.leaf_of_item[exact_idx], axis=1)
    if found_at.size == 0:
        return np.ones(num_leaves)
    return np.cumsum(np.bincount(found_at.ravel(), minlength=num_leaves)) / found_at.size


def items_searched(partition: LeafPartition, order: np.ndarray, leaves: int) -> np.ndarray:
    """Items each query scores when it searches its best ``leaves`` leaves: int [Q]."""
    return partition.sizes()[order[:, :leaves]].sum(axis=1)


def fewest_leaves_holding(
    partition: LeafPartition, order: np.ndarray, min_items: int, share: float = CANDIDATE_SHARE
) -> int:
    """The fewest leaves-to-search whose leaves hold ``min_items`` items for ``share`` of the
    queries (``order`` from ``leaf_order``); all leaves when the catalog has fewer items.

    Recall is measured at the index's ``recall_k`` (100), but the gateway asks for its
    ``candidates`` (1000): leaves that reach the recall target for 100 may hold fewer items
    than that, and the search can only return what it scored.
    """
    q, num_leaves = order.shape
    if q == 0 or min_items <= 0:
        return 1
    held = np.cumsum(partition.sizes()[order], axis=1)  # [Q, L]: items in the best n leaves
    enough = held >= min(min_items, int(held[0, -1]))
    first = np.where(enough.any(axis=1), enough.argmax(axis=1) + 1, num_leaves)
    return int(min(num_leaves, np.quantile(first, share, method="inverted_cdf")))


def fewest_leaves_for(recalls: np.ndarray, target: float) -> int:
    """The smallest leaves-to-search count whose recall reaches ``target`` (all leaves: exact)."""
    reached = np.flatnonzero(recalls >= target - 1e-12)
    return int(reached[0]) + 1 if len(reached) else len(recalls)


@dataclass(frozen=True)
class LeafTables:
    """A partition as the graph reads it: items sorted by leaf, each leaf a run of rows.

    Attributes:
        centroids: float32 [L, D].
        leaf_start: int32 [L], the first sorted position of each leaf.
        leaf_size: int32 [L], items in each leaf.
        embeddings: float32 [N, D], the item embeddings in leaf order.
        rows: int32 [N], the catalog row (index order) of each sorted position.
    """

    centroids: np.ndarray
    leaf_start: np.ndarray
    leaf_size: np.ndarray
    embeddings: np.ndarray
    rows: np.ndarray

    @classmethod
    def build(cls, partition: LeafPartition, embeddings: np.ndarray) -> LeafTables:
        emb = np.asarray(embeddings, dtype=np.float32)
        if emb.shape[0] != len(partition.leaf_of_item):
            raise PartitionError(
                f"{emb.shape[0]} embeddings for a partition of {len(partition.leaf_of_item)} items"
            )
        if emb.shape[1] != partition.centroids.shape[1]:
            raise PartitionError(
                f"embeddings of {emb.shape[1]} dims, centroids of {partition.centroids.shape[1]}"
            )
        rows = np.argsort(partition.leaf_of_item, kind="stable").astype(np.int32)
        sizes = partition.sizes()
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        return cls(
            partition.centroids.astype(np.float32),
            starts.astype(np.int32),
            sizes.astype(np.int32),
            np.ascontiguousarray(emb[rows]),
            rows,
        )


def partitioned_index(tables: LeafTables, leaves_to_search: int) -> Any:
    """A ``tf.Module`` holding ``tables`` as variables; ``search(queries, k)`` runs the search.

    ``search`` takes float32 queries [B, D] and a Python ``k``, and returns scores float32
    [B, k] and catalog rows int32 [B, k], best first; slots beyond a query's candidates hold
    row -1 and score -inf. Call it inside a ``tf.function`` (a signature or a benchmark's).
    """
    import tensorflow as tf

    num_leaves = int(tables.centroids.shape[0])
    searched = max(1, min(int(leaves_to_search), num_leaves))

    class PartitionedIndex(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="partitioned_index")
            self.centroids = tf.Variable(tables.centroids, trainable=False, name="centroids")
            self.leaf_start = tf.Variable(tables.leaf_start, trainable=False, name="leaf_start")
            self.leaf_size = tf.Variable(tables.leaf_size, trainable=False, name="leaf_size")
            self.embeddings = tf.Variable(tables.embeddings, trainable=False, name="leaf_sorted_embeddings")
            self.rows = tf.Variable(tables.rows, trainable=False, name="catalog_rows")
            self.leaves_to_search = searched

        def search(self, queries: tf.Tensor, k: int) -> tuple[tf.Tensor, tf.Tensor]:
            return _partitioned_top_k(self, tf.convert_to_tensor(queries, tf.float32), int(k))

    return PartitionedIndex()


def _partitioned_top_k(index: Any, queries: Any, k: int) -> tuple[Any, Any]:
    import tensorflow as tf

    searched = index.leaves_to_search
    # 1. The best leaves of every query in the batch: one matmul and one top-k.
    _, leaves = tf.math.top_k(tf.matmul(queries, index.centroids, transpose_b=True), k=searched)
    starts = tf.gather(index.leaf_start, leaves)
    ends = starts + tf.gather(index.leaf_size, leaves)
    # 2. Their items: one run of sorted positions per leaf, concatenated per query.
    runs = tf.ragged.range(tf.reshape(starts, [-1]), tf.reshape(ends, [-1]))
    candidates = tf.RaggedTensor.from_uniform_row_length(runs, searched).merge_dims(1, 2)
    splits = candidates.row_splits
    positions = candidates.flat_values

    def one_query(n: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # 3. Exact scores of this query's candidates, padded to k, and the best k.
        mine = positions[splits[n] : splits[n + 1]]
        scores = tf.linalg.matvec(tf.gather(index.embeddings, mine), queries[n])
        short = tf.maximum(k - tf.shape(mine)[0], 0)
        scores = tf.pad(scores, [[0, short]], constant_values=float("-inf"))
        mine = tf.pad(mine, [[0, short]], constant_values=-1)
        best, at = tf.math.top_k(scores, k=k)
        found = tf.gather(mine, at)
        return best, tf.where(found >= 0, tf.gather(index.rows, tf.maximum(found, 0)), -1)

    return tf.map_fn(
        one_query,
        tf.range(tf.shape(queries)[0]),
        fn_output_signature=(tf.TensorSpec([k], tf.float32), tf.TensorSpec([k], tf.int32)),
    )


def exact_index(embeddings: np.ndarray) -> Any:
    """A ``tf.Module`` for exact search: ``search(queries, k)`` is a matmul over every item and
    a top-k, with the same outputs as ``partitioned_index`` (rows -1 beyond the catalog)."""
    import tensorflow as tf

    emb = np.asarray(embeddings, dtype=np.float32)

    class ExactIndex(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="exact_index")
            self.item_embeddings = tf.Variable(emb, trainable=False, name="item_embeddings")

        def search(self, queries: tf.Tensor, k: int) -> tuple[tf.Tensor, tf.Tensor]:
            scores = tf.matmul(
                tf.convert_to_tensor(queries, tf.float32), self.item_embeddings, transpose_b=True
            )
            found = min(int(k), emb.shape[0])
            best, rows = tf.math.top_k(scores, k=found)
            short = int(k) - found
            if short:
                best = tf.pad(best, [[0, 0], [0, short]], constant_values=float("-inf"))
                rows = tf.pad(rows, [[0, 0], [0, short]], constant_values=-1)
            return best, rows

    return ExactIndex()
