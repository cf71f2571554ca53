"""The serving policy, chosen on a validation split: the fusion weight, the ranker on or off, MMR.

Each choice is a hyperparameter of what serves, so it is made on a validation split carved
from the gate's training part (``splits.validation_split``), never on the holdout the gate
reads:

1. **neighbour weight**: the item-to-item source's share of the candidate score (0: the
   retriever's candidates alone, and each of ``evaluation.neighbour_weights``), read with
   the ranker off; the best on the gate metric (or, with ``judge: reward``, the expected
   reward) wins, ties to the smaller share. Then, on those candidates, the **category
   taste**'s share (``evaluation.taste_weights``: how many of the user's recent items share
   the candidate's category), chosen the same way. The steps below build on the chosen
   candidate score.
2. **fusion weight**: every weight of ``evaluation.fusion_weights`` and retrieval order alone
   (the ranker not served) order the validation users' served candidates; the best on the
   gate metric wins (ties go to the larger weight, retrieval alone counting as the largest:
   the cheaper system). Where the generator's truth exists, a weight that lowers the expected
   reward of the top-K below retrieval alone is not served (nor, then, the ranker); a weight
   the metric passed over that would raise the expected reward is named in the reasons, since
   logged positives carry the old system's exposure and the truth does not. With truth, a
   ranker that would serve is also played against retrieval order alone over a simulated
   session of ``evaluation.session_requests`` requests (``session_replay``): the ranker reads
   no session signal, and one request cannot show a weight that keeps the lists from
   following the session's clicks; if it lowers the session's mean reward it is not served
   (where retrieval order serves anyway, the ranker's best weight is played and reported).
3. **MMR**: served as configured, its offline cost reported; with truth, not served when it
   lowers the expected reward.

The result is a ``recsys.ranking.ServingPolicy`` with the reasons and the grid's scores,
pushed with the model so the gateway and batch recommendations serve exactly this.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from components.evaluation.metrics import summarize
from components.evaluation.served_policy import Replay, Step
from recsys.ranking import ServingPolicy

RewardOf = Callable[[Mapping[str, Sequence[str]]], float]
# A step -> its mean expected reward at each request of a simulated session.
SessionRewardOf = Callable[[Step], list[float]]
RETRIEVAL_ONLY = "retrieval only"


def weight_label(weight: float) -> str:
    """How a fusion weight is named in reports: a number, or "retrieval only" for infinity."""
    return RETRIEVAL_ONLY if math.isinf(weight) else f"{weight:g}"


def metric_k(metric: str) -> int:
    """The cut-off of a metric name (``ndcg@10`` -> 10; ``mrr`` reads the top 10)."""
    _, _, k = metric.partition("@")
    return int(k) if k else 10


@dataclass(frozen=True)
class PolicyChoice:
    """The chosen policy, and the validation scores it was chosen on (for the report)."""

    policy: ServingPolicy
    grid: list[dict[str, Any]]  # per weight: label, metric value, expected reward (or None)
    mmr: dict[str, Any]  # metric and reward without and with MMR at the chosen weight
    best_finite_weight: float | None = None  # the ranker's best weight, served or not


def choose_policy(
    replay: Replay,
    relevant: Mapping[str, set[str]],
    fusion_weights: Sequence[float],
    metric: str,
    reward_of: RewardOf | None,
    validation_note: str,
    popularity: float | None = None,
    judge: str = "metric",
    neighbour_weights: Sequence[float] = (),
    taste_weights: Sequence[float] = (),
    session_reward_of: SessionRewardOf | None = None,
) -> PolicyChoice:
    """Pick the fusion weight and MMR on the validation ``replay``.

    The weight with the best validation ``metric`` serves (ties to the larger weight, the
    cheaper system); with truth, not when it lowers the expected reward below retrieval order
    alone (the ranker is then not served).

    Args:
        replay: the validation users' served candidates and scores.
        relevant: user -> their validation positives outside their fitting-part positives.
        fusion_weights: finite weights to try (retrieval order alone is always tried).
        metric: the gate metric (``ndcg@10``).
        reward_of: lists -> mean expected reward of the top-K; None without truth.
        validation_note: how the validation split was made (into the reasons).
        popularity: the popularity baseline's ``metric`` on the validation users, if known.
        judge: "reward" chooses the weight by the validation expected reward where
            ``reward_of`` exists; "metric" by ``metric``, the truth only vetoing.
        neighbour_weights: the item-to-item source's shares to try (when the replay has it).
        taste_weights: the category taste's shares to try (when the replay has it).
        session_reward_of: with truth, step -> expected reward per request of a simulated
            session (``session_replay``); a ranker that lowers it below retrieval order alone
            is not served, whatever the one-request replay said.

    Returns:
        The policy (weight, MMR, reasons, grid), the grid and the MMR comparison.
    """
    k = metric_k(metric)

    def value(lists: Mapping[str, Sequence[str]]) -> float:
        return summarize(lists, relevant, [k])[metric]

    reasons = [f"chosen on validation: {validation_note}"]
    judged = _Judged(value, reward_of, judge, metric)
    candidates = Step(math.inf, mmr=False, explore=False)
    blend, blend_grid = 0.0, []
    if replay.neighbour is not None:
        blend, blend_grid = _choose_share(replay, candidates, "blend", neighbour_weights, judged, reasons)
        candidates = replace(candidates, blend=blend)
    taste, taste_grid = 0.0, []
    if replay.taste is not None and taste_weights:
        taste, taste_grid = _choose_share(replay, candidates, "taste", taste_weights, judged, reasons)
        candidates = replace(candidates, taste=taste)
    grid: list[dict[str, Any]] = []
    for weight in [*sorted(fusion_weights), math.inf]:
        lists = replay.lists(replace(candidates, weight=weight))
        grid.append({"weight": weight_label(weight), **judged.row(lists), "_weight": weight})
    retrieval_alone = grid[-1]
    best_finite = max(grid[:-1], key=lambda row: (row[metric], row["_weight"]))
    chosen = max(grid, key=lambda row: (row[metric], row["_weight"]))
    if reward_of is not None and judge == "reward":
        chosen = _reward_choice(grid, retrieval_alone, metric, reasons)
    else:
        reasons.append(_metric_reason(chosen, retrieval_alone, best_finite, metric))
        if reward_of is not None:
            chosen = _reward_check(chosen, retrieval_alone, grid, metric, reasons)
    session: dict[str, Any] = {}
    if session_reward_of is not None and replay.ranker is not None and len(grid) > 1:
        served = replace(candidates, mmr=replay.gateway.mmr_trade_off < 1, explore=True)
        ranker_row = chosen if math.isfinite(chosen["_weight"]) else _best_by(grid[:-1], judged.by)
        chosen, session = _session_check(
            chosen, retrieval_alone, ranker_row, served, session_reward_of, reasons
        )
    weight = chosen["_weight"]
    mmr_served, mmr_report = _choose_mmr(replay, replace(candidates, weight=weight), judged, reasons)
    public = [{key: v for key, v in row.items() if key != "_weight"} for row in grid]
    policy = ServingPolicy(
        retrieval_weight=None if math.isinf(weight) else weight,
        neighbour_weight=blend,
        taste_weight=taste,
        mmr=mmr_served,
        rank_depth=replay.gateway.candidates,
        reasons=reasons,
        validation={
            "metric": metric,
            "users": len([u for u in relevant if relevant[u]]),
            "split": validation_note,
            "popularity": popularity,
            "grid": public,
            "neighbour_grid": blend_grid,
            "taste_grid": taste_grid,
            "mmr": mmr_report,
            "session": session,
        },
    )
    return PolicyChoice(policy, public, mmr_report, best_finite["_weight"])


def _metric_reason(
    chosen: Mapping[str, Any], retrieval_alone: Mapping[str, Any], best_finite: Mapping[str, Any], metric: str
) -> str:
    """Why the weight picked by the validation metric serves, or why the ranker does not."""
    if chosen is not retrieval_alone:
        return (
            f"fusion weight {chosen['weight']} serves: validation {metric} {chosen[metric]:.4f} "
            f"vs {retrieval_alone[metric]:.4f} for retrieval order alone"
        )
    if best_finite[metric] < retrieval_alone[metric]:
        return (
            f"the ranker is not served: it lowered validation {metric} from "
            f"{retrieval_alone[metric]:.4f} (retrieval order) to {best_finite[metric]:.4f} "
            f"(its best fusion weight, {best_finite['weight']})"
        )
    return (
        f"the ranker is not served: it did not raise validation {metric} above "
        f"{retrieval_alone[metric]:.4f} (retrieval order) at any fusion weight"
    )


def _reward_choice(
    grid: Sequence[dict[str, Any]], retrieval_alone: dict[str, Any], metric: str, reasons: list[str]
) -> dict[str, Any]:
    """With the generator's truth as the judge: the weight with the best validation expected
    reward serves (ties to the larger weight, the cheaper system)."""
    reward = "expected_reward"
    chosen = max(grid, key=lambda row: (row[reward], row["_weight"]))
    if chosen is retrieval_alone:
        reasons.append(
            f"the ranker is not served: no fusion weight raised the validation expected reward above "
            f"{retrieval_alone[reward]:.4f} (retrieval order)"
        )
    else:
        reasons.append(
            f"fusion weight {chosen['weight']} serves by the generator's truth: validation expected "
            f"reward {chosen[reward]:.4f} vs {retrieval_alone[reward]:.4f} for retrieval order alone "
            f"({metric} {chosen[metric]:.4f} vs {retrieval_alone[metric]:.4f} on logged positives, which "
            "carry the old system's exposure)"
        )
    return dict(chosen)


def _reward_check(
    chosen: dict[str, Any],
    retrieval_alone: dict[str, Any],
    grid: Sequence[Mapping[str, Any]],
    metric: str,
    reasons: list[str],
) -> dict[str, Any]:
    """With the generator's truth: a fusion weight that lowers the validation expected reward
    below retrieval order alone is not served. The opposite case, a ranker the metric left
    out that would raise the expected reward, is reported: logged positives carry the old
    system's exposure and the truth does not, so the two can disagree."""
    reward = "expected_reward"
    if chosen is not retrieval_alone and chosen[reward] < retrieval_alone[reward]:
        reasons.append(
            f"the ranker is not served: at fusion weight {chosen['weight']} it lowered the validation "
            f"expected reward from {retrieval_alone[reward]:.4f} (retrieval order) to {chosen[reward]:.4f}"
        )
        return retrieval_alone
    best = max(grid, key=lambda row: (row[reward], -row[metric]))
    if best is not chosen and best[reward] > chosen[reward]:
        reasons.append(
            f"note: fusion weight {best['weight']} would raise the validation expected reward from "
            f"{chosen[reward]:.4f} to {best[reward]:.4f}, but lowers validation {metric} from "
            f"{chosen[metric]:.4f} to {best[metric]:.4f}: the gate reads both, so {metric} decides"
        )
    return chosen


