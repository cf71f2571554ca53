"""The gateway applies ``models.config`` to the model server: once per change, never in a loop.

A small model server double keeps the config it was last sent (as TF Serving does) and
answers label look-ups, status and metadata from it; each test counts what was sent.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from recsys.config import load_settings
from recsys.model_registry import apply_lock, move_labels, read_models_config, write_registry
from serving.clients import ModelServerError, VersionStatus
from serving.gateway.config_sync import ModelConfigSync
from serving.gateway.metrics import GatewayMetrics

NAMES = ("retrieval", "ranking")


class Server:
    """The config last sent is what serves; a version in ``broken`` ends (fails to load)."""

    def __init__(self, broken: frozenset[int] = frozenset(), labels: dict[str, Any] | None = None) -> None:
        self.broken = set(broken)
        self.labels = labels or {}
        self.sent: list[dict[str, dict[str, int]]] = []
        self.down = False

    def _up(self) -> None:
        if self.down:
            raise ModelServerError("UNAVAILABLE", "connection refused")

    def reload_config(self, proto: Any) -> None:
        self._up()
        self.labels = {c.name: dict(c.version_labels) for c in proto.model_config_list.config}
        self.sent.append(self.labels)

    def label_version(self, model: str, label: str, timeout: float = 5) -> int:
        self._up()
        if label not in self.labels.get(model, {}):
            raise ModelServerError("INVALID_ARGUMENT", f"unknown label {label}")
        return self.labels[model][label]

    def status(self, model: str, version: int | None, timeout: float = 5) -> list[VersionStatus]:
        self._up()
        return [VersionStatus(version or 0, "END" if version in self.broken else "AVAILABLE", "", "")]

    def metadata(self, model: str, version: int, timeout: float = 5) -> set[str]:
        return {"retrieve", "rank"}


def _models(base: Path, versions: list[int], stable: int, canary: int) -> dict[str, Any]:
    labels = {"stable": stable, "canary": canary}
    return {n: {"base_path": str(base / n), "versions": versions, "labels": labels} for n in NAMES}


def _push(base: Path, stable: int, canary: int, before: int) -> None:
    """What a push writes: the load config (labels as they were), then the new labels."""
    for n in NAMES:
        for v in (stable, canary, before):
            (base / n / str(v)).mkdir(parents=True, exist_ok=True)
    versions = sorted({stable, canary, before})
    load, serve = (
        _models(base, versions, stable, before),
        _models(base, sorted({stable, canary}), stable, canary),
    )
    write_registry(base, load, serve)


def _sync(tmp_path: Path, server: Server) -> tuple[ModelConfigSync, SimpleNamespace]:
    settings = load_settings(overrides={"home": str(tmp_path)})
    gateway = SimpleNamespace(settings=settings, client=server, refresh=lambda: None)
    return ModelConfigSync(gateway, GatewayMetrics()), gateway


def test_a_label_move_reaches_the_server_once_with_no_admin_call(tmp_path: Path) -> None:
    server = Server()
    sync, gw = _sync(tmp_path, server)
    base = gw.settings.models_dir
    _push(base, stable=1, canary=2, before=1)
    assert sync.check() == "applied"
    # Load first (labels as they were), then the labels of models.config.
    assert [s["retrieval"] for s in server.sent] == [{"stable": 1, "canary": 1}, {"stable": 1, "canary": 2}]
    assert [sync.check() for _ in range(3)] == [None, None, None] and len(server.sent) == 2
    move_labels(gw.settings, "rollback")  # what the canary DAG's decide step does
    assert sync.check() == "applied"
    assert server.labels == {n: {"stable": 1, "canary": 1} for n in NAMES}
    assert sync.state["result"] == "applied" and sync.state["labels"]["ranking"] == {"stable": 1, "canary": 1}


def test_a_server_already_serving_the_labels_is_sent_nothing(tmp_path: Path) -> None:
    # A gateway starting beside a server that read models.config at its own start.
    server = Server(labels={n: {"stable": 1, "canary": 2} for n in NAMES})
    sync, gw = _sync(tmp_path, server)
    _push(gw.settings.models_dir, stable=1, canary=2, before=1)
    assert sync.check() == "in_sync"
    # Sending the load config again would have put canary 1 back in service meanwhile.
    assert server.sent == []


def test_a_refused_canary_is_put_back_once_and_never_retried(tmp_path: Path) -> None:
    server = Server(broken={3})
    sync, gw = _sync(tmp_path, server)
    base = gw.settings.models_dir
    _push(base, stable=1, canary=2, before=1)
    assert sync.check() == "applied"
    _push(base, stable=1, canary=3, before=2)
    assert sync.check() == "refused"
    assert "retrieval version 3 is END" in " ".join(sync.state["problems"])
    # models.config back to the labels serving; the server told to drop version 3 again.
    assert read_models_config(base)["retrieval"]["labels"] == {"stable": 1, "canary": 2}
    assert server.labels["retrieval"] == {"stable": 1, "canary": 2}
    sent = len(server.sent)
    # The put-back rewrote models.config: it is found served, and nothing more is sent, ever.
    assert [sync.check() for _ in range(5)] == ["in_sync", None, None, None, None]
    assert len(server.sent) == sent


def test_labels_put_back_that_fail_too_are_not_rewritten_nor_retried(tmp_path: Path) -> None:
    server = Server()
    sync, gw = _sync(tmp_path, server)
    base = gw.settings.models_dir
    _push(base, stable=1, canary=2, before=1)
    assert sync.check() == "applied"
    server.broken = {2, 3}  # the canary that served breaks as a broken canary 3 is pushed
    _push(base, stable=1, canary=3, before=2)
    assert sync.check() == "refused"  # 3 is refused; canary 2 put back
    assert sync.check() == "refused"  # and 2 is refused too: there is nothing to put back
    written = (base / "models.config").stat().st_mtime_ns
    sent = len(server.sent)
    assert [sync.check() for _ in range(5)] == [None] * 5
    assert len(server.sent) == sent and (base / "models.config").stat().st_mtime_ns == written


def test_the_same_labels_written_again_after_a_refusal_are_tried_again(tmp_path: Path) -> None:
    server = Server(broken={3})
    sync, gw = _sync(tmp_path, server)
    base = gw.settings.models_dir
    _push(base, stable=1, canary=2, before=1)
    assert sync.check() == "applied"
    _push(base, stable=1, canary=3, before=2)
    assert sync.check() == "refused"
    # Written again before this gateway saw the put-back (a person retrying, say): a new write.
    time.sleep(0.05)
    _push(base, stable=1, canary=3, before=2)
    assert sync.check() == "refused"
    assert read_models_config(base)["retrieval"]["labels"] == {"stable": 1, "canary": 2}


def test_an_unreachable_server_is_tried_again_at_the_next_check(tmp_path: Path) -> None:
    server = Server()
    sync, gw = _sync(tmp_path, server)
    _push(gw.settings.models_dir, stable=1, canary=2, before=1)
    server.down = True
    assert sync.check() == "unreachable" and sync.check() == "unreachable"
    # Nothing was decided: models.config keeps the push's labels.
    assert read_models_config(gw.settings.models_dir)["retrieval"]["labels"]["canary"] == 2
    server.down = False
    assert sync.check() == "applied" and server.labels["retrieval"]["canary"] == 2


def test_one_applier_at_a_time_across_threads_and_gateways(tmp_path: Path) -> None:
    server = Server()
    sync, gw = _sync(tmp_path, server)
    base = gw.settings.models_dir
    _push(base, stable=1, canary=2, before=1)
    result: list[str | None] = []
    with apply_lock(base):  # another gateway applying
        t = threading.Thread(target=lambda: result.append(sync.check()))
        t.start()
        time.sleep(0.3)
        assert server.sent == [] and result == []
    t.join(timeout=10)
    assert result == ["applied"]
