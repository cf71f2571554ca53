"""The pipeline's steps in order, run in-process: what `recsys pipeline run` and the DAG call.

Each ``run_<step>`` takes the settings and the run's interval, reads the outputs of the
steps before it from the run's folder ``<home>/runs/<run_key>/<step>/``, writes its own
there (replacing a previous attempt of the same interval) and returns the manifest.
The Airflow tasks of ``dags/training_pipeline.py`` each call one of these functions.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from rich.console import Console

from recsys.config import Settings
from recsys.layout import run_key_for, step_dir
from recsys.manifests import PushNotBlessedManifest, TrainingDataManifest, TrainManifest
from recsys.storage import read_manifest, write_manifest

if TYPE_CHECKING:
    from components.training.warm_start import TrainingPlan


def run_export_events(settings: Settings, interval_end: datetime) -> dict[str, Any]:
    """Export the event log's days before ``interval_end`` into the lake; trim exported closed days."""
    from components.events_export import export_events
    from recsys.timeutil import to_utc

    # The interval's days: the last one ends at interval_end (exclusive).
    through = (to_utc(interval_end) - pd.Timedelta(microseconds=1)).date()
    manifest = export_events(settings, through=through)
    out = step_dir(settings, run_key_for(interval_end), "export_events")
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, {**manifest, "path": manifest["lake"]})
    return {**manifest, "path": manifest["lake"]}


def run_ingest(settings: Settings, interval_end: datetime) -> dict[str, Any]:
    """Ingest the configured source, events before ``interval_end``."""
    from components.ingest import ingest

    return ingest(settings, step_dir(settings, run_key_for(interval_end), "ingest"), interval_end)


def run_validate(settings: Settings, interval_end: datetime) -> dict[str, Any]:
    """Validate the ingested drop; timestamps may not pass ``interval_end``."""
    from components.validation import validate_data

    key = run_key_for(interval_end)
    ingested = step_dir(settings, key, "ingest")
    read_manifest(ingested)  # fails clearly when ingest has not finished
    return validate_data(
        settings.validation,
        ingested,
        step_dir(settings, key, "validate"),
        as_of=interval_end,
        spark=settings.spark,
    )


def validated_dir(settings: Settings, interval_end: datetime) -> Path:
    """The run's validated data; fails clearly when validation has not finished."""
    out = step_dir(settings, run_key_for(interval_end), "validate")
    manifest = read_manifest(out)
    if manifest.get("status") != "passed":
        raise RuntimeError(f"validation of {out} did not pass: {manifest.get('errors')}")
    return out


def run_build_features(settings: Settings, interval_end: datetime) -> dict[str, Any]:
    """Compute the feature tables from the run's validated data, days before ``interval_end``."""
    from components.features.tables import build_feature_tables
    from recsys.layout import features_dir

    return build_feature_tables(
        settings.features, validated_dir(settings, interval_end), features_dir(settings), end=interval_end
    )


def run_apply_features(settings: Settings, interval_end: datetime) -> dict[str, Any]:
    """Register feature_repo/ in the Feast registry (`feast apply`); idempotent."""
    from components.features.store import apply_feature_repo

    del interval_end  # the repo's definitions do not depend on the interval
    return apply_feature_repo(settings)


def run_materialize(settings: Settings, interval_end: datetime) -> dict[str, Any]:
    """Load feature rows up to the interval's end into the online store."""
    from components.features.store import materialize

    # Feast's materialize window is inclusive; the last snapshot of the interval is stamped
    # at the last microsecond before its end.
    end = pd.Timestamp(interval_end) - pd.Timedelta(microseconds=1)
    return materialize(settings, end=end.to_pydatetime())


def unread_feature_views(settings: Settings) -> list[str]:
    """Feature views whose point-in-time values the configured training would not read.

    Leave-one-out histories replace ``user_recent_items``; a ranker without window counts
    reads neither ``user_engagement`` nor ``item_popularity``. Joining them anyway costs the
    most on long spans (their change rows grow with the years of data: ml-latest-small's 22
    years of ratings did not finish in 20 minutes).
    """
    skip = []
    if settings.training.history == "leave_one_out":
        skip.append("user_recent_items")
    if not settings.training.ranker_window_features:
        skip += ["user_engagement", "item_popularity"]
    return skip


