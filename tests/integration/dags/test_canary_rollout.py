"""Canary rollout on simulated traffic in a real gateway event log, in-process and as the DAG.

Each scenario writes served requests per arm (with the model versions that served them),
their impressions and clicks (tied by request id) into a real ``SqliteEventLog``, on a
``models.config`` labelling stable=1 and canary=2 over tiny version folders (the rollout
only moves labels). Sample minimums are lowered through ``RECSYS_CANARY__*`` so a few
hundred requests per arm decide.
"""

from __future__ import annotations

import json
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from components import canary
from recsys.config import load_settings
from recsys.event_log.base import ServedRequest
from recsys.event_log.sqlite import SqliteEventLog
from recsys.model_registry import MODELS_CONFIG, read_models_config, write_models_config
from tests.support.airflow_env import AIRFLOW, run_dags_test, tiny_airflow_env

pytestmark = pytest.mark.integration

CANARY_ENV = {
    "RECSYS_CANARY__MIN_REQUESTS_PER_ARM": "200",
    "RECSYS_CANARY__MIN_IMPRESSIONS": "1000",
    "RECSYS_CANARY__MAX_ERROR_RATE": "0.05",
    "RECSYS_CANARY__GUARDRAIL_MIN_REQUESTS": "20",
}
SERVED_AT = datetime(2026, 10, 31, 12, tzinfo=UTC)  # before the DAG runs' interval ends
VERSIONS = {"stable": {"retrieval": 1, "ranking": 1}, "canary": {"retrieval": 2, "ranking": 2}, "holdout": {}}

# (requests, requests with a click, errors) per arm. Stable clicks 10% of requests, holdout 5%.
# better: canary 20%: non-inferiority z = (0.20 - 0.10 + 0.01) / sqrt(.2*.8/300 + .1*.9/300) = 3.81.
# worse: canary 10 of 300 = 3.3%: pooled z = -3.27 (p = 0.0005).
# guardrail: canary 30 requests (below 200) with 6 errors: 20% > 5% -> rollback at once.
SCENARIOS = {
    "better": {"stable": (300, 30, 0), "canary": (300, 60, 0), "holdout": (300, 15, 0)},
    "worse": {"stable": (300, 30, 0), "canary": (300, 10, 0), "holdout": (300, 15, 0)},
    "guardrail": {"stable": (300, 30, 0), "canary": (30, 6, 6), "holdout": (300, 15, 0)},
}


def prepare_home(home: Path, scenario: str) -> None:
    """models.config with stable=1 / canary=2 and the scenario's traffic in the event log."""
    base = home / "models"
    models = {}
    for name in ("retrieval", "ranking"):
        for v in (1, 2):
            (base / name / str(v)).mkdir(parents=True)
            (base / name / str(v) / "saved_model.pb").write_bytes(b"")
        labelled = {"stable": 1, "canary": 2}
        models[name] = {"base_path": str(base / name), "versions": [1, 2], "labels": labelled}
    write_models_config(base / MODELS_CONFIG, models)

    log = SqliteEventLog(home / "gateway" / "events.db")
    try:
        for arm, (n, clicked, errors) in SCENARIOS[scenario].items():
            events = []
            for i in range(n):
                rid, user, ts = f"{arm}-{i}", f"u-{arm}-{i}", SERVED_AT + timedelta(seconds=i)
                ok = i >= errors  # the first `errors` requests failed and showed nothing
                items = [f"i{(i + k) % 50}" for k in range(5)] if ok else []
                log.log_request(
                    ServedRequest(rid, user, arm, VERSIONS[arm], ts, 30.0 + i % 7, "ok" if ok else "error",
                                  items=items)
                )  # fmt: skip
                common = {"user_id": user, "ts": ts, "session_id": f"s-{rid}", "device": "web", "value": None}
                events += [
                    {**common, "event_id": f"{rid}-imp-{k}", "item_id": it, "event_type": "impression",
                     "request_id": rid}
                    for k, it in enumerate(items)
                ]  # fmt: skip
                # Errors carry no clicks; the clicked requests are the last `clicked` ones.
                if ok and i >= n - clicked:
                    events.append(
                        {**common, "event_id": f"{rid}-clk", "item_id": items[1], "event_type": "click",
                         "request_id": rid, "ts": ts + timedelta(seconds=5)}
                    )  # fmt: skip
            log.append(events)
    finally:
        log.close()


