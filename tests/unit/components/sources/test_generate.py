"""The synthetic source: deterministic, and with the structure the models need."""

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from components.sources.synthetic import CATEGORY_WORDS, generate, generate_to_folder
from tests.support.tiny_data import TINY_END, tiny_params


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*.parquet"))
    }


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    a = generate_to_folder(tiny_params(), tmp_path / "a")
    b = generate_to_folder(tiny_params(), tmp_path / "b")
    generate_to_folder(tiny_params(seed=12), tmp_path / "c")
    assert a["rows"] == b["rows"]
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert len(_digest(tmp_path / "a")) >= 6  # users, items and one file per day of events
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_tables_follow_the_contracts_and_reference_each_other():
    f = generate(tiny_params())
    users, items, events = f["users"], f["items"], f["events"]
    assert users["user_id"].is_unique and items["item_id"].is_unique and events["event_id"].is_unique
    assert set(events["user_id"]) <= set(users["user_id"])
    assert set(events["item_id"]) <= set(items["item_id"])
    start = pd.Timestamp(TINY_END) - pd.Timedelta(days=6)
    assert events["ts"].min() >= start and events["ts"].max() < pd.Timestamp(TINY_END)
    # Nobody acts before signing up, and no item is shown before it is published.
    ev = events.merge(users[["user_id", "signup_ts"]]).merge(items[["item_id", "published_ts"]])
    assert (ev["ts"] >= ev["signup_ts"]).all()
    assert (ev["ts"] >= ev["published_ts"]).all()
    kinds = set(events["event_type"])
    assert {"impression", "click", "view", "add_to_cart", "purchase", "rating"} <= kinds
    ratings = events.loc[events["event_type"] == "rating", "value"]
    assert ratings.between(1, 5).all()
    assert (events.loc[events["event_type"] == "view", "value"] > 0).all()


def test_structure_late_arrivals_popularity_and_text():
    p = tiny_params(users=2000, items=400, days=20)
    f = generate(p)
    users, items, events = f["users"], f["items"], f["events"]
    start = pd.Timestamp(TINY_END) - pd.Timedelta(days=20)
    # Cold start is real: some users and items appear during the period.
    assert 0.05 < (users["signup_ts"] > start).mean() < 0.3
    assert 0.1 < (items["published_ts"] > start).mean() < 0.35
    # Zipf-like popularity: the top 10% of items hold a large share of impressions.
    counts = events.loc[events["event_type"] == "impression", "item_id"].value_counts()
    assert counts.iloc[: len(items) // 10].sum() / counts.sum() > 0.4
    # Text carries the category: most description words come from the primary category.
    primary = items["category"].str.split("|").str[0]
    own = [
        np.mean([w in CATEGORY_WORDS[c] for w in d.split()])
        for c, d in zip(primary, items["description"], strict=True)
    ]
    assert np.mean(own) > 0.4


def test_demographics_carry_taste_signal():
    """Users of different age buckets click different categories (so profiles help)."""
    f = generate(tiny_params(users=3000, items=300, days=10))
    ev = f["events"][f["events"]["event_type"] == "click"]
    ev = ev.merge(f["users"][["user_id", "age_bucket"]]).merge(f["items"][["item_id", "category"]])
    ev["primary"] = ev["category"].str.split("|").str[0]
    share = pd.crosstab(ev["age_bucket"], ev["primary"], normalize="index")
    # Total variation distance between the two largest buckets' category mixes.
    a, b = share.loc["25-34"], share.loc["18-24"]
    assert 0.5 * (a - b).abs().sum() > 0.1
