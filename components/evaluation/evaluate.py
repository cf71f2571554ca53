"""Step: evaluate the system the gateway serves, offline, and gate it.

Offline evaluation replays the future: train on events before a cut, then ask, for each
user with a positive after it, "would the served list have put the items this user went on
to engage with near the top?" By default the cut is by time (the last ``holdout_days``),
because that is the question production asks and only a time cut contains what production
meets: users who signed up after training and items published after it. A holdout too small
to decide falls back to each user's last item, then a random split (``splits``), and the
report says so.

Systems compared on the same users and relevant items:

- ``served``: the gateway's path replayed (``served_policy``): ``gateway.candidates``
  retrieved exactly, business rules and seen items filtered, the ranker fused with the
  retrieval rank at the weight chosen on validation (``fusion``), MMR, exploration slots;
- ``retriever``: exact top-K by dot product between the query tower's embedding and every
  item embedding (``item_embeddings.parquet``);
- ``retriever_ranker``: the retriever's top ``rerank_depth`` re-ordered by rank fusion at
  the configured ``retrieval_weight`` (what a version without a serving policy serves);
- ``popularity``: the most engaged-with items of the training period, the baseline every
  personalized model must beat to earn its complexity.

A user's relevant items are their positive events in the holdout, minus items they already
had positives with in training; those are also removed from every list (a recommender does
not re-recommend what was consumed). Slices: ``all``; ``new_users`` (no training events);
``new_items`` (only relevant items published or first seen in the holdout count);
``heavy_users`` (the top ``heavy_user_fraction`` by training events).

Where the generator's truth exists (``reward``), each system's top-K is also scored by the
expected reward a user would get if shown it, and a ranker, fusion weight or MMR that
lowers it is not served. The report shows each step's contribution (retrieval -> ranker ->
MMR -> exploration) and the ranker's own objectives (click AUC, calibration).

The gate blesses the model only when the gated system (``served`` by default) beats
popularity on ``gate_metric`` (and, with truth, on expected reward) and does not trail the
serving model's ``metrics.json`` by more than ``gate_margin``.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from components.evaluation.fusion import PolicyChoice, choose_policy, metric_k, weight_label
from components.evaluation.metrics import coverage, summarize
from components.evaluation.objectives import ranker_objectives
from components.evaluation.report import write_report
from components.evaluation.reward import Truth, expected_reward_at_k, load_truth
from components.evaluation.served_policy import (
    Replay,
    Step,
    build_replay,
    business_rules,
    head_rerank,
    new_item_mask,
    score_pairs,
)
from components.evaluation.session_replay import Session, SimulatedUsers, session_rewards, with_clicks
from components.evaluation.splits import choose_split, split_holdout, time_split, validation_split
from components.training.neighbours import refit_like
from recsys.config import EvaluationConfig, FeaturesConfig, GatewayConfig, TrainingConfig
from recsys.contracts import category_set
from recsys.feature_schema import POSITIVE_EVENT_TYPES
from recsys.manifests import Blessing, EvaluateManifest
from recsys.neighbours import ItemNeighbours, read_item_neighbours
from recsys.ranking import ServingPolicy
from recsys.storage import code_version, read_manifest, write_manifest

# Re-exported: the pipeline's training-data step and older callers split through this module.
__all__ = ["MODELS", "SLICES", "evaluate", "gate", "split_holdout", "time_split"]

MODELS = ("served", "retriever", "retriever_ranker", "popularity")
SLICES = ("all", "new_users", "new_items", "heavy_users")
ITEM_STAT = re.compile(r"^item_(impressions|positives|ctr)_(\d+)d$")


# --------------------------------------------------------------------------------------------
# Data: queries, relevance, item statistics
# --------------------------------------------------------------------------------------------


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
    """``queries`` with ``recent_items`` = each user's training positives, newest first, with
    their times and their ages at each query's time (as training built them)."""
    from components.training.train import with_profile_history

    return with_profile_history(queries, train_frame, max_history)


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
# Ranked lists of the retriever and the popularity baseline
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


# --------------------------------------------------------------------------------------------
# The gate
# --------------------------------------------------------------------------------------------


