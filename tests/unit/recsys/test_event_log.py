"""The event log: durable, idempotent by event_id, readable back as the events contract."""

import pandas as pd

from recsys.event_log.sqlite import SqliteEventLog


def _event(i: int) -> dict:
    return {
        "event_id": f"e{i}",
        "user_id": "u1",
        "item_id": f"i{i % 3}",
        "event_type": "click",
        "value": None,
        "ts": pd.Timestamp("2026-11-01T10:00:00Z") + pd.Timedelta(seconds=i),
        "session_id": "s1",
        "device": "mobile",
        "request_id": None,
    }


def test_append_is_idempotent_by_event_id(tmp_path):
    log = SqliteEventLog(tmp_path / "events.db")
    r1 = log.append([_event(1), _event(2)])
    r2 = log.append([_event(2), _event(3)])
    assert r1.accepted == ["e1", "e2"] and r1.duplicates == []
    assert r2.accepted == ["e3"] and r2.duplicates == ["e2"]
    assert log.count() == 3
    # An id repeated inside one batch is stored once and reported once as a duplicate.
    r3 = log.append([_event(7), _event(7), _event(8)])
    assert r3.accepted == ["e7", "e8"] and r3.duplicates == ["e7"]
    assert log.count() == 5
    log.close()
    # Reopening sees everything that was acknowledged.
    again = SqliteEventLog(tmp_path / "events.db")
    assert again.event_ids() == ["e1", "e2", "e3", "e7", "e8"]
    df = again.to_frame()
    assert list(df["event_id"]) == ["e1", "e2", "e3", "e7", "e8"]
    assert str(df["ts"].dtype) == "datetime64[us, UTC]"


def test_a_failing_batch_stores_nothing(tmp_path):
    log = SqliteEventLog(tmp_path / "events.db")
    bad = _event(5)
    del bad["user_id"]
    try:
        log.append([_event(4), bad])
    except KeyError:
        pass
    assert log.count() == 0


def test_served_requests_are_recorded_for_the_canary_analysis(tmp_path):
    from recsys.event_log.base import ServedRequest

    log = SqliteEventLog(tmp_path / "events.db")
    log.log_request(
        ServedRequest(
            request_id="r1",
            user_id="u1",
            arm="canary",
            versions={"retrieval": 2, "ranking": 2},
            ts="2026-11-01T10:00:00Z",
            latency_ms=12.5,
            status="ok",
            items=["i1", "i2"],
        )
    )
    log.log_request(
        ServedRequest(
            request_id="r2",
            user_id="u2",
            arm="holdout",
            versions={},
            ts="2026-11-01T10:00:01Z",
            latency_ms=3.0,
            status="ok",
            fallback="global_popularity",
        )
    )
    df = log.requests_frame()
    assert list(df["arm"]) == ["canary", "holdout"]
    assert df.loc[0, "versions"] == {"retrieval": 2, "ranking": 2}
    assert df.loc[1, "fallback"] == "global_popularity"


def test_served_requests_and_impressions_go_in_together_and_posted_events_stay_fsynced(tmp_path):
    from recsys.event_log.base import ServedRequest

    log = SqliteEventLog(tmp_path / "events.db")
    log.append([_event(1)])
    ts = "2026-11-01T10:00:00Z"
    served = ServedRequest("r1", "u1", "stable", {"retrieval": 1}, ts, 4.0, "ok", items=["i0"])
    shown = [{**_event(n), "event_type": "impression", "request_id": "r1"} for n in (1, 2, 3)]
    log.log_served([served], shown)  # e1 is already logged: the others still go in
    assert log.event_ids() == ["e1", "e2", "e3"]
    assert list(log.requests_frame()["request_id"]) == ["r1"]
    # The impression batch committed without its own fsync; posted events still get one.
    assert log._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    log.close()
    again = SqliteEventLog(tmp_path / "events.db")
    assert again.count() == 3 and len(again.requests_frame()) == 1
