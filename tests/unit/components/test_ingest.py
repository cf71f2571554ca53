"""`recsys pipeline run --data DIR`: which source reads a folder, and the interval that holds it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from components.ingest import interval_end_after_data, source_for_folder
from components.sources.synthetic import generate_to_folder
from recsys.config import load_settings
from tests.support.tiny_data import TINY_END, tiny_params


@pytest.fixture(scope="module")
def data_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data") / "raw"
    generate_to_folder(tiny_params(users=40, items=20, days=3), out)
    return out


def test_a_data_folder_is_read_as_parquet_and_its_interval_ends_the_day_after(
    data_folder: Path, tmp_path: Path
) -> None:
    source = source_for_folder(data_folder)
    assert (source.kind, source.path) == ("parquet", data_folder)
    settings = load_settings(overrides={"home": str(tmp_path)}).model_copy(update={"source": source})
    last = pd.read_parquet(data_folder / "events", columns=["ts"])["ts"].max()
    end = interval_end_after_data(settings)
    # The generator's events end just before TINY_END (midnight): the interval ends there.
    assert last < pd.Timestamp(end) and end == TINY_END
    assert end - pd.Timestamp(last).to_pydatetime() <= pd.Timedelta(days=1)


def test_an_interval_end_is_the_utc_midnight_after_the_last_event(tmp_path: Path) -> None:
    folder = tmp_path / "drop"
    for table in ("users", "items"):
        (folder / table).mkdir(parents=True)
        pd.DataFrame({"x": [1]}).to_parquet(folder / table / "part-0.parquet")
    (folder / "events").mkdir()
    # A missing timestamp (validation quarantines it later) does not move the interval.
    first, last = pd.Timestamp("2026-03-01 10:00", tz="UTC"), pd.Timestamp("2026-03-04 23:59:59", tz="UTC")
    ts = pd.Series([first, last, pd.NaT])
    pd.DataFrame({"ts": ts}).to_parquet(folder / "events" / "part-0.parquet")
    settings = load_settings(overrides={"home": str(tmp_path / "home")}).model_copy(
        update={"source": source_for_folder(folder)}
    )
    assert interval_end_after_data(settings) == datetime(2026, 3, 5, tzinfo=UTC)


def test_a_movielens_download_is_read_as_movielens(tmp_path: Path) -> None:
    (tmp_path / "u.data").write_text("1\t1\t5\t881250949\n")
    assert source_for_folder(tmp_path).kind == "movielens"


def test_a_folder_that_is_neither_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "users").mkdir()
    with pytest.raises(ValueError, match=f"--data {tmp_path}: neither a data folder"):
        source_for_folder(tmp_path)
    with pytest.raises(ValueError, match="no such folder"):
        source_for_folder(tmp_path / "missing")


def test_ingest_adds_the_lakes_served_traffic_before_the_interval_end_once(
    data_folder: Path, tmp_path: Path
) -> None:
    from components.events_export import export_events
    from components.ingest import ingest
    from recsys.event_log.base import ServedRequest
    from recsys.event_log.sqlite import SqliteEventLog

    settings = load_settings(overrides={"home": str(tmp_path / "home")}).model_copy(
        update={"source": source_for_folder(data_folder)}
    )
    base = pd.read_parquet(data_folder / "events")
    user, items = str(base["user_id"].iloc[0]), [str(i) for i in base["item_id"].unique()[:3]]
    log = SqliteEventLog(settings.event_log_path)
    served_at = "2026-10-31T12:00:00+00:00"
    log.log_served(
        [ServedRequest("r1", user, "stable", {"ranking": 1}, served_at, 5.0, "ok", items=items)],
        [
            {
                "event_id": f"r1:{n}",
                "user_id": user,
                "item_id": item,
                "event_type": "impression",
                "value": None,
                "ts": served_at,
                "session_id": "s1",
                "device": "mobile",
                "request_id": "r1",
                "position": n,
                "arm": "stable",
                "model_versions": {"ranking": 1},
            }  # fmt: skip
            for n, item in enumerate(items)
        ],
    )
    click = {"user_id": user, "item_id": items[2], "event_type": "click", "value": None,
             "session_id": "s1", "device": "mobile", "request_id": "r1"}  # fmt: skip
    log.append([
        {**click, "event_id": "c1", "ts": "2026-10-31T12:00:05+00:00"},
        {**click, "event_id": "late", "ts": "2026-11-01T08:00:00+00:00"},  # after the interval
    ])  # fmt: skip
    log.close()
    export_events(settings, through="2026-11-01", now=datetime(2026, 11, 2, tzinfo=UTC))

    def ingested(s: Any) -> pd.DataFrame:
        manifest = ingest(s, tmp_path / "ingest", TINY_END)
        events = pd.read_parquet(tmp_path / "ingest" / "events")
        assert manifest["rows"]["events"] == len(events)
        assert manifest["served_events"] == len(events) - len(base)
        return events

    events = ingested(settings)
    served = events[events["request_id"] == "r1"].set_index("event_id")
    assert sorted(served.index) == ["c1", "r1:0", "r1:1", "r1:2"]  # "late" is the next interval's
    assert served["position"].to_dict() == {"r1:0": 0, "r1:1": 1, "r1:2": 2, "c1": 2}
    assert len(events) == len(base) + 4 and events["event_id"].is_unique
    assert len(ingested(settings)) == len(events)  # a re-run adds nothing twice
    off = settings.model_copy(update={"source": settings.source.model_copy(update={"served_traffic": False})})
    assert len(ingested(off)) == len(base)
