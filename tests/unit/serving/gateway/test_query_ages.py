"""The gateway's query row: the recent items' ages measured at the request's time."""

from __future__ import annotations

import time

from recsys.config import load_settings
from serving.gateway.model_calls import ModelCalls
from serving.gateway.schemas import RecommendationRequest

INPUTS = {"user_id": "string", "recent_items": "string", "recent_item_ages": "string", "hour": "int64"}


def _ages(row: dict, recent: list[str]) -> list[int]:
    calls = ModelCalls(load_settings(None), client=None)  # type: ignore[arg-type]
    query = calls.query_inputs(INPUTS, row, recent, RecommendationRequest(user_id="u1"))
    assert query["recent_items"].tolist() == [" ".join(recent)]
    return [int(a) for a in str(query["recent_item_ages"][0]).split()]


def test_recent_items_are_aged_from_their_stored_times_to_now() -> None:
    now = int(time.time())
    row = {"recent_items": "b a", "recent_item_times": f"{now - 60} {now - 7200}"}
    got = _ages(row, ["b", "a"])
    assert 60 <= got[0] <= 70 and 7200 <= got[1] <= 7210


def test_an_item_the_store_has_no_time_for_reads_as_unknown() -> None:
    now = int(time.time())
    # "n" was seen by this process before the store caught up; "a" sits in a row stored
    # before times were kept; "b" has its time wherever it stands in the merged list.
    row = {"recent_items": "b a", "recent_item_times": f"{now - 60}"}
    got = _ages(row, ["n", "b", "a"])
    assert got[0] == -1 and 60 <= got[1] <= 70 and got[2] == -1


def test_a_model_without_the_input_gets_no_ages() -> None:
    calls = ModelCalls(load_settings(None), client=None)  # type: ignore[arg-type]
    inputs = {"user_id": "string", "recent_items": "string"}
    query = calls.query_inputs(inputs, {"recent_item_times": "1"}, ["a"], RecommendationRequest(user_id="u1"))
    assert set(query) == {"user_id", "recent_items"}
