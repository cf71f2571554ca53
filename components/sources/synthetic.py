"""A seeded synthetic source with the structure real interaction data has.

What the models can learn from it, and why it is built this way:

* Users have a taste over categories (a Dirichlet draw around a prior that depends on their
  age bucket and country, so demographics carry signal) and a small latent vector that
  captures taste *within* categories.
* Items have one or two categories; their titles and descriptions are drawn mostly from
  their categories' vocabularies, so text alone places a new item near its peers. Each
  item has a Zipf-like popularity rank and a latent vector.
* Users come back in sessions. In a session they are shown items (impressions) drawn from
  their categories by popularity; they click with a probability that grows with their
  affinity for the item; clicks lead to views with dwell time, some to carts and
  purchases, some to ratings that follow the same affinity.
* A fraction of users sign up and of items are published late in the period, so a
  time-based holdout holds genuinely new users and items (cold start is real).

Everything is vectorized in NumPy and driven by one seed: the same arguments give
byte-identical Parquet files.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.contracts import AGE_BUCKETS, CATEGORY_SEPARATOR, DEVICES
from recsys.storage import write_data_folder
from recsys.timeutil import to_utc

CATEGORY_WORDS: dict[str, list[str]] = {
    "electronics": "gadget wireless battery charger screen smart digital audio bluetooth portable".split(),
    "books": "novel story author chapter hardcover paperback mystery saga edition literary".split(),
    "fashion": "cotton jacket dress denim leather style fit summer collection linen".split(),
    "sports": "running training ball fitness outdoor team trail bike racket gym".split(),
    "home": "kitchen sofa lamp cozy ceramic table storage decor pillow rug".split(),
    "beauty": "skin serum glow fragrance lotion matte lipstick care hydrating natural".split(),
    "toys": "puzzle kids building play plush colorful game blocks robot fun".split(),
    "grocery": "organic coffee snack tea spice fresh pasta sauce chocolate honey".split(),
    "music": "album vinyl guitar live acoustic band jazz piano concert record".split(),
    "movies": "film director drama comedy thriller cinema action scene cast blu-ray".split(),
    "garden": "plant seed soil flower pot garden hose pruning lawn bloom".split(),
    "automotive": "car engine tire oil motor wiper brake dashboard garage tuning".split(),
    "pets": "dog cat leash treat collar aquarium kibble chew toy feline".split(),
    "games": "console controller quest level rpg multiplayer strategy arcade shooter pixel".split(),
    "travel": "luggage backpack passport flight trip suitcase adapter map hostel journey".split(),
    "health": "vitamin protein supplement yoga wellness sleep herbal mineral balance immune".split(),
}
GENERIC_WORDS = "new classic premium best value edition pro mini max essential".split()
COUNTRIES = ("US", "GB", "DE", "FR", "IN", "BR", "JP", "ES")
SIGNUP_SOURCES = ("organic", "ads", "referral", "social", "email")
EVENT_GAP_SECONDS = 20.0


@dataclass(frozen=True)
class GenerateParams:
    users: int
    items: int
    days: int
    seed: int
    end_date: datetime
    events_per_user_day: float = 1.2
    late_user_fraction: float = 0.15
    late_item_fraction: float = 0.2


LATENT_DIM = 8
SESSION_LEN_MEAN = 8.0


@dataclass(frozen=True)
class _Period:
    """The generated span: events fall in ``[start, start + seconds)``; offsets are seconds."""

    start: pd.Timestamp
    seconds: float


@dataclass(frozen=True)
class _Users:
    frame: pd.DataFrame
    taste: np.ndarray  # [U, C] category preferences, rows sum to 1
    latent: np.ndarray  # [U, LATENT_DIM] taste within categories
    activity: np.ndarray  # [U] relative number of sessions
    signup_offset: np.ndarray  # [U] seconds from the period's start (negative: before it)
    device: np.ndarray  # [U] index into DEVICES of the usual device


@dataclass(frozen=True)
class _Items:
    frame: pd.DataFrame
    primary: np.ndarray  # [I] index of the primary category
    has_second: np.ndarray  # [I] bool
    second: np.ndarray  # [I] index of the second category (meaningful where has_second)
    popularity: np.ndarray  # [I] Zipf-like weight
    latent: np.ndarray  # [I, LATENT_DIM]
    publish_offset: np.ndarray  # [I] seconds from the period's start


@dataclass(frozen=True)
class _Sessions:
    user: np.ndarray  # [S] index of the user
    start: np.ndarray  # [S] seconds from the period's start
    length: np.ndarray  # [S] impressions in the session
    device: np.ndarray  # [S] index into DEVICES


@dataclass(frozen=True)
class _Impressions:
    session: np.ndarray  # [N] index of the session
    user: np.ndarray  # [N] index of the user
    item: np.ndarray  # [N] index of the item
    offset: np.ndarray  # [N] seconds from the period's start


def generate(params: GenerateParams) -> dict[str, pd.DataFrame]:
    """Build users, items and events frames that follow the data contracts."""
    # One generator drawn from in a fixed order: the order of the phases is part of the output.
    rng = np.random.default_rng(params.seed)
    end = to_utc(params.end_date)
    period = _Period(start=end - pd.Timedelta(days=params.days), seconds=float(params.days * 86400))
    categories = list(CATEGORY_WORDS)
    users = _draw_users(rng, params, period, len(categories))
    items = _draw_items(rng, params, period, categories)
    sessions = _draw_sessions(rng, params, period, users)
    shown = _draw_impressions(rng, sessions, users, items)
    outcomes = _draw_outcomes(rng, shown, users, items, period)
    events = _events_frame(outcomes, shown, sessions, users, items, period)
    return {"users": users.frame, "items": items.frame, "events": events}


def _draw_users(rng: np.random.Generator, params: GenerateParams, period: _Period, n_cat: int) -> _Users:
    """Users whose demographics shape their category prior; early ones signed up before the period."""
    n_u = params.users
    age_idx = rng.choice(6, size=n_u, p=[0.08, 0.22, 0.28, 0.2, 0.13, 0.09])
    country_idx = rng.choice(
        len(COUNTRIES), size=n_u, p=[0.3, 0.12, 0.12, 0.1, 0.14, 0.1, 0.07, 0.05]
    )
    age_pref = rng.dirichlet(np.full(n_cat, 0.5), size=6)
    country_pref = rng.dirichlet(np.full(n_cat, 1.0), size=len(COUNTRIES))
    prior = 0.7 * age_pref[age_idx] + 0.3 * country_pref[country_idx]
    # Concentrated tastes (total concentration ~2): most users care for two or three categories.
    taste = np.vstack([rng.dirichlet(0.05 + 2.0 * p) for p in prior])
    latent = rng.normal(0, 1, size=(n_u, LATENT_DIM)) / np.sqrt(LATENT_DIM)
    activity = rng.lognormal(mean=0.0, sigma=1.0, size=n_u)
    late_user = rng.random(n_u) < params.late_user_fraction
    signup_offset = np.where(
        late_user, rng.uniform(0.0, period.seconds, n_u), -rng.uniform(0, 365 * 86400.0, n_u)
    )
    device = rng.choice(len(DEVICES) - 1, size=n_u, p=[0.55, 0.3, 0.1, 0.05])
    frame = pd.DataFrame(
        {
            "user_id": _ids("u", n_u),
            "age_bucket": np.array(AGE_BUCKETS[:6])[age_idx],
            "country": np.array(COUNTRIES)[country_idx],
            "signup_source": np.array(SIGNUP_SOURCES)[rng.choice(len(SIGNUP_SOURCES), size=n_u)],
            "signup_ts": period.start + pd.to_timedelta(np.round(signup_offset), unit="s"),
        }
    )
    return _Users(frame, taste, latent, activity, signup_offset, device)


def _draw_items(
    rng: np.random.Generator, params: GenerateParams, period: _Period, categories: list[str]
) -> _Items:
    """Items with one or two categories, text from their categories, Zipf popularity, publication times."""
    n_i, n_cat = params.items, len(categories)
    primary = rng.choice(n_cat, size=n_i, p=rng.dirichlet(np.full(n_cat, 5.0)))
    has_second = rng.random(n_i) < 0.3
    second = (primary + rng.integers(1, n_cat, size=n_i)) % n_cat
    pop_rank = rng.permutation(n_i) + 1
    popularity = 1.0 / pop_rank**1.05
    latent = rng.normal(0, 1, size=(n_i, LATENT_DIM)) / np.sqrt(LATENT_DIM)
    late_item = rng.random(n_i) < params.late_item_fraction
    publish_offset = np.where(
        late_item, rng.uniform(0.0, period.seconds, n_i), -rng.uniform(0, 730 * 86400.0, n_i)
    )
    titles, descriptions = _item_text(rng, primary, np.where(has_second, second, -1), categories)
    names = np.array(categories, dtype=object)
    category = np.where(has_second, names[primary] + CATEGORY_SEPARATOR + names[second], names[primary])
    frame = pd.DataFrame(
        {
            "item_id": _ids("i", n_i),
            "title": titles,
            "category": category,
            "description": descriptions,
            "in_stock": rng.random(n_i) < 0.95,
            "published_ts": period.start + pd.to_timedelta(np.round(publish_offset), unit="s"),
        }
    )
    return _Items(frame, primary, has_second, second, popularity, latent, publish_offset)


def _draw_sessions(
    rng: np.random.Generator, params: GenerateParams, period: _Period, users: _Users
) -> _Sessions:
    """Sessions of active users, mostly in the evening, mostly on the user's usual device."""
    # Each impression is one request slot; about 1 in 4 leads to more events, so aim the
    # number of impressions at the requested event volume.
    target_events = params.events_per_user_day * params.users * params.days
    n_impressions = max(1, int(target_events / 1.6))
    n_sessions = max(1, int(n_impressions / SESSION_LEN_MEAN))
    user = rng.choice(params.users, size=n_sessions, p=users.activity / users.activity.sum())
    active_from = np.maximum(users.signup_offset[user], 0.0)
    start = active_from + rng.random(n_sessions) * (period.seconds - active_from)
    # Sessions cluster in the evening: shift the hour of day towards 19:00 local-ish.
    start = start - (start % 86400) + _diurnal_seconds(rng, n_sessions)
    start = np.clip(start, active_from, period.seconds - 3600)
    length = 1 + rng.poisson(SESSION_LEN_MEAN - 1, size=n_sessions)
    device = np.where(
        rng.random(n_sessions) < 0.85,
        users.device[user],
        rng.choice(len(DEVICES) - 1, size=n_sessions),
    )
    return _Sessions(user, start, length, device)


