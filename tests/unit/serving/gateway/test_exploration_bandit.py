"""The gateway's exploration bandit: the configured policy chooses the slots, slot impressions
are trials, and posted clicks that carry the request id are successes, once each."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

import numpy as np

from recsys.config import Settings
from recsys.event_log.base import AppendResult
from serving.gateway.event_ingest import EventIngest, OnlinePusher
from serving.gateway.exploration import ExplorationBandit
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.schemas import Event
from serving.gateway.user_features import UserActivity

ITEMS = np.asarray([f"i{n}" for n in range(10)], dtype=object)
NEW = np.arange(5, 10)  # i5..i9 are new


def _settings(policy: str, **gateway: Any) -> Settings:
    return Settings.model_validate({"gateway": {"exploration_policy": policy, **gateway}})


def _choose(bandit: ExplorationBandit, seed: int, segment: str = "FR", n: int = 1) -> list[str]:
    allowed = np.ones(len(ITEMS), dtype=bool)
    allowed[9] = False
    chosen = bandit.choose(ITEMS, NEW, allowed, {5}, n, segment, np.random.default_rng(seed))
    return [str(ITEMS[c]) for c in chosen]


def test_none_explores_nothing_and_uniform_keeps_todays_draw() -> None:
    assert _choose(ExplorationBandit(_settings("none")), 0) == []
    for seed in range(20):
        got = _choose(ExplorationBandit(_settings("uniform")), seed, n=3)
        assert sorted(got) == ["i6", "i7", "i8"]  # allowed, new, not already in the list


class _Log:
    """An event log that accepts each event id once."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def append(self, records: list[dict[str, Any]]) -> AppendResult:
        new = [r["event_id"] for r in records if r["event_id"] not in self.seen]
        duplicates = [r["event_id"] for r in records if r["event_id"] not in new]
        self.seen.update(new)
        return AppendResult(accepted=new, duplicates=duplicates)


def _click(event_id: str, item: str, request_id: str | None) -> Event:
    return Event(
        event_id=event_id,
        user_id="u1",
        item_id=item,
        event_type="click",
        ts=datetime(2026, 11, 1, tzinfo=UTC),
        request_id=request_id,
    )


def test_thompson_learns_from_slot_impressions_and_posted_clicks() -> None:
    metrics = GatewayMetrics()
    bandit = ExplorationBandit(_settings("thompson"), metrics)
    log: Any = _Log()
    # Not started: the pushes only queue (this test is about the bandit).
    pusher = OnlinePusher(_settings("thompson"), None, threading.Lock(), metrics)
    ingest = EventIngest(_settings("thompson"), log, UserActivity(max_items=5), pusher, metrics, bandit)
    # i6 is clicked every time it is explored, i7 and i8 never
    for r in range(60):
        (item,) = _choose(bandit, r)
        bandit.served(f"req{r}", "FR", [item])
        bandit.served(f"req{r}", "FR", [item])  # the same impression again: no second trial
        if item == "i6":
            # posted twice (a client retry with a new event id): one success
            ingest.ingest([_click(f"c{r}", item, f"req{r}"), _click(f"c{r}b", item, f"req{r}")])
    ingest.ingest([_click("stray", "i7", None), _click("other", "i8", "req-not-explored")])
    post = bandit.posteriors
    trials, clicks = post.counts("FR", "i6")
    assert trials == clicks > 0
    assert post.counts("FR", "i7")[1] == 0 and post.counts("FR", "i8")[1] == 0
    assert post.total_trials == 60
    # it learned: late choices in FR are mostly i6; another segment still knows nothing
    late = [_choose(bandit, 1000 + s)[0] for s in range(100)]
    assert late.count("i6") > 85
    assert post.counts("DE", "i6") == (0, 0)
    summary = bandit.summary()
    assert summary["policy"] == "thompson" and summary["clicks"] == clicks
    sample = metrics.registry.get_sample_value("recsys_gateway_exploration_total", {"outcome": "click"})
    assert sample == clicks


def test_per_item_posteriors_pool_segments_and_uniform_does_no_upkeep() -> None:
    bandit = ExplorationBandit(_settings("epsilon_greedy", exploration_by_segment=False))
    bandit.served("r1", "FR", ["i6"])
    bandit.served("r2", "DE", ["i6"])
    assert bandit.posteriors.counts("", "i6") == (2, 0)
    uniform = ExplorationBandit(_settings("uniform"))
    uniform.served("r1", "FR", ["i6"])
    assert uniform.observe([{"event_type": "click", "request_id": "r1", "item_id": "i6"}]) == 0
    assert len(uniform.posteriors) == 0


def test_linucb_learns_on_the_embeddings_the_request_path_passes() -> None:
    bandit = ExplorationBandit(_settings("linucb", exploration_by_segment=False))
    assert bandit.needs_features and not ExplorationBandit(_settings("thompson")).needs_features
    # i6 and i7 point one way, i8 another; the clicks go to i6 only
    emb = np.zeros((len(ITEMS), 3))
    emb[6], emb[7], emb[8] = [1.0, 0.1, 0.0], [1.0, -0.1, 0.0], [0.0, 0.0, 1.0]
    seen: list[int] = []

    def rows(pos: np.ndarray) -> np.ndarray:
        seen.extend(pos.tolist())
        return emb[pos]

    def choose(seed: int, version: int = 1) -> str:
        allowed = np.ones(len(ITEMS), dtype=bool)
        allowed[9] = False
        (c,) = bandit.choose(ITEMS, NEW, allowed, {5}, 1, "FR", np.random.default_rng(seed), (version, rows))
        return str(ITEMS[c])

    for r in range(80):
        item = choose(r)
        bandit.served(f"req{r}", "FR", [item])
        bandit.served(f"req{r}", "FR", [item])  # again: one trial
        clicks = [{"event_type": "click", "request_id": f"req{r}", "item_id": item}] * 2
        bandit.observe(clicks if item == "i6" else [])
    assert set(seen) == {6, 7, 8}  # the pool's rows were asked for
    summary = bandit.summary()
    assert summary["policy"] == "linucb" and summary["dimension"] == 3 and summary["trials"] == 80
    assert 0 < summary["clicks"] == summary["top_segments"][0]["clicks"]
    # it learned the direction i6 shares with i7: i8 is hardly chosen any more
    late = [choose(1000 + s) for s in range(50)]
    assert late.count("i8") < 5 and late.count("i6") > 25
    assert bandit.observe([{"event_type": "click", "request_id": "nope", "item_id": "i6"}]) == 0
    # a promotion to another stable version is another embedding space: the prior again
    choose(0, version=2)
    assert bandit.summary()["segments"] == 0 and bandit.posteriors.total_trials == 0
