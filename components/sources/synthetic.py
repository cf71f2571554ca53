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

Beside the data, ``generate_to_folder`` writes the truth it sampled from (``truth/``: each
user's tastes and latent vector, each item's primary category and latent vector), which no
pipeline step reads. The response model (``affinity_of``, ``draw_responses``) is public, so
the simulator (``components.simulation``) replays users exactly as the data was drawn.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from recsys.contracts import AGE_BUCKETS, CATEGORY_SEPARATOR, DEVICES
from recsys.storage import read_manifest, write_data_folder, write_manifest
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
SHIFT_KINDS = ("tastes", "category_mix")
# Under ``category_mix``, the share of impressions drawn from the shifted mix instead of tastes.
SHIFT_MIX_SHARE = 0.6


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
    # From this day of the period on (0 = its first day) what users want changes; None: never.
    # ``tastes``: each user's category tastes move to other categories (a fixed permutation);
    # what is shown still follows the old tastes (as a model trained before would show it), so
    # responses change. ``category_mix``: what is shown leans to a few categories.
    shift_day: int | None = None
    shift_kind: Literal["tastes", "category_mix"] = "tastes"


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
    frames, _ = generate_with_truth(params)
    return frames


def generate_with_truth(params: GenerateParams) -> tuple[dict[str, pd.DataFrame], SyntheticTruth]:
    """The data frames (as ``generate``) and the truth they were sampled from."""
    rng, period, users, items = _draw_world(params)
    shift = _draw_shift(params, users.taste.shape[1])
    sessions = _draw_sessions(rng, params, period, users)
    shown = _draw_impressions(rng, sessions, users, items, shift)
    outcomes = _draw_outcomes(rng, shown, users, items, period, shift)
    events = _events_frame(outcomes, shown, sessions, users, items, period)
    return {"users": users.frame, "items": items.frame, "events": events}, _truth_of(params, users, items)


def draw_truth(params: GenerateParams) -> SyntheticTruth:
    """The truth ``generate(params)`` samples from, without drawing the events.

    Users and items are the generator's first draws, so this is cheap and exact.
    """
    _, _, users, items = _draw_world(params)
    return _truth_of(params, users, items)


def _draw_world(params: GenerateParams) -> tuple[np.random.Generator, _Period, _Users, _Items]:
    """The seeded generator, the period, and the users and items: the draws every output starts with."""
    # One generator drawn from in a fixed order: the order of the phases is part of the output.
    rng = np.random.default_rng(params.seed)
    end = to_utc(params.end_date)
    period = _Period(start=end - pd.Timedelta(days=params.days), seconds=float(params.days * 86400))
    categories = list(CATEGORY_WORDS)
    users = _draw_users(rng, params, period, len(categories))
    items = _draw_items(rng, params, period, categories)
    return rng, period, users, items


@dataclass(frozen=True)
class _Shift:
    """A change of what users want from ``offset`` seconds into the period on."""

    offset: float
    kind: str
    permutation: np.ndarray  # [C] tastes: the shifted taste of category c is the taste of permutation[c]
    mix: np.ndarray  # [C] category_mix: the shifted category mix (sums to 1)
    seed: int  # of the shift's own draws (which impressions follow the mix)


def _draw_shift(params: GenerateParams, n_cat: int) -> _Shift | None:
    """The shift ``params`` asks for, drawn from its own generator (seeded by the seed), so the
    main draws, and the data before the shift day, are the same as without it."""
    if params.shift_day is None:
        return None
    if params.shift_kind not in SHIFT_KINDS:
        raise ValueError(f"shift_kind={params.shift_kind!r}: expected one of {', '.join(SHIFT_KINDS)}")
    if not 0 <= params.shift_day < params.days:
        raise ValueError(f"shift_day={params.shift_day}: expected a day of the period, 0..{params.days - 1}")
    rng = np.random.default_rng([params.seed, 1])
    # A permutation with no fixed point: every category's taste moves somewhere else.
    permutation = (np.arange(n_cat) + rng.integers(1, n_cat)) % n_cat
    mix = np.full(n_cat, 0.02 / n_cat)
    mix[rng.choice(n_cat, size=3, replace=False)] += 0.98 / 3
    return _Shift(params.shift_day * 86400.0, params.shift_kind, permutation, mix / mix.sum(), params.seed)


