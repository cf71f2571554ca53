"""A bounded soak: the gateway at the throughput target for a minute, from a load process.

The model server and the gateway run as in production (subprocesses on loopback, gRPC
between them); ``bench.soak`` runs in a process of its own and drives the gateway open-loop
at ``SOAK_RPS`` (default 100 req/s, BENCHMARKS.md's throughput target) for ``SOAK_SECONDS``
(default 60): 10% posted events (fsync per commit); of the recommendations, 90% for users
with history (the full path: features, retrieval, ranking of every candidate, MMR,
impressions) and 10% for a brand-new user id each (no row in any store: cold start).
Meanwhile the test samples the gateway's RSS every second.

The home is the session's tiny one (82 items, 200 users) by default. ``SOAK_ITEMS`` and
``SOAK_USERS`` (either one set turns the scale mode on; the other then defaults to 100,000)
make the test build its own home with the project's generator at that size
(``tests.support.homes.build_scale_home``: validation, feature tables, ``feast apply`` and
materialization, the small training setting, a ScaNN index, two pushes); that takes several
minutes at 100k x 100k. With ``SOAK_BUILD_DIR`` the scale home is built there once and reused.

Proves, each bound checked by ``bench.soak`` itself (its ``bounds`` in the JSON, exit status 1
and the broken ones named when any fails):

- no errors at all under real load (at least half the scheduled rate completed; the rate a
  machine sustains is measured by ``bench.soak``, BENCHMARKS.md "Soak");
- where the answers came from, as shares of the answered recommendations: retrieval answers
  most (at least ``RETRIEVAL_MIN``) and never more than the share of requests it may answer
  (users with history outside the holdout arm); every brand-new id, and nothing else, is
  answered from global popularity and flagged cold start (outside the holdout arm); the
  holdout arm's users with history get segment popularity; exact search and the
  cold-start neighbours stay near zero;
- the recommendations' p99 is under ``MAX_P99_MS`` (``SOAK_MAX_P99_MS``);
- memory is flat once warm (the least-squares slope of RSS over the run's last 70% projects
  less growth than the tolerance).

The JSON is printed, and written to ``SOAK_REPORT`` when set.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from serving.gateway.policy import assign_arm
from tests.support.homes import build_scale_home, copy_home
from tests.support.paths import REPO
from tests.support.servers import API_KEY, FRACTIONS, gateway_env, scann_model_server_flags, serving

pytestmark = pytest.mark.integration

RPS = float(os.environ.get("SOAK_RPS", "100"))
SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
SCALE = bool(os.environ.get("SOAK_ITEMS") or os.environ.get("SOAK_USERS"))
SCALE_ITEMS = int(os.environ.get("SOAK_ITEMS") or 100_000)
SCALE_USERS = int(os.environ.get("SOAK_USERS") or 100_000)
# Share of the recommendation requests for a brand-new user id.
NEW_USER_FRACTION = 0.1
# Retrieval's least share of the answers: most of them. It could answer ~81% (the 90% with
# history, less the holdout arm's ~10%); the rest of that gap is requests that passed the
# gateway's model deadline on an oversubscribed CPU and were answered from popularity (marked
# as fallbacks). Measured on 2 shared cores (BENCHMARKS.md, "Soak", 2026-12-04): 0.60 at a load
# average of 11, 0.72 at 9, 0.78 on the 100k x 100k home; below 0.5, more than a third of
# the model path's requests missed the deadline.
RETRIEVAL_MIN = 0.5
# Bound on the recommendations' p99 (ms). Measured on 2 cores shared by the two servers, the
# load process and other jobs (load average 6 to 11): 1,450 and 2,589 ms on the tiny home, 1,253
# on the 100k x 100k one; the tail is queueing on the oversubscribed CPU, not work per request.
# Twice the worst of those, and half the load's 10 s client timeout: a stall of seconds, or a
# gateway that falls behind the rate and queues without bound, breaks it.
MAX_P99_MS = float(os.environ.get("SOAK_MAX_P99_MS", "5000"))
# Flat memory: projected growth over the measured window below this (MB), or this fraction
# of the gateway's RSS, whichever is larger. Allocator noise on a ~1 GB process is ~10 MB.
RSS_GROWTH_MB = 25.0
# The least load that still makes the run a soak, as a fraction of the scheduled rate.
MIN_LOAD_FRACTION = 0.5
RSS_GROWTH_FRACTION = 0.03


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def slope_per_s(t: list[float], y: list[float]) -> float:
    """Least-squares slope of y over t."""
    n = len(t)
    mt, my = sum(t) / n, sum(y) / n
    den = sum((a - mt) ** 2 for a in t)
    return sum((a - mt) * (b - my) for a, b in zip(t, y, strict=True)) / den if den else 0.0


def scale_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The scale mode's built home (reused from ``SOAK_BUILD_DIR`` when built there before)
    and how it was built."""
    build_dir = Path(os.environ.get("SOAK_BUILD_DIR") or tmp_path_factory.mktemp("soak_scale"))
    home, record = build_dir / "home", build_dir / "build.json"
    wanted = {"items": SCALE_ITEMS, "users": SCALE_USERS}
    if record.is_file() and {k: json.loads(record.read_text())[k] for k in wanted} == wanted:
        return home, json.loads(record.read_text())
    assert not home.exists(), f"{home} holds an unfinished or other build: remove it"
    seconds = build_scale_home(home, users=SCALE_USERS, items=SCALE_ITEMS)
    record.write_text(json.dumps({**wanted, "build_s": seconds}))
    return home, json.loads(record.read_text())


