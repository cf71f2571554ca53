"""What a user sees stays put: the gateway's OpenAPI document, `recsys config`, the CLI's
commands and options, and each DAG's task graph are compared with snapshots in
``tests/snapshots/``.

A change to any of them is a change to the product, made on purpose: rerun with
``RECSYS_UPDATE_SNAPSHOTS=1`` and review the snapshot's diff with the code's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main

from tests.support.paths import REPO

SNAPSHOTS = REPO / "tests" / "snapshots"


def _matches_snapshot(name: str, value: Any) -> None:
    path = SNAPSHOTS / name
    text = json.dumps(value, indent=2, sort_keys=True) + "\n"
    if os.environ.get("RECSYS_UPDATE_SNAPSHOTS") == "1":
        path.write_text(text)
    assert path.exists(), f"no snapshot {path}: run with RECSYS_UPDATE_SNAPSHOTS=1"
    assert json.loads(text) == json.loads(path.read_text()), f"{name} differs from its snapshot"


def _cli_app() -> Any:
    from entrypoints.cli import app

    return app


def _command_tree(command: Any) -> dict[str, Any]:
    node: dict[str, Any] = {
        "help": command.help,
        "params": [
            {
                "name": p.name,
                "opts": sorted(p.opts),
                "required": bool(p.required),
                "help": getattr(p, "help", None),
            }
            for p in sorted(command.params, key=lambda p: p.name or "")
        ],
    }
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        node.setdefault("commands", {})[name] = _command_tree(sub)
    return node


def test_cli_commands_and_options_match_snapshot() -> None:
    _matches_snapshot("cli.json", _command_tree(typer.main.get_command(_cli_app())))


def test_recsys_config_matches_snapshot(tmp_path: Path) -> None:
    # A fixed home, no RECSYS_* overrides: the printed config is the schema's defaults on
    # conf/recsys.yaml, paths shown relative to that home.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "RECSYS_HOME": str(tmp_path / "home")}
    code = "from entrypoints.cli import run; run()"
    proc = subprocess.run(
        [sys.executable, "-c", code, "config"], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout.replace(str(tmp_path / "home"), "<home>").replace(str(REPO), "<repo>")
    _matches_snapshot("recsys_config.json", json.loads(printed))


def test_gateway_openapi_matches_snapshot(tmp_path: Path) -> None:
    from recsys.config import Settings
    from serving.gateway.app import create_app

    app = create_app(Settings(home=tmp_path), environ={})
    _matches_snapshot("gateway_openapi.json", app.openapi())


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory: pytest.TempPathFactory) -> Any:
    os.environ.setdefault("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow_home")))
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(REPO / "dags"))


def test_dag_task_graphs_match_snapshot(dagbag: Any) -> None:
    assert dagbag.import_errors == {}
    graphs = {
        dag_id: {
            "tasks": {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks},
            "schedule": type(dag.timetable).__name__ + " " + str(getattr(dag.timetable, "description", "")),
            "params": sorted(dag.params.keys()),
        }
        for dag_id, dag in sorted(dagbag.dags.items())
    }
    _matches_snapshot("dag_task_graphs.json", graphs)
