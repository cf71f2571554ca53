"""Benchmark: the gateway's CPU per request under the soak's mix (recommendations and events).

Run: `.venv/bin/python -m bench.mixed_load [--rps 100 --seconds 60 --event-fraction 0.1]`.

Serves a copy of the `bench/serving` home (100k items; built by `python -m bench.serving` when
missing, with an empty event log so runs compare) through the model server and the gateway,
then runs `bench.soak` against it in a process of its own: open loop at `--rps`, a share of
the requests posting one event each with the API key (durable append, then the online push),
the rest asking for recommendations for the home's warm users. Reports the gateway's CPU per
request over the soak (`/proc` counters: everything the process did, the event pushes of its
background thread included), the latency percentiles per endpoint and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from bench.serving import _cpu_ms, _machine, model_server_flags, speed_probe

API_KEY_ENV = "RECSYS_API_KEY"


def _prepared_home(source: Path, home: Path) -> None:
    """A copy of ``source`` without its event log and logs, with the soak's user and item files."""
    import pandas as pd

    if home.exists():
        shutil.rmtree(home)
    shutil.copytree(source, home, ignore=shutil.ignore_patterns("events.db*", "*.log"))
    users = json.loads((home / "load_users.json").read_text())
    (home / "users.txt").write_text("\n".join(users) + "\n")
    items = pd.read_parquet(home / "data" / "validated" / "items", columns=["item_id"])["item_id"]
    (home / "items.txt").write_text("\n".join(items.astype(str).sample(5000, random_state=0)) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rps", type=float, default=100.0)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--event-fraction", type=float, default=0.1)
    p.add_argument("--source", type=Path, default=None, help="default <RECSYS_HOME or var>/bench/serving")
    args = p.parse_args()

    from entrypoints.local_servers import local_serving, server_environment

    base = Path(os.environ.get("RECSYS_HOME", "var")).resolve() / "bench"
    source = args.source or base / "serving"
    if not (source / "models" / "models.config").is_file():
        subprocess.run(
            [sys.executable, "-m", "bench.serving", "--home", str(source), "--seconds", "1"], check=True
        )
    home = base / "mixed_load"
    _prepared_home(source, home)
    key = os.environ.get(API_KEY_ENV) or "bench-mixed-load"
    env = {**server_environment(), "RECSYS_HOME": str(home), API_KEY_ENV: key}
    flags = model_server_flags(home)
    probe_ms = speed_probe()
    out = home / "soak.json"
    with local_serving(
        flags, home, ready_model="retrieval", env=env, model_server_timeout_s=600, gateway_timeout_s=600
    ) as serving:
        pid = serving.gateway.pid
        cpu_before, load_before = _cpu_ms(pid), os.getloadavg()[0]
        soak = [
            sys.executable, "-m", "bench.soak", "--url", serving.url, "--rps", str(args.rps),
            "--seconds", str(args.seconds), "--event-fraction", str(args.event_fraction),
            "--users-file", str(home / "users.txt"), "--items-file", str(home / "items.txt"),
            "--api-key-env", API_KEY_ENV, "--out", str(out),
        ]  # fmt: skip
        subprocess.run(soak, env={**os.environ, API_KEY_ENV: key}, check=False)
        cpu_ms, load_after = _cpu_ms(pid) - cpu_before, os.getloadavg()[0]
    result = json.loads(out.read_text())
    summary = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": _machine(),
        "speed_probe_ms": round(probe_ms, 1),
        "rps": args.rps,
        "event_fraction": args.event_fraction,
        "requests": result["requests"],
        "achieved_rps": result["achieved_rps"],
        "errors": result["errors"],
        "latency_ms": result["latency_ms"],
        "gateway_cpu_ms_per_request": round(cpu_ms / result["requests"], 2),
        "load_1m": [round(load_before, 1), round(load_after, 1)],
    }
    (home / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
