"""Multi-worker training: the train step in ``training.workers`` processes, data parallel.

``train_models`` hands over here when ``training.workers > 1``. The step's inputs (the
training frame, the catalog, the ``training`` section and the plan) go to a job folder,
``<out_dir>/.workers/``, and one process per worker runs this module's entry::

    TF_CONFIG='{"cluster": {"worker": ["127.0.0.1:p0", "127.0.0.1:p1"]},
                "task": {"type": "worker", "index": i}}' \\
    python -m components.training.multi_worker --job <out_dir>/.workers

Each worker creates ``tf.distribute.MultiWorkerMirroredStrategy`` before any other TensorFlow
work (it reads ``TF_CONFIG`` and starts the worker's gRPC server), then runs the training code
one process runs (``train.fit_models``) inside ``strategy.scope()``, so every model is built,
compiled and fitted by ``Model.fit`` under the strategy:

- data: a batch of ``training.batch_size`` examples is the global batch; tf.data cuts it into
  one slice per worker and each keeps its own (``train._sharded_by_data``). Every worker holds
  the whole frame in memory and reads it in the same seeded order.
- gradients: each step the workers' gradients are summed by a collective all-reduce, each
  worker's loss being its share of the global batch's mean (``models.replica_loss``); the
  variables stay identical everywhere.
- negatives: the retriever's in-batch softmax, its logQ correction and accidental-hit removal
  see a worker's own slice only: ``batch_size / workers - 1`` negatives per positive, not
  ``batch_size - 1``. Raise ``batch_size`` with the workers to keep the negatives.
- early stopping: the validation loss and the ranker's metrics are reduced across the workers,
  so all stop at the same epoch. The held-out ranking (``early_stopping_metric: ndcg``) is a
  Python callback over the whole validation split: every worker computes it, with the same
  weights, and gets the same number.
- outputs: every worker exports, since saving distributed variables may take part in
  collectives (TensorFlow's multi-worker guide has every worker save): the first worker (the
  chief) into the step's folder, the others into scratch folders that they delete. The
  item-to-item table, a NumPy fit, is the chief's alone. The chief hands its manifest back;
  the launching process writes it, with ``details.distribution``, once every worker has
  exited cleanly, so ``manifest.json`` still marks a complete step.

The chief's progress lines come through as one process's do; the others' output goes to files
in the job folder, and the tail of a failed worker's is in the error. One failed worker fails
the step and the rest are killed (their collectives would wait for it). On a cluster the same
entry runs in one pod per worker (docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import IO, Any

import pandas as pd

from components.training.warm_start import TrainingPlan
from recsys.config import TrainingConfig
from recsys.manifests import TrainManifest
from recsys.storage import write_manifest

JOB = ".workers"
STRATEGY = "MultiWorkerMirroredStrategy"
# A killed worker gets this long to exit after SIGTERM before SIGKILL.
KILL_GRACE_SECONDS = 5.0
TAIL_CHARS = 4000


class WorkerFailed(RuntimeError):
    """A training worker exited with an error (the message holds the tail of its output)."""


# --------------------------------------------------------------------------------------------
# The launching side: the train step's process
# --------------------------------------------------------------------------------------------


def tf_config(cluster: Sequence[str], index: int) -> dict[str, Any]:
    """The ``TF_CONFIG`` of worker ``index`` of ``cluster`` (``host:port`` per worker, in order)."""
    return {"cluster": {"worker": list(cluster)}, "task": {"type": "worker", "index": index}}


def loopback_cluster(workers: int) -> list[str]:
    """``127.0.0.1:<port>`` for each worker, on ports free now (the OS picks them)."""
    sockets = []
    try:
        for _ in range(workers):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    finally:
        for s in sockets:
            s.close()


def write_job(
    config: TrainingConfig,
    training_frame: pd.DataFrame,
    items_frame: pd.DataFrame,
    out_dir: Path,
    plan: TrainingPlan | None,
) -> Path:
    """The job folder every worker reads: the frames as Parquet and ``job.json``; returns it.

    On a cluster it must sit on storage every worker's pod mounts, as the step's folder does.
    """
    folder = Path(out_dir) / JOB
    if folder.exists():
        shutil.rmtree(folder)  # a rerun's leftovers
    folder.mkdir(parents=True)
    training_frame.to_parquet(folder / "training_frame.parquet", index=False)
    items_frame.to_parquet(folder / "items.parquet", index=False)
    job = {
        "out_dir": str(Path(out_dir).resolve()),
        "config": config.model_dump(mode="json"),
        "plan": None if plan is None else {k: None if v is None else str(v) for k, v in asdict(plan).items()},
    }
    (folder / "job.json").write_text(json.dumps(job, indent=2))
    return folder


def collect_job(
    folder: Path, config: TrainingConfig, cluster: Sequence[str], seconds: float
) -> dict[str, Any]:
    """Once every worker exited cleanly: the chief's manifest with ``details.distribution``,
    written to the step's folder last; the job folder is removed. Returns the manifest."""
    job = json.loads((folder / "job.json").read_text())
    tasks = []
    for index in range(len(cluster)):
        marker = folder / f"worker-{index}.json"
        if not marker.is_file():
            raise WorkerFailed(f"training worker {index} exited without writing {marker.name}")
        tasks.append(json.loads(marker.read_text()))
    manifest = json.loads((folder / "manifest.chief.json").read_text())
    manifest["details"]["distribution"] = {
        "strategy": STRATEGY,
        "workers": len(cluster),
        "replicas_in_sync": tasks[0]["replicas_in_sync"],
        "global_batch_size": config.batch_size,
        "worker_batch_size": config.batch_size // len(cluster),
        "cluster": list(cluster),
        "tasks": tasks,
        "seconds": round(seconds, 1),
    }
    out_dir = Path(job["out_dir"])
    write_manifest(out_dir, TrainManifest(**manifest))
    shutil.rmtree(folder)
    return TrainManifest(**manifest).model_dump()


