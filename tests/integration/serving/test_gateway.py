"""The gateway end to end: real model server, real gateway, real Feast online store, on loopback.

On a copy of the session's serving home (``tests.support.homes``), built as production
runs it: the tiny generated data plus two items published at the end of the period that
nobody has touched yet; validation, feature tables, ``feast apply`` and materialization into
the SQLite online store; real tiny models from the training step (``model_fixture``); a
ScaNN index (forced at 82 items); two pushes, so the ``stable`` label points at version 1
and ``canary`` at version 2. Then:

- ``recsys serve model-server`` (subprocess) with ScaNN's ops, as a ScaNN build of TF
  Serving serves the retrieval model;
- ``recsys serve gateway`` (subprocess) against it, configured through ``RECSYS_*``;
- for the degraded paths, gateways in this process (uvicorn on a thread) pointed at a
  second model server that cannot load the ScaNN retrieval version (it serves the ranker
  only, as a stock TF Serving deployment would have to), or at a port where nothing listens.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from entrypoints.local_servers import setting_variables
from recsys.config import Settings, load_settings
from recsys.event_log.sqlite import SqliteEventLog
from serving.gateway.policy import assign_arm
from tests.support.homes import NEW_ITEMS, copy_home
from tests.support.polling import wait_for
from tests.support.ports import free_port
from tests.support.servers import (
    AUTH,
    FRACTIONS,
    GATEWAY_SETTINGS,
    InProcessGateway,
    gateway_env,
    scann_model_server_flags,
    serving,
    start_model_server,
)

pytestmark = pytest.mark.integration

# These tests are about what a warm user is served: a feature read slowed past the default
# 50 ms deadline by a busy test machine would serve them as cold (popularity, no model
# versions). The deadline itself is tested in test_reliability.py.
FEATURE_DEADLINE = {"gateway.feature_timeout_ms": 500}


@dataclass
class Env:
    home: Path
    settings: Settings
    validated: Path
    items: pd.DataFrame
    events: pd.DataFrame
    model_grpc: int
    model_rest: int
    url: str


@pytest.fixture(scope="module")
def env(gateway_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    home = tmp_path_factory.mktemp("gateway_home") / "home"
    settings = copy_home(gateway_template, home)
    validated = settings.validated_dir
    gateway = {**gateway_env(home), **setting_variables(FEATURE_DEADLINE)}
    with serving(scann_model_server_flags(settings), home, gateway) as running:
        yield Env(
            home,
            settings,
            validated,
            pd.read_parquet(validated / "items"),
            pd.read_parquet(validated / "events"),
            running.ports.grpc,
            running.ports.rest,
            running.url,
        )


def _user_in(arm: str, prefix: str, start: int = 0) -> str:
    n = start
    while assign_arm(f"{prefix}{n}", FRACTIONS) != arm:
        n += 1
    return f"{prefix}{n}"


def _warm_user(env: Env, arm: str = "stable") -> str:
    counts = env.events[env.events["event_type"] != "impression"]["user_id"].value_counts()
    return next(u for u in counts.index if counts[u] >= 10 and assign_arm(u, FRACTIONS) == arm)


def _recommend(env: Env, user: str, **body: Any) -> dict[str, Any]:
    r = httpx.post(f"{env.url}/v1/recommendations", json={"user_id": user, **body}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def _event(user: str, item: str, event_type: str = "click", n: int = 0, **extra: Any) -> dict[str, Any]:
    ts = datetime.now(UTC) - timedelta(seconds=60 - n)
    return {
        "event_id": f"e-{user}-{item}-{event_type}-{n}",
        "user_id": user,
        "item_id": item,
        "event_type": event_type,
        "ts": ts.isoformat(),
        "session_id": f"s-{user}",
        "device": "mobile",
        **extra,
    }


def _seen(env: Env, user: str) -> set[str]:
    ev = env.events
    return set(
        ev[
            (ev["user_id"] == user)
            & ev["event_type"].isin(["click", "view", "purchase", "rating", "add_to_cart", "like"])
        ]["item_id"]
    )


# --- recommendations ------------------------------------------------------------------------


def test_warm_user_gets_ranked_unseen_items_with_versions_and_reasons(env: Env) -> None:
    for arm, version in (("stable", 1), ("canary", 2)):
        user = _warm_user(env, arm)
        out = _recommend(env, user, k=10, context={"device": "mobile", "hour": 9})
        assert out["arm"] == arm and not out["cold_start"] and out["fallback"] == []
        assert out["candidate_source"] == "retrieval"
        assert out["model_versions"] == {"retrieval": version, "ranking": version}
        ids = [i["item_id"] for i in out["items"]]
        assert len(ids) == 10 == len(set(ids))
        # Recent positives come back from the online store; none of them is recommended again.
        assert not set(ids) & _seen(env, user) & set(_recent_items(env, user))
        # A reason names an item the user touched or a category of the item's, or says that
        # popularity or the model put it there (or that it explores).
        touched = _seen(env, user) | set(_recent_items(env, user))
        cats = env.items.set_index("item_id")["category"].str.split("|")
        for item in out["items"]:
            reason = item["reason"]
            if reason.startswith("similar to "):
                assert reason.split()[2].rstrip(",") in touched, reason
            elif reason.startswith("in "):
                assert reason.split()[1].rstrip(",") in cats[item["item_id"]], reason
            else:
                assert reason in (
                    "popular right now",
                    "picked for you: predicted to engage you",
                    "new item: exploring",
                ), reason
        assert {"features", "candidates", "ranking", "mmr", "total"} <= set(out["timings_ms"])


def _recent_items(env: Env, user: str) -> list[str]:
    from recsys.online_features import get_store

    store = get_store(env.settings)
    got = store.get_online_features(
        features=["user_recent_items:recent_items"], entity_rows=[{"user_id": user}]
    )
    return str(got.to_dict()["recent_items"][0] or "").split()


def test_brand_new_user_the_store_never_saw_gets_popularity(env: Env) -> None:
    user = _user_in("stable", "brand-new-")
    out = _recommend(env, user, k=5)
    assert out["cold_start"] and out["candidate_source"] in ("segment_popularity", "global_popularity")
    assert len(out["items"]) == 5 and out["model_versions"] == {}


def test_recommendations_shift_after_a_few_events_and_touched_items_do_not_return(env: Env) -> None:
    user = _user_in("stable", "shifty-")
    before = [i["item_id"] for i in _recommend(env, user, k=10)["items"]]
    games = env.items[env.items["category"].str.contains("games")]["item_id"].tolist()
    sports = env.items[env.items["category"].str.startswith("sports")]["item_id"].tolist()
    touched = [games[0], sports[0], sports[1]]
    r = httpx.post(
        f"{env.url}/v1/events",
        json={"events": [_event(user, it, n=n) for n, it in enumerate(touched)]},
        headers=AUTH,
    )
    assert r.status_code == 200 and r.json()["accepted"] == 3 and r.json()["push_queued"] is True
    # Pushed after the answer, from the gateway's queue: the online store sees them, newest first.
    wait_for(lambda: _recent_items(env, user) == touched[::-1], timeout=10)
    after = _recommend(env, user, k=10)
    ids = [i["item_id"] for i in after["items"]]
    assert not after["cold_start"]  # 3 events = cold_start_min_events: the models take over
    assert after["candidate_source"] == "retrieval"
    assert not set(ids) & set(touched)
    assert ids != before


def test_event_is_reflected_by_the_very_next_recommendation(env: Env) -> None:
    user = _warm_user(env, "stable")
    top = _recommend(env, user, k=5)["items"][0]["item_id"]
    r = httpx.post(f"{env.url}/v1/events", json=_event(user, top, "purchase", value=None), headers=AUTH)
    assert r.status_code == 200 and r.json()["results"] == [
        {"event_id": _event(user, top, "purchase")["event_id"], "status": "accepted"}
    ]
    ids = [i["item_id"] for i in _recommend(env, user, k=5)["items"]]
    assert top not in ids


def test_items_served_and_passed_over_sink_in_the_next_answer(env: Env) -> None:
    # A user no other test asks for: the gateway remembers what it served each user.
    user = _user_in("stable", "passer-")
    first = [i["item_id"] for i in _recommend(env, user, k=5)["items"]]
    second = [i["item_id"] for i in _recommend(env, user, k=5)["items"]]
    # Served once and not taken: each of the first list is discounted, so items it did not
    # show take some of its places; nothing was touched, so nothing is filtered.
    assert set(second) - set(first)
    # Taking an item ends its discount (and hides it, as any touched item).
    taken = first[1]
    r = httpx.post(f"{env.url}/v1/events", json=_event(user, taken, "click"), headers=AUTH)
    assert r.status_code == 200
    assert taken not in [i["item_id"] for i in _recommend(env, user, k=5)["items"]]


def test_new_item_nobody_touched_can_be_recommended(env: Env) -> None:
    touched = set(env.events["item_id"])
    assert not set(NEW_ITEMS) & touched
    # Within its category the list is long enough to hold every games item: the new one must
    # be among them, though no event ever touched it (neither filtered out nor unembedded).
    games = env.items["category"].str.split("|").map(lambda c: "games" in c)
    k = min(int(games.sum()) + 1, env.settings.gateway.max_k)
    out = _recommend(env, _warm_user(env, "stable"), k=k, filters={"categories": ["games"]})
    ids = [i["item_id"] for i in out["items"]]
    new = [i for i in out["items"] if i["item_id"] in NEW_ITEMS]
    # Either path may show it: the exploration slot (never-shown items), or retrieval itself,
    # since the candidate tower embedded the item from its content.
    assert [i["item_id"] for i in new] == [NEW_ITEMS[0]], out
    assert out["model_versions"] and out["candidate_source"] in ("retrieval", "exact"), out
    explored = [i for i in new if i["reason"].startswith("new item")]
    assert len(explored) <= 1 and all(ids.index(i["item_id"]) == 3 for i in explored)  # exploration_position
    # Its content embedding places it among peers: /similar works for an item without events.
    sim = httpx.get(f"{env.url}/v1/items/{NEW_ITEMS[0]}/similar", params={"k": 5}).json()
    assert len(sim["items"]) == 5 and NEW_ITEMS[0] not in [i["item_id"] for i in sim["items"]]


def test_arms_split_by_the_configured_fractions_and_stick(env: Env) -> None:
    users = [f"split-{n}" for n in range(300)]
    arms = Counter(_recommend(env, u, k=3)["arm"] for u in users)
    assert abs(arms["canary"] / 300 - FRACTIONS["canary"]) < 0.07
    assert abs(arms["holdout"] / 300 - FRACTIONS["holdout"]) < 0.06
    assert arms["stable"] > arms["canary"] > arms["holdout"] > 0
    assert _recommend(env, users[0])["arm"] == _recommend(env, users[0])["arm"]
    holdout = _recommend(env, _warm_user(env, "holdout"), k=5)
    assert holdout["candidate_source"].endswith("popularity") and holdout["model_versions"] == {}


def test_filters_business_rules_and_excluded_ids_are_honoured(env: Env) -> None:
    user = _warm_user(env, "stable")
    cats = env.items.set_index("item_id")["category"]
    out = _recommend(env, user, k=5, filters={"categories": ["sports"]})
    assert out["items"] and all("sports" in cats[i["item_id"]].split("|") for i in out["items"])
    out = _recommend(env, user, k=20, filters={"exclude_categories": ["pets", "grocery"]})
    assert not any({"pets", "grocery"} & set(cats[i["item_id"]].split("|")) for i in out["items"])
    first = [i["item_id"] for i in _recommend(env, user, k=5)["items"]]
    again = _recommend(env, user, k=5, exclude_item_ids=[*first, "no-such-item"])
    assert not set(first) & {i["item_id"] for i in again["items"]}
    out_of_stock = set(env.items[~env.items["in_stock"]]["item_id"])
    assert out_of_stock
    for u in (user, _warm_user(env, "canary"), "brand-new-x"):
        assert not out_of_stock & {i["item_id"] for i in _recommend(env, u, k=100)["items"]}


def test_k_larger_than_the_catalog_returns_what_exists(env: Env) -> None:
    user = _warm_user(env, "stable")
    out = _recommend(env, user, k=100)  # max_k, above the 82 items
    ids = [i["item_id"] for i in out["items"]]
    assert 40 < len(ids) <= 82 - 3 and len(ids) == len(set(ids))
    r = httpx.post(f"{env.url}/v1/recommendations", json={"user_id": user, "k": 101})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "k"
    r = httpx.post(f"{env.url}/v1/recommendations", json={"user_id": "bad id!", "k": 1})
    assert r.status_code == 422 and r.json()["detail"][0] == {
        "field": "user_id",
        "value": "bad id!",
        "message": "String should match pattern '^[A-Za-z0-9_.:@-]{1,128}$'",
    }


def test_impressions_are_logged_with_request_id_and_arm(env: Env) -> None:
    out = _recommend(env, _warm_user(env, "canary"), k=4)
    log = SqliteEventLog(env.settings.event_log_path)
    try:
        deadline = time.monotonic() + 5
        rows: list[tuple[str, str]] = []
        while time.monotonic() < deadline and len(rows) < 4:
            with log._lock:
                rows = log._db.execute(
                    "SELECT item_id, body FROM events WHERE request_id = ? AND event_type = 'impression' "
                    "ORDER BY event_id",
                    (out["request_id"],),
                ).fetchall()
            time.sleep(0.05)
    finally:
        log.close()
    assert [r[0] for r in rows] == [i["item_id"] for i in out["items"]]
    body = json.loads(rows[0][1])
    assert body["arm"] == "canary" and body["model_versions"] == {"retrieval": 2, "ranking": 2}
    # The serving context training reads back from the lake: where the candidates came from.
    assert body["candidate_source"] == out["candidate_source"] and body["position"] == 0


def test_served_requests_reach_the_canary_analysis(env: Env) -> None:
    """The canary rollout reads what the gateway logged: the request, its arm and versions."""
    from recsys.event_log.sqlite import read_sqlite_log as read_event_log

    served = [_recommend(env, _warm_user(env, arm), k=3) for arm in ("canary", "stable")]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        requests, events = read_event_log(env.settings.event_log_path)
        logged = requests.set_index("request_id")
        if all(s["request_id"] in logged.index for s in served):
            break
        time.sleep(0.05)
    for s in served:
        row = logged.loc[s["request_id"]]
        assert row["arm"] == s["arm"] and row["status"] == "ok"
        assert row["versions"] == s["model_versions"] and row["latency_ms"] > 0
        shown = events[(events["request_id"] == s["request_id"]) & (events["event_type"] == "impression")]
        assert sorted(shown["item_id"]) == sorted(i["item_id"] for i in s["items"])


# --- events ---------------------------------------------------------------------------------


def test_events_are_idempotent_by_event_id(env: Env) -> None:
    event = _event("dup-user", "i01", "view", value=12.5)
    first = httpx.post(f"{env.url}/v1/events", json=event, headers=AUTH).json()
    second = httpx.post(f"{env.url}/v1/events", json={"events": [event, event]}, headers=AUTH).json()
    assert first["accepted"] == 1 and second == {
        "accepted": 0,
        "duplicates": 2,
        "push_queued": True,
        "results": [{"event_id": event["event_id"], "status": "duplicate"}] * 2,
    }
    log = SqliteEventLog(env.settings.event_log_path)
    try:
        assert log.event_ids().count(event["event_id"]) == 1
    finally:
        log.close()


def test_invalid_events_get_a_422_naming_field_and_value(env: Env) -> None:
    naive = _event("bad-user", "i01", n=1) | {"ts": "2026-11-01T10:00:00"}
    bad_type = _event("bad-user", "i01", n=2) | {"event_type": "teleport"}
    bad_id = _event("bad-user", "i01", n=3) | {"item_id": "has space"}
    r = httpx.post(f"{env.url}/v1/events", json={"events": [naive, bad_type, bad_id]}, headers=AUTH)
    assert r.status_code == 422
    detail = {d["field"]: d for d in r.json()["detail"]}
    assert detail["events[0].ts"]["value"] == "2026-11-01T10:00:00"
    assert "timezone" in detail["events[0].ts"]["message"]
    assert detail["events[1].event_type"]["value"] == "teleport"
    assert detail["events[2].item_id"]["value"] == "has space"
    r = httpx.post(
        f"{env.url}/v1/events",
        content=json.dumps(_event("bad-user", "i01", n=4) | {"value": float("nan")}),
        headers={"content-type": "application/json", **AUTH},
    )
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "value"
    extra = _event("bad-user", "i01", n=5) | {"colour": "red"}
    r = httpx.post(f"{env.url}/v1/events", json=extra, headers=AUTH)
    assert r.status_code == 422 and r.json()["detail"][0] == {
        "field": "colour",
        "value": "red",
        "message": "Extra inputs are not permitted",
    }
    log = SqliteEventLog(env.settings.event_log_path)
    try:
        assert not [e for e in log.event_ids() if "bad-user" in e]  # all or nothing
    finally:
        log.close()


# --- similar, health, metrics ---------------------------------------------------------------


def test_similar_items_and_unknown_item(env: Env) -> None:
    out = httpx.get(f"{env.url}/v1/items/i01/similar", params={"k": 3}).json()
    assert len(out["items"]) == 3 and "i01" not in [i["item_id"] for i in out["items"]]
    assert out["items"][0]["score"] >= out["items"][-1]["score"]
    r = httpx.get(f"{env.url}/v1/items/not-in-index/similar")
    assert (
        r.status_code == 404
        and "'not-in-index' is not in the index of retrieval version 1" in r.json()["detail"]
    )


def test_health_readiness_metrics_and_docs(env: Env) -> None:
    assert httpx.get(f"{env.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{env.url}/readyz").json()
    assert ready["ready"] and ready["model_server"]["retrieval"] == {"1": "AVAILABLE", "2": "AVAILABLE"}
    assert ready["degraded"] == []
    # Each labelled version pair got one request before the gateway reported ready.
    assert set(ready["warm_up"]) == {"stable", "canary"}
    assert all(": ok in " in v for v in ready["warm_up"].values()), ready["warm_up"]
    _recommend(env, _warm_user(env, "stable"))
    text = httpx.get(f"{env.url}/metrics").text
    assert 'recsys_gateway_stage_seconds_count{stage="ranking"}' in text
    assert 'recsys_gateway_arm_requests_total{arm="stable"}' in text
    assert "recsys_gateway_candidate_source_total" in text
    schema = httpx.get(f"{env.url}/openapi.json").json()
    assert {"/v1/recommendations", "/v1/events", "/v1/items/{item_id}/similar"} <= set(schema["paths"])
    assert "Event" in schema["components"]["schemas"]


# --- degraded paths: gateways in this process ---------------------------------------------


def _settings(env: Env, **overrides: Any) -> Settings:
    overrides = {"home": str(env.home), **GATEWAY_SETTINGS, **FEATURE_DEADLINE, **overrides}
    return load_settings(overrides=overrides)


@pytest.fixture(scope="module")
def stock_server(env: Env) -> Iterator[tuple[int, int]]:
    """A model server without ScaNN's ops: it serves the ranker; the ScaNN retrieval model fails to load."""
    base = env.settings.models_dir
    grpc_port, rest_port = free_port(), free_port()
    config = env.home / "stock.config"
    text = (base / "models.config").read_text()
    config.write_text(text)
    args = [
        "--port",
        str(grpc_port),
        "--rest_api_port",
        str(rest_port),
        "--host",
        "127.0.0.1",
        "--model_config_file",
        str(config),
        "--allow_version_labels_for_unavailable_models",
        "--max_num_load_retries",
        "0",
    ]
    log = env.home / "stock_server.log"
    proc = start_model_server(args, log)
    proc.process.wait(timeout=120)
    # Stock TF Serving refuses to start with a version it cannot load: that is the symptom.
    assert "Op type not registered" in log.read_text() and "Scann" in log.read_text()
    # What an operator does: serve the ranker alone, retrieval falls back to exact search.
    from recsys.model_registry import read_models_config, write_models_config

    write_models_config(config, {"ranking": read_models_config(base)["ranking"]})
    proc = start_model_server(args, log, rest_port, "ranking")
    try:
        yield grpc_port, rest_port
    finally:
        proc.stop()


