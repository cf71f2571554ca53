"""The event log's export on the SQLite log: one file per UTC day, idempotent by event_id,
and a log trimmed only of days whose file is durable (never today's, never an unexported one)."""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd
import pytest

from components.events_export import DATA_FILE, export_events, exported_days, parse_day
from recsys.config import load_settings
from recsys.event_log.base import ServedRequest
from recsys.event_log.sqlite import SqliteEventLog
from recsys.layout import lake_events_day_dir, lake_events_dir

NOW = datetime(2026, 11, 4, 9, 30, tzinfo=UTC)  # 11-04 is today: open, never trimmed


def _event(event_id: str, ts: str, event_type: str = "click", request_id: str | None = None,
           item: str = "i1", **extra) -> dict:  # fmt: skip
    return {
        "event_id": event_id, "user_id": "u1", "item_id": item, "event_type": event_type, "value": None,
        "ts": ts, "session_id": "s1", "device": "mobile", "request_id": request_id, **extra,
    }  # fmt: skip


@pytest.fixture
def settings(tmp_path):
    return load_settings(overrides={"home": str(tmp_path / "home"), "event_export.keep_days": 0})


def _fill(settings) -> SqliteEventLog:
    log = SqliteEventLog(settings.event_log_path)
    served = ServedRequest("r1", "u1", "canary", {"retrieval": 2, "ranking": 3},
                           "2026-11-02T23:59:58+00:00", 12.0, "ok", items=["i1", "i2"])  # fmt: skip
    shown = [
        _event(f"r1:{n}", "2026-11-02T23:59:58.5+00:00", "impression", "r1", item=f"i{n + 1}", arm="canary",
               position=n, model_versions={"ranking": 3, "retrieval": 2}, reason="picked",
               candidate_source="retrieval", score=0.5 - n / 10)  # fmt: skip
        for n in range(2)
    ]
    log.log_served([served], shown)
    log.append([
        _event("a", "2026-11-01T10:00:00+00:00"),
        _event("b", "2026-11-01T23:59:59.999999+00:00", "view"),
        _event("c", "2026-11-02T00:00:00+00:00"),
        # A click on the second item, the next day: its context comes from request and impression.
        _event("d", "2026-11-03T00:00:01+00:00", request_id="r1", item="i2"),
        _event("t", "2026-11-04T08:00:00+00:00"),  # today
    ])  # fmt: skip
    return log


def test_each_closed_day_is_one_file_with_serving_context_and_the_log_keeps_today(settings):
    _fill(settings).close()
    manifest = export_events(settings, now=NOW)
    assert sorted(manifest["days"]) == ["2026-11-01", "2026-11-02", "2026-11-03"]
    lake = pd.read_parquet(lake_events_dir(settings))
    assert sorted(lake["event_id"]) == ["a", "b", "c", "d", "r1:0", "r1:1"]
    day1 = pd.read_parquet(lake_events_day_dir(settings, "2026-11-01") / DATA_FILE)
    assert list(day1["event_id"]) == ["a", "b"]  # the last microsecond of a day is that day's
    day2 = pd.read_parquet(lake_events_day_dir(settings, "2026-11-02") / DATA_FILE)
    imp = day2.set_index("event_id").loc["r1:1"]
    assert (imp["arm"], imp["position"], imp["candidate_source"]) == ("canary", 1, "retrieval")
    assert imp["score"] == pytest.approx(0.4)
    assert imp["model_versions"] == '{"ranking": 3, "retrieval": 2}'
    click = pd.read_parquet(lake_events_day_dir(settings, "2026-11-03") / DATA_FILE).iloc[0]
    assert (click["event_id"], click["arm"], click["position"]) == ("d", "canary", 1)
    assert click["model_versions"] == '{"ranking": 3, "retrieval": 2}'
    assert pd.isna(day1["arm"]).all() and day1["position"].isna().all()  # not served traffic
    # Trimmed: only today's event is left; the served-request record stays.
    log = SqliteEventLog(settings.event_log_path)
    assert log.event_ids() == ["t"]
    assert list(log.requests_frame()["request_id"]) == ["r1"]
    assert manifest["trimmed"] == 6
    assert all(r["trimmed"] for r in exported_days(settings).values())