def train_on_workers(
    config: TrainingConfig,
    training_frame: pd.DataFrame,
    items_frame: pd.DataFrame,
    out_dir: Path,
    log: Callable[[str], None],
    plan: TrainingPlan | None = None,
) -> dict[str, Any]:
    """``train_models`` in ``config.workers`` processes on loopback; returns the manifest.

    Each worker gets ``TF_CONFIG`` for its index on a cluster of free loopback ports and an
    equal share of this machine's cores. The chief's log lines go to ``log``.

    Raises:
        WorkerFailed: a worker exited with an error (the others are killed; the message names
            the worker, its exit status and the end of its output; the job folder, with every
            worker's output, stays until the step runs again).
    """
    workers = config.workers
    folder = write_job(config, training_frame, items_frame, out_dir, plan)
    cluster = loopback_cluster(workers)
    threads = max(1, (os.cpu_count() or 1) // workers)
    log(
        f"[train] {workers} workers ({STRATEGY}) on {', '.join(cluster)}: batches of "
        f"{config.batch_size} split {workers} ways, {threads} thread(s) each"
    )
    started = time.perf_counter()
    processes: list[subprocess.Popen[bytes]] = []
    relay = None
    try:
        for index in range(workers):
            processes.append(_start_worker(folder, cluster, index, threads))
        chief_out = processes[0].stdout
        assert chief_out is not None
        relay = threading.Thread(target=_relay, args=(chief_out, log), daemon=True)
        relay.start()
        _wait(processes, folder)
    finally:
        _stop(processes)
        if relay is not None:
            relay.join(timeout=KILL_GRACE_SECONDS)
    seconds = time.perf_counter() - started
    log(f"[train] {workers} workers finished in {seconds:.1f}s")
    return collect_job(folder, config, cluster, seconds)


def _start_worker(folder: Path, cluster: Sequence[str], index: int, threads: int) -> subprocess.Popen[bytes]:
    root = Path(__file__).resolve().parents[2]  # the checkout, so the module imports anywhere
    env = {
        **os.environ,
        "TF_CONFIG": json.dumps(tf_config(cluster, index)),
        "TF_USE_LEGACY_KERAS": "1",
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",  # workers sharing this machine share its GPUs too
        "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p),
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", __name__, "--job", str(folder), "--threads", str(threads)]
    # The chief's output comes back through a pipe (``_relay``); the others' goes to files.
    # The child holds its own copies of the files once started.
    with ExitStack() as files:
        stderr = files.enter_context(open(folder / f"worker-{index}.err", "wb"))
        stdout = (
            subprocess.PIPE if index == 0 else files.enter_context(open(folder / f"worker-{index}.out", "wb"))
        )
        return subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr)


def _relay(stream: IO[bytes], log: Callable[[str], None]) -> None:
    """The chief's output lines to ``log``, as they come (read to the end whatever ``log`` does,
    so a full pipe never blocks the chief)."""
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        if line:
            try:
                log(line)
            except Exception:  # a broken log must not stall training
                pass


def _wait(processes: Sequence[subprocess.Popen[bytes]], folder: Path) -> None:
    """Until every worker has exited; the first that fails raises ``WorkerFailed``."""
    pending = set(range(len(processes)))
    while pending:
        for index in sorted(pending):
            code = processes[index].poll()
            if code is None:
                continue
            pending.discard(index)
            if code != 0:
                raise WorkerFailed(
                    f"training worker {index} of {len(processes)} failed (exit status {code}); "
                    f"the end of its output:\n{_tail(folder, index)}"
                )
        time.sleep(0.2)


def _stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """Terminate the workers still running, then kill those that outlive the grace period."""
    running = [p for p in processes if p.poll() is None]
    for p in running:
        p.terminate()
    deadline = time.monotonic() + KILL_GRACE_SECONDS
    for p in running:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _tail(folder: Path, index: int) -> str:
    parts = []
    for name in (f"worker-{index}.out", f"worker-{index}.err"):
        path = folder / name
        if path.is_file():
            text = path.read_bytes()[-TAIL_CHARS:].decode("utf-8", errors="replace").strip()
            if text:
                parts.append(text)
    return "\n".join(parts) or "(no output)"


# --------------------------------------------------------------------------------------------
# The worker side: one process per worker, TF_CONFIG in its environment
# --------------------------------------------------------------------------------------------


def worker_main(argv: Sequence[str] | None = None) -> int:
    """One worker: join the cluster ``TF_CONFIG`` names, fit under the strategy, report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", type=Path, required=True, help="the job folder (write_job)")
    parser.add_argument("--threads", type=int, default=0, help="TensorFlow threads (0: its default)")
    parser.add_argument(
        "--cluster",
        help="every worker's host:port, comma-separated, with --index: the TF_CONFIG to use "
        "(a pod of an indexed Kubernetes Job passes its index); without them TF_CONFIG is read",
    )
    parser.add_argument("--index", type=int, help="this worker's position in --cluster (0: the chief)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if (args.cluster is None) != (args.index is None):
        parser.error("--cluster and --index go together")
    if args.cluster is not None:
        os.environ["TF_CONFIG"] = json.dumps(tf_config(args.cluster.split(","), args.index))

    from components.training.train import fit_models, use_legacy_keras

    use_legacy_keras()
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
    # First, before any other TensorFlow op: the strategy configures the collectives.
    strategy = tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=resolver)
    spec = resolver.cluster_spec()
    index = int(resolver.task_id)
    jobs = spec.jobs
    chief = resolver.task_type == "chief" or (
        resolver.task_type == "worker" and index == 0 and "chief" not in jobs
    )
    workers = sum(spec.num_tasks(job) for job in jobs)

    job = json.loads((args.job / "job.json").read_text())
    config = TrainingConfig(**job["config"])
    plan = _plan(job["plan"])
    frame = pd.read_parquet(args.job / "training_frame.parquet")
    items = pd.read_parquet(args.job / "items.parquet")
    name = f"{resolver.task_type}-{index}"
    out_dir = Path(job["out_dir"]) if chief else args.job / f"scratch-{name}"

    def log(message: str) -> None:
        print(message, flush=True)

    log(f"[train] {name} of {workers}: {strategy.num_replicas_in_sync} replicas in sync")
    with strategy.scope():
        manifest = fit_models(config, frame, items, out_dir, log, plan, chief=chief)
    if chief:
        (args.job / "manifest.chief.json").write_text(manifest.model_dump_json())
    else:
        shutil.rmtree(out_dir, ignore_errors=True)
    marker = {
        "task": name,
        "index": index,
        "chief": chief,
        "workers": workers,
        "replicas_in_sync": strategy.num_replicas_in_sync,
        "pid": os.getpid(),
        "seconds": round(time.perf_counter() - started, 1),
    }
    # The cluster's workers are numbered from the chief's 0 (a separate "chief" task counts first).
    slot = index if chief or "chief" not in jobs else index + 1
    (args.job / f"worker-{slot}.json").write_text(json.dumps(marker))
    return 0


def _plan(data: dict[str, Any] | None) -> TrainingPlan | None:
    if data is None:
        return None
    warm_from = data.get("warm_from")
    return TrainingPlan(**{**data, "warm_from": Path(warm_from) if warm_from else None})


if __name__ == "__main__":
    sys.exit(worker_main())
