"""The sequential query tower: token order, windows, causality, and serving = training.

Small untrained models: what is checked is structure (which positions see which items, that
the serving path reads the same state training scores), not quality.
"""

from __future__ import annotations

import numpy as np
import pytest

from components.training.train import sequence_windows, use_legacy_keras

use_legacy_keras()

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from components.training.models import SequentialQueryTower, id_lookup, reverse_tokens  # noqa: E402
from components.training.sequence import CausalSequenceEncoder  # noqa: E402
from recsys.config import TrainingConfig  # noqa: E402

ITEMS = [f"i{n}" for n in range(10)]


def _tower(max_history: int = 4, dropout: float = 0.0) -> SequentialQueryTower:
    keras.utils.set_random_seed(0)
    lookup = id_lookup(ITEMS, 2, "item_lookup")
    return SequentialQueryTower(
        users=["u1", "u2"],
        item_lookup=lookup,
        history_table=keras.layers.Embedding(len(ITEMS) + 3, 8),
        profile_vocab={"age_bucket": ["18-24"], "country": ["US"], "device": ["web", "ios"]},
        embedding_dim=8,
        id_dim=8,
        feature_dim=4,
        hidden_units=[16],
        num_oov=2,
        id_dropout=0.0,
        max_history=max_history,
        normalize=True,
        layers=2,
        heads=2,
        dropout=dropout,
        item_bias=True,
        item_categories={i: ("even" if int(i[1:]) % 2 == 0 else "odd") for i in ITEMS},
        categories=["even", "odd"],
    )


def test_recent_items_newest_first_become_oldest_first_right_padded() -> None:
    tokens, counts = reverse_tokens(tf.constant(["c b a", "", "z y x w v"]), max_len=3)
    # The newest max_len are kept (v and w of the last row fall off), then read forwards.
    assert tokens.numpy().astype(str).tolist() == [["a", "b", "c"], ["", "", ""], ["x", "y", "z"]]
    assert counts.numpy().tolist() == [3, 0, 3]


def test_sequences_are_cut_from_the_newest_backwards_and_unscored_windows_dropped() -> None:
    users = np.array(["u1"] * 5 + ["u2"] * 2)
    scored = np.array([True] * 5 + [False, False])
    windows = sequence_windows(users, scored, length=3)
    # u1's five rows: the newest window is full (2, 3, 4), the oldest right-padded (0, 1);
    # u2 has no scored row, so no window.
    assert windows.tolist() == [[2, 3, 4], [0, 1, -1]]


def test_a_position_never_sees_the_items_after_it() -> None:
    keras.utils.set_random_seed(0)
    encoder = CausalSequenceEncoder(max_length=5, dim=8, layers=2, heads=2, dropout=0.0)
    x = tf.random.normal([1, 5, 8])
    changed_tail = tf.concat([x[:, :3], tf.random.normal([1, 2, 8])], axis=1)
    before, after = encoder(x).numpy(), encoder(changed_tail).numpy()
    np.testing.assert_allclose(before[:, :3], after[:, :3], atol=1e-5)
    # ...and the positions that do see the change move (the check above could not fail otherwise).
    assert np.abs(before[:, 3:] - after[:, 3:]).max() > 1e-3


def test_the_served_query_is_the_training_query_after_the_same_items() -> None:
    tower = _tower(max_history=4)
    # Training: one window of five targets i1..i5; position t reads the t items before it.
    training = {
        "user_id": tf.constant(["u1"]),
        "age_bucket": tf.constant(["18-24"]),
        "country": tf.constant(["US"]),
        "sequence_items": tf.constant([["i1", "i2", "i3", "i4"]]),
        "hour": tf.constant([[1, 2, 3, 4, 5]], tf.int64),
        "device": tf.constant([["web", "ios", "web", "ios", "web"]]),
    }
    per_position = tower.encode_positions(training).numpy()[0]
    # Serving: recent_items newest first, context of the request being answered.
    for n in range(5):
        recent = " ".join(f"i{k}" for k in range(n, 0, -1))
        served = tower(
            {
                "user_id": tf.constant(["u1"]),
                "age_bucket": tf.constant(["18-24"]),
                "country": tf.constant(["US"]),
                "recent_items": tf.constant([recent]),
                "hour": tf.constant([n + 1], tf.int64),
                "device": tf.constant([["web", "ios"][n % 2]]),
            }
        ).numpy()[0]
        np.testing.assert_allclose(served, per_position[n], atol=1e-5)


def test_order_of_the_recent_items_changes_the_query() -> None:
    tower = _tower()
    base = {"user_id": tf.constant(["u1", "u1"]), "hour": tf.constant([3, 3], tf.int64)}
    base |= {"age_bucket": tf.constant(["18-24"] * 2), "country": tf.constant(["US"] * 2)}
    base |= {"device": tf.constant(["web"] * 2)}
    out = tower({**base, "recent_items": tf.constant(["i1 i2 i3", "i3 i2 i1"])}).numpy()
    # A bag of the same three items would give one query; a sequence gives two.
    assert np.abs(out[0] - out[1]).max() > 1e-3


def test_an_empty_history_still_gets_a_query_from_profile_and_context() -> None:
    tower = _tower()
    out = tower(
        {
            "user_id": tf.constant(["brand-new"]),
            "age_bucket": tf.constant([""]),
            "country": tf.constant([""]),
            "recent_items": tf.constant([""]),
            "hour": tf.constant([0], tf.int64),
            "device": tf.constant([""]),
        }
    ).numpy()
    assert out.shape == (1, 9)  # embedding_dim 8 + the item-bias coordinate
    assert np.isfinite(out).all()


def test_heads_must_divide_the_id_width() -> None:
    with pytest.raises(ValueError, match="sequence_heads=3 must divide id_dim=64"):
        TrainingConfig(query_tower="sequential", sequence_heads=3, id_dim=64)


def test_the_sequential_tower_and_mixed_negatives_are_chosen_by_config() -> None:
    config = TrainingConfig.model_validate({"query_tower": "sequential", "negatives": "mixed"})
    assert (config.query_tower, config.negatives, config.uniform_negatives) == ("sequential", "mixed", 256)
    with pytest.raises(ValueError, match="query_tower"):
        TrainingConfig.model_validate({"query_tower": "transformer"})
