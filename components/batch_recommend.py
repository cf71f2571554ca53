"""Batch recommendations from the pushed models: top-K unseen items for a list of users.

This reads exactly what a model server serves: the versions that a label of
``<base>/models.config`` points at (``stable`` by default), the retrieval model's ``retrieve``
signature (query tower + index in one graph), the ranking model's ``rank`` signature, and
the user's features as of the end of the validated data. The ordering follows the serving
policy pushed with the retrieval version (``assets.extra/serving_policy.json``), as the
gateway does and as the evaluation's ``served`` system replays it: the ranker re-orders each
user's top ``rank_depth`` unseen candidates with rank fusion at the chosen weight (or does
not run, when the policy leaves it out), then MMR diversifies the top ``gateway.mmr_depth``.
Where the policy gives the item-to-item source a share (``neighbour_weight``), its items for
the user's recent items join the retrieved ones and the candidates are ordered by the blended
score before the ranker, as in the gateway; so does the category taste's share
(``taste_weight``). A version pushed without a policy uses
``evaluation.retrieval_weight`` and
``evaluation.rerank_depth``. Batch lists carry no exploration slot: that is a per-request
experiment of the gateway.
Items the user already had an event with are removed; since that removal
happens after retrieval, the model over-fetches (it returns ``push.retrieval_k``
candidates) and a user who has seen more than that gets the rest from an exact search
over the version's exported item embeddings. A user id the model never saw still gets
recommendations: the query tower maps it to its out-of-vocabulary embedding, and the list
is topped up by popularity if retrieval falls short. When no model was ever pushed (the
first one was refused by the gate), every user gets the most popular unseen items and the
output says so (``source: popularity`` per line, a ``note`` in the summary) instead of failing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recsys.artifacts import EMBEDDINGS_FILE, ITEM_IDS_FILE, REQUIREMENTS, assets_extra
from recsys.config import Settings
from recsys.contracts import category_set
from recsys.layout import latest_validated_dir
from recsys.model_registry import read_models_config, version_for_label
from recsys.neighbours import ItemNeighbours, read_item_neighbours
from recsys.ranking import (
    ServingPolicy,
    blend_candidates,
    category_taste,
    mmr,
    rank_fusion,
    read_serving_policy,
    taste_candidates,
    unit_directions,
)
from recsys.storage import read_manifest

BATCH = 256


def read_user_ids(path: Path) -> list[str]:
    """One user id per line; blank lines and surrounding spaces ignored, order kept."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


class PushedRetriever:
    """The retrieval model of one pushed version, loaded in-process.

    Loads the SavedModel with ScaNN's ops registered; where that fails (a TensorFlow
    without them: "Op type not registered 'Scann...'"), it uses the version's fallback
    assets instead: the query tower and exact search over the exported item embeddings.
    """

    def __init__(self, version_dir: Path) -> None:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
        import tensorflow as tf

        self.version_dir = Path(version_dir)
        extra = assets_extra(self.version_dir)
        self.requirements = json.loads((extra / REQUIREMENTS).read_text())
        self.item_ids = np.asarray(json.loads((extra / ITEM_IDS_FILE).read_text()), dtype=object)
        self._embeddings = np.load(extra / EMBEDDINGS_FILE)
        self.unit = unit_directions(self._embeddings)  # MMR's similarity space, as the gateway's
        self.position = {str(i): n for n, i in enumerate(self.item_ids)}
        self.policy: ServingPolicy | None = read_serving_policy(self.version_dir)
        self.mode = "savedmodel"
        try:
            if self.requirements.get("custom_ops"):
                from scann import scann_ops  # noqa: F401  (registers the Scann ops)
            model = tf.saved_model.load(str(self.version_dir))
            self._retrieve = model.signatures["retrieve"]
            self._embed = model.signatures["embed"]
        except Exception as e:  # noqa: BLE001  (which error an unknown op raises varies by TF version)
            if "Scann" not in str(e) and not isinstance(e, ImportError):
                raise
            self.mode = "exact_fallback"
            self._embed = tf.saved_model.load(str(extra / "query_tower")).signatures["serving_default"]
            self._retrieve = None
        self._tf = tf

    def _tensors(self, features: dict[str, np.ndarray]) -> dict[str, Any]:
        return {k: self._tf.constant(v) for k, v in features.items()}

    def retrieve(self, features: dict[str, np.ndarray]) -> list[list[tuple[str, float]]]:
        """Candidate (item id, score) pairs per row, best first (padding removed)."""
        if self._retrieve is None:
            return self.exact(features, len(self.item_ids))
        out = self._retrieve(**self._tensors(features))
        ids, scores = out["item_ids"].numpy(), out["scores"].numpy()
        return [
            [(i.decode(), float(sc)) for i, sc in zip(row, srow, strict=True) if i]
            for row, srow in zip(ids, scores, strict=True)
        ]

    def exact(self, features: dict[str, np.ndarray], k: int) -> list[list[tuple[str, float]]]:
        """Exact dot-product top-``k`` over the exported item embeddings (no index)."""
        q = self._embed(**self._tensors(features))["embedding"].numpy()
        scores = q @ self._embeddings.T
        k = min(k, scores.shape[1])
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return [[(str(self.item_ids[j]), float(scores[r, j])) for j in row] for r, row in enumerate(top)]


