"""The pipeline's steps in order, run in-process: what `recsys pipeline run` and the DAG call.

Each ``run_<step>`` takes the settings and the run's interval, reads the outputs of the
steps before it from the run's folder ``<home>/runs/<run_key>/<step>/``, writes its own
there (replacing a previous attempt of the same interval) and returns the manifest.
The Airflow tasks of ``dags/training_pipeline.py`` each call one of these functions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
from rich.console import Console
from rich.table import Table

from components.config import Settings
from components.storage import read_manifest


def run_key_for(interval_end: datetime) -> str:
    """A run's folder name: the UTC date (and time, if not midnight) its interval ends."""
    ts = pd.Timestamp(interval_end)
    ts = ts.tz_convert("UTC") if ts.tzinfo else ts.tz_localize("UTC")
    return ts.strftime("%Y-%m-%d") if ts == ts.normalize() else ts.strftime("%Y-%m-%dT%H%M%S")


def step_dir(settings: Settings, run_key: str, step: str) -> Path:
    return settings.run_dir(run_key) / step


def run_ingest(settings: Settings, interval_end: datetime) -> dict[str, Any]:
    """Ingest the configured source, events before ``interval_end``."""
    from components.ingest import ingest

    return ingest(settings, step_dir(settings, run_key_for(interval_end), "ingest"), interval_end)


def run_validate(settings: Settings, interval_end: datetime) -> dict[str, Any]:
    """Validate the ingested drop; timestamps may not pass ``interval_end``."""
    from components.validation import validate_data

    key = run_key_for(interval_end)
    ingested = step_dir(settings, key, "ingest")
    read_manifest(ingested)  # fails clearly when ingest has not finished
    return validate_data(
        settings.validation, ingested, step_dir(settings, key, "validate"), as_of=interval_end
    )


def validated_dir(settings: Settings, interval_end: datetime) -> Path:
    """The run's validated data; fails clearly when validation has not finished."""
    out = step_dir(settings, run_key_for(interval_end), "validate")
    manifest = read_manifest(out)
    if manifest.get("status") != "passed":
        raise RuntimeError(f"validation of {out} did not pass: {manifest.get('errors')}")
    return out


def run_build_features(settings: Settings, interval_end: datetime) -> dict[str, Any]:
    """Compute the feature tables from the run's validated data, days before ``interval_end``."""
    from components.features import build_feature_tables, features_dir

    return build_feature_tables(
        settings.features, validated_dir(settings, interval_end), features_dir(settings), end=interval_end
    )


def run_apply_features(settings: Settings, interval_end: datetime) -> dict[str, Any]:
    """Register feature_repo/ in the Feast registry (`feast apply`); idempotent."""
    from components.features import apply_feature_repo

    del interval_end  # the repo's definitions do not depend on the interval
    return apply_feature_repo(settings)


def run_materialize(settings: Settings, interval_end: datetime) -> dict[str, Any]:
    """Load feature rows up to the interval's end into the online store."""
    from components.features import materialize

    # Feast's materialize window is inclusive; the last snapshot of the interval is stamped
    # at the last microsecond before its end.
    end = pd.Timestamp(interval_end) - pd.Timedelta(microseconds=1)
    return materialize(settings, end=end.to_pydatetime())


# The steps in the order the DAG runs them.
STEPS: list[tuple[str, Callable[[Settings, datetime], dict[str, Any]]]] = [
    ("ingest", run_ingest),
    ("validate", run_validate),
    ("build_features", run_build_features),
    ("apply_features", run_apply_features),
    ("materialize", run_materialize),
]


def run_pipeline(
    settings: Settings, interval_end: datetime, console: Console | None = None
) -> dict[str, dict[str, Any]]:
    """Run every step in order for one interval; returns each step's manifest."""
    console = console or Console(stderr=True)
    manifests: dict[str, dict[str, Any]] = {}
    for i, (name, step) in enumerate(STEPS, start=1):
        t0 = time.perf_counter()
        with console.status(f"[{i}/{len(STEPS)}] {name}"):
            manifests[name] = step(settings, interval_end)
        console.print(f"[green]✓[/green] {name} ({time.perf_counter() - t0:.1f}s)")
    return manifests


def run_demo(settings: Settings, console: Console) -> dict[str, Any]:
    """Run the pipeline on the embedded synthetic data and print what a person looks at.

    Later steps (features, training, serving) join as they land; each prints its summary.
    """
    started = time.perf_counter()
    interval_end = settings.generate.end_date
    console.print(
        f"recsys demo: {settings.generate.users:,} users, {settings.generate.items:,} items, "
        f"{settings.generate.days} days of synthetic events; state in {settings.home}"
    )
    manifests = run_pipeline(settings, interval_end, console)
    val = manifests["validate"]
    t = Table(title="data in")
    for c in ("table", "ingested", "accepted", "quarantined"):
        t.add_column(c, justify="left" if c == "table" else "right")
    for name, row in val["tables"].items():
        t.add_row(name, f"{row['input']:,}", f"{row['accepted']:,}", f"{row['quarantined']:,}")
    console.print(t)
    console.print(f"validation report: {val['report']}")
    console.print(f"done in {time.perf_counter() - started:.1f}s")
    return manifests
