"""Where things live: the repository's own folders and the run layout under ``settings.home``.

Every step writes ``<home>/runs/<run_key>/<step>/`` with its ``manifest.json`` last; the run key
is the UTC date (and time, if not midnight) its interval ends. Feature tables live under
``<home>/features``, canary decisions under ``<home>/canary``, the event log's export under
``<home>/lake/events``. The pipeline, batch recommend,
the gateway and the canary analysis all find each other's outputs through these functions.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from recsys.timeutil import to_utc

if TYPE_CHECKING:
    from recsys.config import Settings

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf"
FEATURE_REPO_DIR = REPO_ROOT / "feature_repo"
DAGS_DIR = REPO_ROOT / "dags"
MANIFEST = "manifest.json"


def run_key_for(interval_end: datetime) -> str:
    """A run's folder name: the UTC date (and time, if not midnight) its interval ends."""
    ts = to_utc(interval_end)
    return ts.strftime("%Y-%m-%d") if ts == ts.normalize() else ts.strftime("%Y-%m-%dT%H%M%S")


def step_dir(settings: Settings, run_key: str, step: str) -> Path:
    """``<home>/runs/<run_key>/<step>``: one step's outputs for one run."""
    return settings.run_dir(run_key) / step


def features_dir(settings: Settings) -> Path:
    """Where the feature tables live: ``<home>/features``."""
    return settings.home / "features"


def canary_dir(settings: Settings) -> Path:
    """Canary decisions, their reports and analyses: ``<home>/canary``."""
    return settings.home / "canary"


def lake_events_dir(settings: Settings) -> Path:
    """The event log's export: ``<home>/lake/events``, one ``date=YYYY-MM-DD/`` folder per UTC day."""
    return settings.home / "lake" / "events"


def lake_events_day_dir(settings: Settings, day: str) -> Path:
    """One exported day of events: ``<home>/lake/events/date=<day>/``."""
    return lake_events_dir(settings) / f"date={day}"


def latest_validated_dir(settings: Settings) -> Path:
    """The validated data of the latest pipeline run (``<home>/runs/<key>/validate``)."""
    runs = sorted(p for p in settings.runs_dir.glob("*/validate") if (p / MANIFEST).is_file())
    if runs:
        return runs[-1]
    if (settings.validated_dir / MANIFEST).is_file():
        return settings.validated_dir
    raise FileNotFoundError(
        f"no validated data under {settings.runs_dir} or {settings.validated_dir}: "
        "run the pipeline or pass --data"
    )
