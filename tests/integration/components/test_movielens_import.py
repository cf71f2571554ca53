"""The MovieLens importer on the real sets in ../shared/data (ml-1m with our own ratings)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from components.sources.movielens import import_movielens
from recsys.contracts import AGE_BUCKETS
from tests.support.paths import SHARED_DATA

pytestmark = pytest.mark.integration

DATA = SHARED_DATA


def _set(name: str) -> Path:
    path = DATA / name
    if not path.is_dir():
        pytest.skip(f"MovieLens set {name} not found at {path} (shared data folder missing)")
    return path


def _import(src: Path, out: Path) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    manifest = import_movielens(src, out)
    frames = {t: pd.read_parquet(out / t) for t in ("users", "items", "events")}
    # The manifest on disk is the one returned, and its counts are what a reader gets back.
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest, default=str))
    assert manifest["rows"] == {t: len(df) for t, df in frames.items()}
    return manifest, frames


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, pd.DataFrame]]:
    return _import(_set("ml-100k"), tmp_path_factory.mktemp("ml-100k"))


@pytest.fixture(scope="module")
def latest(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict[str, pd.DataFrame]]:
    return _import(_set("ml-latest-small"), tmp_path_factory.mktemp("ml-latest-small"))


def test_ml100k_counts_and_manifest(ml100k: tuple[dict, dict[str, pd.DataFrame]]) -> None:
    manifest, f = ml100k
    assert manifest["rows"] == {"users": 943, "items": 1682, "events": 100_000}
    assert manifest["source"] == "movielens"
    assert manifest["layout"] == "ml-100k"
    assert manifest["input"] == str(DATA / "ml-100k")


def test_ml100k_events(ml100k: tuple[dict, dict[str, pd.DataFrame]]) -> None:
    e = ml100k[1]["events"]
    for col in ("event_id", "user_id", "item_id", "session_id"):
        assert pd.api.types.is_string_dtype(e[col]), col
    row = e[(e["user_id"] == "196") & (e["item_id"] == "242")]
    assert len(row) == 1
    assert row["value"].iloc[0] == 3.0
    assert row["event_id"].iloc[0] == "ml-196-242"
    assert row["ts"].iloc[0] == pd.Timestamp(881250949, unit="s", tz="UTC")
    assert set(e["event_type"]) == {"rating"}
    assert set(e["device"]) == {"unknown"}
    assert e["request_id"].isna().all()
    assert e["session_id"].str.fullmatch(r"ml-\d+-s\d+").all()
    # A user's ratings start a new session exactly where more than 30 minutes pass.
    s = e.sort_values(["user_id", "ts"], kind="stable")
    gap = s.groupby("user_id")["ts"].diff()
    starts = s["session_id"] != s.groupby("user_id")["session_id"].shift()
    assert (starts == (gap.isna() | (gap > pd.Timedelta(minutes=30)))).all()
    assert e["session_id"].nunique() > e["user_id"].nunique()


def test_ml100k_users_and_items(ml100k: tuple[dict, dict[str, pd.DataFrame]]) -> None:
    f = ml100k[1]
    u, i, e = f["users"], f["items"], f["events"]
    assert set(u["age_bucket"]) <= set(AGE_BUCKETS)
    one = u.set_index("user_id").loc["1"]  # 1|24|M|technician|85711
    assert (one["age_bucket"], one["gender"], one["occupation"]) == ("18-24", "M", "technician")
    assert set(u["gender"]) == {"M", "F"}
    assert set(u["country"]) == {"US"}
    assert set(u["signup_source"]) == {"movielens"}
    first = e.groupby("user_id")["ts"].min()
    assert (u["signup_ts"] == u["user_id"].map(first)).all()

    toy = i.set_index("item_id").loc["1"]
    assert toy["title"] == "Toy Story (1995)"
    assert "Animation" in toy["category"].split("|")
    assert "Animation" in toy["description"]
    assert i["in_stock"].all()
    assert (i.set_index("item_id").loc["267", "category"]) == "unknown"
    first_item = e.groupby("item_id")["ts"].min()
    assert (i["published_ts"] <= i["item_id"].map(first_item)).all()


def test_ml_latest_small(latest: tuple[dict, dict[str, pd.DataFrame]]) -> None:
    manifest, f = latest
    u, i, e = f["users"], f["items"], f["events"]
    assert manifest["rows"] == {"users": 610, "items": 9742, "events": 100_836}
    assert manifest["layout"] == "ml-latest-small"
    assert set(u["country"]) == {"unknown"}
    assert set(u["age_bucket"]) == {"unknown"}
    assert u["gender"].isna().all() and u["occupation"].isna().all()

    items = i.set_index("item_id")
    toy = items.loc["1"]
    assert "Animation" in toy["category"].split("|")
    # tags.csv: user 567 tagged Toy Story "fun", user 474 "pixar" (lower-cased as they are).
    assert "Tags:" in toy["description"]
    assert "pixar" in toy["description"] and "fun" in toy["description"]
    assert items["description"].str.contains("Tags:").sum() > 1000
    # "(no genres listed)" becomes "unknown".
    assert "(no genres listed)" not in set(items["category"])
    assert (items["category"] == "unknown").sum() > 0
    # Every movie of movies.csv is kept, rated or not.
    assert (~items.index.isin(e["item_id"])).sum() > 0
    first = e.groupby("item_id")["ts"].min()
    assert (i["published_ts"] <= i["item_id"].map(first).fillna(i["published_ts"])).all()
    assert items.loc["1", "published_ts"] == pd.Timestamp("1995-01-01", tz="UTC")


def test_ml1m_layout_with_own_ratings(tmp_path: Path) -> None:
    src_dir = _set("ml-1m-partial")
    src = tmp_path / "ml-1m"
    src.mkdir()
    for name in ("movies.dat", "users.dat"):
        shutil.copy(src_dir / name, src / name)
    t0 = 978300760
    (src / "ratings.dat").write_text(
        "\n".join(
            [
                f"1::1193::5::{t0}",
                f"1::661::3::{t0 + 60}",
                f"1::914::3::{t0 + 60 + 31 * 60}",  # more than 30 minutes: a new session
                f"2::1357::5::{t0 + 10}",
                f"2::99999::4::{t0 + 20}",  # no such movie in movies.dat
            ]
        )
        + "\n"
    )
    manifest, f = _import(src, tmp_path / "out")
    u, i, e = f["users"], f["items"], f["events"]
    assert manifest["layout"] == "ml-1m"
    # All users of users.dat, rated or not; all movies of movies.dat plus the unknown one.
    assert manifest["rows"] == {"users": 6040, "items": 3884, "events": 5}

    sessions = e.sort_values("ts").set_index("event_id")["session_id"]
    assert sessions["ml-1-1193"] == sessions["ml-1-661"] == "ml-1-s1"
    assert sessions["ml-1-914"] == "ml-1-s2"
    assert sessions["ml-2-1357"] == "ml-2-s1"

    users = u.set_index("user_id")
    # 1::F::1::10::48067 and 2::M::56::16::70072
    assert tuple(users.loc["1", ["gender", "age_bucket", "occupation"]]) == (
        "F",
        "<18",
        "K-12 student",
    )
    assert tuple(users.loc["2", ["gender", "age_bucket", "occupation"]]) == (
        "M",
        "55+",
        "self-employed",
    )
    assert set(u["age_bucket"]) <= set(AGE_BUCKETS) - {"unknown"}
    assert users["occupation"].notna().all()
    assert set(u["country"]) == {"US"}
    assert users.loc["1", "signup_ts"] == pd.Timestamp(t0, unit="s", tz="UTC")
    # A user without ratings signs up at the earliest rating of the file.
    assert users.loc["3", "signup_ts"] == pd.Timestamp(t0, unit="s", tz="UTC")

    items = i.set_index("item_id")
    assert items.loc["1", "title"] == "Toy Story (1995)"
    assert items.loc["1", "category"] == "Animation|Children's|Comedy"
    assert items.loc["1", "published_ts"] == pd.Timestamp("1995-01-01", tz="UTC")
    assert items.loc["99999", "title"] == "item 99999"
    assert items.loc["99999", "category"] == "unknown"
    assert items.loc["99999", "published_ts"] == pd.Timestamp(t0 + 20, unit="s", tz="UTC")


def test_folder_without_ratings_names_the_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        import_movielens(tmp_path, tmp_path / "out")
    message = str(err.value)
    assert str(tmp_path) in message
    for name in ("u.data", "ratings.dat", "ratings.csv"):
        assert name in message
    assert not (tmp_path / "out").exists()
