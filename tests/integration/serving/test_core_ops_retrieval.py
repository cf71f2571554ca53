"""The default retrieval model runs on a stock TensorFlow Serving: core TensorFlow ops only.

From the session's serving home (``tests.support.homes``: its trained models, 82 items), an
index whose partitioned search is exhaustive (recall target 1.0 at k = the catalog, so every
leaf holding an item is searched) is pushed with the default ``push.retrieval_index``
(``partitioned``). Then:

- a fresh Python process that never imports ``scann`` loads the SavedModel and finds every op
  of every function in it (each signature's graph, the functions nested in its library, and
  the whole ``saved_model.pb``) registered in core TensorFlow; the same walk over a
  ``scann_ops`` export of the same index names ScaNN's ops, so the check can fail;
- the model server without custom ops (what stock TF Serving is) serves it, and a predict's
  top-k items are exact search's over the exported embeddings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from entrypoints.local_servers import LOOPBACK, tf_serving_flags
from recsys.config import FeaturesConfig, IndexConfig, PushConfig, load_settings
from tests.support.ports import free_port
from tests.support.servers import start_model_server

pytestmark = pytest.mark.integration

K = 20
BLESSED = {"blessed": True, "reason": "test"}

# Run in a fresh interpreter: prints the op types of the SavedModel at argv[1], those core
# TensorFlow does not register, whether it loads and runs without them, and whether scann was
# ever imported.
WALK_OPS = r"""
import json, sys
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

def op_types(graph_def):
    found = {node.op for node in graph_def.node}
    for function in graph_def.library.function:  # nested functions, at any depth
        found |= {node.op for node in function.node_def}
    return found

path = sys.argv[1]
saved = saved_model_pb2.SavedModel.FromString(open(f"{path}/saved_model.pb", "rb").read())
ops = set().union(*(op_types(meta.graph_def) for meta in saved.meta_graphs))
out = {"ops": sorted(ops), "unregistered": sorted(o for o in ops if op_def_registry.get(o) is None)}
try:
    model = tf.saved_model.load(path)
except Exception as e:  # an unregistered op fails the load
    out["load_error"] = str(e)[:300]
else:
    signature_ops = set()
    for name, signature in model.signatures.items():
        signature_ops |= op_types(signature.graph.as_graph_def())
    out["signature_ops"] = sorted(signature_ops)
    out["signature_unregistered"] = sorted(o for o in signature_ops if op_def_registry.get(o) is None)
