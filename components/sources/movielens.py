"""Import a MovieLens set (ml-100k, ml-1m or ml-latest-small) into the data contracts.

The layout is detected from its ratings file (``u.data``, ``ratings.dat``, ``ratings.csv``)
and mapped as follows:

* events: one ``rating`` event per rating row, ``event_id = ml-{user}-{item}``, the source
  ids kept as strings, ``value`` the stars, ``ts`` from the unix seconds. A user's ratings
  are cut into sessions ``ml-{user}-s{n}`` (n from 1) wherever more than 30 minutes pass
  between two of them. MovieLens has no devices or served requests: ``device`` is
  "unknown" and ``request_id`` null.
* users: every user of the users file plus any user seen only in ratings. ``age_bucket``
  from the age (ml-100k) or the age code (ml-1m), ``country`` "US" for users of a set with
  zip codes, ``signup_source`` "movielens", ``signup_ts`` the first rating (the earliest
  rating of the whole file for a user who rated nothing), ``gender`` and ``occupation``
  where the set has them (ml-1m occupation codes become the names of its README).
* items: every item of the items file plus any item seen only in ratings (``item {id}``,
  category "unknown"). ``category`` is the genres joined by "|" ("unknown" if none);
  ``description`` names the genres and, for ml-latest-small, up to 20 distinct tags, most
  frequent first. ``published_ts`` is the release date (ml-100k) or Jan 1 of the title's
  year, capped at the item's first rating; without either, the first rating.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.contracts import AGE_BUCKETS, CATEGORY_SEPARATOR
from recsys.storage import write_data_folder

SESSION_GAP_SECONDS = 30 * 60
MAX_TAGS = 20
UNKNOWN = "unknown"

# Ratings file -> layout; the first match wins, in this order.
MARKERS = {"u.data": "ml-100k", "ratings.dat": "ml-1m", "ratings.csv": "ml-latest-small"}

# ml-1m README: users.dat's age is the lower end of a range. 50 means "50-55": most of it
# falls into 45-54, so it goes there rather than to 55+.
ML1M_AGE_BUCKETS = {
    1: "<18",
    18: "18-24",
    25: "25-34",
    35: "35-44",
    45: "45-54",
    50: "45-54",
    56: "55+",
}
ML1M_OCCUPATIONS = (
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
)


def detect_layout(path: Path) -> str:
    """The MovieLens layout held by folder ``path``: "ml-100k", "ml-1m" or "ml-latest-small"."""
    path = Path(path)
    for marker, layout in MARKERS.items():
        if (path / marker).is_file():
            return layout
    looked_for = ", ".join(f"{marker} ({layout})" for marker, layout in MARKERS.items())
    raise ValueError(f"no MovieLens ratings file in {path}: looked for {looked_for}")


def import_movielens(path: Path, out_dir: Path) -> dict[str, Any]:
    """Convert the MovieLens set in ``path`` to users/items/events under ``out_dir``.

    Returns the manifest written by ``write_data_folder``.
    """
    path = Path(path)
    frames = load_movielens(path)
    layout = frames.pop("layout")
    return write_data_folder(
        frames,
        Path(out_dir),
        extra={"source": "movielens", "layout": layout, "input": str(path)},
    )


def load_movielens(path: Path) -> dict[str, Any]:
    """The contract frames of the set in ``path`` plus its ``layout``, without writing them."""
    path = Path(path)
    layout = detect_layout(path)
    loader = {"ml-100k": _read_100k, "ml-1m": _read_1m, "ml-latest-small": _read_latest}[layout]
    ratings, movies, users, tags = loader(path)
    if ratings.empty:
        raise ValueError(f"{path}: the {layout} ratings file holds no ratings")
    events = _events(ratings)
    return {
        "layout": layout,
        "users": _users(users, ratings),
        "items": _items(movies, ratings, tags),
        "events": events,
    }


# --- readers: each returns ratings, movies, users (or None), tags (or None) ----------------
# ratings: user, item (str), rating (float), ts (int unix seconds)
# movies: item, title, genres ("|"-joined, "" when none), release (UTC timestamp or NaT)
# users: user, age_bucket, gender, occupation, country


def _require(path: Path, name: str) -> Path:
    f = path / name
    if not f.is_file():
        raise ValueError(f"{path}: {name} is missing (needed beside the ratings file)")
    return f


def _read_100k(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, None]:
    ratings = pd.read_csv(
        path / "u.data",
        sep="\t",
        header=None,
        names=["user", "item", "rating", "ts"],
        dtype={"user": str, "item": str, "rating": "float64", "ts": "int64"},
    )
    genre_table = pd.read_csv(
        _require(path, "u.genre"),
        sep="|",
        header=None,
        names=["name", "index"],
        dtype={"name": str, "index": "int64"},
        encoding="latin-1",
    ).sort_values("index")
    genre_names = genre_table["name"].tolist()
    raw = pd.read_csv(
        _require(path, "u.item"),
        sep="|",
        header=None,
        names=["item", "title", "release", "video_release", "url", *genre_names],
        dtype=str,
        encoding="latin-1",
        quoting=csv.QUOTE_NONE,
        keep_default_na=False,
    )
    flags = raw[genre_names].astype("int64").astype(bool)
    # The "unknown" genre flag means "no genre": it must not become a category of its own
    # next to real ones, and an item with only it ends up "unknown" anyway.
    suffixes = np.array([g + CATEGORY_SEPARATOR if g != UNKNOWN else "" for g in genre_names], dtype=object)
    genres = pd.Series(flags.to_numpy() @ suffixes if len(raw) else [], index=raw.index)
    movies = pd.DataFrame(
        {
            "item": raw["item"],
            "title": raw["title"],
            "genres": genres.astype(str).str.rstrip(CATEGORY_SEPARATOR),
            "release": pd.to_datetime(raw["release"], format="%d-%b-%Y", errors="coerce", utc=True),
        }
    )
    u = pd.read_csv(
        _require(path, "u.user"),
        sep="|",
        header=None,
        names=["user", "age", "gender", "occupation", "zip"],
        dtype={"user": str, "age": "float64", "gender": str, "occupation": str, "zip": str},
        encoding="latin-1",
        quoting=csv.QUOTE_NONE,
    )
    users = pd.DataFrame(
        {
            "user": u["user"],
            "age_bucket": _age_bucket(u["age"]),
            "gender": u["gender"],
            "occupation": u["occupation"],
            "country": "US",
        }
    )
    return ratings, movies, users, None


def _read_1m(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, None]:
    # "::" as a separator forces pandas' slow Python engine; splitting on ":" with the C
    # engine and keeping every other field is exact for files of numbers and zip codes.
    try:
        ratings = pd.read_csv(
            path / "ratings.dat",
            sep=":",
            header=None,
            usecols=[0, 2, 4, 6],
            names=["user", "_1", "item", "_2", "rating", "_3", "ts"],
            dtype={"user": str, "item": str, "rating": "float64", "ts": "int64"},
        )
    except pd.errors.EmptyDataError:
        ratings = pd.DataFrame({"user": [], "item": [], "rating": [], "ts": []})
    # Titles contain ":" (e.g. "Star Wars: Episode IV"), so movies.dat is split on "::".
    lines = _require(path, "movies.dat").read_text(encoding="latin-1").splitlines()
    parts = [line.split("::", 2) for line in lines if line.strip()]
    raw = pd.DataFrame(parts, columns=["item", "title", "genres"], dtype=str)
    movies = pd.DataFrame(
        {
            "item": raw["item"],
            "title": raw["title"],
            "genres": raw["genres"].fillna(""),
            "release": pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns, UTC]"),
        }
    )
    u = pd.read_csv(
        _require(path, "users.dat"),
        sep=":",
        header=None,
        usecols=[0, 2, 4, 6, 8],
        names=["user", "_1", "gender", "_2", "age", "_3", "occupation", "_4", "zip"],
        dtype={"user": str, "gender": str, "age": "Int64", "occupation": "Int64", "zip": str},
        encoding="latin-1",
    )
    occupation = u["occupation"].map(dict(enumerate(ML1M_OCCUPATIONS)))
    users = pd.DataFrame(
        {
            "user": u["user"],
            "age_bucket": u["age"].map(ML1M_AGE_BUCKETS).fillna(UNKNOWN),
            "gender": u["gender"],
            "occupation": occupation,
            "country": "US",
        }
    )
    return ratings, movies, users, None


def _read_latest(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, None, pd.DataFrame | None]:
    ratings = pd.read_csv(
        path / "ratings.csv",
        dtype={"userId": str, "movieId": str, "rating": "float64", "timestamp": "int64"},
    ).rename(columns={"userId": "user", "movieId": "item", "timestamp": "ts"})
    raw = pd.read_csv(_require(path, "movies.csv"), dtype=str, keep_default_na=False)
    genres = raw["genres"].where(raw["genres"] != "(no genres listed)", "")
    movies = pd.DataFrame(
        {
            "item": raw["movieId"],
            "title": raw["title"],
            "genres": genres,
            "release": pd.Series(pd.NaT, index=raw.index, dtype="datetime64[ns, UTC]"),
        }
    )
    tags = None
    if (path / "tags.csv").is_file():
        tags = pd.read_csv(path / "tags.csv", dtype={"userId": str, "movieId": str, "tag": str})
        tags = tags.rename(columns={"movieId": "item"})[["item", "tag"]]
    return ratings, movies, None, tags


# --- mapping to the contracts -------------------------------------------------------------


def _age_bucket(age: pd.Series) -> pd.Series:
    labels = list(AGE_BUCKETS[:-1])  # the last one is "unknown"
    bucket = pd.cut(age, bins=[-np.inf, 18, 25, 35, 45, 55, np.inf], right=False, labels=labels)
    return bucket.astype(object).where(bucket.notna(), UNKNOWN)


def _utc(seconds: pd.Series) -> pd.Series:
    return pd.to_datetime(seconds.astype("int64"), unit="s", utc=True)


def _events(ratings: pd.DataFrame) -> pd.DataFrame:
    r = ratings.sort_values(["user", "ts"], kind="stable").reset_index(drop=True)
    user = r["user"].to_numpy()
    ts = r["ts"].to_numpy(dtype="int64")
    new_session = np.ones(len(r), dtype=bool)
    new_session[1:] = (user[1:] != user[:-1]) | (np.diff(ts) > SESSION_GAP_SECONDS)
    session_n = pd.Series(new_session).groupby(user).cumsum()
    return pd.DataFrame(
        {
            "event_id": "ml-" + r["user"] + "-" + r["item"],
            "user_id": r["user"],
            "item_id": r["item"],
            "event_type": "rating",
            "value": r["rating"].astype("float64"),
            "ts": _utc(r["ts"]),
            "session_id": "ml-" + r["user"] + "-s" + session_n.astype(str),
            "device": "unknown",
            "request_id": None,
        }
    )


def _users(users: pd.DataFrame | None, ratings: pd.DataFrame) -> pd.DataFrame:
    first = ratings.groupby("user", sort=False)["ts"].min()
    if users is None:
        users = pd.DataFrame(columns=["user", "age_bucket", "gender", "occupation", "country"])
    only_rated = first.index.difference(pd.Index(users["user"]))
    extra = pd.DataFrame(
        {
            "user": only_rated,
            "age_bucket": UNKNOWN,
            "gender": None,
            "occupation": None,
            "country": UNKNOWN,
        }
    )
    allu = pd.concat([users, extra], ignore_index=True) if len(extra) else users
    # A user who never rated has no activity to date the signup by; the start of the file's
    # ratings is the earliest moment the set vouches for.
    signup = allu["user"].map(first).fillna(ratings["ts"].min())
    return pd.DataFrame(
        {
            "user_id": allu["user"].astype(str),
            "age_bucket": allu["age_bucket"],
            "country": allu["country"],
            "signup_source": "movielens",
            "signup_ts": _utc(signup),
            "gender": allu["gender"],
            "occupation": allu["occupation"],
        }
    ).reset_index(drop=True)


def _items(movies: pd.DataFrame, ratings: pd.DataFrame, tags: pd.DataFrame | None) -> pd.DataFrame:
    first = ratings.groupby("item", sort=False)["ts"].min()
    only_rated = first.index.difference(pd.Index(movies["item"]))
    extra = pd.DataFrame(
        {
            "item": only_rated,
            "title": [f"item {i}" for i in only_rated],
            "genres": "",
            "release": pd.Series(pd.NaT, index=range(len(only_rated)), dtype="datetime64[ns, UTC]"),
        }
    )
    allm = pd.concat([movies, extra], ignore_index=True) if len(extra) else movies
    genres = allm["genres"].fillna("").str.strip()
    category = genres.where(genres != "", UNKNOWN)
    named = "Genres: " + genres.str.replace(CATEGORY_SEPARATOR, ", ", regex=False) + "."
    description = named.where(genres != "", "Genres not listed.")
    if tags is not None and not tags.empty:
        tag_text = allm["item"].map(_tag_text(tags))
        description = description.where(tag_text.isna(), description + " Tags: " + tag_text + ".")

    year = allm["title"].str.extract(r".*\((\d{4})\)", expand=False)
    from_title = pd.to_datetime(year + "-01-01", format="%Y-%m-%d", errors="coerce", utc=True)
    first_ts = _utc(allm["item"].map(first).fillna(ratings["ts"].min()))
    rated = allm["item"].isin(first.index)
    published = allm["release"].fillna(from_title).fillna(first_ts)
    # A movie cannot have been rated before it existed: the first rating bounds the date.
    published = published.where(~rated | (published <= first_ts), first_ts)
    return pd.DataFrame(
        {
            "item_id": allm["item"].astype(str),
            "title": allm["title"],
            "category": category,
            "description": description,
            "in_stock": True,
            "published_ts": published,
        }
    ).reset_index(drop=True)


def _tag_text(tags: pd.DataFrame) -> pd.Series:
    """Per item: its distinct lower-cased tags, most frequent first, at most ``MAX_TAGS``."""
    t = pd.DataFrame({"item": tags["item"], "tag": tags["tag"].str.strip().str.lower()})
    t = t[t["tag"].notna() & (t["tag"] != "")]
    counts = t.groupby(["item", "tag"]).size().rename("n").reset_index()
    # Ties in frequency go alphabetically so the same input always reads the same.
    counts = counts.sort_values(["item", "n", "tag"], ascending=[True, False, True])
    top = counts.groupby("item", sort=False).head(MAX_TAGS)
    return top.groupby("item", sort=False)["tag"].agg(", ".join)
