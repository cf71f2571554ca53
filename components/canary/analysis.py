"""The analysis: the event log measured per arm, and the decision on the labels serving now."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from components.canary.arms import arm_stats
from components.canary.decision import decide
from recsys.artifacts import push_record_path
from recsys.config import CanaryConfig, Settings
from recsys.event_log import read_configured_log
from recsys.event_log.sqlite import read_sqlite_log
from recsys.manifests import CanaryAnalysis
from recsys.model_registry import rollout_in_progress, serving_labels
from recsys.timeutil import optional_utc_iso, to_utc, utc_now


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
    """``analyze_canary`` on the configured event log and the labels of ``models.config``.

    The window starts, unless ``since`` is given, at the canary's push (``canary_pushed_at``):
    only traffic served since the version existed can speak for it, whatever the log holds
    from before (requests of earlier canaries, requests logged without versions).
    """
    serving = serving_labels(settings)
    if since is None and serving and rollout_in_progress(serving):
        since = canary_pushed_at(settings.models_dir, serving["canary"])
    requests, events, location = read_configured_log(settings)
    return _analysis(settings.canary, requests, events, location, since, until, serving).model_dump()


def canary_pushed_at(base_path: Path, canary: Mapping[str, int]) -> datetime | None:
    """When the canary's versions were pushed: the latest ``pushed_at`` of their push records
    (None when no record says)."""
    times = []
    for model, version in canary.items():
        path = push_record_path(base_path, model, version)
        if path.is_file():
            pushed_at = json.loads(path.read_text()).get("pushed_at")
            if pushed_at:
                times.append(to_utc(pushed_at))
    return max(times) if times else None


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
