"""Index, push and batch recommend on a tiny training output (real tf_keras models, real ScaNN).

The training output comes from ``model_fixture.write_train_fixture`` (the real training
step, a few epochs) over the shared tiny generated data (200 users, 80 items).
80 items is below ``index.brute_force_below``, so the default build is exact; the ScaNN
path is forced with ``brute_force_below=10`` (5 leaves of ~16 items).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from components.features.rows import feature_rows, load_feature_source
from components.indexing import IndexRecallError, build_index, load_index
from components.push import PushRefused, push_models
from recsys.config import FeaturesConfig, IndexConfig, PushConfig
from recsys.model_registry import LOAD_CONFIG, MODELS_CONFIG, read_models_config
from tests.support.model_fixture import write_train_fixture

pytestmark = pytest.mark.integration
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
SCANN = IndexConfig(brute_force_below=10)
BLESSED = {"blessed": True, "reason": "not worse than serving"}


@pytest.fixture(scope="module")
def train_dir(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train") / "train"
    write_train_fixture(tiny_raw, out)
    return out


@pytest.fixture(scope="module")
def query_embeddings(train_dir: Path, tiny_raw: Path) -> np.ndarray:
    """Real query-tower outputs for every user, from their features at the data's end."""
    import tensorflow as tf

    inputs = json.loads((train_dir / "manifest.json").read_text())["query_inputs"]
    src = load_feature_source(FeaturesConfig(), tiny_raw, list(inputs))
    rows = feature_rows(src, inputs, user_ids=list(src.users.index))
    sig = tf.saved_model.load(str(train_dir / "query_tower")).signatures["serving_default"]
    return sig(**{k: tf.constant(v) for k, v in rows.items()})["embedding"].numpy()


@pytest.fixture(scope="module")
def scann_index(
    train_dir: Path, query_embeddings: np.ndarray, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    out = tmp_path_factory.mktemp("index") / "index"
    build_index(SCANN, train_dir, out, queries=query_embeddings)
    return out


def test_small_catalog_builds_an_exact_index_and_measures_it(train_dir, tmp_path):
    m = build_index(IndexConfig(), train_dir, tmp_path / "index")
    assert m["algorithm"] == "brute_force" and m["exact"] is True
    assert "brute_force_below" in m["why"]
    assert m["recall_at_k"] == 1.0 and m["recall_k"] == 80  # k capped at the 80 items
    assert m["recall_queries"]["source"] == "perturbed_item_embeddings"
    assert m["latency"]["batched_qps"] > 0 and m["build_seconds"] >= 0
    searcher, ids, emb = load_index(tmp_path / "index")
    idx, _ = searcher.search(emb[3], final_num_neighbors=5)
    # D is the trained towers' output width (the id/text dims plus the item-prior coordinate).
    dim = json.loads((train_dir / "manifest.json").read_text())["embedding_dim"]
    assert len(idx) == 5 and emb.shape == (80, dim) and len(ids) == 80


def test_scann_index_recall_is_measured_with_real_queries(scann_index):
    m = json.loads((scann_index / "manifest.json").read_text())
    assert m["algorithm"] == "scann"
    assert m["params"]["num_leaves"] == 5  # 80 // 16: leaves average 16 items or more
    assert m["recall_queries"]["source"] == "query_embeddings"
    assert m["recall_at_k"] >= m["recall_target"] == 0.95
    assert (scann_index / "scann" / "scann_assets.pbtxt").is_file()
    # The in-graph search over the same leaves: the fewest that reach the target, measured.
    part = m["partitioned"]
    assert part["num_leaves"] == 5 and 1 <= part["leaves_to_search"] <= 5
    assert part["recall_at_k"] >= 0.95 and part["recall_by_leaves"]["5"] == 1.0
    assert part["items_searched_mean"] <= 80 and (scann_index / "partition.npz").is_file()


def test_recall_below_target_fails_naming_recall_and_target(train_dir, tmp_path):
    # Search 1 leaf of 5 with no tuning allowed, against a target of 1.0: must fail.
    cfg = IndexConfig(
        brute_force_below=10, recall_target=1.0, leaves_to_search_fraction=0.01, min_leaves_to_search=1,
        reorder_multiplier=1, max_tuning_steps=0,
    )
    with pytest.raises(IndexRecallError, match=r"recall@80 = 0\.\d+ is below the target 1\.0"):
        build_index(cfg, train_dir, tmp_path / "index")
    assert not (tmp_path / "index").exists()  # nothing published


def test_unblessed_model_is_refused_with_the_reason(train_dir, scann_index, tmp_path):
    verdict = tmp_path / "eval"
    verdict.mkdir()
    (verdict / "blessing.json").write_text(json.dumps({"blessed": False, "reason": "recall@100 fell 4%"}))
    with pytest.raises(PushRefused, match="not blessed: recall@100 fell 4%"):
        push_models(PushConfig(), train_dir, scann_index, verdict, tmp_path / "models")
    assert not (tmp_path / "models" / "retrieval").exists()


def _retrain(train_dir: Path, tmp: Path, note: str) -> tuple[Path, Path]:
    """Another training output (a different manifest) and its index."""
    other = tmp / f"train-{note}"
    shutil.copytree(train_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "note": note}))
    build_index(SCANN, other, tmp / f"index-{note}")
    return other, tmp / f"index-{note}"