def _draw_impressions(
    rng: np.random.Generator, sessions: _Sessions, users: _Users, items: _Items
) -> _Impressions:
    """Impressions: a category by the user's taste, an item by popularity within it."""
    n_cat, n_i = users.taste.shape[1], len(items.primary)
    session = np.repeat(np.arange(len(sessions.user)), sessions.length)
    session_first = np.repeat(np.cumsum(sessions.length) - sessions.length, sessions.length)
    position = np.arange(len(session)) - session_first
    user = sessions.user[session]
    offset = sessions.start[session] + position * EVENT_GAP_SECONDS * 3
    # Mostly taste-driven, partly trending (global popularity): that keeps a popularity
    # baseline honest without making it unbeatable.
    cum_taste = np.cumsum(users.taste, axis=1)
    r = rng.random(len(user))[:, None]
    category = np.minimum((cum_taste[user] < r).sum(axis=1), n_cat - 1)
    trending = rng.random(len(user)) < 0.15
    item = np.empty(len(user), dtype=np.int64)
    for c in range(n_cat):
        members = np.flatnonzero((items.primary == c) | (items.has_second & (items.second == c)))
        rows = np.flatnonzero(category == c)
        if members.size == 0:
            members = np.arange(n_i)
        w = np.cumsum(items.popularity[members])
        picks = np.searchsorted(w, rng.random(rows.size) * w[-1])
        item[rows] = members[np.minimum(picks, members.size - 1)]
    w_all = np.cumsum(items.popularity)
    trend_rows = np.flatnonzero(trending)
    item[trend_rows] = np.minimum(np.searchsorted(w_all, rng.random(trend_rows.size) * w_all[-1]), n_i - 1)
    # An item cannot be shown before it is published.
    shown = offset >= items.publish_offset[item]
    return _Impressions(session[shown], user[shown], item[shown], offset[shown])


