"""Reading and writing the data lake: Parquet datasets and manifests.

A data folder holds ``users/``, ``items/`` and ``events/``; each is a Parquet dataset that
``pandas.read_parquet(DIR / "events")`` reads whole. Events are split into one file per
UTC day (``events/day=YYYY-MM-DD.parquet``), so one interval can be rewritten on its own
and re-running an interval replaces exactly its files. File names, not Hive folders, carry
the day: readers then see only the contract's columns.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.contracts import CONTRACTS, TableContract, conform
from recsys.manifests import DataFolderManifest, StepManifest


def write_table(df: pd.DataFrame, out_dir: Path, contract: TableContract) -> list[Path]:
    """Write a contract-shaped frame as a dataset folder, replacing what was there.

    Events are split by UTC day of ``ts``; users and items are one file. Rows are sorted by
    time then key, so the same rows always give byte-identical files.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    df = conform(df, contract).sort_values([contract.time_column, contract.key], kind="stable")
    df = df.reset_index(drop=True)
    if contract.name != "events":
        return [_write_file(df, out_dir / "part-0.parquet")]
    if df.empty:
        return [_write_file(df, out_dir / "day=empty.parquet")]
    days = df[contract.time_column].dt.strftime("%Y-%m-%d")
    return [
        _write_file(part.reset_index(drop=True), out_dir / f"day={day}.parquet")
        for day, part in df.groupby(days, sort=True)
    ]


def _write_file(df: pd.DataFrame, path: Path) -> Path:
    table = pa.Table.from_pandas(df, preserve_index=False)
    # Write to a temporary name, then rename: a reader never sees half a file.
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return path


def read_table(data_dir: Path, table: str, columns: list[str] | None = None) -> pd.DataFrame:
    """Read one table of a data folder as written by ``write_table`` (or by a foreign tool)."""
    path = Path(data_dir) / table
    if not path.exists():
        raise FileNotFoundError(f"{table}: no dataset at {path}")
    return pd.read_parquet(path, columns=columns)


def write_data_tables(frames: Mapping[str, pd.DataFrame], out_dir: Path) -> dict[str, int]:
    """Write each table of ``frames`` (users, items, events) under ``out_dir``; rows per table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, df in frames.items():
        write_table(df, out_dir / name, CONTRACTS[name])
        counts[name] = len(df)
    return counts


def write_data_folder(
    frames: dict[str, pd.DataFrame], out_dir: Path, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write users, items and events plus ``manifest.json`` with row counts."""
    rows = write_data_tables(frames, out_dir)
    manifest = DataFolderManifest(path=str(out_dir), rows=rows, **(extra or {}))
    write_manifest(out_dir, manifest)
    return manifest.model_dump()


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(out_dir: Path, manifest: StepManifest | Mapping[str, Any]) -> Path:
    """Write ``manifest.json`` last and atomically: its presence marks the folder complete."""
    out_dir = Path(out_dir)
    content = manifest.model_dump() if isinstance(manifest, StepManifest) else dict(manifest)
    path = out_dir / "manifest.json"
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".manifest.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(content, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no manifest.json in {folder}: the step that writes it did not finish"
        )
    return json.loads(path.read_text())


def code_version() -> str:
    """The git commit of the code, or "unknown" outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"

