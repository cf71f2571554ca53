"""The gateway follows the serving policy pushed with the retrieval version.

On a copy of the session's serving home (``stable`` = version 1, ``canary`` = version 2), the
canary version carries a policy that leaves the ranker out, as the evaluation writes one when
the ranker lowered the validation metric; the stable version carries none (pushed before
versions had one). A warm user of each arm then shows the difference: the canary answer is
retrieval order (no ranking call, no ranking version), the stable one is ranked with the
configuration's fusion weight.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pandas as pd
import pytest

from entrypoints.local_servers import setting_variables
from recsys.ranking import ServingPolicy, write_serving_policy
from serving.gateway.policy import assign_arm
from tests.support.homes import copy_home
from tests.support.servers import FRACTIONS, gateway_env, scann_model_server_flags, serving

pytestmark = pytest.mark.integration

NO_RANKER = ServingPolicy(
    retrieval_weight=None, mmr=True, rank_depth=1000, reasons=["the ranker lowered validation ndcg@10"]
)


@pytest.fixture(scope="module")
def gateway(
    gateway_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, pd.DataFrame]]:
    home = tmp_path_factory.mktemp("policy_home") / "home"
    settings = copy_home(gateway_template, home)
    write_serving_policy(settings.models_dir / settings.push.retrieval_model / "2", NO_RANKER)
    # Generous deadlines: a busy test machine must not turn a warm, ranked user cold or unranked.
    deadlines = {"gateway.feature_timeout_ms": 1000, "gateway.model_timeout_ms": 2000}
    env = {**gateway_env(home), **setting_variables(deadlines)}
    with serving(scann_model_server_flags(settings), home, env) as running:
        yield running.url, pd.read_parquet(settings.validated_dir / "events")


def _warm_user(events: pd.DataFrame, arm: str) -> str:
    counts = events[events["event_type"] != "impression"]["user_id"].value_counts()
    return next(u for u in counts.index if counts[u] >= 10 and assign_arm(u, FRACTIONS) == arm)


def test_a_version_whose_policy_leaves_the_ranker_out_is_served_in_retrieval_order(gateway) -> None:
    url, events = gateway
    canary = httpx.post(
        f"{url}/v1/recommendations", json={"user_id": _warm_user(events, "canary"), "k": 5}
    ).json()
    assert canary["candidate_source"] in ("retrieval", "exact"), canary
    assert canary["model_versions"] == {"retrieval": 2}  # no ranking call was made
    assert canary["counts"]["ranked"] == 0 and "ranking:skipped" not in canary["fallback"]
    # The stable version has no policy: the configured fusion of ranker and retrieval serves.
    stable = httpx.post(
        f"{url}/v1/recommendations", json={"user_id": _warm_user(events, "stable"), "k": 5}
    ).json()
    assert stable["model_versions"] == {"retrieval": 1, "ranking": 1}, stable
    assert stable["counts"]["ranked"] > 0
