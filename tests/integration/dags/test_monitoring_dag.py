"""The monitoring DAG with `airflow dags test`: shifted traffic triggers `training_pipeline` with
the reason in the run's conf; the same traffic without a shift skips the trigger."""

from __future__ import annotations

import json
import sqlite3
import subprocess

import pytest

from tests.support.airflow_env import AIRFLOW, run_dags_test, tiny_airflow_env
from tests.support.drift_data import DRIFT_ENV, prepare_drift_home
from tests.support.paths import REPO

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def migrated_airflow(tmp_path_factory):
    base = tmp_path_factory.mktemp("monitoring_airflow")
    env = tiny_airflow_env(base / "airflow", base / "unused")
    subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    # The trigger needs its target in the metadata database, as a running dag-processor puts it.
    subprocess.run(
        [str(AIRFLOW), "dags", "reserialize"], env=env, check=True, capture_output=True, timeout=300, cwd=REPO
    )
    return base / "airflow"


def _training_runs(airflow_home) -> list[tuple[str, dict]]:
    con = sqlite3.connect(airflow_home / "airflow.db")
    try:
        rows = con.execute("SELECT run_id, conf FROM dag_run WHERE dag_id = 'training_pipeline'").fetchall()
    finally:
        con.close()
    return [(run_id, json.loads(conf) if isinstance(conf, str) else conf) for run_id, conf in rows]


@pytest.mark.parametrize(
    ("shift", "logical_date"), [(None, "2026-11-01"), ("category_mix", "2026-11-01T00:00:00")]
)
def test_monitoring_dag_triggers_training_only_on_drift(migrated_airflow, tmp_path, shift, logical_date):
    home = tmp_path / "recsys"
    prepare_drift_home(home, shift)
    before = _training_runs(migrated_airflow)
    env = {**tiny_airflow_env(migrated_airflow, home), **DRIFT_ENV}
    log = run_dags_test("monitoring", logical_date, env, tmp_path)
    assert (home / "monitoring" / "2026-11-01" / "report.html").is_file()
    new = [run for run in _training_runs(migrated_airflow) if run not in before]
    if shift is None:
        assert "no drift" in log
        assert new == []
    else:
        assert "triggering training_pipeline: drift: category_impressions: PSI" in log
        assert len(new) == 1, new
        conf = new[0][1]
        assert conf["reason"].startswith("drift: category_impressions: PSI"), conf
        assert conf["monitoring_report"].endswith("report.html")
