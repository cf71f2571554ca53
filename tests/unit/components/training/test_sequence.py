"""The sequential query tower: token order, windows, causality, and serving = training.

Small untrained models: what is checked is structure (which positions see which items, that
the serving path reads the same state training scores), not quality.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from components.training.train import sequence_windows, use_legacy_keras

use_legacy_keras()

import tensorflow as tf  # noqa: E402
import tf_keras as keras  # noqa: E402

from components.training.models import (  # noqa: E402
    AGE_BUCKETS,
    SequentialQueryTower,
    age_buckets,
    id_lookup,
    parse_ages,
    prefix_means,
    reverse_tokens,
    reverse_within,
    serving_ages,
    training_ages,
)
from components.training.sequence import CausalSequenceEncoder  # noqa: E402
from recsys.config import TrainingConfig  # noqa: E402

ITEMS = [f"i{n}" for n in range(10)]


def _tower(max_history: int = 4, dropout: float = 0.0, history_mean: bool = False) -> SequentialQueryTower:
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
        history_mean=history_mean,
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


def test_sequence_examples_carry_each_events_time_for_the_ages() -> None:
    from components.training.train import _Catalog, _Vocabulary, sequence_examples

    ts = pd.to_datetime(["2026-01-01 00:00", "2026-01-01 01:00", "2026-01-02 00:00"], utc=True)
    positives = pd.DataFrame(
        {
            "event_id": ["e1", "e2", "e3"],
            "user_id": "u1",
            "item_id": ["i1", "i2", "i3"],
            "event_type": "click",
            "ts": ts,
            "hour": 0,
            "device": "web",
            "recent_items": ["", "i1", "i2 i1"],
            "recent_item_ages": ["", "3600", "82800 86400"],
        }
    )
    items = pd.DataFrame({"item_id": ITEMS, "title": ITEMS, "category": "even", "description": ""})
    catalog = _Catalog.of(items)
    arrays = sequence_examples(positives, np.ones(3, bool), catalog, _Vocabulary.of(positives, positives), 3)
    seconds = [int(t.timestamp()) for t in ts]
    # One window of 4 positions: the three events' times, then padding (-1: not known).
    assert arrays["event_time"].tolist() == [[*seconds, -1]]
    assert arrays["sequence_items"].astype(str).tolist() == [["i1", "i2", "i3"]]
    # The stored ages are not an input here: the tower measures them from event_time.
    assert "recent_item_ages" not in arrays and "recent_items" not in arrays


def _learned_age_biases(layer: keras.layers.Layer, seed: int = 0) -> None:
    """Give every attention block's age-bias table values, as training would (they start at 0)."""
    rng = np.random.default_rng(seed)
    for weight in layer.weights:
        if "age_bias" in weight.name:
            weight.assign(rng.normal(0.0, 1.0, weight.shape).astype(np.float32))


def test_a_position_never_sees_the_items_after_it() -> None:
    keras.utils.set_random_seed(0)
    encoder = CausalSequenceEncoder(max_length=5, dim=8, layers=2, heads=2, dropout=0.0, age_buckets=4)
    x = tf.random.normal([1, 5, 8])
    ages = tf.constant(np.tril(np.random.default_rng(1).integers(0, 5, [1, 5, 5])), tf.int32)
    encoder(x, ages)
    _learned_age_biases(encoder)
    changed_tail = tf.concat([x[:, :3], tf.random.normal([1, 2, 8])], axis=1)
    before, after = encoder(x, ages).numpy(), encoder(changed_tail, ages).numpy()
    np.testing.assert_allclose(before[:, :3], after[:, :3], atol=1e-5)
    # ...and the positions that do see the change move (the check above could not fail otherwise).
    assert np.abs(before[:, 3:] - after[:, 3:]).max() > 1e-3


