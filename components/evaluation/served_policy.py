"""The served system, replayed offline: what the gateway would have shown each evaluated user.

The gateway answers a warm user with: ``gateway.candidates`` retrieved items, joined (when
the serving policy gives the item-to-item source a share) by the ``gateway.neighbour_candidates``
items the user's recent items point to, ordered by the blended score (and, where the policy
gives it a share, by how well each fits the categories of the user's recent items); the business
rules (in stock, excluded categories) and the user's seen items filtered out; every survivor
scored by the ranker and fused with its retrieval rank (``recsys.ranking.rank_fusion``, at
the weight of the version's serving policy); MMR over the top ``mmr_depth``; and
``exploration_slots`` new items placed from ``exploration_position`` on. ``Replay`` holds
one evaluation set's candidates and scores (the ranker runs once per set), and
``Replay.lists`` builds the lists of any policy from them with the kernel's own functions,
so the grid of fusion weights costs no extra model calls.

Two differences from the gateway, both on purpose: retrieval is exact (the index is tuned to
a recall target and measured in its own step), and every evaluated user takes the model path
(the gateway routes users with fewer than ``cold_start_min_events`` events to popularity and
content neighbours; their numbers are the ``new_users`` slice).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from recsys.config import GatewayConfig
from recsys.contracts import CATEGORY_SEPARATOR
from recsys.neighbours import ItemNeighbours
from recsys.ranking import (
    blend_sources,
    category_taste,
    insert_exploration,
    mmr,
    rank_fusion,
    sample_positions,
    session_feedback,
    union_candidates,
    unit_directions,
)

BATCH = 8192  # (user, item) pairs per ranker call


@dataclass(frozen=True)
class Step:
    """One served system: the fusion weight (inf: ranker off), MMR on/off, exploration on/off,
    the item-to-item source's share of the candidate score (0: retrieval's candidates alone)
    and the category taste's share after it (0: none)."""

    weight: float
    mmr: bool
    explore: bool
    blend: float = 0.0
    taste: float = 0.0


def business_rules(items_frame: pd.DataFrame, item_ids: np.ndarray, gateway: GatewayConfig) -> np.ndarray:
    """The gateway's base mask over ``item_ids``: in stock (when asked) and no excluded category.

    An item the catalog table lacks stays allowed, as the gateway keeps an item without an
    attributes row recommendable until the next materialization.
    """
    frame = items_frame.assign(item_id=items_frame["item_id"].astype(str)).drop_duplicates("item_id")
    frame = frame.set_index("item_id").reindex(pd.Index(item_ids, dtype=object))
    allowed = np.ones(len(item_ids), dtype=bool)
    if gateway.exclude_out_of_stock and "in_stock" in frame.columns:
        allowed &= (
            frame["in_stock"].astype(object).where(frame["in_stock"].notna(), True).astype(bool).to_numpy()
        )
    if gateway.excluded_categories and "category" in frame.columns:
        excluded = set(gateway.excluded_categories)
        cats = frame["category"].fillna("").astype(str)
        allowed &= ~cats.map(lambda c: bool(excluded & set(c.split(CATEGORY_SEPARATOR)))).to_numpy(dtype=bool)
    return allowed


def new_item_mask(
    items_frame: pd.DataFrame,
    train_frame: pd.DataFrame,
    item_ids: np.ndarray,
    as_of: pd.Timestamp,
    new_item_days: int,
    window_days: int = 30,
) -> np.ndarray:
    """The gateway's exploration pool as of ``as_of``: items never shown nor engaged with in the
    last ``window_days``, or published within ``new_item_days`` of the newest item then."""
    ts = pd.to_datetime(train_frame["ts"], utc=True)
    recent = train_frame[(ts >= as_of - pd.Timedelta(days=window_days)) & (ts < as_of)]
    shown = set(recent["item_id"].astype(str))
    published = pd.to_datetime(
        items_frame.assign(item_id=items_frame["item_id"].astype(str))
        .drop_duplicates("item_id")
        .set_index("item_id")["published_ts"]
        .reindex(pd.Index(item_ids, dtype=object)),
        utc=True,
    )
    known = published[published < as_of]
    fresh = np.zeros(len(item_ids), dtype=bool)
    if len(known):
        fresh = (
            (published >= known.max() - pd.Timedelta(days=new_item_days)).fillna(False).to_numpy(dtype=bool)
        )
    unseen = np.array([i not in shown for i in item_ids], dtype=bool)
    return unseen | fresh


