"""Publish the trained models to TensorFlow Serving's layout, the way TFX's Pusher does.

A model server watches ``<base>/<model>/`` and loads integer-named version folders that
hold a ``saved_model.pb``; ``<base>/models.config`` (ModelServerConfig text format) tells it
which versions to keep loaded and which *labels* point at them. Two labels drive the
rollout: ``stable`` (what most traffic gets) and ``canary`` (the newest version, which a
slice of traffic tries before the canary DAG promotes or rolls it back).

Two models are pushed together under one version number:

- ``retrieval``: query features -> the top-K item ids and scores; one Predict call does query
  tower + index. ``push.retrieval_index`` says which index is in the graph. By default
  (``partitioned``) it is the index step's ScaNN leaves searched with core TensorFlow ops
  (``components.in_graph_index``: centroids, the best leaves, exact scores of their items),
  so a stock ``tensorflow/serving`` loads it. ``scann_ops`` puts ScaNN's own ops in the graph
  (built from the index step's exact ScannConfig); a stock server cannot load that ("Op type
  not registered 'Scann...'"). ``exact`` is a plain matmul + top-k, as is any index the step
  built exact. ``assets.extra/requirements.json`` names the server build the graph needs, and
  ``assets.extra`` also holds the query tower (no custom ops) with the item embeddings and
  ids, so a gateway can fall back to exact search.
- ``ranking``: features of (user, candidate) pairs -> one score per objective plus ``score``.

Each version folder carries warm-up requests (``assets.extra/tf_serving_warmup_requests``,
PredictionLog records built from real feature rows) so a server answers its first request
at full speed. Following TFX's Pusher: an unblessed model is refused; the version is the
next integer; the folder is written under a temporary (non-integer, so ignored) name with
``saved_model.pb`` put in place last, then renamed whole; a training output that was already
pushed is skipped. The retrieval version also carries ``assets.extra/serving_policy.json``:
the ordering steps the gate measured (fusion weight, ranker and MMR on or off), which the
gateway and batch recommendations follow.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys.artifacts import (
    ASSETS_EXTRA,
    EMBEDDINGS_FILE,
    ITEM_IDS_FILE,
    ITEM_NEIGHBOURS_FILE,
    PAD_ID,
    PARTITION_FILE,
    PUSH_RECORD,
    REQUIREMENTS,
    SCANN_CONFIG_FILE,
    WARMUP_FILE,
    assets_extra,
    push_record_path,
)
from recsys.config import FeaturesConfig, PushConfig, RetrievalIndex
from recsys.faults import failpoint
from recsys.feature_schema import RANK_CANDIDATES_SIGNATURE
from recsys.manifests import PushManifest, PushRecord, PushSkippedManifest, StepManifest
from recsys.model_registry import (
    LOAD_CONFIG,
    MODELS_CONFIG,
    integer_versions,
    read_models_config,
    registry_lock,
    write_registry,
)
from recsys.ranking import ServingPolicy, write_serving_policy
from recsys.storage import code_version, fsync_path, read_manifest, write_manifest
from recsys.timeutil import utc_now

RETRIEVAL_SIGNATURES = ("serving_default", "retrieve")
RANKING_SIGNATURES = ("serving_default", "rank")


class PushRefused(RuntimeError):
    """The model may not be pushed (not blessed, or its inputs are unusable)."""


class PushInProgress(RuntimeError):
    """Another attempt, still running, is writing the version this push would recover or take."""


def read_blessing(blessing: Path | Mapping[str, Any]) -> dict[str, Any]:
    """The evaluation's verdict: a mapping, a ``blessing.json`` file, or a folder holding one."""
    if isinstance(blessing, Mapping):
        return dict(blessing)
    path = Path(blessing)
    if path.is_dir():
        path = path / "blessing.json"
    if not path.is_file():
        raise PushRefused(f"no blessing at {path}: the evaluation step did not bless this model")
    return json.loads(path.read_text())


def _signature_specs(signature: Any) -> dict[str, Any]:
    import tensorflow as tf

    return {
        name: tf.TensorSpec([None], spec.dtype, name=name)
        for name, spec in signature.structured_input_signature[1].items()
    }


def _predict_log(model: str, signature: str, columns: Mapping[str, np.ndarray]) -> bytes:
    import tensorflow as tf
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model, signature_name=signature))
    for name, values in columns.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(values))
    log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    return log.SerializeToString()


