"""Pure parts of the gateway: top-k, similarity space, per-user activity, event validation, config."""

from __future__ import annotations

import gc
import math
import time
import weakref

import numpy as np
import pytest
from pydantic import ValidationError

from recsys.config import ConfigError, load_settings
from recsys.ranking import unit_directions
from serving.gateway.catalog import Pacer, top_k
from serving.gateway.recommendation_flow import times_passed_over
from serving.gateway.schemas import Event, validation_problems
from serving.gateway.snapshot import collections_paused, settle_heap
from serving.gateway.user_features import UserActivity


def test_top_k_is_best_first_and_caps_at_n() -> None:
    scores = np.array([0.1, 0.9, 0.5, 0.7], dtype=np.float32)
    idx, vals = top_k(scores, 2)
    assert idx.tolist() == [1, 3] and vals.tolist() == pytest.approx([0.9, 0.7])
    idx, _ = top_k(scores, 10)  # K larger than the catalog: everything, ordered
    assert idx.tolist() == [1, 3, 2, 0]
    assert top_k(scores, 0)[0].tolist() == []


def test_unit_directions_drop_the_item_bias_column_of_normalized_towers() -> None:
    # Two unit vectors with a bias appended (what item_bias=True exports): the bias must not
    # count in item-item similarity, so both rows become their unit direction.
    emb = np.array([[0.6, 0.8, 5.0], [1.0, 0.0, -3.0]], dtype=np.float32)
    unit = unit_directions(emb)
    assert unit.shape == (2, 2) and unit[0] @ unit[1] == pytest.approx(0.6)
    # Un-normalized towers (no bias column to recognise): every coordinate kept, rows normalized.
    raw = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]], dtype=np.float32)
    assert unit_directions(raw).shape == (2, 3)
    assert np.linalg.norm(unit_directions(raw), axis=1) == pytest.approx([1.0, 1.0])


def test_user_activity_counts_touches_not_impressions_and_keeps_recent_first() -> None:
    act = UserActivity(max_users=2, max_items=2)
    act.update({"user_id": "u1", "item_id": "a", "event_type": "impression"})
    assert act.get("u1").events == 0 and act.get("u1").seen == set()
    for item, kind in (("a", "click"), ("b", "skip"), ("c", "purchase"), ("a", "view")):
        act.update({"user_id": "u1", "item_id": item, "event_type": kind})
    st = act.get("u1")
    # A skip hides the item but is not a positive: recent keeps positives only, newest first.
    assert st.events == 4 and st.seen == {"a", "b", "c"} and st.recent == ["a", "c"]
    act.update({"user_id": "u2", "item_id": "x", "event_type": "click"})
    act.update({"user_id": "u3", "item_id": "y", "event_type": "click"})
    assert act.get("u1").events == 0  # the least recently active user was forgotten


def test_user_activity_remembers_what_was_served_and_what_of_it_was_taken() -> None:
    act = UserActivity(max_users=2, max_items=2, max_shown=3)
    act.served("u1", ["a", "b"])
    act.served("u1", ["a", "c"])
    act.update({"user_id": "u1", "item_id": "c", "event_type": "click"})
    # Served and not touched counts as passed over, once per time served; touched does not.
    assert act.get("u1").passed_over() == {"a": 2, "b": 1}
    assert act.get("u1").events == 1  # being served is not activity
    # Only the last max_shown items served are remembered (oldest forgotten first).
    act.served("u1", ["d"])
    assert list(act.get("u1").shown) == ["a", "c", "d"]
    # A copy: what a request reads does not change under it.
    st = act.get("u1")
    act.served("u1", ["a"])
    assert st.shown["a"] == 2 and act.get("u1").shown["a"] == 3


def test_times_passed_over_maps_served_items_onto_the_candidates() -> None:
    position = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}
    got = times_passed_over(position, {"d": 2, "a": 1, "gone": 5}, np.array([4, 3, 1, 0]))
    assert got.tolist() == [0.0, 2.0, 0.0, 1.0]
    assert times_passed_over(position, {}, np.array([1, 2])).tolist() == [0.0, 0.0]
    assert times_passed_over(position, {"a": 1}, np.zeros(0, dtype=np.int64)).shape == (0,)


