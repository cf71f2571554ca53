"""The files of a trained model and a pushed version, by name: the contract between the index
and push steps that write them and the gateway and batch recommend that read them.

A pushed version is TF Serving's layout, ``<base>/<model>/<integer version>/`` with a
``saved_model.pb``; beside the graph, ``assets.extra/`` holds what the serving side needs
without TensorFlow: the item ids and embeddings (exact-search fallback, similar items), the
server build the graph requires, the warm-up requests, the push record and (retrieval) the
serving policy the evaluation chose.
"""

from __future__ import annotations

from pathlib import Path

SCANN_DIR = "scann"  # scann_ops_pybind serialize(): load with scann_ops_pybind.load_searcher
EMBEDDINGS_FILE = "item_embeddings.npy"  # float32 [N, D], row i is item_ids[i]
ITEM_IDS_FILE = "item_ids.json"
SCANN_CONFIG_FILE = "scann_config.pbtxt"  # the ScannConfig text the searcher was built with
# The searcher's k-means partition (``components.in_graph_index.LeafPartition``): each leaf's
# centroid and each item's leaf, what the in-graph partitioned search reads.
PARTITION_FILE = "partition.npz"

ASSETS_EXTRA = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
PUSH_RECORD = "push.json"
REQUIREMENTS = "requirements.json"
# The ordering steps that serve with a retrieval version (fusion weight, ranker on/off, MMR),
# as the evaluation chose them: ``recsys.ranking.ServingPolicy``.
SERVING_POLICY_FILE = "serving_policy.json"
# Each item's strongest item-to-item neighbours (``recsys.neighbours.ItemNeighbours``): the
# second candidate source, blended with retrieval at the policy's ``neighbour_weight``.
ITEM_NEIGHBOURS_FILE = "item_neighbours.npz"
PAD_ID = ""  # an id slot the index could not fill (fewer than K candidates found)


def assets_extra(version_dir: Path) -> Path:
    """``<version>/assets.extra``: the files beside a pushed SavedModel."""
    return Path(version_dir) / ASSETS_EXTRA


def push_record_path(base_path: Path, model: str, version: int) -> Path:
    """The push record (training output, hashes) of one pushed version."""
    return assets_extra(Path(base_path) / model / str(version)) / PUSH_RECORD
