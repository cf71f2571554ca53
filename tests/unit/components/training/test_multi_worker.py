"""Multi-worker training's launcher: TF_CONFIG, the job folder, and what a failed worker does.

The training under the strategy itself runs in
``tests/integration/components/test_multi_worker_training.py``; these checks start no
TensorFlow (the workers here are tiny Python processes standing in for training workers).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from components.training.multi_worker import (
    WorkerFailed,
    _plan,
    _stop,
    _wait,
    loopback_cluster,
    tf_config,
    write_job,
)
from components.training.warm_start import TrainingPlan
from recsys.config import TrainingConfig


def test_tf_config_names_the_cluster_and_the_task():
    cluster = loopback_cluster(2)
    assert len(set(cluster)) == 2 and all(a.startswith("127.0.0.1:") for a in cluster)
    # The layout MultiWorkerMirroredStrategy reads: every worker's address, in order, and which
    # one this process is (index 0, the chief, writes the outputs).
    assert tf_config(cluster, 1) == {
        "cluster": {"worker": cluster},
        "task": {"type": "worker", "index": 1},
    }


def test_the_job_folder_carries_the_frames_the_config_and_the_plan(tmp_path: Path):
    frame = pd.DataFrame(
        {"user_id": ["u1", "u2"], "ts": pd.to_datetime(["2026-11-01", "2026-11-02"], utc=True)}
    )
    items = pd.DataFrame({"item_id": ["i1"], "category": ["books"]})
    plan = TrainingPlan("incremental", "recent", "2026-11-02", "2026-10-30", tmp_path / "old", "2026-10-31")
    folder = write_job(TrainingConfig(workers=2, epochs=3), frame, items, tmp_path / "train", plan)
    assert folder == tmp_path / "train" / ".workers"
    job = json.loads((folder / "job.json").read_text())
    assert TrainingConfig(**job["config"]) == TrainingConfig(workers=2, epochs=3)
    assert _plan(job["plan"]) == plan  # warm_from comes back a Path
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "training_frame.parquet"), frame)
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "items.parquet"), items)
    assert _plan(None) is None


def test_a_failed_worker_fails_the_step_with_its_output_and_the_others_are_stopped(tmp_path: Path):
    (tmp_path / "worker-1.err").write_text(
        "Traceback (most recent call last):\nValueError: no positive events\n"
    )
    waiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    failing = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    workers = [waiting, failing]
    try:
        with pytest.raises(WorkerFailed, match=r"worker 1 of 2 failed \(exit status 3\)") as raised:
            _wait(workers, tmp_path)
    finally:
        _stop(workers)
    assert "ValueError: no positive events" in str(raised.value)  # the tail of its output
    # Worker 0 would wait on its peer's collectives for ever: it is terminated.
    assert waiting.poll() is not None and waiting.returncode != 0


def test_workers_that_all_succeed_are_waited_for(tmp_path: Path):
    workers = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2)]
    _wait(workers, tmp_path)
    assert [w.returncode for w in workers] == [0, 0]
