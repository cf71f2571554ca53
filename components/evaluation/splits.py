"""Holdout splits: by time, at random per user, or each user's last item; and the fallback
when a split is too small to decide.

A gate reads a mean over the holdout's users; with a handful of users that mean is noise
and blessing or refusing on it is a coin toss. Order-only data with one event a day is the
usual case: the last ``holdout_days`` catch the few users active then. ``choose_split``
counts the users a split would evaluate (a holdout positive outside their training
positives) and, below ``min_holdout_users``, falls back to ``last_item`` (every user with
two positive items contributes one), then ``random``, saying so in ``SplitChoice.note``.

The validation split that tunes serving choices (the fusion weight) is carved from the
training part only (``validation_split``), never from the holdout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from recsys.config import EvaluationConfig
from recsys.feature_schema import POSITIVE_EVENT_TYPES

SPLITS = ("time", "random", "last_item")


def canonical_order(events: pd.DataFrame) -> pd.DataFrame:
    """Rows in time order, ties broken by user, item and event id: the same order whatever
    order the rows came in, so a split of ``train + holdout`` reproduces the split of the
    original frame."""
    keys = [c for c in ("_ts", "user_id", "item_id", "event_id") if c == "_ts" or c in events.columns]
    order = events.assign(_ts=pd.to_datetime(events["ts"], utc=True))
    order = order.sort_values(keys, kind="stable").drop(columns="_ts")
    return order.reset_index(drop=True)


def split_time(ts: pd.Series, holdout_days: int) -> pd.Timestamp:
    """The cut of ``time_split``: midnight after the last event, minus ``holdout_days``."""
    last = pd.to_datetime(ts, utc=True).max()
    return last.floor("D") + pd.Timedelta(days=1) - pd.Timedelta(days=holdout_days)


def time_split(events: pd.DataFrame, holdout_days: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split events (or a training frame) at whole UTC days: the last ``holdout_days`` are held out.

    The cut is the end of the last event's day minus ``holdout_days``, so the holdout is
    exactly ``holdout_days`` whole days, whatever the time of the last event.

    Args:
        events: rows with a ``ts`` column (UTC timestamps).
        holdout_days: how many days at the end form the holdout.

    Returns:
        (train, holdout): rows with ``ts`` before the cut, and from it on, each in time order.
    """
    if events.empty:
        return events.copy(), events.copy()
    order = canonical_order(events)
    ts = pd.to_datetime(order["ts"], utc=True)
    cut = split_time(ts, holdout_days)
    return order[ts < cut].reset_index(drop=True), order[ts >= cut].reset_index(drop=True)