@pytest.fixture(scope="module")
def soak_env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    if SCALE:
        template, build = scale_template(tmp_path_factory)
    else:
        template, build = request.getfixturevalue("gateway_template"), {}
    home = tmp_path_factory.mktemp("soak") / "home"
    settings = copy_home(template, home)
    with serving(scann_model_server_flags(settings), home, gateway_env(home)) as running:
        yield {
            "home": home,
            "settings": settings,
            "build": build,
            "url": running.url,
            "gateway": running.gateway,
            "server": running.model_server,
        }


def expected_sources(users: list[str], salt: str) -> list[str]:
    """``bench.soak`` bounds on where the answers come from, for requests cycling over ``users``
    (all with history) plus ``NEW_USER_FRACTION`` of brand-new ids."""
    known, new = 1.0 - NEW_USER_FRACTION, NEW_USER_FRACTION
    holdout = sum(assign_arm(u, FRACTIONS, salt) == "holdout" for u in users) / len(users)
    model_arms = known * (1.0 - holdout)  # the most retrieval can answer
    bands = {
        "retrieval": (RETRIEVAL_MIN, min(1.0, model_arms + 0.02)),
        # Holdout users with history, plus the requests that fell back from retrieval.
        "segment_popularity": (0.5 * known * holdout, 1.0 - RETRIEVAL_MIN),
        # A brand-new id has no segment: global popularity, whatever its arm.
        "global_popularity": (0.5 * new, min(1.0, 1.5 * new + 0.02)),
        # Neighbours of recent items for users with too few events: rare in this traffic.
        "cold_start": (0.0, 0.05),
        # For a model server without ScaNN's ops; this one has them.
        "exact": (0.0, 0.02),
    }
    args = [f"{name}={lo:.4f}:{hi:.4f}" for name, (lo, hi) in bands.items()]
    cold = (0.5 * new * (1.0 - FRACTIONS["holdout"]), min(1.0, new + 0.05))
    return [
        *(a for arg in args for a in ("--expect-source", arg)),
        "--expect-cold-start", f"{cold[0]:.4f}:{cold[1]:.4f}",
    ]  # fmt: skip


