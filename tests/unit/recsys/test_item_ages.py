"""Recent items' times and ages: the state's ``recent_item_times``, the query's ``recent_item_ages``."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

from recsys import online_features
from recsys.item_ages import UNKNOWN, ages, ages_of, epoch_seconds, frame_ages, split_times

T0 = pd.Timestamp("2026-10-01 12:00", tz="UTC")
S0 = int(T0.timestamp())


def test_epoch_seconds_of_timestamps_strings_and_numbers() -> None:
    assert epoch_seconds(T0) == S0
    assert epoch_seconds("2026-10-01T12:00:00Z") == S0
    assert epoch_seconds(pd.Timestamp("2026-10-01 12:00")) == S0  # naive: UTC
    assert epoch_seconds(S0 + 0.9) == S0


def test_times_are_cut_or_padded_to_the_items() -> None:
    assert split_times("1 2 3", 2) == ["1", "2"]
    assert split_times("1", 3) == ["1", UNKNOWN, UNKNOWN]
    assert split_times(None, 2) == [UNKNOWN, UNKNOWN] and split_times(float("nan"), 1) == [UNKNOWN]


def test_ages_are_seconds_to_now_unknown_stays_unknown_and_the_future_is_zero() -> None:
    assert ages([str(S0 - 60), UNKNOWN, "junk", str(S0 + 5)], S0) == "60 -1 -1 0"
    assert ages([], S0) == ""


def test_training_rows_age_their_items_from_their_own_event_time() -> None:
    frame = pd.DataFrame(
        {
            "recent_items": ["b a", "a", "", None, "c b a"],
            # The last row was stored before times were kept for its older items.
            "recent_item_times": [f"{S0 - 7200} {S0 - 86_400}", f"{S0 - 86_400}", "", None, f"{S0 - 10}"],
            "ts": [T0, T0 + pd.Timedelta(hours=1), T0, T0, T0],
        }
    )
    out = frame_ages(frame["recent_items"], frame["recent_item_times"], frame["ts"])
    assert out == ["7200 86400", "90000", "", "", "10 -1 -1"]


def test_served_items_take_their_stored_times_wherever_they_stand() -> None:
    # The gateway puts an item it saw itself ("new") in front of the stored ones; "a" has no
    # stored time (an old row); "b" and "c" keep theirs in their new places.
    out = ages_of(["new", "c", "b", "a"], "c b a", f"{S0 - 30} {S0 - 3600}", S0)
    assert out == "-1 30 3600 -1"
    assert ages_of([], "c", str(S0), S0) == ""
    assert ages_of(["x"], None, None, S0) == UNKNOWN


class _PushStore:
    """What ``push_event`` touches of a Feast store: the pushed frame is kept."""

    def __init__(self) -> None:
        self.pushed: list[pd.DataFrame] = []

    def push(self, source: str, df: pd.DataFrame, to: Any) -> None:
        self.pushed.append(df)


@pytest.mark.parametrize(
    ("stored", "times"),
    [
        ({"recent_items": "b a", "recent_item_times": f"{S0 - 60} {S0 - 120}"}, f"{S0} {S0 - 60} {S0 - 120}"),
        # A row stored before times were kept: the old items' times are unknown, aligned.
        ({"recent_items": "b a"}, f"{S0} -1 -1"),
    ],
)
def test_a_push_writes_the_new_items_time_in_front_aligned_with_the_ids(
    monkeypatch: pytest.MonkeyPatch, stored: dict[str, str], times: str
) -> None:
    state = {"recent_items": "", "recent_item_times": "", "session_id": "s1", "session_items": "", **stored}
    monkeypatch.setattr(online_features, "read_recent_state", lambda store, user: (state, None))
    store = _PushStore()
    event = {"user_id": "u1", "item_id": "c", "event_type": "click", "ts": T0, "session_id": "s1"}
    row = online_features.push_event(store, event, max_items=5)  # type: ignore[arg-type]
    assert (row["recent_items"], row["recent_item_times"]) == ("c b a", times)
    (pushed,) = store.pushed
    assert pushed[["recent_items", "recent_item_times"]].iloc[0].tolist() == ["c b a", times]
