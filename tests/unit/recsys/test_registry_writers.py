"""One writer of models.config: every read-modify-write under ``registry_lock``, files and folder
fsynced, push's recovery and retention never removing a version someone still needs, and a
rollback that works with the event log down."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from components import canary
from components.push import PushInProgress, _label, _next_version, _recover, _release, _reserve
from recsys.artifacts import push_record_path
from recsys.config import load_settings
from recsys.model_registry import (
    LOAD_CONFIG,
    MODELS_CONFIG,
    read_models_config,
    registry_lock,
    serving_labels,
    write_models_config,
    write_registry,
)
from serving.clients import ModelServerError, VersionStatus
from serving.gateway.admin import AdminRefused, reload_models

NAMES = ("retrieval", "ranking")


def _models(base: Path, stable: int, canary_version: int) -> dict:
    labels = {"stable": stable, "canary": canary_version}
    return {
        n: {"base_path": str(base / n), "versions": sorted(set(labels.values())), "labels": labels}
        for n in NAMES
    }


def _layout(base: Path, versions: list[int], stable: int, canary_version: int) -> None:
    for n in NAMES:
        for v in versions:
            (base / n / str(v)).mkdir(parents=True, exist_ok=True)
    write_registry(base, _models(base, stable, stable), _models(base, stable, canary_version))


def test_models_config_and_its_folder_are_fsynced(tmp_path, monkeypatch):
    synced: list[os.stat_result] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.fstat(fd)), real(fd))[1])
    path = write_models_config(tmp_path / MODELS_CONFIG, _models(tmp_path, 1, 2))
    inodes = {(s.st_ino, stat.S_ISDIR(s.st_mode)) for s in synced}
    # The file's content (its inode is the renamed temporary's) and the folder holding the name.
    assert (path.stat().st_ino, False) in inodes and (tmp_path.stat().st_ino, True) in inodes


def test_retention_never_deletes_a_version_a_label_points_at(tmp_path):
    # stable 1, canary 2; pushing 3 with keep_versions=1 keeps only the newest unlabelled one,
    # but 2 is what the canary label names until a server applies the new config.
    _layout(tmp_path, [1, 2, 3], stable=1, canary_version=2)
    models, retired = _label(tmp_path, NAMES, 3, keep_versions=1)
    assert retired == {"retrieval": [], "ranking": []}
    assert models["retrieval"]["labels"] == {"stable": 1, "canary": 3}
    # The load config still labels 2 as the server knows it: the server moves off it safely.
    assert read_models_config(tmp_path, LOAD_CONFIG)["retrieval"]["labels"] == {"stable": 1, "canary": 2}


def _half_pushed(base: Path, version: int, train_hash: str) -> Path:
    """Retrieval published as ``version`` (with its push record), ranking still exporting."""
    record = push_record_path(base, "retrieval", version)
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"train_manifest_sha256": train_hash, "version": version}))
    tmp = base / "ranking" / f".push-{version}-abcd1234"
    (tmp / "variables").mkdir(parents=True)
    return tmp


def test_recovery_leaves_a_version_a_running_attempt_is_writing(tmp_path):
    _layout(tmp_path, [1], stable=1, canary_version=1)
    with registry_lock(tmp_path):
        attempt = _reserve(tmp_path, 2)  # a running attempt of the same training output
    tmp = _half_pushed(tmp_path, 2, "h")
    try:
        with registry_lock(tmp_path), pytest.raises(PushInProgress):
            _recover(tmp_path, NAMES, "h")
        assert (tmp_path / "retrieval" / "2").is_dir() and tmp.is_dir()
        # Another training output cannot take the reserved number either.
        assert _next_version(tmp_path, NAMES) == 3
    finally:
        _release(tmp_path, 2, attempt)
    # Once the attempt is gone (as a SIGKILL drops its lock) its leftovers are a crash's: removed.
    with registry_lock(tmp_path):
        assert _recover(tmp_path, NAMES, "h")[0] is None
    assert not (tmp_path / "retrieval" / "2").exists() and not tmp.exists()
    assert _next_version(tmp_path, NAMES) == 2


class _Client:
    """A model server double that records the configs applied and reports each version's state."""

    def __init__(self, states: dict[int, str], on_status=None) -> None:
        self.states, self.on_status, self.applied = states, on_status, []

    def reload_config(self, proto) -> None:
        self.applied.append({c.name: dict(c.version_labels) for c in proto.model_config_list.config})

    def label_version(self, model, label, timeout=5):
        if not self.applied or label not in self.applied[-1].get(model, {}):
            raise ModelServerError("NOT_FOUND", f"no label {label}")
        return self.applied[-1][model][label]

    def status(self, model, version, timeout=5):
        if self.on_status is not None:
            self.on_status()
        return [VersionStatus(version, self.states.get(version, "AVAILABLE"), "", "")]

    def metadata(self, model, version, timeout=5):
        return {"retrieve", "rank"}


def _gateway(tmp_path: Path, client: _Client) -> SimpleNamespace:
    settings = load_settings(overrides={"home": str(tmp_path)})
    return SimpleNamespace(settings=settings, client=client, refresh=lambda: None)


def test_reload_reads_the_registry_under_its_lock(tmp_path):
    gateway = _gateway(tmp_path, _Client({}))
    _layout(gateway.settings.models_dir, [1, 2], stable=1, canary_version=2)
    done = threading.Event()
    with registry_lock(gateway.settings.models_dir):
        t = threading.Thread(target=lambda: (reload_models(gateway, timeout=1), done.set()))
        t.start()
        time.sleep(0.3)
        assert gateway.client.applied == [] and not done.is_set()  # waits for the writer
    t.join(timeout=10)
    assert done.is_set() and gateway.client.applied[-1]["retrieval"] == {"stable": 1, "canary": 2}


def test_a_refused_reload_does_not_undo_a_push_made_meanwhile(tmp_path):
    base = load_settings(overrides={"home": str(tmp_path)}).models_dir
    _layout(base, [1, 2, 3], stable=1, canary_version=2)

    def push_meanwhile() -> None:
        if read_models_config(base)["retrieval"]["labels"]["canary"] == 2:
            with registry_lock(base):
                write_registry(base, _models(base, 1, 1), _models(base, 1, 3))

    gateway = _gateway(tmp_path, _Client({2: "END"}, on_status=push_meanwhile))
    with pytest.raises(AdminRefused):
        reload_models(gateway, timeout=1)
    # Version 2 was refused, but models.config now names the push's 3: not put back to 1.
    assert read_models_config(base)["retrieval"]["labels"] == {"stable": 1, "canary": 3}


def test_rollback_works_with_the_event_log_down(tmp_path):
    settings = load_settings(
        overrides={
            "home": str(tmp_path),
            "gateway": {"event_log_backend": "redis_streams", "event_log_redis_url": "redis://127.0.0.1:1/0"},
        }
    )
    _layout(settings.models_dir, [1, 2], stable=1, canary_version=2)
    record = canary.manual(settings, "rollback", "canary fails")
    assert serving_labels(settings)["canary"] == {"retrieval": 1, "ranking": 1}
    assert record["action"] == "rollback" and "event log could not be read" in record["reason"]
    # A promote is never made blind.
    _layout(settings.models_dir, [1, 2], stable=1, canary_version=2)
    with pytest.raises(canary.CanaryError):
        canary.manual(settings, "promote")
    assert serving_labels(settings)["canary"] == {"retrieval": 2, "ranking": 2}
