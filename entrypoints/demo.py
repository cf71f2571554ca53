"""`make demo`: the main job end to end on the embedded defaults, and what a person looks at.

1. The training DAG runs through Airflow (`airflow dags test`, in-process scheduler, real task
   runner) on the seeded synthetic data: ingest, validate, features, training data, train,
   evaluate, gate, index, push.
2. The model server (TF Serving API) and the gateway start on free loopback ports.
3. The demo prints the evaluation beside popularity, recommendations for a warm user, for
   a brand-new user, for the same warm user after a few events, and the canary status.
4. Everything it started is stopped, also on failure or Ctrl-C.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from entrypoints.local_servers import LOOPBACK, local_serving, tf_serving_flags
from recsys.config import Settings
from recsys.contracts import CATEGORY_SEPARATOR
from recsys.layout import DAGS_DIR, REPO_ROOT

BIN = Path(sys.executable).parent


def demo_api_key(settings: Settings) -> str:
    """The gateway's API key for this run: the environment's, or a fresh random one.

    The gateway takes events only with a key; the demo posts events, so a demo without one
    configured makes its own, puts it in this process's environment (the servers it starts
    inherit it) and never prints it.
    """
    name = settings.security.api_key_env
    if not os.environ.get(name):
        os.environ[name] = secrets.token_urlsafe(32)
    # A profile with an admin key of its own: the demo makes that one too (never the same).
    admin = settings.security.admin_key_env
    if admin and not os.environ.get(admin):
        os.environ[admin] = secrets.token_urlsafe(32)
    return os.environ[name]


def _env(settings: Settings) -> dict[str, str]:
    demo_api_key(settings)
    env = dict(os.environ)
    env.update(
        AIRFLOW_HOME=str(settings.home / "airflow"),
        AIRFLOW__CORE__DAGS_FOLDER=str(DAGS_DIR),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        RECSYS_HOME=str(settings.home),
        TF_CPP_MIN_LOG_LEVEL="2",
        TF_USE_LEGACY_KERAS="1",
        GX_ANALYTICS_ENABLED="false",
    )
    return env


def run_training_dag(settings: Settings, console: Console) -> None:
    """`airflow dags test training_pipeline <end date>` with a progress bar over its tasks."""
    from components.pipeline import STEPS
    from recsys.layout import run_key_for

    env = _env(settings)
    logical_date = run_key_for(settings.generate.end_date)
    log_path = settings.home / "airflow" / f"dags_test_{logical_date}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with console.status("airflow db migrate"):
        subprocess.run(
            [str(BIN / "airflow"), "db", "migrate"], env=env, check=True, capture_output=True, cwd=REPO_ROOT
        )
    tasks = [name for name, _ in STEPS]
    done = re.compile(r"\[DAG TEST\] end task task_id=(\w+)")
    with (
        Progress(
            TextColumn("[bold]training_pipeline[/bold] {task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} tasks"),
            TimeElapsedColumn(),
            console=console,
        ) as progress,
        log_path.open("w") as log,
    ):
        bar = progress.add_task("starting", total=len(tasks))
        proc = subprocess.Popen(
            [str(BIN / "airflow"), "dags", "test", "training_pipeline", logical_date],
            env=env,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        finished: list[str] = []
        for line in proc.stdout:
            log.write(line)
            m = done.search(line)
            if m and m.group(1) not in finished:
                finished.append(m.group(1))
                nxt = next((t for t in tasks if t not in finished), "done")
                progress.update(bar, completed=len(finished), description=f"{m.group(1)} done, {nxt}")
            elif "gate: model" in line:
                console.print(line.strip().split("] ")[-1])
        code = proc.wait()
    if code != 0:
        raise RuntimeError(f"training_pipeline failed (exit {code}); log: {log_path}")
    console.print(f"[green]✓[/green] training_pipeline succeeded through Airflow; log: {log_path}")


@contextmanager
def servers(settings: Settings, console: Console) -> Iterator[str]:
    """Start the model server and the gateway; yield the gateway's URL; stop both after."""
    logs = settings.home / "demo"
    flags = tf_serving_flags(
        model_config_file=settings.models_dir / "models.config",
        allow_version_labels_for_unavailable_models=True,
        file_system_poll_wait_seconds=1,
    )
    with ExitStack() as stack:
        with console.status("starting the model server (TF Serving API) and the gateway"):
            serving = stack.enter_context(
                local_serving(
                    flags,
                    logs,
                    ready_model=settings.push.retrieval_model,
                    env=_env(settings),
                    model_server_host=LOOPBACK,
                    model_server_timeout_s=180,
                    gateway_timeout_s=180,
                    poll_s=0.5,
                    stop_timeout_s=20,
                    # Out of the terminal's Ctrl-C: the demo stops them itself, children included.
                    own_process_groups=True,
                )
            )
        ports = serving.ports
        console.print(
            f"[green]✓[/green] model server on :{ports.rest} (REST) / :{ports.grpc} (gRPC), "
            f"gateway on {serving.url} (docs at /docs); logs in {logs}"
        )
        yield serving.url


