"""The ranker's position input: learned from logged ranks in training, held fixed at serving."""

from __future__ import annotations

import numpy as np
import pytest

from components.training.train import use_legacy_keras


@pytest.fixture(scope="module")
def trained_on_position_clicks():
    """A ranker fitted where clicks depend on the rank shown at and on nothing else."""
    use_legacy_keras()
    import tensorflow as tf
    import tf_keras as keras

    from components.training.models import MultiObjectiveRanker

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    n, items = 6000, [f"i{k}" for k in range(30)]
    rank = rng.integers(0, 10, size=n)
    rank[rng.random(n) < 0.1] = -1  # ranks not logged: read no bias
    click_rate = np.where(rank == 0, 0.6, np.where(rank < 0, 0.3, 0.05))
    clicked = (rng.random(n) < click_rate).astype(np.float32)
    features = {
        "user_id": np.array([f"u{k}" for k in rng.integers(0, 50, size=n)], dtype=object),
        "recent_items": np.array([""] * n, dtype=object),
        "hour": rng.integers(0, 24, size=n).astype(np.int64),
        "item_id": np.array(items, dtype=object)[rng.integers(0, len(items), size=n)],
        "category": np.array(["c"] * n, dtype=object),
        "position": rank.astype(np.int64),
        "label_click": clicked,
    }
    model = MultiObjectiveRanker(
        users=[f"u{k}" for k in range(50)], items=items, categories=["c"], profile_vocab={},
        numeric_features=[], numeric_normalizer=None, objective_weights={"click": 1.0}, id_dim=8,
        feature_dim=4, hidden_units=[16], num_oov=2, id_dropout=0.0, max_history=5,
        position_buckets=5, serving_position=0,
    )  # fmt: skip
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=0.05))
    model.fit(tf.data.Dataset.from_tensor_slices(features).batch(256), epochs=4, verbose=0)
    return model, features


def test_the_bias_learns_that_the_top_rank_is_clicked_more(trained_on_position_clicks):
    model, _ = trained_on_position_clicks
    bias = model.position_bias.numpy()[:, 0]  # row 0: rank not logged
    assert bias[0] == 0.0
    assert bias[1] > bias[4] + 1.0  # rank 0 far above rank 3
    assert abs(bias[4] - bias[5]) < 0.5  # ranks 3 and 9 (the shared last bucket) alike


def test_scores_without_a_position_are_those_at_the_serving_position(trained_on_position_clicks):
    model, features = trained_on_position_clicks
    batch = {k: v[:64] for k, v in features.items() if not k.startswith("label_")}
    served = model({k: v for k, v in batch.items() if k != "position"})["click"].numpy()
    at_top = model({**batch, "position": np.zeros(64, np.int64)})["click"].numpy()
    at_five = model({**batch, "position": np.full(64, 5, np.int64)})["click"].numpy()
    np.testing.assert_allclose(served, at_top, rtol=1e-5)
    assert (at_top > at_five).all()
    user = {k: batch[k][:1] for k in ("user_id", "recent_items", "hour")}
    candidates = {k: batch[k] for k in ("item_id", "category")}
    one_user = model.score_candidates(user, candidates)["click"].numpy()
    same_user = model({**{k: np.repeat(v, 64) for k, v in user.items()}, **candidates})["click"].numpy()
    np.testing.assert_allclose(one_user, same_user, rtol=1e-4)
