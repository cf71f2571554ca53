"""Explanations through the real model server: reasons that name what drove each item, and
``explain=true`` attributions checked against the ranker called directly.

On a copy of the session's serving home (``tests.support.homes``): ``recsys serve
model-server`` with ScaNN's ops (subprocess) and a gateway in this process on it. The user
is made here: a few clicks on games items, posted through ``/v1/events``, so their whole
recent history is one category and every input the ranker sees is known to the test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from recsys.config import Settings, load_settings
from serving.clients import ModelServerClient
from serving.gateway.explanations import ATTRIBUTION_TOP, REASON_EXPLORING, REASON_PICKED, REASON_POPULAR
from serving.gateway.policy import assign_arm
from tests.support.homes import copy_home
from tests.support.polling import wait_for
from tests.support.ports import free_port
from tests.support.servers import (
    API_KEY,
    AUTH,
    FRACTIONS,
    GATEWAY_SETTINGS,
    InProcessGateway,
    scann_model_server_flags,
    start_model_server,
)

pytestmark = pytest.mark.integration

# A fixed context, so the test knows the ranker's hour and device inputs.
CONTEXT = {"device": "mobile", "hour": 9}
# What the tiny ranker takes (the fixture trains it without the windowed counts): the
# test rebuilds each row from these, so a new input must be added here on purpose.
RANKER_INPUTS = {"user_id", "age_bucket", "country", "recent_items", "hour", "device", "item_id", "category"}


@dataclass
class Env:
    settings: Settings
    url: str
    rest_port: int
    items: pd.DataFrame
    gateway: Any  # the served app's ``Gateway``, in this process


@pytest.fixture(scope="module")
def env(gateway_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    home = tmp_path_factory.mktemp("explain_home") / "home"
    settings = copy_home(gateway_template, home)
    grpc_port, rest_port = free_port(), free_port()
    flags = ["--port", str(grpc_port), "--rest_api_port", str(rest_port), *scann_model_server_flags(settings)]
    server = start_model_server(flags, home / "model_server.log", rest_port, "retrieval")
    overrides = {
        "home": str(home),
        **GATEWAY_SETTINGS,
        # A busy test machine must not serve the user as cold (popularity, no ranker).
        "gateway.feature_timeout_ms": 500,
        # These tests ask for a user more than once and compare the answers: no memory of
        # what was served in between (session feedback is tested in test_gateway).
        "gateway.session_shown_items": 0,
        "gateway.model_server_grpc_port": grpc_port,
        "gateway.model_server_rest_port": rest_port,
    }
    try:
        gateway = InProcessGateway(load_settings(overrides=overrides), environ={"RECSYS_API_KEY": API_KEY})
        try:
            items = pd.read_parquet(settings.validated_dir / "items")
            served = gateway.server.config.app.state.gateway
            yield Env(settings, gateway.url, rest_port, items, served)
        finally:
            gateway.close()
    finally:
        server.stop()


def _stable_user(prefix: str) -> str:
    n = 0
    while assign_arm(f"{prefix}{n}", FRACTIONS) != "stable":
        n += 1
    return f"{prefix}{n}"


def _gamer(env: Env, prefix: str) -> tuple[str, list[str]]:
    """A stable-arm user who clicked four games items (and nothing else); their recent items."""
    user = _stable_user(prefix)
    games = env.items[env.items["category"].str.split("|").map(lambda c: "games" in c)]["item_id"]
    clicked = games.tolist()[:4]
    now = datetime.now(UTC)
    events = [
        {
            "event_id": f"e-{user}-{n}",
            "user_id": user,
            "item_id": item,
            "event_type": "click",
            "ts": (now - timedelta(seconds=60 - n)).isoformat(),
            "session_id": f"s-{user}",
            "device": "mobile",
        }
        for n, item in enumerate(clicked)
    ]
    r = httpx.post(f"{env.url}/v1/events", json={"events": events}, headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["accepted"] == 4 and r.json()["push_queued"], r.text
    # Pushed to the online store after the answer: wait until the store's row has the clicks.
    wait_for(lambda: set(clicked) <= set(_recent_items(env, user)), timeout=10)
    return user, _recent_items(env, user)


def _recent_items(env: Env, user: str) -> list[str]:
    from recsys.online_features import get_store

    got = get_store(env.settings).get_online_features(
        features=["user_recent_items:recent_items"], entity_rows=[{"user_id": user}]
    )
    return str(got.to_dict()["recent_items"][0] or "").split()


def _recommend(env: Env, user: str, **body: Any) -> dict[str, Any]:
    r = httpx.post(
        f"{env.url}/v1/recommendations",
        json={"user_id": user, "k": 10, "context": CONTEXT, **body},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return r.json()


def _ranker_calls(env: Env) -> float:
    """Predict calls the model server answered for the ranking model, any signature (its
    Prometheus counter; metadata reads are counted apart)."""
    text = httpx.get(f"http://127.0.0.1:{env.rest_port}/monitoring/prometheus/metrics").text
    lines = re.findall(r"^model_server_requests_total\{(.*)\} ([0-9.e+]+)$", text, flags=re.M)
    return sum(float(n) for labels, n in lines if 'model="ranking"' in labels and 'api="predict"' in labels)


def _ranker_row(env: Env, user: str, recent: list[str], item: str) -> dict[str, Any]:
    """The (user, item) row the ranker sees for this request, built from what the test knows:
    a user the profile table never saw (profile ""), the recent items, the context, the item."""
    return {
        "user_id": user,
        "age_bucket": "",
        "country": "",
        "recent_items": " ".join(recent),
        "hour": CONTEXT["hour"],
        "device": CONTEXT["device"],
        "item_id": item,
        "category": str(env.items.set_index("item_id")["category"][item]),
    }


def _ranker_scores(env: Env, rows: list[dict[str, Any]]) -> np.ndarray:
    """The stable ranker's combined score of each row, called directly (``serving_default``)."""
    client = ModelServerClient(rest_url=f"http://127.0.0.1:{env.rest_port}", timeout=10)
    columns = {name: np.asarray([r[name] for r in rows]) for name in rows[0]}
    columns["hour"] = columns["hour"].astype(np.int64)
    pred = client.predict("ranking", columns, label="stable", signature_name="serving_default")
    return np.asarray(pred.outputs["score"], dtype=np.float64)


