"""A batch of events is all or nothing, and the check that says so catches a log without a
transaction: the same check, run on a log that commits row by row (the failpoint
``event_log.commit_per_row``), fails."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from recsys.event_log.sqlite import SqliteEventLog
from recsys.faults import COMMIT_PER_ROW, FAILPOINTS_ENV


def _event(i: int, value: object = None) -> dict:
    return {
        "event_id": f"e{i}", "user_id": "u1", "item_id": "i1", "event_type": "click", "value": value,
        "ts": pd.Timestamp("2026-11-01T10:00:00Z") + pd.Timedelta(seconds=i), "session_id": "s1",
        "device": "mobile", "request_id": None,
    }  # fmt: skip


def _check_a_batch_failing_at_its_third_row_stores_nothing(path: Path) -> None:
    """Two good events, then one the database refuses while writing it (a value SQLite cannot
    bind): the error comes from the INSERT of row 3, after rows 1 and 2 were written, so only
    a transaction around the whole batch takes them back."""
    log = SqliteEventLog(path)
    try:
        with pytest.raises(Exception, match="bind|type"):
            log.append([_event(1), _event(2), _event(3, value=object())])
        assert log.count() == 0, f"a failed batch left {log.event_ids()} in the log"
        # The log is still usable, and the good events go in once they come without the bad one.
        assert log.append([_event(1), _event(2)]).accepted == ["e1", "e2"]
    finally:
        log.close()


def test_a_batch_failing_midway_stores_nothing_and_the_check_fails_on_a_log_committing_row_by_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _check_a_batch_failing_at_its_third_row_stores_nothing(tmp_path / "events.db")
    monkeypatch.setenv(FAILPOINTS_ENV, COMMIT_PER_ROW)
    with pytest.raises(AssertionError, match="a failed batch left"):
        _check_a_batch_failing_at_its_third_row_stores_nothing(tmp_path / "broken.db")
