"""`recsys simulate --loop N`: the closed loop, round by round, against the data's truth.

Each round, the same simulated users (``components.simulation``) ask the running gateway for
items and respond as the truth says, their events posted back as a client posts them; the
gateway logs what it served. Then the training pipeline runs as the scheduler runs it: the
event log is exported to the lake, ingest adds that served traffic to the source, and the
models are retrained, gated and pushed. As in a canary rollout, a pushed version serves the
``canary`` arm for one round beside the ``stable`` one it would replace, and is promoted
before the next retrain: each round compares the newest model with the one before it on the
same round's users (who have consumed as much of what they like), beside ``holdout`` (the
popularity list the gateway serves a fixed slice of users) and the oracle on the same users.

It all happens in a loop home of its own (``<out>/home``: a copy of the home's models and
online store, the same source), so the home's models, log and store are left as they were.
The loop home uses the embedded stores (SQLite event log and online store); a configured
Redis would be shared with the home, so the loop refuses it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import yaml
from rich.console import Console
from rich.table import Table

from components.simulation.loop import UserState, build_world, load_feature_source, simulate
from components.simulation.policies import OraclePolicy, Policy
from components.simulation.report import (
    ORACLE,
    paired_text,
    summarize_loop,
    summarize_versions,
    write_loop_report,
)
from components.simulation.truth import load_truth
from entrypoints.demo import demo_api_key
from entrypoints.simulate import (
    SERVED,
    GatewayPolicy,
    _catalog_ids,
    resolve_inputs,
    scratch_serving_home,
    servers_on,
)
from recsys.config import ENV_PREFIX, Settings
from recsys.timeutil import utc_now

LOOP_STEP = "simulation_loop"


@dataclass(frozen=True)
class LoopSetup:
    """The loop's own home and settings, and the file the servers read them from."""

    home: Path
    settings: Settings
    config_file: Path


def loop_setup(
    settings: Settings, validated: Path, out: Path, holdout_fraction: float, canary_fraction: float
) -> LoopSetup:
    """A loop home holding a copy of what serving reads, and settings that point at it.

    Raises:
        ValueError: a Redis event log or online store is configured (the loop would write
            into the home's), or the arm fractions leave no stable arm.
    """
    if not (0 < holdout_fraction < 1 and 0 < canary_fraction < 1 and holdout_fraction + canary_fraction < 1):
        raise ValueError(
            f"--holdout-fraction {holdout_fraction} and --canary-fraction {canary_fraction} must each be "
            "in (0, 1) and leave users for the stable arm"
        )
    if settings.gateway.event_log_backend != "sqlite" or settings.features.online_store != "sqlite":
        raise ValueError(
            "the loop runs on the embedded stores: gateway.event_log_backend and features.online_store "
            f"must be sqlite (got {settings.gateway.event_log_backend}, {settings.features.online_store})"
        )
    home = scratch_serving_home(settings, validated, out / "home").resolve()
    loop, config_file = _settings_in(settings, home, canary=canary_fraction, holdout=holdout_fraction)
    return LoopSetup(home, loop, config_file)


def _settings_in(settings: Settings, home: Path, canary: float, holdout: float) -> tuple[Settings, Path]:
    """``settings`` pointed at the serving copy ``home`` (its own event log, no push target)
    with these arm fractions, and the config file the servers read them from.

    A time split becomes ``last_item``: the rounds' traffic carries the minutes it was served
    in, after a source that may have ended weeks before, so the last ``holdout_days`` of
    events would be all of it, and every retrain would learn from the source alone (each
    user's last positive held out instead puts the served traffic into training).
    """
    evaluation = settings.evaluation
    if evaluation.split == "time":
        evaluation = evaluation.model_copy(update={"split": "last_item"})
    moved = settings.model_copy(
        update={
            "home": home,
            "push": settings.push.model_copy(update={"base_path": None}),
            "gateway": settings.gateway.model_copy(
                update={"event_log_path": None, "arm_fractions": {"canary": canary, "holdout": holdout}}
            ),
            "evaluation": evaluation,
        }
    )
    config_file = home / "loop.yaml"
    config_file.write_text(yaml.safe_dump(moved.model_dump(mode="json"), sort_keys=False))
    return moved, config_file


