"""The ``recsys`` command line: the same step functions that the DAGs and the tests call."""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from recsys.config import ConfigError, Settings, settings_from_environment

app = typer.Typer(
    help="recsys: a personalization engine you can run, schedule and ship.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Bring data in: the synthetic generator and importers.", no_args_is_help=True)
app.add_typer(data_app, name="data")
features_app = typer.Typer(
    help="Features in Feast: build the tables, register the repo, load the online store.",
    no_args_is_help=True,
)
app.add_typer(features_app, name="features")
pipeline_app = typer.Typer(help="Run the whole pipeline in-process.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")
serve_app = typer.Typer(
    help="Serve: the TF Serving-compatible model server and the recommendation gateway.", no_args_is_help=True
)
app.add_typer(serve_app, name="serve")
canary_app = typer.Typer(
    help="The canary rollout: per-arm numbers, and promote or roll back by hand.", no_args_is_help=True
)
app.add_typer(canary_app, name="canary")
events_app = typer.Typer(
    help="The gateway's event log: export it into the lake by UTC day and trim what is exported.",
    no_args_is_help=True,
)
app.add_typer(events_app, name="events")
console = Console(stderr=True)


def _settings(ctx: typer.Context) -> Settings:
    return ctx.obj["settings"]


@app.callback()
def main(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(help="YAML config file (default: $RECSYS_CONFIG, else conf/recsys.yaml)."),
    ] = None,
) -> None:
    """Every command reads one config file, overlaid by RECSYS_* environment variables."""
    try:
        settings = settings_from_environment(config)
    except ConfigError as e:
        console.print(f"[red]config error:[/red] {e}")
        raise typer.Exit(2) from None
    ctx.obj = {"settings": settings}


@app.command("config")
def show_config(ctx: typer.Context) -> None:
    """Print the effective configuration (file + environment) as JSON."""
    print(_settings(ctx).model_dump_json(indent=2))


@data_app.command("generate")
def data_generate(
    ctx: typer.Context,
    users: Annotated[int | None, typer.Option(help="Number of users (default: config).")] = None,
    items: Annotated[int | None, typer.Option(help="Number of items (default: config).")] = None,
    days: Annotated[int | None, typer.Option(help="Days of events (default: config).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed (default: config).")] = None,
    events_per_user_day: Annotated[
        float | None, typer.Option(help="Average events per user and day (default: config).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output data folder (default: <home>/data/raw).")] = None,
    shift_day: Annotated[
        int | None,
        typer.Option(help="From this day of the period on (0: its first), what users want changes."),
    ] = None,
    shift_kind: Annotated[
        str, typer.Option(help="The shift: tastes (responses change) or category_mix (what is shown).")
    ] = "tastes",
) -> None:
    """Generate seeded synthetic users, items and events with real structure."""
    from components.sources.synthetic import GenerateParams, generate_to_folder

    s = _settings(ctx)
    g = s.generate
    params = GenerateParams(
        users=users or g.users,
        items=items or g.items,
        days=days or g.days,
        seed=g.seed if seed is None else seed,
        end_date=g.end_date,
        events_per_user_day=events_per_user_day or g.events_per_user_day,
        late_user_fraction=g.late_user_fraction,
        late_item_fraction=g.late_item_fraction,
        shift_day=shift_day,
        shift_kind=shift_kind,  # type: ignore[arg-type]
    )
    out = out or s.raw_dir
    with console.status(f"generating {params.users} users, {params.items} items, {params.days} days"):
        manifest = generate_to_folder(params, out)
    _print_rows("generated", manifest["rows"], out)


@data_app.command("import-movielens")
def data_import_movielens(
    ctx: typer.Context,
    path: Annotated[Path, typer.Argument(help="A MovieLens folder: ml-100k, ml-1m or ml-latest-small.")],
    out: Annotated[Path | None, typer.Option(help="Output data folder (default: <home>/data/raw).")] = None,
) -> None:
    """Import a MovieLens set (layout detected) into users, items and rating events."""
    from components.sources.movielens import import_movielens

    out = out or _settings(ctx).raw_dir
    try:
        with console.status(f"importing {path}"):
            manifest = import_movielens(path, out)
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    _print_rows(f"imported {manifest.get('layout', '')}", manifest["rows"], out)


