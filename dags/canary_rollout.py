"""Canary rollout: read what users did with each arm, then promote the canary or roll it back.

Wiring only: each task imports and calls one function of ``components.canary`` inside its
body (the same functions ``recsys canary status|promote|rollback`` uses), so parsing this
file imports neither pandas nor TensorFlow.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, dag, task

DOC = """
### recsys canary rollout

The gateway serves three sticky arms — **stable**, **canary** (the newest pushed version)
and a popularity **holdout** — and logs every request with its arm and model versions,
plus impressions and outcomes (clicks, carts, purchases) tied to the request id.
Every hour, and whenever new models are pushed, this DAG:

1. **guardrails**: the canary's error rate and p99 latency against `canary.max_error_rate`
   and `canary.max_p99_latency_ms`; a broken guardrail rolls back **at once**
   (`canary := stable` in `models.config`), even before the sample is large enough.
2. **analyze**: per arm requests, impressions, clicks, CTR per request and per impression,
   error rate, latency p95/p99; one-sided two-proportion z-tests of the canary's CTR per
   request against stable (worse? not worse beyond `canary.margin`?) and the holdout, at
   `canary.alpha`. Written to `$RECSYS_HOME/canary/runs/<interval end>/analysis.json`.
3. **decide**: `promote` (`stable := canary` for retrieval and ranking), `rollback`, or
   `wait` (fewer than `canary.min_requests_per_arm` requests / `canary.min_impressions`
   impressions, or inconclusive). Every decision is appended with its numbers to
   `$RECSYS_HOME/canary/decisions.jsonl`, with an HTML report and a CTR plot.

Labels move in `models.config` only; the gateway puts each move in service on the model
server within `gateway.refresh_seconds` (checked, as `POST /v1/admin/reload` does). A
rollback needs no event log once the analysis is written: `decide` reads only its file.

A person can do the same by hand: `recsys canary status | promote | rollback`.
"""

DEFAULT_ARGS = {
    "owner": "recsys",
    "retries": 2,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": True,
    "max_retry_delay": timedelta(minutes=5),
    # Reading the log and moving two labels takes seconds; a hung task must not hold the rollout.
    "execution_timeout": timedelta(minutes=10),
}

# The push step's output (a new canary) triggers a run; the labels this DAG moves are its own.
PUSHED_MODELS = Asset("recsys://models/canary")  # training_pipeline's push
SERVING_LABELS = Asset("recsys://serving-labels")


def _until(context: dict[str, Any]) -> datetime | None:
    # Outcomes up to the interval's end; asset-triggered runs have no interval: all of them.
    return context.get("data_interval_end") or context.get("logical_date")


def _settings() -> Any:
    from recsys.config import settings_from_environment

    return settings_from_environment()


@dag(
    dag_id="canary_rollout",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("0 * * * *", timezone="UTC"), assets=PUSHED_MODELS
    ),
    start_date=datetime(2026, 10, 1, tzinfo=UTC),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["recsys", "serving", "canary"],
    doc_md=DOC,
)
def canary_rollout() -> None:
    @task(outlets=[SERVING_LABELS])
    def guardrails(**context: Any) -> dict[str, Any]:
        from components.canary import run_guardrails

        result = run_guardrails(_settings(), until=_until(context))
        print(f"guardrails: {result['guardrails']}; rolled back: {result['rolled_back']}")
        return {"rolled_back": result["rolled_back"], "broken": result["guardrails"]["broken"]}

    @task
    def analyze(_: dict[str, Any], **context: Any) -> str:
        from components.canary import run_analysis

        path = run_analysis(_settings(), until=_until(context))
        print(f"analysis: {path}")
        return str(path)

    @task(outlets=[SERVING_LABELS])
    def decide(analysis_path: str) -> dict[str, Any]:
        from pathlib import Path

        from components.canary import run_decision

        record = run_decision(_settings(), Path(analysis_path))
        print(f"{record['action']}: {record['reason']} (report: {record['report']})")
        return {k: record[k] for k in ("action", "decision", "reason", "report", "labels")}

    decide(analyze(guardrails()))


canary_rollout()