def test_explain_attributes_the_ranker_score_and_costs_a_call_only_when_asked(env: Env) -> None:
    user, recent = _gamer(env, "explained-")
    requirements = env.settings.models_dir / "ranking" / "1" / "assets.extra" / "requirements.json"
    assert set(json.loads(requirements.read_text())["inputs"]) == RANKER_INPUTS
    calls = _ranker_calls(env)
    plain = _recommend(env, user)
    assert plain["model_versions"] == {"retrieval": 1, "ranking": 1} and not plain["cold_start"]
    # Without explain: one ranking call, and no attribution key at all (not even null).
    assert _ranker_calls(env) == calls + 1
    assert all(set(item) == {"item_id", "score", "reason"} for item in plain["items"])
    assert "explain" not in plain["timings_ms"]

    explained = _recommend(env, user, explain=True)
    assert _ranker_calls(env) == calls + 3  # the ranking call and one batched explanation call
    assert "explain" in explained["timings_ms"]
    ranked = [i for i in explained["items"] if i["reason"] != REASON_EXPLORING]
    assert len(ranked) >= 5
    for item in explained["items"]:
        attribution = item["attribution"]
        if item["reason"] == REASON_EXPLORING:
            assert attribution == [{"kind": "source", "name": "exploration", "effect": None}]
            continue
        assert 1 <= len(attribution) <= ATTRIBUTION_TOP and {a["kind"] for a in attribution} == {"input"}
        assert {a["name"] for a in attribution} <= RANKER_INPUTS
        sizes = [abs(a["effect"]) for a in attribution]
        assert sizes == sorted(sizes, reverse=True), attribution

    # The top input of each of the first items, removed by hand: the ranker's own score
    # moves by the attributed effect (to float rounding).
    for item in ranked[:3]:
        top = item["attribution"][0]
        row = _ranker_row(env, user, recent, item["item_id"])
        assert set(row) == RANKER_INPUTS
        without = {**row, top["name"]: 0 if top["name"] == "hour" else ""}
        full, removed = _ranker_scores(env, [row, without])
        assert abs(full - removed) > 1e-6, (item, full, removed)
        assert full - removed == pytest.approx(top["effect"], abs=2e-5), (item, full, removed)


def test_the_request_path_run_without_an_event_loop_answers_as_the_served_one(env: Env) -> None:
    from serving.gateway.schemas import RecommendationRequest

    user, _ = _gamer(env, "blocking-")
    served = _recommend(env, user, explain=True)
    # The same coroutines, run from this thread (no event loop): the feature read and the
    # model calls block instead of awaiting.
    body = {"user_id": user, "k": 10, "context": CONTEXT, "explain": True}
    direct = env.gateway.recommend(RecommendationRequest(**body))
    for key in ("arm", "model_versions", "cold_start", "fallback", "candidate_source", "counts"):
        assert direct[key] == served[key], key
    assert served["candidate_source"] == "retrieval" and served["counts"]["ranked"] > 0
    # Exploration draws from each request's own id; every other item, its score, reason and
    # attribution are the same.
    ranked = [
        [
            (i["item_id"], i["score"], i["reason"], i["attribution"])
            for i in out["items"]
            if i["reason"] != REASON_EXPLORING
        ]
        for out in (served, direct)
    ]
    assert len(ranked[0]) >= 5
    assert ranked[0] == ranked[1]


def test_reasons_of_a_one_category_history_name_it_or_its_items(env: Env) -> None:
    user, recent = _gamer(env, "gamer-")
    categories = env.items.set_index("item_id")["category"].str.split("|")
    recent_categories = [set(categories[r]) for r in recent]
    assert all("games" in c for c in recent_categories)
    out = _recommend(env, user)
    assert out["candidate_source"] == "retrieval"
    named_history = 0
    for item in out["items"]:
        reason, cats = item["reason"], set(categories[item["item_id"]])
        similar = re.fullmatch(r"similar to (\S+), which you engaged with", reason)
        in_category = re.fullmatch(r"in (\S+), like (\d+) of your (\d+) recent items", reason)
        if similar:
            assert similar.group(1) in recent, reason
            named_history += 1
        elif in_category:
            # A category of the item, shared by as many recent items as the reason says.
            category, matching, of = (
                in_category.group(1),
                int(in_category.group(2)),
                int(in_category.group(3)),
            )
            assert category in cats and of == len(recent), (reason, cats)
            assert matching == sum(category in c for c in recent_categories), reason
            named_history += 1
        else:
            assert reason in (REASON_POPULAR, REASON_PICKED, REASON_EXPLORING), reason
    assert named_history, out["items"]


def test_items_the_ranker_did_not_score_are_attributed_to_their_source(env: Env) -> None:
    cold = _stable_user("nobody-yet-")
    calls = _ranker_calls(env)
    out = _recommend(env, cold, explain=True)
    assert out["cold_start"] and out["candidate_source"].endswith("popularity")
    assert _ranker_calls(env) == calls  # nothing was ranked: nothing to re-score
    for item in out["items"]:
        expected = "exploration" if item["reason"] == REASON_EXPLORING else out["candidate_source"]
        assert item["attribution"] == [{"kind": "source", "name": expected, "effect": None}], item