def _event(**kw: object) -> dict[str, object]:
    base = {
        "event_id": "e1",
        "user_id": "u1",
        "item_id": "i1",
        "event_type": "click",
        "ts": "2026-11-01T10:00:00Z",
    }
    return base | kw


def test_event_validation_names_field_and_value() -> None:
    assert Event.model_validate(_event()).record()["ts"] == "2026-11-01T10:00:00+00:00"
    cases = {
        "ts": ("2026-11-01T10:00:00", "timezone"),
        "event_type": ("teleport", "impression"),
        "user_id": ("u 1", "pattern"),
        "value": (math.inf, "finite"),
    }
    for field, (value, words) in cases.items():
        with pytest.raises(ValidationError) as err:
            Event.model_validate(_event(**{field: value}))
        [problem] = validation_problems(err.value, "events[3]")
        assert problem["field"] == f"events[3].{field}"
        assert problem["value"] == (str(value) if isinstance(value, float) else value)
        assert words in problem["message"]


def test_gateway_config_refuses_bad_fractions_and_chains() -> None:
    s = load_settings(overrides={"gateway.arm_fractions": {"canary": 0.3, "holdout": 0.1}})
    assert s.gateway.arm_fractions == {"canary": 0.3, "holdout": 0.1}
    assert s.event_log_path == s.home / "gateway" / "events.db"
    with pytest.raises(ConfigError, match="arm_fractions"):
        load_settings(overrides={"gateway.arm_fractions": {"canary": 0.8, "holdout": 0.3}})
    with pytest.raises(ConfigError, match="arm_fractions"):
        load_settings(overrides={"gateway.arm_fractions": {"blue": 0.1}})
    with pytest.raises(ConfigError, match="fallback_chain"):
        load_settings(overrides={"gateway.fallback_chain": []})
    with pytest.raises(ConfigError, match="fallback_chain"):
        load_settings(overrides={"gateway.fallback_chain": ["retrieval", "magic"]})
    env = load_settings(env={"RECSYS_GATEWAY__FALLBACK_CHAIN": "[exact, global_popularity]"})
    assert env.gateway.fallback_chain == ["exact", "global_popularity"]


def test_settle_heap_freezes_what_lives_and_frees_replaced_cycles():
    class Node:
        pass

    node = Node()
    node.self = node  # a cycle: only the collector frees it
    ref = weakref.ref(node)
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()
        assert ref() is not None  # frozen: skipped by collections
        settle_heap()  # the next swap unfreezes first, so the replaced objects' cycles go
        assert ref() is None
    finally:
        gc.unfreeze()


def test_collections_are_paused_inside_the_block_and_back_as_they_were_after():
    assert gc.isenabled()
    with collections_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collections_paused():
        raise RuntimeError("a failed build")
    assert gc.isenabled()  # back even when the block raised
    gc.disable()
    try:
        with collections_paused():
            pass
        assert not gc.isenabled()  # not turned on by the block when it was off before
    finally:
        gc.enable()


def test_a_pacer_sleeps_after_each_step_for_its_ratio_of_the_step():
    pacer = Pacer(1.0)
    busy_until = time.perf_counter() + 0.02
    while time.perf_counter() < busy_until:  # a 20 ms step of work
        pass
    before = time.perf_counter()
    pacer.step()
    assert time.perf_counter() - before >= 0.02  # at least as long again
    assert pacer.began >= before  # the next step is timed from here


def test_blas_threads_are_set_in_this_process_and_put_back() -> None:
    from serving.gateway.app import set_blas_threads

    # NumPy's wheels load OpenBLAS: the gateway runs it on one thread (its products are tiny).
    before = set_blas_threads(1)
    assert before is not None and before >= 1
    try:
        assert set_blas_threads(1) == 1
        a = np.arange(12, dtype=np.float64).reshape(3, 4)
        assert (a @ a.T).tolist() == [[14.0, 38.0, 62.0], [38.0, 126.0, 214.0], [62.0, 214.0, 366.0]]
    finally:
        set_blas_threads(before)


def test_run_sync_returns_a_coroutine_that_never_waits_and_refuses_one_that_does() -> None:
    import asyncio

    from serving.gateway.model_calls import run_sync

    async def answer() -> int:
        return 42

    async def waits() -> int:
        await asyncio.sleep(0)
        return 1

    assert run_sync(answer()) == 42
    with pytest.raises(RuntimeError, match="await it there"):
        run_sync(waits())