def _draw_users(rng: np.random.Generator, params: GenerateParams, period: _Period, n_cat: int) -> _Users:
    """Users whose demographics shape their category prior; early ones signed up before the period."""
    n_u = params.users
    age_idx = rng.choice(6, size=n_u, p=[0.08, 0.22, 0.28, 0.2, 0.13, 0.09])
    country_idx = rng.choice(len(COUNTRIES), size=n_u, p=[0.3, 0.12, 0.12, 0.1, 0.14, 0.1, 0.07, 0.05])
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
    rng: np.random.Generator, sessions: _Sessions, users: _Users, items: _Items, shift: _Shift | None = None
) -> _Impressions:
    """Impressions: a category by the user's taste, an item by popularity within it (from a
    ``category_mix`` shift's day on, partly by the shifted category mix)."""
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
    if shift is not None:
        after = np.flatnonzero(offset >= shift.offset)
        shift_rng = np.random.default_rng([shift.seed, 2])
        if shift.kind == "category_mix":
            mixed = after[shift_rng.random(after.size) < SHIFT_MIX_SHARE]
            category[mixed] = np.minimum(
                np.searchsorted(np.cumsum(shift.mix), shift_rng.random(mixed.size)), n_cat - 1
            )
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
    rng: np.random.Generator,
    shown: _Impressions,
    users: _Users,
    items: _Items,
    period: _Period,
    shift: _Shift | None = None,
) -> pd.DataFrame:
    """What followed each impression, driven by affinity: one row per event, in time order.

    Columns: ``imp`` (the impression's row in ``shown``), ``event_type``, ``value`` and
    ``offset`` (seconds from the period's start); events past the period's end are dropped.
    """
    taste = users.taste[shown.user, items.primary[shown.item]]
    if shift is not None and shift.kind == "tastes":
        # From the shift's day on users respond to their shifted tastes, too.
        after = shown.offset >= shift.offset
        shifted = users.taste[shown.user, shift.permutation[items.primary[shown.item]]]
        taste = np.where(after, shifted, taste)
    affinity = affinity_of(taste, users.latent[shown.user], items.latent[shown.item])
    responses = draw_responses(rng, affinity)
    parts = []
    for name, idx, value, step in responses.events():
        parts.append(
            pd.DataFrame(
                {
                    "imp": idx,
                    "event_type": name,
                    "value": value,
                    "offset": shown.offset[idx] + step * EVENT_GAP_SECONDS / 4,
                }
            )
        )
    ev = pd.concat(parts, ignore_index=True)
    ev = ev[ev["offset"] < period.seconds].sort_values(["offset", "imp", "event_type"], kind="stable")
    return ev.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# The response model: how a user answers an item shown to them. The generator draws the data
# set's outcomes with it and the simulator (``components.simulation``) draws a simulated
# user's answers with it, so both follow one definition.
# --------------------------------------------------------------------------------------------


def affinity_of(taste_of_primary: np.ndarray, user_latent: np.ndarray, item_latent: np.ndarray) -> np.ndarray:
    """How much a user likes an item: their taste for its primary category (log) plus the
    agreement of their latent vectors (taste within categories).

    Args:
        taste_of_primary: the user's taste for the item's primary category, any shape ``S``.
        user_latent: ``S + (LATENT_DIM,)``.
        item_latent: ``S + (LATENT_DIM,)``.
    """
    latent = np.einsum("...j,...j->...", user_latent, item_latent)
    return 0.8 * np.log(taste_of_primary + 1e-3) + 2.5 * latent


@dataclass(frozen=True)
class ResponseOdds:
    """The chances a response is drawn with, per impression, as functions of affinity.

    Each outcome needs the one before it (a view needs a click, a purchase a cart); the
    ``*_given_*`` numbers are conditional on that. Dwell is lognormal; stars are a rounded
    normal clipped to 1..5.
    """

    click: np.ndarray
    cart_given_view: np.ndarray
    like_given_view: np.ndarray
    dislike_given_click_not_like: np.ndarray
    dwell_log_mean: np.ndarray
    stars_mean: np.ndarray
    view_given_click: float = 0.9
    purchase_given_cart: float = 0.5
    rate_given_view: float = 0.3
    skip_given_no_click: float = 0.1
    dwell_log_sd: float = 0.6
    stars_sd: float = 0.6


def response_odds(affinity: np.ndarray) -> ResponseOdds:
    """The response model's chances for impressions of these affinities."""
    return ResponseOdds(
        click=_sigmoid(-0.2 + affinity),
        cart_given_view=0.25 * _sigmoid(affinity),
        like_given_view=0.15 * _sigmoid(2 * affinity),
        dislike_given_click_not_like=0.1 * _sigmoid(-2 * affinity),
        dwell_log_mean=3.0 + 0.6 * np.tanh(affinity),
        stars_mean=3.2 + 1.4 * np.tanh(affinity + 0.5),
    )


