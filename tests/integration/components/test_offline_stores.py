"""The offline stores give the same point-in-time training data and online values.

``features.offline_store`` picks where ``build_training_data`` joins: Feast's DuckDB store
(the default: one SQL join, seconds where the file store takes many minutes), its file store
(Dask, the previous default) or its Spark store on a local Spark (``spark.master``
``local[2]``; a cluster's URL in production), where materialization also runs on Feast's
Spark compute engine. Switching must not change a single training row or online value, so
the tiny data's feature tables are read through each and compared cell by cell. The leakage
test in ``test_features.py`` runs on every store as well.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from components.features.store import apply_feature_repo, materialize
from components.features.tables import FeatureRepoError, build_feature_tables
from components.features.training_data import build_training_data, write_training_data
from components.validation import validate_data
from recsys.config import FeaturesConfig, Settings, ValidationConfig
from recsys.feature_schema import RANKER_SERVICE, RETRIEVER_SERVICE
from recsys.layout import features_dir
from recsys.online_features import get_store, service_features
from tests.support.tiny_data import TINY_END

pytestmark = pytest.mark.integration
STORES = ("file", "duckdb", "spark")


@pytest.fixture(scope="module")
def home(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A home with the tiny data validated, its feature tables built and the repo applied."""
    root = tmp_path_factory.mktemp("offline_stores")
    validated = root / "validated"
    validate_data(ValidationConfig(), tiny_raw, validated, as_of=TINY_END)
    settings = Settings(home=root / "home")
    build_feature_tables(settings.features, validated, features_dir(settings))
    apply_feature_repo(settings)
    return settings.home, validated


@pytest.fixture(scope="module")
def spark_home(home: tuple[Path, Path]) -> Path:
    """The same feature tables under a home whose registry is applied for the Spark store.

    Sources are engine-typed in Feast (Spark reads SparkSources), so each engine has the
    registry that ``recsys features apply`` writes for it.
    """
    root = home[0].parent / "spark_home"
    shutil.copytree(features_dir(Settings(home=home[0])), features_dir(Settings(home=root)))
    apply_feature_repo(_settings(root, "spark"))
    return root


def _settings(home: Path, store: str) -> Settings:
    return Settings(home=home, features=FeaturesConfig(offline_store=store))


def _home_of(store: str, home: tuple[Path, Path], spark_home: Path) -> Path:
    return spark_home if store == "spark" else home[0]


def test_duckdb_is_the_default_and_is_written_into_the_store_config(home: tuple[Path, Path]) -> None:
    assert FeaturesConfig().offline_store == "duckdb"
    written = yaml.safe_load((home[0] / "feast" / "feature_store.yaml").read_text())
    assert written["offline_store"] == {"type": "duckdb"}
    with pytest.raises(ValueError, match="offline_store"):
        FeaturesConfig(offline_store="dask")  # type: ignore[arg-type]


def _assert_same_frames(a: pd.DataFrame, b: pd.DataFrame) -> None:
    """Same columns, types and cells (floats to 1e-6)."""
    assert list(a.columns) == list(b.columns)
    pd.testing.assert_series_equal(a.dtypes, b.dtypes)
    for col in a.columns:
        x, y = a[col], b[col]
        if pd.api.types.is_float_dtype(x):
            np.testing.assert_allclose(x.to_numpy(), y.to_numpy(), rtol=1e-6, atol=1e-6, err_msg=col)
        else:
            pd.testing.assert_series_equal(x, y, check_names=True, obj=col)


def test_every_offline_store_builds_the_same_training_rows(home: tuple[Path, Path], spark_home: Path) -> None:
    root, validated = home
    frames = {
        s: build_training_data(_settings(_home_of(s, home, spark_home), s), validated).sort_values(
            ["user_id", "item_id", "ts", "event_id"], ignore_index=True
        )
        for s in STORES
    }
    events = pd.read_parquet(validated / "events")
    duck = frames["duckdb"]
    assert len(duck) == len(events)
    for other in ("file", "spark"):
        assert len(frames[other]) == len(events), other
        _assert_same_frames(duck, frames[other])
    # The comparison means something: features were joined, and some rows fell back to defaults.
    assert (duck["recent_items"] != "").any() and (duck["recent_items"] == "").any()
    assert (duck["user_events_7d"] > 0).any() and (duck["category"] != "").all()


def test_training_data_written_by_interval_is_the_whole_join(home: tuple[Path, Path], tmp_path: Path) -> None:
    """Parts of a few days each, read in order, are the frame of one whole join, and a re-run
    for a shorter span leaves only its own parts."""
    root, validated = home
    settings = _settings(root, "duckdb")
    whole = build_training_data(settings, validated)
    seen: list[tuple[int, int, int]] = []
    out = tmp_path / "parts"
    written = write_training_data(settings, out, 1, validated, progress=lambda *a: seen.append(a))
    parts = sorted(out.glob("part-*.parquet"))
    assert written["parts"] == len(parts) > 2 and written["rows"] == len(whole)
    assert seen[-1][0] == seen[-1][1] and seen[-1][2] == len(whole)
    by_parts = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    _assert_same_frames(whole, by_parts)

    end = whole["ts"].min().floor("D") + pd.Timedelta(days=2)
    again = write_training_data(settings, out, 1, validated, end=end.to_pydatetime())
    assert again["parts"] == len(list(out.glob("part-*.parquet"))) == 2
    head = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("part-*.parquet"))], ignore_index=True)
    _assert_same_frames(whole[whole["ts"] < end].reset_index(drop=True), head)
    with pytest.raises(ValueError, match="interval_days"):
        write_training_data(settings, out, 0, validated)