def _draw_outcomes(
    rng: np.random.Generator, shown: _Impressions, users: _Users, items: _Items, period: _Period
) -> pd.DataFrame:
    """What followed each impression, driven by affinity: one row per event, in time order.

    Columns: ``imp`` (the impression's row in ``shown``), ``event_type``, ``value`` and
    ``offset`` (seconds from the period's start); events past the period's end are dropped.
    """
    cat_affinity = np.log(users.taste[shown.user, items.primary[shown.item]] + 1e-3)
    latent_affinity = np.einsum("ij,ij->i", users.latent[shown.user], items.latent[shown.item])
    affinity = 0.8 * cat_affinity + 2.5 * latent_affinity
    n = affinity.size
    click = rng.random(n) < _sigmoid(-0.2 + affinity)
    view = click & (rng.random(n) < 0.9)
    dwell = np.round(rng.lognormal(3.0 + 0.6 * np.tanh(affinity), 0.6), 1)
    cart = view & (rng.random(n) < 0.25 * _sigmoid(affinity))
    purchase = cart & (rng.random(n) < 0.5)
    rate = view & (rng.random(n) < 0.3)
    stars = np.clip(np.round(3.2 + 1.4 * np.tanh(affinity + 0.5) + rng.normal(0, 0.6, n)), 1, 5)
    like = view & (rng.random(n) < 0.15 * _sigmoid(2 * affinity))
    dislike = click & ~like & (rng.random(n) < 0.1 * _sigmoid(-2 * affinity))
    skip = ~click & (rng.random(n) < 0.1)

    no_value = np.full(n, np.nan)
    # (event type, which impressions it follows, its value, its step after the impression)
    kinds = [
        ("impression", np.ones_like(click), no_value, 0),
        ("skip", skip, no_value, 1),
        ("click", click, no_value, 1),
        ("view", view, dwell, 2),
        ("like", like, no_value, 3),
        ("dislike", dislike, no_value, 3),
        ("rating", rate, stars, 4),
        ("add_to_cart", cart, no_value, 5),
        ("purchase", purchase, no_value, 6),
    ]
    parts = []
    for name, mask, value, step in kinds:
        idx = np.flatnonzero(mask)
        parts.append(
            pd.DataFrame(
                {
                    "imp": idx,
                    "event_type": name,
                    "value": value[idx],
                    "offset": shown.offset[idx] + step * EVENT_GAP_SECONDS / 4,
                }
            )
        )
    ev = pd.concat(parts, ignore_index=True)
    ev = ev[ev["offset"] < period.seconds].sort_values(["offset", "imp", "event_type"], kind="stable")
    return ev.reset_index(drop=True)


