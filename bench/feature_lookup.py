"""Benchmark: one user's retriever features per request, SQLite and Redis online stores.

Run: `.venv/bin/python -m bench.feature_lookup [--users 10000 --lookups 10000]`.

Builds a store on generated data (10k users, 2k items, 14 days: generator output is
contract-clean, so validation is skipped here), applies and materializes it once per
online store, starting its own redis-server on a free loopback port for the Redis run, then
times ``store.get_online_features(features=store.get_feature_service("retriever_v1"),
entity_rows=[{"user_id": u}]).to_dict()`` for random known users, one at a time.

To see where the time goes on Redis it also times, for the same users:
- ``redis HMGET``: one round trip of redis-py for the user's hash fields (the floor);
- ``direct row read``: that HMGET plus decoding the values: what a serving path that
  reads the user's row itself (one round trip, no Feast request plumbing) would cost.

And one event's real-time push (``push_event``: read the user's recent items, write the new
row), through Feast's ``store.push`` and through ``online_pusher`` (the push source's views
resolved once), ``--pushes`` of each per store.

Prints a table and writes ``results.json`` and ``results.md`` under
``<home>/bench/feature_lookup/`` (home: RECSYS_HOME, default var/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from components.features.store import apply_feature_repo, materialize
from components.features.tables import build_feature_tables
from components.sources.synthetic import GenerateParams, generate_to_folder
from recsys.config import FeaturesConfig, Settings, settings_from_environment
from recsys.feature_schema import RETRIEVER_SERVICE
from recsys.layout import features_dir
from recsys.online_features import get_store, online_pusher, push_event


def _percentiles(samples_s: list[float]) -> dict[str, float]:
    ms = np.asarray(samples_s) * 1000
    return {
        "n": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
    }


def _time(fn: Callable[[str], Any], users: list[str], warmup: int = 200) -> dict[str, float]:
    for u in users[:warmup]:
        fn(u)
    samples = []
    for u in users:
        t0 = time.perf_counter()
        fn(u)
        samples.append(time.perf_counter() - t0)
    # On 2 cores any other busy process shows up in the tail: record the load beside it.
    return {**_percentiles(samples), "loadavg_1m": os.getloadavg()[0]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(workdir: Path) -> tuple[subprocess.Popen, int]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed: run `make system-deps`")
    port = _free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
        + ["--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)
    for _ in range(200):
        try:
            client.ping()
            return proc, port
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.terminate()
    raise SystemExit("redis-server did not start")


def _direct_redis_reader(store: Any, port: int) -> tuple[Callable[[str], Any], Callable[[str], Any]]:
    """(raw HMGET, HMGET + decode) of the retriever's user features, Feast's Redis layout."""
    import redis
    from feast.infra.online_stores.helpers import _mmh3, _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value
    from feast.type_map import feast_value_type_to_python_type

    client = redis.Redis(host="127.0.0.1", port=port)
    service = store.get_feature_service(RETRIEVER_SERVICE)
    names, fields = [], []
    for proj in service.feature_view_projections:
        for f in proj.features:
            names.append(f.name)
            fields.append(_mmh3(f"{proj.name}:{f.name}"))
    project = store.config.project
    version = store.config.entity_key_serialization_version

    def key(user_id: str) -> bytes:
        ek = EntityKey(join_keys=["user_id"], entity_values=[Value(string_val=user_id)])
        return _redis_key(project, ek, version)

    def raw(user_id: str) -> Any:
        return client.hmget(key(user_id), fields)

    def decoded(user_id: str) -> dict[str, Any]:
        out = {}
        for name, blob in zip(names, client.hmget(key(user_id), fields), strict=True):
            if blob is None:
                out[name] = None
                continue
            v = Value()
            v.ParseFromString(blob)
            out[name] = feast_value_type_to_python_type(v)
        return out

    return raw, decoded


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--users", type=int, default=10_000)
    p.add_argument("--items", type=int, default=2_000)
    p.add_argument("--days", type=int, default=14)
    p.add_argument("--lookups", type=int, default=10_000)
    p.add_argument("--pushes", type=int, default=500)
    args = p.parse_args()
    console = Console()
    out_dir = settings_from_environment().home / "bench" / "feature_lookup"
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "date": datetime.now(UTC).date().isoformat(),
        "machine": _machine(),
        "data": {"users": args.users, "items": args.items, "days": args.days},
        "lookups": args.lookups,
        "rows": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        with console.status(f"generating {args.users:,} users, {args.items:,} items, {args.days} days"):
            gen = generate_to_folder(
                GenerateParams(
                    users=args.users,
                    items=args.items,
                    days=args.days,
                    seed=7,
                    end_date=datetime(2026, 11, 1, tzinfo=UTC),
                ),
                tmp_path / "raw",
            )
        results["data"]["events"] = gen["rows"]["events"]
        rng = np.random.default_rng(0)
        redis_proc, port = _start_redis(tmp_path)
        try:
            for kind in ("sqlite", "redis"):
                settings = Settings(
                    home=tmp_path / kind,
                    features=FeaturesConfig(online_store=kind, redis_connection_string=f"127.0.0.1:{port}"),
                )
                with console.status(f"[{kind}] build, apply, materialize"):
                    build_feature_tables(settings.features, tmp_path / "raw", features_dir(settings))
                    apply_feature_repo(settings)
                    t0 = time.perf_counter()
                    materialize(settings)
                    results.setdefault("materialize_s", {})[kind] = time.perf_counter() - t0
                store = get_store(settings)
                service = store.get_feature_service(RETRIEVER_SERVICE)
                user_ids = _known_users(settings)
                users = list(rng.choice(user_ids, size=args.lookups))

                def feast_lookup(u: str, store: Any = store, service: Any = service) -> Any:
                    return store.get_online_features(features=service, entity_rows=[{"user_id": u}]).to_dict()

                sample = feast_lookup(users[0])
                assert sample["user_events_30d"][0] is not None, "materialized user has no features"
                with console.status(f"[{kind}] {args.lookups:,} get_online_features"):
                    results["rows"][f"{kind}: Feast get_online_features (retriever_v1)"] = _time(
                        feast_lookup, users
                    )
                with console.status(f"[{kind}] {args.pushes:,} pushes each way"):
                    results["rows"].update(_time_pushes(kind, store, users[: args.pushes]))
                if kind == "redis":
                    raw, decoded = _direct_redis_reader(store, port)
                    assert decoded(users[0])["user_events_30d"] == sample["user_events_30d"][0]
                    with console.status("[redis] raw reads"):
                        results["rows"]["redis: HMGET only (redis-py round trip)"] = _time(raw, users)
                        results["rows"]["redis: direct row read (HMGET + decode)"] = _time(decoded, users)
        finally:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)

    t = Table(title=f"one user's {RETRIEVER_SERVICE} features, {args.lookups:,} look-ups ({_machine()})")
    for c in ("path", "p50 ms", "p95 ms", "p99 ms", "mean ms", "load 1m"):
        t.add_column(c, justify="left" if c == "path" else "right")
    md = [
        "| path | p50 ms | p95 ms | p99 ms | mean ms | load 1m |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results["rows"].items():
        cells = [f"{r[k]:.3f}" for k in ("p50_ms", "p95_ms", "p99_ms", "mean_ms")] + [
            f"{r['loadavg_1m']:.2f}"
        ]
        t.add_row(name, *cells)
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    console.print(t)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out_dir / "results.md").write_text("\n".join(md) + "\n")
    console.print(f"results: {out_dir / 'results.json'}")


def _time_pushes(kind: str, store: Any, users: list[str]) -> dict[str, dict[str, float]]:
    """One click's ``push_event`` per user, through ``store.push`` and through ``online_pusher``."""
    write = online_pusher(store)

    def click(u: str) -> dict[str, Any]:
        return {
            "user_id": u,
            "item_id": "i-pushed",
            "event_type": "click",
            "ts": datetime.now(UTC),
            "session_id": "s",
        }

    return {
        f"{kind}: push_event through Feast's store.push": _time(lambda u: push_event(store, click(u)), users),
        f"{kind}: push_event through online_pusher": _time(
            lambda u: push_event(store, click(u), write=write), users
        ),
    }


def _known_users(settings: Settings) -> list[str]:
    import pandas as pd

    return sorted(pd.read_parquet(features_dir(settings) / "user_profile", columns=["user_id"])["user_id"])


def _machine() -> str:
    model = "unknown CPU"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        model = next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")
        )
    except (OSError, StopIteration, subprocess.SubprocessError):
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.machine()}"


if __name__ == "__main__":
    main()