def write_warmup(path: Path, model: str, records: Sequence[tuple[str, dict[str, np.ndarray]]]) -> int:
    """Write at most 1000 PredictionLog records (TF Serving's limit): ``(signature, columns)`` each.

    Records for each signature a client calls mean each runs once at load, not on its first
    request (a cold signature can pass a request deadline).
    """
    import tensorflow as tf

    records = list(records)[:1000]
    with tf.io.TFRecordWriter(str(path)) as w:
        for signature, columns in records:
            w.write(_predict_log(model, signature, columns))
    return len(records)


def candidates_batch(batch: dict[str, np.ndarray], user_inputs: Sequence[str]) -> dict[str, np.ndarray]:
    """A pair-row ranking batch (one user) as a ``rank_candidates`` request: user side [1]."""
    return {k: v[:1] if k in user_inputs else v for k, v in batch.items()}


def _finish_version(tmp: Path, final: Path) -> None:
    """Put ``saved_model.pb`` in place last, then rename the whole folder to its version.

    The rename is atomic on one filesystem, so a watching server sees no version or a
    complete one; where a copy replaces the rename (object stores), the pb still lands last.
    """
    pb = tmp / "saved_model.pb"
    held = tmp.parent / f".{tmp.name}.saved_model.pb"
    os.replace(pb, held)
    _fsync_tree(tmp)  # everything else on disk before the pb and the name say "ready"
    os.replace(held, pb)
    _fsync_tree(tmp)
    os.replace(tmp, final)
    fsync_path(final.parent)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (folders after their entries)."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_path(Path(folder) / name)
        fsync_path(Path(folder))


@dataclass(frozen=True)
class _WarmupBatches:
    """Request batches for the warm-up records, and the data their feature rows came from."""

    retrieval: list[dict[str, np.ndarray]]
    ranking: list[dict[str, np.ndarray]]
    source: str


