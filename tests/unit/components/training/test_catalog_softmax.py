"""The exact catalog softmax: each query's item against every catalog item."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")


def _candidate_model(vectors: dict[str, np.ndarray]):  # type: ignore[no-untyped-def]
    import tf_keras as keras

    ids = list(vectors)
    table = tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(tf.constant(ids), tf.range(len(ids), dtype=tf.int64)), -1
    )
    matrix = tf.constant(np.stack([vectors[i] for i in ids]), dtype=tf.float32)

    class Candidates(keras.Model):
        def call(self, features, training=None):  # type: ignore[no-untyped-def]
            return tf.gather(matrix, table.lookup(features["item_id"]))

    return Candidates()


def test_catalog_softmax_is_cross_entropy_over_every_catalog_item() -> None:
    from components.training.models import CatalogSoftmax

    rng = np.random.default_rng(0)
    catalog = ["a", "b", "c", "d"]
    vectors = {i: rng.normal(size=3).astype(np.float32) for i in catalog}
    softmax = CatalogSoftmax({"item_id": catalog})
    query = rng.normal(size=(3, 3)).astype(np.float32)
    got = softmax.per_example(
        tf.constant(query), _candidate_model(vectors), tf.constant(["c", "zz", "a"]), 0.5, False
    ).numpy()

    logits = query @ np.stack([vectors[i] for i in catalog]).T / 0.5
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    # An item outside the catalog has no label to score: its row is left out.
    np.testing.assert_allclose(got, [-log_p[0, 2], -log_p[2, 0]], rtol=1e-5)
