"""Drift monitoring: every hour, the latest serving window against the training window; a drift
triggers ``training_pipeline`` with the reason in its run's conf.

Wiring only: ``check_drift`` imports and calls ``components.monitoring.monitor_drift`` in its
body (the same function ``recsys monitor`` runs), so parsing this file imports no pandas.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Asset, dag, task

DOC = """
### recsys drift monitoring

Hourly: `components.monitoring.monitor_drift` compares the event log's last
`monitoring.serving_window_hours` (the gateway's events and impressions) with the last
`monitoring.training_window_days` of the latest validated data:

* population stability index per feature (category mix of impressions and of positives,
  event types, devices, hour of day, training-window popularity of the served items; model
  scores per arm where impressions carry them) against `monitoring.psi_threshold`
  (`monitoring.psi_thresholds` per feature);
* click-through per impression, per arm and per segment (new users, heavy users, new items),
  against `monitoring.max_ctr_relative_change`; catalog coverage.

It writes `$RECSYS_HOME/monitoring/<interval end>/` (`report.html`, `metrics.json`,
`drift.prom` gauges for the Prometheus textfile collector). On drift (and with
`monitoring.trigger_retraining`), **retrain** triggers `training_pipeline` with
`conf = {"reason": ..., "monitoring_report": ..., "serving_window_end": ...}`; otherwise it is
skipped. The reasons are in `check_drift`'s log. By hand: `recsys monitor`.
"""

DEFAULT_ARGS = {
    "owner": "recsys",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=5),
    # Reading an hour's log and a week of events takes seconds to minutes.
    "execution_timeout": timedelta(minutes=20),
}

DRIFT_REPORT = Asset("recsys://monitoring/drift")


@dag(
    dag_id="monitoring",
    schedule="@hourly",
    start_date=datetime(2026, 10, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["recsys", "monitoring"],
    doc_md=DOC,
)
def monitoring() -> None:
    @task.short_circuit(outlets=[DRIFT_REPORT])
    def check_drift(**context: Any) -> bool:
        from components.monitoring import monitor_drift, retrain_conf, summary_line
        from recsys.config import settings_from_environment

        settings = settings_from_environment()
        until = context.get("data_interval_end") or context.get("logical_date")
        manifest = monitor_drift(settings, until=until)
        print(f"monitoring: {summary_line(manifest)} (report: {manifest['report']})")
        retrain = bool(manifest["drifted"] and settings.monitoring.trigger_retraining)
        if retrain:
            context["ti"].xcom_push(key="retrain_conf", value=retrain_conf(manifest))
            print(f"triggering training_pipeline: {retrain_conf(manifest)['reason']}")
        return retrain

    retrain = TriggerDagRunOperator(
        task_id="retrain",
        trigger_dag_id="training_pipeline",
        conf="{{ ti.xcom_pull(task_ids='check_drift', key='retrain_conf') | tojson }}",
        wait_for_completion=False,
        skip_when_already_exists=True,
    )
    check_drift() >> retrain


monitoring()
