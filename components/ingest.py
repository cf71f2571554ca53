"""Ingest: bring the configured source into the data lake as date-partitioned Parquet.

The step is idempotent per interval: the output folder is replaced, and what is written
depends only on the source and the interval, never on the wall clock. Events after the
interval's end are left out (they belong to a later run).
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from recsys.config import Settings, SourceConfig
from recsys.manifests import IngestManifest
from recsys.storage import read_table, write_data_tables, write_manifest
from recsys.timeutil import to_utc

if TYPE_CHECKING:
    from components.sources.synthetic import GenerateParams


def ingest(settings: Settings, out_dir: Path, interval_end: datetime | None = None) -> dict[str, Any]:
    """Bring ``settings.source`` into ``out_dir`` (users/, items/, events/, manifest.json).

    Args:
        settings: the configuration; ``settings.source`` says what to read.
        out_dir: replaced by this run.
        interval_end: keep events strictly before this time (the run's data interval end);
            None keeps everything.

    Returns:
        The manifest: source, interval and row counts.
    """
    out_dir = Path(out_dir)
    frames = _events_before(_read_source(settings), interval_end)
    frames, served = _with_served_traffic(settings, frames, interval_end)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    if settings.source.kind == "parquet":
        rows = _copy_as_it_came(frames, out_dir)
    else:
        rows = write_data_tables(frames, out_dir)
    if settings.source.kind == "synthetic":
        _write_synthetic_truth(settings, out_dir)
    manifest = IngestManifest(
        path=str(out_dir),
        rows=rows,
        source=settings.source.kind,
        interval_end=str(interval_end),
        served_events=served,
    )
    write_manifest(out_dir, manifest)
    return manifest.model_dump()


def _with_served_traffic(
    settings: Settings, frames: dict[str, pd.DataFrame], interval_end: datetime | None
) -> tuple[dict[str, pd.DataFrame], int]:
    """The source's events plus the lake's served traffic before ``interval_end``; how many
    served events were added. An event the source already holds (same id) is not added again."""
    if not settings.source.served_traffic:
        return frames, 0
    from components.events_export import read_lake_events

    served = read_lake_events(settings, before=interval_end)
    served = served[~served["event_id"].isin(set(frames["events"]["event_id"].astype(str)))]
    if served.empty:
        return frames, 0
    events = pd.concat([frames["events"], served], ignore_index=True)
    return {**frames, "events": events}, len(served)


def _read_source(settings: Settings) -> dict[str, pd.DataFrame]:
    """Users, items and events of the configured source, whole."""
    src = settings.source
    if src.kind == "synthetic":
        from components.sources.synthetic import generate

        return generate(_generate_params(settings))
    if src.kind == "movielens":
        from components.sources.movielens import load_movielens

        frames = load_movielens(_require_path(src.path, "movielens"))
        frames.pop("layout", None)
        return frames
    folder = _require_path(src.path, "parquet")
    return {t: read_table(folder, t) for t in ("users", "items", "events")}


def _generate_params(settings: Settings) -> GenerateParams:
    from components.sources.synthetic import GenerateParams

    g = settings.generate
    return GenerateParams(
        users=g.users,
        items=g.items,
        days=g.days,
        seed=g.seed,
        end_date=g.end_date,
        events_per_user_day=g.events_per_user_day,
        late_user_fraction=g.late_user_fraction,
        late_item_fraction=g.late_item_fraction,
    )


def _write_synthetic_truth(settings: Settings, out_dir: Path) -> None:
    """The truth the synthetic data was sampled from, in ``<out_dir>/truth/`` for the simulator
    (``recsys simulate``); validation and training read only users/, items/ and events/."""
    from components.sources.synthetic import TRUTH_FOLDER, draw_truth, write_truth

    write_truth(draw_truth(_generate_params(settings)), out_dir / TRUTH_FOLDER)


def _events_before(frames: dict[str, pd.DataFrame], interval_end: datetime | None) -> dict[str, pd.DataFrame]:
    """``frames`` with the events at or after ``interval_end`` left out (they belong to a later run)."""
    if interval_end is None:
        return frames
    end = to_utc(interval_end)
    ts = pd.to_datetime(frames["events"]["ts"], utc=True, errors="coerce")
    # Unparseable timestamps are kept: validation quarantines them with the reason.
    return {**frames, "events": frames["events"][ts.isna() | (ts < end)]}


def _copy_as_it_came(frames: dict[str, pd.DataFrame], out_dir: Path) -> dict[str, int]:
    """A foreign drop is copied as it came, types and all: validation judges it."""
    out_dir.mkdir(parents=True)
    for name, df in frames.items():
        (out_dir / name).mkdir()
        df.to_parquet(out_dir / name / "part-0.parquet", index=False)
    return {name: len(df) for name, df in frames.items()}


def source_for_folder(folder: Path) -> SourceConfig:
    """The source that reads ``folder``: a data folder (``users/``, ``items/``, ``events/``, as
    ``recsys data generate`` and ``recsys data import-movielens`` write) or a MovieLens download.

    Raises:
        ValueError: the folder is neither, naming what was looked for.
    """
    from components.sources.movielens import detect_layout

    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--data {folder}: no such folder")
    if all((folder / table).exists() for table in ("users", "items", "events")):
        return SourceConfig(kind="parquet", path=folder)
    try:
        detect_layout(folder)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(
            f"--data {folder}: neither a data folder (users/, items/, events/) nor MovieLens: {e}"
        ) from None
    return SourceConfig(kind="movielens", path=folder)


def interval_end_after_data(settings: Settings) -> datetime:
    """The day after the source's last event (UTC midnight): the interval that holds all of it.

    Raises:
        ValueError: the source holds no event with a readable timestamp.
    """
    events = _read_source(settings)["events"]
    ts = pd.to_datetime(events["ts"], utc=True, errors="coerce").dropna()
    if ts.empty:
        raise ValueError(f"no events with a timestamp in {settings.source.path}")
    return (ts.max().floor("D") + pd.Timedelta(days=1)).to_pydatetime()


def _require_path(path: Path | None, kind: str) -> Path:
    if path is None:
        raise ValueError(f"source.path is required when source.kind={kind!r}")
    return Path(path)
