"""Each version served to the same users from the same state (`recsys simulate --loop`'s last part).

The built serving home holds two pushed versions (1 stable, 2 canary). ``compare_versions``
pins each in turn on a fresh copy of the home, replays the same simulated users from copies
of the same states, and checks every answer names the pinned version; the paired summary
then compares them user by user.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from rich.console import Console

from components.simulation.loop import UserState, build_world, load_feature_source
from components.simulation.report import summarize_versions
from components.simulation.truth import load_truth
from entrypoints.simulate_loop import compare_versions
from recsys.model_registry import read_models_config
from tests.support.homes import NEW_ITEMS, copy_home

pytestmark = pytest.mark.integration


def test_each_version_serves_the_same_users_from_the_same_state(
    gateway_template: Path, tmp_path: Path
) -> None:
    settings = copy_home(gateway_template, tmp_path / "home")
    labels_before = read_models_config(settings.models_dir)
    truth = load_truth(settings.home / "input", settings.training)
    source = load_feature_source(settings, settings.validated_dir)
    world = build_world(settings, truth, source, settings.validated_dir, 10, seed=3)
    states = {("served", u.user_id): UserState() for u in world.users}
    key = "versions-test-key"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSYS_")}
    env[settings.security.api_key_env] = key

    passes = compare_versions(
        settings, world, states, [1, 2], settings.validated_dir,
        env=env, api_key=key, not_simulatable=list(NEW_ITEMS),
        requests_per_user=2, k=5, seed=3, first_request=4, out=tmp_path / "versions", console=Console(),
    )  # fmt: skip

    by_version = passes.groupby("version")
    assert sorted(passes["version"].unique()) == [1, 2]
    assert (by_version["user_id"].nunique() == 10).all() and (by_version.size() == 10 * 2).all()
    assert set(passes["arm"]) == {"stable"} and (passes["shown"] > 0).all()
    assert set(passes["request"]) == {4, 5}
    read = ~passes["fallback"].str.contains("features:", regex=False)
    assert (passes.loc[read, "not_allowed"] == 0).all()
    # The states handed in are copies: the caller's are as they were.
    assert all(s.touched == set() for s in states.values())
    # The home's own labels are untouched; each pass pinned a copy.
    assert read_models_config(settings.models_dir) == labels_before

    compared = summarize_versions(passes)
    assert [r["version"] for r in compared["versions"]] == [1, 2]
    per_user = passes.groupby(["version", "user_id"])["expected_reward"].mean().unstack(0)
    paired = compared["versions"][1]["minus_first"]
    assert paired["mean"] == pytest.approx((per_user[2] - per_user[1]).mean())
    assert compared["versions"][0]["minus_first"] is None
