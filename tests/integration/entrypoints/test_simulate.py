"""`recsys simulate` end to end: users of the tiny data's truth against the real served system.

The command starts the model server and the gateway itself (over a scratch copy of the
serving state), runs every policy on the same users and seeds, and writes the report. The
home is a copy of the session's built serving home, whose input folder holds the truth the
tiny data was generated from (and two items the truth does not know, which the simulation
must keep out of the gateway's answers).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from entrypoints.local_servers import RECSYS
from entrypoints.simulate import POLICIES
from tests.support.homes import NEW_ITEMS, copy_home

pytestmark = pytest.mark.integration


def test_simulate_compares_the_served_system_with_the_oracle(gateway_template: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    copy_home(gateway_template, home)
    event_log = home / "gateway" / "events.db"
    out = tmp_path / "simulation"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")},
        "RECSYS_HOME": str(home),
        "TF_USE_LEGACY_KERAS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    args = ["--truth", str(home / "input"), "--users", "12", "--requests-per-user", "3", "--k", "5"]
    proc = subprocess.run(
        [str(RECSYS), "simulate", *args, "--seed", "4", "--out", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900,
    )  # fmt: skip
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-4000:]

    summary = json.loads((out / "summary.json").read_text())
    records = pd.read_parquet(out / "requests.parquet")
    policies = summary["policies"]
    assert set(policies) == set(POLICIES)
    assert (records.groupby("policy").size() == 12 * 3).all()
    mean = records.groupby("policy")[["reward", "expected_reward"]].mean()
    # The oracle is the ceiling of what can be expected of k allowed items; random is far below it.
    assert (mean.loc["oracle", "expected_reward"] >= mean["expected_reward"] - 1e-9).all(), mean
    assert mean.loc["random", "reward"] < mean.loc["oracle", "reward"]
    # The learner's ceiling (categories from the data and each response) beats showing at random.
    assert mean.loc["random", "expected_reward"] < mean.loc["ceiling", "expected_reward"]
    ceiling_share = mean.loc["served", "expected_reward"] / mean.loc["ceiling", "expected_reward"]
    assert summary["served_share_of_ceiling"] == pytest.approx(ceiling_share)
    # The share is the measured rewards' ratio (every user made the same number of requests).
    served_share = policies["served"]["share_of_oracle"]["mean"]
    assert served_share == pytest.approx(mean.loc["served", "reward"] / mean.loc["oracle", "reward"])
    assert 0 < served_share < 1.5

    served = records[records["policy"] == "served"]
    # The gateway answered every request through its arms, and never with an item the truth
    # cannot answer for (the two new items were excluded by the request).
    assert (served["arm"] != "").all() and (served["shown"] > 0).all()
    assert (served["unsimulated"] == 0).all()
    # The simulation's filter (recent items, then what the user touched) is the gateway's own,
    # wherever the gateway read the user's features (a read past its deadline is named in the
    # answer: the recent items to exclude were then unknown to it).
    read = ~records["fallback"].str.contains("features:", regex=False)
    assert read.sum() >= len(records) // 2, records["fallback"].value_counts()
    assert (records.loc[read, "not_allowed"] == 0).all(), records.loc[~read, "fallback"].value_counts()
    assert summary["setup"]["catalog_items_not_in_truth"] == len(NEW_ITEMS)
    # Simulated events went to the scratch copy, never to the home's log; the copy is gone.
    assert not event_log.exists()
    assert not (out / "serving_home").exists()
    assert (out / "report.html").is_file() and (out / "logs" / "gateway.log").is_file()
    assert "learner of category tastes" in (out / "report.html").read_text()
    assert "share of the oracle" in said.replace("\n", " ")
    assert "of the ceiling's expected reward" in said.replace("\n", " ")
    assert "served, share of the oracle by request number" in said.replace("\n", " ")
    assert len(policies["served"]["expected_share_by_request"]) == 3
