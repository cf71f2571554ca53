"""The training DAG runs end to end with `airflow dags test` on tiny generated data."""

from __future__ import annotations

import json
import subprocess
import time

import pandas as pd
import pytest

from tests.support.airflow_env import AIRFLOW, tiny_airflow_env
from tests.support.paths import REPO

pytestmark = pytest.mark.integration

@pytest.fixture(scope="session")
def airflow_run(tmp_path_factory):
    """One `airflow dags test training_pipeline` run, shared by the tests that read it."""
    base = tmp_path_factory.mktemp("dagrun")
    env = tiny_airflow_env(base / "airflow", base / "recsys")
    # This run also refits on train + holdout: index and push ship that model.
    env["RECSYS_TRAINING__REFIT_ON_HOLDOUT"] = "true"
    subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    proc = subprocess.run(
        [str(AIRFLOW), "dags", "test", "training_pipeline", "2026-11-01"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    (base / "dags_test.log").write_text(proc.stdout + proc.stderr)
    return proc, base / "recsys"


def test_dag_run_succeeds(airflow_run):
    proc, _ = airflow_run
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "state=success" in log


def test_dag_run_wrote_every_step_with_a_manifest(airflow_run):
    _, home = airflow_run
    run = home / "runs" / "2026-11-01"
    ingest = json.loads((run / "ingest" / "manifest.json").read_text())
    validate = json.loads((run / "validate" / "manifest.json").read_text())
    assert ingest["rows"]["users"] == 300
    # No gateway ran in this home: no event log to export, and none was created.
    exported = json.loads((run / "export_events" / "manifest.json").read_text())
    assert exported["days"] == {} and exported["path"] == str(home / "lake" / "events")
    assert not (home / "gateway" / "events.db").exists()
    assert validate["status"] == "passed"
    for table, counts in validate["tables"].items():
        assert counts["input"] == counts["accepted"] + counts["quarantined"]
        assert len(pd.read_parquet(run / "validate" / table)) == counts["accepted"]
    # Events stop at the interval's end.
    assert pd.read_parquet(run / "validate" / "events")["ts"].max() < pd.Timestamp("2026-11-01", tz="UTC")
    assert (run / "validate" / "report" / "summary.html").is_file()
    features = json.loads((home / "features" / "manifest.json").read_text())
    assert features["tables"]["user_engagement"]["rows"] > 0
    assert (home / "feast" / "registry.db").is_file()
    assert (home / "feast" / "online_store.db").is_file()


def test_dag_run_trained_evaluated_and_gated_visibly(airflow_run):
    proc, home = airflow_run
    run = home / "runs" / "2026-11-01"
    log = proc.stdout + proc.stderr
    train = json.loads((run / "train" / "manifest.json").read_text())
    assert train["embedding_dim"] > 0 and set(train["objectives"]) >= {"click", "engagement"}
    blessing = json.loads((run / "evaluate" / "blessing.json").read_text())
    assert (run / "evaluate" / "metrics.json").is_file()
    # The refit: the same recipe on train + holdout, beside the evaluated model.
    rows = json.loads((run / "training_data" / "manifest.json").read_text())["rows"]
    refit = json.loads((run / "refit" / "manifest.json").read_text())
    assert refit["examples"]["events"] == rows["train"] + rows["holdout"] > train["examples"]["events"]
    assert train["refit"]["path"] == str(run / "refit")
    if blessing["blessed"]:
        push = json.loads((run / "push" / "manifest.json").read_text())
        assert push["version"] >= 1
        assert (home / "models" / "models.config").is_file()
        index = json.loads((run / "index" / "manifest.json").read_text())
        assert index["train_dir"] == str(run / "refit"), index
    else:
        # A refused model ends the run visibly: the gate says why, index and push never ran.
        assert "gate: model REFUSED" in log and blessing["reason"] in log
        assert not (run / "push").exists() and not (run / "index").exists()


def test_gateway_serves_the_canary_the_dag_pushed(airflow_run, tmp_path):
    """After the DAG's push, the model server and gateway (started as `make demo` starts them)
    answer the canary arm with the versions models.config labels `canary`."""
    import io

    import httpx
    from rich.console import Console

    from entrypoints.demo import servers
    from recsys.config import default_config_path, load_settings
    from recsys.model_registry import serving_labels
    from serving.gateway.policy import assign_arm

    proc, home = airflow_run
    blessing = json.loads((home / "runs" / "2026-11-01" / "evaluate" / "blessing.json").read_text())
    if not blessing["blessed"]:
        pytest.fail(f"the tiny run's model was refused, nothing to serve: {blessing['reason']}")
    env = tiny_airflow_env(tmp_path / "unused", home)
    settings = load_settings(default_config_path(env, REPO), env=env)
    labels = serving_labels(settings)
    assert labels["canary"], labels
    # The versions a request names: the ranker's only where the pushed serving policy serves it.
    expected = dict(labels["canary"])
    if blessing["serving_policy"]["retrieval_weight"] is None:
        expected.pop(settings.push.ranking_model)
    gw = settings.gateway
    # A warm user (well past cold start, so the models answer, not popularity) in the canary arm.
    events = pd.read_parquet(home / "runs" / "2026-11-01" / "validate" / "events", columns=["user_id"])
    counts = events["user_id"].value_counts()
    warm = sorted(counts[counts >= 4 * max(gw.cold_start_min_events, 1)].index)
    canary_user = next(u for u in warm if assign_arm(u, gw.arm_fractions, gw.arm_salt) == "canary")
    with servers(settings, Console(file=io.StringIO())) as url:
        # The gateway warms each model before it reports ready, but on a busy machine a request
        # can still pass the model deadline
        # (answered from popularity or unranked, marked): ask again until the models answer.
        for _ in range(8):
            r = httpx.post(f"{url}/v1/recommendations", json={"user_id": canary_user, "k": 5}, timeout=30)
            assert r.status_code == 200, r.text
            out = r.json()
            if out["model_versions"] == expected:
                break
            time.sleep(1.2)  # past the gateway's breaker window after a missed deadline
    assert out["arm"] == "canary" and not out["cold_start"], out
    why = {k: out[k] for k in ("candidate_source", "fallback", "counts")}
    assert out["model_versions"] == expected, why
    assert len(out["items"]) == 5
