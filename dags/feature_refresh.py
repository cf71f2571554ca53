"""Feature refresh: every hour, load the feature rows stamped in the last interval into the online store.

Wiring only: the task imports and calls ``components.features.store.materialize`` in its body,
so parsing this file imports no Feast.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import Asset, Param, dag, task

DOC = """
### recsys feature refresh

Hourly: `components.features.store.materialize` of every feature view over
`[interval start − overlap, interval end)` into the online store (SQLite, or Redis in
production). The overlap (param `overlap_hours`) picks up rows that landed late for the
previous interval — a daily snapshot stamped at the last microsecond of its day is built
after midnight, by the training pipeline. Writing the same rows again leaves the same
values, so overlapping windows and re-runs are harmless.

Needs the Feast registry (`training_pipeline`'s `apply_features`, or `recsys features apply`).
"""

DEFAULT_ARGS = {
    "owner": "recsys",
    "retries": 3,
    "retry_delay": timedelta(minutes=1),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=10),
    # An hourly job that runs past its hour only queues the next one behind it.
    "execution_timeout": timedelta(minutes=45),
}

ONLINE_FEATURES = Asset("recsys://online-store")


@dag(
    dag_id="feature_refresh",
    schedule="@hourly",
    start_date=datetime(2026, 10, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["recsys", "features"],
    doc_md=DOC,
    params={"overlap_hours": Param(2, type="integer", minimum=0, description="Hours before the interval.")},
)
def feature_refresh() -> None:
    @task(outlets=[ONLINE_FEATURES])
    def materialize(**context: Any) -> dict[str, Any]:
        from components.features.store import materialize
        from recsys.config import settings_from_environment

        end = context.get("data_interval_end") or context.get("logical_date")
        if end is None:
            raise ValueError("the run has neither a data interval nor a logical date: trigger it with one")
        start = context.get("data_interval_start") or end - timedelta(hours=1)
        start -= timedelta(hours=int(context["params"]["overlap_hours"]))
        # Feast's window is inclusive at both ends; the interval excludes its end.
        manifest = materialize(settings_from_environment(), start=start, end=end - timedelta(microseconds=1))
        print(f"materialized {manifest['feature_views']} over {manifest['interval']}")
        return manifest["interval"]

    materialize()


feature_refresh()