def _events_frame(
    outcomes: pd.DataFrame,
    shown: _Impressions,
    sessions: _Sessions,
    users: _Users,
    items: _Items,
    period: _Period,
) -> pd.DataFrame:
    """The events table: ids, the session's device, and the request (page) of each impression."""
    imp = outcomes["imp"].to_numpy()
    session_of = shown.session[imp]
    session_ids = _ids("s", len(sessions.user))
    # One request shows a page of up to 10 items; outcomes carry the impression's request.
    page = _positions_within(shown.session)[imp] // 10
    request_ids = pd.Series(session_ids[session_of]).str.cat(pd.Series(page).astype(str), sep="-r")
    return pd.DataFrame(
        {
            "event_id": _ids("e", len(outcomes)),
            "user_id": users.frame["user_id"].to_numpy()[shown.user[imp]],
            "item_id": items.frame["item_id"].to_numpy()[shown.item[imp]],
            "event_type": outcomes["event_type"].to_numpy(),
            "value": outcomes["value"].to_numpy(),
            "ts": period.start + pd.to_timedelta(np.round(outcomes["offset"].to_numpy(), 3), unit="s"),
            "session_id": session_ids[session_of],
            "device": np.array(DEVICES)[sessions.device[session_of]],
            "request_id": request_ids.to_numpy(),
        }
    )