class PushedRanker:
    """The ranking model of one pushed version, loaded in-process (its ``rank`` signature)."""

    def __init__(self, version_dir: Path) -> None:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
        import tensorflow as tf

        self.version_dir = Path(version_dir)
        self.requirements = json.loads((assets_extra(self.version_dir) / REQUIREMENTS).read_text())
        self.inputs: dict[str, str] = self.requirements["inputs"]
        self._rank = tf.saved_model.load(str(self.version_dir)).signatures["rank"]
        self._tf = tf

    def score(self, features: dict[str, np.ndarray], batch_size: int = 8192) -> np.ndarray:
        """The combined ``score`` of each (user, item) row."""
        n = len(next(iter(features.values()))) if features else 0
        out = np.empty(n, dtype=np.float32)
        for lo in range(0, n, batch_size):
            batch = {k: self._tf.constant(v[lo : lo + batch_size]) for k, v in features.items()}
            out[lo : lo + batch_size] = self._rank(**batch)["score"].numpy()
        return out


def recommend(
    settings: Settings,
    users_file: Path,
    k: int,
    out: Path,
    data_dir: Path | None = None,
    label: str = "stable",
    base_path: Path | None = None,
    rank: bool = True,
) -> dict[str, Any]:
    """Write top-``k`` unseen items per user as JSON lines, from the pushed models.

    Args:
        settings: the configuration (model names, feature windows, home).
        users_file: one user id per line.
        k: items per user.
        out: the JSONL file; each line ``{"user_id": ..., "items": [ids, best first]}``.
        data_dir: validated data (seen items, user features); default the latest run's.
        label: the ``models.config`` label of the version to use.
        base_path: the model base path; default ``settings.models_dir``.
        rank: re-order retrieved candidates with the pushed ranking model (false: retrieval
            order alone).

    Returns:
        A summary: version, mode, counts of users, unknown users, users topped up by exact
        search and by popularity, and users short of ``k`` (the catalog ran out); with
        ``note`` when nothing was pushed and popularity served.
    """
    from components.features.rows import load_feature_source

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    base_path = Path(base_path or settings.models_dir)
    model = settings.push.retrieval_model
    data_dir = Path(data_dir) if data_dir else latest_validated_dir(settings)
    if model not in read_models_config(base_path):
        return _popularity_fallback(settings, users_file, k, out, data_dir, label, base_path)
    version = version_for_label(base_path, model, label)
    retriever = PushedRetriever(base_path / model / str(version))
    ranker = None
    # A policy that leaves the ranker out (it lowered the validated metric) is followed here too.
    if rank and (retriever.policy is None or retriever.policy.ranker_served):
        ranking = settings.push.ranking_model
        ranker = PushedRanker(base_path / ranking / str(version_for_label(base_path, ranking, label)))
    read_manifest(data_dir)
    source = load_feature_source(settings.features, data_dir, list(retriever.requirements["inputs"]))
    recommender = _Recommender.of(settings, retriever, ranker, source, k)
    users = read_user_ids(users_file)
    lines: list[str] = []
    for start in range(0, len(users), BATCH):
        lines += recommender.batch(users[start : start + BATCH])
    _write_lines(Path(out), lines)
    return {
        "path": str(out),
        "model": model,
        "label": label,
        "version": version,
        "mode": retriever.mode,
        "ranked": ranker is not None,
        "retrieval_weight": recommender.retrieval_weight,
        "serving_policy": retriever.policy is not None,
        "mmr": recommender.mmr_trade_off < 1,
        "data": str(data_dir),
        "k": k,
        **recommender.stats,
        "users": len(users),
    }


