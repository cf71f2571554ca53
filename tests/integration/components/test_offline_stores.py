"""The two offline stores give the same point-in-time training data.

``features.offline_store`` picks where ``build_training_data`` joins: Feast's DuckDB store
(the default: one SQL join, seconds where the other takes many minutes) or its file store
(Dask, the previous default). Switching must not change a single training row, so one home
with the tiny data's feature tables is read through both and the frames are compared cell
by cell. The leakage test in ``test_features.py`` runs on both stores as well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from components.features.store import apply_feature_repo
from components.features.tables import build_feature_tables
from components.features.training_data import build_training_data
from components.validation import validate_data
from recsys.config import FeaturesConfig, Settings, ValidationConfig
from recsys.layout import features_dir
from tests.support.tiny_data import TINY_END

pytestmark = pytest.mark.integration
STORES = ("file", "duckdb")


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


def _settings(home: Path, store: str) -> Settings:
    return Settings(home=home, features=FeaturesConfig(offline_store=store))


def test_duckdb_is_the_default_and_is_written_into_the_store_config(home: tuple[Path, Path]) -> None:
    assert FeaturesConfig().offline_store == "duckdb"
    written = yaml.safe_load((home[0] / "feast" / "feature_store.yaml").read_text())
    assert written["offline_store"] == {"type": "duckdb"}
    with pytest.raises(ValueError, match="offline_store"):
        FeaturesConfig(offline_store="dask")  # type: ignore[arg-type]


def test_both_offline_stores_build_the_same_training_rows(home: tuple[Path, Path]) -> None:
    root, validated = home
    frames = {s: build_training_data(_settings(root, s), validated) for s in STORES}
    file, duck = (
        frames[s].sort_values(["user_id", "item_id", "ts", "event_id"], ignore_index=True) for s in STORES
    )
    events = pd.read_parquet(validated / "events")
    assert len(file) == len(duck) == len(events)
    assert list(file.columns) == list(duck.columns)
    # Every column with the same type, every cell the same value (floats to 1e-6).
    pd.testing.assert_series_equal(file.dtypes, duck.dtypes)
    for col in file.columns:
        a, b = file[col], duck[col]
        if pd.api.types.is_float_dtype(a):
            np.testing.assert_allclose(a.to_numpy(), b.to_numpy(), rtol=1e-6, atol=1e-6, err_msg=col)
        else:
            pd.testing.assert_series_equal(a, b, check_names=True, obj=col)
    # The comparison means something: features were joined, and some rows fell back to defaults.
    assert (duck["recent_items"] != "").any() and (duck["recent_items"] == "").any()
    assert (duck["user_events_7d"] > 0).any() and (duck["category"] != "").all()
