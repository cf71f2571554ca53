"""The whole training DAG in the production shape: PostgreSQL, Redis, CeleryExecutor, a Celery worker.

A private PostgreSQL cluster and a private Redis (AOF on) on loopback; ``RECSYS_PROFILE=
production`` with only hosts, ports and folders moved through ``RECSYS_*`` variables, as a
deployment moves them. Every Airflow process is started through the project image's entry
point (``python -m entrypoints.airflow_local exec``), which turns the profile's ``airflow``
section into ``AIRFLOW__*`` settings: ``db migrate`` creates the schema in PostgreSQL, then
the compose file's services run side by side (``LocalAirflow``): api-server, scheduler,
dag-processor and an ``airflow celery worker``. The scheduler's CeleryExecutor sends each task
through the Redis broker to the worker, whose results land in PostgreSQL (the profile's
``db+postgresql`` result backend). The run is triggered through the REST API (v2) on the tiny
data of test_training_dag.py and polled until it ends.

That the tasks really ran on the Celery worker is checked on both sides: each task instance's
``external_executor_id`` (the Celery task id the executor assigned) has a ``SUCCESS`` row in
the result backend's ``celery_taskmeta``, and the worker's own log names every task it ran.
Every process started here is stopped by process group, whatever happens.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from entrypoints.airflow_local import CELERY_WORKER, COMPONENTS, ENTRYPOINT, LocalAirflow
from tests.support.airflow_api import DAG_ID, trigger_and_wait
from tests.support.airflow_env import tiny_airflow_env
from tests.support.ports import free_port
from tests.support.postgres_server import postgres_server
from tests.support.redis_server import aof_redis

pytestmark = pytest.mark.integration
RUN_TIMEOUT_S = 600
START_DATE = "2026-11-01"


def celery_recorded(dsn: str) -> tuple[bool, list[str], dict[str, dict], dict[str, str]]:
    """What PostgreSQL holds of the run: (every sent task has a Celery result, runs, tasks, results)."""
    import psycopg2

    with psycopg2.connect(dsn) as con, con.cursor() as cur:
        cur.execute("SELECT state FROM dag_run WHERE dag_id = %s", (DAG_ID,))
        runs = [r[0] for r in cur.fetchall()]
        cur.execute(
            "SELECT task_id, state, queue, external_executor_id FROM task_instance WHERE dag_id = %s",
            (DAG_ID,),
        )
        tasks = {r[0]: {"state": r[1], "queue": r[2], "celery_id": r[3]} for r in cur.fetchall()}
        # The result backend creates its table with the first result it stores.
        cur.execute("SELECT to_regclass('celery_taskmeta') IS NOT NULL")
        results: dict[str, str] = {}
        if cur.fetchone()[0]:
            cur.execute("SELECT task_id, status FROM celery_taskmeta")
            results = dict(cur.fetchall())
    sent = [ti["celery_id"] for ti in tasks.values() if ti["celery_id"]]
    # A result row appears as STARTED when the worker picks the job up; wait for its end state.
    done = bool(sent) and all(results.get(i) in ("SUCCESS", "FAILURE") for i in sent)
    return done, runs, tasks, results


@pytest.fixture(scope="module")
def production_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("prod_dag")
    with postgres_server() as db_url, aof_redis(base / "redis") as redis:
        env = tiny_airflow_env(base / "airflow", base / "recsys")
        env.update(
            RECSYS_PROFILE="production",
            RECSYS_AIRFLOW__DATABASE_URL=db_url,
            RECSYS_AIRFLOW__CELERY_BROKER_URL=f"redis://{redis.address}/1",
            # Driver named, as in the profile: SQLAlchemy 2.1's default PostgreSQL driver is
            # psycopg 3, which the project does not install (psycopg2 it does).
            RECSYS_AIRFLOW__CELERY_RESULT_BACKEND=f"db+{db_url}",
            RECSYS_AIRFLOW__PARALLELISM="2",
            RECSYS_FEATURES__REDIS_CONNECTION_STRING=redis.address,
            RECSYS_PUSH__BASE_PATH=str(base / "models"),
            RECSYS_GATEWAY__EVENT_LOG_REDIS_URL=redis.url,
            TF_USE_LEGACY_KERAS="1",
            # Where a deployment puts the API server; the entry point derives the rest from it.
            AIRFLOW__API__PORT=str(free_port()),
            # The worker's log server (8793 by default) on a port of its own.
            AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(free_port()),
            # Two cores: two task processes at a time, as the profile's parallelism above.
            AIRFLOW__CELERY__WORKER_CONCURRENCY="2",
            # Only the run this test triggers: no scheduled run of "today", whose interval the
            # tiny data does not cover, competing for the one active-run slot.
            AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE="False",
        )
        airflow = LocalAirflow(
            env, base / "logs", components=(*COMPONENTS, CELERY_WORKER), launcher=ENTRYPOINT
        )  # fmt: skip
        airflow.migrate()  # also writes the JWT secret every process then reads
        dsn = db_url.replace("postgresql+psycopg2", "postgresql")
        try:
            airflow.start()
            airflow.wait_healthy(timeout=180)
            _, state, states = trigger_and_wait(airflow, START_DATE, RUN_TIMEOUT_S)
            # A task reports its state to the API server before its Celery job returns (the
            # worker still waits for the task process to exit): stop the worker only once it
            # has stored a result for every task it was sent.
            deadline = time.monotonic() + 90
            while not (recorded := celery_recorded(dsn))[0] and time.monotonic() < deadline:
                airflow.check_alive()
                time.sleep(2)
        finally:
            airflow.stop()
        leftover = [name for name, proc in airflow.procs.items() if proc.poll() is None]
        _, runs, tasks, celery_results = recorded
        import redis as redis_py

        client = redis_py.Redis(host="127.0.0.1", port=redis.port)
        online_keys = client.dbsize()
        client.close()
        yield {
            "state": state, "states": states, "runs": runs, "tasks": tasks, "celery": celery_results,
            "online_keys": online_keys, "base": base, "airflow": airflow, "leftover": leftover,
        }  # fmt: skip


def test_training_dag_succeeds_on_postgresql(production_run) -> None:
    airflow: LocalAirflow = production_run["airflow"]
    assert not production_run["leftover"], f"still running: {production_run['leftover']}"
    assert production_run["state"] == "success", (
        production_run["states"],
        (airflow.log_dir / "celery-worker.log").read_text(errors="replace")[-4000:],
    )
    # The run and every task instance were recorded in PostgreSQL, not in a SQLite file.
    assert production_run["runs"] == ["success"]
    states = {t: ti["state"] for t, ti in production_run["tasks"].items()}
    assert states and set(states.values()) <= {"success", "skipped"}, states
    assert {"ingest", "validate", "train", "evaluate"} <= {t.split(".")[-1] for t in states}
    assert not (production_run["base"] / "airflow" / "airflow.db").exists()


def test_every_task_ran_on_the_celery_worker(production_run) -> None:
    airflow: LocalAirflow = production_run["airflow"]
    ran = {t: ti for t, ti in production_run["tasks"].items() if ti["state"] == "success"}
    assert ran
    # The scheduler handed each task to Celery under an id of its own, on the default queue;
    # the worker's result for that id is in the PostgreSQL result backend.
    celery = production_run["celery"]
    for task_id, ti in ran.items():
        assert ti["queue"] == "default", (task_id, ti)
        assert ti["celery_id"], f"{task_id} has no Celery task id: not sent through Celery"
        assert celery.get(ti["celery_id"]) == "SUCCESS", (task_id, ti, celery.get(ti["celery_id"]))
    # And the worker process itself says it executed every one of them.
    worker_log = (airflow.log_dir / "celery-worker.log").read_text(errors="replace")
    executed = [line for line in worker_log.splitlines() if "Executing workload in Celery" in line]
    missing = [t for t in ran if not any(f"task_id='{t}'" in line for line in executed)]
    assert not missing, (missing, worker_log[-3000:])


def test_features_went_to_redis_and_models_to_the_shared_base_path(production_run) -> None:
    base: Path = production_run["base"]
    assert production_run["online_keys"] > 0  # materialize wrote Feast's Redis online store
    assert not (base / "recsys" / "feast" / "online_store.db").exists()
    run = base / "recsys" / "runs" / START_DATE
    blessing = json.loads((run / "evaluate" / "blessing.json").read_text())
    if blessing["blessed"]:
        assert (base / "models" / "models.config").is_file()
        assert not (base / "recsys" / "models").exists()


def test_the_production_profile_ran_features_and_validation_on_spark(production_run) -> None:
    """The tasks joined, materialized and validated on Spark (a local master here), as the
    production profile says: the store config the apply task wrote names Spark's engines, and
    Feast registered the feature tables as SparkSources."""
    import yaml

    home = production_run["base"] / "recsys"
    written = yaml.safe_load((home / "feast" / "feature_store.yaml").read_text())
    assert written["offline_store"]["type"] == "spark"
    assert written["batch_engine"]["type"] == "spark.engine"
    assert written["offline_store"]["spark_conf"]["spark.master"] == "local[*]"
    from feast import FeatureStore

    views = FeatureStore(fs_yaml_file=home / "feast" / "feature_store.yaml").list_feature_views()
    assert views and {type(v.batch_source).__name__ for v in views} == {"SparkSource"}
    validated = json.loads((home / "runs" / START_DATE / "validate" / "manifest.json").read_text())
    assert validated["status"] == "passed" and validated["engine"] == "spark"