def _popularity_fallback(
    settings: Settings, users_file: Path, k: int, out: Path, data_dir: Path, label: str, base_path: Path
) -> dict[str, Any]:
    """The most popular unseen items per user, for when no model was ever pushed.

    A first model the gate refused leaves nothing to serve; batch lists then come from the
    popularity baseline the gate compared it with, and say so, rather than failing.
    """
    from components.features.rows import load_feature_source, popular_items, seen_items

    read_manifest(data_dir)
    source = load_feature_source(settings.features, data_dir)
    popular, seen = popular_items(source), seen_items(source)
    users = read_user_ids(users_file)
    note = (
        f"no {settings.push.retrieval_model!r} model was ever pushed to {base_path} (the gate refused "
        f"the first one, or the pipeline has not run): serving the popularity fallback"
    )
    lines, short = [], 0
    for user in users:
        items = [i for i, _ in _take_scored([(i, 0.0) for i in popular], seen.get(user, set()), k)]
        short += len(items) < k
        lines.append(json.dumps({"user_id": user, "items": items, "source": "popularity"}))
    _write_lines(Path(out), lines)
    return {
        "path": str(out),
        "model": "popularity",
        "label": label,
        "version": None,
        "mode": "popularity_fallback",
        "ranked": False,
        "note": note,
        "data": str(data_dir),
        "k": k,
        "unknown_users": sum(u not in source.users.index for u in users),
        "exact_topped_up": 0,
        "popularity_topped_up": len(users),
        "short": short,
        "users": len(users),
    }


