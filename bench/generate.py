"""Benchmark: the synthetic generator at the issue's scale (100k users, 20k items, ~5M events).

Run: `.venv/bin/python -m bench.generate [--users N --items M --days D --events-per-user-day X]`.
Prints a table (wall time, rows, events/s, peak memory) to paste into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import platform
import resource
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from components.sources.synthetic import GenerateParams, generate_to_folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--users", type=int, default=100_000)
    p.add_argument("--items", type=int, default=20_000)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--events-per-user-day", type=float, default=2.3)
    args = p.parse_args()
    console = Console()
    params = GenerateParams(
        users=args.users,
        items=args.items,
        days=args.days,
        seed=7,
        end_date=datetime(2026, 11, 1, tzinfo=UTC),
        events_per_user_day=args.events_per_user_day,
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        with console.status("generating"):
            manifest = generate_to_folder(params, Path(tmp) / "raw")
        seconds = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in (Path(tmp) / "raw").rglob("*.parquet"))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    t = Table(title=f"generator on {platform.node()} ({platform.machine()})")
    for c in ("users", "items", "events", "wall s", "events/s", "Parquet MB", "peak RSS GB"):
        t.add_column(c, justify="right")
    rows = manifest["rows"]
    t.add_row(
        f"{rows['users']:,}",
        f"{rows['items']:,}",
        f"{rows['events']:,}",
        f"{seconds:.1f}",
        f"{rows['events'] / seconds:,.0f}",
        f"{size / 1e6:.0f}",
        f"{peak_gb:.1f}",
    )
    console.print(t)


if __name__ == "__main__":
    main()
