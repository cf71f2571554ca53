"""A bounded soak of a running gateway: open-loop load at a fixed rate, from its own process.

    .venv/bin/python -m bench.soak --url http://127.0.0.1:8080 --rps 100 --seconds 180 \\
        --users-file users.txt --items-file items.txt --new-user-fraction 0.1 \\
        --expect-source retrieval=0.6:0.85 --expect-source global_popularity=0.05:0.2 \\
        --expect-cold-start 0.05:0.15 --max-p99-ms 3000 --out soak.json

Requests are scheduled at a fixed rate whatever the gateway does (open loop), and each
latency is measured from the moment the request was *due*, not sent, so a stall shows in
the percentiles instead of quietly lowering the rate (no coordinated omission); the schedule
and the light HTTP client are ``bench.open_loop``'s, as ``bench.serving --open-loop`` uses them. A share of
the requests (``--event-fraction``) posts one event with the API key from the environment
variable ``--api-key-env`` (items from ``--items-file``, in turn); the rest ask for
recommendations for users from ``--users-file`` (or generated ids), and a share of those
(``--new-user-fraction``) for a brand-new id each time, one no store has a row for and no
event names, so the cold-start path is part of the load.

The JSON result holds counts, errors by kind, the achieved rate, latency percentiles per
endpoint, the candidate sources seen (counts and shares of the answered recommendations),
the share flagged ``cold_start``, the share that took a fallback, and the arms. Bounds given
on the command line are checked here and reported under ``bounds`` and ``violations``: the
share of each candidate source (``--expect-source NAME=LO:HI``, repeatable), the share of
cold-start answers (``--expect-cold-start LO:HI``), the recommendations' p99
(``--max-p99-ms``), and always zero errors. The exit status is 1 when any bound is broken,
each named on stderr. ``tests/integration/serving/test_soak.py`` runs it against a gateway and
samples the gateway's RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.open_loop import arrivals, drive, http_request, percentiles

# The event item when no ``--items-file`` is given (an id of the tiny generated catalog).
DEFAULT_EVENT_ITEM = "i01"
# The brand-new users' ids start with this.
NEW_USER_PREFIX = "soak-new-"


def parse_band(text: str) -> tuple[float, float]:
    """``"LO:HI"`` as two shares in [0, 1] with LO <= HI."""
    lo_s, sep, hi_s = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO:HI, e.g. 0.6:1.0")
    try:
        lo, hi = float(lo_s), float(hi_s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO:HI, e.g. 0.6:1.0") from e
    if not 0.0 <= lo <= hi <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 <= LO <= HI <= 1")
    return lo, hi


def parse_source_band(text: str) -> tuple[str, tuple[float, float]]:
    """``"NAME=LO:HI"``: a candidate source and the band its share must fall in."""
    name, sep, band = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SOURCE=LO:HI, e.g. retrieval=0.6:1.0")
    return name, parse_band(band)


def _share_bound(name: str, value: float, band: tuple[float, float]) -> dict[str, Any]:
    lo, hi = band
    ok = lo <= value <= hi
    return {
        "bound": f"share of {name} in [{lo:g}, {hi:g}]",
        "value": round(value, 4),
        "ok": ok,
        **({} if ok else {"violation": f"share of {name} is {value:.4f}, outside [{lo:g}, {hi:g}]"}),
    }


def check_bounds(
    result: dict[str, Any],
    sources: dict[str, tuple[float, float]] | None = None,
    cold_start: tuple[float, float] | None = None,
    max_p99_ms: float | None = None,
) -> list[dict[str, Any]]:
    """The bounds on a soak's ``result``, each with its value, ``ok`` and, when broken, a
    ``violation`` naming it. Zero errors is always one of them; a share is of the answered
    recommendations, and a source never seen has share 0."""
    n_errors = sum(result["errors"].values())
    bounds: list[dict[str, Any]] = [
        {
            "bound": "errors == 0",
            "value": n_errors,
            "ok": n_errors == 0,
            **({"violation": f"{n_errors} errors: {result['errors']}"} if n_errors else {}),
        }
    ]
    shares = result["candidate_source_shares"]
    for name, band in (sources or {}).items():
        bounds.append(_share_bound(f"candidate source {name}", shares.get(name, 0.0), band))
    if cold_start is not None:
        bounds.append(_share_bound("cold-start answers", result["cold_start_share"], cold_start))
    if max_p99_ms is not None:
        p99 = result["latency_ms"]["recommendations"].get("p99")
        ok = p99 is not None and p99 <= max_p99_ms
        bounds.append(
            {
                "bound": f"recommendations p99 <= {max_p99_ms:g} ms",
                "value": p99,
                "ok": ok,
                **({} if ok else {"violation": f"recommendations p99 is {p99} ms, over {max_p99_ms:g} ms"}),
            }
        )
    return bounds


def run_soak(
    url: str,
    rps: float,
    seconds: float,
    users: list[str],
    api_key: str | None,
    event_fraction: float = 0.1,
    k: int = 10,
    workers: int = 32,
    new_user_fraction: float = 0.0,
    items: list[str] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Drive ``url`` at ``rps`` for ``seconds``; return counts, errors, latency percentiles and
    what the recommendations answered from (sources, cold start, fallbacks, arms).

    The schedule and the client are ``bench.open_loop``'s (a fixed rate here; at most
    ``workers`` requests in flight, each on a keep-alive connection).
    """
    latencies: dict[str, list[float]] = {"recommendations": [], "events": []}
    errors: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    arms: Counter[str] = Counter()
    flags: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    headers = {"X-API-Key": api_key} if api_key else {}
    host = urlsplit(url).netloc
    event_items = items or [DEFAULT_EVENT_ITEM]
    every = max(1, round(1 / event_fraction)) if event_fraction > 0 else 0
    rng = random.Random(seed)  # which requests ask for a new user, in the order they are due
    schedule = arrivals(rps, seconds)
    is_event = [every > 0 and n % every == 0 for n in range(len(schedule))]
    new_user = [not e and new_user_fraction > 0 and rng.random() < new_user_fraction for e in is_event]
    for e, new in zip(is_event, new_user, strict=True):
        kinds["events" if e else "new_users" if new else "known_users"] += 1

    def request(n: int) -> bytes:
        user = f"{NEW_USER_PREFIX}{uuid.uuid4().hex}" if new_user[n] else users[n % len(users)]
        if is_event[n]:
            body = {
                "event_id": f"soak-{uuid.uuid4().hex}",
                "user_id": user,
                "item_id": event_items[(n // every) % len(event_items)],
                "event_type": "view",
                "value": 3.0,
                "ts": datetime.now(UTC).isoformat(),
                "session_id": f"soak-{user}",
                "device": "desktop",
            }
            return http_request("POST", "/v1/events", host, json.dumps(body).encode(), headers)
        body = {"user_id": user, "k": k}
        return http_request("POST", "/v1/recommendations", host, json.dumps(body).encode(), headers)

    outcomes, start = drive(url, schedule, request, connections=workers, timeout=10.0)
    for o in outcomes:
        kind = "events" if is_event[o.n] else "recommendations"
        if o.error is not None:
            errors[f"{kind}:{o.error}"] += 1
            continue
        statuses[f"{kind}:{o.status}"] += 1
        if o.status >= 300:
            errors[f"{kind}:{o.status}"] += 1
            continue
        try:
            out = json.loads(o.body) if kind == "recommendations" else {}
        except ValueError as e:
            errors[f"{kind}:{type(e).__name__}"] += 1
            continue
        latencies[kind].append(o.latency_ms)
        if kind == "recommendations":
            sources[out.get("candidate_source", "?")] += 1
            arms[out.get("arm", "?")] += 1
            flags["cold_start"] += bool(out.get("cold_start"))
            flags["fallback"] += bool(out.get("fallback"))
    wall = max((o.done for o in outcomes), default=start) - start
    done = sum(len(v) for v in latencies.values())
    answered = len(latencies["recommendations"])
    return {
        "target_rps": rps,
        "seconds": round(wall, 1),
        "requests": len(schedule),
        "requests_by_kind": dict(kinds),  # events; recommendations for known and new users
        "ok": done,
        "achieved_rps": round(done / wall, 1) if wall > 0 else 0.0,
        "errors": dict(errors),
        "statuses": dict(statuses),
        "latency_ms": {kind: percentiles(v) for kind, v in latencies.items()},
        "candidate_sources": dict(sources),
        "candidate_source_shares": {s: round(c / answered, 4) for s, c in sources.items()},
        "cold_start_share": round(flags["cold_start"] / answered, 4) if answered else 0.0,
        "fallback_share": round(flags["fallback"] / answered, 4) if answered else 0.0,
        "arms": dict(arms),
    }


def _ids(path: Path | None) -> list[str] | None:
    return [u for u in path.read_text().split() if u] if path else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--rps", type=float, default=100.0)
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--users-file", type=Path, help="user ids to ask for, one a line (default: made up)")
    p.add_argument("--items-file", type=Path, help=f"item ids events name (default: {DEFAULT_EVENT_ITEM})")
    p.add_argument("--event-fraction", type=float, default=0.1)
    p.add_argument(
        "--new-user-fraction", type=float, default=0.0,
        help="share of the recommendation requests for a brand-new user id",
    )  # fmt: skip
    p.add_argument("--api-key-env", default="RECSYS_API_KEY")
    p.add_argument("--workers", type=int, default=32, help="requests in flight at most (connections)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--expect-source", type=parse_source_band, action="append", default=[], metavar="SOURCE=LO:HI",
        help="band the share of a candidate source must fall in (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--expect-cold-start", type=parse_band, metavar="LO:HI", help="band of the cold-start answers' share"
    )
    p.add_argument("--max-p99-ms", type=float, help="bound on the recommendations' p99 latency")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    users = _ids(args.users_file) or [f"soak-user-{i}" for i in range(1000)]
    result = run_soak(
        args.url,
        args.rps,
        args.seconds,
        users,
        os.environ.get(args.api_key_env),
        args.event_fraction,
        workers=args.workers,
        new_user_fraction=args.new_user_fraction,
        items=_ids(args.items_file),
        seed=args.seed,
    )
    bounds = check_bounds(result, dict(args.expect_source), args.expect_cold_start, args.max_p99_ms)
    result["bounds"] = bounds
    result["violations"] = [b["violation"] for b in bounds if not b["ok"]]
    text = json.dumps(result, indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)
    for v in result["violations"]:
        print(f"soak: bound broken: {v}", file=sys.stderr)
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