def _best_by(rows: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """The row with the largest ``key`` (ties to the larger weight)."""
    return max(rows, key=lambda row: (row[key], row["_weight"]))


def _session_check(
    chosen: dict[str, Any],
    retrieval_alone: dict[str, Any],
    ranker_row: dict[str, Any],
    served: Step,
    session_reward_of: SessionRewardOf,
    reasons: list[str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ranker at ``ranker_row``'s weight (the chosen one, or its best if retrieval order
    won) against retrieval order alone over a simulated session, the rest of the served
    system as configured (sources, MMR, exploration). The ranker reads no session signal;
    fused at a large weight it can keep the lists from following the clicks, which one
    request cannot show. A chosen ranker serves only if the session's mean reward is not
    lower; otherwise the comparison is reported."""
    with_ranker = session_reward_of(replace(served, weight=ranker_row["_weight"]))
    without = session_reward_of(replace(served, weight=math.inf))
    report = {
        "requests": len(with_ranker),
        "weight": ranker_row["weight"],
        "with_ranker": with_ranker,
        "retrieval_order": without,
    }
    mean_with, mean_without = float(np.mean(with_ranker)), float(np.mean(without))
    said = (
        f"over a simulated session of {len(with_ranker)} requests the mean expected reward is "
        f"{mean_with:.4f} at fusion weight {ranker_row['weight']} vs {mean_without:.4f} for retrieval "
        "order alone"
    )
    if math.isinf(chosen["_weight"]):
        reasons.append(f"session check (the ranker not served): {said}")
        return chosen, report
    if mean_with < mean_without:
        reasons.append(f"the ranker is not served: {said} (the lists follow the session's clicks less)")
        return retrieval_alone, report
    reasons.append(f"session check passed: {said}")
    return chosen, report


@dataclass(frozen=True)
class _Judged:
    """How a validation list set is judged: the metric, and the truth's reward where it exists."""

    value: Callable[[Mapping[str, Sequence[str]]], float]
    reward_of: RewardOf | None
    judge: str
    metric: str

    def row(self, lists: Mapping[str, Sequence[str]]) -> dict[str, Any]:
        reward = self.reward_of(lists) if self.reward_of else None
        return {self.metric: self.value(lists), "expected_reward": reward}

    @property
    def by(self) -> str:
        """The row key that decides: the expected reward with ``judge: reward`` and truth."""
        return "expected_reward" if self.reward_of is not None and self.judge == "reward" else self.metric


# Per share field of ``Step``: the report's key, what the share belongs to, and what a share
# of 0 serves.
_SHARES = {
    "blend": ("neighbour_weight", "the item-to-item source", "the retriever's candidates alone"),
    "taste": ("taste_weight", "the category taste", "the candidate score without it"),
}


def _choose_share(
    replay: Replay,
    base: Step,
    field: str,
    shares: Sequence[float],
    judged: _Judged,
    reasons: list[str],
) -> tuple[float, list[dict[str, Any]]]:
    """One candidate-score share (``field`` of ``Step``), read with the ranker off on top of
    ``base``: 0 and each of ``shares``; the best wins, ties to the smaller share."""
    key, what, without = _SHARES[field]
    rows: list[dict[str, Any]] = []
    for share in [0.0, *sorted(s for s in set(shares) if 0 < s <= 1)]:
        rows.append({key: share, **judged.row(replay.lists(replace(base, **{field: share})))})
    by = judged.by
    said = "expected reward" if by == "expected_reward" else judged.metric
    chosen = max(rows, key=lambda row: (row[by], -row[key]))
    alone = rows[0]
    if chosen is alone:
        reasons.append(
            f"{what} is not served: no share of the candidate score raised the "
            f"validation {said} above {alone[by]:.4f} ({without})"
        )
    else:
        reasons.append(
            f"{what} serves with a {chosen[key]:g} share of the candidate score: validation {said} "
            f"{chosen[by]:.4f} vs {alone[by]:.4f} for {without}"
        )
    return float(chosen[key]), rows


def _choose_mmr(
    replay: Replay, chosen: Step, judged: _Judged, reasons: list[str]
) -> tuple[bool, dict[str, Any]]:
    """MMR at the chosen weight: served as configured unless the truth says it costs reward."""
    trade_off = replay.gateway.mmr_trade_off
    if trade_off >= 1:
        reasons.append("MMR is off in the configuration (gateway.mmr_trade_off = 1)")
        return True, {"trade_off": trade_off}
    metric, reward_of = judged.metric, judged.reward_of
    report: dict[str, Any] = {
        "trade_off": trade_off,
        "without": judged.row(replay.lists(replace(chosen, mmr=False))),
        "with": judged.row(replay.lists(replace(chosen, mmr=True))),
    }
    before, after = report["without"], report["with"]
    if reward_of is not None and after["expected_reward"] < before["expected_reward"]:
        reasons.append(
            f"MMR is not served: it lowered the validation expected reward from "
            f"{before['expected_reward']:.4f} to {after['expected_reward']:.4f}"
        )
        return False, report
    reasons.append(
        f"MMR (trade-off {trade_off}) serves as configured: validation {metric} "
        f"{before[metric]:.4f} -> {after[metric]:.4f}"
        + (
            f", expected reward {before['expected_reward']:.4f} -> {after['expected_reward']:.4f}"
            if reward_of is not None
            else " (no generator truth to weigh diversity against)"
        )
    )
    return True, report
