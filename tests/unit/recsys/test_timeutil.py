"""Every instant in UTC: naive means UTC, aware is converted, spellings of one instant agree."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pandas as pd
import pytest

from recsys.timeutil import optional_utc_iso, to_utc, utc_iso, utc_now, utc_series

PARIS_WINTER = timezone(timedelta(hours=1))


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-01T12:00:00",  # naive: taken as UTC
        "2026-11-01T12:00:00+00:00",
        "2026-11-01T13:00:00+01:00",
        datetime(2026, 11, 1, 12, 0),
        datetime(2026, 11, 1, 13, 0, tzinfo=PARIS_WINTER),
        pd.Timestamp("2026-11-01 12:00"),
        pd.Timestamp("2026-11-01 07:00", tz="America/New_York"),
    ],
)
def test_spellings_of_one_instant_agree(value: object) -> None:
    assert to_utc(value) == pd.Timestamp("2026-11-01 12:00", tz="UTC")  # type: ignore[arg-type]
    assert str(to_utc(value).tz) == "UTC"  # type: ignore[arg-type]
    assert utc_iso(value) == "2026-11-01T12:00:00+00:00"


def test_series_naive_and_aware() -> None:
    naive = pd.Series(pd.to_datetime(["2026-11-01 12:00"]))
    aware = naive.dt.tz_localize(PARIS_WINTER)
    assert str(utc_series(naive).iloc[0]) == "2026-11-01 12:00:00+00:00"
    assert str(utc_series(aware).iloc[0]) == "2026-11-01 11:00:00+00:00"


def test_now_is_aware_and_an_open_end_stays_open() -> None:
    assert utc_now().tzinfo is UTC
    assert optional_utc_iso(None) is None
    assert optional_utc_iso("2026-11-01") == "2026-11-01T00:00:00+00:00"