@dataclass
class Replay:
    """One evaluation set's served candidates and their scores, from which any policy's lists follow.

    Attributes:
        users: the evaluated users, in order.
        item_ids: the catalog, in embedding order.
        candidates: user -> catalog positions the gateway would rank (retrieved, then filtered),
            in retrieval order.
        retrieval: user -> those candidates' retrieval scores.
        ranker: user -> those candidates' ranker scores (None when no ranker was scored).
        unit: the items' unit directions (MMR's similarity).
        allowed: the business rules mask; a user's seen items are removed per user.
        seen: user -> catalog positions of their training positives.
        new_items: catalog positions of the exploration pool.
        gateway: the gateway's policy settings (depths, MMR trade-off, exploration slots).
        k: list length built (the largest K the metrics read).
        seed: exploration draws are seeded by (seed, user id).
    """

    users: list[str]
    item_ids: np.ndarray
    candidates: dict[str, np.ndarray]
    retrieval: dict[str, np.ndarray]
    ranker: dict[str, np.ndarray] | None
    unit: np.ndarray
    allowed: np.ndarray
    seen: dict[str, np.ndarray]
    new_items: np.ndarray
    gateway: GatewayConfig
    k: int
    seed: int
    # user -> ranker scores of items scored beside the candidates (``retriever_ranker``'s head).
    extra_scores: dict[str, dict[str, float]] | None = None
    # user -> the neighbour source's score of each candidate (``recsys.ranking.union_candidates``);
    # the first ``retrieved[user]`` candidates are retrieval's own, the rest the neighbours' additions.
    neighbour: dict[str, np.ndarray] | None = None
    retrieved: dict[str, int] | None = None
    # user -> each candidate's category taste (``recsys.ranking.category_taste``), aligned with
    # the candidates; None where the items' categories or the histories are unknown.
    taste: dict[str, np.ndarray] | None = None
    # user -> how often each candidate was served to the user and passed over (a session's
    # later requests, ``session_replay``), aligned with the candidates; None: a first request.
    passed: dict[str, np.ndarray] | None = None

    def ranker_score_of(self, user: str) -> dict[str, float]:
        """item id -> ranker score of every item scored for ``user``."""
        if self.ranker is None:
            return {}
        ids = (str(self.item_ids[p]) for p in self.candidates[user])
        scored = dict(zip(ids, self.ranker[user].tolist(), strict=True))
        scored.update((self.extra_scores or {}).get(user, {}))
        return scored

    def lists(self, step: Step) -> dict[str, list[str]]:
        """Each user's top-``k`` as the gateway would serve it under ``step``."""
        return {u: self.serve(u, step) for u in self.users}

    def serve(self, user: str, step: Step) -> list[str]:
        """One user's list: blend the sources, fuse with the ranker, order, MMR, exploration."""
        pos, retrieval = self.candidates[user], self.retrieval[user]
        ranker = self.ranker[user] if self.ranker is not None else None
        taste = self.taste[user] if self.taste is not None else None
        passed = self.passed[user] if self.passed is not None else None
        if self.neighbour is not None and self.retrieved is not None:
            if step.blend > 0:
                retrieval = blend_sources(retrieval, self.neighbour[user], step.blend)
            else:  # the gateway adds the neighbours' items only when they have a share
                n = self.retrieved[user]
                pos, retrieval, ranker = pos[:n], retrieval[:n], None if ranker is None else ranker[:n]
                taste = None if taste is None else taste[:n]
                passed = None if passed is None else passed[:n]
        if not len(pos):
            return []
        if step.taste > 0 and taste is not None:
            retrieval = blend_sources(retrieval, taste, step.taste)
        if math.isinf(step.weight) or ranker is None:
            scores = np.asarray(retrieval, dtype=np.float64)
        else:
            scores = rank_fusion(ranker, retrieval, step.weight)
        if passed is not None and passed.any():
            scores = session_feedback(scores, passed, self.gateway.session_item_decay)
        order = np.argsort(-scores, kind="stable")
        pos, scores = pos[order], scores[order]
        gw = self.gateway
        if step.mmr and gw.mmr_trade_off < 1:
            depth = min(len(pos), max(gw.mmr_depth, self.k))
            picked = mmr(scores[:depth], self.unit[pos[:depth]], self.k, gw.mmr_trade_off)
            shown = pos[:depth][picked]
        else:
            shown = pos[: self.k]
        ids = [str(self.item_ids[p]) for p in shown]
        if step.explore and gw.exploration_slots:
            ids = self._explore(user, shown, ids)
        return ids

    def _explore(self, user: str, shown: np.ndarray, ids: list[str]) -> list[str]:
        """New items into the exploration slots, drawn as the gateway draws them."""
        gw = self.gateway
        allowed = self.allowed.copy()
        allowed[self.seen.get(user, np.zeros(0, dtype=np.int64))] = False
        rng = np.random.default_rng([self.seed, zlib.crc32(user.encode())])
        chosen = sample_positions(self.new_items, allowed, set(shown.tolist()), gw.exploration_slots, rng)
        if not len(chosen):
            return ids
        explored, _ = insert_exploration(
            ids,
            [str(self.item_ids[c]) for c in chosen],
            self.k,
            gw.exploration_slots,
            gw.exploration_position,
        )
        return explored


