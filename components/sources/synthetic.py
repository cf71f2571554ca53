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

from recsys.contracts import AGE_BUCKETS, DEVICES
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


def generate(params: GenerateParams) -> dict[str, pd.DataFrame]:
    """Build users, items and events frames that follow the data contracts."""
    rng = np.random.default_rng(params.seed)
    end = to_utc(params.end_date)
    start = end - pd.Timedelta(days=params.days)
    period_s = float(params.days * 86400)
    categories = list(CATEGORY_WORDS)
    n_cat = len(categories)
    latent_dim = 8

    # --- users: demographics shape the category prior -----------------------------------
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
    user_latent = rng.normal(0, 1, size=(n_u, latent_dim)) / np.sqrt(latent_dim)
    activity = rng.lognormal(mean=0.0, sigma=1.0, size=n_u)
    late_user = rng.random(n_u) < params.late_user_fraction
    # Early users signed up before the period; late ones during it.
    signup_offset = np.where(
        late_user, rng.uniform(0.0, period_s, n_u), -rng.uniform(0, 365 * 86400.0, n_u)
    )
    device_of_user = rng.choice(len(DEVICES) - 1, size=n_u, p=[0.55, 0.3, 0.1, 0.05])
    users = pd.DataFrame(
        {
            "user_id": _ids("u", n_u),
            "age_bucket": np.array(AGE_BUCKETS[:6])[age_idx],
            "country": np.array(COUNTRIES)[country_idx],
            "signup_source": np.array(SIGNUP_SOURCES)[rng.choice(len(SIGNUP_SOURCES), size=n_u)],
            "signup_ts": start + pd.to_timedelta(np.round(signup_offset), unit="s"),
        }
    )

    # --- items: categories, text, Zipf popularity, publication over time ----------------
    n_i = params.items
    primary = rng.choice(n_cat, size=n_i, p=rng.dirichlet(np.full(n_cat, 5.0)))
    has_second = rng.random(n_i) < 0.3
    second = (primary + rng.integers(1, n_cat, size=n_i)) % n_cat
    pop_rank = rng.permutation(n_i) + 1
    popularity = 1.0 / pop_rank**1.05
    item_latent = rng.normal(0, 1, size=(n_i, latent_dim)) / np.sqrt(latent_dim)
    late_item = rng.random(n_i) < params.late_item_fraction
    publish_offset = np.where(
        late_item, rng.uniform(0.0, period_s, n_i), -rng.uniform(0, 730 * 86400.0, n_i)
    )
    titles, descriptions = _item_text(rng, primary, np.where(has_second, second, -1), categories)
    category = np.array(categories, dtype=object)[primary]
    category = np.where(
        has_second, category + "|" + np.array(categories, dtype=object)[second], category
    )
    items = pd.DataFrame(
        {
            "item_id": _ids("i", n_i),
            "title": titles,
            "category": category,
            "description": descriptions,
            "in_stock": rng.random(n_i) < 0.95,
            "published_ts": start + pd.to_timedelta(np.round(publish_offset), unit="s"),
        }
    )

    # --- sessions ------------------------------------------------------------------------
    # Each impression is one request slot; about 1 in 4 leads to more events, so aim the
    # number of impressions at the requested event volume.
    target_events = params.events_per_user_day * n_u * params.days
    n_impressions = max(1, int(target_events / 1.6))
    session_len_mean = 8.0
    n_sessions = max(1, int(n_impressions / session_len_mean))
    s_user = rng.choice(n_u, size=n_sessions, p=activity / activity.sum())
    active_from = np.maximum(signup_offset[s_user], 0.0)
    s_start = active_from + rng.random(n_sessions) * (period_s - active_from)
    # Sessions cluster in the evening: shift the hour of day towards 19:00 local-ish.
    s_start = s_start - (s_start % 86400) + _diurnal_seconds(rng, n_sessions)
    s_start = np.clip(s_start, active_from, period_s - 3600)
    s_len = 1 + rng.poisson(session_len_mean - 1, size=n_sessions)
    s_device = np.where(
        rng.random(n_sessions) < 0.85,
        device_of_user[s_user],
        rng.choice(len(DEVICES) - 1, size=n_sessions),
    )

    # --- impressions: category by taste, item by popularity within the category ---------
    imp_session = np.repeat(np.arange(n_sessions), s_len)
    imp_pos = np.arange(len(imp_session)) - np.repeat(np.cumsum(s_len) - s_len, s_len)
    imp_user = s_user[imp_session]
    imp_ts = s_start[imp_session] + imp_pos * EVENT_GAP_SECONDS * 3
    # Mostly taste-driven, partly trending (global popularity): that keeps a popularity
    # baseline honest without making it unbeatable.
    cum_taste = np.cumsum(taste, axis=1)
    r = rng.random(len(imp_user))[:, None]
    imp_cat = np.minimum((cum_taste[imp_user] < r).sum(axis=1), n_cat - 1)
    trending = rng.random(len(imp_user)) < 0.15
    imp_item = np.empty(len(imp_user), dtype=np.int64)
    for c in range(n_cat):
        members = np.flatnonzero((primary == c) | (has_second & (second == c)))
        rows = np.flatnonzero(imp_cat == c)
        if members.size == 0:
            members = np.arange(n_i)
        w = np.cumsum(popularity[members])
        picks = np.searchsorted(w, rng.random(rows.size) * w[-1])
        imp_item[rows] = members[np.minimum(picks, members.size - 1)]
    w_all = np.cumsum(popularity)
    trend_rows = np.flatnonzero(trending)
    imp_item[trend_rows] = np.minimum(
        np.searchsorted(w_all, rng.random(trend_rows.size) * w_all[-1]), n_i - 1
    )
    # An item cannot be shown before it is published.
    shown = imp_ts >= publish_offset[imp_item]
    imp_session, imp_user, imp_item, imp_ts = (
        imp_session[shown],
        imp_user[shown],
        imp_item[shown],
        imp_ts[shown],
    )

    # --- outcomes: affinity drives clicks, dwell, carts, purchases and ratings ------------
    cat_affinity = np.log(taste[imp_user, primary[imp_item]] + 1e-3)
    latent_affinity = np.einsum("ij,ij->i", user_latent[imp_user], item_latent[imp_item])
    affinity = 0.8 * cat_affinity + 2.5 * latent_affinity
    p_click = _sigmoid(-0.2 + affinity)
    click = rng.random(affinity.size) < p_click
    view = click & (rng.random(affinity.size) < 0.9)
    dwell = np.round(rng.lognormal(3.0 + 0.6 * np.tanh(affinity), 0.6), 1)
    cart = view & (rng.random(affinity.size) < 0.25 * _sigmoid(affinity))
    purchase = cart & (rng.random(affinity.size) < 0.5)
    rate = view & (rng.random(affinity.size) < 0.3)
    stars = np.clip(
        np.round(3.2 + 1.4 * np.tanh(affinity + 0.5) + rng.normal(0, 0.6, affinity.size)), 1, 5
    )
    like = view & (rng.random(affinity.size) < 0.15 * _sigmoid(2 * affinity))
    dislike = click & ~like & (rng.random(affinity.size) < 0.1 * _sigmoid(-2 * affinity))
    skip = ~click & (rng.random(affinity.size) < 0.1)

    kinds = [
        ("impression", np.ones_like(click), np.full(click.size, np.nan), 0),
        ("skip", skip, np.full(click.size, np.nan), 1),
        ("click", click, np.full(click.size, np.nan), 1),
        ("view", view, dwell, 2),
        ("like", like, np.full(click.size, np.nan), 3),
        ("dislike", dislike, np.full(click.size, np.nan), 3),
        ("rating", rate, stars, 4),
        ("add_to_cart", cart, np.full(click.size, np.nan), 5),
        ("purchase", purchase, np.full(click.size, np.nan), 6),
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
                    "offset": imp_ts[idx] + step * EVENT_GAP_SECONDS / 4,
                }
            )
        )
    ev = pd.concat(parts, ignore_index=True)
    ev = ev[ev["offset"] < period_s].sort_values(["offset", "imp", "event_type"], kind="stable")
    ev = ev.reset_index(drop=True)
    imp = ev["imp"].to_numpy()
    session_global = imp_session[imp]
    users_of = imp_user[imp]
    session_ids = _ids("s", n_sessions)
    # One request shows a page of up to 10 items; outcomes carry the impression's request.
    page = _positions_within(imp_session, imp_ts)[imp] // 10
    events = pd.DataFrame(
        {
            "event_id": _ids("e", len(ev)),
            "user_id": users["user_id"].to_numpy()[users_of],
            "item_id": items["item_id"].to_numpy()[imp_item[imp]],
            "event_type": ev["event_type"].to_numpy(),
            "value": ev["value"].to_numpy(),
            "ts": start + pd.to_timedelta(np.round(ev["offset"].to_numpy(), 3), unit="s"),
            "session_id": session_ids[session_global],
            "device": np.array(DEVICES)[s_device[session_global]],
            "request_id": pd.Series(session_ids[session_global])
            .str.cat(pd.Series(page).astype(str), sep="-r")
            .to_numpy(),
        }
    )
    return {"users": users, "items": items, "events": events}


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


def _positions_within(groups: np.ndarray, order_key: np.ndarray) -> np.ndarray:
    """Rank of each row inside its group (groups are contiguous and already ordered)."""
    del order_key
    starts = np.r_[0, np.flatnonzero(np.diff(groups)) + 1]
    lengths = np.diff(np.r_[starts, groups.size])
    return np.arange(groups.size) - np.repeat(starts, lengths)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