def test_server_without_scann_ops_falls_back_to_exact_search(env: Env, stock_server: tuple[int, int]) -> None:
    grpc_port, rest_port = stock_server
    running = InProcessGateway(
        _settings(
            env,
            **{
                "gateway.model_server_grpc_port": grpc_port,
                "gateway.model_server_rest_port": rest_port,
                "gateway.excluded_categories": ["pets"],
            },
        )
    )
    try:
        user = _warm_user(env, "stable")
        out = httpx.post(f"{running.url}/v1/recommendations", json={"user_id": user, "k": 10}).json()
        assert out["candidate_source"] == "exact" and out["fallback"] == ["candidates:exact"], out
        assert out["model_versions"] == {"retrieval": 1, "ranking": 1}  # the ranker still ranked them
        cats = env.items.set_index("item_id")["category"]
        assert len(out["items"]) == 10 and not any("pets" in cats[i["item_id"]] for i in out["items"])
        text = httpx.get(f"{running.url}/metrics").text
        assert 'recsys_gateway_fallbacks_total{stage="candidates",to="exact"} 1.0' in text
        ready = httpx.get(f"{running.url}/readyz").json()
        assert ready["ready"] and ready["degraded"] == ["retrieval"]
    finally:
        running.close()


def test_dead_model_server_answers_with_popularity_within_the_timeout(env: Env) -> None:
    """Started with nothing listening: popularity, marked, within the budget, and not ready;
    then a model server comes up on those ports and the gateway recovers by itself."""
    grpc_port, rest_port = free_port(), free_port()
    running = InProcessGateway(
        _settings(
            env,
            **{
                "gateway.model_server_grpc_port": grpc_port,
                "gateway.model_server_rest_port": rest_port,
                "gateway.fallback_chain": ["retrieval", "segment_popularity", "global_popularity"],
                "gateway.model_timeout_ms": 100,
            },
        ),
        expect_ready=False,
    )
    server = None
    try:
        user = _warm_user(env, "stable")
        t0 = time.perf_counter()
        out = httpx.post(f"{running.url}/v1/recommendations", json={"user_id": user, "k": 5}).json()
        assert time.perf_counter() - t0 < 1.0
        assert out["candidate_source"] in ("segment_popularity", "global_popularity")
        assert f"candidates:{out['candidate_source']}" in out["fallback"] and len(out["items"]) == 5
        assert "popular" in out["items"][0]["reason"]
        text = httpx.get(f"{running.url}/metrics").text
        assert (
            f'recsys_gateway_fallbacks_total{{stage="candidates",to="{out["candidate_source"]}"}} 1.0' in text
        )
        # Never reached the model server since start: not ready, saying what it waits for.
        r = httpx.get(f"{running.url}/readyz")
        assert r.status_code == 503 and "has not answered since start" in r.json()["waiting_for"]
        flags = ["--port", str(grpc_port), "--rest_api_port", str(rest_port)]
        server = start_model_server(
            [*flags, *scann_model_server_flags(env.settings)],
            env.home / "late_server.log",
            rest_port,
            "retrieval",
        )
        # It comes back: ready, and the full path serves again, without a restart.
        wait_for(lambda: httpx.get(f"{running.url}/readyz").status_code == 200, timeout=30)
        wait_for(
            lambda: (
                httpx.post(f"{running.url}/v1/recommendations", json={"user_id": user, "k": 5}).json()[
                    "fallback"
                ]
                == []
            ),
            timeout=30,
        )
    finally:
        running.close()
        if server is not None:
            server.stop()