def served_candidates(
    query_embeddings: np.ndarray,
    item_embeddings: np.ndarray,
    users: Sequence[str],
    seen: Mapping[str, np.ndarray],
    allowed: np.ndarray,
    depth: int,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The gateway's candidates: exact top-``depth`` by dot product, then seen items and the
    business rules filtered out (the retrieval does not know them, so fewer than ``depth``
    survive, as in serving).

    Returns:
        user -> catalog positions (retrieval order), and user -> their scores.
    """
    depth = min(depth, item_embeddings.shape[0])
    positions: dict[str, np.ndarray] = {}
    scores_out: dict[str, np.ndarray] = {}
    for lo in range(0, len(users), 1024):  # bounded memory: 1024 x N scores at a time
        scores = query_embeddings[lo : lo + 1024] @ item_embeddings.T
        part = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
        order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(part, order, axis=1)
        for i, u in enumerate(users[lo : lo + 1024]):
            keep = allowed[top[i]] & ~np.isin(top[i], seen.get(u, np.zeros(0, dtype=np.int64)))
            positions[u] = top[i][keep]
            scores_out[u] = scores[i, top[i][keep]]
    return positions, scores_out


def score_pairs(
    ranker: Callable[..., Mapping[str, Any]],
    ranker_inputs: Mapping[str, str],
    queries: pd.DataFrame,
    user_items: Mapping[str, Sequence[str]],
    item_features: pd.DataFrame,
    output: str = "score",
) -> dict[str, np.ndarray]:
    """The ranker's ``output`` for every (user, item) of ``user_items``, batched.

    Args:
        ranker: the ranker SavedModel's ``serving_default`` (keyword tensors in).
        ranker_inputs: the training manifest's ``ranker_inputs``.
        queries: one row per user (index user_id) with the query-side columns.
        user_items: user -> item ids to score.
        item_features: index item_id; the item-side columns (category, popularity).
        output: which head to read (``score``: the objectives' weighted combination).

    Returns:
        user -> scores, aligned with ``user_items[user]``.
    """
    import tensorflow as tf

    from components.training.train import features_from_frame

    users = [u for u in user_items if len(user_items[u])]
    out: dict[str, np.ndarray] = {u: np.zeros(0, dtype=np.float32) for u in user_items}
    if not users:
        return out
    counts = np.array([len(user_items[u]) for u in users])
    item_col = np.concatenate([np.asarray(user_items[u], dtype=object) for u in users])
    user_rows = np.repeat(np.arange(len(users)), counts)
    item_side = [c for c in ranker_inputs if c in item_features.columns]
    query_side = [c for c in ranker_inputs if c not in item_side and c != "item_id" and c in queries.columns]
    q = queries.loc[users, query_side].reset_index(drop=True)
    pairs = q.iloc[user_rows].reset_index(drop=True)
    pairs["item_id"] = item_col
    items = item_features.reindex(item_col)[item_side].reset_index(drop=True)
    pairs = pd.concat([pairs, items], axis=1)
    arrays = features_from_frame(pairs, ranker_inputs)
    scores = np.empty(len(pairs), dtype=np.float32)
    for lo in range(0, len(pairs), BATCH):
        batch = {k: tf.constant(v[lo : lo + BATCH]) for k, v in arrays.items()}
        scores[lo : lo + BATCH] = ranker(**batch)[output].numpy()
    start = 0
    for u, n in zip(users, counts, strict=True):
        out[u] = scores[start : start + n]
        start += n
    return out


def build_replay(
    *,
    users: list[str],
    item_ids: np.ndarray,
    item_embeddings: np.ndarray,
    query_embeddings: np.ndarray,
    seen: Mapping[str, set[str]],
    allowed: np.ndarray,
    new_items: np.ndarray,
    ranker_scores: Callable[[Mapping[str, Sequence[str]]], dict[str, np.ndarray]] | None,
    gateway: GatewayConfig,
    k: int,
    seed: int,
    also_score: Mapping[str, Sequence[str]] | None = None,
    neighbours: ItemNeighbours | None = None,
    histories: Mapping[str, Sequence[str]] | None = None,
    item_categories: Sequence[frozenset[str]] | None = None,
    passed_over: Mapping[str, Mapping[str, int]] | None = None,
) -> Replay:
    """Retrieve, filter and score one evaluation set's candidates (the ranker runs here, once).

    Args:
        ranker_scores: scores (user -> item ids) -> user -> scores; None: no ranker.
        also_score: user -> items to score in the same pass besides the candidates.
        neighbours: the item-to-item source; with it each user's candidates also hold the
            ``gateway.neighbour_candidates`` items their ``histories`` (newest first, as the
            gateway's recent items) score highest.
        item_categories: each catalog item's categories (aligned with ``item_ids``); with
            them and ``histories`` every candidate gets its category taste.
        passed_over: user -> item id -> how often it was served to the user and passed over
            (a session's later requests); the gateway discounts those items' scores.
    """
    index = pd.Index(item_ids)
    seen_pos: dict[str, np.ndarray] = {}
    for u in users:
        idx = index.get_indexer(list(seen.get(u, ())))
        seen_pos[u] = idx[idx >= 0].astype(np.int64)
    candidates, retrieval = served_candidates(
        query_embeddings, item_embeddings, users, seen_pos, allowed, gateway.candidates
    )
    neighbour, retrieved = None, None
    if neighbours is not None:
        retrieved = {u: len(candidates[u]) for u in users}
        neighbour = {}
        for u in users:
            ids, scores = neighbours.score((histories or {}).get(u, ()), gateway.neighbour_candidates)
            at = index.get_indexer(ids)
            keep = (at >= 0) & allowed[np.maximum(at, 0)] & ~np.isin(at, seen_pos[u])
            candidates[u], retrieval[u], neighbour[u] = union_candidates(
                candidates[u], retrieval[u], at[keep], scores[keep]
            )
    taste = None
    if item_categories is not None and histories is not None:
        taste = {}
        for u in users:
            at = index.get_indexer(list(histories.get(u, ())))
            recent = [item_categories[p] for p in at[at >= 0]]
            taste[u] = category_taste([item_categories[p] for p in candidates[u]], recent)
    passed = None
    if passed_over is not None:
        passed = {}
        for u in users:
            times = passed_over.get(u, {})
            ids = [str(item_ids[p]) for p in candidates[u]]
            passed[u] = np.array([times.get(i, 0) for i in ids], dtype=np.float64)
    ranked, extra = None, None
    if ranker_scores is not None:
        ids = {u: [str(item_ids[p]) for p in candidates[u]] for u in users}
        more = {u: _missing(also_score.get(u, ()) if also_score else (), ids[u]) for u in users}
        scored = ranker_scores({u: ids[u] + more[u] for u in users})
        ranked = {u: scored[u][: len(ids[u])] for u in users}
        extra = {u: dict(zip(more[u], scored[u][len(ids[u]) :].tolist(), strict=True)) for u in users}
    return Replay(
        users=list(users),
        item_ids=item_ids,
        candidates=candidates,
        retrieval=retrieval,
        ranker=ranked,
        unit=unit_directions(item_embeddings),
        allowed=allowed,
        seen=seen_pos,
        new_items=np.flatnonzero(new_items).astype(np.int64),
        gateway=gateway,
        k=k,
        seed=seed,
        extra_scores=extra,
        neighbour=neighbour,
        retrieved=retrieved,
        taste=taste,
        passed=passed,
    )


def _missing(wanted: Sequence[str], have: Sequence[str]) -> list[str]:
    """The ids of ``wanted`` not in ``have``, once each, in order."""
    present = set(have)
    return [i for i in dict.fromkeys(wanted) if i not in present]


def head_rerank(
    replay: Replay, retrieved: Mapping[str, list[str]], depth: int, weight: float
) -> dict[str, list[str]]:
    """``retriever_ranker``: the retriever's top ``depth`` (seen excluded) re-ordered by rank
    fusion at ``weight``, the retrieval order after it (so recall@K beyond the depth counts).

    Its ranker scores come from the replay's one ranker pass (``build_replay(also_score=...)``).
    """
    out: dict[str, list[str]] = {}
    for u in replay.users:
        head, tail = retrieved[u][:depth], retrieved[u][depth:]
        if replay.ranker is None or not head:
            out[u] = list(retrieved[u])
            continue
        scored = replay.ranker_score_of(u)
        ranker = np.array([scored[i] for i in head], dtype=np.float64)
        # The head is in retrieval order: its retrieval rank is the position, best first.
        retrieval = -np.arange(len(head), dtype=np.float64)
        order = np.argsort(-rank_fusion(ranker, retrieval, weight), kind="stable")
        out[u] = [head[i] for i in order] + list(tail)
    return out