def generate_to_folder(params: GenerateParams, out_dir: Path) -> dict[str, Any]:
    """Generate and write a data folder (users/, items/, events/, manifest.json)."""
    frames = generate(params)
    return write_data_folder(
        frames,
        out_dir,
        extra={
            "source": "synthetic",
            "params": {
                "users": params.users,
                "items": params.items,
                "days": params.days,
                "seed": params.seed,
                "end_date": params.end_date.isoformat(),
                "events_per_user_day": params.events_per_user_day,
            },
            "period": {
                "start": (params.end_date - timedelta(days=params.days)).isoformat(),
                "end": params.end_date.isoformat(),
            },
        },
    )


def _ids(prefix: str, n: int) -> np.ndarray:
    width = max(1, len(str(max(n - 1, 0))))
    return np.char.add(prefix, np.char.zfill(np.arange(n).astype(str), width)).astype(object)


def _item_text(
    rng: np.random.Generator, primary: np.ndarray, second: np.ndarray, categories: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Titles of 3 words and descriptions of 12, drawn mostly from the item's categories."""
    n = primary.size
    vocab = np.array([CATEGORY_WORDS[c] for c in categories], dtype=object)  # (C, 10)
    generic = np.array(GENERIC_WORDS, dtype=object)
    sec = np.where(second >= 0, second, primary)

    def words(k: int, p_own: float) -> np.ndarray:
        own_cat = np.where(rng.random((n, k)) < 0.75, primary[:, None], sec[:, None])
        w = vocab[own_cat, rng.integers(0, vocab.shape[1], size=(n, k))]
        noise = vocab[
            rng.integers(0, len(categories), size=(n, k)),
            rng.integers(0, vocab.shape[1], size=(n, k)),
        ]
        filler = generic[rng.integers(0, generic.size, size=(n, k))]
        u = rng.random((n, k))
        return np.where(u < p_own, w, np.where(u < p_own + 0.1, noise, filler))

    t = words(3, 0.7)
    d = words(12, 0.6)
    titles = pd.Series([" ".join(row).title() for row in t]).to_numpy(dtype=object)
    descriptions = pd.Series([" ".join(row) for row in d]).to_numpy(dtype=object)
    return titles, descriptions


def _diurnal_seconds(rng: np.random.Generator, n: int) -> np.ndarray:
    hour = np.clip(rng.normal(19.0, 4.0, size=n), 0, 23.5)
    return hour * 3600.0


def _positions_within(groups: np.ndarray) -> np.ndarray:
    """Rank of each row inside its group (groups are contiguous and already ordered)."""
    starts = np.r_[0, np.flatnonzero(np.diff(groups)) + 1]
    lengths = np.diff(np.r_[starts, groups.size])
    return np.arange(groups.size) - np.repeat(starts, lengths)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