def print_evaluation(settings: Settings, console: Console) -> dict[str, Any]:
    from recsys.layout import run_key_for, step_dir

    out = step_dir(settings, run_key_for(settings.generate.end_date), "evaluate")
    metrics = json.loads((out / "metrics.json").read_text())
    blessing = json.loads((out / "blessing.json").read_text())
    by_model = metrics["models"]
    systems = [s for s in ("served", "retriever", "retriever_ranker", "popularity") if s in by_model]
    t = Table(title=f"offline evaluation on the time holdout (report: {out / 'report.html'})")
    t.add_column("slice")
    t.add_column("metric")
    for s in systems:
        t.add_column(s, justify="right")
    for slice_ in ("all", "new_users", "new_items", "heavy_users"):
        for metric in ("recall@50", "ndcg@10"):
            if slice_ in by_model[systems[0]]:
                users = by_model[systems[0]][slice_].get("users", 0)
                t.add_row(
                    f"{slice_} ({users} users)",
                    metric,
                    *(f"{by_model[s].get(slice_, {}).get(metric, float('nan')):.3f}" for s in systems),
                )
    console.print(t)
    for reason in (metrics.get("serving_policy") or {}).get("reasons", [])[1:]:
        console.print(f"serving policy: {reason}", markup=False)
    verdict = "[green]blessed[/green]" if blessing.get("blessed") else "[red]refused[/red]"
    console.print(f"gate: {verdict}: {blessing.get('reason')}")
    return blessing


def _recommend(client: httpx.Client, user_id: str, k: int = 8) -> dict[str, Any]:
    r = client.post("/v1/recommendations", json={"user_id": user_id, "k": k})
    r.raise_for_status()
    return r.json()


def _show(console: Console, title: str, resp: dict[str, Any], items: pd.DataFrame) -> None:
    t = Table(
        title=title,
        caption=(
            f"arm {resp['arm']}, versions {resp['model_versions']}, "
            f"candidates from {resp['candidate_source']}"
            + (f", fallback {resp['fallback']}" if resp["fallback"] else "")
            + f", {sum(resp['timings_ms'].values()):.1f} ms"
        ),
    )
    for c in ("#", "item", "category", "title", "score", "why"):
        t.add_column(c)
    for i, it in enumerate(resp["items"], start=1):
        row = items.loc[it["item_id"]] if it["item_id"] in items.index else None
        t.add_row(
            str(i),
            it["item_id"],
            "" if row is None else row["category"],
            "" if row is None else row["title"],
            "" if it["score"] is None else f"{it['score']:.3f}",
            it["reason"],
        )
    console.print(t)