def run_loop(
    settings: Settings,
    console: Console,
    *,
    rounds: int,
    truth: Path | None = None,
    users: int = 200,
    requests_per_user: int = 10,
    k: int = 10,
    seed: int = 0,
    holdout_fraction: float = 0.2,
    canary_fraction: float = 0.4,
    out: Path | None = None,
) -> dict[str, Any]:
    """Serve, respond, export, retrain and push, ``rounds`` times; report reward per arm and round.

    Args:
        settings: the configuration of the home whose pushed models the first round serves.
        console: where progress and the summary go.
        rounds: serving rounds; a retrain follows every round but the last.
        truth: a truth folder or a data folder holding one (default: the latest run's).
        users, requests_per_user, k, seed: as ``recsys simulate``; the same users every round,
            each carrying their positive items of earlier rounds (never shown again; what
            they skipped may be, in a later session, as the gateway serves it).
        holdout_fraction: the users the gateway serves popularity (the ``holdout`` arm).
        canary_fraction: the users a newly pushed version serves for a round (``canary``).
        out: the output folder (default: the latest run's ``simulation_loop/``).

    Returns:
        The summary (also in ``<out>/summary.json``; the report in ``<out>/report.html``).
    """
    if rounds < 1:
        raise ValueError(f"--loop must be at least 1, got {rounds}")
    inputs = resolve_inputs(settings, truth, out)
    out_dir = inputs.out if out is not None else inputs.out.parent / LOOP_STEP
    started = time.perf_counter()
    setup = loop_setup(settings, inputs.validated, out_dir, holdout_fraction, canary_fraction)
    truth_model = load_truth(inputs.truth, settings.training)
    source = load_feature_source(settings, inputs.validated)
    world = build_world(settings, truth_model, source, inputs.validated, users, seed)
    not_simulatable = _not_simulatable(inputs.validated, truth_model)
    key = demo_api_key(settings)  # before the servers start: they inherit it
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update({"RECSYS_CONFIG": str(setup.config_file), settings.security.api_key_env: key})
    states: dict[tuple[str, str], UserState] = {}
    records, retrains, versions = [], [], {}
    first_day = datetime.combine(utc_now().date(), datetime.min.time(), tzinfo=UTC)
    for r in range(rounds):
        console.rule(f"round {r + 1} of {rounds}: serving")
        logs = out_dir / "logs" / f"round-{r + 1}"
        versions[r + 1] = _arm_versions(setup.settings)
        with servers_on(setup.settings, setup.home / "models", env, logs, console) as url:
            with httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": key}) as client:
                served = GatewayPolicy(client, not_simulatable, f"loop{seed}-r{r + 1}")
                policies: list[Policy] = [served, OraclePolicy(world.universe, truth_model)]
                with console.status(f"{len(world.users)} users x {requests_per_user} requests"):
                    done = simulate(
                        world, policies, requests_per_user, k, seed,
                        states=states, first_request=r * requests_per_user,
                    )  # fmt: skip
        records.append(done.assign(round=r + 1))
        for state in states.values():
            # The next round is a new session: across sessions the gateway remembers a user's
            # recent positive items (carried in ``recent``), not what they skipped or disliked.
            state.touched.clear()
        if r + 1 < rounds:
            console.rule(f"round {r + 1} of {rounds}: export, retrain, push")
            # Each round's run is a day of its own: the interval holds every round so far.
            retrains.append(_retrain(setup.settings, first_day + timedelta(days=r + 1), r + 1, console))
    compared = None
    pushed = [int(r["pushed_version"]) for r in retrains if r["pushed_version"] is not None]
    if pushed:
        from components.pipeline import run_key_for, step_dir

        console.rule("every version on the same users")
        first = {int(v) for v in versions[1].get("stable", {}).values()}
        last_run = run_key_for(datetime.fromisoformat(retrains[-1]["interval_end"]))
        passes = compare_versions(
            setup.settings, world, states, sorted(first | set(pushed)),
            step_dir(setup.settings, last_run, "validate"),
            env=env, api_key=key, not_simulatable=not_simulatable,
            requests_per_user=requests_per_user, k=k, seed=seed,
            first_request=rounds * requests_per_user, out=out_dir / "versions", console=console,
        )  # fmt: skip
        compared = summarize_versions(passes)
        passes.to_parquet(out_dir / "versions" / "requests.parquet", index=False)
    summary = summarize_loop(
        pd.concat(records, ignore_index=True),
        retrains,
        served=SERVED,
        versions=versions,
        setup={
            "truth": str(inputs.truth),
            "home": str(setup.home),
            "rounds": rounds,
            "users": len(world.users),
            "requests_per_user": requests_per_user,
            "k": k,
            "seed": seed,
            "holdout_fraction": holdout_fraction,
            "canary_fraction": canary_fraction,
        },
    )
    summary["versions_compared"] = compared
    paths = write_loop_report(summary, pd.concat(records, ignore_index=True), out_dir)
    print_loop_summary(console, summary)
    console.print(f"report: {paths['report']} ({time.perf_counter() - started:.0f}s)")
    return summary