def test_an_age_bias_on_one_key_moves_only_the_positions_that_see_it() -> None:
    keras.utils.set_random_seed(0)
    encoder = CausalSequenceEncoder(max_length=5, dim=8, layers=2, heads=2, dropout=0.0, age_buckets=4)
    x = tf.random.normal([1, 5, 8])
    unknown = tf.zeros([1, 5, 5], tf.int32)
    plain = encoder(x).numpy()
    # Bucket 0 (not known) adds nothing, and the learned rows start at zero: plain SASRec.
    np.testing.assert_allclose(encoder(x, unknown).numpy(), plain, atol=1e-6)
    _learned_age_biases(encoder)
    np.testing.assert_allclose(encoder(x, unknown).numpy(), plain, atol=1e-6)
    # Key 2 gets an age in the rows that can attend to it (2, 3, 4).
    key_two = np.zeros([1, 5, 5], np.int32)
    key_two[0, 2:, 2] = 3
    aged = encoder(x, tf.constant(key_two)).numpy()
    np.testing.assert_allclose(aged[:, :2], plain[:, :2], atol=1e-6)
    assert np.abs(aged[:, 2:] - plain[:, 2:]).max(axis=-1).min() > 1e-4


@pytest.mark.parametrize("history_mean", [False, True])
def test_the_served_query_is_the_training_query_after_the_same_items(history_mean: bool) -> None:
    tower = _tower(max_history=4, history_mean=history_mean)
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


def test_the_served_query_with_ages_is_the_training_query_at_the_same_time() -> None:
    tower = _tower(max_history=4)
    # Five events over four days: the items' ages differ for each later position.
    times = [1_000_000, 1_000_000 + 600, 1_000_000 + 7_200, 1_000_000 + 90_000, 1_000_000 + 360_000]
    training = {
        "user_id": tf.constant(["u1"]),
        "age_bucket": tf.constant(["18-24"]),
        "country": tf.constant(["US"]),
        "sequence_items": tf.constant([["i1", "i2", "i3", "i4"]]),
        "hour": tf.constant([[1, 2, 3, 4, 5]], tf.int64),
        "device": tf.constant([["web", "ios", "web", "ios", "web"]]),
        "event_time": tf.constant([times], tf.int64),
    }
    per_position = tower.encode_positions(training).numpy()[0]
    for n in range(5):
        # The request comes at event n's time; the gateway measures each item's age from it.
        recent = " ".join(f"i{k}" for k in range(n, 0, -1))
        ages = " ".join(str(times[n] - times[k - 1]) for k in range(n, 0, -1))
        served = tower(
            {
                "user_id": tf.constant(["u1"]),
                "age_bucket": tf.constant(["18-24"]),
                "country": tf.constant(["US"]),
                "recent_items": tf.constant([recent]),
                "recent_item_ages": tf.constant([ages]),
                "hour": tf.constant([n + 1], tf.int64),
                "device": tf.constant([["web", "ios"][n % 2]]),
            }
        ).numpy()[0]
        np.testing.assert_allclose(served, per_position[n], atol=1e-5)


def test_prefix_means_average_the_items_read_so_far() -> None:
    vectors = tf.constant([[[2.0, 0.0], [0.0, 4.0], [1.0, 1.0]]])
    out = prefix_means(vectors).numpy()[0]
    np.testing.assert_allclose(out, [[0, 0], [2, 0], [1, 2], [1, 5 / 3]], atol=1e-6)


def test_the_history_mean_follows_the_state_whatever_the_order() -> None:
    plain, with_mean = _tower(), _tower(history_mean=True)
    base = {
        "user_id": tf.constant(["u1"]),
        "age_bucket": tf.constant(["18-24"]),
        "country": tf.constant(["US"]),
        "hour": tf.constant([3], tf.int64),
        "device": tf.constant(["web"]),
    }
    query = with_mean({**base, "recent_items": tf.constant(["i3 i2 i1"])}).numpy()
    # Its state after the items is the plain tower's followed by their mean, whatever the order.
    items = tf.constant([["i1", "i2", "i3"]])
    states = with_mean._states(with_mean._item_vectors(items), None, False).numpy()[0, -1]
    width = states.shape[-1] // 2
    mean = with_mean._item_vectors(items).numpy()[0].mean(axis=0)
    np.testing.assert_allclose(states[width:], mean, atol=1e-6)
    reordered = with_mean._states(with_mean._item_vectors(tf.constant([["i3", "i1", "i2"]])), None, False)
    np.testing.assert_allclose(reordered.numpy()[0, -1, width:], mean, atol=1e-6)
    # The query the index and the gateway see keeps its width: only the head's input grows.
    assert query.shape == plain({**base, "recent_items": tf.constant(["i3 i2 i1"])}).numpy().shape


