"""`recsys simulate`: the served system, retrieval alone, popularity, random and the learner's
ceiling against the oracle.

Users of the synthetic data's truth (``components.simulation``) ask each policy for ``k``
items and respond as the truth says. The served system is the gateway's own request path
over HTTP (``POST /v1/recommendations``); after each answer the simulated user's events go to
``POST /v1/events``, so the gateway's session signals and seen-item filter work as in
production. Without ``--gateway`` the model server and the gateway are started here on
loopback (as ``make demo`` starts them) over a scratch copy of the serving state (models,
Feast registry and online store, validated data), so the simulated events never reach the
home's event log or online store, and a rerun starts from the same state.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from components.simulation.ceiling import ceiling_policy
from components.simulation.exploration import (
    ExploringPolicy,
    exploration_summary,
    new_items,
    true_click_rates,
)
from components.simulation.loop import World, build_world, load_feature_source, simulate
from components.simulation.policies import (
    OraclePolicy,
    Policy,
    PopularityPolicy,
    RandomPolicy,
    Recommendation,
    Request,
    RetrievalPolicy,
)
from components.simulation.report import summarize, write_report
from components.simulation.truth import SimulatedResponse, load_truth
from entrypoints.demo import demo_api_key
from entrypoints.local_servers import LOOPBACK, local_serving, tf_serving_flags
from recsys.config import Settings
from recsys.model_registry import LOAD_CONFIG, MODELS_CONFIG

SERVED = "served"
CEILING = "ceiling"
# In the order they run and are reported; the oracle is the reference of every share.
POLICIES = (SERVED, "retrieval", "popularity", "random", CEILING, "oracle")
# Draws of the ceiling policy's posterior per user (BENCHMARKS.md: 4x as many move it 0.8 points).
CEILING_PARTICLES = 5000
SIMULATION_STEP = "simulation"


@dataclass(frozen=True)
class SimulationInputs:
    """Where a simulation reads from and writes to."""

    truth: Path  # the truth folder
    validated: Path  # the validated data the served models were trained on
    out: Path  # summary.json, report.html, requests.parquet, server logs


def resolve_inputs(settings: Settings, truth: Path | None, out: Path | None) -> SimulationInputs:
    """The truth (``--truth`` or the latest run's), its run's validated data and the output folder.

    A truth under ``<home>/runs/<key>/ingest/`` reads ``<key>``'s validated data and writes to
    ``<home>/runs/<key>/simulation/``; any other truth reads the latest validated data and
    writes to ``<home>/simulation/``.
    """
    from components.simulation.truth import find_truth, latest_truth_dir
    from recsys.layout import latest_validated_dir

    folder = latest_truth_dir(settings) if truth is None else find_truth(Path(truth).resolve())
    run = folder.parent.parent if folder.parent.name == "ingest" else None
    in_a_run = run is not None and run.parent.resolve() == settings.runs_dir.resolve()
    if run is not None and in_a_run and (run / "validate" / "manifest.json").is_file():
        validated, default_out = run / "validate", run / SIMULATION_STEP
    else:
        validated, default_out = latest_validated_dir(settings), settings.home / SIMULATION_STEP
    return SimulationInputs(folder, validated, Path(out) if out else default_out)


class GatewayPolicy:
    """The served system: the gateway's ``POST /v1/recommendations``, with the simulated user's
    events posted back to ``POST /v1/events`` after each answer.

    Args:
        client: an HTTP client on the gateway (with the API key header, for events).
        exclude_item_ids: catalog items the simulation cannot score (not in the truth), sent
            as the request's exclusions so the gateway shows only simulatable items.
        run_tag: makes this run's event and session ids unique.
    """

    name = SERVED

    def __init__(self, client: httpx.Client, exclude_item_ids: Sequence[str], run_tag: str) -> None:
        self.client = client
        self.exclude_item_ids = list(exclude_item_ids)
        self.run_tag = run_tag
        self.versions_seen: set[int] = set()  # model versions the answers named

    def _session(self, user_id: str) -> str:
        return f"sim-{self.run_tag}-{user_id}"

    def recommend(self, request: Request) -> Recommendation:
        body = {
            "user_id": request.user_id,
            "k": request.k,
            "context": {
                "device": request.device,
                "hour": request.hour,
                "session_id": self._session(request.user_id),
            },
            "exclude_item_ids": self.exclude_item_ids,
        }
        answer = _ok(self.client.post("/v1/recommendations", json=body))
        self.versions_seen.update(int(v) for v in answer.get("model_versions", {}).values())
        return Recommendation(
            [str(it["item_id"]) for it in answer["items"]],
            arm=answer.get("arm"),
            details={
                "request_id": answer["request_id"],
                "candidate_source": answer.get("candidate_source"),
                "fallback": list(answer.get("fallback", [])),
            },
        )

    def observe(self, request: Request, shown: Recommendation, response: SimulatedResponse) -> None:
        acted = response.events[response.events["event_type"] != "impression"]
        if acted.empty:
            return  # the gateway logged the impressions itself
        now = datetime.now(UTC)
        events = [
            {
                "event_id": f"sim-{self.run_tag}-{request.user_id}-{request.number}-{n}",
                "user_id": request.user_id,
                "item_id": str(row.item_id),
                "event_type": str(row.event_type),
                "value": None if np.isnan(row.value) else float(row.value),
                "ts": now.isoformat(),
                "session_id": self._session(request.user_id),
                "device": request.device,
                "request_id": shown.details.get("request_id"),
            }
            for n, row in enumerate(acted.itertuples(index=False))
        ]
        _ok(self.client.post("/v1/events", json={"events": events}))


def _ok(answer: httpx.Response) -> dict[str, Any]:
    if answer.status_code >= 400:
        where = f"{answer.request.method} {answer.request.url.path}"
        raise RuntimeError(f"gateway {where}: {answer.status_code} {answer.text[:500]}")
    return answer.json()


def scratch_serving_home(settings: Settings, validated: Path, dest: Path) -> Path:
    """A home holding a copy of what the servers read (models, Feast registry and online store,
    the validated data), so the simulated events change the copy and nothing of the home's.

    Raises:
        FileNotFoundError: nothing has been pushed (no ``models.config``), naming where.
    """
    models = settings.models_dir
    if not (models / MODELS_CONFIG).is_file():
        raise FileNotFoundError(f"no {MODELS_CONFIG} in {models}: run the pipeline (push) first")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(models, dest / "models")
    for name in (MODELS_CONFIG, LOAD_CONFIG):
        path = dest / "models" / name
        if path.is_file():
            # TF Serving configs name each model's base path absolutely.
            text = path.read_text().replace(f"{models.resolve()}/", f"{(dest / 'models').resolve()}/")
            path.write_text(text)
    shutil.copytree(settings.feast_dir, dest / "feast")
    shutil.copytree(validated, dest / "runs" / validated.parent.name / "validate")
    return dest


@contextmanager
def local_gateway(settings: Settings, validated: Path, out: Path, console: Console) -> Iterator[str]:
    """Start the model server and the gateway over a scratch serving home; yield the gateway's
    URL; stop both and remove the scratch home after."""
    scratch = scratch_serving_home(settings, validated, out / "serving_home")
    try:
        env = {**os.environ, "RECSYS_HOME": str(scratch)}
        with servers_on(settings, scratch / "models", env, out / "logs", console) as url:
            yield url
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def servers_on(
    settings: Settings, models: Path, env: dict[str, str], logs: Path, console: Console
) -> Iterator[str]:
    """Start the model server on ``models`` and the gateway with ``env`` (which names their
    home); yield the gateway's URL; stop both after."""
    env = {**env, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_USE_LEGACY_KERAS": "1"}
    flags = tf_serving_flags(
        model_config_file=models / MODELS_CONFIG,
        allow_version_labels_for_unavailable_models=True,
        # A retrieval version pushed with scann_ops needs ScaNN's ops (a ScaNN build of TF Serving).
        custom_op_modules="scann.scann_ops",
        # A version that fails to load ends at once (TF Serving's default retries for minutes).
        max_num_load_retries=0,
        file_system_poll_wait_seconds=1,
    )
    with ExitStack() as stack:
        with console.status(f"starting the model server and the gateway on {models.parent}"):
            serving = stack.enter_context(
                local_serving(
                    flags,
                    logs,
                    ready_model=settings.push.retrieval_model,
                    env=env,
                    model_server_host=LOOPBACK,
                    model_server_timeout_s=180,
                    gateway_timeout_s=180,
                    poll_s=0.5,
                    own_process_groups=True,
                )
            )
        console.print(f"gateway on {serving.url}; logs in {logs}")
        yield serving.url


def run_simulation(
    settings: Settings,
    console: Console,
    *,
    truth: Path | None = None,
    users: int = 200,
    requests_per_user: int = 10,
    k: int = 10,
    seed: int = 0,
    policies: Sequence[str] = POLICIES,
    gateway_url: str | None = None,
    label: str = "stable",
    out: Path | None = None,
    exploration: Sequence[str] = (),
    new_item_count: int = 50,
) -> dict[str, Any]:
    """Simulate ``users`` users of the truth against each policy and write the report.

    Args:
        settings: the configuration (home, models, gateway rules, objective weights).
        console: where progress and the summary table go.
        truth: a truth folder or a data folder holding one (default: the latest run's).
        users: users sampled from the truth (seeded).
        requests_per_user: requests each user makes of each policy.
        k: items per request.
        seed: the users' sample, the random policy and every response.
        policies: which of ``POLICIES`` to run (the oracle always runs: it is the reference).
        gateway_url: a running gateway to call (its API key in ``security.api_key_env``);
            default: start one here.
        label: the retrieval version the ``retrieval`` policy reads.
        out: the output folder (default: the run's ``simulation/``).
        exploration: exploration policies (``recsys.exploration.EXPLORATION_KINDS``) each run
            as popularity with the gateway's exploration slots filled by it from the
            ``new_item_count`` least popular items, learning from the simulated clicks in
            process (``components.simulation.exploration``); reported side by side.

    Returns:
        The summary (also in ``<out>/summary.json``).
    """
    unknown = sorted(set(policies) - set(POLICIES))
    if unknown:
        raise ValueError(f"--policy {unknown}: not a policy; choose from {list(POLICIES)}")
    chosen = [p for p in POLICIES if p in policies or p == "oracle"]
    inputs = resolve_inputs(settings, truth, out)
    started = time.perf_counter()
    with console.status(f"reading the truth at {inputs.truth} and the data at {inputs.validated}"):
        truth_model = load_truth(inputs.truth, settings.training)
        source = load_feature_source(settings, inputs.validated)
        world = build_world(settings, truth_model, source, inputs.validated, users, seed)
    console.print(
        f"{len(world.users)} users x {requests_per_user} requests x k={k}, {len(world.universe)} items "
        f"that can be shown; truth {inputs.truth}"
    )
    built: dict[str, Policy] = {}
    if "retrieval" in chosen:
        from components.simulation.retrieval import PushedQueryEmbedder

        with console.status("loading the pushed retrieval model"):
            embedder = PushedQueryEmbedder(settings.models_dir, settings.push.retrieval_model, source, label)
        built["retrieval"] = RetrievalPolicy(world.universe, embedder)
    built["popularity"] = PopularityPolicy(world.universe, world.popular_items)
    built["random"] = RandomPolicy(world.universe, seed)
    built["oracle"] = OraclePolicy(world.universe, truth_model)
    if CEILING in chosen:
        # What a learner of category tastes that knows the generator reaches: the reference the
        # served system can be held to where the items' latent vectors are not in the data.
        universe = [str(i) for i in world.universe.item_ids]
        built[CEILING] = ceiling_policy(truth_model, universe, inputs.validated, CEILING_PARTICLES, seed)
    exploring = _exploring_policies(settings, world, truth_model, exploration, new_item_count, seed)
    setup = {
        "truth": str(inputs.truth),
        "validated": str(inputs.validated),
        "users": len(world.users),
        "requests_per_user": requests_per_user,
        "k": k,
        "seed": seed,
        "items": len(world.universe),
        "objective_weights": truth_model.objective_weights,
    }
    with ExitStack() as stack:
        if SERVED in chosen:
            # Before the servers start: they inherit the key from this process's environment.
            key = demo_api_key(settings)
            url = gateway_url or stack.enter_context(
                local_gateway(settings, inputs.validated, inputs.out, console)
            )
            client = stack.enter_context(httpx.Client(base_url=url, timeout=30, headers={"X-API-Key": key}))
            catalog = sorted(_catalog_ids(inputs.validated))
            not_simulatable = [
                i for i, known in zip(catalog, truth_model.has_items(catalog), strict=True) if not known
            ]
            setup["catalog_items_not_in_truth"] = len(not_simulatable)
            run_tag = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
            built[SERVED] = GatewayPolicy(client, not_simulatable, run_tag)
            setup["gateway"] = url
        run = [built[p] for p in chosen if p != "oracle"] + [*exploring, built["oracle"]]
        records = _with_progress(console, world, run, requests_per_user, k, seed)
    summary = summarize(records, seed=seed, setup=setup)
    served_of_ceiling = _served_share_of_ceiling(summary)
    if served_of_ceiling is not None:
        summary["served_share_of_ceiling"] = served_of_ceiling
    if exploring:
        summary["exploration"] = exploration_summary(records, exploring)
    paths = write_report(summary, records, inputs.out, served=SERVED)
    print_summary(console, summary)
    console.print(f"report: {paths['report']} ({time.perf_counter() - started:.0f}s)")
    return summary


def _exploring_policies(
    settings: Settings, world: World, truth: Any, kinds: Sequence[str], n_new: int, seed: int
) -> list[ExploringPolicy]:
    """Popularity with the gateway's exploration slots, once per exploration policy."""
    from recsys.exploration import EXPLORATION_KINDS

    unknown = sorted(set(kinds) - set(EXPLORATION_KINDS))
    if unknown:
        raise ValueError(f"--exploration {unknown}: not a policy; choose from {list(EXPLORATION_KINDS)}")
    if not kinds:
        return []
    gw = settings.gateway
    new = new_items(world.universe, world.popular_items, n_new)
    rates = true_click_rates(truth, [u.user_id for u in world.users], new)
    features = None
    if "linucb" in kinds:
        # The gateway's: the stable retrieval version's unit embeddings (no item-bias column).
        import json

        from recsys.artifacts import EMBEDDINGS_FILE, ITEM_IDS_FILE, assets_extra
        from recsys.model_registry import version_for_label
        from recsys.ranking import unit_directions

        model = settings.push.retrieval_model
        try:
            version = version_for_label(settings.models_dir, model, "stable")
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--exploration linucb reads a pushed retrieval version: {e}") from e
        extra = assets_extra(settings.models_dir / model / str(version))
        ids = [str(i) for i in json.loads((extra / ITEM_IDS_FILE).read_text())]
        features = (ids, unit_directions(np.load(extra / EMBEDDINGS_FILE)))
    return [
        ExploringPolicy(
            PopularityPolicy(world.universe, world.popular_items),
            world.universe,
            kind,  # type: ignore[arg-type]
            new,
            rates,
            seed,
            slots=max(1, gw.exploration_slots),
            position=gw.exploration_position,
            epsilon=gw.exploration_epsilon,
            prior_alpha=gw.exploration_prior_alpha,
            prior_beta=gw.exploration_prior_beta,
            features=features if kind == "linucb" else None,
            linucb_alpha=gw.exploration_linucb_alpha,
            linucb_ridge=gw.exploration_linucb_ridge,
        )
        for kind in dict.fromkeys(kinds)
    ]


def _catalog_ids(validated: Path) -> set[str]:
    from recsys.storage import read_table

    return set(read_table(validated, "items", columns=["item_id"])["item_id"].astype(str))


def _with_progress(
    console: Console, world: World, policies: Sequence[Policy], requests_per_user: int, k: int, seed: int
) -> pd.DataFrame:
    """``simulate`` with one progress bar per policy."""
    per_policy = len(world.users) * requests_per_user
    with Progress(
        TextColumn("{task.description:>10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bars = {p.name: progress.add_task(p.name, total=per_policy) for p in policies}
        return simulate(
            world, policies, requests_per_user, k, seed, on_request=lambda name: progress.advance(bars[name])
        )


def _served_share_of_ceiling(summary: Mapping[str, Any]) -> float | None:
    """The served system's expected reward per request over the ceiling's; None unless both ran."""
    policies = summary["policies"]
    if SERVED not in policies or CEILING not in policies:
        return None
    top = policies[CEILING]["expected_reward_per_request"]["mean"]
    return float(policies[SERVED]["expected_reward_per_request"]["mean"] / top) if top > 0 else None


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    """The table a person reads: reward per request with its interval and the share of the oracle."""
    t = Table(title=f"reward per request (95% interval over users), share of the {summary['reference']}")
    for c in ("policy", "reward", "95% CI", "expected", "share", "share 95% CI", "click rate", "purchases"):
        t.add_column(c, justify="left" if c == "policy" else "right")
    for name, p in summary["policies"].items():
        r, e, s = p["reward_per_request"], p["expected_reward_per_request"], p["share_of_oracle"]
        t.add_row(
            name,
            f"{r['mean']:.3f}",
            f"{r['ci95'][0]:.3f}..{r['ci95'][1]:.3f}",
            f"{e['mean']:.3f}",
            f"{s['mean']:.1%}",
            f"{s['ci95'][0]:.1%}..{s['ci95'][1]:.1%}",
            f"{p['click_rate']:.3f}",
            f"{p['purchases_per_request']:.3f}",
        )
    console.print(t)
    for name in (SERVED, CEILING):
        by_request = summary["policies"].get(name, {}).get("expected_share_by_request") or []
        if len(by_request) > 1:
            shares = " ".join(f"{v:.0%}" for v in by_request)
            console.print(f"{name}, share of the {summary['reference']} by request number: {shares}")
    served = summary["policies"].get(SERVED)
    if served is not None:
        if served.get("arms"):
            arms = ", ".join(
                f"{arm} {v['requests']} requests, reward {v['reward_per_request']:.3f}"
                for arm, v in served["arms"].items()
            )
            console.print(f"served by arm: {arms}")
        if "served_share_of_ceiling" in summary:
            console.print(
                f"served reaches {summary['served_share_of_ceiling']:.0%} of the {CEILING}'s expected reward "
                "(a learner of category tastes that knows the generator but not the items' latent vectors)"
            )
        if served["not_allowed"] or served["unsimulated"]:
            console.print(
                f"[yellow]the gateway showed {served['not_allowed']} items the simulation's filter did not "
                f"allow and {served['unsimulated']} it cannot score[/yellow]"
            )