def compare_versions(
    settings: Settings,
    world: Any,
    states: dict[tuple[str, str], UserState],
    versions: list[int],
    validated: Path,
    *,
    env: dict[str, str],
    api_key: str,
    not_simulatable: list[str],
    requests_per_user: int,
    k: int,
    seed: int,
    first_request: int,
    out: Path,
    console: Console,
) -> pd.DataFrame:
    """One more round served by each version in turn, to every user from the same state.

    Each pass runs on a fresh copy of the loop home as the last round left it (models, online
    store, ``validated``: the last run's data) with both labels on the version and no holdout,
    and replays the users from a copy of their states with the same request numbers and
    seeds: what differs between passes is the version. Returns the served records with a
    ``version`` column.

    Raises:
        RuntimeError: a pass's answers name another version than the one it pinned.
    """
    import copy

    from recsys.model_registry import integer_versions, model_names, read_models_config, write_registry

    on_disk = set.intersection(
        *(set(integer_versions(settings.models_dir / m)) for m in model_names(settings))
    )
    if set(versions) - on_disk:
        console.print(
            f"[yellow]not compared (removed by push.keep_versions): {sorted(set(versions) - on_disk)}"
        )
    passes = []
    for version in sorted(set(versions) & on_disk):
        home = scratch_serving_home(settings, validated, out / f"v{version}" / "home").resolve()
        models = read_models_config(home / "models")
        for name in model_names(settings):
            models[name] = {
                **models[name],
                "versions": [version],
                "labels": {"stable": version, "canary": version},
            }
        write_registry(home / "models", models, models)
        pinned, config_file = _settings_in(settings, home, canary=0.0, holdout=0.0)
        logs = out / f"v{version}" / "logs"
        with servers_on(
            pinned, home / "models", {**env, "RECSYS_CONFIG": str(config_file)}, logs, console
        ) as url:
            with httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": api_key}) as client:
                served = GatewayPolicy(client, not_simulatable, f"loop{seed}-v{version}")
                with console.status(f"v{version}: {len(world.users)} users x {requests_per_user} requests"):
                    done = simulate(
                        world, [served], requests_per_user, k, seed,
                        states=copy.deepcopy(states), first_request=first_request,
                    )  # fmt: skip
        if served.versions_seen - {version}:
            named = sorted(served.versions_seen)
            raise RuntimeError(f"the pass pinned to v{version} was answered by versions {named}")
        passes.append(done.assign(version=version))
    return pd.concat(passes, ignore_index=True)


def _not_simulatable(validated: Path, truth: Any) -> list[str]:
    catalog = sorted(_catalog_ids(validated))
    return [i for i, known in zip(catalog, truth.has_items(catalog), strict=True) if not known]


def _arm_versions(settings: Settings) -> dict[str, dict[str, int]]:
    """arm -> {model: version} serving it now (the holdout arm serves popularity, no model)."""
    from recsys.model_registry import serving_labels

    return serving_labels(settings)


def _retrain(
    settings: Settings, interval_end: datetime, after_round: int, console: Console
) -> dict[str, Any]:
    """The canary that served the last round promoted, then one pipeline run over the interval
    (its pushed version becomes the next round's canary)."""
    from components.pipeline import run_pipeline
    from recsys.model_registry import move_labels

    t0 = time.perf_counter()
    move_labels(settings, "promote")  # a no-op while canary and stable are the same version
    manifests = run_pipeline(settings, interval_end, console)
    gate = manifests.get("gate", {})
    pushed = manifests.get("push", {}).get("version")
    return {
        "after_round": after_round,
        "interval_end": interval_end.isoformat(),
        "served_events": manifests["ingest"].get("served_events", 0),
        "blessed": bool(gate.get("blessed")),
        "reason": gate.get("reason"),
        "pushed_version": pushed,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def print_loop_summary(console: Console, summary: dict[str, Any]) -> None:
    """Expected reward per request, per round and arm, beside the oracle's on the same users."""
    t = Table(title="expected reward per request by round (share of the oracle on the same users)")
    arms = summary["arms"]
    t.add_column("round")
    for arm in arms:
        t.add_column(arm, justify="right")
    t.add_column(ORACLE, justify="right")
    t.add_column("then", justify="left")
    for row in summary["rounds"]:
        cells = [
            f"{row['arms'][a]['expected_reward_per_request']:.3f} ({row['arms'][a]['share_of_oracle']:.0%})"
            if a in row["arms"]
            else ""
            for a in arms
        ]
        retrain = row.get("retrain")
        then = (
            ""
            if retrain is None
            else f"pushed v{retrain['pushed_version']}"
            if retrain["pushed_version"] is not None
            else f"refused: {retrain['reason']}"
        )
        t.add_row(str(row["round"]), *cells, f"{row['oracle_expected_reward_per_request']:.3f}", then)
    console.print(t)
    compared = summary.get("versions_compared")
    if compared:
        v = Table(title="each version on the same users from the same state (one more round)")
        for c in ("version", "expected reward / request", f"minus v{compared['first']} (95% CI)"):
            v.add_column(c, justify="right")
        for r in compared["versions"]:
            v.add_row(
                f"v{r['version']}", f"{r['expected_reward_per_request']:.3f}", paired_text(r["minus_first"])
            )
        console.print(v)
