"""Step: evaluate the trained models offline on a time-based holdout, and gate them.

Offline evaluation replays the future: train on events before a cut-off, then ask, for each
user active after it, "would the model have put the items this user went on to engage with
near the top of their list?" The cut is by time (the last ``holdout_days``), not random,
because that is the question production asks, and because only a time cut contains what
production meets: users who signed up after training and items published after it.

Three systems are compared on the same users and relevant items:

- ``retriever``: exact top-K by dot product between the query tower's embedding and every
  item embedding (``item_embeddings.parquet``);
- ``retriever_ranker``: the retriever's top ``rerank_depth`` re-ordered by the ranker's
  combined score (the production path, without the ANN approximation);
- ``popularity``: the most engaged-with items of the training period, the baseline every
  personalized model must beat to earn its complexity.

A user's relevant items are their positive events in the holdout, minus items they already
had positives with in training; those are also removed from every list (a recommender does
not re-recommend what was consumed). Slices: ``all``; ``new_users`` (no training events);
``new_items`` (only relevant items published or first seen in the holdout count);
``heavy_users`` (the top ``heavy_user_fraction`` by training events).

The gate blesses the model only when it beats popularity on ``gate_metric`` and does not
trail the serving model's ``metrics.json`` by more than ``gate_margin``.
"""

from __future__ import annotations

import base64
import html
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from components.evaluation.metrics import coverage, metric_names, summarize
from recsys.config import EvaluationConfig
from recsys.feature_schema import POSITIVE_EVENT_TYPES
from recsys.manifests import Blessing, EvaluateManifest
from recsys.ranking import rank_fusion
from recsys.storage import code_version, read_manifest, write_manifest

MODELS = ("retriever", "retriever_ranker", "popularity")
SLICES = ("all", "new_users", "new_items", "heavy_users")
ITEM_STAT = re.compile(r"^item_(impressions|positives|ctr)_(\d+)d$")


# --------------------------------------------------------------------------------------------
# Data: split, queries, relevance
# --------------------------------------------------------------------------------------------


def time_split(events: pd.DataFrame, holdout_days: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split events (or a training frame) at whole UTC days: the last ``holdout_days`` are held out.

    The cut is the end of the last event's day minus ``holdout_days``, so the holdout is
    exactly ``holdout_days`` whole days, whatever the time of the last event.

    Args:
        events: rows with a ``ts`` column (UTC timestamps).
        holdout_days: how many days at the end form the holdout.

    Returns:
        (train, holdout): rows with ``ts`` before the cut, and from it on, each in time order.
    """
    ts = pd.to_datetime(events["ts"], utc=True)
    if ts.empty:
        return events.copy(), events.copy()
    cut = split_time(ts, holdout_days)
    order = events.assign(_ts=ts).sort_values("_ts", kind="stable").drop(columns="_ts")
    ts_sorted = pd.to_datetime(order["ts"], utc=True)
    return order[ts_sorted < cut].reset_index(drop=True), order[ts_sorted >= cut].reset_index(drop=True)


def random_split(events: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per user, a seeded random ``fraction`` of their rows held out (users with one row keep it).

    Returns:
        (train, holdout), each in time order.
    """
    if events.empty:
        return events.copy(), events.copy()
    order = events.assign(_ts=pd.to_datetime(events["ts"], utc=True))
    order = order.sort_values(["_ts", "user_id", "item_id"], kind="stable").reset_index(drop=True)
    rng = np.random.default_rng(seed)
    users = order["user_id"].astype(str).to_numpy()
    rank = pd.Series(rng.random(len(order))).groupby(users).rank(method="first").to_numpy()
    sizes = pd.Series(users).groupby(users).transform("size").to_numpy()
    held = rank <= np.floor(fraction * sizes)
    order = order.drop(columns="_ts")
    return order[~held].reset_index(drop=True), order[held].reset_index(drop=True)


def split_holdout(events: pd.DataFrame, config: EvaluationConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, holdout) as ``evaluation.split`` says: by time or at random per user."""
    if config.split == "random":
        return random_split(events, config.holdout_fraction, config.split_seed)
    return time_split(events, config.holdout_days)


def split_time(ts: pd.Series, holdout_days: int) -> pd.Timestamp:
    """The cut of ``time_split``: midnight after the last event, minus ``holdout_days``."""
    last = pd.to_datetime(ts, utc=True).max()
    return last.floor("D") + pd.Timedelta(days=1) - pd.Timedelta(days=holdout_days)


def positive_items(frame: pd.DataFrame) -> dict[str, set[str]]:
    """user -> items with at least one positive event in ``frame``."""
    pos = frame[frame["event_type"].astype(str).isin(POSITIVE_EVENT_TYPES)]
    grouped = pos.groupby(pos["user_id"].astype(str))["item_id"]
    return {u: set(items.astype(str)) for u, items in grouped}


def holdout_queries(holdout_frame: pd.DataFrame) -> pd.DataFrame:
    """One query per holdout user: their first holdout row, as the feature layer saw it.

    Its features were computed strictly before that event, so they hold exactly the
    user's state at the cut (recent items, engagement, profile) plus the context (hour,
    device) of their first request after it: the request production would have answered.
    """
    first = holdout_frame.sort_values(["ts", "event_id"], kind="stable").drop_duplicates("user_id")
    return first.assign(user_id=first["user_id"].astype(str)).set_index("user_id", drop=False)


def profile_history(queries: pd.DataFrame, train_frame: pd.DataFrame, max_history: int) -> pd.DataFrame:
    """``queries`` with ``recent_items`` = each user's training positives, newest first."""
    from components.training.train import positive_histories

    lists = positive_histories(train_frame)
    recent = [" ".join(lists.get(str(u), [])[:max_history]) for u in queries["user_id"]]
    return queries.assign(recent_items=recent)


