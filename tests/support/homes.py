"""Serving homes: a ``RECSYS_HOME`` with everything the servers read, built once and copied.

``build_serving_home`` builds one as production does, on the tiny generated data plus two
items published at the end of the period that nobody has touched yet: validation, feature
tables, ``feast apply`` and materialization into the SQLite online store, real tiny models
from the training step (``model_fixture``), a ScaNN index (forced at 82 items) and two
pushes, so the ``stable`` label points at version 1 and ``canary`` at version 2. The
retrieval versions hold ScaNN's ops (``push.retrieval_index: scann_ops``), served as a
ScaNN build of TF Serving serves them, so the path of a server that lacks those ops
stays testable; the default core-ops retrieval model is served in
``tests/integration/serving/test_core_ops_retrieval.py``.
``copy_home`` gives a test module its own copy to change and break.

``build_scale_home`` builds one the same way from the generator at a given size (the soak's
scale mode: 100k items and 100k users): the models come from the same small training
setting, so the towers are barely trained, but every item is embedded, indexed by ScaNN and
scored, so the serving work is that of the full catalog.
"""

from __future__ import annotations

import json
import shutil
import time
from datetime import timedelta
from pathlib import Path

import pandas as pd

from recsys.config import IndexConfig, PushConfig, Settings, ValidationConfig, load_settings
from recsys.contracts import ITEMS, conform
from tests.support.model_fixture import write_train_fixture
from tests.support.tiny_data import TINY_END, tiny_params

# What the gate wrote for the pushed models.
BLESSED = {"blessed": True, "reason": "test"}
# Published two hours before the period ends; no event touches them.
NEW_ITEMS = ("i_new_1", "i_new_2")
# How the homes push: the retrieval model with ScaNN's ops in its graph.
PUSH = PushConfig(retrieval_index="scann_ops")


def build_serving_home(raw: Path, home: Path) -> tuple[Settings, Path]:
    """Build a serving home at ``home`` from the generated data folder ``raw``; its Settings
    and validated data folder."""
    settings = load_settings(overrides={"home": str(home)})
    data = home / "input"
    shutil.copytree(raw, data)
    published = TINY_END - timedelta(hours=2)
    new = pd.DataFrame(
        {
            "item_id": list(NEW_ITEMS),
            "title": ["Galaxy Quest Console", "Trail Running Shoes"],
            "category": ["games", "sports|fashion"],
            "description": ["a brand new console game nobody has played", "new light trail shoes"],
            "in_stock": [True, True],
            "published_ts": [published, published],
        }
    )
    conform(new, ITEMS).to_parquet(data / "items" / "part-new.parquet", index=False)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["rows"]["items"] += len(NEW_ITEMS)
    (data / "manifest.json").write_text(json.dumps(manifest))
    # ScaNN even at 82 items, as at any real catalog size.
    _build_from_data(settings, data, IndexConfig(brute_force_below=10))
    return settings, settings.validated_dir


def build_scale_home(home: Path, users: int, items: int, seed: int = 7) -> dict[str, float]:
    """Build a serving home at ``home`` from the generator at ``users`` x ``items`` with the tiny
    data set's other settings (six days, two events a user and day counting impressions); the
    seconds of each step.

    The index is built as the pipeline builds it (``IndexConfig()``: ScaNN from 2,000 items,
    tuned to the recall target)."""
    from components.sources.synthetic import generate_to_folder

    settings = load_settings(overrides={"home": str(home)})
    start = time.perf_counter()
    generate_to_folder(tiny_params(users=users, items=items, seed=seed), home / "input")
    seconds = {"generate": round(time.perf_counter() - start, 1)}
    seconds.update(_build_from_data(settings, home / "input", IndexConfig()))
    return seconds


def _build_from_data(settings: Settings, data: Path, index: IndexConfig) -> dict[str, float]:
    """Validation, features, the online store, models, index and two pushes (version 1 stable,
    2 canary) from the raw data folder ``data``; the seconds of each step."""
    from components.features.store import apply_feature_repo, materialize
    from components.features.tables import build_feature_tables
    from components.indexing import build_index
    from components.push import push_models
    from components.validation import validate_data
    from recsys.layout import features_dir

    home = settings.home
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal start
        seconds[step] = round(time.perf_counter() - start, 1)
        start = time.perf_counter()

    validate_data(ValidationConfig(), data, settings.validated_dir, as_of=TINY_END)
    lap("validate")
    build_feature_tables(settings.features, settings.validated_dir, features_dir(settings))
    apply_feature_repo(settings)
    materialize(settings)
    lap("features")
    train = home / "train"
    write_train_fixture(settings.validated_dir, train)
    lap("train")
    build_index(index, train, home / "index")
    push_models(PUSH, train, home / "index", BLESSED, settings.models_dir, data_dir=settings.validated_dir)
    # A second training output (same weights, another manifest): version 2 becomes the canary.
    other = home / "train-2"
    shutil.copytree(train, other)
    m = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**m, "note": "canary"}))
    build_index(index, other, home / "index-2")
    push_models(PUSH, other, home / "index-2", BLESSED, settings.models_dir, data_dir=settings.validated_dir)
    lap("index_and_push")
    return seconds


def copy_home(template: Path, dest: Path) -> Settings:
    """Copy a built home to ``dest`` and re-point the absolute paths its configs hold; its Settings."""
    shutil.copytree(template, dest)
    for name in ("models.config", "models.load.config"):
        path = dest / "models" / name
        if path.is_file():
            # TF Serving configs name each model's base path absolutely.
            path.write_text(path.read_text().replace(f"{template}/", f"{dest}/"))
    return load_settings(overrides={"home": str(dest)})
