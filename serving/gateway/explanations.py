"""Why an item is shown: a short reason naming what put it in the list, and, when a request
asks (``explain=true``), the ranker inputs that moved its score most.

**Reasons** read what each served item's place came from, with no model call. The
reference is the request's own candidates (what the retriever gave, after filtering): a
driver counts when it makes the item stand out among them.

- The retriever's score of a candidate is the sum of two parts: its *taste* match, the
  cosine of the query and the item's direction, and its *prior*, the item-bias coordinate
  (a learned "how likely anyone picks it", see ``components.training.models``). Against the
  median candidate, whichever part gives the item the larger lead is what lifted it. When
  the prior leads and the item is in fact popular (its positives in the top quarter of the
  candidates'), the reason is popularity: "popular right now". A prior that leads for an
  item nobody engaged with (a new item, whose prior comes from its content) is not called
  popularity. Where the retriever has no prior coordinate, a popular item that matches
  nothing the user did recently is explained by popularity.
- Otherwise the item is there for the user's taste, and the reason names what in the
  user's recent items it matches: the recent item it is near (cosine at least
  ``SIMILAR_REASON_MIN`` and nearer to that item than three quarters of the candidates are:
  a similarity every candidate shares put none of them there), else the category it shares
  with the most recent items, else the model's prediction as such ("picked for you").
- Items placed by a source other than the models (segment or global popularity, cold
  start, exploration) keep the reason their source gave; so does an item the item-to-item
  source placed (its part of the blended candidate score outweighs retrieval's): "often
  taken with" the recent item whose weight to it is largest.

**Attribution** re-scores each item the ranker scored with one input at a time replaced by
its default ("" for text, 0 for numbers: what training saw for "not known",
``components.training.train.features_from_frame``), all of it in one batched call to the
ranker's ``serving_default`` signature (k items x (1 + n inputs) rows). An input's effect is
the ranker's score as served minus the score without it: positive when the input raised
the score. The inputs with the largest effects, by size, are returned.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.gateway.catalog import RetrievalAssets
from serving.gateway.snapshot import Snapshot

# Cosine (item directions, the prior left out) above which "similar to X" can be the story:
# below it the nearest recent item is merely the least far one.
SIMILAR_REASON_MIN = 0.5
# "Stands out among the candidates": at or above this quantile of the request's candidates
# (nearness to a recent item, positives for popularity).
STANDOUT_QUANTILE = 0.75
# Inputs per item in an attribution: the ones that moved the score most.
ATTRIBUTION_TOP = 5

REASON_POPULAR = "popular right now"
REASON_PICKED = "picked for you: predicted to engage you"
REASON_EXPLORING = "new item: exploring"
# What placed an item the ranker did not score, as its attribution names it.
SOURCE_EXPLORATION = "exploration"
SOURCE_ITEM_TO_ITEM = "item_to_item"


def similar_reason(recent_item: str) -> str:
    return f"similar to {recent_item}, which you engaged with"


def also_taken_reason(recent_item: str) -> str:
    return f"often taken with {recent_item}, which you engaged with"


def category_reason(category: str, matching: int, recent: int) -> str:
    return f"in {category}, like {matching} of your {recent} recent items"


# --------------------------------------------------------------------------------------------
# Reasons
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecentTaste:
    """What the user engaged with lately, as reasons read it (newest first).

    Attributes:
        item_ids: the recent items the catalog knows.
        categories: each recent item's categories.
    """

    item_ids: Sequence[str]
    categories: Sequence[frozenset[str]]

    def category_counts(self) -> Counter[str]:
        """How many of the recent items carry each category."""
        return Counter(c for cats in self.categories for c in cats)


@dataclass(frozen=True)
class ItemEvidence:
    """What could have put each of N items in the list, measured against the candidates.

    Attributes:
        similarity: ``[N, R]`` cosine of each item's direction to each recent item's.
        near_cut: ``[R]`` the similarity to each recent item that only the candidates'
            nearest quarter reach (``STANDOUT_QUANTILE``); infinite for a recent item no
            item is near enough to (``SIMILAR_REASON_MIN``), where no cut is needed.
        categories: each item's categories.
        taste_lift: ``[N]`` the retriever's taste part (cosine of query and item) minus the
            median candidate's; NaN where the retriever did not score the item.
        prior_lift: ``[N]`` the item-bias coordinate minus the median candidate's; NaN where
            the retriever has no such coordinate (or did not score the item).
        popular: ``[N]`` the item has positives, as many as the candidates' top quarter.
    """

    similarity: np.ndarray
    near_cut: np.ndarray
    categories: Sequence[frozenset[str]]
    taste_lift: np.ndarray
    prior_lift: np.ndarray
    popular: np.ndarray


def driver_reasons(items: ItemEvidence, recent: RecentTaste) -> list[str]:
    """One reason per item, naming what drove it (the rules: this module's docstring)."""
    taste_counts = recent.category_counts()
    out: list[str] = []
    for i in range(len(items.categories)):
        near = _nearest_standout(items, i)
        shared = _shared_category(items.categories[i], taste_counts)
        if _popularity_drove(items, i, affinity=near is not None or shared is not None):
            out.append(REASON_POPULAR)
        elif near is not None:
            out.append(similar_reason(recent.item_ids[near]))
        elif shared is not None:
            out.append(category_reason(shared, taste_counts[shared], len(recent.item_ids)))
        else:
            out.append(REASON_PICKED)
    return out


def taste_reason(categories: frozenset[str], recent_categories: Sequence[frozenset[str]]) -> str | None:
    """Why the category taste placed an item: its category most of the recent items carry."""
    counts = Counter(c for cats in recent_categories for c in cats)
    shared = _shared_category(categories, counts)
    return None if shared is None else category_reason(shared, counts[shared], len(recent_categories))


def _popularity_drove(items: ItemEvidence, i: int, affinity: bool) -> bool:
    if not items.popular[i]:
        return False
    prior, taste = float(items.prior_lift[i]), float(items.taste_lift[i])
    if math.isfinite(prior):
        # The retriever's own split: the prior leads the median candidate by more than taste does.
        return prior > 0 and prior >= (taste if math.isfinite(taste) else 0.0)
    return not affinity


def _nearest_standout(items: ItemEvidence, i: int) -> int | None:
    """The recent item (index) that item i is near and nearer to than most candidates; None if none."""
    if not items.similarity.shape[1]:
        return None
    sims = items.similarity[i]
    qualifies = (sims >= SIMILAR_REASON_MIN) & (sims >= items.near_cut)
    if not qualifies.any():
        return None
    # Of those, the one the item leads the candidates by most.
    return int(np.argmax(np.where(qualifies, sims - items.near_cut, -np.inf)))


def _shared_category(categories: frozenset[str], taste_counts: Counter[str]) -> str | None:
    """The item's category that most of the recent items carry (ties: by name); None if none."""
    shared = [(taste_counts[c], c) for c in categories if taste_counts[c] > 0]
    if not shared:
        return None
    return min(shared, key=lambda t: (-t[0], t[1]))[1]


def gather_evidence(
    snap: Snapshot,
    assets: RetrievalAssets,
    positions: np.ndarray,
    recent_pos: np.ndarray,
    pool_pos: np.ndarray,
    pool_scores: np.ndarray,
) -> tuple[ItemEvidence, RecentTaste]:
    """Evidence for the items at catalog ``positions``, against the request's candidates.

    Args:
        snap: the snapshot serving the request.
        assets: the retrieval version whose space and prior are read.
        positions: the items to explain.
        recent_pos: the user's recent items, newest first.
        pool_pos: the candidates the retriever gave (after filtering), catalog positions.
        pool_scores: their retrieval scores (the dot product: taste + prior), not the ranker's.
    """
    catalog = snap.catalog
    n = len(positions)
    recent_unit = snap.unit_rows(assets, recent_pos)
    # One [items x recent] product for the list and one [candidates x recent] for the cut.
    similarity = snap.unit_rows(assets, positions) @ recent_unit.T
    # The cut only matters for a recent item some listed item is near enough to; the others'
    # stays infinite (no listed item can qualify for it). The candidates' quantile per recent
    # item is the largest cost of a request's reasons.
    near_cut = np.full(len(recent_pos), np.inf, dtype=similarity.dtype)
    needed = np.flatnonzero((similarity >= SIMILAR_REASON_MIN).any(axis=0))
    if len(pool_pos) and len(needed):
        pool_similarity = snap.unit_rows(assets, pool_pos) @ recent_unit.T
        # Each recent item's candidates in a sorted row: the same quantile values (they depend
        # only on the order statistics), and about half the time of NumPy's many-kth partition.
        lanes = np.sort(pool_similarity[:, needed].T, axis=1)
        near_cut[needed] = quantile_of_sorted(lanes, STANDOUT_QUANTILE)
    taste_lift, prior_lift = np.full(n, np.nan), np.full(n, np.nan)
    popular = np.zeros(n, dtype=bool)
    if len(pool_pos) and n:
        rows = _last_index_of(pool_pos, positions)
        found = rows >= 0
        prior = item_prior(snap, assets, pool_pos)
        taste = np.asarray(pool_scores, dtype=np.float64) - np.nan_to_num(prior)
        taste_lift[found] = taste[rows[found]] - median_of(taste)
        known_prior = prior[~np.isnan(prior)]
        if len(known_prior):
            prior_lift[found] = prior[rows[found]] - median_of(known_prior)
        positives = catalog.positives[positions]
        pool_positives = np.sort(catalog.positives[pool_pos])
        popular = (positives > 0) & (positives >= quantile_of_sorted(pool_positives, STANDOUT_QUANTILE))
    items = ItemEvidence(
        similarity=similarity,
        near_cut=near_cut,
        categories=[catalog.category_sets[p] for p in positions],
        taste_lift=taste_lift,
        prior_lift=prior_lift,
        popular=popular,
    )
    recent = RecentTaste(
        item_ids=[str(catalog.item_ids[p]) for p in recent_pos],
        categories=[catalog.category_sets[p] for p in recent_pos],
    )
    return items, recent


def quantile_of_sorted(rows: np.ndarray, q: float) -> Any:
    """``np.quantile(rows, q, axis=-1)`` (its default, linear method) of rows already sorted along
    their last axis, each non-empty and without NaN: the same values, read off the order
    statistics with NumPy's own interpolation, without its ~40 us of Python per call (a
    request's reasons took four such calls)."""
    n = rows.shape[-1]
    # As NumPy does for a Python float q: the index and weight in double precision, the weight
    # then a Python float, which NumPy's arithmetic takes in the rows' own float type.
    virtual = (n - 1) * q
    lo = math.floor(virtual)
    below, above = rows[..., lo], rows[..., min(lo + 1, n - 1)]
    t = virtual - lo
    diff = above - below
    return above - diff * (1 - t) if t >= 0.5 else below + diff * t


def median_of(values: np.ndarray) -> float:
    """``np.median`` of a non-empty 1-D array (NaN when it holds one), by one partition."""
    n = len(values)
    if np.isnan(values).any():
        return math.nan
    half = n // 2
    if n % 2:
        return float(np.partition(values, half)[half])
    part = np.partition(values, [half - 1, half])
    return float(np.mean(part[half - 1 : half + 1]))


def _last_index_of(pool: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """For each of ``positions``, the index of its last occurrence in ``pool`` (-1: absent)."""
    hits = np.asarray(positions, dtype=np.int64)[:, None] == np.asarray(pool, dtype=np.int64)[None, :]
    last = len(pool) - 1 - np.argmax(hits[:, ::-1], axis=1)
    return np.where(hits.any(axis=1), last, -1).astype(np.int64)


def item_prior(snap: Snapshot, assets: RetrievalAssets, positions: np.ndarray) -> np.ndarray:
    """The item-bias coordinate of each position in ``assets`` (NaN: no such coordinate, or
    an item the version lacks). ``unit`` dropped that last coordinate iff the model has it."""
    out = np.full(len(positions), np.nan)
    if assets.unit.shape[1] != assets.embeddings.shape[1] - 1:
        return out
    rows = snap.to_version[assets.version][positions]
    known = rows >= 0
    out[known] = assets.embeddings[rows[known], -1]
    return out


# --------------------------------------------------------------------------------------------
# Attribution: leave one input out
# --------------------------------------------------------------------------------------------


def input_default(dtype: str, like: Any = None) -> Any:
    """The value a missing input takes: "" for text (bytes when the column holds bytes), 0."""
    if dtype == "string":
        return b"" if isinstance(like, bytes) else ""
    return 0


def leave_one_out_rows(
    columns: Mapping[str, np.ndarray], inputs: Mapping[str, str]
) -> tuple[dict[str, np.ndarray], list[str], np.ndarray]:
    """One batch for k pair rows: the rows as served, then for each input the k rows with it
    at its default, so that row ``(1 + g) * k + j`` is item j without input g.

    Args:
        columns: one pair row per item (every input, k rows each).
        inputs: input name -> dtype, the model's inputs.

    Returns:
        The batch's columns ((1 + n) * k rows), the inputs in block order, and ``[n, k]``
        True where item j's input g already holds its default (removing it changes nothing).
    """
    names = [name for name in inputs if name in columns]
    k = len(columns[names[0]]) if names else 0
    batch: dict[str, np.ndarray] = {}
    at_default = np.zeros((len(names), k), dtype=bool)
    for g, name in enumerate(names):
        col = columns[name]
        default = input_default(inputs[name], col[0] if k else None)
        tiled = np.concatenate([col] * (len(names) + 1))
        tiled[(g + 1) * k : (g + 2) * k] = default
        batch[name] = tiled
        at_default[g] = [v in ("", b"") for v in col] if inputs[name] == "string" else col == 0
    return batch, names, at_default


def attributions(
    scores: np.ndarray, names: Sequence[str], at_default: np.ndarray, top: int = ATTRIBUTION_TOP
) -> list[list[dict[str, Any]]]:
    """Per item, the ``top`` inputs by size of effect, largest first.

    Args:
        scores: the ranker's scores of a ``leave_one_out_rows`` batch ((1 + n) * k).
        names: the inputs in block order.
        at_default: ``[n, k]`` inputs that already held their default (left out: no effect).
        top: how many inputs per item.

    Returns:
        For each of the k items, ``{"kind": "input", "name": ..., "effect": ...}`` entries,
        ``effect`` = score as served - score with the input at its default.
    """
    n, k = at_default.shape
    grid = np.asarray(scores, dtype=np.float64).reshape(n + 1, k)
    effects = grid[0][None, :] - grid[1:]  # [n, k]
    out: list[list[dict[str, Any]]] = []
    for j in range(k):
        ranked = sorted(
            (g for g in range(n) if not at_default[g, j]), key=lambda g: (-abs(effects[g, j]), names[g])
        )
        out.append(
            [
                {"kind": "input", "name": names[g], "effect": round(float(effects[g, j]), 6)}
                for g in ranked[:top]
            ]
        )
    return out


def source_attribution(source: str) -> list[dict[str, Any]]:
    """The attribution of an item the ranker did not score: the source that placed it."""
    return [{"kind": "source", "name": source, "effect": None}]