def _metric_of(metrics: Mapping[str, Any], model: str, name: str) -> float | None:
    try:
        return float(metrics["models"][model]["all"][name])
    except (KeyError, TypeError):
        return None


def _reward_of(metrics: Mapping[str, Any], model: str) -> float | None:
    try:
        value = metrics["reward"]["systems"][model]
    except (KeyError, TypeError):
        return None
    return None if value is None else float(value)


def gate(
    config: EvaluationConfig, metrics: Mapping[str, Any], serving_metrics: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Decide whether a model may replace the serving one.

    Blessed when (1) the gated system (``gate_model``, the served one by default) beats the
    popularity baseline on ``gate_metric`` over all users, strictly: a model no better than
    "show the bestsellers" is not worth serving; (2) where the metrics hold the generator's
    expected reward, it beats popularity on that too; and (3) it does not trail the serving
    model's value by more than ``gate_margin`` (absolute). Without serving metrics (the first
    model), (3) does not apply. Where the truth judges (``judge: reward``) and both reward
    values exist, (3) compares expected reward instead, within ``gate_reward_margin`` (a
    fraction of the serving model's): on logged positives the serving model is judged on what
    it chose to show. A holdout too small to decide is named in the reason.

    Args:
        config: the ``evaluation`` section.
        metrics: this evaluation's metrics (the ``metrics.json`` structure).
        serving_metrics: the serving model's ``metrics.json``, if any.

    Returns:
        ``{"blessed", "reason", "metric", "model", "candidate", "popularity", "serving",
        "serving_reward", "margin"}``.
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
    reward, reward_popularity = _reward_of(metrics, model), _reward_of(metrics, "popularity")
    judged_by_reward = config.judge == "reward" and reward is not None and reward_popularity is not None
    if reward is not None and reward_popularity is not None:
        beats_on_reward = reward > reward_popularity
        if judged_by_reward:
            # The truth judges; the metric on logged positives is reported, not decisive.
            reasons[-1] += " (reported; the generator's truth judges)"
            beats_popularity = beats_on_reward
        else:
            beats_popularity = beats_popularity and beats_on_reward
        reasons.append(
            f"expected reward {reward:.4f} {'beats' if beats_on_reward else 'does not beat'} "
            f"popularity's {reward_popularity:.4f}"
        )
    keeps_up = True
    serving_reward = _reward_of(serving_metrics, model) if serving_metrics else None
    if serving_metrics is not None:
        if judged_by_reward and reward is not None and serving_reward is not None:
            keeps_up = reward >= serving_reward * (1 - config.gate_reward_margin)
            reasons.append(
                f"expected reward {'within' if keeps_up else 'worse than'} the serving model's "
                f"{serving_reward:.4f} {'minus' if keeps_up else 'beyond'} the margin "
                f"{config.gate_reward_margin:.0%}"
                + (f" ({name} {serving:.4f} for the serving model, reported)" if serving is not None else "")
            )
        elif serving is None:
            reasons.append(f"the serving metrics have no {model} {name}: not compared")
        else:
            keeps_up = candidate >= serving - config.gate_margin
            reasons.append(
                f"{'within' if keeps_up else 'worse than'} the serving model's {serving:.4f} "
                f"{'minus' if keeps_up else 'beyond'} the margin {config.gate_margin}"
            )
    else:
        reasons.append("no serving model to compare with")
    note = (metrics.get("split") or {}).get("note")
    if note:
        reasons.append(note)
    blessed = beats_popularity and keeps_up
    return {
        "blessed": blessed,
        "reason": "; ".join(reasons),
        "metric": name,
        "model": model,
        "candidate": candidate,
        "popularity": popularity,
        "serving": serving,
        "serving_reward": serving_reward,
        "margin": config.gate_margin,
    }


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSet:
    """Who is evaluated and on what: users with a relevant item, their queries, the moment."""

    users: list[str]
    seen: dict[str, set[str]]  # user -> items with a positive before (never recommended)
    relevant: dict[str, set[str]]  # user -> held-out positives outside ``seen``
    queries: pd.DataFrame  # one row per user (index user_id): the query and ranker columns
    as_of: pd.Timestamp  # the moment item statistics are taken at


@dataclass(frozen=True)
class _Models:
    """The trained models of ``train_dir``, loaded once for every evaluation set."""

    manifest: Mapping[str, Any]
    item_ids: np.ndarray
    item_embeddings: np.ndarray
    query_fn: Any
    ranker_fn: Any
    neighbours: ItemNeighbours | None = None  # the item-to-item source, where training fitted one


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
    gateway: GatewayConfig | None = None,
    truth_data: Path | None = None,
    recent_items: int | None = None,
) -> dict[str, Any]:
    """Evaluate the served system of ``train_dir`` on the holdout; write metrics, report, blessing.

    Args:
        config: the ``evaluation`` section.
        train_dir: the training step's folder (towers, ranker, item embeddings, manifest).
        train_frame: the events (or training frame) the models were trained on: what users
            had seen, the popularity baseline, new-user and new-item slices, and the
            validation split the serving policy is chosen on.
        holdout_frame: the training frame rows of the holdout (``split_holdout``).
        items_frame: the catalog (item content, ``in_stock`` and ``published_ts``).
        out_dir: where ``metrics.json``, ``report.html`` (+ PNGs), ``blessing.json`` and
            ``manifest.json`` (last) go.
        serving_metrics: the serving model's ``metrics.json`` (dict or path), if any.
        queries: one row per user with the query and ranker columns; default
            ``holdout_queries(holdout_frame)`` (each user's state at the cut).
        log: where progress lines go.
        gateway: the ``gateway`` section the served system is replayed with (candidates,
            business rules, MMR, exploration); default its defaults.
        truth_data: the data folder whose generator truth scores expected reward, if any.
        recent_items: how many of a user's newest items the gateway's item-to-item source
            reads (``features.recent_items``; default its default).

    Returns:
        The manifest: metrics per system and slice, the blessing and serving policy, counts.
    """
    from components.training.train import use_legacy_keras

    use_legacy_keras()
    log = log or _default_log
    gateway = gateway or GatewayConfig()
    recent = recent_items or FeaturesConfig().recent_items
    started = time.perf_counter()
    train_dir, out_dir = Path(train_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)
    serving: Mapping[str, Any] | None = (
        json.loads(Path(serving_metrics).read_text())
        if isinstance(serving_metrics, str | Path)
        else serving_metrics
    )

    models = _load_models(train_dir)
    split = _describe_split(config, train_frame, holdout_frame)
    truth, truth_note = load_truth(truth_data, _reward_weights(models.manifest))
    log(f"[evaluate] {truth_note}")
    choice = _choose_serving_policy(config, gateway, models, train_frame, items_frame, truth, recent, log)
    policy = choice.policy

    holdout = _eval_set(config, models.manifest, train_frame, holdout_frame, queries)
    if len(holdout.users) < config.min_holdout_users and not split.get("note"):
        split["note"] = (
            f"the holdout has {len(holdout.users)} users with a relevant item, fewer than "
            f"min_holdout_users={config.min_holdout_users}: the verdict rests on few users"
        )
    retrieved, replay = _replay(config, gateway, models, train_frame, items_frame, holdout, recent)
    steps = _steps(replay, policy, choice)
    ranked = {
        "served": steps["exploration"]["lists"],
        "retriever": retrieved,
        "retriever_ranker": head_rerank(replay, retrieved, config.rerank_depth, config.retrieval_weight),
        "popularity": popularity_ranking(
            train_frame,
            models.item_ids,
            holdout.users,
            holdout.seen,
            max(max(config.ks), config.rerank_depth),
        ),
    }
    slices = _slices(config, train_frame, items_frame, holdout.relevant, holdout.as_of)
    k = metric_k(config.gate_metric)
    reward_of = _reward_function(truth, holdout.users, k)
    metrics: dict[str, Any] = {
        "models": _score(config, ranked, slices, holdout.users, len(models.item_ids)),
        "ks": sorted(config.ks),
        "slices": {name: len(rel) for name, rel in slices.items()},
        "catalog_items": len(models.item_ids),
        "train_dir": str(train_dir),
        "holdout": {
            "start": holdout.as_of.isoformat(),
            "users": len(holdout.users),
            "relevant_pairs": int(sum(len(r) for r in holdout.relevant.values())),
        },
        "split": split,
        "serving_policy": policy.model_dump(mode="json"),
        "steps": _step_table(steps, holdout.relevant, config.gate_metric, reward_of),
        "reward": {
            "available": truth is not None,
            "note": truth_note,
            "k": k,
            "systems": {m: reward_of(ranked[m]) for m in MODELS} if reward_of else None,
        },
        "ranker": ranker_objectives(
            models.ranker_fn, models.manifest["ranker_inputs"], holdout_frame, config.calibration_bins
        ),
        "gateway": {
            "candidates": gateway.candidates,
            "mmr_trade_off": gateway.mmr_trade_off,
            "mmr_depth": gateway.mmr_depth,
            "exploration_slots": gateway.exploration_slots,
            "exploration_position": gateway.exploration_position,
        },
    }
    verdict = gate(config, metrics, serving)
    blessing = Blessing(**verdict, serving_policy=policy.model_dump(mode="json"))
    report = _write_outputs(out_dir, metrics, blessing.model_dump())
    log(
        f"[evaluate] {config.gate_metric}: "
        + ", ".join(f"{m} {metrics['models'][m]['all'][config.gate_metric]:.4f}" for m in MODELS)
        + f"; fusion weight {weight_label(policy.fusion_weight)}"
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
        split=split,
        serving_policy=policy.model_dump(mode="json"),
    )
    write_manifest(out_dir, manifest)
    return manifest.model_dump()


