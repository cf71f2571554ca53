"""One recommendation request, stage by stage (each timed, each with a way out):

1. **arm**: a sticky hash of the user id picks ``stable``, ``canary`` or the popularity
   ``holdout`` (``policy.assign_arm``); the arm names the model label to call.
2. **features**: the user's row from the Feast online store (profile, engagement counts,
   recent items), with a deadline; on a miss the request goes on with defaults ("nothing
   known"), which is exactly what a brand-new user looks like. Items the user touched
   since the last push are merged in from the gateway's own memory, so an event posted a
   moment ago counts even if the store has not caught up.
3. **candidates**: users with fewer than ``cold_start_min_events`` events get popularity in
   their segment blended with content neighbours of what they touched; everyone else gets
   ~1000 candidates down ``fallback_chain``: the model server's retrieval (query tower +
   ScaNN), exact search over the version's exported embeddings in this process, segment
   popularity, global popularity. Each step taken past the first is counted.
4. **filter**: already seen, excluded by the request, out of stock, business rules.
5. **rank**: one batched predict of every surviving candidate against the ranker; the
   objectives' outputs are combined with the configured weights (or the model's ``score``).
6. **re-rank**: MMR over the top of the ranked list for diversity, then exploration slots
   for new items nobody has engaged with yet, so they can earn a signal.
7. **log**: each shown item becomes an ``impression`` event with the request id and the arm
   (written by a background thread: impressions are not worth a disk flush per request;
   posted events are).
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from recsys.config import Settings
from recsys.event_log.base import ServedRequest
from recsys.ranking import (
    blend_candidates,
    category_taste,
    insert_exploration,
    mmr,
    rank_fusion,
    session_feedback,
    taste_candidates,
)
from serving.gateway.candidates import CandidateChain
from serving.gateway.catalog import ItemCatalog, ModelVersions, RetrievalAssets
from serving.gateway.cold_start import cold_start
from serving.gateway.explanations import (
    REASON_EXPLORING,
    SOURCE_EXPLORATION,
    SOURCE_ITEM_TO_ITEM,
    also_taken_reason,
    attributions,
    driver_reasons,
    gather_evidence,
    leave_one_out_rows,
    source_attribution,
    taste_reason,
)
from serving.gateway.exploration import ExplorationBandit
from serving.gateway.impressions import ImpressionWriter
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.model_calls import ModelCalls, run_sync
from serving.gateway.policy import assign_arm
from serving.gateway.popularity import popularity
from serving.gateway.schemas import RecommendationRequest
from serving.gateway.snapshot import Snapshot, SnapshotRefresher
from serving.gateway.user_features import UserActivity, UserFeatures, UserState

log = logging.getLogger("serving.gateway")
MODEL_SOURCES = ("retrieval", "exact")  # candidate sources that came from the retrieval model


class Timer:
    """Milliseconds per stage of one request: each ``lap`` closes the stage that ran since the last."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.ms: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.ms[stage] = round(self.ms.get(stage, 0.0) + (now - self.last) * 1000, 3)
        self.last = now


