"""The adaptive in-flight limit: down fast when admitted requests get slow, back up slowly."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from serving.gateway.admission import AdaptiveLimit
from serving.gateway.app import ConcurrencyLimit


def _feed(limit: AdaptiveLimit, seconds: float, n: int) -> None:
    for _ in range(n):
        limit.record(seconds, limit.epoch)


def test_latency_within_target_keeps_the_ceiling() -> None:
    limit = AdaptiveLimit(ceiling=64, floor=4, target_s=0.05, window=10)
    _feed(limit, 0.02, 500)
    assert limit.limit == 64 and limit.admits(63) and not limit.admits(64)


def test_slow_windows_cut_the_limit_multiplicatively_down_to_the_floor() -> None:
    limit = AdaptiveLimit(ceiling=64, floor=4, target_s=0.05, window=10, backoff=0.5)
    _feed(limit, 0.2, 10)
    assert limit.limit == 32
    _feed(limit, 0.2, 10)
    assert limit.limit == 16
    _feed(limit, 0.2, 1000)
    assert limit.limit == 4 and limit.admits(3) and not limit.admits(4)


def test_the_p90_decides_not_one_slow_request() -> None:
    limit = AdaptiveLimit(ceiling=20, floor=2, target_s=0.05, window=10)
    for s in [0.01] * 9 + [1.0]:  # one slow request in ten: the p90 is fast
        limit.record(s, limit.epoch)
    assert limit.limit == 20
    for s in [0.01] * 8 + [1.0, 1.0]:  # two in ten: the p90 is slow
        limit.record(s, limit.epoch)
    assert limit.limit == 16


def test_recovery_adds_one_per_fast_window_up_to_the_ceiling() -> None:
    limit = AdaptiveLimit(ceiling=10, floor=2, target_s=0.05, window=5, backoff=0.5)
    _feed(limit, 0.5, 5)
    assert limit.limit == 5
    _feed(limit, 0.01, 5)
    assert limit.limit == 6
    _feed(limit, 0.01, 100)
    assert limit.limit == 10


def test_requests_admitted_before_a_change_do_not_count_after_it() -> None:
    limit = AdaptiveLimit(ceiling=64, floor=4, target_s=0.05, window=4, backoff=0.5)
    old = limit.epoch
    _feed(limit, 0.2, 4)
    assert limit.limit == 32
    for _ in range(20):  # the stragglers of the slow spell, admitted under the old limit
        assert not limit.record(0.2, old)
    assert limit.limit == 32


@pytest.mark.parametrize(
    "kwargs",
    [{"floor": 0}, {"floor": 65}, {"target_s": 0}, {"window": 0}, {"backoff": 1.0}],
)
def test_bad_settings_are_refused_naming_them(kwargs: dict[str, Any]) -> None:
    args = {"ceiling": 64, "floor": 4, "target_s": 0.05, **kwargs}
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        AdaptiveLimit(**args)


def test_the_middleware_sheds_once_admitted_requests_run_past_the_target() -> None:
    """An app that takes 40 ms a request against a 10 ms target: the limit falls to its floor
    and the requests beyond it get 503 with Retry-After at once."""
    calls = {"served": 0}

    async def slow_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await asyncio.sleep(0.04)
        calls["served"] += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    adaptive = AdaptiveLimit(ceiling=16, floor=2, target_s=0.01, window=4, backoff=0.5)
    middleware = ConcurrencyLimit(slow_app, admission=adaptive)

    async def request() -> tuple[int, dict[bytes, bytes], bytes]:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "path": "/v1/recommendations"}
        await middleware(scope, None, send)
        return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"]

    async def waves() -> list[tuple[int, dict[bytes, bytes], bytes]]:
        out = []
        for _ in range(6):
            out += await asyncio.gather(*(request() for _ in range(8)))
        return out

    answers = asyncio.run(waves())
    assert adaptive.limit == 2
    shed = [a for a in answers if a[0] == 503]
    assert shed and all(h[b"retry-after"] == b"1" for _, h, _ in shed)
    assert "adaptive" in json.loads(shed[-1][2])["detail"]
    # The last wave ran within the floor: two admitted, six shed.
    assert [a[0] for a in answers[-8:]].count(200) == 2
    assert calls["served"] == len(answers) - len(shed)