def _load_models(train_dir: Path) -> _Models:
    from components.training.train import load_signature

    manifest = read_manifest(train_dir)
    emb_df = pd.read_parquet(train_dir / "item_embeddings.parquet")
    return _Models(
        manifest=manifest,
        item_ids=emb_df["item_id"].astype(str).to_numpy(dtype=object),
        item_embeddings=np.stack(emb_df["embedding"].to_numpy()).astype(np.float32),
        query_fn=load_signature(train_dir / "query_tower"),
        ranker_fn=load_signature(train_dir / "ranker"),
        neighbours=read_item_neighbours(train_dir),
    )


def _reward_weights(train_manifest: Mapping[str, Any]) -> TrainingConfig:
    """The reward the truth scores: the trained ranker's objective weights and dwell cap."""
    params = train_manifest.get("parameters", {})
    return TrainingConfig(
        objective_weights=train_manifest.get("objective_weights") or TrainingConfig().objective_weights,
        engagement_dwell_cap_seconds=params.get(
            "engagement_dwell_cap_seconds", TrainingConfig().engagement_dwell_cap_seconds
        ),
    )


def _describe_split(
    config: EvaluationConfig, train_frame: pd.DataFrame, holdout_frame: pd.DataFrame
) -> dict[str, Any]:
    """Which split the gate reads and why (the fallback ``split_holdout`` took, if any)."""
    whole = pd.concat([train_frame, holdout_frame], ignore_index=True)
    _, _, choice = choose_split(whole, config)
    return choice.as_dict()