def run_training_data(settings: Settings, interval_end: datetime) -> dict[str, Any]:
    """Point-in-time training data from Feast, split into train and holdout.

    By default (``evaluation.split: time``) the holdout is the last ``evaluation.holdout_days``
    whole days: their new users and new items are what the evaluation's cold-start slices
    measure. ``split: random`` holds out a seeded fraction of each user's events instead.
    """
    from components.evaluation.evaluate import split_holdout
    from components.features.training_data import build_training_data

    key = run_key_for(interval_end)
    out = step_dir(settings, key, "training_data")
    skip = unread_feature_views(settings)
    frame = build_training_data(
        settings, validated_dir(settings, interval_end), end=interval_end, skip_views=skip
    )
    train, holdout = split_holdout(frame, settings.evaluation)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    train.to_parquet(out / "train.parquet", index=False)
    holdout.to_parquet(out / "holdout.parquet", index=False)
    cut = pd.to_datetime(holdout["ts"], utc=True).min() if len(holdout) else None
    manifest = TrainingDataManifest(
        path=str(out),
        rows={"train": len(train), "holdout": len(holdout)},
        split=settings.evaluation.split,
        skipped_views=skip,
        holdout_starts=cut.isoformat() if cut is not None else None,
        columns=list(frame.columns),
    )
    write_manifest(out, manifest)
    return manifest.model_dump()


def _training_frames(settings: Settings, interval_end: datetime) -> tuple[pd.DataFrame, pd.DataFrame]:
    folder = step_dir(settings, run_key_for(interval_end), "training_data")
    read_manifest(folder)
    return pd.read_parquet(folder / "train.parquet"), pd.read_parquet(folder / "holdout.parquet")


def run_train(settings: Settings, interval_end: datetime) -> dict[str, Any]:
    """Train the two-tower retriever and the multi-objective ranker on the train split.

    With ``training.incremental`` the run may warm-start both models from the serving version
    and train on the events after its training interval only (``_training_plan``); the
    decision and its reason are logged and recorded in the manifest.

    With ``training.refit_on_holdout`` the same recipe is then trained on train + holdout
    (nothing held out for validation) into ``<run>/refit/``, the model that index and push
    ship (see ``shipped_train_dir``).
    """
    from components.training.train import train_models
    from recsys.storage import read_table

    key = run_key_for(interval_end)
    train, holdout = _training_frames(settings, interval_end)
    items = read_table(validated_dir(settings, interval_end), "items")
    refit_dir = step_dir(settings, key, "refit")
    if refit_dir.exists():
        shutil.rmtree(refit_dir)  # a rerun without refit must not ship an old refit
    plan = _training_plan(settings, interval_end, train)
    manifest = train_models(settings.training, train, items, step_dir(settings, key, "train"), plan=plan)
    if settings.training.refit_on_holdout and len(holdout):
        full = pd.concat([train, holdout], ignore_index=True)
        # The shipped model learns from every event: the validation part the evaluated model
        # held out (for early stopping and the serving policy's choice) included.
        recipe = settings.training.model_copy(update={"validation_fraction": 0.0})
        refit = train_models(recipe, full, items, refit_dir, plan=plan)
        manifest["refit"] = {"path": refit["path"], "events": len(full), "metrics": refit.get("metrics")}
        # The rewritten manifest says which model ships.
        write_manifest(step_dir(settings, key, "train"), TrainManifest(**manifest))
    return manifest


def _training_plan(settings: Settings, interval_end: datetime, train: pd.DataFrame) -> TrainingPlan:
    """Full or incremental (``warm_start.plan_training``), from the serving version; logged."""
    from components.training.warm_start import plan_training

    own = {step_dir(settings, run_key_for(interval_end), s).resolve() for s in ("train", "refit")}
    serving = serving_train_dir(settings)
    newest = pd.to_datetime(train["ts"], utc=True).max() if len(train) else None
    plan = plan_training(settings.training, serving, interval_end, newest_event=newest)
    if plan.incremental and serving is not None and serving.resolve() in own:
        # The run's output is rewritten as it trains: it cannot be the model it starts from.
        plan = plan.as_full("a rerun of the run whose model serves")
    Console(stderr=True, soft_wrap=True).print(f"[train] {plan.describe()}", highlight=False)
    return plan


def shipped_train_dir(settings: Settings, interval_end: datetime) -> Path:
    """The training output that index and push ship: the refit one when the run made one."""
    key = run_key_for(interval_end)
    refit = step_dir(settings, key, "refit")
    return refit if (refit / "manifest.json").is_file() else step_dir(settings, key, "train")


def serving_train_dir(settings: Settings) -> Path | None:
    """The training output of the model now labelled ``stable``, if it is still on disk."""
    from recsys.artifacts import push_record_path
    from recsys.model_registry import version_for_label

    base = settings.models_dir
    try:
        version = version_for_label(base, settings.push.retrieval_model, "stable")
    except (FileNotFoundError, KeyError):
        return None  # nothing pushed yet: the first model has no serving baseline
    record = push_record_path(base, settings.push.retrieval_model, version)
    if not record.is_file():
        return None
    train_dir = Path(json.loads(record.read_text())["train_dir"])
    return train_dir if (train_dir / "manifest.json").is_file() else None


