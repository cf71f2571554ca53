"""Model input rows for given users and items, computed from a validated data folder.

Serving reads features from the Feast online store; batch jobs that run beside the
pipeline (``recsys recommend``, push's warm-up requests) read the same values straight from
validated data, as of the data's last event, with the feature layer's own functions
(``components.features.tables``), so a feature means the same thing in every path.

A model states its inputs by name and dtype (the training manifest's ``query_inputs``,
``candidate_inputs``, ``ranker_inputs``). Each name is looked up among the user's and the
item's features (profile and attributes, engagement and popularity counts over the
trailing windows its name carries, recent items, context); a name with no value (an
unknown user, a feature this data cannot give) gets the feature layer's default: "" for
text, 0 for numbers, False for flags. An unknown user id stays as it is, so the model's
out-of-vocabulary embedding answers for it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.training.train import features_from_frame
from recsys.config import FeaturesConfig
from recsys.item_ages import frame_ages
from recsys.storage import read_table
from recsys.timeutil import to_utc

_WINDOW = re.compile(r"^(?:user|item)_[a-z]+_(\d+)d$")


@dataclass
class FeatureSource:
    """Per-user and per-item feature frames as of ``as_of`` (indexed by id), plus events."""

    users: pd.DataFrame
    items: pd.DataFrame
    events: pd.DataFrame
    as_of: pd.Timestamp


def _windows(names: Sequence[str], config: FeaturesConfig) -> list[int]:
    found = {int(m.group(1)) for n in names if (m := _WINDOW.match(n))}
    return sorted(found | set(config.windows_days))


def load_feature_source(
    config: FeaturesConfig, data_dir: Path, names: Sequence[str] = (), as_of: pd.Timestamp | None = None
) -> FeatureSource:
    """Read a validated data folder and compute every user's and item's features at ``as_of``.

    Args:
        config: the ``features`` section (windows, recent-items length).
        data_dir: a validated data folder (users/, items/, events/).
        names: feature names the caller will ask for (windows are read from them).
        as_of: the moment features are taken at; default the last event's time.
    """
    from components.features import tables as fl

    users = read_table(data_dir, "users")
    items = read_table(data_dir, "items")
    events = read_table(data_dir, "events")
    for df, key in ((users, "user_id"), (items, "item_id"), (events, "user_id"), (events, "item_id")):
        df[key] = df[key].astype(str)
    if as_of is None:
        as_of = events["ts"].max() if len(events) else pd.Timestamp("1970-01-01", tz="UTC")
    as_of = to_utc(as_of)
    events = events[events["ts"] <= as_of]
    windows = _windows(names, config)

    u = fl.user_profile_table(users).drop(columns=[fl.TIMESTAMP]).set_index("user_id")
    for extra in ("gender", "occupation"):
        if extra in users.columns:
            u[extra] = users.set_index("user_id")[extra].fillna("").astype(str)
    eng = fl.user_engagement_table(events, users, [as_of], windows, carry_in=True)
    u = u.join(eng.drop(columns=[fl.TIMESTAMP]).set_index("user_id"))
    recent = fl.recent_items_table(events, config.recent_items)
    if len(recent):
        u = u.join(recent.groupby("user_id").last().drop(columns=[fl.TIMESTAMP]))
    last = events.sort_values("ts").groupby("user_id").last()
    if len(last):
        u = u.join(last[["device"]].astype(str))
    if len(events):
        # A batch query has no request, hence no hour: the user's usual hour of activity (the
        # most frequent one, earliest on a tie) stands in; the as-of hour for users without one.
        hours = pd.DataFrame({"user_id": events["user_id"], "hour": events["ts"].dt.hour})
        counts = hours.value_counts().rename("n").reset_index()
        usual = counts.sort_values(["user_id", "n", "hour"], ascending=[True, False, True])
        u = u.join(usual.drop_duplicates("user_id").set_index("user_id")["hour"].rename("usual_hour"))

    i = fl.item_attributes_table(items).drop(columns=[fl.TIMESTAMP]).set_index("item_id")
    pop = fl.item_popularity_table(events, items, [as_of], windows, carry_in=True)
    i = i.join(pop.drop(columns=[fl.TIMESTAMP]).set_index("item_id"))
    return FeatureSource(users=u, items=i, events=events, as_of=as_of)


def feature_rows(
    source: FeatureSource,
    inputs: Mapping[str, str],
    user_ids: Sequence[str] | None = None,
    item_ids: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Columns for a model's ``inputs`` ({name: dtype}), one row per user, item or pair.

    Pass ``user_ids`` (a query tower), ``item_ids`` (a candidate tower) or both of the same
    length (a ranker's (user, item) pairs). Context: ``hour`` is the user's usual hour of
    activity (the hour of ``as_of`` for a user without events), ``device`` the user's last
    device; ``recent_item_ages`` are measured at ``as_of`` (``recent_item_ages``).
    """
    n = len(user_ids) if user_ids is not None else len(item_ids or [])
    frames = []
    if user_ids is not None:
        frames.append(source.users.reindex(pd.Index([str(x) for x in user_ids])).reset_index(drop=True))
    if item_ids is not None:
        if len(item_ids) != n:
            raise ValueError(f"{len(item_ids)} item ids for {n} user ids: pairs need equal lengths")
        frames.append(source.items.reindex(pd.Index([str(x) for x in item_ids])).reset_index(drop=True))
    rows = pd.concat(frames, axis=1) if frames else pd.DataFrame(index=range(n))
    if user_ids is not None:
        rows["user_id"] = [str(x) for x in user_ids]
    if item_ids is not None:
        rows["item_id"] = [str(x) for x in item_ids]
    rows["hour"] = source.as_of.hour
    if user_ids is not None and "usual_hour" in rows:
        usual = pd.to_numeric(rows.pop("usual_hour"), errors="coerce")
        rows["hour"] = usual.fillna(source.as_of.hour).astype("int64")
    if user_ids is not None and "recent_item_ages" in inputs:
        rows["recent_item_ages"] = recent_item_ages(rows, source.as_of)
    # The training step's conversion: the same defaults and dtypes the models were trained on.
    return features_from_frame(rows, inputs)


def recent_item_ages(users: pd.DataFrame, as_of: pd.Timestamp) -> list[str]:
    """``recent_item_ages`` of each row of ``users`` (``recent_items``, ``recent_item_times``) at ``as_of``.

    A batch query is answered as of ``as_of``: each recent item's age is the seconds from its
    time to then (``recsys.item_ages``; "-1" where a time is not known). A caller that puts
    other recent items in a row must recompute this for them (``recsys.item_ages.ages_of``).
    """
    blank = pd.Series("", index=users.index, dtype=object)
    items = users["recent_items"] if "recent_items" in users.columns else blank
    times = users["recent_item_times"] if "recent_item_times" in users.columns else blank
    return frame_ages(items, times, pd.Series(to_utc(as_of), index=users.index))


def seen_items(source: FeatureSource) -> dict[str, set[str]]:
    """Items each user has had any event with (shown, clicked, rated...) in the data."""
    ev = source.events
    return {u: set(g) for u, g in ev.groupby("user_id")["item_id"]}


def popular_items(source: FeatureSource) -> list[str]:
    """Item ids by number of positive events, most first (the cold-start fallback order)."""
    from recsys.feature_schema import POSITIVE_EVENT_TYPES

    ev = source.events
    counts = ev[ev["event_type"].astype(str).isin(POSITIVE_EVENT_TYPES)]["item_id"].value_counts()
    rest = [i for i in source.items.index if i not in counts.index]
    return [*counts.index.astype(str), *sorted(rest)]