@dataclass(frozen=True)
class Responses:
    """What followed each of N impressions: one flag per outcome, dwell seconds and stars."""

    click: np.ndarray
    view: np.ndarray
    dwell: np.ndarray  # seconds, meaningful where ``view``
    cart: np.ndarray
    purchase: np.ndarray
    rate: np.ndarray
    stars: np.ndarray  # 1..5, meaningful where ``rate``
    like: np.ndarray
    dislike: np.ndarray
    skip: np.ndarray

    def events(self) -> list[tuple[str, np.ndarray, np.ndarray, int]]:
        """(event type, impressions it follows, their values, its step after the impression),
        impression first, in the order the generator writes them."""
        n = self.click.size
        no_value = np.full(n, np.nan)
        kinds = [
            ("impression", np.ones_like(self.click), no_value, 0),
            ("skip", self.skip, no_value, 1),
            ("click", self.click, no_value, 1),
            ("view", self.view, self.dwell, 2),
            ("like", self.like, no_value, 3),
            ("dislike", self.dislike, no_value, 3),
            ("rating", self.rate, self.stars, 4),
            ("add_to_cart", self.cart, no_value, 5),
            ("purchase", self.purchase, no_value, 6),
        ]
        out = []
        for name, mask, value, step in kinds:
            idx = np.flatnonzero(mask)
            out.append((name, idx, value[idx], step))
        return out


def draw_responses(rng: np.random.Generator, affinity: np.ndarray) -> Responses:
    """Draw what follows impressions of these affinities (1-D), in the generator's fixed order:
    the same ``rng`` state and affinities give the same responses."""
    odds = response_odds(affinity)
    n = affinity.size
    click = rng.random(n) < odds.click
    view = click & (rng.random(n) < odds.view_given_click)
    dwell = np.round(rng.lognormal(odds.dwell_log_mean, odds.dwell_log_sd), 1)
    cart = view & (rng.random(n) < odds.cart_given_view)
    purchase = cart & (rng.random(n) < odds.purchase_given_cart)
    rate = view & (rng.random(n) < odds.rate_given_view)
    stars = np.clip(np.round(odds.stars_mean + rng.normal(0, odds.stars_sd, n)), 1, 5)
    like = view & (rng.random(n) < odds.like_given_view)
    dislike = click & ~like & (rng.random(n) < odds.dislike_given_click_not_like)
    skip = ~click & (rng.random(n) < odds.skip_given_no_click)
    return Responses(click, view, dwell, cart, purchase, rate, stars, like, dislike, skip)


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
    slot = _positions_within(shown.session)[imp]
    page = slot // 10
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
            # Every event of an impression carries its rank on the page, as served traffic does.
            "position": (slot % 10).astype(np.float64),
        }
    )


def generate_to_folder(params: GenerateParams, out_dir: Path) -> dict[str, Any]:
    """Generate and write a data folder (users/, items/, events/, manifest.json), and beside
    it the truth the data was sampled from (``truth/``, see ``write_truth``)."""
    frames, truth = generate_with_truth(params)
    manifest = write_data_folder(
        frames,
        out_dir,
        extra={
            "source": "synthetic",
            "params": _params_record(params),
            "period": {
                "start": (params.end_date - timedelta(days=params.days)).isoformat(),
                "end": params.end_date.isoformat(),
            },
        },
    )
    write_truth(truth, Path(out_dir) / TRUTH_FOLDER)
    return manifest


def _params_record(params: GenerateParams) -> dict[str, Any]:
    record: dict[str, Any] = {
        "users": params.users,
        "items": params.items,
        "days": params.days,
        "seed": params.seed,
        "end_date": params.end_date.isoformat(),
        "events_per_user_day": params.events_per_user_day,
    }
    if params.shift_day is not None:  # absent without a shift: those manifests stay as they were
        record["shift"] = {"day": params.shift_day, "kind": params.shift_kind}
    return record


# --------------------------------------------------------------------------------------------
# The truth: what the data was sampled from. Written beside the data, never read by training.
# --------------------------------------------------------------------------------------------

# The truth's folder inside a data folder: ingest and validation read only users/, items/ and
# events/, so nothing in the pipeline trains on it.
TRUTH_FOLDER = "truth"
TRUTH_KIND = "synthetic"
# Names the response model (``affinity_of`` + ``draw_responses``); bump it when they change, so
# a truth written by an older generator is refused rather than misread.
RESPONSE_MODEL = "synthetic-affinity-v1"


