"""The ranker's own objectives, checked on the holdout: click AUC and calibration.

Top-K metrics over logged positives reward what the old system chose to show (a popular item
gets more impressions, hence more clicks); the ranker learns the chance of a click once an
item *is* shown, which is what it decides in production. So its checks are per impression:

- **click AUC**: the chance a clicked impression outscores a skipped one, beside the AUC of
  "more popular first" (``item_positives_30d``), the baseline a ranker must beat;
- **calibration**: mean predicted click probability vs the observed click rate, and a
  reliability table (equal-width bins of the prediction: count, mean predicted, observed),
  since a fused or thresholded score relies on the probability meaning what it says;
- **engagement**: mean predicted vs observed engagement, where the ranker has that head.

Rating data without impressions is checked against sampled negatives (AUC only: their base
rate is set by the sampling, so calibration would measure nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

BATCH = 8192


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the chance a random positive outscores a random negative."""
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(np.asarray(scores, dtype=np.float64)).rank().to_numpy()  # ties share a rank
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def reliability(predicted: np.ndarray, observed: np.ndarray, bins: int) -> list[dict[str, float]]:
    """Equal-width bins of ``predicted`` in [0, 1]: count, mean predicted, observed rate.

    Empty bins are left out. A calibrated model has mean predicted ~ observed in every bin.
    """
    predicted = np.clip(np.asarray(predicted, dtype=np.float64), 0.0, 1.0)
    observed = np.asarray(observed, dtype=np.float64)
    which = np.minimum((predicted * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            rows.append(
                {
                    "low": b / bins,
                    "high": (b + 1) / bins,
                    "count": int(in_bin.sum()),
                    "predicted": float(predicted[in_bin].mean()),
                    "observed": float(observed[in_bin].mean()),
                }
            )
    return rows


def expected_calibration_error(table: list[dict[str, float]]) -> float:
    """Count-weighted mean |predicted - observed| over the reliability bins."""
    total = sum(row["count"] for row in table)
    if not total:
        return float("nan")
    return float(sum(row["count"] * abs(row["predicted"] - row["observed"]) for row in table) / total)


def ranker_objectives(
    ranker: Callable[..., Mapping[str, Any]],
    ranker_inputs: Mapping[str, str],
    holdout_frame: pd.DataFrame,
    bins: int = 10,
) -> dict[str, Any] | None:
    """Click AUC, calibration and engagement of the ranker on the holdout's impressions.

    Args:
        ranker: the ranker SavedModel's ``serving_default``.
        ranker_inputs: the training manifest's ``ranker_inputs``.
        holdout_frame: the holdout rows (impressions and their outcomes, or positives).
        bins: bins of the reliability table.

    Returns:
        ``{"source", "examples", "click_auc", "popularity_click_auc", "calibration": {...},
        "engagement": {...}}``; None when the holdout has no positive and no impression.
    """
    import tensorflow as tf

    from components.training.train import features_from_frame, ranker_examples
    from recsys.config import TrainingConfig

    if holdout_frame.empty:
        return None
    item_columns = ["item_id", "category", "title", "description", "in_stock"] + [
        c for c in ranker_inputs if c.startswith("item_")
    ]
    examples, source = ranker_examples(holdout_frame, TrainingConfig(), item_columns)
    if examples.empty:
        return None
    arrays = features_from_frame(examples, ranker_inputs)
    outputs: dict[str, list[np.ndarray]] = {}
    for lo in range(0, len(examples), BATCH):
        batch = ranker(**{k: tf.constant(v[lo : lo + BATCH]) for k, v in arrays.items()})
        for name, tensor in batch.items():
            outputs.setdefault(name, []).append(tensor.numpy())
    predicted = {name: np.concatenate(parts) for name, parts in outputs.items()}
    clicks = examples["label_click"].to_numpy(dtype=np.float64)
    out: dict[str, Any] = {
        "source": source,
        "examples": len(examples),
        "click_auc": auc(clicks, predicted["click"]),
    }
    popularity = [c for c in ("item_positives_30d", "item_positives_7d") if c in examples.columns]
    if popularity:
        out["popularity_click_auc"] = auc(clicks, examples[popularity[0]].to_numpy())
    if source != "impressions":
        out["calibration"] = None
        out["calibration_note"] = "sampled negatives set the click rate: calibration not measurable"
        return out
    table = reliability(predicted["click"], clicks, bins)
    out["calibration"] = {
        "mean_predicted": float(predicted["click"].mean()),
        "observed_rate": float(clicks.mean()),
        "ece": expected_calibration_error(table),
        "bins": table,
    }
    if "engagement" in predicted:
        engagement = examples["label_engagement"].to_numpy(dtype=np.float64)
        out["engagement"] = {
            "mean_predicted": float(predicted["engagement"].mean()),
            "observed_mean": float(engagement.mean()),
            "rmse": float(np.sqrt(np.mean((predicted["engagement"] - engagement) ** 2))),
        }
    return out
