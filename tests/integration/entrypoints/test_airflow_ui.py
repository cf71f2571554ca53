"""The real Airflow (scheduler, DAG processor, API server) runs training_pipeline, and its UI shows it.

Started exactly as ``make airflow`` starts it (``entrypoints.airflow_local``), on a free
loopback port with a temporary AIRFLOW_HOME and RECSYS_HOME and tiny generated data. The
DAG is unpaused and triggered through the REST API (v2) and polled until the run ends; then
headless Chromium takes a screenshot of the DAG's page, kept as
``test-artifacts/airflow_training_pipeline.png``. Every process started here is stopped by
process group, whatever happens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

import pytest

from entrypoints.airflow_local import LocalAirflow, airflow_env
from recsys.layout import REPO_ROOT as REPO
from tests.support.airflow_api import DAG_ID, FINISHED, trigger_and_wait
from tests.support.airflow_env import tiny_airflow_env
from tests.support.ports import free_port

pytestmark = pytest.mark.integration
ARTIFACT = REPO / "test-artifacts" / "airflow_training_pipeline.png"
RUN_TIMEOUT_S = 240


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.fail("no chromium on PATH: apt-get install chromium")
    return exe


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
    base = tmp_path_factory.mktemp("airflow_ui")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "RECSYS"))}
    # The tiny data and short training of the `airflow dags test` run (tests/integration/
    # dags/test_training_dag.py), so both tests exercise the same, known-good settings.
    tiny = tiny_airflow_env(base / "unused", base / "recsys")
    clean.update({k: v for k, v in tiny.items() if k.startswith(("RECSYS_", "TF_", "GX_"))})
    # Only the run this test triggers: no scheduled run of "today", whose interval the tiny
    # data does not cover, competing for the one active-run slot.
    clean["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] = "False"
    env = airflow_env(base / "airflow", port=free_port(), base=clean)
    local = LocalAirflow(env, base / "logs")
    local.migrate()
    try:
        local.start()
        local.wait_healthy(timeout=120)
        yield local
    finally:
        local.stop()
        for name, proc in local.procs.items():
            assert proc.poll() is not None, f"{name} still running"


def test_trigger_training_pipeline_and_screenshot_its_page(airflow, tmp_path):
    started = time.monotonic()
    run_id, state, states = trigger_and_wait(airflow, "2026-11-01", RUN_TIMEOUT_S, parse_timeout_s=90)
    assert state in FINISHED, f"run {run_id} still {state} after {RUN_TIMEOUT_S}s"
    assert state == "success", states
    # A model the evaluation gate refuses skips the tasks after the gate: still a success.
    assert states and set(states.values()) <= {"success", "skipped"}, states
    print(f"run {run_id} succeeded in {time.monotonic() - started:.0f}s: {sorted(states)}")

    ARTIFACT.parent.mkdir(exist_ok=True)
    ARTIFACT.unlink(missing_ok=True)
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    shot = subprocess.run(
        [
            chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--hide-scrollbars", "--window-size=1500,950",
            # The UI is a single-page app: give its scripts and API calls time to render.
            "--virtual-time-budget=20000", f"--screenshot={ARTIFACT}",
            f"{airflow.url}/dags/{DAG_ID}",
        ],
        capture_output=True, text=True, timeout=120, start_new_session=True,
    )  # fmt: skip
    assert ARTIFACT.is_file(), shot.stderr[-2000:]
    assert ARTIFACT.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A blank or error page compresses to a few KB; the grid with tasks and runs does not.
    assert ARTIFACT.stat().st_size > 40_000, ARTIFACT.stat().st_size