def test_training_ages_are_measured_from_each_positions_own_event() -> None:
    ages = training_ages(tf.constant([[100, 200, 400, 1000]], tf.int64)).numpy()[0]
    # Row j predicts event j and has read the start token (column 0, no time) and items
    # 0..j-1 (columns 1..j), aged from event j's time; later columns are unknown (-1).
    assert ages.tolist() == [
        [-1, -1, -1, -1],
        [-1, 100, -1, -1],
        [-1, 300, 200, -1],
        [-1, 900, 800, 600],
    ]


def test_serving_ages_are_differences_of_the_requests_ages() -> None:
    # Three items oldest first, 900, 800 and 600 s before the request; a fourth slot unused.
    ages = serving_ages(tf.constant([[900.0, 800.0, 600.0, -1.0]]), tf.constant([3])).numpy()[0]
    # The query row (3) reads the given ages; row 2 predicted the newest item, so its ages are
    # measured from it (900 - 600, 800 - 600); row 1 from the second (900 - 800).
    assert ages.tolist() == [
        [-1, -1, -1, -1, -1],
        [-1, 100, -1, -1, -1],
        [-1, 300, 200, -1, -1],
        [-1, 900, 800, 600, -1],
        [-1, -1, -1, -1, -1],
    ]


def test_training_and_serving_age_the_same_window_alike() -> None:
    rng = np.random.default_rng(3)
    max_history = 6
    for _ in range(20):
        n = int(rng.integers(0, max_history + 1))  # items read before the request
        times = np.sort(rng.integers(1_700_000_000, 1_800_000_000, max_history + 1))
        times[rng.random(max_history + 1) < 0.2] = -1  # some items' times not known
        request = int(times.max()) + int(rng.integers(0, 10**6))
        times[n] = request  # the event position n predicts: the request
        train = training_ages(tf.constant([times], tf.int64)).numpy()[0]
        served_ages = [float(request - t) if t >= 0 else -1.0 for t in times[:n]] + [-1.0] * (max_history - n)
        served = serving_ages(tf.constant([served_ages], tf.float64), tf.constant([n])).numpy()[0]
        # Rows up to the query row are what the served state reads; the rest is unknown there.
        np.testing.assert_array_equal(served[: n + 1], train[: n + 1])
        assert (served[n + 1 :] == -1).all()
        # Never a later item, never the start token; an item without a time is unknown in
        # every row, and so is the row that predicted it.
        assert (served[np.triu_indices(max_history + 1, 1)] == -1).all() and (served[:, 0] == -1).all()
        for i in np.flatnonzero(times[:n] < 0):
            assert (served[:, i + 1] == -1).all() and (served[i] == -1).all()


