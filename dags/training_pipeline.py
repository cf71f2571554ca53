"""Training pipeline: ingest, validate (and, as they land, features, train, evaluate, index, push).

Wiring only: each task imports and calls one function of ``components.pipeline`` inside its
body, so the DAG processor parses this file without importing TensorFlow, Feast or GX.
The run's data interval end is passed to every step; re-running an interval replaces that
interval's outputs (``<home>/runs/<date>/<step>/``) and gives the same result.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from airflow.sdk import Asset, dag, task

DOC = """
### recsys training pipeline

Each task calls one step function from `components/` (the same ones `recsys pipeline run`
calls). Outputs land in `$RECSYS_HOME/runs/<interval end date>/<step>/`, each with a
`manifest.json`; the task returns that manifest's path.

* **ingest**: the configured source (synthetic, MovieLens, or a Parquet drop) into Parquet.
* **validate**: Great Expectations suites; bad rows to quarantine; the HTML report's path
  is in the task log. The task fails when a table rule breaks or too many rows are bad.
"""

DEFAULT_ARGS = {
    "owner": "recsys",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(minutes=30),
}

VALIDATED_DATA = Asset("recsys://validated-data")


def _interval_end(context: dict) -> datetime:
    # Manual and `dags test` runs may carry no data interval; their logical date stands in.
    end = context.get("data_interval_end") or context.get("logical_date")
    if end is None:
        raise ValueError("the run has neither a data interval nor a logical date")
    return end


@dag(
    dag_id="training_pipeline",
    schedule="@daily",
    start_date=datetime(2026, 10, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["recsys", "training"],
    doc_md=DOC,
)
def training_pipeline() -> None:
    @task
    def ingest(**context) -> str:
        from components.config import settings_from_environment
        from components.pipeline import run_ingest

        manifest = run_ingest(settings_from_environment(), _interval_end(context))
        print(f"ingested rows: {manifest['rows']}")
        return f"{manifest['path']}/manifest.json"

    @task(outlets=[VALIDATED_DATA])
    def validate(ingest_manifest: str, **context) -> str:
        from components.config import settings_from_environment
        from components.pipeline import run_validate

        manifest = run_validate(settings_from_environment(), _interval_end(context))
        for table, counts in manifest["tables"].items():
            print(f"{table}: {counts}")
        print(f"validation report: {manifest['report']}")
        return f"{manifest['path']}/manifest.json"

    validate(ingest())


training_pipeline()
