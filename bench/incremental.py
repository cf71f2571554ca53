"""Incremental vs full retrain on the demo's synthetic data: holdout quality and wall time.

The data is the generator's defaults (``recsys.config`` ``generate``: 2,000 users, 500 items,
30 days) through the real feature layer (Feast point-in-time join), split as the pipeline
splits it (the last ``evaluation.holdout_days`` days held out). Per training seed:

- **full**: a full retrain on every training day (what each run does today);
- **base**: a full train on the training days but the last ``--last-days``, the model a
  daily run would find serving;
- **incremental**: ``base`` warm-started and fitted ``training.incremental_epochs`` on the
  last days only (``components.training.warm_start``), as ``recsys pipeline run`` with
  ``training.incremental`` does;
- **stale**: ``base`` itself, not updated: what incremental training gains over keeping it.

Each is evaluated by the pipeline's own evaluation (``components.evaluation.evaluate``) on the
same holdout: the served system's NDCG@10 (the gate metric) and expected reward under the
generator's truth, the retriever's recall@50 and the ranker's click AUC. Wall time is the
``train_models`` call (retriever, ranker, item-to-item table, exports).

    .venv/bin/python -m bench.incremental --seeds 42 43 --last-days 3
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd


def prepare(base: Path) -> dict[str, Any]:
    """Generate the default synthetic data and build its training frame and holdout."""
    from components.evaluation.evaluate import split_holdout
    from components.features.store import apply_feature_repo
    from components.features.tables import build_feature_tables
    from components.features.training_data import build_training_data
    from components.pipeline import unread_feature_views
    from components.sources.synthetic import GenerateParams, generate_to_folder
    from recsys.config import load_settings
    from recsys.layout import features_dir

    settings = load_settings(overrides={"home": str(base / "home")})
    raw = base / "raw"
    generate_to_folder(GenerateParams(**settings.generate.model_dump()), raw)
    build_feature_tables(settings.features, raw, features_dir(settings))
    apply_feature_repo(settings)
    frame = build_training_data(settings, raw, skip_views=unread_feature_views(settings))
    train, holdout = split_holdout(frame, settings.evaluation)
    items = pd.read_parquet(raw / "items")
    return {"settings": settings, "raw": raw, "train": train, "holdout": holdout, "items": items}


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def quality(data: dict[str, Any], train_dir: Path, out: Path) -> dict[str, float]:
    """The pipeline's evaluation of ``train_dir`` on the holdout: the numbers this bench reports."""
    from components.evaluation.evaluate import evaluate

    settings = data["settings"]
    evaluate(
        settings.evaluation, train_dir, data["train"], data["holdout"], data["items"], out,
        log=lambda _: None, gateway=settings.gateway, truth_data=data["raw"],
        recent_items=settings.features.recent_items,
    )  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    models = metrics["models"]
    return {
        "served_ndcg@10": models["served"]["all"]["ndcg@10"],
        "served_reward": metrics["reward"]["systems"]["served"],
        "retriever_recall@50": models["retriever"]["all"]["recall@50"],
        "retriever_ndcg@10": models["retriever"]["all"]["ndcg@10"],
        "click_auc": metrics["ranker"]["click_auc"],
    }


def quiet(_: str) -> None:
    """Training's per-epoch lines are not shown."""


def run_seed(
    data: dict[str, Any], seed: int, last_days: int, base: Path, epochs: int | None = None
) -> list[dict[str, Any]]:
    """full, base, incremental (``epochs``: its ``incremental_epochs``) and stale for one seed."""
    from components.training.train import train_models
    from components.training.warm_start import plan_training

    settings, train, items = data["settings"], data["train"], data["items"]
    config = settings.training.model_copy(update={"seed": seed, "incremental": True})
    if epochs is not None:
        config = config.model_copy(update={"incremental_epochs": epochs})
    ts = pd.to_datetime(train["ts"], utc=True)
    end = ts.max().ceil("D")  # the training part's interval end
    cut = end - timedelta(days=last_days)
    rows = []
    folder = base / f"seed{seed}"
    full_plan = plan_training(config, None, end)
    _, seconds = timed(lambda: train_models(config, train, items, folder / "full", quiet, full_plan))
    rows.append({"model": "full", "seed": seed, "seconds": seconds, "events": len(train)})
    first = train[ts < cut]
    base_plan = plan_training(config, None, cut)
    _, seconds = timed(lambda: train_models(config, first, items, folder / "base", quiet, base_plan))
    rows.append({"model": "base", "seed": seed, "seconds": seconds, "events": len(first)})
    plan = plan_training(config, folder / "base", end, newest_event=ts.max())
    assert plan.incremental, plan.reason
    manifest, seconds = timed(lambda: train_models(config, train, items, folder / "incremental", quiet, plan))
    events = manifest["examples"]["events"]
    rows.append({"model": "incremental", "seed": seed, "seconds": seconds, "events": events})
    rows.append({"model": "stale", "seed": seed, "seconds": 0.0, "events": len(first)})
    for row in rows:
        name = "base" if row["model"] == "stale" else row["model"]
        if row["model"] != "base":
            row.update(quality(data, folder / name, folder / f"eval_{row['model']}"))
        print(json.dumps(row), flush=True)
    return rows


def summary(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Mean ± sd over seeds per model."""
    df = pd.DataFrame(rows)
    numeric = [c for c in df.columns if c not in ("model", "seed")]
    out = {}
    for model, group in df.groupby("model", sort=False):
        out[model] = {
            c: f"{group[c].mean():.4f} ± {group[c].std(ddof=1) if len(group) > 1 else 0.0:.4f}"
            for c in numeric
            if group[c].notna().any()
        }
    return pd.DataFrame(out).T


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 43])
    p.add_argument("--last-days", type=int, default=3, help="days the incremental run trains on")
    p.add_argument("--incremental-epochs", type=int, default=None, help="default: training's")
    p.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temp folder)")
    args = p.parse_args()
    from components.training.train import use_legacy_keras

    use_legacy_keras()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.out or Path(tmp)
        data, seconds = timed(lambda: prepare(base))
        print(f"data: {len(data['train']):,} train / {len(data['holdout']):,} holdout rows ({seconds:.0f} s)")
        epochs = args.incremental_epochs
        rows = [row for seed in args.seeds for row in run_seed(data, seed, args.last_days, base, epochs)]
        print(summary(rows).to_string())


if __name__ == "__main__":
    main()