def test_push_versions_labels_retention_and_artifacts(train_dir, scann_index, tiny_raw, tmp_path):
    import tensorflow as tf
    from google.protobuf import text_format
    from tensorflow_serving.apis import prediction_log_pb2
    from tensorflow_serving.config import model_server_config_pb2

    base = tmp_path / "models"
    cfg = PushConfig(retrieval_k=50, keep_versions=1, warmup_records=8)
    first = push_models(cfg, train_dir, scann_index, BLESSED, base, data_dir=tiny_raw)
    assert first["version"] == 1 and not first["skipped"]
    assert read_models_config(base)["retrieval"]["labels"] == {"stable": 1, "canary": 1}

    # The same training output again: skipped, nothing new.
    again = push_models(cfg, train_dir, scann_index, BLESSED, base, data_dir=tiny_raw)
    assert again["skipped"] and again["version"] == 1
    assert sorted(p.name for p in (base / "retrieval").iterdir()) == ["1"]

    # New training outputs: canary moves, stable stays; retention keeps the labelled version.
    for n, note in enumerate(("b", "c", "d"), start=2):
        other, index = _retrain(train_dir, tmp_path, note)
        m = push_models(cfg, other, index, BLESSED, base, data_dir=tiny_raw)
        assert m["version"] == n
        for model in ("retrieval", "ranking"):
            assert read_models_config(base)[model]["labels"] == {"stable": 1, "canary": n}
    # keep_versions=1: the newest (4), the labelled stable (1), and what a server not reloaded
    # since may still serve: 3 (models.config's canary until this push) and 2 (the load
    # config's). Nothing here reloaded a server.
    for model in ("retrieval", "ranking"):
        assert sorted(int(p.name) for p in (base / model).iterdir()) == [1, 2, 3, 4]
    assert not any(p.name.startswith(".") for p in (base / "retrieval").iterdir())  # no temp left

    # models.config parses back as a ModelServerConfig with both models.
    server_config = model_server_config_pb2.ModelServerConfig
    parsed = text_format.Parse((base / MODELS_CONFIG).read_text(), server_config())
    configs = {c.name: c for c in parsed.model_config_list.config}
    assert set(configs) == {"retrieval", "ranking"}
    assert list(configs["retrieval"].model_version_policy.specific.versions) == [1, 4]
    assert dict(configs["ranking"].version_labels) == {"stable": 1, "canary": 4}
    # The load step's config: version 4 loaded, canary not yet moved to it.
    load = text_format.Parse((base / LOAD_CONFIG).read_text(), server_config())
    assert 4 not in dict(load.model_config_list.config[0].version_labels).values()

    # Warm-up files: PredictionLog records with real feature rows for each signature's inputs.
    for model in ("retrieval", "ranking"):
        path = base / model / "4" / "assets.extra" / "tf_serving_warmup_requests"
        raw = tf.data.TFRecordDataset(str(path))
        records = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in raw]
        assert 1 <= len(records) <= 8
        request = records[0].predict_log.request
        assert request.model_spec.name == model
        req = json.loads((base / model / "4" / "assets.extra" / "requirements.json").read_text())
        assert set(request.inputs) == set(req["inputs"])
        # Each signature a client calls is run at load: the ranker's user-once one too.
        signatures = {r.predict_log.request.model_spec.signature_name for r in records}
        wanted = {"serving_default", "rank_candidates"} if model == "ranking" else {"serving_default"}
        assert signatures == wanted
    users = {tf.make_ndarray(r.predict_log.request.inputs["user_id"])[0] for r in records}
    assert len(users) > 1 and all(u.startswith(b"u") for u in users)

    # The retrieval model searches ScaNN's leaves with core ops (push.retrieval_index's default),
    # says it needs no custom ops, and its retrieve signature returns K ids.
    req = json.loads((base / "retrieval" / "4" / "assets.extra" / "requirements.json").read_text())
    assert req["retrieval_index"] == "partitioned" and req["custom_ops"] == []
    assert "stock tensorflow/serving" in req["server"] and req["scann"] is None
    assert (base / "retrieval" / "4" / "assets.extra" / "query_tower" / "saved_model.pb").is_file()
    retrieval = tf.saved_model.load(str(base / "retrieval" / "4"))
    assert {"serving_default", "retrieve", "embed"} <= set(retrieval.signatures)
    query = {
        "user_id": ["u001", "never-seen"], "age_bucket": ["25-34", ""], "country": ["US", ""],
        "recent_items": ["i01 i02", ""], "recent_item_ages": ["60 3600", ""],
        "hour": np.array([9, 21], dtype=np.int64), "device": ["mobile", ""],
    }
    out = retrieval.signatures["retrieve"](**{k: tf.constant(v) for k, v in query.items()})
    ids = out["item_ids"].numpy()
    catalog = set(pd.read_parquet(tiny_raw / "items")["item_id"])
    assert ids.shape == (2, 50) and {i.decode() for i in ids.ravel()} <= catalog
    assert np.all(np.diff(out["scores"].numpy(), axis=1) <= 1e-5)  # best first
    # item_rows index the version's item list: a client holding it need not receive strings.
    listed = json.loads((base / "retrieval" / "4" / "assets.extra" / "item_ids.json").read_text())
    assert "item_rows" in req["outputs"]
    assert [[listed[r] for r in row] for row in out["item_rows"].numpy()] == [
        [i.decode() for i in row] for row in ids
    ]

    ranking = tf.saved_model.load(str(base / "ranking" / "4"))
    rank_req = base / "ranking" / "4" / "assets.extra" / "requirements.json"
    rank_inputs = json.loads(rank_req.read_text())["inputs"]
    src = load_feature_source(FeaturesConfig(), tiny_raw, list(rank_inputs))
    pairs = feature_rows(src, rank_inputs, user_ids=["u001"] * 3, item_ids=["i01", "i02", "not-an-item"])
    scored = ranking.signatures["rank"](**{k: tf.constant(v) for k, v in pairs.items()})
    assert {"click", "engagement", "score"} <= set(scored) and scored["score"].shape == (3,)
    # rank_candidates: the same user given once ([1]) against the same 3 candidates.
    sides = json.loads(rank_req.read_text())["rank_candidates"]
    assert {"item_id", "category"} <= set(sides["item_inputs"]) and "user_id" in sides["user_inputs"]
    once = {k: tf.constant(v[:1] if k in sides["user_inputs"] else v) for k, v in pairs.items()}
    by_candidates = ranking.signatures["rank_candidates"](**once)
    np.testing.assert_allclose(by_candidates["score"].numpy(), scored["score"].numpy(), rtol=1e-4, atol=1e-5)

    # The model server runs signatures by their flat input list, straight into the graph's
    # inference function (not TF's keyword binding and tape checks), on tensors it builds
    # without tf.constant's layers: same outputs as the keyword call on tf.constant tensors,
    # for a signature with 26 inputs of three dtypes.
    from serving.model_server.servable import Servable, _tensor_maker

    tensor = _tensor_maker()
    for array, dtype in ((np.array([b"i01", b""], dtype=object), tf.string), (np.arange(3.0), tf.float64)):
        built = tensor(array, dtype)
        assert built.dtype == dtype and list(built.numpy()) == list(tf.constant(array, dtype=dtype).numpy())

    servable = Servable.load("ranking", 4, base / "ranking" / "4")
    assert {"rank", "rank_candidates"} <= set(servable._flat_calls)  # the graph called directly
    for signature, feeds, expected in (("rank", pairs, scored), ("rank_candidates", once, by_candidates)):
        arrays = {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v) for k, v in feeds.items()}
        arrays = {k: v.astype(object) if v.dtype.kind in "SU" else v for k, v in arrays.items()}
        _, served = servable.run(signature, arrays)
        for name in ("click", "engagement", "score"):
            np.testing.assert_allclose(served[name], expected[name].numpy(), rtol=1e-6)


