"""The analysis: the event log measured per arm, and the decision on the labels serving now."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from components.canary.arms import arm_stats
from components.canary.decision import decide
from recsys.config import CanaryConfig, Settings
from recsys.event_log import read_configured_log
from recsys.event_log.sqlite import read_sqlite_log
from recsys.manifests import CanaryAnalysis
from recsys.model_registry import rollout_in_progress, serving_labels
from recsys.timeutil import optional_utc_iso, utc_now


def analyze_canary(
    config: CanaryConfig,
    source: Path | tuple[pd.DataFrame, pd.DataFrame],
    since: datetime | None = None,
    until: datetime | None = None,
    serving: Mapping[str, Mapping[str, int]] | None = None,
) -> dict[str, Any]:
    """Measure each arm and decide what to do with the canary: the decision manifest.

    Args:
        config: the ``canary`` section (alpha, minimum samples, guardrails, margin).
        source: the gateway's event log (a SQLite path) or frames ``(requests, events)`` as
            ``read_event_log`` returns them.
        since, until: window on request time, ``[since, until)``; None leaves a side open.
        serving: the labelled versions (``serving_labels``). When given and stable == canary
            for every model there is no rollout, and the decision is ``noop``. Requests served
            by other versions than these are left out.

    Returns:
        {decision, reason, arms: {arm: numbers}, tests, guardrails, rule, window, serving,
        config, analyzed_at}.
    """
    requests, events = read_sqlite_log(Path(source)) if isinstance(source, str | Path) else source
    name = str(source) if isinstance(source, str | Path) else "frames"
    return _analysis(config, requests, events, name, since, until, serving).model_dump()


def analyze(
    settings: Settings, since: datetime | None = None, until: datetime | None = None
) -> dict[str, Any]:
    """``analyze_canary`` on the configured event log and the labels of ``models.config``."""
    requests, events, location = read_configured_log(settings)
    serving = serving_labels(settings)
    return _analysis(settings.canary, requests, events, location, since, until, serving).model_dump()


def _analysis(
    config: CanaryConfig,
    requests: pd.DataFrame,
    events: pd.DataFrame,
    source: str,
    since: datetime | None,
    until: datetime | None,
    serving: Mapping[str, Mapping[str, int]] | None,
) -> CanaryAnalysis:
    stats = arm_stats(requests, events, serving, since, until)
    verdict = decide(stats, config)
    if serving is not None and not rollout_in_progress(serving):
        why = "no models.config" if not serving else "canary and stable are the same versions"
        verdict = {**verdict, "decision": "noop", "reason": f"no rollout in progress: {why}"}
    return CanaryAnalysis(
        **verdict,
        arms={arm: s.to_dict(1 - config.alpha) for arm, s in stats.items()},
        window={"since": optional_utc_iso(since), "until": optional_utc_iso(until)},
        serving=dict(serving) if serving is not None else None,
        source=source,
        config=config.model_dump(),
        analyzed_at=utc_now().isoformat(),
    )