def labels(home: Path) -> dict[str, dict[str, int]]:
    return {name: m["labels"] for name, m in read_models_config(home / "models").items()}


@pytest.mark.parametrize(
    ("scenario", "action", "after"),
    [("better", "promote", 2), ("worse", "rollback", 1), ("guardrail", "rollback", 1)],
)
def test_rollout_in_process(tmp_path, scenario, action, after):
    prepare_home(tmp_path, scenario)
    settings = load_settings(env={"RECSYS_HOME": str(tmp_path), **CANARY_ENV})
    until = datetime(2026, 11, 1, tzinfo=UTC)

    guard = canary.run_guardrails(settings, until=until)
    assert guard["rolled_back"] is (scenario == "guardrail")
    record = canary.run_decision(settings, canary.run_analysis(settings, until=until))

    assert labels(tmp_path) == {m: {"stable": after, "canary": after} for m in ("retrieval", "ranking")}
    decisions = canary.read_decisions(settings)
    acted = next(d for d in decisions if d["action"] != "noop")
    assert acted["action"] == action
    if scenario == "guardrail":
        # Guardrails acted first, below the minimum sample; the analysis then found no rollout.
        assert acted["decided_by"] == "auto:guardrails" and "error rate 20.00%" in acted["reason"]
        assert acted["arms"]["canary"]["requests"] == 30
        assert record["action"] == "noop"
    else:
        assert acted["decided_by"] == "auto" and record is not None
        assert acted["arms"]["canary"]["requests"] == 300
        assert acted["arms"]["stable"]["clicked_requests"] == 30
        assert acted["arms"]["canary"]["impressions"] == 1500
    assert acted["labels"]["after"]["retrieval"] == {"stable": after, "canary": after}
    assert Path(acted["report"]).is_file() and (Path(acted["report"]).parent / "ctr.png").is_file()
    # The load config names both versions, so a server can load before it relabels.
    assert (tmp_path / "models" / "models.load.config").is_file()


@pytest.fixture(scope="module")
def migrated_airflow(tmp_path_factory):
    base = tmp_path_factory.mktemp("canary_airflow")
    env = tiny_airflow_env(base / "airflow", base / "unused")
    subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    return base / "airflow"


@pytest.mark.parametrize(
    ("scenario", "logical_date", "action", "after"),
    [("better", "2026-11-01", "promote", 2), ("guardrail", "2026-11-02", "rollback", 1)],
)
def test_canary_rollout_dag(migrated_airflow, tmp_path, scenario, logical_date, action, after):
    home = tmp_path / "recsys"
    prepare_home(home, scenario)
    env = {**tiny_airflow_env(migrated_airflow, home), **CANARY_ENV}
    run_dags_test("canary_rollout", logical_date, env, tmp_path)

    assert labels(home) == {m: {"stable": after, "canary": after} for m in ("retrieval", "ranking")}
    records = [json.loads(x) for x in (home / "canary" / "decisions.jsonl").read_text().splitlines()]
    acted = [r for r in records if r["action"] in ("promote", "rollback")]
    assert [r["action"] for r in acted] == [action]
    assert acted[0]["decided_by"] == ("auto:guardrails" if scenario == "guardrail" else "auto")
    # The analysis of the run's interval is kept beside the decisions.
    assert (home / "canary" / "runs" / f"{logical_date}T000000" / "analysis.json").is_file()