out["scann_imported"] = sorted(m for m in sys.modules if m == "scann" or m.startswith("scann."))
print(json.dumps(out))
"""


@dataclass
class Pushed:
    version_dir: Path
    base: Path
    index: Path
    train: Path
    validated: Path


@pytest.fixture(scope="module")
def pushed(gateway_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    from components.indexing import build_index
    from components.push import push_models

    tmp = tmp_path_factory.mktemp("core_ops")
    validated = load_settings(overrides={"home": str(gateway_template)}).validated_dir
    train = gateway_template / "train"
    index = tmp / "index"
    manifest = build_index(IndexConfig(brute_force_below=10, recall_target=1.0), train, index)
    part = manifest["partitioned"]
    # Exhaustive: every item is scored for every query.
    assert part["recall_at_k"] == 1.0 and part["items_searched_mean"] == manifest["num_items"] == 82
    base = tmp / "models"
    config = PushConfig(retrieval_k=K, warmup_records=2)
    assert config.retrieval_index == "partitioned"  # the default
    push = push_models(config, train, index, BLESSED, base, data_dir=validated)
    requirements = push["exports"]["retrieval"]["requirements"]
    assert requirements["retrieval_index"] == "partitioned" and requirements["custom_ops"] == []
    assert requirements["server"].startswith("stock tensorflow/serving")
    assert requirements["partitioned"]["leaves_to_search"] == part["leaves_to_search"]
    return Pushed(base / "retrieval" / str(push["version"]), base, index, train, validated)


def _walk_ops(saved_model: Path, cwd: Path) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-c", WALK_OPS, str(saved_model)],
        capture_output=True, text=True, timeout=180, env=env, cwd=cwd,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_pushed_retrieval_model_holds_only_core_ops(pushed: Pushed, tmp_path: Path) -> None:
    from components.push import export_retrieval

    walked = _walk_ops(pushed.version_dir, tmp_path)
    assert walked["scann_imported"] == []
    assert "load_error" not in walked, walked.get("load_error")
    assert walked["unregistered"] == [] and walked["signature_unregistered"] == []
    # The search is in the graph: the centroid matmul, the leaves' ragged ranges, the top-k.
    assert {"MatMul", "TopKV2", "RaggedRange", "GatherV2"} <= set(walked["signature_ops"])
    assert not any(op.startswith("Scann") for op in walked["ops"])

    # The same walk over ScaNN's ops export: they are named, and the model does not load.
    scann_ops = tmp_path / "scann_ops"
    export_retrieval(pushed.train, pushed.index, scann_ops, K, retrieval_index="scann_ops")
    walked = _walk_ops(scann_ops, tmp_path)
    assert walked["unregistered"] and all(op.startswith("Scann") for op in walked["unregistered"])
    assert "load_error" in walked and walked["scann_imported"] == []


@pytest.fixture(scope="module")
def stock_server(pushed: Pushed, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The model server as stock TF Serving (no custom op modules) serving the pushed model."""
    grpc_port, rest_port = free_port(), free_port()
    flags = tf_serving_flags(
        port=grpc_port,
        rest_api_port=rest_port,
        host=LOOPBACK,
        model_name="retrieval",
        model_base_path=pushed.base / "retrieval",
        max_num_load_retries=0,
    )
    log = tmp_path_factory.mktemp("stock_server") / "model_server.log"
    server = start_model_server(flags, log, rest_port, "retrieval")
    try:
        yield f"http://{LOOPBACK}:{rest_port}"
    finally:
        server.stop()


def test_a_stock_model_server_serves_it_with_exact_search_top_k(pushed: Pushed, stock_server: str) -> None:
    from components.features.rows import feature_rows, load_feature_source
    from components.indexing import exact_top_k

    inputs = json.loads((pushed.train / "manifest.json").read_text())["query_inputs"]
    source = load_feature_source(FeaturesConfig(), pushed.validated, list(inputs))
    users = [*list(source.users.index[:5]), "never-seen"]
    rows = feature_rows(source, inputs, user_ids=users)
    body = {name: np.asarray(values).tolist() for name, values in rows.items()}
    url = f"{stock_server}/v1/models/retrieval:predict"

    def predict(signature: str) -> dict:
        r = httpx.post(url, json={"signature_name": signature, "inputs": body}, timeout=30)
        assert r.status_code == 200, r.text
        return r.json()["outputs"]

    served = predict("retrieve")
    embedding = predict("embed")
    queries = np.asarray(embedding["embedding"] if isinstance(embedding, dict) else embedding, np.float32)
    extra = pushed.version_dir / "assets.extra"
    items = np.load(extra / "item_embeddings.npy")
    ids = json.loads((extra / "item_ids.json").read_text())
    exact_rows, exact_scores = exact_top_k(items, queries, K + 1)
    served_rows = np.asarray(served["item_rows"])
    assert served_rows.shape == (len(users), K)
    assert [[ids[r] for r in row] for row in served_rows] == served["item_ids"]
    np.testing.assert_allclose(served["scores"], exact_scores[:, :K], rtol=1e-4, atol=1e-5)
    for user, got, want, scores in zip(users, served_rows, exact_rows, exact_scores, strict=True):
        if scores[K - 1] - scores[K] > 1e-4:  # no tie at the cut: the same K items
            assert set(got) == set(want[:K]), user
        # Best first, each the item exact search scores as high.
        np.testing.assert_allclose(items[got] @ queries[users.index(user)], scores[:K], rtol=1e-4, atol=1e-5)