def _eval_set(
    config: EvaluationConfig,
    train_manifest: Mapping[str, Any],
    train_frame: pd.DataFrame,
    holdout_frame: pd.DataFrame,
    queries: pd.DataFrame | None,
) -> EvalSet:
    """The evaluated users: each has a held-out positive they had not engaged with before."""
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
    return EvalSet(users, seen, {u: relevant[u] for u in users}, queries, _as_of(train_frame, holdout_frame))


def _as_of(train_frame: pd.DataFrame, holdout_frame: pd.DataFrame) -> pd.Timestamp:
    """When item statistics are taken: the cut of a time split (the holdout's first midnight);
    the end of the training data for a per-user split (random, last item), which has no cut."""
    train_ts = pd.to_datetime(train_frame["ts"], utc=True)
    holdout_ts = pd.to_datetime(holdout_frame["ts"], utc=True)
    if train_ts.empty or holdout_ts.min() >= train_ts.max():
        return holdout_ts.min().floor("D")
    return train_ts.max().floor("D") + pd.Timedelta(days=1)


def _item_features(
    items_frame: pd.DataFrame,
    train_frame: pd.DataFrame,
    ranker_inputs: Mapping[str, str],
    as_of: pd.Timestamp,
) -> pd.DataFrame:
    """Item-side ranker columns (content, and popularity statistics as of ``as_of``)."""
    item_features = items_frame.assign(item_id=items_frame["item_id"].astype(str)).drop_duplicates("item_id")
    stats = item_stats_at(train_frame, as_of, [c for c in ranker_inputs if ITEM_STAT.match(c)])
    return item_features.set_index("item_id").join(stats, how="left")


