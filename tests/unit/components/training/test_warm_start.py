"""Warm start: vocabularies that keep old ids at their rows, the variable copy, the plan."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from components.training.warm_start import (
    CHECKPOINTS,
    MODELS,
    VOCABULARIES,
    WarmStartError,
    merge_vocabularies,
    merge_vocabulary,
    plan_training,
    warm_values,
)
from recsys.config import TrainingConfig

END = datetime(2026, 11, 10, tzinfo=UTC)


def test_merge_keeps_the_old_order_and_appends_new_ids():
    # "c" and "a" keep indices 0 and 1 (their embedding rows); "b" and "d" are new, in the
    # new list's order, whatever their sort order relative to the old ids.
    assert merge_vocabulary(["c", "a"], ["a", "d", "b", "d"]) == ["c", "a", "d", "b"]
    assert merge_vocabulary(["c", "a"], []) == ["c", "a"]  # ids absent from the new days stay


def test_merge_caps_at_the_limit_without_dropping_old_ids():
    assert merge_vocabulary(["x", "y"], ["z", "w"], limit=3) == ["x", "y", "z"]
    with pytest.raises(WarmStartError, match="more than the limit"):
        merge_vocabulary(["x", "y", "z"], [], limit=2)


def test_merge_vocabularies_recurses_and_keeps_names_one_side_lacks():
    old = {"users": ["u1"], "profiles": {"country": ["de"], "device": ["ios"]}}
    new = {"users": ["u2", "u1"], "profiles": {"country": ["fr", "de"]}, "items": ["i1"]}
    assert merge_vocabularies(old, new) == {
        "users": ["u1", "u2"],
        "profiles": {"country": ["de", "fr"], "device": ["ios"]},
        "items": ["i1"],
    }


def test_the_copy_keeps_old_rows_and_leaves_new_rows_as_initialised():
    old_table = np.arange(6, dtype=np.float32).reshape(3, 2)  # padding, 1 OOV row, 1 item
    fresh_table = np.full((5, 2), -1.0, np.float32)  # 2 new items appended
    old = [("tower/item_embedding/embeddings:0", old_table), ("tower/dense/kernel:0", np.ones((2, 2)))]
    new = [("tower/item_embedding/embeddings:0", fresh_table), ("tower/dense/kernel:0", np.zeros((2, 2)))]
    values, report = warm_values(old, new)
    np.testing.assert_array_equal(values[0][:3], old_table)
    np.testing.assert_array_equal(values[0][3:], fresh_table[3:])  # the new ids' fresh rows
    np.testing.assert_array_equal(values[1], np.ones((2, 2)))  # same shape: copied whole
    assert report.copied == 1 and report.grown == {"tower/item_embedding/embeddings:0": (3, 5)}


@pytest.mark.parametrize(
    "name, old_shape, new_shape",
    [
        ("tower/dense/kernel:0", (4, 2), (5, 2)),  # not an embedding table
        ("tower/item_embedding/embeddings:0", (5, 2), (3, 2)),  # a table may not shrink
        ("tower/item_embedding/embeddings:0", (3, 2), (3, 4)),  # nor change its width
    ],
)
def test_the_copy_refuses_other_shape_changes(name, old_shape, new_shape):
    with pytest.raises(WarmStartError, match=r"only an embedding table may change shape"):
        warm_values([(name, np.zeros(old_shape))], [(name, np.zeros(new_shape))])


def test_the_copy_refuses_models_with_other_variables():
    with pytest.raises(WarmStartError, match="2 variables, the new one 1"):
        warm_values([("a", np.zeros(1)), ("b", np.zeros(1))], [("a", np.zeros(1))])


def _serving(
    tmp_path: Path, config: TrainingConfig, full_retrain_of: str = "2026-11-05T00:00:00+00:00"
) -> Path:
    """A training folder as the warm start reads it: manifest and checkpoint vocabularies."""
    for model in MODELS:
        folder = tmp_path / CHECKPOINTS / model
        folder.mkdir(parents=True)
        (folder / VOCABULARIES).write_text("{}")
    manifest = {
        "full_retrain_of": full_retrain_of,
        "data_interval": {"start": "2026-10-01T00:00:00+00:00", "end": "2026-11-02T12:00:00+00:00"},
        "parameters": config.model_dump(mode="json"),
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_plan_is_incremental_within_the_cadence(tmp_path: Path):
    config = TrainingConfig(incremental=True, full_retrain_every_days=7)
    plan = plan_training(config, _serving(tmp_path, config), END, newest_event="2026-11-03")
    assert plan.incremental, plan.reason
    assert plan.after == "2026-11-02T12:00:00+00:00"
    assert plan.full_retrain_of == "2026-11-05T00:00:00+00:00"  # the serving version's, carried on
    assert plan.warm_from == tmp_path


@pytest.mark.parametrize(
    "config_changes, serving_changes, newest, reason",
    [
        ({"incremental": False}, {}, None, "training.incremental is off"),
        ({"full_retrain_every_days": 5}, {}, None, "5 days before the interval end"),
        ({}, {"embedding_dim": 32}, None, "other architecture parameters (embedding_dim)"),
        ({"query_tower": "sequential"}, {}, None, "sequential query tower"),
        ({}, {}, "2026-11-02T12:00:00+00:00", "no event after"),
    ],
)
def test_plan_is_full_and_says_why(tmp_path, config_changes, serving_changes, newest, reason):
    config = TrainingConfig(**{"incremental": True, **config_changes})
    serving = _serving(tmp_path, TrainingConfig(**serving_changes))
    plan = plan_training(config, serving, END, newest_event=newest)
    assert plan.mode == "full" and reason in plan.reason
    assert plan.full_retrain_of == END.isoformat()  # a full run is its own full retrain


def test_plan_is_full_without_a_serving_version_or_its_checkpoints(tmp_path: Path):
    config = TrainingConfig(incremental=True)
    assert "no model serves" in plan_training(config, None, END).reason
    serving = _serving(tmp_path, config)
    (serving / CHECKPOINTS / "ranker" / VOCABULARIES).unlink()  # trained by older code
    assert "no checkpoints" in plan_training(config, serving, END).reason
