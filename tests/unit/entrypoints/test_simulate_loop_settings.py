"""The loop home's settings: what the loop changes in the home's configuration, and what it keeps."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from entrypoints.simulate_loop import _settings_in
from recsys.config import Settings


@pytest.mark.parametrize(
    ("configured", "in_loop"), [("time", "last_item"), ("random", "random"), ("last_item", "last_item")]
)
def test_the_loop_retrains_on_its_served_traffic_whatever_its_times(
    tmp_path: Path, configured: str, in_loop: str
) -> None:
    # The rounds' events all carry the minutes they were served in, after the source's end: a
    # time split's last days would hold all of them out of training.
    settings = Settings.model_validate({"evaluation": {"split": configured, "holdout_days": 7}})
    moved, config_file = _settings_in(settings, tmp_path, canary=0.4, holdout=0.2)
    assert moved.evaluation.split == in_loop and moved.home == tmp_path
    assert moved.gateway.arm_fractions == {"canary": 0.4, "holdout": 0.2}
    written = yaml.safe_load(config_file.read_text())
    assert written["evaluation"]["split"] == in_loop
    assert settings.evaluation.split == configured  # the home's own settings are left as they were