def test_soak_at_the_throughput_target(soak_env: dict[str, Any], tmp_path: Path) -> None:
    settings = soak_env["settings"]
    events = pd.read_parquet(settings.validated_dir / "events", columns=["user_id", "event_type"])
    counts = events[events["event_type"] != "impression"]["user_id"].value_counts()
    known = counts[counts >= settings.gateway.cold_start_min_events].index.to_series()
    # Shuffled, so a run that reaches only part of a large list asks for a fair sample of it.
    known_users = known.sample(frac=1.0, random_state=0).astype(str).tolist()
    users, items = tmp_path / "users.txt", tmp_path / "items.txt"
    users.write_text("\n".join(known_users))
    item_ids = pd.read_parquet(settings.validated_dir / "items", columns=["item_id"])["item_id"]
    items.write_text("\n".join(item_ids))
    bounds = [
        *expected_sources(known_users, settings.gateway.arm_salt), "--max-p99-ms", str(MAX_P99_MS),
    ]  # fmt: skip
    result_path = tmp_path / "soak.json"
    load = subprocess.Popen(
        [
            sys.executable, "-m", "bench.soak", "--url", soak_env["url"], "--rps", str(RPS),
            "--seconds", str(SECONDS), "--users-file", str(users), "--items-file", str(items),
            "--new-user-fraction", str(NEW_USER_FRACTION), *bounds, "--out", str(result_path),
        ],
        env={**os.environ, "RECSYS_API_KEY": API_KEY}, cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    pid = soak_env["gateway"].pid
    start = time.monotonic()
    samples: list[tuple[float, float]] = []
    while load.poll() is None:
        samples.append((time.monotonic() - start, rss_mb(pid)))
        time.sleep(1.0)
    _, stderr = load.communicate()
    assert result_path.is_file(), stderr[-3000:]
    result = json.loads(result_path.read_text())

    warm = [(t, m) for t, m in samples if t >= 0.3 * SECONDS]
    slope = slope_per_s([t for t, _ in warm], [m for _, m in warm])
    window = warm[-1][0] - warm[0][0]
    median = sorted(m for _, m in warm)[len(warm) // 2]
    growth = slope * window
    tolerance = max(RSS_GROWTH_MB, RSS_GROWTH_FRACTION * median)
    result["home"] = {
        "items": len(item_ids),
        "users": int(len(pd.read_parquet(settings.validated_dir / "users", columns=["user_id"]))),
        "users_with_history": len(known_users),
        "events": len(events),
        **soak_env["build"],
    }
    result["gateway_rss_mb"] = {
        "start": round(samples[0][1], 1),
        "warm_first": round(warm[0][1], 1),
        "warm_last": round(warm[-1][1], 1),
        "max": round(max(m for _, m in samples), 1),
        "slope_mb_per_min": round(slope * 60, 3),
        "projected_growth_mb": round(growth, 1),
        "tolerance_mb": round(tolerance, 1),
    }
    result["model_server_rss_mb"] = round(rss_mb(soak_env["server"].pid), 1)
    result["load_1m_after"] = os.getloadavg()[0]
    report = json.dumps(result, indent=2)
    print(report)
    if os.environ.get("SOAK_REPORT"):
        Path(os.environ["SOAK_REPORT"]).write_text(report)

    # Zero errors, the share of each candidate source and of cold start, the p99: all checked
    # by bench.soak (one bound per source, cold start, p99 and errors).
    assert len(result["bounds"]) == len(bounds) // 2 + 1, result["bounds"]
    assert result["violations"] == [] and load.returncode == 0, (result["violations"], stderr[-3000:])
    # Whether the machine sustains the target rate is a benchmark's question (bench/soak,
    # BENCHMARKS.md), not a test's: here the load must only be real load for the whole run,
    # so that the memory slope and the bounds above were measured under it.
    assert result["achieved_rps"] >= MIN_LOAD_FRACTION * RPS, f"drove only {result['achieved_rps']} req/s"
    assert result["requests_by_kind"]["new_users"] > 0
    assert growth < tolerance, f"RSS grows {slope * 60:.2f} MB/min: {growth:.1f} MB over {window:.0f}s"
