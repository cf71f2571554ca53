"""The model registry: models.config, its labels and the lock every writer takes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from recsys import model_registry
from recsys.config import load_settings
from recsys.model_registry import (
    LOAD_CONFIG,
    MODELS_CONFIG,
    read_config_proto,
    read_models_config,
    registry_lock,
    restore_labels,
    rollout_in_progress,
    serving_labels,
    version_for_label,
    write_models_config,
)


def _push_layout(base: Path, stable: int = 1, canary_version: int = 2) -> None:
    models = {}
    for name in ("retrieval", "ranking"):
        for v in {stable, canary_version}:
            (base / name / str(v)).mkdir(parents=True, exist_ok=True)
        labels = {"stable": stable, "canary": canary_version}
        versions = sorted(set(labels.values()))
        models[name] = {"base_path": str(base / name), "versions": versions, "labels": labels}
    write_models_config(base / MODELS_CONFIG, models)


def test_move_labels_promote_and_rollback(tmp_path):
    settings = load_settings(overrides={"home": str(tmp_path)})
    _push_layout(settings.models_dir)
    moved = model_registry.move_labels(settings, "promote")
    assert moved["changed"]
    models = read_models_config(settings.models_dir)
    for name in ("retrieval", "ranking"):
        assert models[name]["labels"] == {"stable": 2, "canary": 2}
        assert models[name]["versions"] == [2]
    # The load config keeps both versions loaded with the labels as they were (TF Serving
    # may only label a loaded version, so a server applies it first).
    text = (settings.models_dir / LOAD_CONFIG).read_text()
    assert text.count("versions: 1") == 2 and text.count("versions: 2") == 2
    # A second promote changes nothing; rollback of a finished rollout is a no-op too.
    assert not model_registry.move_labels(settings, "promote")["changed"]

    _push_layout(settings.models_dir, stable=2, canary_version=3)
    model_registry.move_labels(settings, "rollback")
    models = read_models_config(settings.models_dir)
    assert models["ranking"]["labels"] == {"stable": 2, "canary": 2}


def test_move_labels_refuses_a_missing_version_folder(tmp_path):
    import shutil

    settings = load_settings(overrides={"home": str(tmp_path)})
    _push_layout(settings.models_dir)
    shutil.rmtree(settings.models_dir / "ranking" / "2")
    with pytest.raises(model_registry.RegistryError, match="ranking version 2 is not on disk"):
        model_registry.move_labels(settings, "promote")


def test_labels_read_back_and_a_rollout_is_seen(tmp_path: Path) -> None:
    settings = load_settings(overrides={"home": str(tmp_path)})
    assert serving_labels(settings) == {}  # nothing pushed
    _push_layout(settings.models_dir, stable=1, canary_version=2)
    labels = serving_labels(settings)
    assert labels == {"stable": {"retrieval": 1, "ranking": 1}, "canary": {"retrieval": 2, "ranking": 2}}
    assert rollout_in_progress(labels)
    assert version_for_label(settings.models_dir, "ranking", "canary") == 2
    with pytest.raises(KeyError, match="no version labelled 'blue'"):
        version_for_label(settings.models_dir, "ranking", "blue")
    model_registry.move_labels(settings, "promote")
    assert not rollout_in_progress(serving_labels(settings))


def test_config_proto_is_what_the_file_says(tmp_path: Path) -> None:
    assert read_config_proto(tmp_path) is None
    _push_layout(tmp_path, stable=1, canary_version=2)
    proto = read_config_proto(tmp_path)
    by_name = {c.name: c for c in proto.model_config_list.config}
    assert set(by_name) == {"retrieval", "ranking"}
    assert list(by_name["ranking"].model_version_policy.specific.versions) == [1, 2]
    assert dict(by_name["ranking"].version_labels) == {"stable": 1, "canary": 2}


def test_restore_labels_puts_back_what_the_load_config_labels(tmp_path: Path) -> None:
    # A push wrote the load config (old labels, both versions) and models.config (new labels);
    # the server refused version 2: models.config goes back to the load config's labels.
    _push_layout(tmp_path, stable=1, canary_version=1)
    (tmp_path / MODELS_CONFIG).rename(tmp_path / LOAD_CONFIG)
    _push_layout(tmp_path, stable=1, canary_version=2)
    previous = restore_labels(tmp_path)
    assert previous["ranking"]["labels"] == {"stable": 1, "canary": 1}
    assert read_models_config(tmp_path)["ranking"]["labels"] == {"stable": 1, "canary": 1}
    assert read_models_config(tmp_path)["ranking"]["versions"] == [1]


def test_restore_labels_without_a_load_config_changes_nothing(tmp_path: Path) -> None:
    _push_layout(tmp_path, stable=1, canary_version=2)
    before = (tmp_path / MODELS_CONFIG).read_text()
    assert restore_labels(tmp_path) == {}
    assert (tmp_path / MODELS_CONFIG).read_text() == before


def test_registry_lock_lets_one_writer_in_at_a_time(tmp_path: Path) -> None:
    inside: list[str] = []
    overlap: list[bool] = []

    def writer(name: str) -> None:
        with registry_lock(tmp_path):
            overlap.append(bool(inside))
            inside.append(name)
            time.sleep(0.05)
            inside.remove(name)

    threads = [threading.Thread(target=writer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlap == [False] * 4


def test_written_config_reads_back(tmp_path: Path) -> None:
    models = {"m": {"base_path": str(tmp_path / "m"), "versions": [3, 1, 3], "labels": {"stable": 1}}}
    write_models_config(tmp_path / MODELS_CONFIG, models)
    assert read_models_config(tmp_path) == {
        "m": {"base_path": str(tmp_path / "m"), "versions": [1, 3], "labels": {"stable": 1}}
    }
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, no temporary left