def test_a_position_reads_ages_from_its_own_event_and_never_a_later_ones_time() -> None:
    tower = _tower(max_history=3)
    base = {
        "user_id": tf.constant(["u1"]),
        "age_bucket": tf.constant(["18-24"]),
        "country": tf.constant(["US"]),
        "sequence_items": tf.constant([["i1", "i2", "i3"]]),
        "hour": tf.constant([[1, 1, 1, 1]], tf.int64),
        "device": tf.constant([["web"] * 4]),
    }
    tower.encode_positions(base)  # built, then given age biases
    _learned_age_biases(tower.encoder)
    days = 86_400
    before = tower.encode_positions(
        {**base, "event_time": tf.constant([[0, days, 2 * days, 3 * days]], tf.int64)}
    ).numpy()[0]
    later = tower.encode_positions(
        {**base, "event_time": tf.constant([[0, days, 2 * days, 90 * days]], tf.int64)}
    ).numpy()[0]
    # Only the last event's time moved: the positions before it are unchanged, the last moves.
    np.testing.assert_allclose(before[:3], later[:3], atol=1e-6)
    assert np.abs(before[3] - later[3]).max() > 1e-4
    # An earlier event's time moves its own position and the later ones that read its item.
    earlier = tower.encode_positions(
        {**base, "event_time": tf.constant([[0, 40 * days, 41 * days, 42 * days]], tf.int64)}
    ).numpy()[0]
    np.testing.assert_allclose(before[:1], earlier[:1], atol=1e-6)
    assert np.abs(before[1:] - earlier[1:]).max(axis=-1).min() > 1e-4


def test_ages_are_bucketed_by_log2_hours_with_an_unknown_bucket() -> None:
    hour, day = 3600, 86_400
    seconds = [-1, 0, hour - 1, hour, 3 * hour - 1, 3 * hour, day, 7 * day, 30 * day, 365 * day, 3650 * day]
    # 0: unknown; 1: under an hour; 2: 1-3 hours; 3: 3-7 hours; a day 5, a week 8, a month 10,
    # a year 14, and everything past 2^15 - 1 hours in the last bucket.
    assert age_buckets(tf.constant(seconds, tf.float32)).numpy().tolist() == [
        0,
        1,
        1,
        2,
        2,
        3,
        5,
        8,
        10,
        14,
        16,
    ]
    assert AGE_BUCKETS == 16


def test_served_ages_are_parsed_leniently_and_aligned_with_the_items_oldest_first() -> None:
    parsed = parse_ages(tf.constant(["30 20 10", "5 -1 x 7.5", "", "1 2"]), 4).numpy()
    # Not a non-negative number, or missing: -1 (unknown), never an error.
    assert parsed.tolist() == [[30, 20, 10, -1], [5, -1, -1, 7.5], [-1, -1, -1, -1], [1, 2, -1, -1]]
    # Items c b a (newest first) with ages 30 20 10 read oldest first: a=10, b=20, c=30. The
    # second row has two items and three ages (the extra is dropped); the last, two items and
    # one age (the missing one is unknown).
    _, counts = reverse_tokens(tf.constant(["c b a", "y x", "", "q p"]), 4)
    aligned = reverse_within(
        tf.constant(parse_ages(tf.constant(["30 20 10", "5 -1 9", "", "4"]), 4)), counts, -1.0
    )
    assert aligned.numpy().tolist() == [[10, 20, 30, -1], [-1, 5, -1, -1], [-1, -1, -1, -1], [-1, 4, -1, -1]]


def test_only_the_ages_change_the_query_and_unknown_ages_add_nothing() -> None:
    tower = _tower()
    base = {"user_id": tf.constant(["u1"] * 4), "hour": tf.constant([3] * 4, tf.int64)}
    base |= {"age_bucket": tf.constant(["18-24"] * 4), "country": tf.constant(["US"] * 4)}
    base |= {"device": tf.constant(["web"] * 4), "recent_items": tf.constant(["i1 i2 i3"] * 4)}
    tower(base)  # built, then given age biases
    _learned_age_biases(tower.encoder)
    ages = tf.constant(["60 3600 86400", "60 3600 8640000", "", "-1 -1 -1"])
    out = tower({**base, "recent_item_ages": ages}).numpy()
    # The oldest item a hundred days old, not one: the newest item's age is the same, but the
    # positions before it read other ages, and the query attends to them.
    assert np.abs(out[0] - out[1]).max() > 1e-4
    np.testing.assert_allclose(out[2], out[3], atol=1e-6)  # missing = unknown
    without = tower({k: v for k, v in base.items()}).numpy()  # a caller that sends no ages at all
    np.testing.assert_allclose(out[2], without[0], atol=1e-6)


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
