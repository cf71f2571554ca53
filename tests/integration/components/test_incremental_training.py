"""Incremental training on the tiny generated data: a full train, then a warm start on later days.

The training frame joins each event with its user and item as ``tests/support/model_fixture``
does (no Feast store: what is checked is how the second run starts from the first, not the
models' quality). Three small trains share the session's tiny data: a full one on the days
before ``CUT``, an incremental one warm-started from it on the days after, and, for scale,
a fresh full one on every day.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from components.training.train import train_models
from components.training.warm_start import CHECKPOINTS, plan_training
from recsys.config import TrainingConfig
from tests.support.tiny_data import TINY_END, joined_training_frame

pytestmark = pytest.mark.integration

CUT = TINY_END - timedelta(days=2)  # the first run's interval end
CONFIG = TrainingConfig(
    embedding_dim=16, id_dim=16, text_dim=8, epochs=2, ranker_epochs=1, early_stopping_patience=0,
    item_neighbours=False, incremental=True, incremental_epochs=1, full_retrain_every_days=7,
)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    frame, items = joined_training_frame(tiny_raw)
    base = tmp_path_factory.mktemp("incremental")
    first = frame[frame["ts"] < pd.Timestamp(CUT)]
    full_plan = plan_training(CONFIG, None, CUT)
    train_models(CONFIG, first, items, base / "full", log=print, plan=full_plan)
    plan = plan_training(CONFIG, base / "full", TINY_END, newest_event=frame["ts"].max())
    train_models(CONFIG, frame, items, base / "incremental", log=print, plan=plan)
    train_models(CONFIG, frame, items, base / "fresh", log=print)
    return {"base": base, "frame": frame, "items": items, "plan": plan, "full_plan": full_plan}


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text())


def _vocab(folder: Path, model: str) -> dict[str, Any]:
    return json.loads((folder / CHECKPOINTS / model / "vocabularies.json").read_text())


def _embeddings(folder: Path) -> pd.Series:
    table = pd.read_parquet(folder / "item_embeddings.parquet")
    return pd.Series(list(np.stack(table["embedding"].to_list())), index=table["item_id"].astype(str))


def test_the_first_run_is_a_full_retrain_that_saves_checkpoints(runs):
    full = _manifest(runs["base"] / "full")
    assert runs["full_plan"].mode == "full" and "no model serves" in full["training_reason"]
    assert full["training_mode"] == "full" and full["full_retrain_of"] == CUT.isoformat()
    for model in ("retriever", "ranker"):
        assert (runs["base"] / "full" / full["checkpoints"][model] / "weights.index").is_file()


def test_the_second_run_warm_starts_on_the_later_events_only(runs):
    base = runs["base"]
    assert runs["plan"].incremental, runs["plan"].reason
    m = _manifest(base / "incremental")
    assert m["training_mode"] == "incremental"
    assert m["full_retrain_of"] == CUT.isoformat()  # descends from the first run's full retrain
    assert m["warm_started_from"] == str(base / "full")
    assert pd.Timestamp(m["data_interval"]["start"]) > pd.Timestamp(
        _manifest(base / "full")["data_interval"]["end"]
    )
    assert m["metrics"]["retriever_epochs_run"] == CONFIG.incremental_epochs
    for model in ("retriever", "ranker"):
        assert m["details"][model]["warm_start"]["grown"], f"the {model}'s tables did not grow"


def test_old_ids_keep_their_rows_and_a_new_item_gets_one(runs):
    base = runs["base"]
    for model in ("retriever", "ranker"):
        old, new = _vocab(base / "full", model), _vocab(base / "incremental", model)
        assert new["items"][: len(old["items"])] == old["items"]
        assert new["users"][: len(old["users"])] == old["users"]
    old_items = _vocab(base / "full", "retriever")["items"]
    added = _vocab(base / "incremental", "retriever")["items"][len(old_items) :]
    assert added, "the later days should bring items the first run never trained on"


def test_outputs_are_a_full_runs_and_old_items_stay_close_to_the_previous_model(runs):
    base = runs["base"]
    full, incremental, fresh = (_embeddings(base / n) for n in ("full", "incremental", "fresh"))
    assert set(incremental.index) == set(runs["items"]["item_id"].astype(str))  # the whole catalog
    assert (base / "incremental" / "query_tower" / "saved_model.pb").is_file()
    assert (base / "incremental" / "ranker" / "saved_model.pb").is_file()
    old = _vocab(base / "full", "retriever")["items"]

    def distance(a: pd.Series, b: pd.Series) -> float:
        return float(np.mean([np.linalg.norm(a[i] - b[i]) for i in old]))

    # One epoch on two days moves the warm-started embeddings a little; a fresh model's are
    # unrelated to the previous model's.
    warm, cold = distance(incremental, full), distance(fresh, full)
    assert warm < 0.5 * cold, (warm, cold)


def test_the_cadence_makes_the_next_run_full_when_the_full_retrain_is_too_old(runs):
    serving = runs["base"] / "incremental"
    soon = plan_training(CONFIG, serving, TINY_END + timedelta(days=1))
    assert soon.incremental and soon.full_retrain_of == CUT.isoformat()
    late = plan_training(CONFIG, serving, CUT + timedelta(days=CONFIG.full_retrain_every_days))
    assert late.mode == "full" and "training.full_retrain_every_days is 7" in late.reason
    assert late.full_retrain_of == (CUT + timedelta(days=7)).isoformat()