def _replay(
    config: EvaluationConfig,
    gateway: GatewayConfig,
    models: _Models,
    train_frame: pd.DataFrame,
    items_frame: pd.DataFrame,
    eval_set: EvalSet,
    recent_items: int,
    with_retriever: bool = True,
    neighbours: ItemNeighbours | None = None,
    session: Session | None = None,
    request: int = 0,
) -> tuple[dict[str, list[str]], Replay]:
    """The retriever's lists (seen excluded) and the served replay of one evaluation set.

    The item-to-item source (``neighbours``, default the version's own) reads each user's
    ``recent_items`` newest positives of ``train_frame``, as the gateway reads its recent items.
    With a ``session``, request number ``request`` of it: its clicks lead the queries' and the
    sources' recent items, its seen items are filtered, its passed-over items discounted.
    """
    from components.training.train import positive_histories

    if session is None:
        histories = {u: items[:recent_items] for u, items in positive_histories(train_frame).items()}
        passed_over = None
    else:
        queries = with_clicks(
            eval_set.queries.loc[eval_set.users], session.clicks, _max_history(models, recent_items)
        )
        eval_set = replace(eval_set, seen=session.seen, queries=queries)
        histories = {u: items[:recent_items] for u, items in session.histories.items()}
        passed_over = session.passed
    users = eval_set.users
    q_emb = _query_embeddings(models.query_fn, models.manifest["query_inputs"], eval_set.queries.loc[users])
    retrieved: dict[str, list[str]] = {}
    if with_retriever:
        depth = max(max(config.ks), config.rerank_depth)
        retrieved, _ = retrieve(q_emb, models.item_ids, models.item_embeddings, users, eval_set.seen, depth)
    ranker_inputs = models.manifest["ranker_inputs"]
    item_features = _item_features(items_frame, train_frame, ranker_inputs, eval_set.as_of)

    def ranker_scores(user_items: Mapping[str, Sequence[str]]) -> dict[str, np.ndarray]:
        return score_pairs(models.ranker_fn, ranker_inputs, eval_set.queries, user_items, item_features)

    replay = build_replay(
        users=users,
        item_ids=models.item_ids,
        item_embeddings=models.item_embeddings,
        query_embeddings=q_emb,
        seen=eval_set.seen,
        allowed=business_rules(items_frame, models.item_ids, gateway),
        new_items=new_item_mask(
            items_frame, train_frame, models.item_ids, eval_set.as_of, gateway.new_item_days
        ),
        ranker_scores=ranker_scores,
        gateway=gateway,
        k=max(config.ks),
        seed=config.split_seed + request,
        also_score={u: retrieved[u][: config.rerank_depth] for u in users} if with_retriever else None,
        neighbours=neighbours or models.neighbours,
        histories=histories,
        item_categories=_item_categories(items_frame, models.item_ids),
        passed_over=passed_over,
    )
    return retrieved, replay


def _max_history(models: _Models, default: int) -> int:
    """The recent items the version's query tower reads (``training.max_history``)."""
    return int(models.manifest.get("parameters", {}).get("max_history", default))


