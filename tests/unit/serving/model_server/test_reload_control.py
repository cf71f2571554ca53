"""The model server's control plane is closed: HandleReloadConfigRequest is refused unless
the server was started with ``--allow_reload_config``, and then takes only base paths under
the model root (the folder of ``models.config`` unless ``--model_root`` says otherwise).

The servicer runs against a core that records what it was asked to load, so a refused reload
is seen to change nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import grpc

from serving.model_server.config import parse_model_server_config
from serving.model_server.server import ServerOptions


class _Aborted(Exception):
    pass


class _Context:
    """What a gRPC servicer context does on abort: end the call with a code and details."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise _Aborted(details)


class _Core:
    def __init__(self) -> None:
        self.loaded: list[Any] = []

    def reload_config(self, config: Any) -> None:
        self.loaded.append(config)


def _reload(root: str | None, base_path: str) -> tuple[_Core, _Context]:
    from tensorflow_serving.apis import model_management_pb2

    from serving.model_server.grpc_service import ModelServicer

    core, context = _Core(), _Context()
    request = model_management_pb2.ReloadConfigRequest()
    entry = f'name: "ranking" base_path: "{base_path}" model_platform: "tensorflow"'
    text = f"model_config_list {{ config {{ {entry} }} }}"
    request.config.CopyFrom(parse_model_server_config(text))
    try:
        ModelServicer(core, None, root).HandleReloadConfigRequest(request, context)  # type: ignore[arg-type]
    except _Aborted:
        pass
    return core, context


def test_reload_is_refused_unless_enabled(tmp_path: Path) -> None:
    core, context = _reload(None, str(tmp_path / "ranking"))
    assert context.code == grpc.StatusCode.PERMISSION_DENIED and "--allow_reload_config" in context.details
    assert core.loaded == []


def test_reload_takes_only_base_paths_under_the_model_root(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "ranking").mkdir(parents=True)
    core, _ = _reload(str(root), str(root / "ranking"))
    assert len(core.loaded) == 1
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    # Outside the root directly, through "..", through a symbolic link, and a sibling sharing
    # the root's name as a prefix: each refused, naming the path, nothing loaded.
    (root / "link").symlink_to(outside)
    for path in (outside, root / ".." / "elsewhere", root / "link", Path(f"{root}-other")):
        core, context = _reload(str(root), str(path))
        assert context.code == grpc.StatusCode.PERMISSION_DENIED, path
        assert "outside the model root" in context.details and core.loaded == []


def test_the_flags_set_the_root_and_reloads_are_off_by_default(tmp_path: Path) -> None:
    config = str(tmp_path / "models" / "models.config")
    assert ServerOptions(model_config_file=config).reload_root() is None
    on = ServerOptions(model_config_file=config, allow_reload_config=True)
    assert on.reload_root() == os.path.dirname(config)
    rooted = ServerOptions(model_config_file=config, allow_reload_config=True, model_root="/srv")
    assert rooted.reload_root() == "/srv"
