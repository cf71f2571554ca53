"""Training and evaluation on tiny generated data, through the real feature layer (Feast).

One session-scoped run (generate -> feature tables -> `feast apply` -> point-in-time training
frame -> train both models -> evaluate) is shared by the tests, which then check the output
contract that indexing, push and the gateway read, the content path of the candidate tower,
the quality against popularity, and the gate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from components.evaluation.evaluate import evaluate, gate, time_split
from components.sources.synthetic import CATEGORY_WORDS, generate_to_folder
from components.training.train import (
    candidate_features_from_frame,
    features_from_frame,
    load_signature,
    query_features_from_frame,
    train_models,
)
from recsys.config import EvaluationConfig, TrainingConfig, load_settings
from tests.support.tiny_data import tiny_params

pytestmark = pytest.mark.integration

HOLDOUT_DAYS = 3
# Users need a few weeks of history each for their taste to show over popularity: few users,
# many events per user. The feature layer takes ~20 s on this, training ~15 s.
DATA = dict(users=400, items=300, days=21, events_per_user_day=10.0)
NEW_CATEGORIES = ("sports", "books", "music", "pets", "garden")
TRAINING = dict(batch_size=128, epochs=20, early_stopping_patience=3, ranker_epochs=6)


def _new_items(items: pd.DataFrame) -> pd.DataFrame:
    """Items published after the data ends: text from their category's words, ids never seen."""
    rng = np.random.default_rng(0)
    rows = []
    for n, cat in enumerate(NEW_CATEGORIES):
        words = list(rng.choice(CATEGORY_WORDS[cat], size=8))
        rows.append(
            {
                "item_id": f"new{n}",
                "title": " ".join(w.title() for w in words[:3]),
                "category": cat,
                "description": " ".join(words),
                "in_stock": True,
                "published_ts": items["published_ts"].max() + pd.Timedelta(days=1),
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from components.features.store import apply_feature_repo
    from components.features.tables import build_feature_tables
    from components.features.training_data import build_training_data
    from recsys.layout import features_dir

    base = tmp_path_factory.mktemp("training")
    raw = base / "raw"
    generate_to_folder(tiny_params(**DATA), raw)
    settings = load_settings(overrides={"home": str(base / "home")})
    build_feature_tables(settings.features, raw, features_dir(settings))
    apply_feature_repo(settings)
    frame = build_training_data(settings, raw)
    items = pd.read_parquet(raw / "items")
    catalog = pd.concat([items, _new_items(items)], ignore_index=True)
    train, holdout = time_split(frame, HOLDOUT_DAYS)
    train_dir = base / "train"
    manifest = train_models(TrainingConfig(**TRAINING), train, catalog, train_dir, log=print)
    eval_config = EvaluationConfig(holdout_days=HOLDOUT_DAYS)
    # The generator wrote its truth beside the data: the served system is also scored on it.
    evaluation = evaluate(
        eval_config, train_dir, train, holdout, catalog, base / "eval", log=print, truth_data=raw
    )
    return {
        "base": base,
        "frame": frame,
        "train": train,
        "holdout": holdout,
        "catalog": catalog,
        "train_dir": train_dir,
        "manifest": manifest,
        "eval_config": eval_config,
        "evaluation": evaluation,
    }


def _call(signature: Any, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import tensorflow as tf

    return {k: v.numpy() for k, v in signature(**{k: tf.constant(v) for k, v in arrays.items()}).items()}


def test_manifest_is_written_last_and_complete(trained):
    m = json.loads((trained["train_dir"] / "manifest.json").read_text())
    for key in (
        "step",
        "path",
        "embedding_dim",
        "query_inputs",
        "candidate_inputs",
        "ranker_inputs",
        "objectives",
        "objective_weights",
        "metrics",
        "examples",
        "seed",
        "code_version",
    ):
        assert key in m, key
    assert m["step"] == "train"
    assert m["objectives"] == ["click", "engagement"]
    assert m["objective_weights"] == {"click": 1.0, "engagement": 0.5}
    assert m["examples"]["ranker_source"] == "impressions"
    assert np.isfinite(m["metrics"]["retriever_val_loss"]) and np.isfinite(m["metrics"]["ranker_val_loss"])
    # Numeric ranker inputs are the feature layer's names, as float32.
    assert m["ranker_inputs"]["item_ctr_7d"] == "float32"
    assert m["query_inputs"]["hour"] == "int64"


def test_towers_load_and_return_embeddings_of_dimension_d(trained):
    m, rows = trained["manifest"], trained["holdout"].head(7)
    d = m["embedding_dim"]
    query = load_signature(trained["train_dir"] / "query_tower")
    out = _call(query, query_features_from_frame(rows))
    assert set(out) == {"embedding"}
    assert out["embedding"].shape == (7, d) and out["embedding"].dtype == np.float32
    # A user id the model never saw, with no history, still gets a finite embedding.
    stranger = rows.head(1).assign(user_id="nobody-ever", recent_items="")
    assert np.isfinite(_call(query, query_features_from_frame(stranger))["embedding"]).all()
    candidate = load_signature(trained["train_dir"] / "candidate_tower")
    out = _call(candidate, candidate_features_from_frame(trained["catalog"].head(5)))
    assert out["embedding"].shape == (5, d)


def test_ranker_returns_one_score_per_objective_and_the_combination(trained):
    m = trained["manifest"]
    ranker = load_signature(trained["train_dir"] / "ranker")
    out = _call(ranker, features_from_frame(trained["holdout"].head(6), m["ranker_inputs"]))
    assert set(out) == {"click", "engagement", "score"}
    for v in out.values():
        assert v.shape == (6,) and v.dtype == np.float32
    expected = sum(w * out[k] for k, w in m["objective_weights"].items())
    np.testing.assert_allclose(out["score"], expected, rtol=1e-5)


def test_rank_candidates_scores_one_user_like_pair_rows(trained):
    """The user-once signature is the same function as the pair rows, not an approximation."""
    import tensorflow as tf

    m = trained["manifest"]
    loaded = tf.saved_model.load(str(trained["train_dir"] / "ranker"))
    # 40 holdout rows (their items, with their item features) all for the first row's user.
    columns = features_from_frame(trained["holdout"].head(40), m["ranker_inputs"])
    for name, values in columns.items():
        if not (name in ("item_id", "category") or name.startswith("item_")):
            values[:] = values[0]
    by_pairs = _call(load_signature(trained["train_dir"] / "ranker"), columns)

    sig = loaded.signatures["rank_candidates"]
    shapes = sig.structured_input_signature[1]
    feeds = {k: tf.constant(v[:1] if shapes[k].shape.as_list() == [1] else v) for k, v in columns.items()}
    assert {k for k, sp in shapes.items() if sp.shape.as_list() != [1]} >= {"item_id", "category"}
    by_candidates = {k: v.numpy() for k, v in sig(**feeds).items()}
    assert set(by_candidates) == set(by_pairs)
    for k in by_pairs:
        assert by_candidates[k].shape == (40,)
        np.testing.assert_allclose(by_candidates[k], by_pairs[k], rtol=1e-4, atol=1e-5)
    # And the scores vary across candidates (the item side is really per row).
    assert np.ptp(by_candidates["score"]) > 0


def test_item_embeddings_cover_the_whole_catalog(trained):
    emb = pd.read_parquet(trained["train_dir"] / "item_embeddings.parquet")
    catalog_ids = set(trained["catalog"]["item_id"].astype(str))
    assert set(emb["item_id"]) == catalog_ids and len(emb) == len(catalog_ids)
    touched = set(trained["train"]["item_id"].astype(str))
    assert catalog_ids - touched, "the catalog should hold items no event touched"
    lengths = emb["embedding"].map(len)
    assert (lengths == trained["manifest"]["embedding_dim"]).all()


def test_new_items_land_near_their_category(trained):
    """The content path: an item nobody touched is closer to its category's items than to others."""
    emb = pd.read_parquet(trained["train_dir"] / "item_embeddings.parquet").set_index("item_id")
    vectors = np.stack(emb["embedding"].to_numpy())
    d = trained["manifest"]["embedding_dim"]
    # Compare directions without the item-prior coordinate (the last one when item_bias is on).
    vectors = vectors[:, : TrainingConfig().embedding_dim] if d > TrainingConfig().embedding_dim else vectors
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    index = {item: i for i, item in enumerate(emb.index)}
    primary = trained["catalog"].set_index("item_id")["category"].astype(str).str.split("|").str[0]
    old = [i for i in emb.index if not i.startswith("new")]
    gaps = []
    for n, cat in enumerate(NEW_CATEGORIES):
        v = vectors[index[f"new{n}"]]
        same = [vectors[index[i]] @ v for i in old if primary[i] == cat]
        other = [vectors[index[i]] @ v for i in old if primary[i] != cat]
        gaps.append(np.mean(same) - np.mean(other))
    assert np.mean(gaps) > 0.05, gaps
    assert sum(g > 0 for g in gaps) >= len(gaps) - 1, gaps


def test_retriever_beats_popularity_on_the_holdout(trained):
    metrics = json.loads((trained["base"] / "eval" / "metrics.json").read_text())
    models = metrics["models"]
    assert models["retriever"]["all"]["users"] > 100
    assert models["retriever"]["all"]["recall@50"] > models["popularity"]["all"]["recall@50"]
    # The ranker's own check: it tells clicked from skipped impressions better than chance.
    assert metrics["ranker"]["click_auc"] > 0.55
    # Every slice is reported, for every system.
    for model in ("served", "retriever", "retriever_ranker", "popularity"):
        assert set(models[model]) == {"all", "new_users", "new_items", "heavy_users"}


def test_the_gate_reads_the_served_system_with_its_policy_steps_and_reward(trained):
    out = trained["base"] / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    blessing = json.loads((out / "blessing.json").read_text())
    assert blessing["model"] == "served"
    assert blessing["candidate"] == pytest.approx(metrics["models"]["served"]["all"]["ndcg@10"])
    # The serving policy: chosen on validation (never the holdout), pushed with the blessing.
    policy = metrics["serving_policy"]
    assert blessing["serving_policy"] == policy
    grid = policy["validation"]["grid"]
    assert [row["weight"] for row in grid] == ["0", "0.5", "1", "2", "4", "retrieval only"]
    chosen = "retrieval only" if policy["retrieval_weight"] is None else f"{policy['retrieval_weight']:g}"
    chosen_row = next(row for row in grid if row["weight"] == chosen)
    # Synthetic data carries the generator's truth, which judges (evaluation.judge): the
    # weight with the best validation expected reward serves, unless it lowered the reward of
    # a simulated session (then retrieval order serves).
    session = policy["validation"]["session"]
    best_row = max(grid, key=lambda row: (row["expected_reward"], row["weight"] == "retrieval only"))
    if any(r.startswith("the ranker is not served: over a simulated session") for r in policy["reasons"]):
        assert chosen == "retrieval only" and best_row["weight"] == session["weight"] != chosen
        assert np.mean(session["with_ranker"]) < np.mean(session["retrieval_order"])
    else:
        assert chosen_row["expected_reward"] == best_row["expected_reward"]
    assert policy["validation"]["users"] > 0 and "training part" in policy["validation"]["split"]
    # Each step is measured; the last served one is the served system itself.
    steps = {row["step"]: row for row in metrics["steps"]}
    assert list(steps) == ["retrieval", "neighbours", "category taste", "ranker", "mmr", "exploration"]
    # The item-to-item source's share was chosen on the same validation split, by the truth.
    shares = policy["validation"]["neighbour_grid"]
    assert [row["neighbour_weight"] for row in shares] == [0.0, 0.25, 0.5, 0.75, 1.0]
    served_share = next(row for row in shares if row["neighbour_weight"] == policy["neighbour_weight"])
    assert served_share["expected_reward"] == max(row["expected_reward"] for row in shares)
    assert steps["neighbours"]["served"] == (policy["neighbour_weight"] > 0)
    # Then the category taste's share, on the chosen neighbour share, by the truth too.
    tastes = policy["validation"]["taste_grid"]
    assert [row["taste_weight"] for row in tastes] == [0.0, 0.25, 0.5, 0.75, 1.0]
    served_taste = next(row for row in tastes if row["taste_weight"] == policy["taste_weight"])
    assert served_taste["expected_reward"] == max(row["expected_reward"] for row in tastes)
    assert steps["category taste"]["served"] == (policy["taste_weight"] > 0)
    assert (trained["base"] / "train" / "item_neighbours.npz").is_file()
    assert steps["exploration"]["ndcg@10"] == pytest.approx(metrics["models"]["served"]["all"]["ndcg@10"])
    assert steps["ranker"]["served"] == (policy["retrieval_weight"] is not None)
    # The ranker was also played against retrieval order over simulated sessions, each request
    # retrieving and ranking again after the simulated user's clicks and passes.
    requests = trained["eval_config"].session_requests
    assert session["requests"] == requests and requests > 1
    assert len(session["with_ranker"]) == len(session["retrieval_order"]) == requests
    assert all(0 <= r <= 1.5 for r in [*session["with_ranker"], *session["retrieval_order"]])
    assert session["with_ranker"] != session["retrieval_order"]
    assert any("simulated session" in r for r in policy["reasons"])
    # The generator's truth scores every system; the gate read it.
    reward = metrics["reward"]
    assert reward["available"] and set(reward["systems"]) == {
        "served",
        "retriever",
        "retriever_ranker",
        "popularity",
    }
    assert "expected reward" in blessing["reason"]
    assert steps["exploration"]["expected_reward"] == pytest.approx(reward["systems"]["served"])
    # The ranker's objectives: AUC beside popularity's, calibration with its reliability bins.
    calibration = metrics["ranker"]["calibration"]
    assert 0 < calibration["mean_predicted"] < 1 and 0 < calibration["observed_rate"] < 1
    assert sum(b["count"] for b in calibration["bins"]) == metrics["ranker"]["examples"]
    html = (out / "report.html").read_text()
    sections = ("Serving policy", "Simulated session", "What each step contributes", "Ranker objectives")
    for section in (*sections, "Simulated reward"):
        assert section in html, section
    assert (out / "reliability.png").is_file()
    assert metrics["split"]["used"] == "time" and metrics["split"]["decides"]


def test_evaluation_writes_report_blessing_and_manifest(trained):
    out = trained["base"] / "eval"
    for name in ("metrics.json", "blessing.json", "report.html", "manifest.json", "metrics_all.png"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "popularity" in html
    blessing = json.loads((out / "blessing.json").read_text())
    assert blessing["blessed"] == trained["evaluation"]["blessed"]
    assert {"reason", "candidate", "popularity", "metric", "margin"} <= set(blessing)


def test_gate_refuses_a_model_worse_than_serving_beyond_the_margin(trained, tmp_path: Path):
    config = trained["eval_config"]
    metrics = json.loads((trained["base"] / "eval" / "metrics.json").read_text())
    serving = json.loads(json.dumps(metrics))
    current = metrics["models"][config.gate_model]["all"][config.gate_metric]
    serving["models"][config.gate_model]["all"][config.gate_metric] = current + config.gate_margin + 0.01
    # Where the truth judges, the serving model is compared on expected reward: ahead on it too.
    reward = metrics["reward"]["systems"][config.gate_model]
    serving["reward"]["systems"][config.gate_model] = reward / (1 - config.gate_reward_margin) + 0.01
    serving_path = tmp_path / "serving_metrics.json"
    serving_path.write_text(json.dumps(serving))
    manifest = evaluate(
        config,
        trained["train_dir"],
        trained["train"],
        trained["holdout"],
        trained["catalog"],
        tmp_path / "eval",
        serving_metrics=serving_path,
        log=print,
        truth_data=trained["base"] / "raw",  # the same judge as the first evaluation
    )
    assert not manifest["blessed"]
    assert "beyond the margin" in json.loads((tmp_path / "eval" / "blessing.json").read_text())["reason"]
    # Within the margin the serving comparison passes (the popularity condition still applies).
    serving["models"][config.gate_model]["all"][config.gate_metric] = current + config.gate_margin / 2
    serving["reward"]["systems"][config.gate_model] = reward
    assert "within" in gate(config, metrics, serving)["reason"]


def test_gate_refuses_a_model_that_loses_to_popularity(trained):
    config = trained["eval_config"]
    metrics = json.loads((trained["base"] / "eval" / "metrics.json").read_text())
    current = metrics["models"][config.gate_model]["all"][config.gate_metric]
    metrics["models"]["popularity"]["all"][config.gate_metric] = current + 0.01
    by_metric = gate(config.model_copy(update={"judge": "metric"}), metrics)
    assert not by_metric["blessed"] and "does not beat popularity" in by_metric["reason"]
    # Where the generator's truth judges, popularity must lose on expected reward.
    rewards = metrics["reward"]["systems"]
    rewards["popularity"] = rewards[config.gate_model] + 0.01
    by_truth = gate(config, metrics)
    assert not by_truth["blessed"] and "does not beat popularity's" in by_truth["reason"]
