"""A home for the drift monitor: generated data split at a day into training data and serving traffic.

The days before ``split_day`` become the validated data (what the models learned from); the days
from it on go into the gateway's SQLite event log, as the serving window the monitor reads. With
``shift_day == split_day`` the serving traffic is the shifted one.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from components.sources.synthetic import generate
from recsys.event_log.sqlite import SqliteEventLog
from recsys.storage import write_data_folder
from tests.support.tiny_data import tiny_params

DAYS = 8
SPLIT_DAY = 5  # days 0-4 train, days 5-7 (72 hours) serve
DRIFT_ENV = {"RECSYS_MONITORING__SERVING_WINDOW_HOURS": "72"}


def prepare_drift_home(home: Path, shift_kind: str | None) -> dict[str, Any]:
    """Write ``<home>/data/validated`` and ``<home>/gateway/events.db``; the generator's params."""
    params = tiny_params(
        users=600, items=80, days=DAYS, events_per_user_day=3.0,
        **({"shift_day": SPLIT_DAY, "shift_kind": shift_kind} if shift_kind else {}),
    )  # fmt: skip
    frames = generate(params)
    events = frames["events"]
    split = params.end_date - timedelta(days=DAYS - SPLIT_DAY)
    train = events[events["ts"] < split]
    write_data_folder({**frames, "events": train}, home / "data" / "validated")
    serve = events[events["ts"] >= split].astype(object)
    records = [
        {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}
        for row in serve.to_dict("records")
    ]
    log = SqliteEventLog(home / "gateway" / "events.db")
    try:
        log.append(records)
    finally:
        log.close()
    return {
        "params": params,
        "until": params.end_date,
        "train_events": len(train),
        "serve_events": len(serve),
    }