def run_evaluate(settings: Settings, interval_end: datetime) -> dict[str, Any]:
    """Evaluate on the time holdout beside popularity and the serving model; decide the blessing.

    The serving (stable) model is evaluated on this run's holdout too, as TFX's Evaluator
    does with its baseline, so the gate compares two models on the same data.
    """
    from components.evaluation.evaluate import evaluate
    from recsys.storage import read_table

    key = run_key_for(interval_end)
    train, holdout = _training_frames(settings, interval_end)
    items = read_table(validated_dir(settings, interval_end), "items")
    out = step_dir(settings, key, "evaluate")
    train_dir = step_dir(settings, key, "train")
    serving_metrics = None
    baseline_dir = serving_train_dir(settings)
    own = {train_dir.resolve(), step_dir(settings, key, "refit").resolve()}  # a rerun of this run
    # The served system is replayed with the gateway's settings; the generator's truth, where
    # the ingested data has one, scores its expected reward.
    gateway, truth_data = settings.gateway, step_dir(settings, key, "ingest")
    if baseline_dir is not None and baseline_dir.resolve() not in own:
        evaluate(
            settings.evaluation, baseline_dir, train, holdout, items, out / "serving_model",
            gateway=gateway, truth_data=truth_data, recent_items=settings.features.recent_items,
        )  # fmt: skip
        serving_metrics = json.loads((out / "serving_model" / "metrics.json").read_text())
    return evaluate(
        settings.evaluation, train_dir, train, holdout, items, out, serving_metrics=serving_metrics,
        gateway=gateway, truth_data=truth_data, recent_items=settings.features.recent_items,
    )  # fmt: skip


def run_index(settings: Settings, interval_end: datetime) -> dict[str, Any]:
    """Build the ScaNN index over the item embeddings; fails below the recall target."""
    from components.indexing import build_index

    key = run_key_for(interval_end)
    return build_index(
        settings.index,
        shipped_train_dir(settings, interval_end),
        step_dir(settings, key, "index"),
        candidates=settings.gateway.candidates,
    )


def blessing_of(settings: Settings, interval_end: datetime) -> dict[str, Any]:
    path = step_dir(settings, run_key_for(interval_end), "evaluate") / "blessing.json"
    if not path.is_file():
        raise FileNotFoundError(f"no blessing at {path}: the evaluate step did not finish")
    return json.loads(path.read_text())


def run_gate(settings: Settings, interval_end: datetime) -> dict[str, Any]:
    """The evaluation's verdict: ``blessed`` and its reason. Unblessed ends the run here."""
    return blessing_of(settings, interval_end)


def run_push(settings: Settings, interval_end: datetime) -> dict[str, Any]:
    """Push a blessed model as the next version labelled ``canary``; skip an unblessed one.

    A refused model is a normal outcome of a run, not a failure: the manifest says
    ``skipped`` with the gate's reason, and the DAG shows the push task as skipped.
    """
    from components.push import push_models

    key = run_key_for(interval_end)
    out = step_dir(settings, key, "push")
    blessing = blessing_of(settings, interval_end)
    if not blessing.get("blessed"):
        out.mkdir(parents=True, exist_ok=True)
        refused = PushNotBlessedManifest(path=str(out), reason=blessing.get("reason"))
        write_manifest(out, refused)
        return refused.model_dump()
    return push_models(
        settings.push,
        shipped_train_dir(settings, interval_end),
        step_dir(settings, key, "index"),
        blessing,
        settings.models_dir,
        data_dir=validated_dir(settings, interval_end),
        features=settings.features,
        out_dir=out,
    )


# The steps in the order the DAG runs them.
STEPS: list[tuple[str, Callable[[Settings, datetime], dict[str, Any]]]] = [
    ("export_events", run_export_events),
    ("ingest", run_ingest),
    ("validate", run_validate),
    ("build_features", run_build_features),
    ("apply_features", run_apply_features),
    ("materialize", run_materialize),
    ("training_data", run_training_data),
    ("train", run_train),
    ("evaluate", run_evaluate),
    ("gate", run_gate),
    ("index", run_index),
    ("push", run_push),
]


def run_pipeline(
    settings: Settings, interval_end: datetime, console: Console | None = None
) -> dict[str, dict[str, Any]]:
    """Run every step in order for one interval; returns each step's manifest."""
    console = console or Console(stderr=True)
    manifests: dict[str, dict[str, Any]] = {}
    for i, (name, step) in enumerate(STEPS, start=1):
        t0 = time.perf_counter()
        with console.status(f"[{i}/{len(STEPS)}] {name}"):
            manifests[name] = step(settings, interval_end)
        console.print(f"[green]✓[/green] {name} ({time.perf_counter() - t0:.1f}s)")
        if name == "gate" and not manifests[name].get("blessed"):
            console.print(
                f"[yellow]gate refused the model; index and push skipped:[/yellow] "
                f"{manifests[name].get('reason')}"
            )
            break
    return manifests