def _warmup_batches(
    train_manifest: Mapping[str, Any],
    data_dir: Path | None,
    features: FeaturesConfig,
    query_inputs: Mapping[str, str],
    ranker_inputs: Mapping[str, str],
    records: int,
    item_ids: np.ndarray,
) -> _WarmupBatches:
    """Request batches from real feature rows: one user per retrieval request, and one user
    with up to 20 popular candidates per ranking request."""
    import pandas as pd

    from components.features.rows import FeatureSource, feature_rows, load_feature_source, popular_items

    data = data_dir or train_manifest.get("data_dir") or train_manifest.get("data")
    if not data or not (Path(data) / "users").exists():
        # No data to read: one request of defaults still loads the graph and its kernels.
        users, cands, source_name = ["warmup-user"], [str(x) for x in item_ids[:20]], "defaults"
        src = FeatureSource(pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), pd.Timestamp.now(tz="UTC"))
    else:
        src = load_feature_source(features, Path(data), [*query_inputs, *ranker_inputs])
        active = src.events["user_id"].value_counts()
        # Spread over activity levels: the busiest users have the longest recent-item lists.
        ordered = list(active.index)
        step = max(1, len(ordered) // max(records, 1))
        users = ordered[::step][:records] or list(src.users.index[:records])
        known = set(map(str, item_ids))
        cands = [i for i in popular_items(src) if i in known][:20] or [str(x) for x in item_ids[:20]]
        source_name = str(data)
    retrieval = [feature_rows(src, query_inputs, user_ids=[u]) for u in users[:records]]
    ranking = [
        feature_rows(src, ranker_inputs, user_ids=[u] * len(cands), item_ids=cands) for u in users[:records]
    ]
    return _WarmupBatches(retrieval, ranking, source_name)


def export_retrieval(
    train_dir: Path,
    index_dir: Path,
    out: Path,
    k: int,
    server_image: str = PushConfig.model_fields["scann_server_image"].default,
    retrieval_index: RetrievalIndex = "partitioned",
) -> dict[str, Any]:
    """Save the retrieval SavedModel (query tower + index) with its fallback assets into ``out``.

    Signatures: ``serving_default`` and ``retrieve`` (features -> ``item_ids`` [B, K],
    ``item_rows`` [B, K] (rows of ``item_ids.json``), ``scores`` [B, K], best first;
    K = min(k, catalog)), ``embed`` (features -> ``embedding``).

    Args:
        retrieval_index: the index in the graph (``push.retrieval_index``): ``partitioned``
            (the index's ScaNN leaves, core ops), ``scann_ops`` (ScaNN's ops) or ``exact``;
            an index built exact is exported exact.

    Raises:
        PushRefused: ``partitioned`` asked of an index folder without the partition.
    """
    import tensorflow as tf

    index_manifest = read_manifest(index_dir)
    ids = np.asarray(json.loads((index_dir / ITEM_IDS_FILE).read_text()), dtype=object)
    emb = np.load(index_dir / EMBEDDINGS_FILE).astype(np.float32)
    kind = _index_kind(index_manifest, retrieval_index)
    k = min(k, len(ids))
    query_model = tf.saved_model.load(str(train_dir / "query_tower"))
    module = _retrieval_module(query_model, ids, _search_index(kind, index_dir, index_manifest, emb, k), k)
    specs = _signature_specs(query_model.signatures["serving_default"])
    retrieve = module.retrieve.get_concrete_function(specs)
    signatures = {name: retrieve for name in RETRIEVAL_SIGNATURES}
    signatures["embed"] = module.embed.get_concrete_function(specs)
    options = tf.saved_model.SaveOptions(namespace_whitelist=["Scann"] if kind == "scann_ops" else None)
    tf.saved_model.save(module, str(out), signatures=signatures, options=options)
    extra = assets_extra(out)
    _write_exact_search_assets(extra, train_dir, ids, emb)
    requirements = _retrieval_requirements(index_manifest, kind, k, specs, server_image)
    (extra / REQUIREMENTS).write_text(json.dumps(requirements, indent=2))
    return requirements


def _index_kind(index_manifest: Mapping[str, Any], asked: RetrievalIndex) -> RetrievalIndex:
    """The index the graph holds: what was asked, or exact for an index the step built exact."""
    return asked if index_manifest["algorithm"] == "scann" else "exact"


def _search_index(
    kind: RetrievalIndex, index_dir: Path, index_manifest: Mapping[str, Any], emb: np.ndarray, k: int
) -> Any:
    """A ``tf.Module`` whose ``search(queries, k)`` gives (scores [B, k], rows [B, k]; -1 pads)."""
    from components.in_graph_index import LeafPartition, LeafTables, exact_index, partitioned_index

    if kind == "exact":
        return exact_index(emb)
    if kind == "scann_ops":
        # The index step's ScannConfig: the same tree and hashing it measured recall with.
        scann_config = (index_dir / SCANN_CONFIG_FILE).read_text()
        return _scann_index(emb, scann_config, max(int(index_manifest["params"]["reorder"]), k))
    partitioned = index_manifest.get("partitioned")
    if partitioned is None or not (index_dir / PARTITION_FILE).is_file():
        raise PushRefused(
            f"index {index_dir} has no partition for the in-graph search (built before it existed): "
            "rebuild the index, or set push.retrieval_index to scann_ops or exact"
        )
    tables = LeafTables.build(LeafPartition.load(index_dir / PARTITION_FILE), emb)
    return partitioned_index(tables, int(partitioned["leaves_to_search"]))


def _scann_index(emb: np.ndarray, scann_config: str, reorder: int) -> Any:
    """ScaNN's searcher as ops in the graph (``scann_ops``), with the index step's config."""
    import tensorflow as tf
    from scann import scann_ops

    class ScannIndex(tf.Module):
        def __init__(self) -> None:
            super().__init__(name="scann_index")
            self.scann = scann_ops.create_searcher(tf.constant(emb), scann_config).serialize_to_module()

        def search(self, queries: tf.Tensor, k: int) -> tuple[tf.Tensor, tf.Tensor]:
            searcher = scann_ops.searcher_from_module(self.scann)
            found = searcher.search_batched(queries, final_num_neighbors=k, pre_reorder_num_neighbors=reorder)
            return found.distances, tf.cast(found.indices, tf.int32)

    return ScannIndex()


def _retrieval_module(query_model: Any, ids: np.ndarray, index: Any, k: int) -> Any:
    """A ``tf.Module`` holding the query tower and ``index`` (a module with ``search``)."""
    import tensorflow as tf

    class Retrieval(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query_model = query_model
            self.item_ids = tf.Variable(ids.astype(str).astype(object), trainable=False, dtype=tf.string)
            self.index = index

        def _embed(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
            return self.query_model.signatures["serving_default"](**features)["embedding"]

        @tf.function
        def embed(self, features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            return {"embedding": self._embed(features)}

        @tf.function
        def retrieve(self, features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            scores, idx = self.index.search(self._embed(features), k)
            # Every index pads with row -1 when the searched part of the catalog holds fewer
            # than K items (ScaNN's leaves, the partitioned search's, or K above the catalog).
            valid = idx >= 0
            item_ids = tf.where(valid, tf.gather(self.item_ids, tf.maximum(idx, 0)), PAD_ID)
            scores = tf.where(valid, scores, tf.float32.min)
            # item_rows: each id's row in the version's item_ids.json (-1: padding). A client
            # holding that file asks for rows (output_filter) instead of 1000 strings.
            return {"item_ids": item_ids, "item_rows": tf.where(valid, idx, -1), "scores": scores}

    return Retrieval()


def _write_exact_search_assets(extra: Path, train_dir: Path, ids: np.ndarray, emb: np.ndarray) -> None:
    """The query tower, item embeddings and ids beside the graph: exact search without ScaNN's ops."""
    extra.mkdir(exist_ok=True)
    np.save(extra / EMBEDDINGS_FILE, emb)
    (extra / ITEM_IDS_FILE).write_text(json.dumps(ids.tolist()))
    shutil.copytree(train_dir / "query_tower", extra / "query_tower")
    # The item-to-item candidate source travels with the retriever it is blended with.
    if (train_dir / ITEM_NEIGHBOURS_FILE).is_file():
        shutil.copy2(train_dir / ITEM_NEIGHBOURS_FILE, extra / ITEM_NEIGHBOURS_FILE)


def _retrieval_requirements(
    index_manifest: Mapping[str, Any],
    kind: RetrievalIndex,
    k: int,
    specs: Mapping[str, Any],
    server_image: str,
) -> dict[str, Any]:
    """``requirements.json`` of the retrieval model: the server build it needs, its signatures
    and how to search without it."""
    import tensorflow as tf

    use_scann = kind == "scann_ops"
    stock = _stock_server()
    server = {
        "scann_ops": f"TensorFlow Serving {tf.__version__} built with ScaNN's ops: the {server_image} "
        "image (docker/tf-serving/scann.Dockerfile); stock tensorflow/serving fails with "
        "\"Op type not registered 'Scann...'\"",
        "partitioned": f"{stock}: core TensorFlow ops only (ScaNN's leaves searched in-graph), no custom ops",
        "exact": f"{stock} (exact index: no custom ops)",
    }[kind]
    partitioned = index_manifest.get("partitioned") if kind == "partitioned" else None
    # The recall of the search the graph runs, as the index step measured it.
    recall = {"exact": 1.0, "scann_ops": index_manifest.get("recall_at_k")}.get(kind)
    requirements = {
        "model": "retrieval",
        "index": index_manifest["algorithm"],
        "retrieval_index": kind,
        "custom_ops": ["Scann"] if use_scann else [],
        "server": server,
        "tensorflow": tf.__version__,
        "scann": _version("scann") if use_scann else None,
        "k": k,
        "outputs": ["item_ids", "item_rows", "scores"],
        "signatures": dict.fromkeys(
            RETRIEVAL_SIGNATURES, "features -> item_ids [B, K], item_rows [B, K], scores [B, K]"
        )
        | {"embed": "features -> embedding [B, D]"},
        "fallback": {
            "how": f"embed the query with {ASSETS_EXTRA}/query_tower (serving_default -> embedding), then "
            f"exact dot-product top-K over {EMBEDDINGS_FILE}; row i is {ITEM_IDS_FILE}[i]",
            "query_model": "query_tower",
            "item_embeddings": EMBEDDINGS_FILE,
            "item_ids": ITEM_IDS_FILE,
        },
        "inputs": {name: spec.dtype.name for name, spec in specs.items()},
        "index_recall_at_k": partitioned["recall_at_k"] if partitioned is not None else recall,
    }
    if partitioned is not None:
        kept = ("num_leaves", "leaves_to_search", "items_searched_mean")
        requirements["partitioned"] = {key: partitioned[key] for key in kept}
    return requirements


def export_ranking(train_dir: Path, out: Path) -> dict[str, Any]:
    """Save the ranking SavedModel: (user, item) pair features -> per-objective scores + ``score``."""
    import tensorflow as tf

    ranker = tf.saved_model.load(str(train_dir / "ranker"))
    sig = ranker.signatures["serving_default"]

    class Ranking(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ranker = ranker

        @tf.function
        def rank(self, features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            return self.ranker.signatures["serving_default"](**features)

        @tf.function
        def rank_candidates(self, features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            return self.ranker.signatures[RANK_CANDIDATES_SIGNATURE](**features)

    module = Ranking()
    specs = _signature_specs(sig)
    rank = module.rank.get_concrete_function(specs)
    signatures = {name: rank for name in RANKING_SIGNATURES}
    requirements: dict[str, Any] = {
        "model": "ranking",
        "custom_ops": [],
        "server": _stock_server(),
        "tensorflow": tf.__version__,
        "outputs": sorted(sig.structured_outputs),
        "inputs": {name: spec.dtype.name for name, spec in specs.items()},
    }
    if RANK_CANDIDATES_SIGNATURE in ranker.signatures:
        # Shapes kept as trained: user and context inputs [1], candidate inputs [N].
        trained = ranker.signatures[RANK_CANDIDATES_SIGNATURE].structured_input_signature[1]
        cand_specs = {n: tf.TensorSpec(sp.shape, sp.dtype, name=n) for n, sp in trained.items()}
        signatures[RANK_CANDIDATES_SIGNATURE] = module.rank_candidates.get_concrete_function(cand_specs)
        requirements[RANK_CANDIDATES_SIGNATURE] = {
            "user_inputs": sorted(n for n, sp in cand_specs.items() if sp.shape.as_list() == [1]),
            "item_inputs": sorted(n for n, sp in cand_specs.items() if sp.shape.as_list() != [1]),
        }
    tf.saved_model.save(module, str(out), signatures=signatures)
    assets_extra(out).mkdir(exist_ok=True)
    (assets_extra(out) / REQUIREMENTS).write_text(json.dumps(requirements, indent=2))
    return requirements


def _stock_server() -> str:
    """The stock image that loads a SavedModel without custom ops: TF Serving's tag is the
    exporting TensorFlow's version (docker/tf-serving/Dockerfile pins the same)."""
    import tensorflow as tf

    return f"stock tensorflow/serving:{tf.__version__}"


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _smoke_test(
    saved_model: Path, batch: Mapping[str, np.ndarray], signature: str, custom_ops: Sequence[str] = ()
) -> None:
    """Run one warm-up request through the exported model before it is published."""
    import tensorflow as tf

    if signature == "retrieve" and custom_ops:
        from scann import scann_ops  # noqa: F401  (registers the Scann ops before loading)
    loaded = tf.saved_model.load(str(saved_model))
    loaded.signatures[signature](**{k: tf.constant(v) for k, v in batch.items()})


@dataclass(frozen=True)
class _TrainingOutput:
    """What a push publishes: a training output and the index built from it."""

    train_dir: Path
    index_dir: Path
    manifest: dict[str, Any]  # the training step's
    index_manifest: dict[str, Any]
    sha256: str  # of the training manifest: the identity of this output across pushes


def push_models(
    config: PushConfig,
    train_dir: Path,
    index_dir: Path,
    blessing: Path | Mapping[str, Any],
    base_path: Path,
    *,
    data_dir: Path | None = None,
    features: FeaturesConfig | None = None,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Push the retrieval and ranking models as the next version; label it ``canary``.

    The phases: check the blessing; recover (a push of this output that died halfway is
    cleaned up, one that completed makes this push a no-op); export both models to temporary
    folders; publish them as the version; label it in ``models.config``; retain (delete old
    versions no label points at). Recover, label and retain hold ``registry_lock``, as
    promote and rollback do.

    Args:
        config: the ``push`` section (model names, K, retention, warm-up size).
        train_dir: the training output (towers, ranker, manifest).
        index_dir: the index step's output (its ScannConfig, embeddings and ids).
        blessing: the evaluation's verdict (``{"blessed": bool, "reason": str}``, a
            ``blessing.json`` or its folder); an unblessed model is refused.
        base_path: the model base path (``<base>/<model>/<version>/`` and ``models.config``).
        data_dir: a validated data folder for the warm-up requests' feature rows (default: the
            one the training manifest names, else requests of default values).
        features: the ``features`` section (windows, recent items) for those rows.
        out_dir: where to also write the push ``manifest.json`` (a pipeline run's step folder).

    Returns:
        The manifest: version, per model its path, versions and labels, deleted versions,
        warm-up records, requirements; ``skipped`` when this training output was pushed before.

    Raises:
        PushRefused: the model is not blessed, or the index was built from another output.
    """
    base_path = Path(base_path).resolve()
    _check_blessing(blessing, Path(train_dir))
    policy = _serving_policy(blessing)
    source = _read_training_output(Path(train_dir), Path(index_dir))
    names = {"retrieval": config.retrieval_model, "ranking": config.ranking_model}
    base_path.mkdir(parents=True, exist_ok=True)
    with registry_lock(base_path):
        pushed, current = _recover(base_path, names.values(), source.sha256)
        version = pushed if pushed is not None else _next_version(base_path, names.values())
        # Held until the version is labelled: recovery by another attempt leaves it alone.
        attempt = _reserve(base_path, version) if pushed is None else None
    if pushed is not None:
        skipped = PushSkippedManifest(
            reason=f"training output {source.sha256[:12]} already pushed as version {pushed}",
            version=pushed,
            base_path=str(base_path),
            models_config=str(base_path / MODELS_CONFIG),
            train_manifest_sha256=source.sha256,
            models=current,
        )
        return _write_push_manifest(skipped, out_dir)

    code = code_version()
    warmup = _warmup_batches(
        source.manifest,
        data_dir,
        features or FeaturesConfig(),
        source.manifest.get("query_inputs") or {},
        source.manifest.get("ranker_inputs") or {},
        config.warmup_records,
        np.asarray(json.loads((source.index_dir / ITEM_IDS_FILE).read_text()), dtype=object),
    )
    temps: dict[str, Path] = {}
    try:
        try:
            exports = _export(config, source, names, base_path, version, code, warmup, temps, policy)
            _publish(temps, names, base_path, version)
        finally:
            for tmp in temps.values():
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
        with registry_lock(base_path):
            models, retired = _label(base_path, names.values(), version, config.keep_versions)
            _retain(base_path, retired)
    finally:
        if attempt is not None:
            _release(base_path, version, attempt)
    index = source.index_manifest
    manifest = PushManifest(
        version=version,
        base_path=str(base_path),
        models_config=str(base_path / MODELS_CONFIG),
        load_config=str(base_path / LOAD_CONFIG),
        train_manifest_sha256=source.sha256,
        models=models,
        deleted_versions=retired,
        exports=exports,
        warmup_source=warmup.source,
        index={k: index.get(k) for k in ("algorithm", "recall_at_k", "recall_k", "num_items")},
        code_version=code,
    )
    return _write_push_manifest(manifest, out_dir)


# --- check ------------------------------------------------------------------------------------


def _check_blessing(blessing: Path | Mapping[str, Any], train_dir: Path) -> None:
    verdict = read_blessing(blessing)
    if not verdict.get("blessed", False):
        reason = verdict.get("reason") or "no reason given"
        raise PushRefused(f"model in {train_dir} is not blessed: {reason}")


def _serving_policy(blessing: Path | Mapping[str, Any]) -> ServingPolicy | None:
    """The serving policy the evaluation chose (fusion weight, ranker and MMR on or off);
    None for a blessing written without one (the gateway then uses its configuration)."""
    policy = read_blessing(blessing).get("serving_policy")
    return ServingPolicy.model_validate(policy) if policy is not None else None


def _read_training_output(train_dir: Path, index_dir: Path) -> _TrainingOutput:
    """The training and index manifests; refused when the index was built from another output."""
    manifest = read_manifest(train_dir)
    index_manifest = read_manifest(index_dir)
    sha256 = hashlib.sha256((train_dir / "manifest.json").read_bytes()).hexdigest()
    if index_manifest.get("train_manifest_sha256") not in (None, sha256):
        raise PushRefused(f"index {index_dir} was built from another training output than {train_dir}")
    return _TrainingOutput(train_dir, index_dir, manifest, index_manifest, sha256)


# --- recover ----------------------------------------------------------------------------------


def _recover(
    base_path: Path, names: Iterable[str], train_hash: str
) -> tuple[int | None, dict[str, dict[str, Any]]]:
    """The version this training output was pushed as, if that push completed; and ``models.config``.

    Idempotent: a training output already pushed keeps its version; nothing changes. A push
    that died halfway (one model's folder renamed, or models.config not yet written) is not
    "already pushed": its leftovers are removed and the same version number is reused, so a
    retried task neither skips the half-done work nor adds a second version.
    """
    names = list(names)
    current = read_models_config(base_path)
    for v in _pushed_versions(base_path, names, train_hash):
        if _push_complete(base_path, names, v, train_hash, current):
            return v, current
        if _attempt_alive(base_path, v):
            # Not a crash: a running attempt (a retry started while the first still runs)
            # is between publishing and labelling. Its version is not ours to delete.
            raise PushInProgress(f"another push attempt is still writing version {v} under {base_path}")
        for name in names:
            if v not in current.get(name, {}).get("versions", []):
                shutil.rmtree(base_path / name / str(v), ignore_errors=True)
    for name in names:
        for tmp in (base_path / name).glob(".push-*-*"):
            writing = _temp_version(tmp)
            if writing is not None and not _attempt_alive(base_path, writing):
                shutil.rmtree(tmp, ignore_errors=True)  # a crashed attempt's export
                Path(tmp.parent / f".{tmp.name}.saved_model.pb").unlink(missing_ok=True)
    return None, current


def _next_version(base_path: Path, names: Iterable[str]) -> int:
    """One above every version on disk and every version a running attempt has reserved."""
    on_disk = [v for n in names for v in integer_versions(base_path / n)]
    return 1 + max([0, *on_disk, *_live_attempts(base_path)])


# A push attempt holds an exclusive flock on ``<base>/.push-<version>.attempt`` from choosing
# its version until the version is labelled. The kernel drops the lock when the process dies
# (a SIGKILL, an OOM kill), so "the lock is free" means "whoever wrote this is gone".


def _attempt_file(base_path: Path, version: int) -> Path:
    return base_path / f".push-{version}.attempt"


def _reserve(base_path: Path, version: int) -> Any:
    """Take version ``version`` for this attempt (call it holding ``registry_lock``)."""
    f = open(_attempt_file(base_path, version), "a")  # noqa: SIM115 - held until _release
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise PushInProgress(f"another push attempt holds version {version} under {base_path}") from None
    return f


def _release(base_path: Path, version: int, attempt: Any) -> None:
    _attempt_file(base_path, version).unlink(missing_ok=True)
    attempt.close()  # closing drops the lock


def _attempt_alive(base_path: Path, version: int) -> bool:
    """Whether a running attempt holds version ``version``."""
    path = _attempt_file(base_path, version)
    if not path.is_file():
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def _live_attempts(base_path: Path) -> list[int]:
    found = []
    for path in base_path.glob(".push-*.attempt"):
        v = path.name[len(".push-") : -len(".attempt")]
        if v.isdigit() and _attempt_alive(base_path, int(v)):
            found.append(int(v))
    return found


def _temp_version(tmp: Path) -> int | None:
    """The version a temporary export folder ``.push-<version>-<id>`` was written for."""
    v = tmp.name[len(".push-") :].split("-", 1)[0]
    return int(v) if v.isdigit() else None


def _read_push_record(base_path: Path, name: str, version: int) -> dict[str, Any] | None:
    path = push_record_path(base_path, name, version)
    return json.loads(path.read_text()) if path.is_file() else None


def _pushed_versions(base_path: Path, names: Iterable[str], train_hash: str) -> list[int]:
    """Versions of any of the models whose push record names this training output."""
    found = set()
    for name in names:
        for v in integer_versions(base_path / name):
            record = _read_push_record(base_path, name, v)
            if record is not None and record.get("train_manifest_sha256") == train_hash:
                found.add(v)
    return sorted(found)


def _push_complete(
    base_path: Path, names: Iterable[str], version: int, train_hash: str, models: Mapping[str, Any]
) -> bool:
    """False when a push of this version died halfway: a model lacks the version, or the
    version is the newest on disk and models.config does not list it yet."""
    names = list(names)
    for name in names:
        record = _read_push_record(base_path, name, version)
        if record is None or record.get("train_manifest_sha256") != train_hash:
            return False
    newest = all(version == max(integer_versions(base_path / name)) for name in names)
    listed = any(version in models.get(name, {}).get("versions", []) for name in names)
    # An older version that models.config no longer lists was superseded, not left half-done.
    return listed or not newest


# --- export -----------------------------------------------------------------------------------


def _export(
    config: PushConfig,
    source: _TrainingOutput,
    names: Mapping[str, str],
    base_path: Path,
    version: int,
    code: str,
    warmup: _WarmupBatches,
    temps: dict[str, Path],
    policy: ServingPolicy | None = None,
) -> dict[str, dict[str, Any]]:
    """Export each model into a temporary folder of its model folder (listed in ``temps``),
    with its warm-up requests and push record (and, for retrieval, the serving policy), and
    run one request through it.

    Returns:
        Per role (retrieval, ranking): the model's name, requirements and warm-up records.
    """
    pushed_at = utc_now().isoformat()
    results: dict[str, dict[str, Any]] = {}
    for role, name in names.items():
        model_dir = base_path / name
        model_dir.mkdir(parents=True, exist_ok=True)
        # Not an integer: a server watching the folder ignores it until the rename.
        tmp = model_dir / f".push-{version}-{uuid.uuid4().hex[:8]}"
        temps[role] = tmp
        if role == "retrieval":
            requirements = export_retrieval(
                source.train_dir,
                source.index_dir,
                tmp,
                config.retrieval_k,
                config.scann_server_image,
                config.retrieval_index,
            )
            batches, signature = warmup.retrieval, "retrieve"
        else:
            requirements = export_ranking(source.train_dir, tmp)
            batches, signature = warmup.ranking, "rank"
        extra = assets_extra(tmp)
        written = write_warmup(extra / WARMUP_FILE, name, _warmup_records(requirements, batches))
        record = PushRecord(
            version=version,
            train_manifest_sha256=source.sha256,
            train_dir=str(source.train_dir),
            index_dir=str(source.index_dir),
            pushed_at=pushed_at,
            code_version=code,
            model=name,
        )
        (extra / PUSH_RECORD).write_text(json.dumps(record.model_dump(), indent=2))
        _smoke_test(tmp, batches[0], signature, requirements.get("custom_ops", ()))
        results[role] = {"name": name, "requirements": requirements, "warmup_records": written}
        if role == "retrieval" and policy is not None:
            # The ordering steps the gate measured travel with the version the gateway loads.
            write_serving_policy(tmp, policy)
            results[role]["serving_policy"] = policy.model_dump(mode="json")
    return results


def _warmup_records(
    requirements: Mapping[str, Any], batches: Sequence[dict[str, np.ndarray]]
) -> list[tuple[str, dict[str, np.ndarray]]]:
    """``(signature, batch)`` records: ``serving_default`` for each batch, and where the model has
    ``rank_candidates`` (the gateway's call) every other record asks that instead, at least once."""
    records = [("serving_default", b) for b in batches]
    if RANK_CANDIDATES_SIGNATURE not in requirements:
        return records
    user_side = requirements[RANK_CANDIDATES_SIGNATURE]["user_inputs"]
    once = [(RANK_CANDIDATES_SIGNATURE, candidates_batch(b, user_side)) for b in batches]
    records = [once[i] if i % 2 else r for i, r in enumerate(records)]
    if len(records) == 1:
        records.append(once[0])
    return records


# --- publish ----------------------------------------------------------------------------------


def _publish(temps: Mapping[str, Path], names: Mapping[str, str], base_path: Path, version: int) -> None:
    """Rename each exported folder to the version, one model after the other."""
    for n, (role, name) in enumerate(names.items()):
        if n:
            failpoint("push.between_models")  # one model published, the other not yet
        _finish_version(temps[role], base_path / name / str(version))


# --- label and retain -------------------------------------------------------------------------


def _label(
    base_path: Path, names: Iterable[str], version: int, keep_versions: int
) -> tuple[dict[str, dict[str, Any]], dict[str, list[int]]]:
    """Label ``version`` canary (stable stays where it is) in ``models.load.config``, then
    ``models.config``, from the labels on disk now (a promote during the export counts).

    Only the labelled versions stay loaded. Retention keeps the newest ``keep_versions`` and
    every labelled version; the load config names only versions retention keeps, so that a
    server applying it later finds them on disk.

    Returns:
        ``models.config``'s entries, and per model the versions retention deletes: older than
        the newest ``keep_versions`` and labelled by neither config.
    """
    current = read_models_config(base_path)
    loading = read_models_config(base_path, LOAD_CONFIG)
    writing = set(_live_attempts(base_path))  # versions other attempts are writing
    serve: dict[str, dict[str, Any]] = {}
    load: dict[str, dict[str, Any]] = {}
    retired: dict[str, list[int]] = {}
    for name in names:
        model_dir = base_path / name
        on_disk = integer_versions(model_dir)
        old_labels = dict(current.get(name, {}).get("labels", {}))
        stable = old_labels.get("stable", version)
        if stable not in on_disk:
            stable = version  # the labelled folder is gone: the new version is all there is
        labels = {"stable": stable, "canary": version}
        # Never retired: a version either config labels now (a server may serve it until it
        # applies the new config) or one another attempt is writing.
        labelled = set(old_labels.values()) | set(loading.get(name, {}).get("labels", {}).values())
        keep = set(on_disk[-keep_versions:]) | set(labels.values()) | labelled | writing
        retired[name] = [v for v in on_disk if v not in keep]
        serve[name] = {
            "base_path": str(model_dir),
            "versions": sorted(set(labels.values())),
            "labels": labels,
        }
        loaded_before = {k: v for k, v in old_labels.items() if v in keep and v != version}
        load[name] = {
            "base_path": str(model_dir),
            "versions": sorted(set(labels.values()) | set(loaded_before.values())),
            "labels": loaded_before,
        }
    failpoint("push.before_config")  # both versions on disk, no label points at them yet
    write_registry(base_path, load, serve)
    return serve, retired


def _retain(base_path: Path, retired: Mapping[str, Sequence[int]]) -> None:
    """Delete the versions ``_label`` retired; it has already written configs that name none."""
    for name, versions in retired.items():
        for v in versions:
            shutil.rmtree(base_path / name / str(v))


def _write_push_manifest(manifest: StepManifest, out_dir: Path | None) -> dict[str, Any]:
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_manifest(Path(out_dir), manifest)
    return manifest.model_dump()