@dataclass(frozen=True)
class SyntheticTruth:
    """The latent state the generator sampled users' responses from.

    A user answers an item shown to them by ``draw_responses(rng, affinity)`` with
    ``affinity = affinity_of(taste[u, primary[i]], user_latent[u], item_latent[i])``.
    """

    categories: tuple[str, ...]
    user_ids: np.ndarray  # [U] str
    taste: np.ndarray  # [U, C] category preferences, rows sum to 1
    user_latent: np.ndarray  # [U, LATENT_DIM]
    item_ids: np.ndarray  # [I] str
    item_primary: np.ndarray  # [I] index into ``categories``
    item_latent: np.ndarray  # [I, LATENT_DIM]
    item_published_ts: pd.Series  # [I] UTC timestamps
    item_in_stock: np.ndarray  # [I] bool
    params: dict[str, Any]


def _truth_of(params: GenerateParams, users: _Users, items: _Items) -> SyntheticTruth:
    return SyntheticTruth(
        categories=tuple(CATEGORY_WORDS),
        user_ids=users.frame["user_id"].to_numpy(dtype=object),
        taste=users.taste,
        user_latent=users.latent,
        item_ids=items.frame["item_id"].to_numpy(dtype=object),
        item_primary=items.primary,
        item_latent=items.latent,
        item_published_ts=items.frame["published_ts"].reset_index(drop=True),
        item_in_stock=items.frame["in_stock"].to_numpy(dtype=bool),
        params={
            **_params_record(params),
            "late_user_fraction": params.late_user_fraction,
            "late_item_fraction": params.late_item_fraction,
        },
    )


def write_truth(truth: SyntheticTruth, out_dir: Path) -> dict[str, Any]:
    """Write ``users.parquet``, ``items.parquet`` and ``manifest.json`` (last) to ``out_dir``.

    Vectors are float64 lists, so a reader recomputes the generator's affinities exactly.
    """
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    users = pd.DataFrame(
        {"user_id": truth.user_ids, "taste": list(truth.taste), "latent": list(truth.user_latent)}
    )
    items = pd.DataFrame(
        {
            "item_id": truth.item_ids,
            "primary_category": np.asarray(truth.categories, dtype=object)[truth.item_primary],
            "latent": list(truth.item_latent),
            "published_ts": truth.item_published_ts,
            "in_stock": truth.item_in_stock,
        }
    )
    users.to_parquet(out_dir / "users.parquet", index=False)
    items.to_parquet(out_dir / "items.parquet", index=False)
    manifest = {
        "kind": TRUTH_KIND,
        "response_model": RESPONSE_MODEL,
        "categories": list(truth.categories),
        "latent_dim": LATENT_DIM,
        "params": truth.params,
        "rows": {"users": len(users), "items": len(items)},
    }
    write_manifest(out_dir, manifest)
    return manifest


def read_truth(folder: Path) -> SyntheticTruth:
    """The truth ``write_truth`` wrote to ``folder``.

    Raises:
        FileNotFoundError: no finished truth there (no ``manifest.json``).
        ValueError: a truth of another kind or response model, naming it.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    kind, model = manifest.get("kind"), manifest.get("response_model")
    if kind != TRUTH_KIND or model != RESPONSE_MODEL:
        raise ValueError(
            f"{folder}: truth kind={kind!r} response_model={model!r}; this generator reads "
            f"kind={TRUTH_KIND!r} response_model={RESPONSE_MODEL!r}"
        )
    categories = tuple(manifest["categories"])
    users = pd.read_parquet(folder / "users.parquet")
    items = pd.read_parquet(folder / "items.parquet")
    primary = pd.Categorical(items["primary_category"], categories=categories)
    if (primary.codes < 0).any():
        bad = sorted(set(items["primary_category"][primary.codes < 0]))
        raise ValueError(f"{folder}/items.parquet: primary_category {bad} not in the manifest's categories")
    return SyntheticTruth(
        categories=categories,
        user_ids=users["user_id"].astype(str).to_numpy(dtype=object),
        taste=_matrix(users["taste"], len(categories)),
        user_latent=_matrix(users["latent"], LATENT_DIM),
        item_ids=items["item_id"].astype(str).to_numpy(dtype=object),
        item_primary=primary.codes.astype(np.int64),
        item_latent=_matrix(items["latent"], LATENT_DIM),
        item_published_ts=pd.to_datetime(items["published_ts"], utc=True),
        item_in_stock=items["in_stock"].to_numpy(dtype=bool),
        params=dict(manifest.get("params", {})),
    )


def _matrix(column: pd.Series, width: int) -> np.ndarray:
    rows = column.to_list()
    out = np.asarray(rows, dtype=np.float64).reshape(len(rows), -1) if rows else np.zeros((0, width))
    if out.shape[1] != width:
        raise ValueError(f"truth column {column.name}: vectors of length {out.shape[1]}, expected {width}")
    return out


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