@app.command("validate")
def validate(
    ctx: typer.Context,
    data: Annotated[
        Path | None, typer.Option(help="Data folder to check (default: <home>/data/raw).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <home>/data/validated).")] = None,
    as_of: Annotated[
        datetime | None,
        typer.Option(
            help="Timestamps after this are bad (default: now). A scheduler passes the interval end."
        ),
    ] = None,
) -> None:
    """Validate users, items and events with Great Expectations; quarantine bad rows."""
    from components.validation import ValidationError, validate_data

    s = _settings(ctx)
    data, out = data or s.raw_dir, out or s.validated_dir
    try:
        with console.status(f"validating {data}"):
            manifest = validate_data(s.validation, data, out, as_of=as_of, spark=s.spark)
    except ValidationError as e:
        console.print(f"[red]validation failed:[/red] {e}")
        for report in (out / "report" / "summary.html", out / "report" / "index.html"):
            if report.exists():
                console.print(f"report: {report}")
                break
        raise typer.Exit(1) from None
    _print_validation(manifest)


@pipeline_app.command("run")
def pipeline_run(
    ctx: typer.Context,
    interval_end: Annotated[
        datetime | None,
        typer.Option(
            help="End of the run's data interval (default: generate.end_date; with --data, "
            "the day after the data's last event)."
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Read this folder instead of source.*: a data folder (users/, items/, events/) "
            "or a MovieLens download."
        ),
    ] = None,
) -> None:
    """Run every pipeline step in order, the same functions the Airflow DAG calls."""
    from components.ingest import interval_end_after_data, source_for_folder
    from components.pipeline import run_pipeline
    from components.validation import ValidationError

    s = _settings(ctx)
    if data is not None:
        try:
            s = s.model_copy(update={"source": source_for_folder(data)})
            interval_end = interval_end or interval_end_after_data(s)
        except ValueError as e:
            console.print(f"[red]{e}[/red]")
            raise typer.Exit(2) from None
        console.print(f"data: {data} ({s.source.kind}), interval end {interval_end:%Y-%m-%d}")
    try:
        manifests = run_pipeline(s, interval_end or s.generate.end_date, console)
    except ValidationError as e:
        console.print(f"[red]validation failed:[/red] {e}")
        raise typer.Exit(1) from None
    for name, m in manifests.items():
        console.print(f"{name}: {m.get('path', '')}")


_StartOpt = Annotated[
    datetime | None, typer.Option(help="Interval start, UTC (default: the earliest data).")
]
_EndOpt = Annotated[datetime | None, typer.Option(help="Interval end, UTC (default: the latest data).")]
_ValidatedOpt = Annotated[
    Path | None, typer.Option(help="Validated data folder (default: <home>/data/validated).")
]


@features_app.command("build")
def features_build(
    ctx: typer.Context,
    start: _StartOpt = None,
    end: _EndOpt = None,
    data: _ValidatedOpt = None,
) -> None:
    """Compute the feature tables (daily snapshots, profiles, recent items) for [start, end).

    Idempotent per interval: re-running the same days rewrites the same files.
    """
    from components.features.tables import FeatureRepoError, build_feature_tables
    from recsys.layout import features_dir

    s = _settings(ctx)
    data, out = data or s.validated_dir, features_dir(s)
    try:
        with console.status(f"building feature tables from {data}"):
            manifest = build_feature_tables(s.features, data, out, start=start, end=end)
    except (FileNotFoundError, FeatureRepoError) as e:
        console.print(f"[red]error:[/red] {e} (run `recsys validate` first?)")
        raise typer.Exit(2) from None
    t = Table(
        title=f"feature tables [{manifest['interval']['start']}, {manifest['interval']['end']}) -> {out}"
    )
    for c in ("table", "rows", "files"):
        t.add_column(c, justify="left" if c == "table" else "right")
    for name, row in manifest["tables"].items():
        t.add_row(name, f"{row['rows']:,}", str(len(row["files"])))
    console.print(t)