@dataclass
class _Recommender:
    """Top-``k`` unseen items for batches of users, counting how each list was filled."""

    retriever: PushedRetriever
    ranker: PushedRanker | None
    source: Any  # components.features.rows.FeatureSource
    seen: dict[str, set[str]]
    popular: list[str]  # catalog items, most popular first: the last top-up
    k: int
    depth: int  # candidates the ranker re-orders
    retrieval_weight: float
    mmr_trade_off: float  # 1: no MMR
    mmr_depth: int
    # The item-to-item source and its share of the candidate score (the pushed policy's).
    neighbours: ItemNeighbours | None = None
    neighbour_weight: float = 0.0
    neighbour_candidates: int = 0
    # The category taste's share (the pushed policy's), and each item's categories for it.
    taste_weight: float = 0.0
    categories: dict[str, frozenset[str]] = field(default_factory=dict)
    stats: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("unknown_users", "exact_topped_up", "popularity_topped_up", "short"), 0
        )
    )

    @classmethod
    def of(
        cls,
        settings: Settings,
        retriever: PushedRetriever,
        ranker: PushedRanker | None,
        source: Any,
        k: int,
    ) -> _Recommender:
        from components.features.rows import popular_items, seen_items

        catalog = set(map(str, retriever.item_ids))
        popular = [i for i in popular_items(source) if i in catalog]
        evaluation, gateway, policy = settings.evaluation, settings.gateway, retriever.policy
        # The pushed policy first (what the gate measured), the configuration for older versions.
        depth = policy.rank_depth if policy is not None else evaluation.rerank_depth
        weight = policy.fusion_weight if policy is not None else evaluation.retrieval_weight
        trade_off = gateway.mmr_trade_off if policy is None or policy.mmr else 1.0
        share = policy.neighbour_weight if policy is not None else 0.0
        neighbours = read_item_neighbours(assets_extra(retriever.version_dir)) if share > 0 else None
        taste = policy.taste_weight if policy is not None else 0.0
        categories = (
            {str(i): category_set(c) for i, c in source.items["category"].items()} if taste > 0 else {}
        )
        return cls(
            retriever,
            ranker,
            source,
            seen_items(source),
            popular,
            k,
            depth,
            weight,
            trade_off,
            gateway.mmr_depth,
            neighbours,
            share,
            gateway.neighbour_candidates,
            taste,
            categories,
        )

    def batch(self, users: Sequence[str]) -> list[str]:
        """One JSON line per user: retrieved, ranked, then topped up by popularity if short."""
        unseen = self._unseen_candidates(users)
        # The ranker orders the neighbour source's items too, as the gateway does.
        depth = self.depth + (self.neighbour_candidates if self.neighbours is not None else 0)
        scored = (
            _rerank(self.ranker, self.source, users, unseen, depth, self.retrieval_weight)
            if self.ranker is not None
            else unseen
        )
        ordered = [self._diversify(cands) for cands in scored]
        lines = []
        for user, cands in zip(users, ordered, strict=True):
            exclude = self.seen.get(user, set())
            items = cands[: self.k]
            if len(items) < self.k:
                padded = _take_scored([(i, 0.0) for i in [*items, *self.popular]], exclude, self.k)
                items = [i for i, _ in padded]
                self.stats["popularity_topped_up"] += 1
            self.stats["short"] += len(items) < self.k
            lines.append(json.dumps({"user_id": user, "items": items}))
        return lines

    def _diversify(self, cands: Sequence[tuple[str, float]]) -> list[str]:
        """MMR over the top ``mmr_depth`` scored candidates, as the gateway re-ranks; the rest after."""
        if self.mmr_trade_off >= 1 or len(cands) < 2:
            return [i for i, _ in cands]
        depth = min(len(cands), max(self.mmr_depth, self.k))
        head = cands[:depth]
        emb = self.retriever.unit[[self.retriever.position[i] for i, _ in head]]
        picked = mmr(np.array([sc for _, sc in head]), emb, self.k, self.mmr_trade_off)
        chosen = [head[j][0] for j in picked]
        taken = set(chosen)
        return chosen + [i for i, _ in cands if i not in taken]

    def _unseen_candidates(self, users: Sequence[str]) -> list[list[tuple[str, float]]]:
        """Retrieved (item, score) candidates per user, seen items removed; an exact search over
        the whole catalog for a user the over-fetch left short."""
        from components.features.rows import feature_rows

        features = feature_rows(self.source, self.retriever.requirements["inputs"], user_ids=users)
        # Enough for the ranker's head and for MMR to choose among.
        # The ranker and the candidate-score shares order the top ``depth``, as in the gateway.
        reorders = self.ranker is not None or self.neighbours is not None or self.taste_weight > 0
        want = max(self.k, self.depth if reorders else 0, self.mmr_depth if self.mmr_trade_off < 1 else 0)
        unseen: list[list[tuple[str, float]]] = []
        for row, (user, cands) in enumerate(zip(users, self.retriever.retrieve(features), strict=True)):
            self.stats["unknown_users"] += user not in self.source.users.index
            exclude = self.seen.get(user, set())
            kept = _take_scored(cands, exclude, want)
            if len(kept) < self.k:
                one = {name: col[row : row + 1] for name, col in features.items()}
                everything = self.retriever.exact(one, len(self.retriever.item_ids))[0]
                kept = _take_scored(everything, exclude, want)
                self.stats["exact_topped_up"] += 1
            recent = features["recent_items"][row]
            recent = (recent.decode() if isinstance(recent, bytes) else str(recent)).split()
            if self.neighbours is not None:
                kept = self._with_neighbours(kept, recent, exclude)
            if self.taste_weight > 0:
                kept = self._with_taste(kept, recent)
            unseen.append(kept)
        return unseen

    def _with_neighbours(
        self, kept: list[tuple[str, float]], recent: list[str], exclude: set[str]
    ) -> list[tuple[str, float]]:
        """The retrieved candidates and the neighbour source's, by the blended score."""
        assert self.neighbours is not None
        ids, scores = self.neighbours.score(recent, self.neighbour_candidates)
        keep = np.array([i not in exclude and i in self.retriever.position for i in ids], dtype=bool)
        cands, blended, _ = blend_candidates(
            np.asarray([i for i, _ in kept], dtype=object),
            np.asarray([sc for _, sc in kept], dtype=np.float64),
            ids[keep] if len(ids) else ids,
            scores[keep] if len(ids) else scores,
            self.neighbour_weight,
        )
        return [(str(c), float(b)) for c, b in zip(cands, blended, strict=True)]


    def _with_taste(self, kept: list[tuple[str, float]], recent: list[str]) -> list[tuple[str, float]]:
        """The candidates re-scored with the category taste's share, best first."""
        none: frozenset[str] = frozenset()
        taste = category_taste(
            [self.categories.get(i, none) for i, _ in kept], [self.categories.get(i, none) for i in recent]
        )
        order, blended, _ = taste_candidates(np.asarray([sc for _, sc in kept]), taste, self.taste_weight)
        return [(kept[o][0], float(b)) for o, b in zip(order.tolist(), blended, strict=True)]


