"""`recsys simulate --loop`: serve, respond, export, retrain and push, round after round.

The home is a copy of the session's built serving home (tiny data, its truth under input/);
the loop works in a loop home of its own under ``--out``: the simulated users' requests reach
the running gateway, their events go to its log, the pipeline exports the log to the lake,
ingests it beside the source, retrains and gates, and a pushed version serves the next round.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from entrypoints.local_servers import RECSYS
from recsys.layout import run_key_for
from recsys.model_registry import read_models_config
from tests.support.homes import copy_home

pytestmark = pytest.mark.integration


def test_the_loop_trains_on_what_it_served_and_serves_what_it_trained(
    gateway_template: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    copy_home(gateway_template, home)
    out = tmp_path / "loop"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")},
        "RECSYS_HOME": str(home),
        "RECSYS_SOURCE__KIND": "parquet",
        "RECSYS_SOURCE__PATH": str(home / "input"),
        "TF_USE_LEGACY_KERAS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    args = ["--truth", str(home / "input"), "--users", "24", "--requests-per-user", "3", "--k", "5"]
    arms = ["--holdout-fraction", "0.3", "--canary-fraction", "0.35"]
    proc = subprocess.run(
        [str(RECSYS), "simulate", "--loop", "2", *arms, *args, "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=1200,
    )  # fmt: skip
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-4000:]

    summary = json.loads((out / "summary.json").read_text())
    records = pd.read_parquet(out / "requests.parquet")
    served = records[records["policy"] == "served"]
    assert [r["round"] for r in summary["rounds"]] == [1, 2]
    assert set(served["arm"]) == {"stable", "canary", "holdout"} == set(summary["arms"])
    # The same users each round, every request answered.
    assert (served.groupby("round")["user_id"].nunique() == 24).all() and (served["shown"] > 0).all()
    # What a user liked in round 1 is not shown to them in round 2 (the gateway's memory across
    # sessions, the recent positive items in the online store, and the simulation's agree),
    # wherever the gateway read the features (a read past its deadline is named in the answer).
    read = ~records["fallback"].str.contains("features:", regex=False)
    assert read.sum() >= len(records) // 2, records["fallback"].value_counts()
    assert (records.loc[read, "not_allowed"] == 0).all(), records.loc[~read, "fallback"].value_counts()

    # Round 1's traffic went through the loop home's log into its lake, and into training.
    lake = pd.read_parquet(out / "home" / "lake" / "events")
    round_one = served[served["round"] == 1]
    impressions = lake[lake["event_type"] == "impression"]
    assert len(impressions) == round_one["shown"].sum()
    assert (
        set(impressions["position"].dropna().astype(int)) <= set(range(5))
        and impressions["position"].notna().all()
    )
    assert (lake[lake["event_type"] == "click"]["request_id"].notna()).all()
    retrain = summary["rounds"][0]["retrain"]
    assert retrain["served_events"] == len(lake)
    # The retrain learned from it: served requests' events are in its training part.
    run = out / "home" / "runs" / run_key_for(datetime.fromisoformat(retrain["interval_end"]))
    trained = pd.read_parquet(run / "training_data" / "train.parquet", columns=["request_id"])
    served_requests = set(lake["request_id"].dropna())
    assert served_requests & set(trained["request_id"].dropna()), "no served traffic in training"
    first, second = (row["arms"] for row in summary["rounds"])
    assert first["stable"]["versions"] and first["holdout"]["versions"] == {}
    # The canary that served round 1 was promoted before the retrain: round 2's stable.
    assert second["stable"]["versions"] == first["canary"]["versions"]
    if retrain["pushed_version"] is not None:
        # The pushed version served round 2's canary arm beside the stable one it would replace.
        assert set(second["canary"]["versions"].values()) == {retrain["pushed_version"]}
        labels = read_models_config(out / "home" / "models")
        assert {m["labels"]["canary"] for m in labels.values()} == {retrain["pushed_version"]}
        # Then each version served one more round to every user from the same state: the same
        # users and requests per version, paired with the first.
        compared = summary["versions_compared"]
        (v1,) = set(first["stable"]["versions"].values())
        v2 = retrain["pushed_version"]
        assert [v["version"] for v in compared["versions"]] == [v1, v2]
        passes = pd.read_parquet(out / "versions" / "requests.parquet")
        by_version = passes.groupby("version")
        assert (by_version["user_id"].nunique() == 24).all() and (by_version.size() == 24 * 3).all()
        assert set(passes["arm"]) == {"stable"} and (passes["shown"] > 0).all()
        per_user = passes.groupby(["version", "user_id"])["expected_reward"].mean().unstack(0)
        paired = compared["versions"][-1]["minus_first"]
        assert paired["mean"] == pytest.approx((per_user[v2] - per_user[v1]).mean())
        assert paired["ci95"][0] <= paired["mean"] <= paired["ci95"][1]
        assert "Each version on the same users" in (out / "report.html").read_text()
    else:
        assert retrain["reason"] and second["canary"]["versions"] == first["canary"]["versions"], retrain
        assert summary["versions_compared"] is None
    # The home itself is untouched: no log, no lake, the same models.
    assert not (home / "gateway" / "events.db").exists() and not (home / "lake").exists()
    page = (out / "report.html").read_text()
    assert "data:image/png;base64," in page and "holdout" in page
