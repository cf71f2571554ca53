"""How the tests run Airflow: its CLI, the tiny run's environment, the image's entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from entrypoints.airflow_local import ENTRYPOINT
from tests.support.paths import REPO

AIRFLOW = REPO / ".venv" / "bin" / "airflow"


def tiny_airflow_env(airflow_home: Path, recsys_home: Path) -> dict[str, str]:
    """This process's environment less any AIRFLOW*/RECSYS* variable, plus the project's DAGs
    and the tiny data and short training that the DAG tests run on (a known-good setting)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "RECSYS"))}
    env.update(
        AIRFLOW_HOME=str(airflow_home),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        AIRFLOW__CORE__UNIT_TEST_MODE="False",
        RECSYS_HOME=str(recsys_home),
        RECSYS_GENERATE__USERS="300",
        RECSYS_GENERATE__ITEMS="80",
        RECSYS_GENERATE__DAYS="10",
        RECSYS_GENERATE__EVENTS_PER_USER_DAY="3",
        RECSYS_EVALUATION__HOLDOUT_DAYS="3",
        RECSYS_TRAINING__EPOCHS="3",
        RECSYS_TRAINING__RANKER_EPOCHS="2",
        TF_CPP_MIN_LOG_LEVEL="2",
        GX_ANALYTICS_ENABLED="false",
    )
    return env


def run_dags_test(
    dag_id: str, logical_date: str, env: dict[str, str], log_dir: Path, timeout: int = 300
) -> str:
    """``airflow dags test dag_id logical_date`` in ``env``: its output, also written to
    ``log_dir/dags_test.log``, after checking that the run succeeded."""
    proc = subprocess.run(
        [str(AIRFLOW), "dags", "test", dag_id, logical_date],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    (log_dir / "dags_test.log").write_text(log)
    assert proc.returncode == 0, log[-4000:]
    assert "state=success" in log
    return log


def airflow_entrypoint(*args: str) -> list[str]:
    """The project image's entry point (docker/Dockerfile) run with this interpreter."""
    return [sys.executable, *ENTRYPOINT[1:], *args]
