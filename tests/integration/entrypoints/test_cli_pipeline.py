"""`recsys pipeline run --data DIR`: a data folder in, the whole pipeline over its interval.

The command a new user types after `recsys data generate` or `recsys data import-movielens`:
no RECSYS_SOURCE__* variables and no interval end worked out by hand.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from components.sources.synthetic import generate_to_folder
from entrypoints.local_servers import RECSYS
from tests.support.tiny_data import tiny_params

pytestmark = pytest.mark.integration


def test_pipeline_run_reads_the_folder_and_ends_the_day_after_its_last_event(tmp_path: Path) -> None:
    data = tmp_path / "drop"
    generate_to_folder(tiny_params(days=10, events_per_user_day=3.0), data)  # ends before 2026-11-01
    home = tmp_path / "home"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")},
        "RECSYS_HOME": str(home),
        # Ten days of tiny data: three held out, a short training.
        "RECSYS_EVALUATION__HOLDOUT_DAYS": "3",
        "RECSYS_TRAINING__EPOCHS": "2",
        "RECSYS_TRAINING__RANKER_EPOCHS": "1",
        "TF_USE_LEGACY_KERAS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    proc = subprocess.run(
        [str(RECSYS), "pipeline", "run", "--data", str(data)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = (proc.stdout + proc.stderr).replace("\n", "")  # the console wraps long lines
    assert "interval end 2026-11-01" in said, said[-2000:]
    run = home / "runs" / "2026-11-01"
    ingest = json.loads((run / "ingest" / "manifest.json").read_text())
    assert ingest["source"] == "parquet"
    assert json.loads((run / "validate" / "manifest.json").read_text())["status"] == "passed"
    assert (run / "evaluate" / "blessing.json").is_file()

    # The same join written interval by interval: every event of the run, once.
    training = json.loads((run / "training_data" / "manifest.json").read_text())
    parts = tmp_path / "training_parts"
    proc = subprocess.run(
        [str(RECSYS), "features", "training-data", "--out", str(parts), "--interval-days", "4",
         "--data", str(run / "validate"), "--end", "2026-11-01"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    written = pd.read_parquet(parts)
    assert len(list(parts.glob("part-*.parquet"))) >= 3
    assert len(written) == written["event_id"].nunique() == sum(training["rows"].values())
    assert set(training["columns"]) == set(written.columns)

    # A folder that is neither a data folder nor MovieLens is refused, naming it.
    proc = subprocess.run(
        [str(RECSYS), "pipeline", "run", "--data", str(home)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and f"--data {home}" in (proc.stdout + proc.stderr).replace("\n", "")