def _item_categories(items_frame: pd.DataFrame, item_ids: np.ndarray) -> list[frozenset[str]]:
    """Each catalog item's categories, aligned with ``item_ids`` (none for an unknown item)."""
    items = items_frame.assign(item_id=items_frame["item_id"].astype(str)).drop_duplicates("item_id")
    category = items.set_index("item_id")["category"]
    return [category_set(c) for c in category.reindex(item_ids).tolist()]


def _choose_serving_policy(
    config: EvaluationConfig,
    gateway: GatewayConfig,
    models: _Models,
    train_frame: pd.DataFrame,
    items_frame: pd.DataFrame,
    truth: Truth | None,
    recent_items: int,
    log: Callable[[str], None],
) -> PolicyChoice:
    """The neighbour share, fusion weight and MMR, chosen on a validation split carved from
    ``train_frame``. The item-to-item source is refitted (same recipe) on the fitting part:
    unlike the towers it costs seconds, and then it has not seen the validation positives."""
    params = models.manifest.get("parameters", {})
    # The models learned from the events training held out for early stopping only when
    # they were refit on everything: then no part of the training frame is unseen.
    fraction = 0.0 if params.get("refit_on_full") else float(params.get("validation_fraction", 0.1))
    how, seed = str(params.get("validation_split", "time")), int(params.get("seed", 0))
    carved = validation_split(train_frame, fraction, config.min_holdout_users, how, seed)
    log(f"[evaluate] validation split: {carved.how}")
    try:
        validation = _eval_set(config, models.manifest, carved.train, carved.holdout, None)
    except ValueError:
        policy = ServingPolicy(
            retrieval_weight=config.retrieval_weight,
            mmr=True,
            rank_depth=gateway.candidates,
            reasons=[
                f"the validation split ({carved.how}) has no user to choose on: the configured "
                f"retrieval_weight {config.retrieval_weight:g} and MMR serve"
            ],
        )
        return PolicyChoice(policy, [], {})
    neighbours = None
    if models.neighbours is not None:
        max_items = int(params.get("neighbour_max_items", len(models.neighbours)))
        neighbours = refit_like(models.neighbours, carved.train, max_items)
    _, replay = _replay(
        config, gateway, models, carved.train, items_frame, validation, recent_items,
        with_retriever=False, neighbours=neighbours,
    )  # fmt: skip
    reward_of = _reward_function(truth, validation.users, metric_k(config.gate_metric))
    session_reward_of = None
    if truth is not None and config.session_requests > 0:
        session_reward_of = _session_reward_function(
            config, gateway, models, carved.train, items_frame, validation, recent_items, neighbours, truth
        )
    popular = popularity_ranking(
        carved.train, models.item_ids, validation.users, validation.seen, max(config.ks)
    )
    baseline = summarize(popular, validation.relevant, [metric_k(config.gate_metric)])[config.gate_metric]
    return choose_policy(
        replay,
        validation.relevant,
        config.fusion_weights,
        config.gate_metric,
        reward_of,
        carved.how,
        baseline,
        config.judge,
        config.neighbour_weights,
        config.taste_weights,
        session_reward_of,
    )


def _session_reward_function(
    config: EvaluationConfig,
    gateway: GatewayConfig,
    models: _Models,
    train_frame: pd.DataFrame,
    items_frame: pd.DataFrame,
    validation: EvalSet,
    recent_items: int,
    neighbours: ItemNeighbours | None,
    truth: Truth,
) -> Callable[[Step], list[float]]:
    """step -> the expected reward per request of a simulated session of the first
    ``session_users`` validation users (``session_replay``): every request retrieves, blends
    and ranks again for the session's state, as the gateway does."""
    from components.training.train import positive_histories

    simulated = cast(SimulatedUsers, truth)
    known = set(simulated.user_ids)
    users = [u for u in validation.users if u in known][: config.session_users]
    wanted = set(users)
    start = Session.start(
        {u: h for u, h in positive_histories(train_frame).items() if u in wanted},
        {u: validation.seen.get(u, set()) for u in users},
    )
    eval_set = replace(validation, users=users)
    max_history = _max_history(models, recent_items)

    def replay_of(session: Session, request: int) -> Replay:
        _, replay = _replay(
            config, gateway, models, train_frame, items_frame, eval_set, recent_items,
            with_retriever=False, neighbours=neighbours, session=session, request=request,
        )  # fmt: skip
        return replay

    k = metric_k(config.gate_metric)
    return lambda step: session_rewards(
        replay_of, simulated, start, users, step, config.session_requests, k, config.split_seed, max_history
    )