@features_app.command("apply")
def features_apply(ctx: typer.Context) -> None:
    """Register feature_repo/ in the Feast registry under <home>/feast (`feast apply`)."""
    from components.features.store import apply_feature_repo
    from components.features.tables import FeatureRepoError

    s = _settings(ctx)
    try:
        with console.status(f"feast apply ({s.features.online_store} online store)"):
            manifest = apply_feature_repo(s)
    except FeatureRepoError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    t = Table(title=f"feast apply -> {manifest['registry']}")
    t.add_column("kind")
    t.add_column("names")
    for kind in ("entities", "feature_views", "feature_services", "removed"):
        t.add_row(kind, ", ".join(manifest[kind]) or "-")
    console.print(t)
    console.print(f"feast CLI on this store: feast -f {s.feast_dir / 'feature_store.yaml'} ui")


@features_app.command("materialize")
def features_materialize(ctx: typer.Context, start: _StartOpt = None, end: _EndOpt = None) -> None:
    """Load the latest feature rows stamped from --start to --end (inclusive) into the online store."""
    from components.features.store import materialize
    from components.features.tables import FeatureRepoError

    s = _settings(ctx)
    try:
        with console.status(f"materializing into the {s.features.online_store} online store"):
            manifest = materialize(s, start=start, end=end)
    except FeatureRepoError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    t = Table(title=f"materialized into {manifest['online_store']}")
    t.add_column("interval")
    t.add_column("feature views")
    t.add_row(
        f"{manifest['interval']['start']} .. {manifest['interval']['end']}",
        ", ".join(manifest["feature_views"]),
    )
    console.print(t)


@features_app.command("training-data")
def features_training_data(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Folder of the Parquet parts (its earlier parts are replaced).")],
    interval_days: Annotated[int, typer.Option(min=1, help="Days of events per part.")] = 30,
    start: _StartOpt = None,
    end: _EndOpt = None,
    data: _ValidatedOpt = None,
) -> None:
    """Write the point-in-time training frame interval by interval, one Parquet part each.

    The rows of the training-data step's join (every event, each feature as known strictly
    before it), held one interval at a time: for histories whose frame does not fit in
    memory, or for a trainer that reads Parquet.
    """
    from rich.progress import Progress

    from components.features.tables import FeatureRepoError
    from components.features.training_data import write_training_data
    from components.pipeline import unread_feature_views

    s = _settings(ctx)
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("joining intervals", total=None)

            def advance(done: int, total: int, rows: int) -> None:
                progress.update(task, completed=done, total=total, description=f"{rows:,} rows written")

            written = write_training_data(
                s, out, interval_days, data, start=start, end=end,
                skip_views=unread_feature_views(s), progress=advance,
            )  # fmt: skip
    except (FileNotFoundError, FeatureRepoError) as e:
        hint = "run `recsys features build` and `recsys features apply` first?"
        console.print(f"[red]error:[/red] {e} ({hint})")
        raise typer.Exit(2) from None
    console.print(
        f"{written['rows']:,} rows x {len(written['columns'])} columns in {written['parts']} parts "
        f"of {interval_days} days -> {out}"
    )


