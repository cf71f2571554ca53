"""The gateway follows the serving policy pushed with the retrieval version.

On a copy of the session's serving home (``stable`` = version 1, ``canary`` = version 2), the
canary version carries a policy that leaves the ranker out, as the evaluation writes one when
the ranker lowered the validation metric, and gives the item-to-item source the whole
candidate score; the stable version carries none (pushed before versions had one). A warm
user of each arm then shows the difference: the canary answer follows the neighbours of the
user's recent items (no ranking call, no ranking version), the stable one is retrieval ranked
with the configuration's fusion weight.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest

from components.features.tables import recent_items_table
from entrypoints.local_servers import setting_variables
from recsys.artifacts import assets_extra
from recsys.config import Settings
from recsys.neighbours import read_item_neighbours
from recsys.online_features import TIMESTAMP
from recsys.ranking import ServingPolicy, write_serving_policy
from serving.gateway.explanations import REASON_EXPLORING, also_taken_reason
from serving.gateway.policy import assign_arm
from tests.support.homes import copy_home
from tests.support.servers import FRACTIONS, gateway_env, scann_model_server_flags, serving

pytestmark = pytest.mark.integration

NEIGHBOURS_NO_RANKER = ServingPolicy(
    retrieval_weight=None,
    neighbour_weight=1.0,
    mmr=False,
    rank_depth=1000,
    reasons=["the ranker lowered validation ndcg@10", "the item-to-item source raised it"],
)


@pytest.fixture(scope="module")
def gateway(
    gateway_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, pd.DataFrame, Settings]]:
    home = tmp_path_factory.mktemp("policy_home") / "home"
    settings = copy_home(gateway_template, home)
    write_serving_policy(settings.models_dir / settings.push.retrieval_model / "2", NEIGHBOURS_NO_RANKER)
    # Generous deadlines: a busy test machine must not turn a warm, ranked user cold or unranked.
    deadlines = {"gateway.feature_timeout_ms": 1000, "gateway.model_timeout_ms": 2000}
    env = {**gateway_env(home), **setting_variables(deadlines)}
    with serving(scann_model_server_flags(settings), home, env) as running:
        yield running.url, pd.read_parquet(settings.validated_dir / "events"), settings


def _warm_user(events: pd.DataFrame, arm: str) -> str:
    counts = events[events["event_type"] != "impression"]["user_id"].value_counts()
    return next(u for u in counts.index if counts[u] >= 10 and assign_arm(u, FRACTIONS) == arm)


def test_a_version_whose_policy_leaves_the_ranker_out_is_served_by_its_candidate_sources(gateway) -> None:
    url, events, settings = gateway
    user = _warm_user(events, "canary")
    canary = httpx.post(f"{url}/v1/recommendations", json={"user_id": user, "k": 5, "explain": True}).json()
    assert canary["candidate_source"] in ("retrieval", "exact"), canary
    assert canary["model_versions"] == {"retrieval": 2}  # no ranking call was made
    assert canary["counts"]["ranked"] == 0 and "ranking:skipped" not in canary["fallback"]
    # The whole candidate score is the neighbours': the answer follows their order for the
    # user's recent items (filtering removes items, never reorders; exploration slots aside).
    neighbours = read_item_neighbours(assets_extra(settings.models_dir / settings.push.retrieval_model / "2"))
    assert neighbours is not None and canary["counts"]["neighbours"] > 0
    state = recent_items_table(events[events["user_id"] == user], settings.features.recent_items)
    recent = str(state.sort_values(TIMESTAMP)["recent_items"].iloc[-1]).split()
    expected = neighbours.score(recent, settings.gateway.neighbour_candidates)[0].tolist()
    served = [it["item_id"] for it in canary["items"] if it["reason"] != REASON_EXPLORING]
    at = [expected.index(i) for i in served]
    assert at == sorted(at), (served, expected[:20])
    # The ranker did not score them: each attribution names the source that placed it.
    for it in canary["items"]:
        if it["reason"] != REASON_EXPLORING:
            assert it["attribution"][0]["name"] in ("retrieval", "exact", "item_to_item"), it
    # Each is explained by the recent item that points to it most.
    first = canary["items"][0]
    assert first["reason"] == also_taken_reason(neighbours.strongest_sources(recent, [first["item_id"]])[0])
    # The stable version has no policy: the configured fusion of ranker and retrieval serves.
    stable = httpx.post(
        f"{url}/v1/recommendations", json={"user_id": _warm_user(events, "stable"), "k": 5}
    ).json()
    assert stable["model_versions"] == {"retrieval": 1, "ranking": 1}, stable
    assert stable["counts"]["ranked"] > 0