def random_split(events: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per user, a seeded random ``fraction`` of their rows held out (users with one row keep it).

    Returns:
        (train, holdout), each in time order.
    """
    if events.empty:
        return events.copy(), events.copy()
    order = canonical_order(events)
    rng = np.random.default_rng(seed)
    users = order["user_id"].astype(str).to_numpy()
    rank = pd.Series(rng.random(len(order))).groupby(users).rank(method="first").to_numpy()
    sizes = pd.Series(users).groupby(users).transform("size").to_numpy()
    held = rank <= np.floor(fraction * sizes)
    return order[~held].reset_index(drop=True), order[held].reset_index(drop=True)


def last_item_split(events: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Leave-last-out: each user's last positive item, and what they did from then on, held out.

    A user's cut is their first positive event on their last positive item after their last
    positive on any other item (several events of one interaction, a click then a view, go
    together); their rows from the cut on form the holdout. Users with a single positive
    item stay in training whole: holding it out would leave nothing to learn them from.

    Returns:
        (train, holdout), each in time order.
    """
    if events.empty:
        return events.copy(), events.copy()
    order = canonical_order(events)
    ts = pd.to_datetime(order["ts"], utc=True)
    user = order["user_id"].astype(str)
    item = order["item_id"].astype(str)
    positive = order["event_type"].astype(str).isin(POSITIVE_EVENT_TYPES).to_numpy()
    pos = pd.DataFrame({"user": user[positive], "item": item[positive], "ts": ts[positive]})
    if pos.empty:
        return order, order.iloc[0:0].copy()
    last_item = pos.groupby("user")["item"].last()  # rows are in time order
    pos = pos.assign(last=pos["user"].map(last_item))
    on_last = pos["item"] == pos["last"]
    last_other = pos[~on_last].groupby("user")["ts"].max()  # users with one item have none
    later = pos[on_last].assign(after=pos.loc[on_last, "user"].map(last_other))
    later = later[later["after"].notna() & (later["ts"] > later["after"])]
    cut = later.groupby("user")["ts"].min()
    user_cut = user.map(cut)
    held = (user_cut.notna() & (ts >= user_cut)).to_numpy()
    return order[~held].reset_index(drop=True), order[held].reset_index(drop=True)


def split_by(events: pd.DataFrame, split: str, config: EvaluationConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, holdout) by one named split with ``config``'s parameters."""
    if split == "random":
        return random_split(events, config.holdout_fraction, config.split_seed)
    if split == "last_item":
        return last_item_split(events)
    if split == "time":
        return time_split(events, config.holdout_days)
    raise ValueError(f"evaluation.split must be one of {', '.join(SPLITS)}; got {split!r}")


def positive_pairs(frame: pd.DataFrame) -> pd.DataFrame:
    """Distinct (user_id, item_id) pairs with a positive event, as strings."""
    pos = frame[frame["event_type"].astype(str).isin(POSITIVE_EVENT_TYPES)]
    return pd.DataFrame(
        {"user_id": pos["user_id"].astype(str), "item_id": pos["item_id"].astype(str)}
    ).drop_duplicates()


def decidable_users(train: pd.DataFrame, holdout: pd.DataFrame) -> int:
    """Users the evaluation can score: a holdout positive on an item they had none with in training."""
    held, seen = positive_pairs(holdout), positive_pairs(train)
    fresh = held.merge(seen, on=["user_id", "item_id"], how="left", indicator=True)
    return int(fresh.loc[fresh["_merge"] == "left_only", "user_id"].nunique())


@dataclass(frozen=True)
class SplitChoice:
    """The split the gate reads, and why: the one asked for, or the fallback from a small one."""

    requested: str
    used: str
    users: dict[str, int] = field(default_factory=dict)  # split -> users it would evaluate
    min_users: int = 0
    note: str | None = None  # set when the requested split was too small (or every one was)

    @property
    def decides(self) -> bool:
        """True when the split used holds at least ``min_users`` users."""
        return self.users.get(self.used, 0) >= self.min_users

    def as_dict(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "used": self.used,
            "users": dict(self.users),
            "min_users": self.min_users,
            "decides": self.decides,
            "note": self.note,
        }


def choose_split(
    events: pd.DataFrame, config: EvaluationConfig
) -> tuple[pd.DataFrame, pd.DataFrame, SplitChoice]:
    """The requested split, or the first fallback (last_item, then random) that can decide.

    Args:
        events: the whole frame (events or the feature layer's training frame).
        config: the ``evaluation`` section (``split``, its parameters, ``min_holdout_users``).

    Returns:
        (train, holdout, choice).
    """
    order = [config.split, *(s for s in ("last_item", "random") if s != config.split)]
    users: dict[str, int] = {}
    frames: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {}
    for split in order:
        frames[split] = split_by(events, split, config)
        users[split] = decidable_users(*frames[split])
        if users[split] >= config.min_holdout_users:
            break
    minimum = config.min_holdout_users
    decided = [s for s in users if users[s] >= minimum]
    if decided and decided[0] == config.split:
        return *frames[config.split], SplitChoice(config.split, config.split, users, minimum)
    if decided:
        used = decided[0]
        note = (
            f"the {config.split} holdout has {users[config.split]} users with a relevant item, fewer "
            f"than min_holdout_users={minimum}: too small to decide; fell back to {used} "
            f"({users[used]} users)"
        )
    else:
        used = max(users, key=lambda s: (users[s], s == config.split))
        note = (
            f"no split reaches min_holdout_users={minimum} ("
            + ", ".join(f"{s}: {n}" for s, n in users.items())
            + f" users); evaluated on {used}, the largest: the verdict rests on few users"
        )
    return *frames[used], SplitChoice(config.split, used, users, minimum, note)


def split_holdout(events: pd.DataFrame, config: EvaluationConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, holdout) as ``evaluation.split`` says, falling back when it is too small to decide."""
    train, holdout, _ = choose_split(events, config)
    return train, holdout


@dataclass(frozen=True)
class ValidationChoice:
    """The split the serving choices are tuned on, carved from the gate's training part."""

    train: pd.DataFrame
    holdout: pd.DataFrame
    how: str  # a sentence for the report
    held_out_from_models: bool  # False when the models trained on these events too


def held_out_pairs(frame: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """Rows whose (user, item) pair falls in a seeded ``fraction`` of all pairs: a random
    validation carve that every step draws alike, row by row, with no shared state.

    A pair is in or out whatever else the frame holds, so the retriever's positives, the
    ranker's examples and the evaluation's events of one pair land on the same side, and about
    ``fraction`` of each user's items are held out.
    """
    if fraction <= 0 or frame.empty:
        return np.zeros(len(frame), dtype=bool)
    pairs = frame[["user_id", "item_id"]].astype(str)
    key = f"{seed:016d}"[-16:]  # hash_pandas_object's key is 16 characters
    hashed = pd.util.hash_pandas_object(pairs, index=False, hash_key=key).to_numpy(dtype=np.uint64)
    return hashed < np.uint64(fraction * float(2**64 - 1))


def validation_split(
    train_frame: pd.DataFrame, fraction: float, min_users: int, how: str = "time", seed: int = 0
) -> ValidationChoice:
    """The part of the training part's positives training held out, cut as training cut it.

    ``how="random"`` (``training.validation_split``): the seeded pairs of ``held_out_pairs``.
    ``how="time"``: the last ``fraction`` of the positives, by time.

    Training holds out the last ``training.validation_fraction`` of its positives (first
    positive per user and item, by time) for early stopping; cutting at the same moment gives
    a validation split the models did not learn from. Without such a fraction, or when it
    holds fewer than ``min_users`` users, each user's last item of the training part is used
    instead (the models saw it: the report says so).
    """
    if how == "random" and fraction > 0:
        held_mask = held_out_pairs(train_frame, fraction, seed)
        fit, held = train_frame[~held_mask], train_frame[held_mask]
        users = decidable_users(fit, held)
        if users >= min_users:
            how_text = (
                f"a random {fraction:.0%} of the training part's (user, item) pairs (seed {seed}), "
                f"held out of training: {users} users"
            )
            return ValidationChoice(canonical_order(fit), canonical_order(held), how_text, True)
    pos = positive_pairs_in_time(train_frame)
    if how == "time" and fraction > 0 and len(pos) >= 2:
        cut_at = min(max(int(round(len(pos) * (1 - fraction))), 1), len(pos) - 1)
        cut = pos["ts"].iloc[cut_at]
        ts = pd.to_datetime(train_frame["ts"], utc=True)
        fit, held = train_frame[ts < cut], train_frame[ts >= cut]
        users = decidable_users(fit, held)
        if users >= min_users:
            how = (
                f"the last {fraction:.0%} of the training part's positives (from {cut.isoformat()}), "
                f"held out of training for early stopping: {users} users"
            )
            return ValidationChoice(canonical_order(fit), canonical_order(held), how, True)
    fit, held = last_item_split(train_frame)
    how = (
        f"each user's last item of the training part ({decidable_users(fit, held)} users); the "
        f"models trained on these events (training.validation_fraction={fraction} held out too few)"
    )
    return ValidationChoice(fit, held, how, False)


def positive_pairs_in_time(frame: pd.DataFrame) -> pd.DataFrame:
    """First positive event per (user, item), in time order: the retriever's examples."""
    pos = frame[frame["event_type"].astype(str).isin(POSITIVE_EVENT_TYPES)]
    pos = pos.assign(ts=pd.to_datetime(pos["ts"], utc=True))
    keys = ["ts", "event_id"] if "event_id" in pos.columns else ["ts"]
    pos = pos.sort_values(keys, kind="stable").drop_duplicates(["user_id", "item_id"], keep="first")
    return pos.reset_index(drop=True)
