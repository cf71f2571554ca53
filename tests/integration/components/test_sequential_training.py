"""The sequential retriever trained for real on tiny data where order is the whole signal.

Every user walks a cycle of items (i7 is always followed by i8): a model that reads the
recent items in order can name the next item from the newest one; a bag of the same items
cannot tell which end of the walk the user is at. Trained through ``train_retriever`` with
``query_tower: sequential`` (mixed negatives, and the whole catalog's softmax), exported, and
queried through the SavedModel's ``serving_default`` as serving does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.training.train import load_signature, query_features_from_frame, train_retriever
from recsys.config import TrainingConfig

pytestmark = pytest.mark.integration

N_ITEMS, N_USERS, WALK = 30, 150, 8


def _walks() -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    rows = []
    for u in range(N_USERS):
        start = int(rng.integers(N_ITEMS))
        for k in range(WALK):
            rows.append(
                {
                    "event_id": f"{u}-{k}",
                    "user_id": f"u{u}",
                    "item_id": f"i{(start + k) % N_ITEMS}",
                    "event_type": "click",
                    "ts": t0 + pd.Timedelta(minutes=u * 60 + k),
                    "session_id": f"s{u}",
                    "hour": 9,
                    "device": "web",
                }
            )
    items = pd.DataFrame(
        {
            "item_id": [f"i{n}" for n in range(N_ITEMS)],
            "title": [f"title {n}" for n in range(N_ITEMS)],
            "category": ["even" if n % 2 == 0 else "odd" for n in range(N_ITEMS)],
            "description": "",
        }
    )
    return pd.DataFrame(rows), items


# The history mean beside the attention's state is an order-free view: the tower must still read the order.
@pytest.mark.parametrize(
    ("negatives", "history_mean"), [("mixed", False), ("catalog", False), ("catalog", True)]
)
def test_the_sequential_tower_names_the_next_item_of_a_walk(
    tmp_path: Path, negatives: str, history_mean: bool
) -> None:
    import tensorflow as tf

    frame, items = _walks()
    config = TrainingConfig(
        query_tower="sequential",
        negatives=negatives,
        sequence_history_mean=history_mean,
        uniform_negatives=16,
        max_history=5,
        sequence_layers=1,
        sequence_dropout=0.0,
        sequence_batch_size=32,
        id_dim=16,
        embedding_dim=16,
        hidden_units=[32],
        text_max_tokens=100,
        # Ids dropped half the time: the tower must read the walk, not memorize the user.
        id_dropout=0.5,
        validation_fraction=0.0,
        epochs=12,
        learning_rate=0.01,
        item_bias=False,
    )
    out = train_retriever(config, frame, items, tmp_path, log=lambda _: None)
    assert out["examples"]["retriever_train_sequences"] == N_USERS * 2  # 8 positives, windows of 6

    # Users the model never saw, each three steps into a walk from every starting item.
    starts = np.arange(N_ITEMS)
    recent = [" ".join(f"i{(s + k) % N_ITEMS}" for k in (2, 1, 0)) for s in starts]
    queries = pd.DataFrame({"user_id": "new", "recent_items": recent, "hour": 9, "device": "web"})
    signature = load_signature(tmp_path / "query_tower")
    inputs = {k: tf.constant(v) for k, v in query_features_from_frame(queries).items()}
    q = signature(**inputs)["embedding"].numpy()
    embeddings = pd.read_parquet(tmp_path / "item_embeddings.parquet")
    e = np.stack(embeddings["embedding"].to_numpy())
    top3 = np.argsort(-(q @ e.T), axis=1)[:, :3]
    ranked = [[embeddings["item_id"].iloc[j] for j in row] for row in top3]
    hits = np.mean([f"i{(s + 3) % N_ITEMS}" in r for s, r in zip(starts, ranked, strict=True)])
    # Chance is 3 in 30; a model blind to order would be torn between both ends of the walk.
    assert hits >= 0.7, ranked

    # The exported tower reads the recent items' ages: the same items a minute apart, or a
    # month apart, or with no times known, are three different queries.
    assert "recent_item_ages" in out["query_inputs"]
    aged = queries.loc[np.repeat(np.arange(4), 3)].reset_index(drop=True)  # 4 users, 3 ages each
    aged["recent_item_ages"] = ["60 120 180", "2592000 2592060 2592120", ""] * 4
    inputs = {k: tf.constant(v) for k, v in query_features_from_frame(aged).items()}
    by_age = signature(**inputs)["embedding"].numpy().reshape(4, 3, -1)
    assert np.abs(by_age[:, 0] - by_age[:, 1]).max(axis=1).min() > 1e-4
    assert np.abs(by_age[:, 0] - by_age[:, 2]).max(axis=1).min() > 1e-4