def test_a_rerun_changes_nothing_and_a_late_event_is_merged_once(settings):
    _fill(settings).close()
    export_events(settings, now=NOW)
    files = sorted(lake_events_dir(settings).rglob("*"))
    before = {p: p.read_bytes() for p in files if p.is_file()}
    stamps = {p: p.stat().st_mtime_ns for p in before}
    again = export_events(settings, now=NOW)
    assert again["days"] == {} and again["trimmed"] == 0
    assert {p: p.read_bytes() for p in before} == before
    assert {p: p.stat().st_mtime_ns for p in before} == stamps
    # A late event for an exported day, and a retry of an exported (trimmed) one.
    log = SqliteEventLog(settings.event_log_path)
    assert log.append([_event("late", "2026-11-01T12:00:00+00:00"), _event("a", "2026-11-01T10:00:00+00:00")]
                      ).accepted == ["late", "a"]  # fmt: skip
    log.close()
    third = export_events(settings, now=NOW)
    assert third["days"]["2026-11-01"]["new"] == 1 and third["trimmed"] == 2
    day1 = pd.read_parquet(lake_events_day_dir(settings, "2026-11-01") / DATA_FILE)
    assert list(day1["event_id"]) == ["a", "late", "b"]


def test_export_without_trim_and_keep_days_leave_the_log(settings):
    _fill(settings).close()
    export_events(settings, now=NOW, trim=False)
    log = SqliteEventLog(settings.event_log_path)
    assert log.count() == 7
    # keep_days: 1 keeps yesterday (11-03) in the log after its export.
    kept = load_settings(overrides={"home": str(settings.home), "event_export.keep_days": 1})
    manifest = export_events(kept, now=NOW)
    assert manifest["days"]["2026-11-03"]["trimmed"] == 0
    assert sorted(log.event_ids()) == ["d", "t"]
    assert exported_days(settings)["2026-11-03"]["trimmed"] is False
    log.close()


def test_today_is_exported_on_request_but_never_trimmed(settings):
    _fill(settings).close()
    manifest = export_events(settings, day="2026-11-04", now=NOW)
    assert list(manifest["days"]) == ["2026-11-04"] and manifest["trimmed"] == 0
    log = SqliteEventLog(settings.event_log_path)
    assert log.count() == 7
    log.close()


def test_trim_removes_only_the_named_events(tmp_path):
    log = SqliteEventLog(tmp_path / "events.db")
    log.append([_event("a", "2026-11-01T10:00:00+00:00"), _event("b", "2026-11-01T11:00:00+00:00")])
    # "b" was not named (logged after the export read the log): it stays.
    assert log.trim_events(["a", "x"], datetime(2026, 11, 2, tzinfo=UTC)) == ["a"]
    # Named but not before the cut: it stays too.
    assert log.trim_events(["b"], datetime(2026, 11, 1, 11, tzinfo=UTC)) == []
    assert log.event_ids() == ["b"]
    log.close()


def test_no_log_no_export(settings):
    manifest = export_events(settings, now=NOW)
    assert manifest["days"] == {} and not settings.event_log_path.exists()


def test_a_bad_day_names_the_option_and_value(settings):
    with pytest.raises(ValueError, match=r"through: '2026-13-01' is not a day"):
        export_events(settings, through="2026-13-01", now=NOW)
    assert parse_day("2026-11-01").isoformat() == "2026-11-01"


def test_the_lakes_scores_are_read_back_by_event_id(settings):
    from components.events_export import read_lake_scores

    _fill(settings).close()
    export_events(settings, now=NOW)
    assert read_lake_scores(settings).to_dict() == pytest.approx({"r1:0": 0.5, "r1:1": 0.4})
