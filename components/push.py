"""Publish the trained models to TensorFlow Serving's layout, the way TFX's Pusher does.

A model server watches ``<base>/<model>/`` and loads integer-named version folders that
hold a ``saved_model.pb``; ``<base>/models.config`` (ModelServerConfig text format) tells it
which versions to keep loaded and which *labels* point at them. Two labels drive the
rollout: ``stable`` (what most traffic gets) and ``canary`` (the newest version, which a
slice of traffic tries before the canary DAG promotes or rolls it back).

Two models are pushed together under one version number:

- ``retrieval``: query features -> the top-K item ids and scores. The ScaNN index is inside
  the SavedModel (``scann_ops``, built from the index step's exact ScannConfig), so one
  Predict call does query tower + ANN. A stock ``tensorflow/serving`` cannot load it ("Op
  type not registered 'Scann...'"): ``assets.extra/requirements.json`` names the server build
  it needs, and ``assets.extra`` also holds the query tower (no custom ops) with the item
  embeddings and ids, so a gateway can fall back to exact search. A catalog small enough
  for an exact index gets a plain matmul + top-k and runs on any server.
- ``ranking``: features of (user, candidate) pairs -> one score per objective plus ``score``.

Each version folder carries warm-up requests (``assets.extra/tf_serving_warmup_requests``,
PredictionLog records built from real feature rows) so a server answers its first request
at full speed. Following TFX's Pusher: an unblessed model is refused; the version is the
next integer; the folder is written under a temporary (non-integer, so ignored) name with
``saved_model.pb`` put in place last, then renamed whole; a training output that was already
pushed is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recsys.artifacts import (
    ASSETS_EXTRA,
    EMBEDDINGS_FILE,
    ITEM_IDS_FILE,
    PAD_ID,
    PUSH_RECORD,
    REQUIREMENTS,
    SCANN_CONFIG_FILE,
    WARMUP_FILE,
)
from recsys.config import FeaturesConfig, PushConfig
from recsys.faults import failpoint
from recsys.feature_schema import RANK_CANDIDATES_SIGNATURE
from recsys.model_registry import (
    LOAD_CONFIG,
    MODELS_CONFIG,
    integer_versions,
    read_models_config,
    write_models_config,
)
from recsys.storage import code_version, read_manifest, write_manifest
from recsys.timeutil import utc_now

RETRIEVAL_SIGNATURES = ("serving_default", "retrieve")
RANKING_SIGNATURES = ("serving_default", "rank")


class PushRefused(RuntimeError):
    """The model may not be pushed (not blessed, or its inputs are unusable)."""


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
    os.replace(held, pb)
    os.replace(tmp, final)


def _warmup_batches(
    train_manifest: Mapping[str, Any],
    data_dir: Path | None,
    features: FeaturesConfig,
    query_inputs: Mapping[str, str],
    ranker_inputs: Mapping[str, str],
    records: int,
    item_ids: np.ndarray,
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]], str]:
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
    return retrieval, ranking, source_name


def export_retrieval(
    train_dir: Path, index_dir: Path, out: Path, k: int, server_image: str = "google/tf-serving-scann"
) -> dict[str, Any]:
    """Save the retrieval SavedModel (query tower + index) with its fallback assets into ``out``.

    Signatures: ``serving_default`` and ``retrieve`` (features -> ``item_ids`` [B, K],
    ``item_rows`` [B, K] (rows of ``item_ids.json``), ``scores`` [B, K], best first;
    K = min(k, catalog)), ``embed`` (features -> ``embedding``).
    """
    import tensorflow as tf

    index_manifest = read_manifest(index_dir)
    ids = np.asarray(json.loads((index_dir / ITEM_IDS_FILE).read_text()), dtype=object)
    emb = np.load(index_dir / EMBEDDINGS_FILE).astype(np.float32)
    use_scann = index_manifest["algorithm"] == "scann"
    k = min(k, len(ids))
    reorder = max(int(index_manifest["params"]["reorder"]), k)
    query_model = tf.saved_model.load(str(train_dir / "query_tower"))
    query_sig = query_model.signatures["serving_default"]

    class Retrieval(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query_model = query_model
            self.item_ids = tf.Variable(ids.astype(str).astype(object), trainable=False, dtype=tf.string)
            if use_scann:
                from scann import scann_ops

                # The index step's ScannConfig: the same tree and hashing it measured recall with.
                config = (index_dir / SCANN_CONFIG_FILE).read_text()
                self.scann = scann_ops.create_searcher(tf.constant(emb), config).serialize_to_module()
            else:
                self.item_embeddings = tf.Variable(emb, trainable=False)

        def _embed(self, features: dict[str, tf.Tensor]) -> tf.Tensor:
            return self.query_model.signatures["serving_default"](**features)["embedding"]

        @tf.function
        def embed(self, features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            return {"embedding": self._embed(features)}

        @tf.function
        def retrieve(self, features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            q = self._embed(features)
            if use_scann:
                from scann import scann_ops

                searcher = scann_ops.searcher_from_module(self.scann)
                found = searcher.search_batched(q, final_num_neighbors=k, pre_reorder_num_neighbors=reorder)
                idx, scores = tf.cast(found.indices, tf.int32), found.distances
            else:
                scores, idx = tf.math.top_k(tf.matmul(q, self.item_embeddings, transpose_b=True), k=k)
            # ScaNN pads with -1 when the searched leaves hold fewer than K items.
            valid = idx >= 0
            item_ids = tf.where(valid, tf.gather(self.item_ids, tf.maximum(idx, 0)), PAD_ID)
            scores = tf.where(valid, scores, tf.float32.min)
            # item_rows: each id's row in assets.extra/item_ids.json (-1: padding). A client
            # holding that file asks for rows (output_filter) instead of 1000 strings.
            return {"item_ids": item_ids, "item_rows": tf.where(valid, idx, -1), "scores": scores}

    module = Retrieval()
    specs = _signature_specs(query_sig)
    retrieve = module.retrieve.get_concrete_function(specs)
    signatures = {name: retrieve for name in RETRIEVAL_SIGNATURES}
    signatures["embed"] = module.embed.get_concrete_function(specs)
    tf.saved_model.save(
        module,
        str(out),
        signatures=signatures,
        options=tf.saved_model.SaveOptions(namespace_whitelist=["Scann"]),
    )
    extra = out / ASSETS_EXTRA
    extra.mkdir(exist_ok=True)
    np.save(extra / EMBEDDINGS_FILE, emb)
    (extra / ITEM_IDS_FILE).write_text(json.dumps(ids.tolist()))
    shutil.copytree(train_dir / "query_tower", extra / "query_tower")
    requirements = {
        "model": "retrieval",
        "index": index_manifest["algorithm"],
        "custom_ops": ["Scann"] if use_scann else [],
        "server": (
            f"TensorFlow Serving built with ScaNN's ops: the {server_image} image or ScaNN's "
            "tf_serving build; stock tensorflow/serving fails with \"Op type not registered 'Scann...'\""
            if use_scann
            else "stock tensorflow/serving (exact index: no custom ops)"
        ),
        "tensorflow": tf.__version__,
        "scann": _version("scann") if use_scann else None,
        "k": k,
        "outputs": ["item_ids", "item_rows", "scores"],
        "signatures": dict.fromkeys(
            RETRIEVAL_SIGNATURES, "features -> item_ids [B, K], item_rows [B, K], scores [B, K]"
        )
        | {"embed": "features -> embedding [B, D]"},
        "fallback": {
            "how": "embed the query with assets.extra/query_tower (serving_default -> embedding), then "
            "exact dot-product top-K over item_embeddings.npy; row i is item_ids.json[i]",
            "query_model": "query_tower",
            "item_embeddings": EMBEDDINGS_FILE,
            "item_ids": ITEM_IDS_FILE,
        },
        "inputs": {name: spec.dtype.name for name, spec in specs.items()},
        "index_recall_at_k": index_manifest.get("recall_at_k"),
    }
    (extra / REQUIREMENTS).write_text(json.dumps(requirements, indent=2))
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
        "server": "stock tensorflow/serving",
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
    (out / ASSETS_EXTRA).mkdir(exist_ok=True)
    (out / ASSETS_EXTRA / REQUIREMENTS).write_text(json.dumps(requirements, indent=2))
    return requirements


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _smoke_test(saved_model: Path, batch: Mapping[str, np.ndarray], signature: str) -> None:
    """Run one warm-up request through the exported model before it is published."""
    import tensorflow as tf

    if signature == "retrieve":
        from scann import scann_ops  # noqa: F401  (registers the Scann ops before loading)
    loaded = tf.saved_model.load(str(saved_model))
    loaded.signatures[signature](**{k: tf.constant(v) for k, v in batch.items()})


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
        PushRefused: the model is not blessed.
    """
    train_dir, index_dir, base_path = Path(train_dir), Path(index_dir), Path(base_path).resolve()
    verdict = read_blessing(blessing)
    if not verdict.get("blessed", False):
        reason = verdict.get("reason") or "no reason given"
        raise PushRefused(f"model in {train_dir} is not blessed: {reason}")
    train_manifest_path = train_dir / "manifest.json"
    train_manifest = read_manifest(train_dir)
    index_manifest = read_manifest(index_dir)
    train_hash = hashlib.sha256(train_manifest_path.read_bytes()).hexdigest()
    if index_manifest.get("train_manifest_sha256") not in (None, train_hash):
        raise PushRefused(f"index {index_dir} was built from another training output than {train_dir}")
    names = {"retrieval": config.retrieval_model, "ranking": config.ranking_model}
    base_path.mkdir(parents=True, exist_ok=True)
    current = read_models_config(base_path)

    # Idempotent: a training output already pushed keeps its version; nothing changes. A push
    # that died halfway (one model's folder renamed, or models.config not yet written) is
    # not "already pushed": its leftovers are removed and the same version number is reused,
    # so a retried task neither skips the half-done work nor adds a second version.
    for v in _pushed_versions(base_path, names.values(), train_hash):
        if not _push_complete(base_path, names.values(), v, train_hash, current):
            for name in names.values():
                if v not in current.get(name, {}).get("versions", []):
                    shutil.rmtree(base_path / name / str(v), ignore_errors=True)
                for tmp in (base_path / name).glob(f".push-{v}-*"):
                    shutil.rmtree(tmp, ignore_errors=True)  # the crashed attempt's export
            continue
        manifest = {
            "skipped": True,
            "reason": f"training output {train_hash[:12]} already pushed as version {v}",
            "version": v,
            "base_path": str(base_path),
            "models_config": str(base_path / MODELS_CONFIG),
            "train_manifest_sha256": train_hash,
            "models": current,
        }
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            write_manifest(Path(out_dir), manifest)
        return manifest

    version = 1 + max([0, *[v for n in names.values() for v in integer_versions(base_path / n)]])
    features = features or FeaturesConfig()
    ids = np.asarray(json.loads((index_dir / ITEM_IDS_FILE).read_text()), dtype=object)
    query_inputs = train_manifest.get("query_inputs") or {}
    ranker_inputs = train_manifest.get("ranker_inputs") or {}
    retrieval_batches, ranking_batches, warm_source = _warmup_batches(
        train_manifest, data_dir, features, query_inputs, ranker_inputs, config.warmup_records, ids
    )
    record = {
        "version": version,
        "train_manifest_sha256": train_hash,
        "train_dir": str(train_dir),
        "index_dir": str(index_dir),
        "pushed_at": utc_now().isoformat(),
        "code_version": code_version(),
    }
    results: dict[str, dict[str, Any]] = {}
    temps: dict[str, Path] = {}
    try:
        for role, name in names.items():
            model_dir = base_path / name
            model_dir.mkdir(parents=True, exist_ok=True)
            # Not an integer: a server watching the folder ignores it until the rename.
            tmp = model_dir / f".push-{version}-{uuid.uuid4().hex[:8]}"
            temps[role] = tmp
            if role == "retrieval":
                k, image = config.retrieval_k, config.scann_server_image
                req = export_retrieval(train_dir, index_dir, tmp, k, image)
                batches, signature = retrieval_batches, "retrieve"
            else:
                req = export_ranking(train_dir, tmp)
                batches, signature = ranking_batches, "rank"
            records = [("serving_default", b) for b in batches]
            if RANK_CANDIDATES_SIGNATURE in req:
                # Every other record asks rank_candidates (the gateway's call) instead,
                # and there is one of each even when there is a single batch.
                user_side = req[RANK_CANDIDATES_SIGNATURE]["user_inputs"]
                once = [(RANK_CANDIDATES_SIGNATURE, candidates_batch(b, user_side)) for b in batches]
                records = [once[i] if i % 2 else r for i, r in enumerate(records)]
                if len(records) == 1:
                    records.append(once[0])
            extra = tmp / ASSETS_EXTRA
            n = write_warmup(extra / WARMUP_FILE, name, records)
            (extra / PUSH_RECORD).write_text(json.dumps({**record, "model": name}, indent=2))
            _smoke_test(tmp, batches[0], signature)
            results[role] = {"name": name, "requirements": req, "warmup_records": n}
        for n, (role, name) in enumerate(names.items()):
            if n:
                failpoint("push.between_models")  # one model published, the other not yet
            _finish_version(temps[role], base_path / name / str(version))
    finally:
        for tmp in temps.values():
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    models: dict[str, dict[str, Any]] = {}
    load_models: dict[str, dict[str, Any]] = {}
    deleted: dict[str, list[int]] = {}
    for name in names.values():
        model_dir = base_path / name
        old_labels = dict(current.get(name, {}).get("labels", {}))
        stable = old_labels.get("stable", version)
        if stable not in integer_versions(model_dir):
            stable = version  # the labelled folder is gone: the new version is all there is
        labels = {"stable": stable, "canary": version}
        # Retention: the newest keep_versions, and never a labelled version.
        keep = set(integer_versions(model_dir)[-config.keep_versions :]) | set(labels.values())
        deleted[name] = [v for v in integer_versions(model_dir) if v not in keep]
        for v in deleted[name]:
            shutil.rmtree(model_dir / str(v))
        versions = sorted(set(labels.values()))
        models[name] = {"base_path": str(model_dir), "versions": versions, "labels": labels}
        loaded_before = {k: v for k, v in old_labels.items() if v in keep and v != version}
        load_models[name] = {
            "base_path": str(model_dir),
            "versions": sorted(set(labels.values()) | set(loaded_before.values())),
            "labels": loaded_before,
        }
    failpoint("push.before_config")  # both versions on disk, no label points at them yet
    write_models_config(base_path / LOAD_CONFIG, load_models)
    write_models_config(base_path / MODELS_CONFIG, models)
    manifest = {
        "skipped": False,
        "version": version,
        "base_path": str(base_path),
        "models_config": str(base_path / MODELS_CONFIG),
        "load_config": str(base_path / LOAD_CONFIG),
        "train_manifest_sha256": train_hash,
        "models": models,
        "deleted_versions": deleted,
        "exports": results,
        "warmup_source": warm_source,
        "index": {k: index_manifest.get(k) for k in ("algorithm", "recall_at_k", "recall_k", "num_items")},
        "code_version": record["code_version"],
    }
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_manifest(Path(out_dir), manifest)
    return manifest


def _pushed_versions(base_path: Path, names: Iterable[str], train_hash: str) -> list[int]:
    """Versions of any of the models whose push record names this training output."""
    found = set()
    for name in names:
        for v in integer_versions(base_path / name):
            record = base_path / name / str(v) / ASSETS_EXTRA / PUSH_RECORD
            if record.is_file() and json.loads(record.read_text()).get("train_manifest_sha256") == train_hash:
                found.add(v)
    return sorted(found)


def _push_complete(
    base_path: Path, names: Iterable[str], version: int, train_hash: str, models: Mapping[str, Any]
) -> bool:
    """False when a push of this version died halfway: a model lacks the version, or the
    version is the newest on disk and models.config does not list it yet."""
    names = list(names)
    for name in names:
        record = base_path / name / str(version) / ASSETS_EXTRA / PUSH_RECORD
        if not record.is_file() or json.loads(record.read_text()).get("train_manifest_sha256") != train_hash:
            return False
    newest = all(version == max(integer_versions(base_path / name)) for name in names)
    listed = any(version in models.get(name, {}).get("versions", []) for name in names)
    # An older version that models.config no longer lists was superseded, not left half-done.
    return listed or not newest
