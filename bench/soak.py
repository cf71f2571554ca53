"""A bounded soak of a running gateway: open-loop load at a fixed rate, from its own process.

    .venv/bin/python -m bench.soak --url http://127.0.0.1:8080 --rps 100 --seconds 180 \\
        --users-file users.txt --out soak.json

Requests are scheduled at a fixed rate whatever the gateway does (open loop), and each
latency is measured from the moment the request was *due*, not sent, so a stall shows in
the percentiles instead of quietly lowering the rate (no coordinated omission). A share of
the requests (``--event-fraction``) posts one event with the API key from the environment
variable ``--api-key-env``; the rest ask for recommendations for users from
``--users-file`` (or generated ids). The JSON result holds counts, errors by kind, the
achieved rate, latency percentiles per endpoint and the candidate sources seen.
``tests/integration/serving/test_soak.py`` runs it against a gateway and samples the gateway's RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max of ``values`` in ms (nearest rank), or {} when empty."""
    if not values:
        return {}
    v = sorted(values)

    def rank(q: float) -> float:
        return round(v[min(len(v) - 1, max(0, int(round(q * len(v))) - 1))], 2)

    return {"p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99), "max": round(v[-1], 2)}


def run_soak(
    url: str,
    rps: float,
    seconds: float,
    users: list[str],
    api_key: str | None,
    event_fraction: float = 0.1,
    k: int = 10,
    workers: int = 32,
) -> dict[str, Any]:
    """Drive ``url`` at ``rps`` for ``seconds``; return counts, errors and latency percentiles."""
    local = threading.local()
    lock = threading.Lock()
    latencies: dict[str, list[float]] = {"recommendations": [], "events": []}
    errors: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    headers = {"X-API-Key": api_key} if api_key else {}

    def client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=10.0, headers=headers)
        return local.client

    def one(n: int, due: float) -> None:
        is_event = event_fraction > 0 and (n % max(1, round(1 / event_fraction))) == 0
        user = users[n % len(users)]
        kind = "events" if is_event else "recommendations"
        try:
            if is_event:
                body = {
                    "event_id": f"soak-{uuid.uuid4().hex}",
                    "user_id": user,
                    "item_id": "i01",
                    "event_type": "view",
                    "value": 3.0,
                    "ts": datetime.now(UTC).isoformat(),
                    "session_id": f"soak-{user}",
                    "device": "desktop",
                }
                r = client().post("/v1/events", json=body)
            else:
                r = client().post("/v1/recommendations", json={"user_id": user, "k": k})
            elapsed = (time.perf_counter() - due) * 1000
            with lock:
                statuses[f"{kind}:{r.status_code}"] += 1
                if r.status_code >= 300:
                    errors[f"{kind}:{r.status_code}"] += 1
                else:
                    latencies[kind].append(elapsed)
                    if not is_event:
                        sources[r.json().get("candidate_source", "?")] += 1
        except httpx.HTTPError as e:
            with lock:
                errors[f"{kind}:{type(e).__name__}"] += 1

    start = time.perf_counter()
    n = 0
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while True:
            due = start + n / rps
            if due - start >= seconds:
                break
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(one, n, due)
            n += 1
    wall = time.perf_counter() - start
    done = sum(len(v) for v in latencies.values())
    return {
        "target_rps": rps,
        "seconds": round(wall, 1),
        "requests": n,
        "ok": done,
        "achieved_rps": round(done / wall, 1),
        "errors": dict(errors),
        "statuses": dict(statuses),
        "latency_ms": {kind: percentiles(v) for kind, v in latencies.items()},
        "candidate_sources": dict(sources),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--rps", type=float, default=100.0)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--users-file", type=Path)
    p.add_argument("--event-fraction", type=float, default=0.1)
    p.add_argument("--api-key-env", default="RECSYS_API_KEY")
    p.add_argument("--workers", type=int, default=32)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    users = (
        [u for u in args.users_file.read_text().split() if u]
        if args.users_file
        else [f"soak-user-{i}" for i in range(1000)]
    )
    result = run_soak(
        args.url,
        args.rps,
        args.seconds,
        users,
        os.environ.get(args.api_key_env),
        args.event_fraction,
        workers=args.workers,
    )
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