def show_recommendations(settings: Settings, url: str, console: Console) -> None:
    from recsys.layout import run_key_for, step_dir

    validated = step_dir(settings, run_key_for(settings.generate.end_date), "validate")
    items = pd.read_parquet(validated / "items").set_index("item_id")
    events = pd.read_parquet(validated / "events", columns=["user_id", "item_id", "event_type"])
    positives = events[events["event_type"].isin(["click", "view", "purchase", "rating", "like"])]
    # A user with some history but not the heaviest one: a few new clicks visibly move a short
    # history, while the heaviest user's list barely changes.
    counts = positives.groupby("user_id").size()
    floor = max(5, 2 * settings.gateway.cold_start_min_events)
    eligible = counts[counts >= floor].reset_index(name="n").sort_values(["n", "user_id"])
    warm = str(eligible["user_id"].iloc[0]) if len(eligible) else str(counts.idxmax())
    headers = {"X-API-Key": demo_api_key(settings)}
    with httpx.Client(base_url=url, timeout=10, headers=headers) as client:
        before = _recommend(client, warm)
        _show(
            console,
            f"warm user {warm} ({(positives['user_id'] == warm).sum()} positive events)",
            before,
            items,
        )
        _show(
            console,
            "brand-new user demo-new-user (no events at all)",
            _recommend(client, "demo-new-user"),
            items,
        )
        # The warm user now clicks three items of a category absent from their list.
        shown = {
            items.loc[i["item_id"], "category"].split(CATEGORY_SEPARATOR)[0]
            for i in before["items"]
            if i["item_id"] in items.index
        }
        fresh = items[~items["category"].str.split(CATEGORY_SEPARATOR).str[0].isin(shown)].head(3)
        now = pd.Timestamp.now(tz="UTC")
        batch = [
            {
                # New ids each run: a rerun's clicks are new clicks, not retries of the last run's.
                "event_id": f"demo-{warm}-{now.strftime('%Y%m%dT%H%M%S')}-{n}",
                "user_id": warm,
                "item_id": item_id,
                "event_type": "click",
                "ts": (now + pd.Timedelta(seconds=n)).isoformat(),
                "session_id": f"demo-{warm}",
                "device": "mobile",
                "request_id": before["request_id"],
            }
            for n, item_id in enumerate(fresh.index)
        ]
        r = client.post("/v1/events", json={"events": batch})
        r.raise_for_status()
        console.print(
            f"posted {len(batch)} click events for {warm} on {', '.join(fresh.index)} "
            f"({', '.join(fresh['category'])}): {r.json()['accepted']} accepted, durable before the 2xx"
        )
        after = _recommend(client, warm)
        _show(console, f"the same user {warm} right after those events", after, items)
        moved = len({i["item_id"] for i in after["items"]} ^ {i["item_id"] for i in before["items"]}) // 2
        console.print(f"{moved} of {len(after['items'])} recommendations changed")


def show_canary(settings: Settings, console: Console) -> None:
    from components.canary import analyze

    analysis = analyze(settings)
    t = Table(title=f"canary status (serving labels {analysis.get('serving')})")
    for c in ("arm", "requests", "impressions", "clicks", "CTR per request", "error rate"):
        t.add_column(c, justify="left" if c == "arm" else "right")
    for arm, s in analysis["arms"].items():
        t.add_row(
            arm,
            str(s["requests"]),
            str(s["impressions"]),
            str(s["clicks"]),
            f"{s['ctr_request']:.3f}",
            f"{s['error_rate']:.3f}",
        )
    console.print(t)
    console.print(f"canary decision now: [bold]{analysis['decision']}[/bold]: {analysis['reason']}")


def run_demo(settings: Settings, console: Console) -> None:
    """The whole demo; raises on the first failure after stopping what it started."""
    started = time.perf_counter()
    g = settings.generate
    console.print(
        f"[bold]recsys demo[/bold]: {g.users:,} synthetic users, {g.items:,} items, {g.days} days "
        f"(seed {g.seed}); all state under {settings.home}"
    )
    run_training_dag(settings, console)
    blessing = print_evaluation(settings, console)
    if not (settings.models_dir / "models.config").is_file():
        console.print(f"[red]no model was pushed[/red] ({blessing.get('reason')}); nothing to serve")
        raise SystemExit(1)
    with servers(settings, console) as url:
        show_recommendations(settings, url, console)
        show_canary(settings, console)
    console.print(
        f"[bold green]demo finished in {time.perf_counter() - started:.0f}s[/bold green]; servers stopped"
    )
