"""What the gateway keeps in memory: pushed model versions, the item catalog, popularity.

A recommendation request must not read 1000 item rows from the feature store (tens to
hundreds of ms through Feast), so the gateway holds the *item* side of every feature in
process, as columns aligned by item position, and reads only the *user's* row per request.
The cache is rebuilt when a materialization lands (the Feast materialize manifest changes)
and swapped in whole, so a request always sees one consistent snapshot.

The catalog is what the retrieval model can return: the item ids exported with the
retrieval version (``assets.extra/item_ids.json``), beside their embeddings, which the
gateway also uses for similarity (MMR diversity, content neighbours, ``/similar``) and for
exact search when the model server cannot serve the retrieval version.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.artifacts import EMBEDDINGS_FILE, ITEM_IDS_FILE, REQUIREMENTS, assets_extra
from recsys.config import Settings
from recsys.contracts import category_set
from recsys.feature_schema import (
    ITEM_ATTRIBUTE_FEATURES,
    POSITIVE_EVENT_TYPES,
    RANK_CANDIDATES_SIGNATURE,
    item_popularity_features,
)
from recsys.model_registry import MODELS_CONFIG, read_models_config
from recsys.neighbours import ItemNeighbours, read_item_neighbours
from recsys.ranking import ServingPolicy, read_serving_policy, unit_directions

log = logging.getLogger("serving.gateway")


# --------------------------------------------------------------------------------------------
# Model versions
# --------------------------------------------------------------------------------------------


class RetrievalAssets:
    """One pushed retrieval version as the gateway uses it, without the model server.

    ``embeddings`` are the candidate tower's outputs in index order; ``unit`` the same rows
    without the item-bias coordinate (a per-item prior, not a direction of taste) and
    L2-normalized, so ``unit @ unit[i]`` is the content/taste similarity of every item to i.
    The query tower (``assets.extra/query_tower``, no custom ops) is loaded on demand for
    exact search, the fallback when a server cannot load the ScaNN index.
    """

    def __init__(self, version_dir: Path) -> None:
        self.version_dir = Path(version_dir)
        self.version = int(self.version_dir.name)
        extra = assets_extra(self.version_dir)
        self.requirements: dict[str, Any] = json.loads((extra / REQUIREMENTS).read_text())
        self.inputs: dict[str, str] = dict(self.requirements.get("inputs", {}))
        self.item_ids = np.asarray(json.loads((extra / ITEM_IDS_FILE).read_text()), dtype=object)
        self.position = {str(i): n for n, i in enumerate(self.item_ids)}
        self.embeddings = np.load(extra / EMBEDDINGS_FILE).astype(np.float32)
        self.unit = unit_directions(self.embeddings)
        # The ordering steps the evaluation chose for this version (None: pushed before
        # versions carried one; the configuration's values then apply).
        self.serving_policy: ServingPolicy | None = read_serving_policy(self.version_dir)
        # The item-to-item candidate source pushed with this version (None: pushed without one).
        self.item_to_item: ItemNeighbours | None = read_item_neighbours(extra)
        self._query_tower: Any = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.item_ids)

    def query_tower(self) -> Any:
        """The query tower's ``serving_default`` (loads TensorFlow on first use)."""
        with self._lock:
            if self._query_tower is None:
                os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
                import tensorflow as tf

                path = assets_extra(self.version_dir) / "query_tower"
                self._query_tower = tf.saved_model.load(str(path)).signatures["serving_default"]
            return self._query_tower

    def exact_search(self, features: dict[str, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact dot-product top-``k`` for one query row: (item positions, scores), best first."""
        import tensorflow as tf

        fn = self.query_tower()
        q = fn(**{name: tf.constant(v) for name, v in features.items()})["embedding"].numpy()[0]
        scores = self.embeddings @ q
        return top_k(scores, k)

    def neighbours(
        self, positions: Sequence[int], k: int, exclude: Iterable[int] = ()
    ) -> list[tuple[int, float, int]]:
        """Items nearest to any of ``positions`` (max cosine): (position, similarity, nearest source)."""
        if not positions or k <= 0:
            return []
        sims = self.unit @ self.unit[list(positions)].T  # [N, S]
        best_src = sims.argmax(axis=1)
        best = sims[np.arange(len(sims)), best_src]
        best[list(positions)] = -np.inf
        for e in exclude:
            best[e] = -np.inf
        idx, scores = top_k(best, k)
        return [
            (int(i), float(s), int(positions[best_src[i]]))
            for i, s in zip(idx, scores, strict=True)
            if np.isfinite(s)
        ]


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the ``k`` largest scores, best first (argpartition, then sort)."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=scores.dtype)
    part = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    order = part[np.argsort(-scores[part], kind="stable")]
    return order, scores[order]


@dataclass
class ModelVersions:
    """The labels of ``models.config`` and the retrieval assets of the labelled versions."""

    labels: dict[str, dict[str, int]]  # model -> {label: version}
    retrieval: dict[int, RetrievalAssets]  # version -> assets
    ranking_inputs: dict[int, dict[str, str]]  # version -> {input: dtype}
    mtime: float = 0.0
    # version -> user and context inputs of its ``rank_candidates`` signature (sent once, [1]);
    # absent for a version pushed without that signature (then pair rows go to ``rank``).
    ranking_user_inputs: dict[int, frozenset[str]] = field(default_factory=dict)

    def version(self, model: str, label: str) -> int | None:
        labels = self.labels.get(model, {})
        return labels.get(label, labels.get("stable"))


def load_model_versions(
    base_path: Path, retrieval_model: str, ranking_model: str, previous: ModelVersions | None = None
) -> ModelVersions:
    """Read ``models.config`` and load the assets of each labelled version (reusing loaded ones)."""
    config_path = Path(base_path) / MODELS_CONFIG
    models = read_models_config(Path(base_path))
    labels = {name: {k: int(v) for k, v in m["labels"].items()} for name, m in models.items()}
    if retrieval_model not in labels:
        raise FileNotFoundError(f"model {retrieval_model!r} is not in {config_path}: push models first")
    retrieval: dict[int, RetrievalAssets] = {}
    stable = labels[retrieval_model].get("stable")
    for v in sorted(set(labels[retrieval_model].values())):
        if previous is not None and v in previous.retrieval:
            retrieval[v] = previous.retrieval[v]
            continue
        try:
            retrieval[v] = RetrievalAssets(Path(base_path) / retrieval_model / str(v))
        except Exception as e:
            # A corrupted or foreign canary must not take the stable model down with it: the
            # gateway keeps serving what loads and reports the rest (the admin reload refuses it).
            if v == stable or len(set(labels[retrieval_model].values())) == 1:
                raise
            log.error("%s version %s cannot be loaded, skipped: %r", retrieval_model, v, e)
    ranking_inputs: dict[int, dict[str, str]] = {}
    ranking_user_inputs: dict[int, frozenset[str]] = {}
    for v in sorted(set(labels.get(ranking_model, {}).values())):
        req = assets_extra(Path(base_path) / ranking_model / str(v)) / REQUIREMENTS
        if req.is_file():
            spec = json.loads(req.read_text())
            ranking_inputs[v] = dict(spec.get("inputs", {}))
            if RANK_CANDIDATES_SIGNATURE in spec:
                ranking_user_inputs[v] = frozenset(spec[RANK_CANDIDATES_SIGNATURE]["user_inputs"])
    return ModelVersions(labels, retrieval, ranking_inputs, config_path.stat().st_mtime, ranking_user_inputs)


# --------------------------------------------------------------------------------------------
# Item features and popularity
# --------------------------------------------------------------------------------------------


@dataclass
class ItemCatalog:
    """Item features of the whole catalog as columns aligned by position, plus popularity.

    ``columns`` holds each online item feature (``item_attributes`` and ``item_popularity``)
    as one array; ``positives`` the popularity signal (positives in the largest window);
    ``new`` marks items to explore: published within ``new_item_days`` of the newest item,
    or never shown nor engaged with. ``segment_popular`` maps a segment value (a country) to
    item positions by positive events of users in that segment, most first.
    ``category_index`` maps each category the catalog carries to its items' positions, built
    with the catalog: a request's category filter is a lookup there, never a scan, and nothing
    is cached per value a request names (an unknown category matches no item).
    """

    item_ids: np.ndarray
    position: dict[str, int]
    columns: dict[str, np.ndarray]
    in_stock: np.ndarray
    category_sets: list[frozenset[str]]
    positives: np.ndarray
    new: np.ndarray
    global_popular: np.ndarray
    segment_popular: dict[str, np.ndarray]
    source_mtime: float
    category_index: dict[str, np.ndarray] = field(default_factory=dict)
    _request_columns: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    _new_positions: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not self.category_index:
            self.category_index = build_category_index(self.category_sets)

    def __len__(self) -> int:
        return len(self.item_ids)

    def request_column(self, name: str, dtype: str) -> np.ndarray:
        """A whole column as a model request carries it (UTF-8 bytes, int64 or float32), built
        once per catalog: a ranking request then gathers 1000 rows without converting each."""
        key = (name, dtype)
        col = self._request_columns.get(key)
        if col is None:
            values = self.item_ids if name == "item_id" else self.columns[name]
            if dtype == "string":
                col = np.empty(len(values), dtype=object)
                col[:] = [str(v).encode() for v in values]
            else:
                col = values.astype(np.int64 if dtype.startswith("int") else np.float32)
            self._request_columns[key] = col  # a race only builds the same column twice
        return col

    @property
    def new_positions(self) -> np.ndarray:
        """Positions of the ``new`` items, computed once: exploration draws from these."""
        if self._new_positions is None:
            self._new_positions = np.flatnonzero(self.new)
        return self._new_positions

    def category_mask(self, category: str) -> np.ndarray:
        """True where an item carries ``category`` (any of its '|'-joined ones): a lookup in
        ``category_index``, a fresh array each call (the caller may change it)."""
        mask = np.zeros(len(self), dtype=bool)
        positions = self.category_index.get(category)
        if positions is not None:
            mask[positions] = True
        return mask

    def positions(self, ids: Iterable[str]) -> np.ndarray:
        """Positions of known ids (unknown ids are dropped)."""
        pos = self.position
        return np.fromiter((pos[i] for i in ids if i in pos), dtype=np.int64)


def build_category_index(category_sets: Sequence[frozenset[str]]) -> dict[str, np.ndarray]:
    """Each category to the positions of the items that carry it, ascending."""
    lists: dict[str, list[int]] = {}
    for n, cats in enumerate(category_sets):
        for c in cats:
            lists.setdefault(c, []).append(n)
    return {c: np.asarray(p, dtype=np.int64) for c, p in lists.items()}


class Pacer:
    """Sleeps after each step of a long job for ``ratio`` times as long as the step took.

    A job of seconds of Python beside traffic (the item cache rebuilt while the gateway
    serves) then holds the GIL ``1 / (1 + ratio)`` of the time and the requests get the rest;
    with ``ratio`` 0 it never sleeps.
    """

    def __init__(self, ratio: float = 0.0) -> None:
        self.ratio = ratio
        self.began = time.perf_counter()

    def step(self) -> None:
        if self.ratio > 0:
            time.sleep((time.perf_counter() - self.began) * self.ratio)
        self.began = time.perf_counter()


def read_item_features(
    store: Any,
    item_ids: Sequence[str],
    windows_days: Sequence[int],
    chunk: int = 5000,
    pacer: Pacer | None = None,
) -> tuple[dict[str, list[Any]], list[int]]:
    """Every item's online features (attributes, popularity) and its attributes' timestamp (s),
    read ``chunk`` items at a time (``pacer``: a step per chunk)."""
    from feast.online_response import TIMESTAMP_POSTFIX

    refs = [f"item_attributes:{f}" for f in ITEM_ATTRIBUTE_FEATURES] + [
        f"item_popularity:{f}" for f in item_popularity_features(list(windows_days))
    ]
    out: dict[str, list[Any]] = {r.split(":", 1)[1]: [] for r in refs}
    stamps: list[int] = []
    pacer = pacer or Pacer()
    for start in range(0, len(item_ids), chunk):
        rows = [{"item_id": str(i)} for i in item_ids[start : start + chunk]]
        got = store.get_online_features(features=refs, entity_rows=rows).to_dict(
            include_event_timestamps=True
        )
        for name in out:
            out[name].extend(got[name])
        stamps.extend(got["title" + TIMESTAMP_POSTFIX])
        pacer.step()
    return out, stamps


def segment_popularity(settings: Settings, position: dict[str, int], n_items: int) -> dict[str, np.ndarray]:
    """Item positions by positives per segment over the last ``popularity_days`` of validated data.

    Read from the latest validated events joined with users' ``segment_feature``; an empty
    dict when there is no validated data (segments then fall back to global popularity).
    """
    from recsys.layout import latest_validated_dir

    gw = settings.gateway
    try:
        data = latest_validated_dir(settings)
    except FileNotFoundError:
        return {}
    try:
        users = pd.read_parquet(data / "users", columns=["user_id", gw.segment_feature])
    except (OSError, ValueError, KeyError):
        return {}
    events = pd.read_parquet(data / "events", columns=["user_id", "item_id", "event_type", "ts"])
    if events.empty:
        return {}
    since = events["ts"].max() - pd.Timedelta(days=gw.popularity_days)
    ev = events[(events["ts"] > since) & events["event_type"].astype(str).isin(POSITIVE_EVENT_TYPES)]
    ev = ev.merge(users.astype(str), on="user_id", how="inner")
    ev = ev.assign(pos=ev["item_id"].astype(str).map(position)).dropna(subset=["pos"])
    out: dict[str, np.ndarray] = {}
    for segment, group in ev.groupby(gw.segment_feature):
        counts = np.bincount(group["pos"].astype(np.int64), minlength=n_items)
        order = np.argsort(-counts, kind="stable")
        out[str(segment)] = order[counts[order] > 0]
    return out


def build_item_catalog(
    settings: Settings,
    store: Any,
    item_ids: np.ndarray,
    source_mtime: float = 0.0,
    pause_ratio: float = 0.0,
) -> ItemCatalog:
    """Read the catalog's item features from the online store and derive popularity and novelty.

    ``pause_ratio`` above 0 paces the work (``Pacer``): the read in chunks of 1,000 items and
    each later step, so that a rebuild beside traffic leaves the GIL to the requests.
    """
    windows = sorted(settings.features.windows_days)
    ids = [str(i) for i in item_ids]
    pacer = Pacer(pause_ratio)
    raw, stamps = read_item_features(store, ids, windows, 1000 if pause_ratio > 0 else 5000, pacer)
    n = len(ids)
    columns: dict[str, np.ndarray] = {}
    for name, values in raw.items():
        pacer.step()
        if name == "in_stock":
            columns[name] = np.array([bool(v) for v in values], dtype=bool)
        elif name in ITEM_ATTRIBUTE_FEATURES:
            col = np.empty(n, dtype=object)
            col[:] = ["" if v is None else str(v) for v in values]
            columns[name] = col
        else:
            columns[name] = np.array([0.0 if v is None else float(v) for v in values], dtype=np.float32)
    # An item with no attributes row yet (published after the last materialization) is
    # unknown to the business rules: it stays recommendable, as in stock, until the next one.
    known = np.array([bool(t) for t in stamps], dtype=bool)
    in_stock = columns["in_stock"] | ~known
    window = max([w for w in windows if w <= settings.gateway.popularity_days] or windows[:1])
    positives = columns.get(f"item_positives_{window}d", np.zeros(n, dtype=np.float32))
    shown = columns.get(f"item_impressions_{windows[-1]}d", np.zeros(n, dtype=np.float32)) + columns.get(
        f"item_positives_{windows[-1]}d", np.zeros(n, dtype=np.float32)
    )
    published = np.array([float(t) if t else np.nan for t in stamps])
    newest = np.nanmax(published) if np.isfinite(published).any() else np.nan
    recent = published >= newest - settings.gateway.new_item_days * 86400.0 if np.isfinite(newest) else False
    new = (shown == 0) | np.asarray(recent, dtype=bool)
    position = {i: k for k, i in enumerate(ids)}
    global_popular = np.argsort(-positives, kind="stable")
    pacer.step()
    category_sets = [category_set(c) for c in columns["category"]]
    pacer.step()
    segment_popular = segment_popularity(settings, position, n)
    pacer.step()
    return ItemCatalog(
        item_ids=np.asarray(ids, dtype=object),
        position=position,
        columns=columns,
        in_stock=in_stock,
        category_sets=category_sets,
        positives=positives,
        new=new,
        global_popular=global_popular,
        segment_popular=segment_popular,
        source_mtime=source_mtime,
    )