def test_recommend_cli_writes_k_unseen_items_per_user(train_dir, scann_index, tiny_raw, tmp_path):
    from entrypoints.cli import app

    base = tmp_path / "models"
    push_models(PushConfig(), train_dir, scann_index, BLESSED, base, data_dir=tiny_raw)
    events = pd.read_parquet(tiny_raw / "events")
    busiest = events["user_id"].value_counts().index[0]  # has seen the most items
    users = tmp_path / "users.txt"
    users.write_text(f"u001\n{busiest}\n\nnot-a-known-user\n")
    out = tmp_path / "recs.jsonl"
    result = CliRunner().invoke(
        app,
        ["recommend", "--users", str(users), "--k", "7", "--out", str(out), "--data", str(tiny_raw),
         "--base-path", str(base)],
        env={"RECSYS_HOME": str(tmp_path / "home")},
    )
    assert result.exit_code == 0, result.output
    assert "ranking re-ranked" in result.output  # the ranking model re-ordered the retrieved candidates
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["user_id"] for r in lines] == ["u001", busiest, "not-a-known-user"]
    retrieval_only = tmp_path / "retrieval_only.jsonl"
    plain = CliRunner().invoke(
        app,
        ["recommend", "--users", str(users), "--k", "7", "--out", str(retrieval_only), "--data",
         str(tiny_raw), "--base-path", str(base), "--no-rank"],
        env={"RECSYS_HOME": str(tmp_path / "home")},
    )
    assert plain.exit_code == 0 and "retrieval order" in plain.output, plain.output
    lines += [json.loads(line) for line in retrieval_only.read_text().splitlines()]
    seen = events.groupby("user_id")["item_id"].agg(set)
    catalog = set(pd.read_parquet(tiny_raw / "items")["item_id"])
    for r in lines:
        assert len(r["items"]) == 7 == len(set(r["items"]))
        assert set(r["items"]) <= catalog
        assert not set(r["items"]) & seen.get(r["user_id"], set())