@app.command("recommend")
def recommend_cmd(
    ctx: typer.Context,
    users: Annotated[Path, typer.Option(help="File of user ids, one per line.")],
    out: Annotated[Path, typer.Option(help="Output JSONL: {user_id, items} per line.")],
    k: Annotated[int, typer.Option(help="Items per user.")] = 10,
    data: Annotated[
        Path | None, typer.Option(help="Validated data folder (default: the latest pipeline run's).")
    ] = None,
    label: Annotated[str, typer.Option(help="models.config version label to use.")] = "stable",
    base_path: Annotated[Path | None, typer.Option(help="Model base path (default: <home>/models).")] = None,
    rank: Annotated[
        bool, typer.Option(help="Re-order candidates with the pushed ranking model (--no-rank: retrieval).")
    ] = True,
) -> None:
    """Batch top-K unseen items per user from the pushed retrieval and ranking models."""
    from components.batch_recommend import recommend

    try:
        with console.status(f"recommending for {users}"):
            s = _settings(ctx)
            summary = recommend(
                s, users, k, out, data_dir=data, label=label, base_path=base_path, rank=rank
            )
    except (FileNotFoundError, KeyError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    if summary.get("note"):
        note = f"{summary['note']}; {summary['users']:,} users -> {summary['path']}"
        console.print(f"[yellow]note:[/yellow] {note}")
        return
    ranking = f"{s.push.ranking_model} re-ranked" if summary["ranked"] else "retrieval order"
    console.print(
        f"{summary['users']:,} users ({summary['unknown_users']:,} unknown) -> {summary['path']}: "
        f"{summary['model']} v{summary['version']} ({summary['label']}, {summary['mode']}), {ranking}",
        markup=False,
    )


def _server_options() -> list[tuple[dataclasses.Field[Any], type]]:
    """The model server's options (``ServerOptions``' fields) with their types, in order."""
    from serving.model_server.server import ServerOptions

    types = typing.get_type_hints(ServerOptions)
    return [(f, types[f.name]) for f in dataclasses.fields(ServerOptions)]


class _TfFlagsCommand(typer.core.TyperCommand):
    """Reads TF Serving's boolean flag forms: ``--flag``, ``--flag=true`` and ``--flag=false``."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        bool_flags = {f.name for f, kind in _server_options() if kind is bool}
        rewritten = []
        for arg in args:
            name, _, value = arg.removeprefix("--").partition("=")
            value = value.lower()
            if arg.startswith("--") and name in bool_flags and value in ("true", "false", "1", "0"):
                arg = f"--{name}" if value in ("true", "1") else f"--no{name}"
            rewritten.append(arg)
        return super().parse_args(ctx, rewritten)


def _with_server_option_flags(command: Any) -> Any:
    """Give ``command`` one option per ``ServerOptions`` field: ``--<name>`` (booleans also
    ``--no<name>``, TF Serving's negation), the field's default and its ``help`` metadata."""
    parameters = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    for f, kind in _server_options():
        declaration = f"--{f.name}/--no{f.name}" if kind is bool else f"--{f.name}"
        parameters.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=f.default,
                annotation=Annotated[kind, typer.Option(declaration, help=f.metadata["help"])],
            )
        )
    command.__signature__ = inspect.Signature(parameters, return_annotation=None)
    return command


@serve_app.command("model-server", cls=_TfFlagsCommand)
@_with_server_option_flags
def serve_model_server(ctx: typer.Context, **flags: Any) -> None:
    """Serve SavedModels over TF Serving's gRPC and REST APIs, with tensorflow_model_server's flags.

    A stand-in for tensorflow_model_server, which is not installable here; production runs
    the tensorflow/serving image (a ScaNN build of it for ScaNN ops). Without
    --model_config_file and --model_base_path it serves <home>/models/models.config.
    """
    from serving.model_server.server import ServerOptions, run_model_server

    options = ServerOptions(**flags)
    if not options.model_config_file and not options.model_base_path:
        default = _settings(ctx).models_dir / "models.config"
        if default.is_file():
            options.model_config_file = str(default)
    raise typer.Exit(run_model_server(options))


@serve_app.command("gateway")
def serve_gateway(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port (OpenAPI docs at /docs).")] = 8080,
) -> None:
    """Serve recommendations and take events: POST /v1/recommendations, POST /v1/events.

    Talks to the model server at gateway.model_server_host (gRPC or REST), reads user
    features from the Feast online store and logs events durably to <home>/gateway/events.db.
    """
    from components.canary import manual
    from serving.gateway.app import run_gateway

    raise typer.Exit(run_gateway(_settings(ctx), host=host, port=port, manual_rollout=manual))


def _cell(v: Any) -> str:
    return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)


def _print_canary(analysis: dict[str, Any]) -> None:
    t = Table(title=f"canary arms, window [{analysis['window']['since']}, {analysis['window']['until']})")
    cols = ("requests", "errors", "impressions", "clicks", "ctr_request", "ctr_impression", "latency_p99_ms")
    t.add_column("arm")
    for c in cols:
        t.add_column(c.replace("_", " "), justify="right")
    for arm, a in analysis["arms"].items():
        cells = (_cell(a[c]) for c in cols)
        t.add_row(arm, *cells)
    console.print(t)
    for name, test in analysis.get("tests", {}).items():
        console.print(
            f"{name}: difference {test['difference']:+.4f}, worse p={test['worse']['p']:.3g}, "
            f"not worse (margin {test['not_worse']['margin']}) p={test['not_worse']['p']:.3g}"
        )
    console.print(f"serving: {analysis['serving']}")
    console.print(f"[bold]decision: {analysis['decision']}[/bold] - {analysis['reason']}")


@canary_app.command("status")
def canary_status(
    ctx: typer.Context,
    since: Annotated[datetime | None, typer.Option(help="Only requests from this time, UTC.")] = None,
    until: Annotated[datetime | None, typer.Option(help="Only requests before this time, UTC.")] = None,
) -> None:
    """Per-arm requests, CTR, errors and latency, and the decision the rollout DAG would take."""
    from components.canary import analyze

    _print_canary(analyze(_settings(ctx), since=since, until=until))


def _canary_manual(ctx: typer.Context, action: str, reason: str) -> None:
    from components.canary import CanaryError, manual

    try:
        record = manual(_settings(ctx), action, reason)  # type: ignore[arg-type]
    except CanaryError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    console.print(f"{action} (manual): {record['labels']}")
    console.print(f"recorded; report: {record['report']}")


@canary_app.command("promote")
def canary_promote(
    ctx: typer.Context, reason: Annotated[str, typer.Option(help="Why, for the decision record.")] = ""
) -> None:
    """Make the canary stable for both models (stable := canary), recorded as a manual decision."""
    _canary_manual(ctx, "promote", reason)


@canary_app.command("rollback")
def canary_rollback(
    ctx: typer.Context, reason: Annotated[str, typer.Option(help="Why, for the decision record.")] = ""
) -> None:
    """Send canary traffic back to stable for both models (canary := stable), recorded as manual."""
    _canary_manual(ctx, "rollback", reason)


@app.command("monitor")
def monitor(
    ctx: typer.Context,
    until: Annotated[
        datetime | None, typer.Option(help="End of the serving window, UTC (default: this hour).")
    ] = None,
    data: Annotated[
        Path | None, typer.Option(help="Training data folder (default: the latest validated data).")
    ] = None,
) -> None:
    """Drift of the latest serving window against the training window (as the monitoring DAG):
    PSI per feature, CTR per arm and segment, catalog coverage; exits 1 on drift."""
    from components.monitoring import monitor_drift, summary_line

    manifest = monitor_drift(_settings(ctx), until=until, data=data)
    for name, value in manifest["features"].items():
        console.print(f"  {name:<22} PSI {value:.4f}")
    ctr = manifest["ctr"]
    console.print(f"  CTR {ctr['serving']} serving vs {ctr['reference']} training")
    console.print(f"  catalog coverage {manifest['coverage']}")
    console.print(summary_line(manifest))
    console.print(f"report: {manifest['report']}")
    if manifest["drifted"]:
        raise typer.Exit(1)


@events_app.command("export")
def events_export(
    ctx: typer.Context,
    day: Annotated[str | None, typer.Option(help="Export this UTC day only (YYYY-MM-DD).")] = None,
    through: Annotated[
        str | None,
        typer.Option(help="Export every logged day up to this one, UTC (YYYY-MM-DD; default: yesterday)."),
    ] = None,
    no_trim: Annotated[
        bool, typer.Option("--no-trim", help="Leave the log as it is (default: event_export.trim).")
    ] = False,
) -> None:
    """Write the event log's days into <home>/lake/events/date=YYYY-MM-DD/ and trim exported closed days.

    Idempotent by event_id: re-running changes nothing; a late event is merged into its day once.
    Today, and closed days within event_export.keep_days, stay in the log.
    """
    from components.events_export import export_events, parse_day

    if day is not None and through is not None:
        console.print("[red]error:[/red] --day and --through: give one or neither")
        raise typer.Exit(2)
    try:
        parsed_day = parse_day(day, "--day") if day is not None else None
        parsed_through = parse_day(through, "--through") if through is not None else None
    except ValueError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    s = _settings(ctx)
    with console.status("exporting the event log"):
        manifest = export_events(s, day=parsed_day, through=parsed_through, trim=False if no_trim else None)
    if manifest["log"] is None:
        console.print(f"no event log at {s.event_log_path}: nothing to export")
        return
    t = Table(title=f"{manifest['log']} -> {manifest['lake']}")
    for c in ("day", "rows", "new", "file", "trimmed from log"):
        t.add_column(c, justify="left" if c in ("day", "file") else "right")
    for d, r in manifest["days"].items():
        t.add_row(d, f"{r['rows']:,}", f"{r['new']:,}", "written" if r["written"] else "unchanged",
                  f"{r['trimmed']:,}")  # fmt: skip
    console.print(t)
    if not manifest["days"]:
        console.print(f"no logged events through {manifest['through']}")
    console.print(f"trimmed {manifest['trimmed']:,} events from the log")


@app.command("simulate")
def simulate_cmd(
    ctx: typer.Context,
    truth: Annotated[
        Path | None,
        typer.Option(help="A truth folder, or a data folder holding truth/ (default: the latest run's)."),
    ] = None,
    users: Annotated[int, typer.Option(help="Users sampled from the truth (seeded).")] = 200,
    requests_per_user: Annotated[int, typer.Option(help="Requests each user makes of each policy.")] = 10,
    k: Annotated[int, typer.Option(help="Items per request.")] = 10,
    seed: Annotated[int, typer.Option(help="Seeds the users' sample, the random policy and responses.")] = 0,
    policy: Annotated[
        list[str] | None,
        typer.Option(
            help="Policies to run (repeatable): served, retrieval, popularity, random, ceiling, oracle."
        ),
    ] = None,
    gateway: Annotated[
        str | None, typer.Option(help="A running gateway's URL (default: start one on a scratch copy).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: <run>/simulation).")] = None,
    exploration: Annotated[
        str,
        typer.Option(
            help="Exploration policies to compare, comma-separated "
            "(uniform,epsilon_greedy,thompson,linucb,none): popularity with the exploration slot "
            "filled by each, learning from the simulated clicks."
        ),
    ] = "",
    loop: Annotated[
        int,
        typer.Option(
            help="Run N rounds of the closed loop instead: serve the users from the gateway, post what "
            "they did, export, retrain and push, and report reward per arm and round (loop home under --out)."
        ),
    ] = 0,
    holdout_fraction: Annotated[
        float, typer.Option(help="--loop: the users the gateway serves popularity (the holdout arm).")
    ] = 0.2,
    canary_fraction: Annotated[
        float, typer.Option(help="--loop: the users a newly pushed version serves for one round (canary).")
    ] = 0.4,
) -> None:
    """Replay users of the synthetic truth against the served system, retrieval alone, popularity,
    random, the learner's ceiling and the oracle; report reward per request and the served
    system's share of the oracle (and of the ceiling)."""
    from entrypoints.simulate import POLICIES, run_simulation

    try:
        if loop:
            from entrypoints.simulate_loop import run_loop

            run_loop(
                _settings(ctx), console, rounds=loop, truth=truth, users=users,
                requests_per_user=requests_per_user, k=k, seed=seed,
                holdout_fraction=holdout_fraction, canary_fraction=canary_fraction, out=out,
            )  # fmt: skip
            return
        run_simulation(
            _settings(ctx), console, truth=truth, users=users, requests_per_user=requests_per_user,
            k=k, seed=seed, policies=policy or POLICIES, gateway_url=gateway, out=out,
            exploration=[e.strip() for e in exploration.split(",") if e.strip()],
        )  # fmt: skip
    except (FileNotFoundError, KeyError, ValueError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None


@app.command("demo")
def demo(ctx: typer.Context) -> None:
    """Run the main job end to end on the embedded defaults and print what to look at."""
    from entrypoints.demo import run_demo

    run_demo(_settings(ctx), console)


def _print_rows(title: str, rows: dict[str, int], out: Path) -> None:
    t = Table(title=f"{title} -> {out}")
    t.add_column("table")
    t.add_column("rows", justify="right")
    for k, v in rows.items():
        t.add_row(k, f"{v:,}")
    console.print(t)


def _print_validation(manifest: dict[str, Any]) -> None:
    t = Table(title=f"validation {manifest['status']} -> {manifest['path']}")
    for c in ("table", "input", "accepted", "quarantined", "bad %", "top reasons"):
        t.add_column(c, justify="right" if c not in ("table", "top reasons") else "left")
    for name, row in manifest["tables"].items():
        reasons = ", ".join(f"{k}: {v}" for k, v in list(row["quarantine_by_rule"].items())[:3])
        t.add_row(
            name,
            f"{row['input']:,}",
            f"{row['accepted']:,}",
            f"{row['quarantined']:,}",
            f"{100 * row['bad_fraction']:.2f}",
            reasons or "-",
        )
    console.print(t)
    console.print(f"report: {manifest['report']}")


def run() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