class RecommendationFlow:
    """Runs a recommendation request through its stages, on the parts that do each one's work.

    Args:
        settings: the configuration (``gateway``, ``features``, ``push``, ``evaluation``).
        snapshots: the models and item cache now serving.
        user_features: the user's online row, with its deadline and fallbacks.
        activity: what each user did since the gateway started.
        model_calls: the model server's calls, behind the breaker.
        candidate_chain: candidates down the fallback chain.
        impressions: where each served request and its impressions are queued.
        metrics: the gateway's Prometheus metrics.
        exploration: the exploration slots' bandit (default: one of its own).
    """

    def __init__(
        self,
        settings: Settings,
        snapshots: SnapshotRefresher,
        user_features: UserFeatures,
        activity: UserActivity,
        model_calls: ModelCalls,
        candidate_chain: CandidateChain,
        impressions: ImpressionWriter,
        metrics: GatewayMetrics,
        exploration: ExplorationBandit | None = None,
    ) -> None:
        self.settings = settings
        self.exploration = exploration or ExplorationBandit(settings, metrics)
        self.snapshots = snapshots
        self.user_features = user_features
        self.activity = activity
        self.model_calls = model_calls
        self.candidate_chain = candidate_chain
        self.impressions = impressions
        self.metrics = metrics
        # Each stage's histogram child, looked up once (``labels`` takes a lock and builds a
        # key on every call: nine stages a request).
        self._stage_seconds: dict[str, Any] = {}

    def recommend(self, req: RecommendationRequest) -> dict[str, Any]:
        """``recommend_async`` from code with no running event loop: the same stages, with the
        feature read and model calls blocking (``run_sync``)."""
        return run_sync(self.recommend_async(req))

    async def recommend_async(self, req: RecommendationRequest) -> dict[str, Any]:
        """The answer to one request: items with score and reason, arm, versions, fallbacks, timings.

        On the gateway's event loop the request waits for the online store and the model
        server without holding a thread, and the loop serves other requests meanwhile; the
        stages' own work (NumPy) runs on the loop.
        """
        gw = self.settings.gateway
        snap = self.snapshots.get()
        catalog, versions = snap.catalog, snap.versions
        timer = Timer()
        request_id = uuid.uuid4().hex
        k = min(req.k or gw.default_k, gw.max_k)
        arm = assign_arm(req.user_id, gw.arm_fractions, gw.arm_salt)
        label = "stable" if arm == "holdout" else arm
        fallback: list[str] = []
        timer.lap("arm")

        row, recent, seen, n_events, segment, act = await self._features(req, fallback)
        timer.lap("features")

        allowed = self._allowed(catalog, snap.base_mask, req, seen)
        assets = self._retrieval_assets(versions, label)
        model_versions: dict[str, int] = {}
        recent_pos = catalog.positions(recent)
        cold = arm != "holdout" and n_events < gw.cold_start_min_events
        if cold:
            self.metrics.cold_start.inc()
        query: dict[str, np.ndarray] = {}
        reasons: dict[int, str] = {}
        if arm == "holdout":
            pos, scores, source = popularity(catalog, segment, allowed, gw.candidates, reasons)
        elif cold:
            pos, scores, source = cold_start(
                snap, assets, recent_pos, segment, allowed, reasons, gw.mmr_depth
            )
        else:
            query = self.model_calls.query_inputs(assets.inputs, row, recent, req)
            with self.model_calls.recording() as served_versions:
                pos, scores, source = await self.candidate_chain.candidates(
                    snap, assets, label, query, segment, allowed, fallback, reasons
                )
            if source == "retrieval" and self.settings.push.retrieval_model in served_versions:
                # The version the model server's answer named, not the one the label should be.
                model_versions.update(served_versions)
            elif source == "exact":
                # Exact search runs in this process on the version's own exported embeddings.
                model_versions[self.settings.push.retrieval_model] = assets.version
        self.metrics.candidate_source.labels(source=source).inc()
        timer.lap("candidates")

        counts = {"retrieved": len(pos)}
        keep = allowed[pos]
        pos, scores = pos[keep], scores[keep]
        # Retrieval's own candidates and scores (taste + prior): what the reasons measure against.
        retrieved = pos, scores
        if source in MODEL_SOURCES and len(pos):
            pos, scores = self._with_neighbours(
                catalog, assets, recent, allowed, pos, scores, counts, reasons
            )
            pos, scores = self._with_taste(catalog, assets, recent_pos, pos, scores, reasons)
        candidates = pos  # what the ranker scores: retrieval's and the item-to-item source's
        counts["ranked"] = 0
        timer.lap("filter")

        if source in MODEL_SOURCES and len(pos):
            scores = await self._rank(
                versions, label, query, row, catalog, pos, scores, fallback, counts, model_versions
            )
        timer.lap("ranking")

        if len(pos) < k:
            pos, scores = self._top_up(catalog, allowed, pos, scores, k, fallback, reasons)
        if arm != "holdout":
            scores = self._with_session_feedback(catalog, act, pos, scores)
        ranked_ids, picked = self._diversify(snap, assets, pos, scores, k)
        score_of = {
            str(catalog.item_ids[i]): float(s) for i, s in zip(pos[picked], scores[picked], strict=True)
        }
        timer.lap("mmr")

        explored: set[str] = set()
        if gw.exploration_slots and arm != "holdout":
            ranked_ids, explored = self._explore(
                catalog, allowed, pos[picked], ranked_ids, k, request_id, segment, snap
            )
        items = self._explain(snap, assets, ranked_ids, explored, score_of, reasons, recent_pos, retrieved)
        timer.lap("explore")
        if req.explain:
            ranked = counts["ranked"] > 0
            await self._attribute(
                snap, versions, label, query, row, items, explored, retrieved[0], candidates, ranked, source
            )
            timer.lap("explain")

        self.metrics.arm.labels(arm=arm).inc()
        served = ServedRequest(
            request_id=request_id,
            user_id=req.user_id,
            arm=arm,
            versions=dict(model_versions),
            ts=datetime.now(UTC),
            latency_ms=round((time.perf_counter() - timer.start) * 1000, 3),
            status="ok",
            fallback=",".join(fallback) or None,
            items=[it["item_id"] for it in items],
            candidate_source=source,
        )
        self.impressions.log_served(served, req, items)
        self.activity.served(req.user_id, served.items)
        if explored:
            self.exploration.served(request_id, segment, [i for i in served.items if i in explored])
        timer.lap("log")
        timer.ms["total"] = round((time.perf_counter() - timer.start) * 1000, 3)
        for stage, ms in timer.ms.items():
            child = self._stage_seconds.get(stage)
            if child is None:
                child = self._stage_seconds.setdefault(stage, self.metrics.stage.labels(stage=stage))
            child.observe(ms / 1000)
        return {
            "request_id": request_id,
            "user_id": req.user_id,
            "arm": arm,
            "model_versions": model_versions,
            "cold_start": cold,
            "fallback": fallback,
            "candidate_source": source,
            "counts": counts,
            "items": items,
            "timings_ms": timer.ms,
        }

    # --- stages ------------------------------------------------------------------------

    async def _features(
        self, req: RecommendationRequest, fallback: list[str]
    ) -> tuple[dict[str, Any], list[str], set[str], int, str, UserState]:
        """The user's row, recent items, items not to show again, event count, segment, and
        what the gateway saw of the user since it started."""
        row, _known, feature_source = await self.user_features.read_async(req.user_id)
        if feature_source != "online":
            fallback.append(f"features:{feature_source}")
            self.metrics.fallback("features", feature_source)
        act = self.activity.get(req.user_id)
        stored_recent = str(row.get("recent_items") or "").split()
        recent = list(dict.fromkeys([*act.recent, *stored_recent]))[: self.settings.features.recent_items]
        # The stored recent items all stay seen even where this session's clicks push them out
        # of the model's window of ``recent_items``.
        seen = set(recent) | set(stored_recent) | act.seen | set(req.exclude_item_ids)
        n_events = int(row.get(self.user_features.events_feature) or 0) + act.events
        segment = str(row.get(self.settings.gateway.segment_feature) or "")
        return row, recent, seen, n_events, segment, act

    @staticmethod
    def _allowed(
        catalog: ItemCatalog, base_mask: np.ndarray, req: RecommendationRequest, seen: set[str]
    ) -> np.ndarray:
        """Items this request may show: business rules, the request's filters, nothing seen."""
        allowed = base_mask.copy()
        if req.filters.categories:
            keep = np.zeros(len(catalog), dtype=bool)
            for c in req.filters.categories:
                keep |= catalog.category_mask(c)
            allowed &= keep
        for c in req.filters.exclude_categories:
            allowed &= ~catalog.category_mask(c)
        allowed[catalog.positions(seen)] = False
        return allowed

    def _retrieval_assets(self, versions: ModelVersions, label: str) -> RetrievalAssets:
        """The retrieval version of the label, else the newest loaded."""
        rv = versions.version(self.settings.push.retrieval_model, label)
        assets = versions.retrieval.get(rv) if rv is not None else None
        if assets is None:
            assets = versions.retrieval[max(versions.retrieval)]
        return assets

    def _with_neighbours(
        self,
        catalog: ItemCatalog,
        assets: RetrievalAssets,
        recent: list[str],
        allowed: np.ndarray,
        pos: np.ndarray,
        scores: np.ndarray,
        counts: dict[str, int],
        reasons: dict[int, str],
    ) -> tuple[np.ndarray, np.ndarray]:
        """The retrieved candidates joined by the item-to-item source's, ordered by the blended
        score, when the pushed policy gives that source a share (the evaluation chose it).

        A candidate whose neighbour part of the blend outweighs its retrieval part is explained
        by the recent item that points to it most."""
        policy, neighbours = assets.serving_policy, assets.item_to_item
        if policy is None or policy.neighbour_weight <= 0 or neighbours is None or not recent:
            return pos, scores
        ids, nb_scores = neighbours.score(recent, self.settings.gateway.neighbour_candidates)
        at = np.fromiter((catalog.position.get(str(i), -1) for i in ids), dtype=np.int64, count=len(ids))
        keep = at >= 0
        keep[keep] = allowed[at[keep]]
        counts["neighbours"] = int(keep.sum())  # candidates the recent items point to
        joined, blended, placed = blend_candidates(
            pos, scores, at[keep], nb_scores[keep], policy.neighbour_weight
        )
        at_driven = joined[placed]
        sources = neighbours.strongest_sources(recent, [str(catalog.item_ids[p]) for p in at_driven])
        for p, src in zip(at_driven.tolist(), sources, strict=True):
            if src is not None:
                reasons.setdefault(int(p), also_taken_reason(src))
        return joined, blended

    @staticmethod
    def _with_taste(
        catalog: ItemCatalog,
        assets: RetrievalAssets,
        recent_pos: np.ndarray,
        pos: np.ndarray,
        scores: np.ndarray,
        reasons: dict[int, str],
    ) -> tuple[np.ndarray, np.ndarray]:
        """The candidates re-scored with the category taste's share, when the pushed policy
        gives it one; an item the taste placed is explained by the category it shares."""
        policy = assets.serving_policy
        if policy is None or policy.taste_weight <= 0 or not len(recent_pos):
            return pos, scores
        recent_categories = [catalog.category_sets[p] for p in recent_pos]
        taste = category_taste([catalog.category_sets[p] for p in pos], recent_categories)
        order, blended, placed = taste_candidates(scores, taste, policy.taste_weight)
        pos = pos[order]
        for p in pos[placed].tolist():
            if p not in reasons:
                said = taste_reason(catalog.category_sets[p], recent_categories)
                if said is not None:
                    reasons[p] = said
        return pos, blended

    def _with_session_feedback(
        self, catalog: ItemCatalog, act: UserState, pos: np.ndarray, scores: np.ndarray
    ) -> np.ndarray:
        """The scores discounted by what the gateway served the user lately and they passed
        over (``session_feedback``); unchanged for a user who passed nothing over."""
        decay = self.settings.gateway.session_item_decay
        passed = act.passed_over()
        if not passed or not len(pos) or decay >= 1:
            return scores
        passed_over = times_passed_over(catalog.position, passed, pos)
        return session_feedback(scores, passed_over, decay)

    async def _rank(
        self,
        versions: ModelVersions,
        label: str,
        query: dict[str, np.ndarray],
        row: dict[str, Any],
        catalog: ItemCatalog,
        pos: np.ndarray,
        scores: np.ndarray,
        fallback: list[str],
        counts: dict[str, int],
        model_versions: dict[str, int],
    ) -> np.ndarray:
        """The candidates' scores after the ranker; the retrieval scores when ranking is skipped.

        The fusion weight is the one the evaluation chose and pushed with the retrieval
        version (``serving_policy.json``); a version without one uses
        ``evaluation.retrieval_weight``. A policy that does not serve the ranker (it lowered
        the validation metric or the expected reward) skips the ranking call altogether.
        """
        p = self.settings.push
        policy = self._retrieval_assets(versions, label).serving_policy
        weight = policy.fusion_weight if policy is not None else self.settings.evaluation.retrieval_weight
        if policy is not None and not policy.ranker_served:
            return scores
        with self.model_calls.recording() as served_versions:
            ranked = await self.model_calls.rank(versions, label, query, row, catalog, pos)
        if ranked is None:
            fallback.append("ranking:skipped")
            self.metrics.fallback("ranking", "skipped")
            return scores
        # The same fusion of ranker and retrieval ranks that the gate evaluated.
        fused = rank_fusion(ranked, scores, weight)
        counts["ranked"] = len(pos)
        if p.ranking_model in served_versions:
            # The version the model server's answer named, not the one the label should be.
            model_versions[p.ranking_model] = served_versions[p.ranking_model]
        return fused

    def _top_up(
        self,
        catalog: ItemCatalog,
        allowed: np.ndarray,
        pos: np.ndarray,
        scores: np.ndarray,
        k: int,
        fallback: list[str],
        reasons: dict[int, str],
    ) -> tuple[np.ndarray, np.ndarray]:
        """Popular items after the ranked ones when fewer than ``k`` are left."""
        # The ANN returned fewer than asked (or filters removed most): fill from popularity.
        extra_mask = allowed.copy()
        extra_mask[pos] = False
        more = catalog.global_popular[extra_mask[catalog.global_popular]][: k - len(pos)]
        if len(more):
            fallback.append("candidates:topped_up_popularity")
            self.metrics.fallback("candidates", "topped_up_popularity")
            low = (scores.min() if len(scores) else 0.0) - 1.0
            pos = np.concatenate([pos, more])
            scores = np.concatenate([scores, low - np.arange(len(more), dtype=np.float32) * 1e-3])
            for m in more:
                reasons.setdefault(int(m), "popular right now")
        return pos, scores

    def _diversify(
        self, snap: Snapshot, assets: RetrievalAssets, pos: np.ndarray, scores: np.ndarray, k: int
    ) -> tuple[list[str], np.ndarray]:
        """MMR over the top of the ranked list: the ``k`` item ids, and their indices into ``pos``."""
        gw = self.settings.gateway
        catalog = snap.catalog
        depth = min(len(pos), max(gw.mmr_depth, k))
        top = np.argsort(-scores, kind="stable")[:depth]
        # A pushed policy may leave MMR out (it lowered the expected reward the gate measured).
        policy = assets.serving_policy
        trade_off = gw.mmr_trade_off if policy is None or policy.mmr else 1.0
        emb = snap.unit_rows(assets, pos[top])
        picked = top[mmr(scores[top], emb, k, trade_off)] if trade_off < 1 else top[:k]
        ranked_ids = [str(catalog.item_ids[i]) for i in pos[picked]]
        return ranked_ids, picked

    def _explore(
        self,
        catalog: ItemCatalog,
        allowed: np.ndarray,
        picked_pos: np.ndarray,
        ranked_ids: list[str],
        k: int,
        request_id: str,
        segment: str = "",
        snap: Snapshot | None = None,
    ) -> tuple[list[str], set[str]]:
        """New items into the exploration slots, as the configured bandit chooses them
        (``gateway.exploration_policy``): the list, and the ids placed there."""
        gw = self.settings.gateway
        rng = np.random.default_rng(int(hashlib.sha256(request_id.encode()).hexdigest()[:16], 16))
        features = None
        if snap is not None and self.exploration.needs_features:
            # The stable version's space whatever the request's arm: one regression learns
            # from every arm's slots, and only a promotion moves it to another space.
            stable = self._retrieval_assets(snap.versions, "stable")
            features = (stable.version, lambda p: snap.unit_rows(stable, p))
        chosen = self.exploration.choose(
            catalog.item_ids,
            catalog.new_positions,
            allowed,
            set(picked_pos.tolist()),
            gw.exploration_slots,
            segment,
            rng,
            features,
        )
        if not len(chosen):
            return ranked_ids, set()
        return insert_exploration(
            ranked_ids,
            [str(catalog.item_ids[c]) for c in chosen],
            k,
            gw.exploration_slots,
            gw.exploration_position,
        )

    def _explain(
        self,
        snap: Snapshot,
        assets: RetrievalAssets,
        ranked_ids: list[str],
        explored: set[str],
        score_of: dict[str, float],
        reasons: dict[int, str],
        recent_pos: np.ndarray,
        retrieved: tuple[np.ndarray, np.ndarray],
    ) -> list[dict[str, Any]]:
        """The answer's items, each with its score and the reason it is shown."""
        catalog = snap.catalog
        shown = [catalog.position[item] for item in ranked_ids]
        pairs = zip(ranked_ids, shown, strict=True)
        unexplained = [i for item, i in pairs if item not in explored and i not in reasons]
        explained = self._reasons(snap, assets, unexplained, recent_pos, retrieved)
        items: list[dict[str, Any]] = []
        for item, i in zip(ranked_ids, shown, strict=True):
            if item in explored:
                items.append({"item_id": item, "score": None, "reason": REASON_EXPLORING})
                continue
            reason = reasons.get(i) or explained[i]
            items.append({"item_id": item, "score": round(score_of[item], 6), "reason": reason})
        return items

    @staticmethod
    def _reasons(
        snap: Snapshot,
        assets: RetrievalAssets,
        positions: Sequence[int],
        recent_pos: np.ndarray,
        retrieved: tuple[np.ndarray, np.ndarray],
    ) -> dict[int, str]:
        """A reason per model-placed item, naming what drove it: the popularity prior, the
        recent item it is near, the category it shares with the recent items, or the model."""
        if not positions:
            return {}
        where = np.asarray(positions, dtype=np.int64)
        said = driver_reasons(*gather_evidence(snap, assets, where, recent_pos, *retrieved))
        return dict(zip(positions, said, strict=True))

    async def _attribute(
        self,
        snap: Snapshot,
        versions: ModelVersions,
        label: str,
        query: dict[str, np.ndarray],
        row: dict[str, Any],
        items: list[dict[str, Any]],
        explored: set[str],
        pool_pos: np.ndarray,
        candidates: np.ndarray,
        ranked: bool,
        source: str,
    ) -> None:
        """Each item's ``attribution``: for the items the ranker scored, its inputs by effect on
        the score (one leave-one-input-out call); for the rest, the source that placed them."""
        catalog = snap.catalog
        pool, joined = set(pool_pos.tolist()), set(candidates.tolist())
        scored: list[int] = []
        for n, it in enumerate(items):
            p = catalog.position[it["item_id"]]
            if it["item_id"] in explored:
                it["attribution"] = source_attribution(SOURCE_EXPLORATION)
            elif p in joined and ranked:
                scored.append(n)
            elif p in pool:
                it["attribution"] = source_attribution(source)  # the request's candidate source
            else:
                # The item-to-item source's addition, or a popular item that topped the list up.
                placed_by = SOURCE_ITEM_TO_ITEM if p in joined else "global_popularity"
                it["attribution"] = source_attribution(placed_by)
        if not scored:
            return
        pos = np.asarray([catalog.position[items[n]["item_id"]] for n in scored], dtype=np.int64)
        try:
            pairs = self.model_calls.pair_rows(versions, label, query, row, catalog, pos)
            if pairs is None:
                raise RuntimeError(f"the inputs of the ranking version labelled {label!r} are not known")
            batch, names, at_default = leave_one_out_rows(*pairs)
            scores = await self.model_calls.score_pairs(label, batch)
            per_item = attributions(scores, names, at_default)
        except Exception as e:  # noqa: BLE001 - the list stands without its explanation
            log.warning("explanation failed: %s", e)
            self.metrics.fallback("explain", "failed")
            per_item = [[] for _ in scored]
        for n, attribution in zip(scored, per_item, strict=True):
            items[n]["attribution"] = attribution


def times_passed_over(position: dict[str, int], passed: dict[str, int], pos: np.ndarray) -> np.ndarray:
    """[len(pos)] how often each candidate (a catalog position) was passed over, from
    ``passed`` (item id -> times); ids the catalog lacks count for nothing.

    A sorted look-up of the few passed-over items: no catalog-sized array per request."""
    known = [i for i in passed if i in position]
    if not known or not len(pos):
        return np.zeros(len(pos), dtype=np.float64)
    at = np.fromiter((position[i] for i in known), dtype=np.int64, count=len(known))
    times = np.fromiter((passed[i] for i in known), dtype=np.float64, count=len(known))
    order = np.argsort(at)
    at, times = at[order], times[order]
    slot = np.minimum(np.searchsorted(at, pos), len(at) - 1)
    return np.where(at[slot] == pos, times[slot], 0.0)
