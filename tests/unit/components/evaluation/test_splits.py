"""Holdout splits on hand-made events: leave-last-out, the small-holdout fallback, validation."""

from __future__ import annotations

import pandas as pd
import pytest

from components.evaluation.splits import (
    choose_split,
    decidable_users,
    held_out_pairs,
    last_item_split,
    split_holdout,
    validation_split,
)
from recsys.config import EvaluationConfig


def _events(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    """(user, item, event_type, ts) rows with ids e0, e1, ... in the given order."""
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "ts"])
    frame["ts"] = pd.to_datetime(frame["ts"], utc=True)
    frame["event_id"] = [f"e{n}" for n in range(len(frame))]
    return frame


def test_last_item_holds_out_each_users_last_positive_and_what_followed():
    events = _events(
        [
            ("u1", "a", "click", "2026-10-01T10:00Z"),
            ("u1", "b", "impression", "2026-10-02T10:00Z"),
            ("u1", "b", "click", "2026-10-02T10:01Z"),
            ("u1", "b", "view", "2026-10-02T10:02Z"),  # same interaction: held out with the click
            ("u1", "c", "impression", "2026-10-03T10:00Z"),  # after the last positive: held out
            ("u2", "a", "click", "2026-10-01T11:00Z"),  # one positive item: stays in training
            ("u2", "a", "view", "2026-10-02T11:00Z"),
            ("u3", "a", "impression", "2026-10-01T12:00Z"),  # no positive at all
        ]
    )
    train, holdout = last_item_split(events)
    # u1's cut is the click on b (its first positive on b after the last positive on a); the
    # impression of b before it stays in training.
    assert sorted(holdout["event_id"]) == ["e2", "e3", "e4"]
    assert sorted(train["event_id"]) == ["e0", "e1", "e5", "e6", "e7"]
    assert decidable_users(train, holdout) == 1


def test_last_item_skips_a_user_whose_last_item_was_seen_before_in_training():
    # u1 engaged with a, then b, then a again: the last item a is also a training positive,
    # so the held-out rows (from the second a on) relate nothing new: not decidable.
    events = _events(
        [
            ("u1", "a", "click", "2026-10-01T10:00Z"),
            ("u1", "b", "click", "2026-10-02T10:00Z"),
            ("u1", "a", "click", "2026-10-03T10:00Z"),
        ]
    )
    train, holdout = last_item_split(events)
    assert list(holdout["event_id"]) == ["e2"]
    assert decidable_users(train, holdout) == 0


def _order_only(users: int, days: int) -> pd.DataFrame:
    """One purchase a day, each day by a different user (a few users active late): a time split
    of the last day catches one user, leave-last-out catches everyone with two items."""
    rows = []
    for d in range(days):
        for u in range(users):
            if (d + u) % 3 == 0:
                rows.append((f"u{u}", f"i{(d * 7 + u) % 40}", "purchase", f"2026-10-{d + 1:02d}T12:00Z"))
    return _events(rows)


def test_a_time_holdout_too_small_to_decide_falls_back_to_last_item_and_says_so():
    events = _order_only(users=60, days=9)
    config = EvaluationConfig(split="time", holdout_days=1, min_holdout_users=30)
    train, holdout, choice = choose_split(events, config)
    assert choice.requested == "time" and choice.used == "last_item"
    assert choice.users["time"] < 30 <= choice.users["last_item"]
    assert "too small to decide" in choice.note and "fell back to last_item" in choice.note
    assert choice.decides
    # The frames returned are the fallback's, and split_holdout returns the same.
    assert decidable_users(train, holdout) == choice.users["last_item"]
    again_train, again_holdout = split_holdout(events, config)
    assert list(again_holdout["event_id"]) == list(holdout["event_id"])
    assert len(again_train) == len(train)


def test_a_holdout_big_enough_is_kept_and_the_fallback_untouched():
    events = _order_only(users=60, days=9)
    config = EvaluationConfig(split="time", holdout_days=3, min_holdout_users=5)
    _, _, choice = choose_split(events, config)
    assert choice.used == "time" and choice.note is None and set(choice.users) == {"time"}


def test_when_no_split_can_decide_the_largest_is_used_and_named():
    events = _order_only(users=6, days=4)
    config = EvaluationConfig(split="time", holdout_days=1, min_holdout_users=1000)
    _, _, choice = choose_split(events, config)
    assert not choice.decides
    assert choice.used == max(choice.users, key=lambda s: choice.users[s])
    assert "no split reaches min_holdout_users=1000" in choice.note


def test_split_of_train_plus_holdout_reproduces_the_split_whatever_the_row_order():
    events = _order_only(users=30, days=9)
    config = EvaluationConfig(split="random", holdout_fraction=0.3, min_holdout_users=1)
    train, holdout = split_holdout(events, config)
    shuffled = pd.concat([holdout, train]).sample(frac=1.0, random_state=3)
    again_train, again_holdout = split_holdout(shuffled, config)
    assert sorted(again_holdout["event_id"]) == sorted(holdout["event_id"])


def test_last_item_is_a_config_choice_and_a_bad_split_is_refused_naming_it():
    assert EvaluationConfig(split="last_item").split == "last_item"
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="split"):
        EvaluationConfig(split="leave_one_out")


def test_validation_is_the_last_fraction_of_training_positives_by_time():
    events = _order_only(users=60, days=10)
    carved = validation_split(events, fraction=0.2, min_users=5)
    assert carved.held_out_from_models
    # Everything in the validation part comes at or after everything in the fitting part.
    assert carved.train["ts"].max() < carved.holdout["ts"].min()
    positives = len(events)
    assert len(carved.holdout) == pytest.approx(0.2 * positives, abs=6)  # whole timestamps move together


def test_validation_falls_back_to_last_item_when_training_held_out_nothing():
    events = _order_only(users=60, days=10)
    carved = validation_split(events, fraction=0.0, min_users=5)
    assert not carved.held_out_from_models and "last item" in carved.how
    assert decidable_users(carved.train, carved.holdout) > 5


def test_held_out_pairs_are_a_seeded_fraction_drawn_alike_in_every_frame():
    pairs = pd.DataFrame(
        {"user_id": [f"u{n % 50}" for n in range(5000)], "item_id": [f"i{n // 50}" for n in range(5000)]}
    )
    held = held_out_pairs(pairs, 0.2, seed=7)
    assert 0.17 < held.mean() < 0.23
    assert (held_out_pairs(pairs, 0.2, seed=7) == held).all()
    assert (held_out_pairs(pairs, 0.2, seed=8) != held).any()
    # A pair is on the same side whatever else the frame holds (the ranker's examples, the
    # evaluation's events): the verdict depends on the pair alone.
    shuffled = pairs.sample(frac=1.0, random_state=0)
    assert (held_out_pairs(shuffled, 0.2, seed=7) == held[shuffled.index.to_numpy()]).all()
    assert not held_out_pairs(pairs, 0.0, seed=7).any()


def test_a_random_validation_split_is_the_held_out_pairs_when_training_drew_them():
    rows = []
    for u in range(30):
        for i in range(10):
            rows.append((f"u{u}", f"i{i}", "click", f"2026-01-0{1 + i % 9}T{u % 24:02d}:00:00Z"))
    events = _events(rows)
    carved = validation_split(events, 0.2, min_users=5, how="random", seed=3)
    mask = held_out_pairs(events, 0.2, seed=3)
    assert carved.held_out_from_models and "random 20%" in carved.how
    assert len(carved.holdout) == mask.sum() and len(carved.train) == (~mask).sum()
