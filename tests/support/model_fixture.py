"""A training output for the index, push and recommend tests, from the real training step.

``components.training.train.train_models`` on the tiny generated data, with a small setting (16-d
embeddings, a few epochs) so it takes seconds. The training frame joins each event with
its user's profile and item's attributes as they are in the data (not the feature layer's
point-in-time join, which needs a Feast store): the tests here check what is done with a
trained output, not the model's quality.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pandas as pd


def write_train_fixture(data_dir: Path, out_dir: Path, seed: int = 0) -> dict[str, Any]:
    """Train the two-tower retriever and the ranker on ``data_dir`` into ``out_dir``."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    from components.training.train import train_models
    from recsys.config import TrainingConfig

    data_dir = Path(data_dir)
    events = pd.read_parquet(data_dir / "events")
    users = pd.read_parquet(data_dir / "users")
    items = pd.read_parquet(data_dir / "items")
    frame = events.merge(users, on="user_id", how="left").merge(items, on="item_id", how="left")
    frame["hour"] = frame["ts"].dt.hour
    config = TrainingConfig(
        seed=seed, embedding_dim=16, id_dim=16, text_dim=8, epochs=2, ranker_epochs=2,
        early_stopping_patience=0,
    )
    return train_models(config, frame, items, Path(out_dir), log=lambda _: None)