def _write_lines(out: Path, lines: list[str]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in lines))
    os.replace(tmp, out)


def _take_scored(
    candidates: Sequence[tuple[str, float]], exclude: set[str], k: int
) -> list[tuple[str, float]]:
    """The first ``k`` distinct (item, score) candidates whose item is not in ``exclude``."""
    out: list[tuple[str, float]] = []
    taken: set[str] = set()
    for item, score in candidates:
        if item and item not in exclude and item not in taken:
            out.append((item, score))
            taken.add(item)
            if len(out) == k:
                break
    return out


def _rerank(
    ranker: PushedRanker,
    source: Any,
    users: Sequence[str],
    candidates: Sequence[list[tuple[str, float]]],
    depth: int,
    retrieval_weight: float,
) -> list[list[tuple[str, float]]]:
    """Each user's top ``depth`` candidates re-ordered by rank fusion, with their fused scores;
    the rest keep their order below them."""
    from components.features.rows import feature_rows

    heads = [c[:depth] for c in candidates]
    pair_users = [u for u, h in zip(users, heads, strict=True) for _ in h]
    pair_items = [i for h in heads for i, _ in h]
    if not pair_items:
        return [[] for _ in users]
    scores = ranker.score(feature_rows(source, ranker.inputs, user_ids=pair_users, item_ids=pair_items))
    out: list[list[tuple[str, float]]] = []
    start = 0
    for head, cands in zip(heads, candidates, strict=True):
        s = scores[start : start + len(head)]
        start += len(head)
        fused = rank_fusion(s, np.array([sc for _, sc in head]), retrieval_weight)
        order = np.argsort(-fused, kind="stable")
        # Past the ranked head the retrieval order continues, scored below every head item.
        floor = float(fused.min()) if len(fused) else 0.0
        tail = [(i, floor - 1.0 - n * 1e-6) for n, (i, _) in enumerate(cands[depth:])]
        out.append([(head[j][0], float(fused[j])) for j in order] + tail)
    return out
