"""Step: train the two-tower retriever and the multi-objective ranker from a training frame.

The input is the feature layer's training frame
(``components.features.training_data.build_training_data``): one row per event with the
event's columns, its context (``hour``, ``device``) and every feature as it was known
strictly before the event. Two models learn from it:

- the retriever, from the *positive* events (``POSITIVE_EVENT_TYPES``): "this user, in
  this state, engaged with this item", contrasted with the other items of the batch;
- the ranker, from *impressions* and what followed them (clicked or not, how much
  engagement), or, where the data has no impressions (MovieLens), from positives against
  sampled negatives.

The last ``validation_fraction`` of the events (by time) is held out for early stopping:
a random split would let the model peek at the future it is judged on.

Output contract (``out_dir``; ``manifest.json`` is written last):

- ``query_tower/``: SavedModel, ``serving_default(**QUERY_INPUTS) -> {"embedding": [B, D]}``
- ``candidate_tower/``: SavedModel, ``serving_default(**CANDIDATE_INPUTS) -> {"embedding": [B, D]}``
- ``item_embeddings.parquet``: ``item_id``, ``embedding`` (float32, length D) for every item
  of the catalog, touched or not;
- ``ranker/``: SavedModel, ``serving_default(**ranker_inputs) -> {objective: [B], ..., "score": [B]}``
  (one row per (user, candidate) pair), and ``rank_candidates`` with the same inputs and
  outputs, user and context inputs ``[1]`` and candidate inputs ``[N]`` (the user side once);
- ``checkpoints/retriever/``, ``checkpoints/ranker/``: each model's Keras weights and the
  vocabularies it was built from, what a later incremental run warm-starts from
  (``components.training.warm_start``);
- ``manifest.json``: input names and dtypes, D, objectives and weights, metrics, counts, and
  how the models were trained (full or incremental, and the full retrain they descend from).

Build the input tensors of any of the three with ``features_from_frame(df, inputs)`` (or the
towers' ``query_features_from_frame`` / ``candidate_features_from_frame`` shortcuts), so
training, evaluation and serving agree.

With ``training.workers > 1`` the same code runs in that many processes under
``tf.distribute.MultiWorkerMirroredStrategy`` (``components.training.multi_worker``); the
output contract is the same, and the manifest adds ``details.distribution``.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from components.evaluation.splits import held_out_pairs
from components.training.neighbours import train_item_neighbours
from components.training.warm_start import (
    CHECKPOINTS,
    MODELS,
    CopyReport,
    TrainingPlan,
    WarmStartError,
    save_checkpoint,
    warm_model,
)
from recsys.config import TrainingConfig
from recsys.contracts import CATEGORY_SEPARATOR
from recsys.feature_schema import POSITIVE_EVENT_TYPES, RANK_CANDIDATES_SIGNATURE
from recsys.manifests import Interval, TrainManifest
from recsys.storage import code_version, write_manifest

if TYPE_CHECKING:
    import tensorflow as tf

# The query tower's inputs: who (id, profile), what they did lately and how long ago (the
# seconds since each recent item, aligned with recent_items: recsys.item_ages; the bag tower
# takes it and does not read it), and the request context.
QUERY_INPUTS: dict[str, str] = {
    "user_id": "string",
    "age_bucket": "string",
    "country": "string",
    "recent_items": "string",
    "recent_item_ages": "string",
    "hour": "int64",
    "device": "string",
}
# The query inputs the ranker reads (it has no use for the recent items' ages).
RANKER_QUERY_INPUTS: dict[str, str] = {k: v for k, v in QUERY_INPUTS.items() if k != "recent_item_ages"}
# The candidate tower's inputs: the item's id and content.
CANDIDATE_INPUTS: dict[str, str] = {
    "item_id": "string",
    "category": "string",
    "title": "string",
    "description": "string",
}
PROFILE_FEATURES = ("age_bucket", "country", "device")
# Numeric features the ranker takes when the frame has them (names from feature_schema).
NUMERIC_FEATURE = re.compile(r"^(user_(events|positives|purchases)|item_(impressions|positives|ctr))_\d+d$")
# Engagement credited per outcome when it carries no measured value (see ranker_examples).
OUTCOME_ENGAGEMENT = {"purchase": 1.0, "add_to_cart": 0.8, "like": 0.8, "click": 0.1}
RATING_MAX = 5.0


def use_legacy_keras() -> None:
    """TFRS needs Keras 2: select tf_keras before TensorFlow is first imported."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


# --------------------------------------------------------------------------------------------
# Frames to tensors: one way for training, evaluation and serving.
# --------------------------------------------------------------------------------------------


def features_from_frame(df: pd.DataFrame, inputs: Mapping[str, str]) -> dict[str, np.ndarray]:
    """The named 1-D arrays a SavedModel signature takes, from the rows of ``df``.

    Missing columns and nulls take the feature layer's defaults ("" for text, 0 for numbers),
    exactly what a model saw in training for "not known yet".

    Args:
        df: one row per example (query, item or (user, item) pair).
        inputs: name -> dtype ("string", "int64", "float32"), e.g. a manifest's ``query_inputs``.

    Returns:
        name -> array of len(df): object arrays of str, int64 or float32.
    """
    out: dict[str, np.ndarray] = {}
    n = len(df)
    for name, dtype in inputs.items():
        col = df[name] if name in df.columns else pd.Series([None] * n, index=df.index, dtype=object)
        if dtype == "string":
            out[name] = col.astype(object).where(col.notna(), "").astype(str).to_numpy(dtype=object)
        elif dtype == "int64":
            out[name] = pd.to_numeric(col, errors="coerce").fillna(0).to_numpy(dtype=np.int64)
        elif dtype == "float32":
            out[name] = pd.to_numeric(col, errors="coerce").fillna(0.0).to_numpy(dtype=np.float32)
        else:
            raise ValueError(f"input {name}: unknown dtype {dtype!r}")
    return out


