"""Training pipeline: ingest, validate, features (build, apply, materialize), then the models.

Wiring only: each task imports and calls one step function of ``components.pipeline``
inside its body, so the DAG processor parses this file without importing TensorFlow, Feast
or GX. The run's data interval end is passed to every step; re-running an interval replaces
that interval's outputs (``<home>/runs/<date>/<step>/``) and gives the same result.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import Asset, dag, task

DOC = """
### recsys training pipeline

Each task calls one step function from `components/pipeline.py` (the same ones
`recsys pipeline run` calls, in the same order). Outputs land in
`$RECSYS_HOME/runs/<interval end date>/<step>/` with a `manifest.json`; each task returns
its manifest's path and prints the numbers worth reading.

* **export_events**: the gateway's event log (SQLite or Redis Streams), each UTC day of the
  interval into `$RECSYS_HOME/lake/events/date=<day>/` with its serving context; closed days
  older than `event_export.keep_days` leave the log once their file is durable.
* **ingest**: the configured source (synthetic, MovieLens, or a Parquet drop) into Parquet.
* **validate**: Great Expectations suites; bad rows to quarantine; the report's path is in
  the log. Fails when a table rule breaks or too many rows are bad.
* **build_features**: daily feature tables from the validated data (Feast file sources).
* **apply_features**: `feast apply` of `feature_repo/`.
* **materialize**: the online store gets the latest rows up to the interval's end.
* **training_data**: point-in-time training rows from Feast, split by time into train and holdout.
* **train**: the two-tower retriever and the multi-objective ranker (TFRS).
* **evaluate**: Recall/NDCG/MRR/coverage on the holdout beside popularity and the serving
  model; an HTML report; the blessing.
* **gate**: a refused model ends the run here: index and push show as *skipped* and the
  reason is in this task's log.
* **index**: ScaNN over the item embeddings, recall measured against exact search.
* **push**: SavedModels into the model base path; the new version becomes `canary`.
"""

DEFAULT_ARGS = {
    "owner": "recsys",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    "execution_timeout": timedelta(minutes=30),
}

LOGGED_EVENTS = Asset("recsys://lake/events")
VALIDATED_DATA = Asset("recsys://validated-data")
FEATURE_TABLES = Asset("recsys://feature-tables")
ONLINE_FEATURES = Asset("recsys://online-store")
PUSHED_MODELS = Asset("recsys://models/canary")


def _interval_end(context: dict[str, Any]) -> datetime:
    # Manual and `dags test` runs may carry no data interval; their logical date stands in.
    end = context.get("data_interval_end") or context.get("logical_date")
    if end is None:
        raise ValueError("the run has neither a data interval nor a logical date")
    return end


def _run_step(name: str, context: dict[str, Any]) -> dict[str, Any]:
    """Call ``components.pipeline.run_<name>`` for this run's interval and log its manifest."""
    from components import pipeline
    from recsys.config import settings_from_environment

    step = getattr(pipeline, f"run_{name}")
    manifest = step(settings_from_environment(), _interval_end(context))
    for key in ("rows", "tables", "report", "interval", "feature_views", "recall", "path"):
        if key in manifest:
            print(f"{name} {key}: {manifest[key]}")
    return manifest


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
    @task(outlets=[LOGGED_EVENTS])
    def export_events(**context: Any) -> str:
        manifest = _run_step("export_events", context)
        print(f"export_events: {len(manifest['days'])} days exported, {manifest['trimmed']} events trimmed")
        return manifest["path"]

    @task
    def ingest(_: str, **context: Any) -> str:
        return _run_step("ingest", context)["path"]

    @task(outlets=[VALIDATED_DATA])
    def validate(_: str, **context: Any) -> str:
        return _run_step("validate", context)["path"]

    @task(outlets=[FEATURE_TABLES])
    def build_features(_: str, **context: Any) -> str:
        return _run_step("build_features", context)["path"]

    @task
    def apply_features(_: str, **context: Any) -> str:
        return _run_step("apply_features", context)["registry"]

    @task(outlets=[ONLINE_FEATURES])
    def materialize(_: str, **context: Any) -> str:
        return str(_run_step("materialize", context)["interval"])

    @task
    def training_data(_: str, **context: Any) -> str:
        return _run_step("training_data", context)["path"]

    @task(execution_timeout=timedelta(hours=2))
    def train(_: str, **context: Any) -> str:
        return _run_step("train", context)["path"]

    @task
    def evaluate(_: str, **context: Any) -> str:
        return _run_step("evaluate", context)["path"]

    @task.short_circuit
    def gate(_: str, **context: Any) -> bool:
        blessing = _run_step("gate", context)
        verdict = "blessed" if blessing.get("blessed") else "REFUSED (index and push skipped)"
        print(f"gate: model {verdict}: {blessing.get('reason')}")
        return bool(blessing.get("blessed"))

    @task
    def index(**context: Any) -> str:
        return _run_step("index", context)["path"]

    @task(outlets=[PUSHED_MODELS])
    def push(_: str, **context: Any) -> str:
        manifest = _run_step("push", context)
        print(f"push: {manifest.get('reason') or manifest.get('models')}")
        return str(manifest.get("version"))

    features_loaded = materialize(apply_features(build_features(validate(ingest(export_events())))))
    blessed = gate(evaluate(train(training_data(features_loaded))))
    index_built = index()
    blessed >> index_built
    push(index_built)


training_pipeline()
