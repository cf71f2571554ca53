"""The retriever trains on its towers' encoded integers; the exported towers take raw strings.

Training encodes every example once (``_retriever_dataset``: the towers' ``encode``, bags cut
to their widest row) and its steps run ``embed`` on those integers. The exported SavedModels
run ``encode`` then ``embed`` on the strings a request carries. Both must give the same
embedding for the same row and the same weights, or the index and the gateway would serve a
model other than the one trained.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from components.sources.synthetic import generate
from tests.support.tiny_data import tiny_params

pytestmark = pytest.mark.integration

ROWS = 48


@pytest.fixture(scope="module")
def retriever(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from components.training.train import (
        _build_retriever,
        _Catalog,
        _export_retriever,
        _retriever_dataset,
        _Vocabulary,
        leave_one_out_history,
        positives_frame,
    )
    from recsys.config import TrainingConfig

    tables = generate(tiny_params(days=10, events_per_user_day=4.0))
    frame = tables["events"].merge(tables["users"], on="user_id", how="left")
    frame = frame.merge(tables["items"], on="item_id")
    frame["hour"] = frame["ts"].dt.hour
    # Histories of several items per row, so the bags and their padding are exercised.
    frame = leave_one_out_history(frame, max_history=50)
    config = TrainingConfig(
        embedding_dim=16, id_dim=16, text_dim=8, batch_size=ROWS, epochs=1, validation_fraction=0.0
    )
    catalog = _Catalog.of(tables["items"])
    positives = positives_frame(frame, drop_repeats=True)
    vocabulary = _Vocabulary.of(positives, frame)
    model = _build_retriever(config, vocabulary, catalog)
    dataset = _retriever_dataset(config, positives, catalog, vocabulary, shuffle=False, model=model)
    model.fit(dataset, epochs=1, verbose=0)  # weights away from their initial values
    out = tmp_path_factory.mktemp("retriever")
    _export_retriever(model, catalog.frame, out)
    # The first batch (no shuffling) holds the first ROWS positives, content from the catalog.
    rows = positives.head(ROWS).drop(columns=["category", "title", "description"])
    rows = rows.join(catalog.frame.set_index("item_id")[["category", "title", "description"]], on="item_id")
    longest = int(positives["recent_items"].str.split().str.len().max())
    return {"model": model, "batch": next(iter(dataset)), "rows": rows, "out": out, "longest": longest}


def _served(path: Path, arrays: dict[str, np.ndarray]) -> np.ndarray:
    import tensorflow as tf

    from components.training.train import load_signature

    signature = load_signature(path)
    return signature(**{k: tf.constant(v) for k, v in arrays.items()})["embedding"].numpy()


def test_training_batches_carry_no_strings(retriever):
    import tensorflow as tf

    leaves = tf.nest.flatten(retriever["batch"])
    assert leaves and all(t.dtype != tf.string for t in leaves)


def test_history_bags_are_cut_to_the_widest_history(retriever):
    from components.training.models import ENCODED_QUERY

    history = retriever["batch"][ENCODED_QUERY]["history"].numpy()
    # The tower has 50 slots; the data's longest history (over all batches) is shorter.
    assert 1 < retriever["longest"] < 50
    assert history.shape[1] == retriever["longest"]


def test_exported_query_tower_embeds_strings_as_training_embeds_their_encoding(retriever):
    from components.training.models import ENCODED_QUERY
    from components.training.train import query_features_from_frame

    model, batch = retriever["model"], retriever["batch"]
    trained = model.query_model.embed(batch[ENCODED_QUERY], training=False).numpy()
    served = _served(retriever["out"] / "query_tower", query_features_from_frame(retriever["rows"]))
    assert served.shape == trained.shape == (ROWS, trained.shape[1])
    np.testing.assert_allclose(served, trained, rtol=1e-5, atol=1e-6)


def test_exported_candidate_tower_embeds_strings_as_training_embeds_their_encoding(retriever):
    from components.training.models import ENCODED_CANDIDATE
    from components.training.train import candidate_features_from_frame

    model, batch = retriever["model"], retriever["batch"]
    trained = model.candidate_model.embed(batch[ENCODED_CANDIDATE], training=False).numpy()
    served = _served(retriever["out"] / "candidate_tower", candidate_features_from_frame(retriever["rows"]))
    np.testing.assert_allclose(served, trained, rtol=1e-5, atol=1e-6)


def test_item_keys_are_equal_exactly_for_equal_item_ids(retriever):
    keys = retriever["batch"]["item_key"].numpy()
    ids = retriever["rows"]["item_id"].astype(str).to_numpy()
    same_key = keys[:, None] == keys[None, :]
    same_id = ids[:, None] == ids[None, :]
    assert same_id.sum() > ROWS  # some item appears twice in the batch
    assert (same_key == same_id).all()
