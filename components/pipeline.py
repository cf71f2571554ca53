"""The pipeline as one in-process run: the same step functions, in the order the DAG runs them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from components.config import Settings


def run_demo(settings: Settings, console: Console) -> dict[str, Any]:
    """Generate the embedded synthetic data, validate it, and print a summary.

    Later steps (features, training, serving) join here as they land; each prints what a
    person would look at.
    """
    from components.generate import GenerateParams, generate_to_folder
    from components.validation import validate_data

    g = settings.generate
    started = time.perf_counter()
    timings: dict[str, float] = {}
    raw = settings.raw_dir
    with console.status(f"[1/2] generating {g.users} users, {g.items} items, {g.days} days"):
        t0 = time.perf_counter()
        gen = generate_to_folder(
            GenerateParams(
                users=g.users,
                items=g.items,
                days=g.days,
                seed=g.seed,
                end_date=g.end_date,
                events_per_user_day=g.events_per_user_day,
                late_user_fraction=g.late_user_fraction,
                late_item_fraction=g.late_item_fraction,
            ),
            raw,
        )
        timings["generate"] = time.perf_counter() - t0
    console.print(f"[green]✓[/green] generated {_fmt_rows(gen['rows'])} -> {raw}")
    with console.status("[2/2] validating with Great Expectations"):
        t0 = time.perf_counter()
        val = validate_data(settings.validation, raw, settings.validated_dir, as_of=g.end_date)
        timings["validate"] = time.perf_counter() - t0
    console.print(f"[green]✓[/green] validated -> {settings.validated_dir}")

    t = Table(title="recsys demo: data in")
    for c in ("table", "generated", "accepted", "quarantined"):
        t.add_column(c, justify="left" if c == "table" else "right")
    for name, row in val["tables"].items():
        t.add_row(name, f"{row['input']:,}", f"{row['accepted']:,}", f"{row['quarantined']:,}")
    console.print(t)
    console.print(f"validation report: {Path(val['report'])}")
    console.print(
        "timings: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items())
        + f"; total {time.perf_counter() - started:.1f}s"
    )
    return {"generate": gen, "validate": val, "timings": timings}


def _fmt_rows(rows: dict[str, int]) -> str:
    return ", ".join(f"{v:,} {k}" for k, v in rows.items())
