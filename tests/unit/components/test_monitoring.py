"""The drift monitor's arithmetic: PSI, thresholds, and the verdict on two small windows."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from components.monitoring import compare_windows, judge_features, psi
from recsys.config import MonitoringConfig


def test_psi_is_zero_for_the_same_shares_and_grows_with_the_shift():
    same = psi({"a": 100, "b": 300}, {"a": 10, "b": 30}, smoothing=0.0)
    assert same == pytest.approx(0.0, abs=1e-12)
    # By hand: (0.5 - 0.25) ln(0.5/0.25) + (0.5 - 0.75) ln(0.5/0.75).
    expected = 0.25 * math.log(2) - 0.25 * math.log(0.5 / 0.75)
    assert psi({"a": 25, "b": 75}, {"a": 50, "b": 50}, smoothing=0.0) == pytest.approx(expected)
    small = psi({"a": 50, "b": 50}, {"a": 55, "b": 45})
    large = psi({"a": 50, "b": 50}, {"a": 90, "b": 10})
    assert 0 < small < 0.01 < large


def test_psi_of_a_bin_missing_on_one_side_is_large_but_finite():
    value = psi({"a": 1000}, {"a": 500, "b": 500})
    assert math.isfinite(value) and value > 1.0
    assert psi({}, {}) == 0.0


def test_thresholds_per_feature_and_the_minimum_sample():
    config = MonitoringConfig(psi_threshold=0.2, psi_thresholds={"device": 0.5}, min_events=100)
    shifted = ({"x": 500, "y": 500}, {"x": 800, "y": 200})  # PSI ~0.38
    judged = judge_features(
        config, {"category_impressions": shifted, "device": shifted, "hour": ({"x": 50}, {"y": 50})}
    )
    assert judged["category_impressions"]["drifted"] and judged["category_impressions"]["threshold"] == 0.2
    assert not judged["device"]["drifted"] and judged["device"]["threshold"] == 0.5  # its own, higher
    assert judged["hour"]["psi"] > 1 and not judged["hour"]["judged"] and not judged["hour"]["drifted"]


def _events(n: int, categories: list[str], clicks_every: int, start: str) -> pd.DataFrame:
    rows = []
    ts0 = pd.Timestamp(start, tz="UTC")
    for i in range(n):
        item = f"i{categories[i % len(categories)]}{i % 3}"
        base = {"user_id": f"u{i % 40}", "item_id": item, "device": "web", "request_id": f"r{i}"}
        rows.append(
            {
                **base,
                "event_id": f"e{i}",
                "event_type": "impression",
                "ts": ts0 + pd.Timedelta(hours=24 * i / n),
            }
        )
        if i % clicks_every == 0:
            rows.append(
                {
                    **base,
                    "event_id": f"c{i}",
                    "event_type": "click",
                    "ts": ts0 + pd.Timedelta(hours=24 * i / n),
                }
            )
    return pd.DataFrame(rows)


ITEMS = pd.DataFrame(
    {
        "item_id": [f"i{c}{k}" for c in "abcd" for k in range(3)],
        "category": [c for c in "abcd" for _ in range(3)],
    }
)


def test_compare_windows_flags_a_category_shift_and_a_ctr_drop_with_reasons():
    config = MonitoringConfig(min_events=50)
    reference = _events(800, ["a", "b", "c", "d"], clicks_every=5, start="2026-10-01")
    calm = _events(400, ["a", "b", "c", "d"], clicks_every=5, start="2026-10-10")
    result = compare_windows(config, reference, calm, ITEMS)
    assert not result["drifted"] and result["reasons"] == []
    assert result["coverage"]["serving"] == 1.0

    shifted = _events(400, ["a", "a", "a", "b"], clicks_every=20, start="2026-10-10")
    result = compare_windows(config, reference, shifted, ITEMS)
    assert result["drifted"]
    assert any(r.startswith("category_impressions: PSI") for r in result["reasons"])
    assert any(r.startswith("ctr: ") for r in result["reasons"])
    assert result["label_rate"]["serving"]["all"]["ctr"] == pytest.approx(20 / 400)
    assert result["coverage"]["serving"] == 0.5  # items of a and b only


def test_a_models_scores_moving_away_from_the_training_windows_are_drift_per_arm():
    config = MonitoringConfig(min_events=50)
    reference = _events(800, ["a", "b", "c", "d"], clicks_every=5, start="2026-10-01")
    rng = np.random.default_rng(0)
    reference["score"] = rng.uniform(0.0, 1.0, len(reference))
    current = _events(400, ["a", "b", "c", "d"], clicks_every=5, start="2026-10-10")
    current["arm"] = np.where(np.arange(len(current)) % 2 == 0, "stable", "canary")
    # The stable model scores as in training; the canary's scores crowd at the top.
    current["score"] = np.where(current["arm"] == "stable", rng.uniform(0.0, 1.0, len(current)),
                                rng.uniform(0.8, 1.0, len(current)))  # fmt: skip
    result = compare_windows(config, reference, current, ITEMS)
    assert result["features"]["score_canary"]["drifted"]
    assert not result["features"]["score_stable"]["drifted"]
    assert [r for r in result["reasons"] if r.startswith("score_")] == [
        r for r in result["reasons"] if r.startswith("score_canary: PSI")
    ]
