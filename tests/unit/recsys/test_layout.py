"""The run layout: one folder per run and step, keyed by the UTC end of its interval."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from recsys.config import load_settings
from recsys.layout import latest_validated_dir, run_key_for, step_dir


def test_run_key_is_the_utc_date_or_instant_the_interval_ends() -> None:
    assert run_key_for(datetime(2026, 11, 1, tzinfo=UTC)) == "2026-11-01"
    assert run_key_for(datetime(2026, 11, 1, 6, 30, tzinfo=UTC)) == "2026-11-01T063000"
    # A scheduler's naive interval end is UTC.
    assert run_key_for(datetime(2026, 11, 1)) == "2026-11-01"


def test_step_dir_and_latest_validated(tmp_path: Path) -> None:
    settings = load_settings(overrides={"home": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="run the pipeline"):
        latest_validated_dir(settings)
    for key in ("2026-10-31", "2026-11-01", "2026-11-02"):
        folder = step_dir(settings, key, "validate")
        assert folder == tmp_path / "runs" / key / "validate"
        folder.mkdir(parents=True)
        if key != "2026-11-02":  # a run whose validation did not finish has no manifest
            (folder / "manifest.json").write_text("{}")
    assert latest_validated_dir(settings) == step_dir(settings, "2026-11-01", "validate")
