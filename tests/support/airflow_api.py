"""Airflow's REST API (v2) as the Airflow tests drive it: a token, a trigger, a poll to the end."""

from __future__ import annotations

import time

import httpx

from entrypoints.airflow_local import LocalAirflow

DAG_ID = "training_pipeline"
FINISHED = ("success", "failed")


def api(airflow: LocalAirflow) -> httpx.Client:
    # All-admins mode hands out a token without credentials (GET /auth/token); a deployment with
    # users would POST {"username", "password"} there instead.
    token = httpx.get(f"{airflow.url}/auth/token", timeout=10).json()["access_token"]
    auth = {"Authorization": f"Bearer {token}"}
    return httpx.Client(base_url=f"{airflow.url}/api/v2", headers=auth, timeout=30)


def trigger_and_wait(
    airflow: LocalAirflow, logical_date: str, run_timeout_s: float, parse_timeout_s: float = 120
) -> tuple[str, str, dict[str, str]]:
    """Trigger ``DAG_ID`` for ``logical_date``, unpause it, poll until the run ends or times out.

    Returns the run id, its last state, and each task instance's state.
    """
    client = api(airflow)
    # The DAG processor parses dags/ on its own schedule: wait for the DAG to be serialized.
    deadline = time.monotonic() + parse_timeout_s
    while (r := client.get(f"/dags/{DAG_ID}")).status_code != 200:
        airflow.check_alive()
        assert time.monotonic() < deadline, f"{DAG_ID} not parsed: {r.status_code} {r.text[:300]}"
        time.sleep(2)
    r = client.post(f"/dags/{DAG_ID}/dagRuns", json={"logical_date": f"{logical_date}T00:00:00Z"})
    assert r.status_code == 200, r.text
    run_id = r.json()["dag_run_id"]
    assert client.patch(f"/dags/{DAG_ID}", json={"is_paused": False}).status_code == 200
    deadline = time.monotonic() + run_timeout_s
    while (state := client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}").json()["state"]) not in FINISHED:
        airflow.check_alive()
        if time.monotonic() > deadline:
            break
        time.sleep(3)
    tis = client.get(f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances").json()["task_instances"]
    return run_id, state, {t["task_id"]: t["state"] for t in tis}