def item_stats_at(frame: pd.DataFrame, as_of: pd.Timestamp, names: list[str]) -> pd.DataFrame:
    """Item popularity features (``item_{impressions,positives,ctr}_{w}d``) as of ``as_of``.

    The same definitions as the feature layer's daily snapshots: counts over the ``w`` days
    before ``as_of`` (a day boundary), click-through = clicks / impressions (0 without any).
    """
    et = frame["event_type"].astype(str)
    ts = pd.to_datetime(frame["ts"], utc=True)
    item = frame["item_id"].astype(str)
    out = pd.DataFrame(index=pd.Index(sorted(item.unique()), name="item_id"))
    for name in names:
        m = ITEM_STAT.match(name)
        if m is None:
            continue
        kind, w = m.group(1), int(m.group(2))
        window = (ts >= as_of - pd.Timedelta(days=w)) & (ts < as_of)
        imps = item[window & (et == "impression")].value_counts()
        if kind == "impressions":
            out[name] = imps.reindex(out.index).fillna(0)
        elif kind == "positives":
            out[name] = (
                item[window & et.isin(POSITIVE_EVENT_TYPES)].value_counts().reindex(out.index).fillna(0)
            )
        else:
            clicks = item[window & (et == "click")].value_counts().reindex(out.index).fillna(0)
            n = imps.reindex(out.index).fillna(0)
            out[name] = np.where(n > 0, clicks / n.clip(lower=1), 0.0)
    return out.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Ranked lists of the three systems
