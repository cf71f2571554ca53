"""DAG files import cleanly and fast, with no heavy import at top level, and wire what they should."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support.paths import REPO

DAGS = REPO / "dags"
HEAVY = ("tensorflow", "feast", "great_expectations", "pandas", "scann", "tensorflow_recommenders")


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    import os

    home = tmp_path_factory.mktemp("airflow_home")
    os.environ.setdefault("AIRFLOW_HOME", str(home))
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}
    assert "training_pipeline" in dagbag.dags


@pytest.mark.parametrize("dag_file", sorted(DAGS.glob("*.py")), ids=lambda p: p.name)
def test_dag_file_imports_no_heavy_module(dag_file, tmp_path):
    code = (
        "import sys, time, runpy; t = time.perf_counter(); "
        f"runpy.run_path({str(dag_file)!r}); "
        "print(time.perf_counter() - t); "
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"AIRFLOW_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    seconds, heavy = (
        proc.stdout.strip().splitlines()[-2:]
        if proc.stdout.strip().count("\n")
        else (proc.stdout.strip(), "")
    )
    assert heavy == "", f"{dag_file.name} imports {heavy} at top level"
    # Parsing (beyond importing Airflow itself) must stay cheap: the processor does it often.
    assert float(seconds) < 5.0


def test_training_pipeline_wiring_and_defaults(dagbag):
    dag = dagbag.dags["training_pipeline"]
    assert dag.catchup is False
    assert "recsys" in dag.tags and dag.doc_md
    # The DAG runs the pipeline's steps, in the pipeline's order (it never lags the CLI).
    from components.pipeline import STEPS

    names = [name for name, _ in STEPS]
    assert set(dag.task_dict) >= set(names)
    for before, after in zip(names, names[1:], strict=False):
        assert before in dag.task_dict[after].upstream_task_ids, (before, after)
    for t in dag.tasks:
        assert t.retries >= 1, t.task_id
        assert t.execution_timeout is not None, t.task_id
        assert t.retry_exponential_backoff


@pytest.mark.parametrize("dag_id", ["canary_rollout", "feature_refresh", "monitoring"])
def test_operational_dags_defaults(dagbag, dag_id):
    dag = dagbag.dags[dag_id]
    assert dag.catchup is False and dag.max_active_runs == 1
    assert "recsys" in dag.tags and dag.doc_md
    for t in dag.tasks:
        assert t.retries >= 1, t.task_id
        assert t.execution_timeout is not None, t.task_id
        assert t.retry_exponential_backoff


def test_canary_rollout_checks_guardrails_first(dagbag):
    dag = dagbag.dags["canary_rollout"]
    assert dag.task_dict["guardrails"].upstream_task_ids == set()
    assert dag.task_dict["analyze"].upstream_task_ids == {"guardrails"}
    assert dag.task_dict["decide"].upstream_task_ids == {"analyze"}
    # It moves the serving labels (an asset) and runs when new models are pushed, and hourly.
    assert {o.name for o in dag.task_dict["decide"].outlets} == {"recsys://serving-labels"}
    assert dag.timetable.asset_condition.name == "recsys://models/canary"  # the push's outlet
    assert dag.timetable.timetable.expression == "0 * * * *"


def test_feature_refresh_is_hourly_and_updates_the_online_store(dagbag):
    dag = dagbag.dags["feature_refresh"]
    assert dag.timetable.expression == "0 * * * *"
    assert {o.name for o in dag.task_dict["materialize"].outlets} == {"recsys://online-store"}
    assert dag.params["overlap_hours"] >= 0


def test_monitoring_is_hourly_and_triggers_training_only_after_the_drift_check(dagbag):
    dag = dagbag.dags["monitoring"]
    assert dag.timetable.expression == "0 * * * *"
    assert dag.task_dict["check_drift"].upstream_task_ids == set()
    retrain = dag.task_dict["retrain"]
    assert retrain.upstream_task_ids == {"check_drift"}
    assert retrain.trigger_dag_id == "training_pipeline" and "training_pipeline" in dagbag.dags
    assert "retrain_conf" in retrain.conf  # the drift's reason goes into the triggered run's conf