def query_features_from_frame(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """The query tower's inputs (``QUERY_INPUTS``) from rows of a training or request frame."""
    return features_from_frame(df, QUERY_INPUTS)


def candidate_features_from_frame(items: pd.DataFrame) -> dict[str, np.ndarray]:
    """The candidate tower's inputs (``CANDIDATE_INPUTS``) from rows of an items frame."""
    return features_from_frame(items, CANDIDATE_INPUTS)


def numeric_feature_names(df: pd.DataFrame) -> list[str]:
    """The engagement and popularity features of a frame, user ones first (the ranker splits them)."""
    names = [c for c in df.columns if NUMERIC_FEATURE.match(str(c))]
    return sorted(names, key=lambda n: (not n.startswith("user_"), n))


def ranker_input_spec(numeric_features: list[str]) -> dict[str, str]:
    return {
        **RANKER_QUERY_INPUTS,
        "item_id": "string",
        "category": "string",
        **{n: "float32" for n in numeric_features},
    }


# --------------------------------------------------------------------------------------------
# Examples
# --------------------------------------------------------------------------------------------


def positives_frame(frame: pd.DataFrame, drop_repeats: bool = False) -> pd.DataFrame:
    """The retriever's examples: positive events, one per (user, item, session), in time order.

    One interaction often writes several positive events (click, view, rating, purchase);
    counting each would weigh items by how many event types follow them, not by interest.
    With ``drop_repeats`` only a user's first positive with an item is kept: serving filters
    out what the user already engaged with, so the retriever should learn discovery, not
    "show the user's recent items again" (which the history feature makes trivially easy).
    """
    pos = frame[frame["event_type"].astype(str).isin(POSITIVE_EVENT_TYPES)]
    pos = pos.sort_values(["ts", "event_id"], kind="stable")
    keys = ["user_id", "item_id"] if drop_repeats else ["user_id", "item_id", "session_id"]
    pos = pos.drop_duplicates(keys, keep="first")
    return pos.reset_index(drop=True)


def validation_split(
    df: pd.DataFrame, fraction: float, how: str = "time", seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training, validation) rows of ``df``: with ``how="time"`` the validation holds the last
    ``fraction`` by ``ts``; with ``"random"`` the rows of a seeded ``fraction`` of the (user,
    item) pairs (``held_out_pairs``, which the evaluation's validation split draws alike)."""
    df = df.sort_values(["ts", "event_id"], kind="stable").reset_index(drop=True)
    if fraction <= 0 or len(df) < 2:
        return df, df.iloc[0:0]
    if how == "random":
        held = held_out_pairs(df, fraction, seed)
        return df[~held].reset_index(drop=True), df[held].reset_index(drop=True)
    cut = int(round(len(df) * (1 - fraction)))
    cut = min(max(cut, 1), len(df) - 1)
    return df.iloc[:cut].reset_index(drop=True), df.iloc[cut:].reset_index(drop=True)


def engagement_of(events: pd.DataFrame, dwell_cap: float) -> pd.Series:
    """Engagement in [0, 1] of each outcome event: log dwell, stars, or a fixed credit."""
    et = events["event_type"].astype(str)
    value = pd.to_numeric(events["value"], errors="coerce").fillna(0.0)
    eng = et.map(OUTCOME_ENGAGEMENT).fillna(0.0).astype(float)
    dwell = np.minimum(np.log1p(value.clip(lower=0)) / math.log1p(dwell_cap), 1.0)
    eng = eng.where(et != "view", dwell)
    eng = eng.where(et != "rating", (value / RATING_MAX).clip(0, 1))
    return eng


def ranker_examples(
    frame: pd.DataFrame, config: TrainingConfig, item_columns: list[str]
) -> tuple[pd.DataFrame, str]:
    """Labelled (user, item) examples for the ranker, in time order, and how they were made.

    With impressions: each impression is an example; ``label_click`` is 1 when a click on
    the same item followed in the same request (``request_id``, or the session when a
    request id is missing) and ``label_engagement`` the largest engagement of its outcomes
    (view dwell on a log scale up to ``engagement_dwell_cap_seconds``, stars / 5, a fixed
    credit for carts, purchases and likes), 0 when not clicked.

    Without impressions (rating data): each positive is an example with click 1 and its
    engagement, plus ``negatives_per_positive`` negatives that take the item columns of
    other positives close in time (so negatives follow popularity, as retrieved candidates
    do, and carry item features as of that time), skipping items the user touched.
    """
    et = frame["event_type"].astype(str)
    if (et == "impression").any():
        return _impression_examples(frame, config), "impressions"
    return _sampled_negative_examples(frame, config, item_columns), "sampled_negatives"


def _impression_examples(frame: pd.DataFrame, config: TrainingConfig) -> pd.DataFrame:
    """Each impression, labelled by the outcomes that followed it in the same request."""
    et = frame["event_type"].astype(str)
    key_of = frame["request_id"].astype(object).where(frame["request_id"].notna(), frame["session_id"])
    keyed = frame.assign(_key=key_of.astype(str))
    impressions = keyed[et == "impression"]
    outcomes = keyed[et.isin(["click", "view", "rating", "add_to_cart", "purchase", "like"])]
    outcomes = outcomes.assign(_eng=engagement_of(outcomes, config.engagement_dwell_cap_seconds))
    agg = outcomes.groupby(["_key", "user_id", "item_id"], observed=True).agg(
        _clicked=("event_type", lambda s: bool((s.astype(str) == "click").any())),
        _eng=("_eng", "max"),
    )
    ex = impressions.merge(agg.reset_index(), on=["_key", "user_id", "item_id"], how="left")
    clicked = ex["_clicked"].astype(object).where(ex["_clicked"].notna(), False).astype(bool)
    ex["label_click"] = clicked.astype(np.float32)
    ex["label_engagement"] = np.where(clicked, ex["_eng"].fillna(0.0), 0.0).astype(np.float32)
    ex = ex.drop(columns=["_key", "_clicked", "_eng"])
    return ex.sort_values(["ts", "event_id"], kind="stable").reset_index(drop=True)


def _sampled_negative_examples(
    frame: pd.DataFrame, config: TrainingConfig, item_columns: list[str]
) -> pd.DataFrame:
    """Each positive, and negatives that take the item columns of positives close in time."""
    pos = positives_frame(frame)
    pos = pos.assign(
        label_click=np.float32(1.0),
        label_engagement=engagement_of(pos, config.engagement_dwell_cap_seconds).astype(np.float32),
    )
    rng = np.random.default_rng(config.seed)
    n = len(pos)
    window = max(50, n // 50)
    touched = set(zip(pos["user_id"].astype(str), pos["item_id"].astype(str), strict=True))
    negatives = []
    for _ in range(config.negatives_per_positive):
        j = np.clip(np.arange(n) + rng.integers(-window, window + 1, size=n), 0, n - 1)
        neg = pos.copy()
        donor = pos.iloc[j].reset_index(drop=True)
        for c in item_columns:
            if c in neg.columns:
                neg[c] = donor[c].to_numpy()
        keep = [
            (u, i) not in touched
            for u, i in zip(neg["user_id"].astype(str), neg["item_id"].astype(str), strict=True)
        ]
        neg = neg[np.asarray(keep, dtype=bool)]
        neg["label_click"] = np.float32(0.0)
        neg["label_engagement"] = np.float32(0.0)
        neg["event_id"] = neg["event_id"].astype(str) + f"-neg{len(negatives)}"
        negatives.append(neg)
    ex = pd.concat([pos, *negatives], ignore_index=True)
    return ex.sort_values(["ts", "event_id"], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Keras plumbing
# --------------------------------------------------------------------------------------------


def _dataset(arrays: Mapping[str, Any], batch_size: int, shuffle: bool, seed: int) -> tf.data.Dataset:
    """Batches of the rows of ``arrays`` (name -> array, or a nested dict of them), reshuffled each epoch.

    The arrays become tensors once; an epoch shuffles row *indices* and each batch gathers
    its rows, so no example passes through tf.data on its own (a per-example shuffle buffer
    of dicts costs more than a step of the retriever on integer inputs). The batches are
    those of shuffling the rows themselves with the same seed.
    """
    import tensorflow as tf

    tensors = tf.nest.map_structure(tf.convert_to_tensor, dict(arrays))
    n = int(tf.nest.flatten(tensors)[0].shape[0])
    rows = tf.data.Dataset.range(n)
    if shuffle:
        rows = rows.shuffle(n, seed=seed, reshuffle_each_iteration=True)

    def gather(indices: tf.Tensor) -> Any:
        return tf.nest.map_structure(lambda t: tf.gather(t, indices), tensors)

    return _sharded_by_data(rows.batch(batch_size).map(gather).prefetch(2))


def _sharded_by_data(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``dataset`` as ``training.workers > 1`` splits it: every worker keeps its share of each batch.

    Under ``tf.distribute`` a batch is the global batch: it is cut into one slice per worker
    and each worker keeps its own (``AutoShardPolicy.DATA``). The rows are in-memory tensors,
    with no files to shard by (the default policy falls back to this after a warning), and
    every worker builds the same seeded order, which sharding by data needs. One process: no effect.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def _epoch_logger(name: str, log: Callable[[str], None]) -> Any:
    import tf_keras as keras

    class EpochLogger(keras.callbacks.Callback):
        """One line per epoch: the losses a person watches to see a model converge."""

        def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
            self._t0 = time.perf_counter()

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            shown = " ".join(
                f"{k}={v:.4f}"
                for k, v in sorted((logs or {}).items())
                if not k.endswith(("regularization_loss", "total_loss"))
            )
            log(f"[{name}] epoch {epoch + 1}: {shown} ({time.perf_counter() - self._t0:.1f}s)")

    return EpochLogger()


def _fit(
    model: Any,
    train: tf.data.Dataset,
    val: tf.data.Dataset | None,
    epochs: int,
    patience: int,
    name: str,
    log: Callable[[str], None],
    ranking: Any | None = None,
) -> dict[str, Any]:
    """Fit with early stopping; returns the metrics at the best epoch and its number.

    Early stopping watches the validation loss, or with ``ranking`` (``_held_out_ranking``:
    a callback that adds ``val_ndcg_at_10`` and ``val_recall_at_10`` to each epoch's logs)
    the held-out positives' NDCG@10, the larger the better.
    """
    import tf_keras as keras

    ranked = ranking is not None and val is not None
    monitor, mode = ("val_ndcg_at_10", "max") if ranked else ("val_loss", "min")
    # The ranking callback first: the epoch line and early stopping read what it logs.
    callbacks = [ranking] if ranked else []
    callbacks.append(_epoch_logger(name, log))
    if val is not None:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=monitor, patience=patience, restore_best_weights=True, mode=mode
            )
        )
    hist = model.fit(train, validation_data=val, epochs=epochs, callbacks=callbacks, verbose=0).history
    if ranked:
        best = int(np.argmax(hist[monitor]))
    else:
        best = int(np.argmin(hist.get("val_loss") or hist["loss"]))
    out: dict[str, Any] = {"epochs_run": len(hist["loss"]), "best_epoch": best + 1}
    for k, v in hist.items():
        if not k.endswith(("regularization_loss", "total_loss")):  # zero / equal to loss here
            out[k] = float(v[best])
    return out


def full_ranking_metrics(
    queries: np.ndarray,
    items: np.ndarray,
    targets: np.ndarray,
    masked_queries: np.ndarray,
    masked_items: np.ndarray,
    k: int = 10,
    chunk: int = 1024,
) -> dict[str, float]:
    """NDCG@k and recall@k of each query's one target item ranked against every catalog item.

    A query's score of an item is their dot product. The target's rank is the number of
    unmasked items scoring strictly above it (ties in the target's favour), as
    ``bench.sequential_quality`` counts it; with one relevant item, NDCG@k is
    ``1 / log2(rank + 2)`` when ``rank < k`` and recall@k (HR@k) is whether ``rank < k``.

    Args:
        queries: ``[N, D]`` query embeddings.
        items: ``[I, D]`` every catalog item's embedding.
        targets: ``[N]`` the catalog row of each query's target; -1 (not in the catalog): a miss.
        masked_queries, masked_items: (query, catalog row) pairs taken out of the ranking, such
            as the user's earlier positives; a pair naming its query's target is ignored.
        k: the cut-off.
        chunk: queries scored at once (``[chunk, I]`` scores in memory).

    Returns:
        ``{"ndcg": ..., "recall": ...}``, means over the queries (0 without queries).
    """
    n = len(targets)
    if n == 0:
        return {"ndcg": 0.0, "recall": 0.0}
    order = np.argsort(masked_queries, kind="stable")
    masked_queries, masked_items = masked_queries[order], masked_items[order]
    ranks = np.empty(n, dtype=np.int64)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        scores = queries[lo:hi] @ items.T
        target = targets[lo:hi]
        start, end = np.searchsorted(masked_queries, [lo, hi])
        row, item = masked_queries[start:end] - lo, masked_items[start:end]
        keep = (item >= 0) & (item != target[row])
        scores[row[keep], item[keep]] = -np.inf
        known = target >= 0
        own = scores[np.arange(hi - lo), np.where(known, target, 0)]
        # An unknown target is a miss whatever the cut-off.
        ranks[lo:hi] = np.where(known, (scores > own[:, None]).sum(axis=1), max(len(items), k))
    hit = ranks < k
    gain = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
    return {"ndcg": float(gain.mean()), "recall": float(hit.mean())}


def earlier_positives(users: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(query, row) pairs: for query ``q``, every row of ``rows[q]``'s user before ``rows[q]``.

    ``users`` holds the user of each row, rows in time order; what the validation ranking
    masks for a held-out positive is its user's earlier positives, as the sequential
    protocol masks the user's history. Vectorised: rows grouped by user, each query's pairs
    a run of its user's group.
    """
    codes = pd.factorize(users)[0]
    order = np.argsort(codes, kind="stable")  # rows by user, in time order within a user
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    first = np.searchsorted(codes[order], codes)  # where each row's user starts in ``order``
    counts = position[rows] - first[rows]
    queries = np.repeat(np.arange(len(rows)), counts)
    offsets = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
    return queries, order[np.repeat(first[rows], counts) + offsets]


def _export(model: Any, inputs: Mapping[str, str], path: Path, embedding: bool) -> None:
    """Save ``model`` as a SavedModel whose ``serving_default`` takes named 1-D tensors."""
    import tensorflow as tf

    specs = {k: tf.TensorSpec([None], tf.as_dtype(v), name=k) for k, v in inputs.items()}

    @tf.function
    def serve(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        out = model(features, training=False)
        return {"embedding": out} if embedding else out

    signatures = {"serving_default": serve.get_concrete_function(specs)}
    if not embedding:
        # One user against N candidates: user and context inputs are [1], candidate inputs [N].
        item_specs = {k: s for k, s in specs.items() if model.is_item_input(k)}
        user_specs = {k: tf.TensorSpec([1], s.dtype, name=k) for k, s in specs.items() if k not in item_specs}

        @tf.function
        def score_candidates(user: dict[str, tf.Tensor], items: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            return model.score_candidates(user, items)

        signatures[RANK_CANDIDATES_SIGNATURE] = score_candidates.get_concrete_function(user_specs, item_specs)
    tf.saved_model.save(model, str(path), signatures=signatures)


def _predict(fn: Callable[[dict[str, Any]], Any], arrays: Mapping[str, np.ndarray], batch: int = 4096) -> Any:
    """Run ``fn`` over arrays in batches; concatenates arrays or dicts of arrays."""
    n = len(next(iter(arrays.values())))
    parts = []
    for lo in range(0, max(n, 1), batch):
        out = fn({k: v[lo : lo + batch] for k, v in arrays.items()})
        parts.append({k: np.asarray(v) for k, v in out.items()} if isinstance(out, dict) else np.asarray(out))
    if isinstance(parts[0], dict):
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return np.concatenate(parts)


def _vocab(values: pd.Series) -> list[str]:
    v = values.astype(object).where(values.notna(), "").astype(str)
    return sorted(x for x in v.unique() if x != "")


def _categories(items: pd.DataFrame) -> list[str]:
    values = items["category"].fillna("").astype(str)
    cats = {c for value in values for c in value.split(CATEGORY_SEPARATOR) if c}
    return sorted(cats)


def _primary_categories(items: pd.DataFrame) -> dict[str, str]:
    """item id -> its first (primary) category."""
    primary = items["category"].fillna("").astype(str).str.split(CATEGORY_SEPARATOR, regex=False).str[0]
    return dict(zip(items["item_id"].astype(str), primary, strict=True))


def _default_log(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(message, highlight=False)


# --------------------------------------------------------------------------------------------
# Retriever
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Catalog:
    """The whole catalog as the towers read it: every item gets an embedding."""

    frame: pd.DataFrame  # one row per item id (str)
    categories: list[str]
    primary: dict[str, str]  # item id -> its primary category
    text: np.ndarray  # title + description per item: what the text vectorizer adapts to

    @classmethod
    def of(cls, items: pd.DataFrame) -> _Catalog:
        frame = items.assign(item_id=items["item_id"].astype(str)).drop_duplicates("item_id")
        text = (frame["title"].fillna("") + " " + frame["description"].fillna("")).to_numpy(dtype=object)
        return cls(frame, _categories(frame), _primary_categories(frame), text)


@dataclass(frozen=True)
class _Vocabulary:
    """What the retriever's lookups know, from the positives it trains on."""

    users: list[str]
    items: list[str]
    profiles: dict[str, list[str]]
    # An item's share of positives: its chance of showing up as an in-batch negative.
    sampling_probability: pd.Series
    # The catalog's categories and the text vectorizer's tokens ("" and "[UNK]" first);
    # None: from the catalog as the model is built (``with_catalog`` fixes them ahead).
    categories: list[str] | None = None
    text: list[str] | None = None

    @classmethod
    def of(cls, positives: pd.DataFrame, training_frame: pd.DataFrame) -> _Vocabulary:
        counts = positives["item_id"].astype(str).value_counts()
        return cls(
            _vocab(positives["user_id"]),
            sorted(counts.index),
            {name: _vocab(training_frame[name]) for name in PROFILE_FEATURES if name in training_frame},
            counts / counts.sum(),
        )

    def with_catalog(self, config: TrainingConfig, catalog: _Catalog) -> _Vocabulary:
        return replace(self, categories=catalog.categories, text=_text_vocabulary(config, catalog))

    def lookups(self) -> dict[str, Any]:
        """The lists the model's lookups are built from (a warm start's ``vocabularies.json``)."""
        names = ("users", "items", "profiles", "categories", "text")
        return {name: getattr(self, name) for name in names}

    def with_lookups(self, lookups: Mapping[str, Any]) -> _Vocabulary:
        return replace(self, **lookups)


def _text_vocabulary(config: TrainingConfig, catalog: _Catalog) -> list[str]:
    """The tokens of the catalog's titles and descriptions, most frequent first."""
    import tf_keras as keras

    vectorizer = keras.layers.TextVectorization(max_tokens=config.text_max_tokens)
    vectorizer.adapt(catalog.text)
    return [str(token) for token in vectorizer.get_vocabulary()]


def _build_retriever(config: TrainingConfig, vocabulary: _Vocabulary, catalog: _Catalog) -> Any:
    import tf_keras as keras

    from components.training.models import (
        CandidateTower,
        CatalogSoftmax,
        QueryTower,
        SequentialQueryTower,
        SequentialRetriever,
        TwoTowerRetriever,
        UniformNegatives,
        id_lookup,
    )

    keras.utils.set_random_seed(config.seed)
    n_oov = config.num_oov_buckets
    items = vocabulary.items
    item_lookup = id_lookup(items, n_oov, "item_lookup")
    item_table = keras.layers.Embedding(len(items) + n_oov + 1, config.id_dim, name="item_embedding")
    history_table = (
        item_table
        if config.share_item_embeddings
        else keras.layers.Embedding(len(items) + n_oov + 1, config.id_dim, name="history_embedding")
    )
    categories = vocabulary.categories if vocabulary.categories is not None else catalog.categories
    vectorizer = keras.layers.TextVectorization(
        max_tokens=config.text_max_tokens,
        output_sequence_length=config.text_sequence_length,
        vocabulary=vocabulary.text if vocabulary.text is not None else _text_vocabulary(config, catalog),
        name="text_vectorizer",
    )
    normalize = config.temperature is not None
    query_arguments: dict[str, Any] = dict(
        users=vocabulary.users,
        item_lookup=item_lookup,
        history_table=history_table,
        profile_vocab=vocabulary.profiles,
        embedding_dim=config.embedding_dim,
        id_dim=config.id_dim,
        feature_dim=config.feature_dim,
        hidden_units=config.hidden_units,
        num_oov=n_oov,
        id_dropout=config.id_dropout,
        max_history=config.max_history,
        normalize=normalize,
        item_bias=config.item_bias,
        item_categories=catalog.primary if config.history_categories else None,
        categories=categories,
    )
    query: QueryTower | SequentialQueryTower
    if config.query_tower == "sequential":
        query = SequentialQueryTower(
            **query_arguments,
            layers=config.sequence_layers,
            heads=config.sequence_heads,
            dropout=config.sequence_dropout,
            item_ages=config.sequence_item_ages,
            history_mean=config.sequence_history_mean,
        )
    else:
        query = QueryTower(**query_arguments)
    candidate = CandidateTower(
        item_lookup=item_lookup,
        item_table=item_table,
        categories=categories,
        text_vectorizer=vectorizer,
        embedding_dim=config.embedding_dim,
        feature_dim=config.feature_dim,
        text_dim=config.text_dim,
        hidden_units=config.hidden_units,
        num_oov=n_oov,
        id_dropout=config.id_dropout,
        normalize=normalize,
        item_bias=config.item_bias,
    )
    uniform: UniformNegatives | CatalogSoftmax | None = None
    if config.negatives in ("mixed", "catalog"):
        content = features_from_frame(catalog.frame, CANDIDATE_INPUTS)
        catalog_content = {name: values.tolist() for name, values in content.items()}
        if config.negatives == "catalog":
            uniform = CatalogSoftmax(catalog_content)
        else:
            probability = catalog.frame["item_id"].map(vocabulary.sampling_probability).fillna(0.0)
            uniform = UniformNegatives(catalog_content, probability.tolist(), config.uniform_negatives)
    retriever = SequentialRetriever if isinstance(query, SequentialQueryTower) else TwoTowerRetriever
    model = retriever(query, candidate, config.temperature, config.logq_correction, uniform)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=config.learning_rate))
    return model


def _retriever_dataset(
    config: TrainingConfig,
    positives: pd.DataFrame,
    catalog: _Catalog,
    vocabulary: _Vocabulary,
    shuffle: bool,
    model: Any,
) -> tf.data.Dataset:
    """The retriever's batches: encoded once into integers where ``model.encodes_ahead()``.

    Tokenizing text, splitting histories and looking strings up are the same work for an
    example in every epoch, so it is done once here with the towers' own ``encode`` and the
    steps see integers only; the exported towers still take raw strings (``call`` runs
    ``encode`` then ``embed``, the function the steps train).
    """
    from components.training.models import ENCODED_CANDIDATE, ENCODED_QUERY

    # The item's content comes from the catalog, so training and the exported item embeddings
    # read the same text for the same item.
    content = catalog.frame.set_index("item_id")[["category", "title", "description"]]
    rows = positives.drop(columns=[c for c in ("category", "title", "description") if c in positives.columns])
    rows = rows.join(content, on="item_id")
    query = features_from_frame(rows, QUERY_INPUTS)
    candidate = features_from_frame(rows, CANDIDATE_INPUTS)
    probability = vocabulary.sampling_probability
    sampling_probability = rows["item_id"].map(probability).fillna(probability.min()).to_numpy(np.float32)
    if not model.encodes_ahead():
        arrays = {**query, **candidate, "sampling_probability": sampling_probability}
        return _dataset(arrays, config.batch_size, shuffle, config.seed)
    encoded = {
        ENCODED_QUERY: _encode(model.query_model, query),
        ENCODED_CANDIDATE: _encode(model.candidate_model, candidate),
        # One integer per distinct item id: what accidental-hit removal compares.
        "item_key": pd.factorize(rows["item_id"].astype(str))[0].astype(np.int64),
        "sampling_probability": sampling_probability,
    }
    return _dataset(encoded, config.batch_size, shuffle, config.seed)


def _encode(tower: Any, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A tower's ``encode`` of every row, bags cut to their widest row.

    ``encode``'s 2-D outputs are bags of ids padded with 0, which ``bag_mean`` ignores:
    dropping the columns that are padding in every row (a history of 50 slots that holds at
    most 20 items) leaves each embedding as it was and spares the steps that work.
    """
    encoded = _predict(tower.encode, arrays)
    for name, ids in encoded.items():
        if ids.ndim == 2:
            used = np.flatnonzero((ids != 0).any(axis=0))
            encoded[name] = ids[:, : max(int(used[-1]) + 1 if used.size else 0, 1)]
    return encoded


def train_retriever(
    config: TrainingConfig,
    training_frame: pd.DataFrame,
    items_frame: pd.DataFrame,
    out_dir: Path,
    log: Callable[[str], None] | None = None,
    plan: TrainingPlan | None = None,
) -> dict[str, Any]:
    """Train the two-tower retriever; export both towers and every item's embedding.

    Args:
        config: the ``training`` section.
        training_frame: the feature layer's training frame (one row per event).
        items_frame: the whole catalog (``item_id``, ``title``, ``category``, ``description``):
            every item gets an embedding, including those no event touched.
        out_dir: the training step's folder; writes ``query_tower/``, ``candidate_tower/``
            and ``item_embeddings.parquet`` there (not the manifest: ``train_models`` does).
        log: where per-epoch lines go (default: stderr via rich).
        plan: an incremental ``TrainingPlan`` warm-starts from its serving version's checkpoint
            (``components.training.warm_start``); None or full: trained from scratch.

    Returns:
        The retriever's part of the manifest: inputs, D, metrics and example counts.
    """
    if config.query_tower == "sequential":
        return train_sequential_retriever(config, training_frame, items_frame, out_dir, log)
    return _train_retriever(config, training_frame, items_frame, out_dir, log, _positive_batches, plan)


@dataclass(frozen=True)
class _Batches:
    """A retriever's examples as batches, and what the log and the manifest say of them."""

    dataset: tf.data.Dataset
    note: str = ""  # after "N train / M validation positives" in the log line
    counts: Mapping[str, int] = field(default_factory=dict)  # extra manifest example counts
    # The positive (row of the builder's ``positives``) that each example the loss counts
    # predicts, in the dataset's order: what the validation ranking scores (``_held_out_ranking``).
    rows: np.ndarray | None = None


# How a retriever turns positives (in time order) into batches: (config, positives, scored,
# catalog, vocabulary, model, shuffle). ``scored`` marks the rows that are examples of the
# loss: every row in training; in validation, the held-out rows after the training rows
# (a sequence reads the training rows before them).
BatchBuilder = Callable[
    [TrainingConfig, pd.DataFrame, np.ndarray, _Catalog, _Vocabulary, Any, bool], _Batches
]


def _positive_batches(
    config: TrainingConfig,
    positives: pd.DataFrame,
    scored: np.ndarray,
    catalog: _Catalog,
    vocabulary: _Vocabulary,
    model: Any,
    shuffle: bool,
) -> _Batches:
    """The two-tower retriever's batches: one example per scored positive (``_retriever_dataset``)."""
    rows = positives[scored].reset_index(drop=True)
    dataset = _retriever_dataset(config, rows, catalog, vocabulary, shuffle, model)
    return _Batches(dataset, rows=np.flatnonzero(scored))


def _early_stopping_metric(config: TrainingConfig) -> str:
    """``training.early_stopping_metric``; unset: ndcg for the sequential tower, loss for the bag."""
    if config.early_stopping_metric is not None:
        return config.early_stopping_metric
    return "ndcg" if config.query_tower == "sequential" else "loss"


def _held_out_queries(model: Any, dataset: tf.data.Dataset) -> np.ndarray:
    """The query embedding of each example the validation loss counts, in the dataset's order."""
    import tensorflow as tf

    from components.training.models import ENCODED_QUERY, SequentialRetriever

    parts = []
    for batch in dataset:
        if isinstance(model, SequentialRetriever):
            # Every position of a window is a query; the held-out targets carry the weight.
            positions = model.query_model.encode_positions(batch, training=False)
            queries = tf.boolean_mask(positions, batch["target_weight"] > 0)
        elif ENCODED_QUERY in batch:
            queries = model.query_model.embed(batch[ENCODED_QUERY], training=False)
        else:
            queries = model.query_model(batch, training=False)
        parts.append(queries.numpy())
    return np.concatenate(parts)


def _held_out_ranking(val: _Batches, positives: pd.DataFrame, catalog: _Catalog) -> Any:
    """A callback that ranks the whole catalog for each held-out positive at each epoch's end.

    Each query the validation loss counts (``val.rows``: the positive of ``positives`` it
    predicts) scores every catalog item through the candidate tower as it stands; the user's
    earlier positives are masked (``earlier_positives``), and ``full_ranking_metrics``'s
    NDCG@10 and recall@10 go into the epoch's logs as ``val_ndcg_at_10`` and
    ``val_recall_at_10``, for the epoch line and early stopping (``_fit``). The protocol of
    ``bench.sequential_quality``, on the validation split: a matmul and a count per epoch.
    """
    import tf_keras as keras

    assert val.rows is not None, "the validation batches do not say which positive each example predicts"
    rows = val.rows
    index = pd.Index(catalog.frame["item_id"].astype(str))
    item_rows = index.get_indexer(positives["item_id"].astype(str))  # -1: not in the catalog
    targets = item_rows[rows]
    masked_queries, earlier = earlier_positives(positives["user_id"].astype(str).to_numpy(), rows)
    masked_items = item_rows[earlier]
    catalog_inputs = candidate_features_from_frame(catalog.frame)

    class HeldOutRanking(keras.callbacks.Callback):
        """NDCG@10 and recall@10 of the held-out positives over the whole catalog, per epoch."""

        def on_train_begin(self, logs: dict | None = None) -> None:
            # The string work on the catalog once; each epoch embeds its integers.
            self._encoded = _predict(self.model.candidate_model.encode, catalog_inputs)

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            tower = self.model.candidate_model
            items = _predict(lambda b: tower.embed(b, training=False), self._encoded)
            queries = _held_out_queries(self.model, val.dataset)
            if len(queries) != len(targets):
                raise ValueError(f"{len(queries)} validation queries for {len(targets)} held-out positives")
            metrics = full_ranking_metrics(queries, items, targets, masked_queries, masked_items)
            if logs is not None:
                logs["val_ndcg_at_10"] = metrics["ndcg"]
                logs["val_recall_at_10"] = metrics["recall"]

    return HeldOutRanking()


def _train_retriever(
    config: TrainingConfig,
    training_frame: pd.DataFrame,
    items_frame: pd.DataFrame,
    out_dir: Path,
    log: Callable[[str], None] | None,
    batches: BatchBuilder,
    plan: TrainingPlan | None = None,
) -> dict[str, Any]:
    """Fit, refit and export a retriever whose examples ``batches`` builds (``train_retriever``).

    The positives are split by ``validation_split``; the model is fitted with early stopping
    on the held-out ones (their loss, or their NDCG@10 ranked against the whole catalog:
    ``training.early_stopping_metric``), then (``refit_on_full``) built again on every positive and fitted
    for the best epoch count, and exported with every catalog item's embedding. An
    incremental ``plan`` starts from the serving version's weights and fits
    ``incremental_epochs`` without early stopping. The weights and vocabularies a later warm
    start reads go to ``checkpoints/retriever/``.
    """
    use_legacy_keras()
    log = log or _default_log
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    catalog = _Catalog.of(items_frame)
    pos = positives_frame(training_frame, drop_repeats=config.drop_repeat_positives)
    if pos.empty:
        raise ValueError("no positive events in the training frame: nothing to learn from")
    train_pos, val_pos = validation_split(
        pos, config.validation_fraction, config.validation_split, config.seed
    )
    started = time.perf_counter()
    vocabulary = _Vocabulary.of(train_pos, training_frame).with_catalog(config, catalog)
    model, vocabulary, warm = _retriever_model(config, vocabulary, catalog, plan)
    train = batches(config, train_pos, np.ones(len(train_pos), bool), catalog, vocabulary, model, True)
    val = None
    if len(val_pos) >= 2:
        held_out = np.r_[np.zeros(len(train_pos), bool), np.ones(len(val_pos), bool)]
        both = pd.concat([train_pos, val_pos], ignore_index=True)
        val = batches(config, both, held_out, catalog, vocabulary, model, False)
    kind = "sequential: " if config.query_tower == "sequential" else ""
    log(
        f"[retriever] {kind}{len(train_pos):,} train / {len(val_pos):,} validation positives{train.note}, "
        f"{len(vocabulary.users):,} users, {len(vocabulary.items):,} items in vocabulary"
    )
    val_ds = val.dataset if val is not None else None
    ranking = None
    if val is not None and _early_stopping_metric(config) == "ndcg":
        ranking = _held_out_ranking(val, both, catalog)
    epochs, patience = _epochs(config, config.epochs, plan)
    metrics = _fit(model, train.dataset, val_ds, epochs, patience, "retriever", log, ranking)
    if config.refit_on_full and val_ds is not None:
        # Early stopping found the epoch count; the latest events are the most valuable, so the
        # final model learns from them too.
        vocabulary = _Vocabulary.of(pos, training_frame).with_catalog(config, catalog)
        model, vocabulary, warm = _retriever_model(config, vocabulary, catalog, plan)
        full = batches(config, pos, np.ones(len(pos), bool), catalog, vocabulary, model, True)
        refit = _fit(model, full.dataset, None, metrics["best_epoch"], 0, "retriever refit", log)
        metrics["refit_loss"] = refit["loss"]
    dim = _export_retriever(model, catalog.frame, out_dir)
    save_checkpoint(model, vocabulary.lookups(), out_dir / CHECKPOINTS / "retriever")
    sequential = {"query_tower": "sequential", "negatives": config.negatives} if kind else {}
    return {
        "embedding_dim": dim,
        "query_inputs": dict(QUERY_INPUTS),
        "candidate_inputs": dict(CANDIDATE_INPUTS),
        "metrics": {f"retriever_{k}": v for k, v in metrics.items()},
        "examples": {
            "retriever_train_positives": len(train_pos),
            "retriever_validation_positives": len(val_pos),
            **train.counts,
            "retriever_users": len(vocabulary.users),
            "retriever_items": len(vocabulary.items),
            "catalog_items": len(catalog.frame),
        },
        "retriever": {
            **sequential,
            "temperature": config.temperature,
            "logq_correction": config.logq_correction,
            "normalized": config.temperature is not None,
            "seconds": round(time.perf_counter() - started, 1),
            **({"warm_start": warm.summary()} if warm is not None else {}),
        },
    }


def _epochs(config: TrainingConfig, epochs: int, plan: TrainingPlan | None) -> tuple[int, int]:
    """(epochs, early stopping patience): an incremental run fits ``incremental_epochs`` to the end."""
    if plan is not None and plan.incremental:
        return config.incremental_epochs, config.incremental_epochs
    return epochs, config.early_stopping_patience


def _retriever_model(
    config: TrainingConfig, vocabulary: _Vocabulary, catalog: _Catalog, plan: TrainingPlan | None
) -> tuple[Any, _Vocabulary, CopyReport | None]:
    """The retriever to fit, its vocabulary and, warm-started (incremental ``plan``), what was copied."""

    def build(lookups: Mapping[str, Any]) -> Any:
        return _build_retriever(config, vocabulary.with_lookups(lookups), catalog)

    if plan is None or not plan.incremental:
        return build(vocabulary.lookups()), vocabulary, None
    sample = catalog.frame.head(2)

    def create_variables(model: Any) -> None:
        model.query_model(_tensors(query_features_from_frame(sample)), training=False)
        model.candidate_model(_tensors(candidate_features_from_frame(sample)), training=False)

    limits = {"text": config.text_max_tokens}
    model, lookups, report = warm_model(
        build, vocabulary.lookups(), plan.checkpoint("retriever"), create_variables, limits
    )
    return model, vocabulary.with_lookups(lookups), report


def _tensors(arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    import tensorflow as tf

    return {name: tf.constant(values) for name, values in arrays.items()}


# Per-event inputs of the sequential query tower (the context of each predicted event and its
# time, from which the ages of the items before it are measured); the other query inputs but
# the recent items and their ages describe the user and are one value per sequence.
SEQUENCE_EVENT_INPUTS = ("hour", "device", "event_time")


def sequence_windows(users: np.ndarray, scored: np.ndarray, length: int) -> np.ndarray:
    """Row indices of user sequences cut into windows: ``[S, length]``, -1 for padding.

    ``users`` holds the user of each row, rows in time order. Each user's rows are cut from
    the newest backwards into windows of ``length`` (the newest window is full; the oldest
    may be short and is right-padded). A window is kept when one of its rows is ``scored``.
    """
    windows = []
    for rows in pd.Series(np.arange(len(users))).groupby(users, sort=False).indices.values():
        for end in range(len(rows), 0, -length):
            window = rows[max(0, end - length) : end]
            if scored[window].any():
                windows.append(np.pad(window, (0, length - len(window)), constant_values=-1))
    return np.asarray(windows, dtype=np.int64).reshape(-1, length)


def sequence_examples(
    positives: pd.DataFrame,
    scored: np.ndarray,
    catalog: _Catalog,
    vocabulary: _Vocabulary,
    max_history: int,
) -> dict[str, np.ndarray]:
    """The sequential retriever's examples: windows of ``max_history + 1`` positives per user.

    Position ``t`` of a window predicts its ``t``-th positive (``item_id``, ``category``,
    ``title``, ``description``, ``sampling_probability``, context ``hour`` and ``device``,
    ``event_time`` in epoch seconds, -1 for padding, all ``[S, T]``) from the positives before
    it in the window (``sequence_items`` ``[S, T - 1]``: the targets shifted by one, as the
    tower reads them after a start token; the tower measures their ages at each position
    from ``event_time``, ``models.training_ages``).
    ``target_weight`` is 1 where the target is a real positive marked ``scored`` (training:
    all; validation: the held-out ones), 0 elsewhere. The user's id and profile come from
    the window's newest row.

    Args:
        positives: the retriever's positives, in time order.
        scored: per row of ``positives``, whether it is a target the loss counts.
        catalog: item content (training and the exported embeddings read the same text).
        vocabulary: the in-batch sampling probability of each item.
        max_history: the items a query reads (``training.max_history``).
    """
    content = catalog.frame.set_index("item_id")[["category", "title", "description"]]
    rows = positives.drop(columns=[c for c in content.columns if c in positives.columns])
    rows = rows.join(content, on="item_id")
    windows = sequence_windows(rows["user_id"].astype(str).to_numpy(), scored, max_history + 1)
    valid = windows >= 0
    at = np.where(valid, windows, 0)
    columns = {**features_from_frame(rows, QUERY_INPUTS), **features_from_frame(rows, CANDIDATE_INPUTS)}
    probability = vocabulary.sampling_probability
    columns["sampling_probability"] = (
        rows["item_id"].map(probability).fillna(probability.min()).to_numpy(dtype=np.float32)
    )
    columns["event_time"] = _epoch_seconds(rows["ts"])
    per_event = {*CANDIDATE_INPUTS, *SEQUENCE_EVENT_INPUTS, "sampling_probability"}
    newest = at[np.arange(len(at)), valid.sum(axis=1) - 1]
    arrays: dict[str, np.ndarray] = {}
    for name, values in columns.items():
        if name in ("recent_items", "recent_item_ages"):
            continue  # the window itself is the history
        if name in per_event:
            # Padding: no item, no context, and no time (-1: the tower ages nothing from it).
            pad = "" if values.dtype == object else -1 if name == "event_time" else 0
            blank = np.asarray(pad, dtype=values.dtype)
            arrays[name] = np.where(valid, values[at], blank)
        else:
            arrays[name] = values[newest]
    arrays["sequence_items"] = arrays["item_id"][:, :-1]
    arrays["target_weight"] = (valid & scored[at]).astype(np.float32)
    return arrays


def _sequence_dataset(
    arrays: Mapping[str, np.ndarray], batch_size: int, shuffle: bool, seed: int
) -> tf.data.Dataset:
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(dict(arrays))
    if shuffle:
        ds = ds.shuffle(len(arrays["target_weight"]), seed=seed, reshuffle_each_iteration=True)
    return _sharded_by_data(ds.batch(batch_size).prefetch(2))


def train_sequential_retriever(
    config: TrainingConfig,
    training_frame: pd.DataFrame,
    items_frame: pd.DataFrame,
    out_dir: Path,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``train_retriever`` with the sequential query tower (``training.query_tower: sequential``).

    Examples are user sequences (``sequence_examples``), every position a query. Validation
    keeps the retriever's split by time (the last ``validation_fraction`` of the positives):
    each held-out positive is a target read after the user's whole earlier sequence, and
    only those targets count in the validation loss. Same outputs and manifest part as
    ``train_retriever``; the exported query tower takes ``QUERY_INPUTS``.
    """
    return _train_retriever(config, training_frame, items_frame, out_dir, log, _sequence_batches)


def _sequence_batches(
    config: TrainingConfig,
    positives: pd.DataFrame,
    scored: np.ndarray,
    catalog: _Catalog,
    vocabulary: _Vocabulary,
    model: Any,
    shuffle: bool,
) -> _Batches:
    """The sequential retriever's batches: windows of ``max_history + 1`` positives per user."""
    arrays = sequence_examples(positives, scored, catalog, vocabulary, config.max_history)
    windows = len(arrays["target_weight"])
    # The positive at each weighted position, row-major: the order the validation queries come in.
    cut = sequence_windows(positives["user_id"].astype(str).to_numpy(), scored, config.max_history + 1)
    return _Batches(
        _sequence_dataset(arrays, config.sequence_batch_size, shuffle, config.seed),
        note=f" in {windows:,} windows of {config.max_history + 1}",
        counts={"retriever_train_sequences": windows},
        rows=cut[arrays["target_weight"] > 0],
    )


def _export_retriever(model: Any, items: pd.DataFrame, out_dir: Path) -> int:
    """Both towers as SavedModels and every catalog item's embedding; returns the dimension."""
    query_tower, candidate_tower = model.query_model, model.candidate_model
    _export(query_tower, QUERY_INPUTS, out_dir / "query_tower", embedding=True)
    _export(candidate_tower, CANDIDATE_INPUTS, out_dir / "candidate_tower", embedding=True)
    emb = _predict(lambda b: candidate_tower(b, training=False), candidate_features_from_frame(items)).astype(
        np.float32
    )
    pd.DataFrame({"item_id": items["item_id"].to_numpy(), "embedding": list(emb)}).to_parquet(
        out_dir / "item_embeddings.parquet", index=False
    )
    return int(emb.shape[1])


# --------------------------------------------------------------------------------------------
# Ranker
# --------------------------------------------------------------------------------------------


def train_ranker(
    config: TrainingConfig,
    training_frame: pd.DataFrame,
    items_frame: pd.DataFrame,
    out_dir: Path,
    log: Callable[[str], None] | None = None,
    plan: TrainingPlan | None = None,
) -> dict[str, Any]:
    """Train the multi-objective ranker (click, engagement) and export ``ranker/``.

    An incremental ``plan`` warm-starts it as ``train_retriever`` does the retriever; the
    weights and vocabularies go to ``checkpoints/ranker/``.

    Args:
        config: the ``training`` section (``objective_weights`` name the objectives).
        training_frame: the feature layer's training frame.
        items_frame: the catalog; item content for sampled negatives comes from the frame.
        out_dir: the training step's folder; writes ``ranker/``.
        log: where per-epoch lines go.
        plan: how to train (``train_retriever``'s).

    Returns:
        The ranker's part of the manifest: inputs, objectives, weights, metrics, counts.
    """
    use_legacy_keras()
    log = log or _default_log
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    numeric = numeric_feature_names(training_frame) if config.ranker_window_features else []
    item_columns = ["item_id", "category", "title", "description", "in_stock"] + [
        n for n in numeric if n.startswith("item_")
    ]
    examples, source = ranker_examples(training_frame, config, item_columns)
    if examples.empty:
        raise ValueError("no ranker examples (no impressions and no positives) in the training frame")
    train_ex, val_ex = validation_split(
        examples, config.validation_fraction, config.validation_split, config.seed
    )
    inputs = ranker_input_spec(numeric)
    vocabularies = _ranker_vocabularies(train_ex, training_frame, items_frame)
    model, vocabularies, warm = _ranker_model(config, vocabularies, train_ex, items_frame, numeric, plan)
    train_ds = _ranker_dataset(config, train_ex, inputs, shuffle=True)
    val_ds = _ranker_dataset(config, val_ex, inputs, shuffle=False) if len(val_ex) >= 2 else None
    log(
        f"[ranker] {len(train_ex):,} train / {len(val_ex):,} validation examples from {source}, "
        f"click rate {train_ex['label_click'].mean():.3f}"
    )
    epochs, patience = _epochs(config, config.ranker_epochs, plan)
    metrics = _fit(model, train_ds, val_ds, epochs, patience, "ranker", log)
    _export(model, inputs, out_dir / "ranker", embedding=False)
    save_checkpoint(model, vocabularies, out_dir / CHECKPOINTS / "ranker")
    return {
        "ranker_inputs": inputs,
        "objectives": list(config.objective_weights),
        "objective_weights": dict(config.objective_weights),
        "metrics": {f"ranker_{k}": v for k, v in metrics.items()},
        "examples": {
            "ranker_train": len(train_ex),
            "ranker_validation": len(val_ex),
            "ranker_source": source,
            "ranker_click_rate": float(examples["label_click"].mean()),
        },
        "ranker": {
            "seconds": round(time.perf_counter() - started, 1),
            **_position_bias(model, train_ex),
            **({"warm_start": warm.summary()} if warm is not None else {}),
        },
    }


def _ranker_vocabularies(
    examples: pd.DataFrame, training_frame: pd.DataFrame, items_frame: pd.DataFrame
) -> dict[str, Any]:
    """The lists the ranker's lookups are built from: ids of its ``examples``, the catalog's
    categories, the frame's profile values."""
    return {
        "users": _vocab(examples["user_id"]),
        "items": _vocab(examples["item_id"]),
        "categories": _categories(items_frame),
        "profiles": {n: _vocab(training_frame[n]) for n in PROFILE_FEATURES if n in training_frame},
    }


def _ranker_model(
    config: TrainingConfig,
    vocabularies: dict[str, Any],
    examples: pd.DataFrame,
    items_frame: pd.DataFrame,
    numeric: list[str],
    plan: TrainingPlan | None,
) -> tuple[Any, dict[str, Any], CopyReport | None]:
    """The ranker to fit, its vocabularies and, warm-started (incremental ``plan``), what was copied."""

    def build(lookups: Mapping[str, Any]) -> Any:
        # The vocabularies given, the frame is not read: the examples stand in for it.
        return _build_ranker(config, examples, examples, items_frame, numeric, lookups)

    if plan is None or not plan.incremental:
        return build(vocabularies), vocabularies, None
    sample = _tensors(features_from_frame(examples.head(2), ranker_input_spec(numeric)))
    model, merged, report = warm_model(
        build, vocabularies, plan.checkpoint("ranker"), lambda m: m(sample, training=False)
    )
    return model, merged, report


def _position_bias(model: Any, examples: pd.DataFrame) -> dict[str, Any]:
    """What the ranker learned of rank: each objective's logit bias per rank (from 0), the
    rank held at serving, and how many training examples had a logged rank."""
    if model.position_bias is None:
        return {}
    table = model.position_bias.numpy()[1:]  # row 0: rank not logged
    logged = pd.to_numeric(examples.get("position"), errors="coerce") if "position" in examples else None
    return {
        "position_bias": {k: [round(float(v), 4) for v in table[:, n]] for n, k in enumerate(model.heads)},
        "serving_position": model.serving_bucket - 1,
        "examples_with_position": int(logged.notna().sum()) if logged is not None else 0,
    }


def _build_ranker(
    config: TrainingConfig,
    examples: pd.DataFrame,
    training_frame: pd.DataFrame,
    items_frame: pd.DataFrame,
    numeric: list[str],
    vocabularies: Mapping[str, Any] | None = None,
) -> Any:
    """The ranker with vocabularies from its training ``examples`` (or ``vocabularies``,
    ``_ranker_vocabularies``'s lists), numeric inputs normalized on the examples."""
    import tf_keras as keras

    from components.training.models import MultiObjectiveRanker

    keras.utils.set_random_seed(config.seed)
    normalizer = None
    if numeric:
        normalizer = keras.layers.Normalization(axis=-1)
        normalizer.adapt(np.log1p(np.maximum(examples[numeric].to_numpy(dtype=np.float32), 0.0)))
    vocabularies = vocabularies or _ranker_vocabularies(examples, training_frame, items_frame)
    model = MultiObjectiveRanker(
        users=vocabularies["users"],
        items=vocabularies["items"],
        categories=vocabularies["categories"],
        profile_vocab=vocabularies["profiles"],
        numeric_features=numeric,
        numeric_normalizer=normalizer,
        objective_weights=config.objective_weights,
        id_dim=config.id_dim,
        feature_dim=config.feature_dim,
        hidden_units=config.ranker_hidden_units,
        num_oov=config.num_oov_buckets,
        id_dropout=config.id_dropout,
        max_history=config.max_history,
        item_categories=_primary_categories(items_frame) if config.history_categories else None,
        position_buckets=config.position_buckets,
        serving_position=config.serving_position,
    )
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=config.ranker_learning_rate))
    return model


def _ranker_dataset(
    config: TrainingConfig, examples: pd.DataFrame, inputs: Mapping[str, str], shuffle: bool
) -> tf.data.Dataset:
    """The ranker's inputs, the logged rank (-1 where none; a training-only input) and one
    ``label_<objective>`` per objective."""
    arrays = features_from_frame(examples, inputs)
    if config.position_buckets:
        rank = examples["position"] if "position" in examples else pd.Series(np.nan, index=examples.index)
        arrays["position"] = pd.to_numeric(rank, errors="coerce").fillna(-1).to_numpy(dtype=np.int64)
    for k in config.objective_weights:
        arrays[f"label_{k}"] = examples[f"label_{k}"].to_numpy(dtype=np.float32)
    return _dataset(arrays, config.batch_size, shuffle, config.seed)


def _epoch_seconds(ts: pd.Series) -> np.ndarray:
    """Whole epoch seconds (int64) of a column of times."""
    return np.asarray((pd.to_datetime(ts, utc=True) - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1))


def positive_history_times(frame: pd.DataFrame) -> dict[str, list[tuple[str, int]]]:
    """user -> their distinct positive items in ``frame``, newest first, each with the epoch
    seconds of its latest positive (as ``recent_items`` and ``recent_item_times`` hold them)."""
    positives = frame[frame["event_type"].astype(str).isin(POSITIVE_EVENT_TYPES)]
    positives = positives.assign(
        user_id=positives["user_id"].astype(str),
        item_id=positives["item_id"].astype(str),
        _seconds=_epoch_seconds(positives["ts"]),
    )
    newest_first = positives.sort_values("ts", ascending=False, kind="stable")
    newest = newest_first.drop_duplicates(["user_id", "item_id"], keep="first")
    pairs = zip(newest["item_id"], newest["_seconds"].astype(int), strict=True)
    users = newest["user_id"].to_numpy()
    out: dict[str, list[tuple[str, int]]] = {}
    for user, pair in zip(users, pairs, strict=True):
        out.setdefault(user, []).append(pair)
    return dict(sorted(out.items()))


def positive_histories(frame: pd.DataFrame) -> dict[str, list[str]]:
    """user -> their distinct positive items in ``frame``, newest first."""
    return {u: [i for i, _ in pairs] for u, pairs in positive_history_times(frame).items()}


def with_profile_history(queries: pd.DataFrame, train_frame: pd.DataFrame, max_history: int) -> pd.DataFrame:
    """``queries`` with ``recent_items`` = each user's positives in ``train_frame``, newest first,
    their ``recent_item_times``, and ``recent_item_ages`` measured at each query's ``ts``.

    The query rows a model trained with ``training.history = leave_one_out`` is evaluated on:
    the whole training profile, aged as a request at the query's time would age it.
    """
    from recsys.item_ages import ages

    lists = positive_history_times(train_frame)
    histories = [lists.get(str(u), [])[:max_history] for u in queries["user_id"]]
    at = _epoch_seconds(queries["ts"]) if len(queries) else np.zeros(0, np.int64)
    return queries.assign(
        recent_items=[" ".join(i for i, _ in h) for h in histories],
        recent_item_times=[" ".join(str(t) for _, t in h) for h in histories],
        recent_item_ages=[
            ages((str(t) for _, t in h), int(now)) for h, now in zip(histories, at, strict=True)
        ],
    )


def leave_one_out_history(frame: pd.DataFrame, max_history: int) -> pd.DataFrame:
    """``recent_items`` of each row: the user's other positive items in ``frame``, newest first.

    ``training.history = leave_one_out``: the history a query will carry at serving time (the
    user's profile), minus the row's own item, for data without a meaningful order in time.
    ``recent_item_times`` are those items' times, and ``recent_item_ages`` are measured from
    the user's newest positive (or the row's time, if later), as a query after the whole
    profile would measure them.
    """
    lists = positive_history_times(frame)
    recent, times, ages = [], [], []
    row_seconds = _epoch_seconds(frame["ts"]) if len(frame) else np.zeros(0, np.int64)
    for user, item, at in zip(frame["user_id"], frame["item_id"], row_seconds, strict=True):
        history = lists.get(str(user), [])
        kept = [(i, t) for i, t in history[: max_history + 1] if i != str(item)][:max_history]
        now = max([int(at), *(t for _, t in history[:1])])
        recent.append(" ".join(i for i, _ in kept))
        times.append(" ".join(str(t) for _, t in kept))
        ages.append(" ".join(str(now - t) for _, t in kept))
    return frame.assign(recent_items=recent, recent_item_times=times, recent_item_ages=ages)


def train_models(
    config: TrainingConfig,
    training_frame: pd.DataFrame,
    items_frame: pd.DataFrame,
    out_dir: Path,
    log: Callable[[str], None] | None = None,
    plan: TrainingPlan | None = None,
) -> dict[str, Any]:
    """The training step: retriever and ranker into ``out_dir``, then ``manifest.json`` last.

    With ``training.workers > 1`` the step runs in that many processes, data parallel under
    ``tf.distribute.MultiWorkerMirroredStrategy`` (``components.training.multi_worker``): the
    same outputs, written by the first worker, and the manifest's ``details.distribution``.

    Args:
        config: the ``training`` section.
        training_frame: the feature layer's training frame (``build_training_data``).
        items_frame: the whole catalog (validated items).
        out_dir: the step's folder (``<home>/runs/<run>/train``).
        log: where progress lines go (default: stderr).
        plan: full or incremental (``warm_start.plan_training``); None: a full train. An
            incremental run trains both models on the frame's events after ``plan.after``,
            warm-started from ``plan.warm_from``; where that cannot be done
            (``WarmStartError``) it logs why and trains in full. The item-to-item table, a
            closed-form fit, always learns from the whole frame.

    Returns:
        The manifest (see the module docstring for the contract).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)  # a re-run is incomplete until it ends
    log = log or _default_log
    if config.workers > 1:
        from components.training.multi_worker import train_on_workers

        return train_on_workers(config, training_frame, items_frame, out_dir, log, plan)
    manifest = fit_models(config, training_frame, items_frame, out_dir, log, plan)
    write_manifest(out_dir, manifest)
    return manifest.model_dump()


def fit_models(
    config: TrainingConfig,
    training_frame: pd.DataFrame,
    items_frame: pd.DataFrame,
    out_dir: Path,
    log: Callable[[str], None],
    plan: TrainingPlan | None = None,
    chief: bool = True,
) -> TrainManifest:
    """``train_models``'s work in this process: every output but the manifest, which it returns.

    A worker of ``training.workers > 1`` calls it inside its strategy's scope, so the models are
    built and fitted under the strategy. ``chief`` false (a worker other than the first, writing
    to a scratch folder) skips the item-to-item table: a closed-form fit in NumPy, nothing to share.
    """
    if config.history == "leave_one_out":
        training_frame = leave_one_out_history(training_frame, config.max_history)
    plan = plan or TrainingPlan("full", "no plan given")
    if plan.incremental:
        try:
            return _fit_and_describe(config, training_frame, items_frame, out_dir, log, plan, chief)
        except WarmStartError as error:
            log(f"[train] the serving version cannot be warm-started from ({error}): training in full")
            plan = plan.as_full(f"warm start refused: {error}")
    return _fit_and_describe(config, training_frame, items_frame, out_dir, log, plan, chief)


def _fit_and_describe(
    config: TrainingConfig,
    training_frame: pd.DataFrame,
    items_frame: pd.DataFrame,
    out_dir: Path,
    log: Callable[[str], None],
    plan: TrainingPlan,
    chief: bool,
) -> TrainManifest:
    """``fit_models`` for one plan: both models, the item-to-item table, the manifest."""
    out_dir = Path(out_dir)
    frame = training_frame
    if plan.incremental:
        ts = pd.to_datetime(training_frame["ts"], utc=True)
        frame = training_frame[ts > pd.Timestamp(plan.after)].reset_index(drop=True)
        log(f"[train] {plan.describe()}: {len(frame):,} of {len(training_frame):,} events")
    retriever = train_retriever(config, frame, items_frame, out_dir, log, plan)
    ranker = train_ranker(config, frame, items_frame, out_dir, log, plan)
    neighbours = (
        train_item_neighbours(config, training_frame, out_dir, log)
        if config.item_neighbours and chief
        else None
    )
    ts = pd.to_datetime(frame["ts"], utc=True)
    warm_start = None
    if plan.incremental:
        warm_start = {"after": plan.after, "epochs": config.incremental_epochs, "reason": plan.reason}
    manifest = TrainManifest(
        path=str(out_dir),
        embedding_dim=retriever["embedding_dim"],
        query_inputs=retriever["query_inputs"],
        candidate_inputs=retriever["candidate_inputs"],
        ranker_inputs=ranker["ranker_inputs"],
        objectives=ranker["objectives"],
        objective_weights=ranker["objective_weights"],
        metrics={**retriever["metrics"], **ranker["metrics"]},
        examples={"events": len(frame), **retriever["examples"], **ranker["examples"]},
        data_interval=Interval(start=ts.min().isoformat(), end=ts.max().isoformat()) if len(ts) else None,
        parameters=config.model_dump(mode="json"),
        details={
            "retriever": retriever["retriever"],
            "ranker": ranker["ranker"],
            **({"item_neighbours": neighbours} if neighbours else {}),
        },
        seed=config.seed,
        code_version=code_version(),
        training_mode=plan.mode,
        training_reason=plan.reason,
        # A full run without a plan's interval end descends from itself, dated by its data.
        full_retrain_of=plan.full_retrain_of or (ts.max().isoformat() if len(ts) else None),
        warm_started_from=str(plan.warm_from) if plan.incremental else None,
        warm_start=warm_start,
        checkpoints={m: f"{CHECKPOINTS}/{m}" for m in MODELS},
    )
    return manifest


def load_signature(path: Path) -> Any:
    """The ``serving_default`` function of a SavedModel (takes keyword tensors)."""
    use_legacy_keras()
    import tensorflow as tf

    return tf.saved_model.load(str(path)).signatures["serving_default"]