# --------------------------------------------------------------------------------------------


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` best scores per row, best first."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def _seen_mask(
    users: list[str], item_index: pd.Index, seen: Mapping[str, set[str]]
) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = [], []
    for r, u in enumerate(users):
        idx = item_index.get_indexer(list(seen.get(u, ())))
        idx = idx[idx >= 0]
        rows.extend([r] * len(idx))
        cols.extend(idx.tolist())
    return np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)


def retrieve(
    query_embeddings: np.ndarray,
    item_ids: np.ndarray,
    item_embeddings: np.ndarray,
    users: list[str],
    seen: Mapping[str, set[str]],
    depth: int,
) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    """Exact top-``depth`` items per user by dot product, items in ``seen`` excluded.

    Returns:
        user -> ranked item ids, and user -> their scores (same order).
    """
    item_index = pd.Index(item_ids)
    ranked: dict[str, list[str]] = {}
    scores_out: dict[str, np.ndarray] = {}
    for lo in range(0, len(users), 1024):  # bounded memory: 1024 x N scores at a time
        chunk = users[lo : lo + 1024]
        scores = query_embeddings[lo : lo + 1024] @ item_embeddings.T
        r, c = _seen_mask(chunk, item_index, seen)
        scores[r, c] = -np.inf
        top = _top_k(scores, depth)
        for i, u in enumerate(chunk):
            keep = np.isfinite(scores[i, top[i]])
            ranked[u] = list(item_ids[top[i][keep]])
            scores_out[u] = scores[i, top[i][keep]]
    return ranked, scores_out


def popularity_ranking(
    train_frame: pd.DataFrame,
    item_ids: np.ndarray,
    users: list[str],
    seen: Mapping[str, set[str]],
    depth: int,
) -> dict[str, list[str]]:
    """The popularity baseline: items by distinct users with a positive in training, seen removed."""
    pos = train_frame[train_frame["event_type"].astype(str).isin(POSITIVE_EVENT_TYPES)]
    counts = pos.drop_duplicates(["user_id", "item_id"])["item_id"].astype(str).value_counts()
    popularity = pd.Series(item_ids).map(counts).fillna(0).to_numpy(dtype=np.float64)
    # Ties (items nobody touched) break by catalog order, the same for every user.
    order = np.argsort(-popularity, kind="stable")
    ranked_ids = list(item_ids[order])
    out = {}
    for u in users:
        s = seen.get(u, set())
        out[u] = [i for i in ranked_ids[: depth + len(s)] if i not in s][:depth]
    return out


def rerank(
    ranker: Callable[..., Mapping[str, Any]],
    ranker_inputs: Mapping[str, str],
    queries: pd.DataFrame,
    candidates: Mapping[str, list[str]],
    retrieval_scores: Mapping[str, np.ndarray],
    item_features: pd.DataFrame,
    retrieval_weight: float = 0.0,
    batch_size: int = 8192,
) -> dict[str, list[str]]:
    """Re-order each user's retrieved candidates by the ranker's combined ``score``.

    With ``retrieval_weight`` > 0 the order is by ``rank score of the ranker + weight x rank
    score of the retriever`` (each a rank within the user's candidates, scaled to [0, 1]):
    rank fusion is robust to the two scores living on different scales.

    Args:
        ranker: the ranker SavedModel's ``serving_default`` (keyword tensors in).
        ranker_inputs: the training manifest's ``ranker_inputs``.
        queries: one row per user (index user_id) with the query-side columns.
        candidates: user -> retrieved item ids (best first).
        retrieval_scores: user -> retrieval scores of those candidates.
        item_features: index item_id; the item-side columns (category, popularity).
        retrieval_weight: weight of the retrieval rank in the fused score.
        batch_size: pairs per ranker call.

    Returns:
        user -> re-ranked item ids.
    """
    import tensorflow as tf

    from components.training.train import features_from_frame

    users = [u for u in candidates if candidates[u]]
    if not users:
        return {u: [] for u in candidates}
    counts = np.array([len(candidates[u]) for u in users])
    item_col = np.concatenate([np.asarray(candidates[u], dtype=object) for u in users])
    user_rows = np.repeat(np.arange(len(users)), counts)
    item_side = [c for c in ranker_inputs if c in item_features.columns]
    query_side = [c for c in ranker_inputs if c not in item_side and c != "item_id"]
    q = queries.loc[users, [c for c in query_side if c in queries.columns]].reset_index(drop=True)
    pairs = q.iloc[user_rows].reset_index(drop=True)
    pairs["item_id"] = item_col
    items = item_features.reindex(item_col)[item_side].reset_index(drop=True)
    pairs = pd.concat([pairs, items], axis=1)
    arrays = features_from_frame(pairs, ranker_inputs)
    scores = np.empty(len(pairs), dtype=np.float32)
    for lo in range(0, len(pairs), batch_size):
        batch = {k: tf.constant(v[lo : lo + batch_size]) for k, v in arrays.items()}
        scores[lo : lo + batch_size] = ranker(**batch)["score"].numpy()
    out: dict[str, list[str]] = {u: [] for u in candidates}
    start = 0
    for u, n in zip(users, counts, strict=True):
        s = scores[start : start + n]
        fused = rank_fusion(s, np.asarray(retrieval_scores[u]), retrieval_weight)
        order = np.argsort(-fused, kind="stable")
        out[u] = [candidates[u][i] for i in order]
        start += n
    return out


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the chance a random positive outscores a random negative."""
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(np.asarray(scores, dtype=np.float64)).rank().to_numpy()  # ties share a rank
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def ranker_auc(
    ranker: Callable[..., Mapping[str, Any]], ranker_inputs: Mapping[str, str], holdout_frame: pd.DataFrame
) -> dict[str, Any] | None:
    """The ranker's own offline check: click AUC on the holdout's impressions.

    Top-K metrics over logged positives reward what the old system chose to show (a
    popular item gets more impressions, hence more clicks); the ranker learns the chance
    of a click once an item *is* shown, which is what it decides in production. Its AUC on
    held-out impressions, beside the AUC of "more popular first" (``item_positives_30d``
    or the first popularity feature), measures that directly. None without impressions.
    """
    import tensorflow as tf

    from components.training.train import features_from_frame, ranker_examples
    from recsys.config import TrainingConfig

    if not (holdout_frame["event_type"].astype(str) == "impression").any():
        return None
    examples, _ = ranker_examples(holdout_frame, TrainingConfig(), [])
    arrays = features_from_frame(examples, ranker_inputs)
    scores = np.concatenate(
        [
            ranker(**{k: tf.constant(v[lo : lo + 8192]) for k, v in arrays.items()})["click"].numpy()
            for lo in range(0, len(examples), 8192)
        ]
    )
    out: dict[str, Any] = {"examples": len(examples), "click_auc": auc(examples["label_click"], scores)}
    popularity = [c for c in ("item_positives_30d", "item_positives_7d") if c in examples.columns]
    if popularity:
        out["popularity_click_auc"] = auc(examples["label_click"], examples[popularity[0]])
    return out


def _metric_of(metrics: Mapping[str, Any], model: str, name: str) -> float | None:
    try:
        return float(metrics["models"][model]["all"][name])
    except (KeyError, TypeError):
        return None


def gate(
    config: EvaluationConfig, metrics: Mapping[str, Any], serving_metrics: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Decide whether a model may replace the serving one.

    Blessed when (1) the gated system (``gate_model``) beats the popularity baseline on
    ``gate_metric`` over all users, strictly: a model no better than "show the bestsellers"
    is not worth serving; and (2) it does not trail the serving model's value by more than
    ``gate_margin`` (absolute). Without serving metrics (the first model), only (1) applies.

    Args:
        config: the ``evaluation`` section.
        metrics: this evaluation's metrics (the ``metrics.json`` structure).
        serving_metrics: the serving model's ``metrics.json``, if any.

    Returns:
        ``{"blessed", "reason", "metric", "model", "candidate", "popularity", "serving", "margin"}``.
    """
    name, model = config.gate_metric, config.gate_model
    candidate = _metric_of(metrics, model, name)
    popularity = _metric_of(metrics, "popularity", name)
    serving = _metric_of(serving_metrics, model, name) if serving_metrics else None
    if candidate is None or popularity is None:
        raise ValueError(f"metrics lack {model} or popularity {name} on slice 'all'")
    reasons = []
    beats_popularity = candidate > popularity
    reasons.append(
        f"{model} {name}={candidate:.4f} {'beats' if beats_popularity else 'does not beat'} "
        f"popularity {popularity:.4f}"
    )
    keeps_up = True
    if serving_metrics is not None:
        if serving is None:
            reasons.append(f"the serving metrics have no {model} {name}: not compared")
        else:
            keeps_up = candidate >= serving - config.gate_margin
            reasons.append(
                f"{'within' if keeps_up else 'worse than'} the serving model's {serving:.4f} "
                f"{'minus' if keeps_up else 'beyond'} the margin {config.gate_margin}"
            )
    else:
        reasons.append("no serving model to compare with")
    blessed = beats_popularity and keeps_up
    return {
        "blessed": blessed,
        "reason": "; ".join(reasons),
        "metric": name,
        "model": model,
        "candidate": candidate,
        "popularity": popularity,
        "serving": serving,
        "margin": config.gate_margin,
    }


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Holdout:
    """Who is evaluated and on what: users with a relevant holdout item, and their queries."""

    users: list[str]
    seen: dict[str, set[str]]  # user -> items with a positive in training (never recommended)
    relevant: dict[str, set[str]]  # user -> holdout positives outside ``seen``
    queries: pd.DataFrame  # one row per user (index user_id): the query and ranker columns
    as_of: pd.Timestamp  # the moment item statistics are taken at


def evaluate(
    config: EvaluationConfig,
    train_dir: Path,
    train_frame: pd.DataFrame,
    holdout_frame: pd.DataFrame,
    items_frame: pd.DataFrame,
    out_dir: Path,
    serving_metrics: Mapping[str, Any] | Path | None = None,
    queries: pd.DataFrame | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate the models of ``train_dir`` on the holdout; write metrics, report and blessing.

    Args:
        config: the ``evaluation`` section.
        train_dir: the training step's folder (towers, ranker, item embeddings, manifest).
        train_frame: the events (or training frame) the models were trained on: what users
            had seen, the popularity baseline, new-user and new-item slices.
        holdout_frame: the training frame rows of the holdout period (``time_split``).
        items_frame: the catalog (item content and ``published_ts``).
        out_dir: where ``metrics.json``, ``report.html`` (+ PNGs), ``blessing.json`` and
            ``manifest.json`` (last) go.
        serving_metrics: the serving model's ``metrics.json`` (dict or path), if any.
        queries: one row per user with the query and ranker columns; default
            ``holdout_queries(holdout_frame)`` (each user's state at the cut).
        log: where progress lines go.

    Returns:
        The manifest: metrics per system and slice, the blessing, counts.
    """
    from components.training.train import use_legacy_keras

    use_legacy_keras()
    log = log or _default_log
    started = time.perf_counter()
    train_dir, out_dir = Path(train_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    train_manifest = read_manifest(train_dir)
    if isinstance(serving_metrics, str | Path):
        serving_metrics = json.loads(Path(serving_metrics).read_text())

    holdout = _holdout(config, train_manifest, train_frame, holdout_frame, queries)
    ranked, catalog_size, ranker_fn = _rank_all(
        config, train_dir, train_manifest, train_frame, items_frame, holdout
    )
    slices = _slices(config, train_frame, items_frame, holdout.relevant, holdout.as_of)
    metrics = {
        "models": _score(config, ranked, slices, holdout.users, catalog_size),
        "ks": sorted(config.ks),
        "slices": {name: len(rel) for name, rel in slices.items()},
        "catalog_items": catalog_size,
        "train_dir": str(train_dir),
        "holdout": {
            "start": holdout.as_of.isoformat(),
            "users": len(holdout.users),
            "relevant_pairs": int(sum(len(r) for r in holdout.relevant.values())),
        },
        "ranker": ranker_auc(ranker_fn, train_manifest["ranker_inputs"], holdout_frame),
    }
    blessing = Blessing(**gate(config, metrics, serving_metrics))
    report = _write_outputs(out_dir, metrics, blessing.model_dump())
    log(
        f"[evaluate] {config.gate_metric}: "
        + ", ".join(f"{m} {metrics['models'][m]['all'][config.gate_metric]:.4f}" for m in MODELS)
        + f" -> {'blessed' if blessing.blessed else 'NOT blessed'}"
    )
    manifest = EvaluateManifest(
        path=str(out_dir),
        train_dir=str(train_dir),
        metrics=metrics["models"],
        blessed=blessing.blessed,
        blessing=blessing,
        report=str(report),
        parameters=config.model_dump(mode="json"),
        seconds=round(time.perf_counter() - started, 1),
        code_version=code_version(),
    )
    write_manifest(out_dir, manifest)
    return manifest.model_dump()


def _holdout(
    config: EvaluationConfig,
    train_manifest: Mapping[str, Any],
    train_frame: pd.DataFrame,
    holdout_frame: pd.DataFrame,
    queries: pd.DataFrame | None,
) -> _Holdout:
    """The evaluated users: each has a holdout positive they had not engaged with in training."""
    seen = positive_items(train_frame)
    relevant = {u: rel - seen.get(u, set()) for u, rel in positive_items(holdout_frame).items()}
    relevant = {u: rel for u, rel in relevant.items() if rel}
    if queries is None:
        queries = holdout_queries(holdout_frame)
        if train_manifest.get("parameters", {}).get("history") == "leave_one_out":
            # Such a model was trained with whole-profile histories: query it the same way,
            # with the user's training positives (all before the holdout in a time split).
            queries = profile_history(queries, train_frame, train_manifest["parameters"]["max_history"])
    users = [u for u in relevant if u in queries.index]
    if not users:
        raise ValueError("no holdout user has a relevant item outside their training items")
    # The cut is where the holdout begins (time_split cuts at midnight); read it from the data.
    # A random split has no cut: item statistics are those at the end of the training data.
    as_of = pd.to_datetime(holdout_frame["ts"], utc=True).min().floor("D")
    if config.split == "random":
        as_of = pd.to_datetime(train_frame["ts"], utc=True).max().floor("D") + pd.Timedelta(days=1)
    return _Holdout(users, seen, {u: relevant[u] for u in users}, queries, as_of)


def _rank_all(
    config: EvaluationConfig,
    train_dir: Path,
    train_manifest: Mapping[str, Any],
    train_frame: pd.DataFrame,
    items_frame: pd.DataFrame,
    holdout: _Holdout,
) -> tuple[dict[str, dict[str, list[str]]], int, Callable[..., Mapping[str, Any]]]:
    """Each system's ranked list per user (``MODELS``), the catalog size, and the ranker."""
    from components.training.train import load_signature

    emb_df = pd.read_parquet(train_dir / "item_embeddings.parquet")
    item_ids = emb_df["item_id"].astype(str).to_numpy(dtype=object)
    item_emb = np.stack(emb_df["embedding"].to_numpy()).astype(np.float32)
    depth = max(max(config.ks), config.rerank_depth)
    users = holdout.users
    q_emb = _query_embeddings(train_dir, train_manifest["query_inputs"], holdout.queries.loc[users])
    retrieved, retrieval_scores = retrieve(q_emb, item_ids, item_emb, users, holdout.seen, depth)

    ranker_inputs = train_manifest["ranker_inputs"]
    item_features = items_frame.assign(item_id=items_frame["item_id"].astype(str)).drop_duplicates("item_id")
    stats = item_stats_at(train_frame, holdout.as_of, [c for c in ranker_inputs if ITEM_STAT.match(c)])
    item_features = item_features.set_index("item_id").join(stats, how="left")
    head = {u: retrieved[u][: config.rerank_depth] for u in users}
    head_scores = {u: retrieval_scores[u][: config.rerank_depth] for u in users}
    ranker_fn = load_signature(train_dir / "ranker")
    reranked = rerank(
        ranker_fn, ranker_inputs, holdout.queries, head, head_scores, item_features, config.retrieval_weight
    )
    ranked = {
        "retriever": retrieved,
        # Past the re-ranked head the retrieval order continues, so recall@K beyond the depth counts.
        "retriever_ranker": {u: reranked[u] + retrieved[u][config.rerank_depth :] for u in users},
        "popularity": popularity_ranking(train_frame, item_ids, users, holdout.seen, depth),
    }
    return ranked, len(item_ids), ranker_fn


def _query_embeddings(train_dir: Path, query_inputs: Mapping[str, str], queries: pd.DataFrame) -> np.ndarray:
    """The query tower's embedding of each row of ``queries``, in batches."""
    import tensorflow as tf

    from components.training.train import features_from_frame, load_signature

    query_fn = load_signature(train_dir / "query_tower")
    arrays = features_from_frame(queries, query_inputs)
    return np.concatenate(
        [
            query_fn(**{k: tf.constant(v[lo : lo + 4096]) for k, v in arrays.items()})["embedding"].numpy()
            for lo in range(0, len(queries), 4096)
        ]
    )


def _score(
    config: EvaluationConfig,
    ranked: Mapping[str, Mapping[str, list[str]]],
    slices: Mapping[str, dict[str, set[str]]],
    users: list[str],
    catalog_size: int,
) -> dict[str, Any]:
    """Metrics of each system on each slice, plus catalog coverage on ``all``."""
    ks = sorted(config.ks)
    results: dict[str, Any] = {}
    for model in MODELS:
        results[model] = {name: summarize(ranked[model], rel, ks) for name, rel in slices.items()}
        results[model]["all"][f"coverage@{ks[0]}"] = coverage(
            (ranked[model][u] for u in users), catalog_size, ks[0]
        )
    return results


def _write_outputs(out_dir: Path, metrics: Mapping[str, Any], blessing: Mapping[str, Any]) -> Path:
    """``metrics.json``, ``blessing.json`` and the report; returns the report's path."""
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    (out_dir / "blessing.json").write_text(json.dumps(blessing, indent=2, sort_keys=True) + "\n")
    return write_report(out_dir, metrics, blessing)


def _slices(
    config: EvaluationConfig,
    train_frame: pd.DataFrame,
    items_frame: pd.DataFrame,
    relevant: dict[str, set[str]],
    as_of: pd.Timestamp,
) -> dict[str, dict[str, set[str]]]:
    counts = train_frame["user_id"].astype(str).value_counts()
    known_users = set(counts.index)
    n_heavy = max(1, int(round(len(counts) * config.heavy_user_fraction)))
    heavy = set(counts.index[:n_heavy])
    touched = set(train_frame["item_id"].astype(str))
    published = pd.to_datetime(items_frame["published_ts"], utc=True)
    new_items = set(items_frame["item_id"].astype(str)[published >= as_of]) | (
        set(items_frame["item_id"].astype(str)) - touched
    )
    return {
        "all": relevant,
        "new_users": {u: r for u, r in relevant.items() if u not in known_users},
        "new_items": {u: r & new_items for u, r in relevant.items() if r & new_items},
        "heavy_users": {u: r for u, r in relevant.items() if u in heavy},
    }


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def write_report(out_dir: Path, metrics: Mapping[str, Any], blessing: Mapping[str, Any]) -> Path:
    """``report.html`` with one bar chart per slice (PNG beside it and embedded) and the tables."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    models = metrics["models"]
    names = metric_names(metrics["ks"])
    sections = []
    for slice_name in SLICES:
        n_users = models["retriever"][slice_name]["users"]
        fig, ax = plt.subplots(figsize=(10, 3.6))
        width = 0.8 / len(MODELS)
        x = np.arange(len(names))
        for i, model in enumerate(MODELS):
            ax.bar(x + i * width, [models[model][slice_name][n] for n in names], width, label=model)
        ax.set_xticks(x + width * (len(MODELS) - 1) / 2, names, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(f"{slice_name} ({n_users} users)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        png = out_dir / f"metrics_{slice_name}.png"
        fig.savefig(png, dpi=90)
        plt.close(fig)
        rows = "".join(
            f"<tr><th>{html.escape(m)}</th>"
            + "".join(f"<td>{models[model][slice_name][m]:.4f}</td>" for model in MODELS)
            + "</tr>"
            for m in names
        )
        img = base64.b64encode(png.read_bytes()).decode()
        sections.append(
            f"<h2>{html.escape(slice_name)} — {n_users} users</h2>"
            f'<img alt="{slice_name}" src="data:image/png;base64,{img}">'
            f"<table><tr><th></th>{''.join(f'<th>{m}</th>' for m in MODELS)}</tr>{rows}</table>"
        )
    k0 = metrics["ks"][0]
    cov = "".join(f"<li>{m}: {models[m]['all'][f'coverage@{k0}']:.3f}</li>" for m in MODELS)
    verdict = "blessed" if blessing["blessed"] else "not blessed"
    holdout = metrics["holdout"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:2px 8px;text-align:right}}</style></head><body>
<h1>Offline evaluation: {verdict}</h1>
<p>{html.escape(blessing["reason"])}</p>
<p>Holdout from {html.escape(str(holdout["start"]))}: {holdout["users"]} users,
{holdout["relevant_pairs"]} relevant (user, item) pairs; catalog {metrics["catalog_items"]} items.</p>
<p>Catalog coverage@{k0}:</p><ul>{cov}</ul>
<p>Ranker click AUC on holdout impressions: {html.escape(json.dumps(metrics.get("ranker")))}</p>
{"".join(sections)}
</body></html>
"""
    path = out_dir / "report.html"
    path.write_text(page)
    return path


def _default_log(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(message, highlight=False)
