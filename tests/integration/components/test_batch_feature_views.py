"""A feature added the feature engineer's way: one BatchFeatureView in a copy of the feature repo.

The copy of ``feature_repo/`` gets a new view (a transformation over the events) and the
ranker's service lists it; nothing else changes. After build, apply and materialize, the
feature is in the training frame, as of strictly before each event, and in the online
store. Expected values are counted here from the events, not by the code under test.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from components.features.store import apply_feature_repo, materialize
from components.features.tables import build_feature_tables
from components.features.training_data import build_training_data
from components.validation import validate_data
from recsys.config import FeaturesConfig, Settings
from recsys.feature_schema import POSITIVE_EVENT_TYPES, RANKER_SERVICE
from recsys.layout import FEATURE_REPO_DIR, features_dir
from recsys.online_features import get_store
from tests.support.tiny_data import TINY_END

pytestmark = pytest.mark.integration

NEW_VIEW = """
def user_purchase_counts(events: pd.DataFrame) -> pd.DataFrame:
    from datetime import timedelta

    from recsys.event_windows import trailing_counts

    return trailing_counts(
        events,
        key="user_id",
        counts={"purchases": lambda e: e["event_type"] == "purchase"},
        windows={"48h": timedelta(hours=48)},
    )


user_purchases = BatchFeatureView(
    name="user_purchases",
    mode="pandas",
    entities=[user],
    source=[events],
    sink_source=FileSource(
        name="user_purchases",
        path=_table("user_purchases"),
        timestamp_field="event_timestamp",
        file_format=ParquetFormat(),
    ),
    udf=user_purchase_counts,
    udf_string=inspect.getsource(user_purchase_counts),
    ttl=timedelta(hours=48),
    schema=[Field(name="user_purchases_48h", dtype=Int64)],
    online=True,
    offline=False,
)

"""
SERVICE_BEFORE = "features=[user_profile, user_engagement, item_attributes, item_popularity, user_activity],"
SERVICE_AFTER = SERVICE_BEFORE.replace("user_activity]", "user_activity, user_purchases]")
ONE_US = pd.Timedelta(microseconds=1)


@pytest.fixture(scope="module")
def validated(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recsys.config import ValidationConfig

    out = tmp_path_factory.mktemp("bfv_validated") / "validated"
    validate_data(ValidationConfig(), tiny_raw, out, as_of=TINY_END)
    return out


@pytest.fixture(scope="module")
def events(validated: Path) -> pd.DataFrame:
    return pd.read_parquet(validated / "events")


@pytest.fixture(scope="module")
def env(validated: Path, tmp_path_factory: pytest.TempPathFactory):
    """The repo copy with the new view, built, applied and materialized under its own home."""
    repo = tmp_path_factory.mktemp("repo") / "feature_repo"
    shutil.copytree(FEATURE_REPO_DIR, repo, ignore=shutil.ignore_patterns("__pycache__"))
    source = (repo / "features.py").read_text()
    assert source.count(SERVICE_BEFORE) == 1 and "# --- Feature services" in source
    # The one edit: declare the view, list it in the ranker's service.
    source = source.replace("# --- Feature services", NEW_VIEW + "# --- Feature services", 1)
    (repo / "features.py").write_text(source.replace(SERVICE_BEFORE, SERVICE_AFTER))

    settings = Settings(home=tmp_path_factory.mktemp("home_bfv"), features=FeaturesConfig())
    build_feature_tables(settings.features, validated, features_dir(settings))
    applied = apply_feature_repo(settings, repo_dir=repo)
    materialize(settings)
    return settings, get_store(settings), applied


def _counts_before(events: pd.DataFrame, mask: pd.Series, window: pd.Timedelta) -> pd.Series:
    """Per event: the user's events of ``mask`` in the window that ends just before the event."""
    hits = events[mask]
    by_user = {u: g["ts"] for u, g in hits.groupby("user_id")}
    out = {}
    for ev in events.itertuples():
        ts = by_user.get(ev.user_id, pd.Series(dtype="datetime64[us, UTC]"))
        at = ev.ts - ONE_US
        out[str(ev.event_id)] = int(((ts > at - window) & (ts <= at)).sum())
    return pd.Series(out)


def test_a_view_added_in_the_repo_reaches_training_data_and_the_online_store(env, validated, events) -> None:
    settings, store, applied = env
    assert "user_purchases" in applied["feature_views"]
    ranker = [p.name for p in store.get_feature_service(RANKER_SERVICE).feature_view_projections]
    assert "user_purchases" in ranker

    train = build_training_data(settings, validated, store=store).set_index("event_id")
    assert train["user_purchases_48h"].dtype == "int64"
    purchases = events["event_type"] == "purchase"
    want = _counts_before(events, purchases, pd.Timedelta(hours=48))
    assert (want > 0).sum() > 10, "tiny data must have users with recent purchases"
    pd.testing.assert_series_equal(
        train.loc[want.index, "user_purchases_48h"], want, check_names=False, check_index_type=False
    )
    # A purchase never counts itself: its own row reads what was known just before it.
    own = events.loc[purchases, "event_id"].astype(str)
    assert (train.loc[own, "user_purchases_48h"] == want.loc[own]).all()

    # The repo's own view, on the same path: intraday counts and their rate.
    positives = events["event_type"].isin(POSITIVE_EVENT_TYPES)
    all_24h = _counts_before(events, events["event_type"].notna(), pd.Timedelta(hours=24))
    pos_24h = _counts_before(events, positives, pd.Timedelta(hours=24))
    assert (train.loc[all_24h.index, "user_events_24h"] == all_24h).all()
    rate = (pos_24h / all_24h.where(all_24h > 0)).fillna(0.0)
    assert train.loc[rate.index, "user_positive_rate_24h"].to_numpy() == pytest.approx(rate.to_numpy())

    # Online: each user's value as of the latest event of the log (the materialized row).
    last = events["ts"].max()
    recent = events[purchases & (events["ts"] > last - pd.Timedelta(hours=48))]
    busy = recent["user_id"].value_counts()
    assert len(busy) > 0
    quiet = sorted(set(events["user_id"]) - set(busy.index))[:2]
    users = [*busy.index[:3], *quiet]
    got = store.get_online_features(
        features=["user_purchases:user_purchases_48h"], entity_rows=[{"user_id": u} for u in users]
    ).to_dict()
    assert got["user_purchases_48h"] == [int(busy.get(u, 0)) for u in users]