def test_spark_settings_reach_the_store_config(spark_home: Path) -> None:
    written = yaml.safe_load((spark_home / "feast" / "feature_store.yaml").read_text())
    spark = Settings().spark
    for part in ("offline_store", "batch_engine"):
        assert written[part]["spark_conf"]["spark.master"] == spark.master == "local[2]"
        assert written[part]["spark_conf"]["spark.sql.session.timeZone"] == "UTC"
    assert written["offline_store"]["type"] == "spark" and written["batch_engine"]["type"] == "spark.engine"
    store = get_store(_settings(spark_home, "spark"))
    assert {type(v.batch_source).__name__ for v in store.list_feature_views()} == {"SparkSource"}


def test_a_registry_applied_for_another_engine_is_refused_with_the_fix(home: tuple[Path, Path]) -> None:
    root, validated = home
    with pytest.raises(FeatureRepoError, match="FileSource.*offline_store='spark'.*recsys features apply"):
        build_training_data(_settings(root, "spark"), validated)


def test_materialization_on_spark_writes_the_same_online_values(
    home: tuple[Path, Path], spark_home: Path, tmp_path: Path
) -> None:
    """Feast's Spark compute engine loads the online store with what the embedded engine loads."""
    values = {}
    for store_kind in ("duckdb", "spark"):
        # Each engine fills an online store of its own (a fresh SQLite file), not the shared one.
        source = _home_of(store_kind, home, spark_home)
        work = tmp_path / store_kind
        shutil.copytree(source / "feast", work / "feast", ignore=shutil.ignore_patterns("online_store.db"))
        shutil.copytree(features_dir(Settings(home=source)), features_dir(Settings(home=work)))
        settings = _settings(work, store_kind)
        apply_feature_repo(settings)
        materialize(settings)
        store = get_store(settings)
        users = pd.read_parquet(features_dir(settings) / "user_profile")["user_id"].astype(str).tolist()
        items = pd.read_parquet(features_dir(settings) / "item_attributes")["item_id"].astype(str).tolist()
        services = [RETRIEVER_SERVICE, RANKER_SERVICE]
        user_refs = [r for r in service_features(store, services) if not r.startswith("item_")]
        item_refs = [r for r in service_features(store, [RANKER_SERVICE]) if r.startswith("item_")]
        values[store_kind] = (
            pd.DataFrame(store.get_online_features(user_refs, [{"user_id": u} for u in users]).to_dict()),
            pd.DataFrame(store.get_online_features(item_refs, [{"item_id": i} for i in items]).to_dict()),
        )
    for duck, spark in zip(values["duckdb"], values["spark"], strict=True):
        _assert_same_frames(duck, spark)
    users, items = values["spark"]
    # Something was loaded: engagement counts, recent items and popularity are not all empty.
    assert users["recent_items"].notna().any() and (users["user_events_30d"].fillna(0) > 0).any()
    assert "user_events_24h" in users.columns  # the BatchFeatureView, run by each engine
    assert (items["item_positives_30d"].fillna(0) > 0).any()


def test_the_embedded_asof_join_keeps_feasts_ttl_and_time_rules(tmp_path: Path) -> None:
    """DuckDB's ASOF join answers as Feast's join does: the latest row at or before the time,
    nothing before the first row, nothing once the latest row is older than the view's ttl."""
    from datetime import timedelta

    from feast import Entity, FeatureView, Field, FileSource
    from feast.data_format import ParquetFormat
    from feast.types import Int64

    from components.features.training_data import _asof_as_of

    t0 = pd.Timestamp("2026-01-10", tz="UTC")
    folder = tmp_path / "counts"
    folder.mkdir()
    pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2"],
            "event_timestamp": pd.to_datetime([t0, t0 + pd.Timedelta(days=1), t0]).astype(
                "datetime64[us, UTC]"
            ),
            "n": [1, 2, 7],
        }
    ).to_parquet(folder / "part-0.parquet", index=False)
    source = FileSource(
        name="counts", path=str(folder), timestamp_field="event_timestamp", file_format=ParquetFormat()
    )
    user = Entity(name="user", join_keys=["user_id"])
    view = FeatureView(
        name="counts",
        entities=[user],
        ttl=timedelta(days=2),
        schema=[Field(name="n", dtype=Int64)],
        source=source,
    )
    asked = {
        ("u1", t0 - pd.Timedelta(seconds=1)): None,  # before the first row
        ("u1", t0): 1,  # a row stamped at the time itself counts (Feast's join is inclusive)
        ("u1", t0 + pd.Timedelta(days=1, hours=1)): 2,  # the latest of two
        ("u1", t0 + pd.Timedelta(days=3)): 2,  # 2 days old: within the ttl
        ("u1", t0 + pd.Timedelta(days=3, seconds=1)): None,  # older than the ttl
        ("u2", t0 + pd.Timedelta(days=1)): 7,
        ("u3", t0 + pd.Timedelta(days=1)): None,  # no rows at all
    }
    pairs = pd.DataFrame({"user_id": [k for k, _ in asked], "event_timestamp": [t for _, t in asked]}).astype(
        {"event_timestamp": "datetime64[ns, UTC]"}
    )
    got = _asof_as_of(view, ["n"], pairs).set_index(["user_id", "event_timestamp"])["n"]
    for key, want in asked.items():
        value = got.loc[key]
        assert pd.isna(value) if want is None else value == want, (key, value, want)
