"""Drift monitoring on generated traffic: a shift from the serving window's first day is flagged
with its reason; the same traffic without a shift is not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.monitoring import monitor_drift, retrain_conf
from recsys.config import load_settings
from tests.support.drift_data import DRIFT_ENV, prepare_drift_home

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("shift", "drifted", "reason"),
    [
        (None, False, None),
        ("tastes", True, "category_positives"),
        ("category_mix", True, "category_impressions"),
    ],
)
def test_monitor_flags_only_the_shifted_traffic(tmp_path, shift, drifted, reason):
    info = prepare_drift_home(tmp_path, shift)
    settings = load_settings(env={"RECSYS_HOME": str(tmp_path), **DRIFT_ENV})
    manifest = monitor_drift(settings, until=info["until"])

    assert manifest["drifted"] is drifted, manifest["reasons"]
    assert manifest["events"] == {"reference": info["train_events"], "serving": info["serve_events"]}
    if drifted:
        assert any(r.startswith(f"{reason}: PSI") for r in manifest["reasons"]), manifest["reasons"]
        assert retrain_conf(manifest)["reason"].startswith("drift: ")
    else:
        assert manifest["reasons"] == []
    out = Path(manifest["path"])
    assert out == tmp_path / "monitoring" / "2026-11-01"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["label_rate"]["serving"]) == {"all", "new_users", "heavy_users", "new_items"}
    assert 0 < metrics["coverage"]["serving"] <= 1
    prom = (out / "drift.prom").read_text()
    assert f"recsys_drift_detected {float(drifted)}" in prom
    assert 'recsys_drift_psi{feature="category_impressions"}' in prom
    page = (out / "report.html").read_text()
    assert ("DRIFT" in page) is drifted and "category_positives" in page