def test_push_carries_the_serving_policy_and_batch_recommend_follows_it(
    train_dir, scann_index, tiny_raw, tmp_path
):
    from entrypoints.cli import app
    from recsys.model_registry import version_for_label
    from recsys.ranking import ServingPolicy, read_serving_policy

    base = tmp_path / "models"
    # The evaluation left the ranker and MMR out: retrieval order alone serves.
    policy = {"retrieval_weight": None, "mmr": False, "rank_depth": 40, "reasons": ["the ranker lowered it"]}
    blessing = {**BLESSED, "serving_policy": policy}
    push_models(PushConfig(), train_dir, scann_index, blessing, base, data_dir=tiny_raw)
    version = version_for_label(base, "retrieval", "canary")
    assert read_serving_policy(base / "retrieval" / str(version)) == ServingPolicy(**policy)
    users = tmp_path / "users.txt"
    users.write_text("u001\nu002\nu003\n")
    outputs = {}
    for flag in ("--rank", "--no-rank"):
        out = tmp_path / f"recs{flag}.jsonl"
        result = CliRunner().invoke(
            app,
            ["recommend", "--users", str(users), "--k", "5", "--out", str(out), "--data", str(tiny_raw),
             "--base-path", str(base), "--label", "canary", flag],
            env={"RECSYS_HOME": str(tmp_path / "home")},
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "retrieval order" in result.output  # the policy keeps the ranker out even with --rank
        outputs[flag] = out.read_text()
    assert outputs["--rank"] == outputs["--no-rank"]


def test_batch_recommend_orders_by_a_pushed_category_taste_share(train_dir, scann_index, tiny_raw, tmp_path):
    from entrypoints.cli import app
    from recsys.contracts import category_set
    from recsys.ranking import category_taste

    base = tmp_path / "models"
    # The whole candidate score is the category taste; the ranker and MMR are not served.
    policy = {"retrieval_weight": None, "taste_weight": 1.0, "mmr": False, "rank_depth": 40}
    blessing = {**BLESSED, "serving_policy": policy}
    push_models(PushConfig(), train_dir, scann_index, blessing, base, data_dir=tiny_raw)
    source = load_feature_source(FeaturesConfig(), tiny_raw)
    recent_items = source.users["recent_items"]
    users = [u for u, r in recent_items.items() if isinstance(r, str) and r.strip()][:5]
    (tmp_path / "users.txt").write_text("\n".join(users) + "\n")
    out = tmp_path / "recs.jsonl"
    result = CliRunner().invoke(
        app,
        ["recommend", "--users", str(tmp_path / "users.txt"), "--k", "5", "--out", str(out),
         "--data", str(tiny_raw), "--base-path", str(base), "--label", "canary"],
        env={"RECSYS_HOME": str(tmp_path / "home")},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    categories = {str(i): category_set(c) for i, c in source.items["category"].items()}
    lifted = 0
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        recent = [categories[i] for i in recent_items[rec["user_id"]].split()]
        taste = category_taste([categories[i] for i in rec["items"]], recent).tolist()
        assert taste == sorted(taste, reverse=True), (rec, taste)  # best fit to the history first
        lifted += taste[0] > 0
    assert lifted == len(users)  # each list opens with an item in a category of the history


def test_recommend_serves_popularity_with_a_note_when_nothing_was_pushed(tiny_raw, tmp_path):
    from entrypoints.cli import app

    users = tmp_path / "users.txt"
    users.write_text("u001\nnot-a-known-user\n")
    out = tmp_path / "recs.jsonl"
    result = CliRunner().invoke(
        app,
        ["recommend", "--users", str(users), "--k", "4", "--out", str(out), "--data", str(tiny_raw),
         "--base-path", str(tmp_path / "never_pushed")],
        env={"RECSYS_HOME": str(tmp_path / "home")},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())  # the console wraps long lines
    assert "note:" in printed and "popularity fallback" in printed
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    from recsys.feature_schema import POSITIVE_EVENT_TYPES

    events = pd.read_parquet(tiny_raw / "events")
    seen = set(events.loc[events["user_id"] == "u001", "item_id"])
    counts = events[events["event_type"].isin(POSITIVE_EVENT_TYPES)]["item_id"].value_counts()
    assert [r["source"] for r in lines] == ["popularity", "popularity"]
    # Each list holds the most engaged-with items it may show (ties in any order): u001's
    # unseen ones; any for a user nobody knows.
    known, unknown = lines[0]["items"], lines[1]["items"]
    assert len(known) == 4 and not set(known) & seen
    unseen_counts = counts.drop(list(seen), errors="ignore")
    assert sorted(counts[known], reverse=True) == sorted(unseen_counts, reverse=True)[:4]
    assert sorted(counts[unknown], reverse=True) == sorted(counts, reverse=True)[:4]