def _reward_function(
    truth: Truth | None, users: Sequence[str], k: int
) -> Callable[[Mapping[str, Sequence[str]]], float] | None:
    if truth is None:
        return None
    return lambda lists: expected_reward_at_k(truth, lists, users, k)


def _steps(replay: Replay, policy: ServingPolicy, choice: PolicyChoice) -> dict[str, dict[str, Any]]:
    """The served system built up one step at a time: retrieval, the item-to-item source,
    the category taste, ranker, MMR, exploration.

    A step the policy does not serve is still measured (a candidate-score share at its best
    validation share, the ranker at its best validation weight, MMR as configured) so the
    report shows what it would have cost; the steps after it build on what serves.
    """
    weight = policy.fusion_weight
    ranker_weight = weight if policy.ranker_served else (choice.best_finite_weight or 0.0)
    gw = replay.gateway
    blend, taste = policy.neighbour_weight, policy.taste_weight
    best_blend = _best_share(policy, "neighbour_grid", "neighbour_weight")
    best_taste = _best_share(policy, "taste_grid", "taste_weight")
    chosen = Step(weight, mmr=policy.mmr, explore=False, blend=blend, taste=taste)
    plan = {
        "retrieval": (Step(math.inf, mmr=False, explore=False), True),
        "neighbours": (Step(math.inf, mmr=False, explore=False, blend=blend or best_blend), blend > 0),
        "category taste": (
            Step(math.inf, mmr=False, explore=False, blend=blend, taste=taste or best_taste),
            taste > 0,
        ),
        "ranker": (replace(chosen, weight=ranker_weight, mmr=False), policy.ranker_served),
        "mmr": (replace(chosen, mmr=True), policy.mmr and gw.mmr_trade_off < 1),
        "exploration": (replace(chosen, explore=True), gw.exploration_slots > 0),
    }
    return {
        name: {"lists": replay.lists(step), "served": served, "weight": weight_label(step.weight)}
        for name, (step, served) in plan.items()
    }


def _best_share(policy: ServingPolicy, grid: str, key: str) -> float:
    """The best positive share of one validation grid by the policy's metric (0 if none)."""
    metric = policy.validation.get("metric", "")
    shares = [row for row in policy.validation.get(grid) or [] if row[key] > 0]
    return float(max(shares, key=lambda row: row.get(metric, 0.0))[key]) if shares else 0.0


def _step_table(
    steps: Mapping[str, Mapping[str, Any]],
    relevant: Mapping[str, set[str]],
    metric: str,
    reward_of: Callable[[Mapping[str, Sequence[str]]], float] | None,
) -> list[dict[str, Any]]:
    """Each step's gate metric and expected reward on the holdout, and its change over the
    last served step before it."""
    k = metric_k(metric)
    rows: list[dict[str, Any]] = []
    last: dict[str, Any] | None = None
    for name, step in steps.items():
        row = {
            "step": name,
            "served": bool(step["served"]),
            "weight": step["weight"],
            metric: summarize(step["lists"], relevant, [k])[metric],
            "expected_reward": reward_of(step["lists"]) if reward_of else None,
        }
        if last is not None:
            row[f"{metric}_uplift"] = row[metric] - last[metric]
            if reward_of:
                row["expected_reward_uplift"] = row["expected_reward"] - last["expected_reward"]
        rows.append(row)
        if row["served"]:
            last = row
    return rows


def _query_embeddings(query_fn: Any, query_inputs: Mapping[str, str], queries: pd.DataFrame) -> np.ndarray:
    """The query tower's embedding of each row of ``queries``, in batches."""
    import tensorflow as tf

    from components.training.train import features_from_frame

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
    return write_report(out_dir, metrics, blessing, MODELS, SLICES)


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


def _default_log(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(message, highlight=False)
