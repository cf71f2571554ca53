"""Acting on the analysis: labels moved, every decision recorded; what the DAG's tasks call."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from components.canary.analysis import analyze
from components.canary.decision import RULE
from components.canary.report import write_report
from recsys.config import Settings
from recsys.layout import canary_dir
from recsys.manifests import CanaryAnalysis, CanaryDecisionRecord
from recsys.model_registry import RegistryError, move_labels, serving_labels
from recsys.storage import code_version
from recsys.timeutil import to_utc, utc_now

DECISIONS_FILE = "decisions.jsonl"


class CanaryError(RuntimeError):
    """The rollout cannot be changed as asked (no models.config, a missing version folder...)."""


def record_decision(
    settings: Settings,
    analysis: Mapping[str, Any],
    action: str,
    decided_by: str,
    labels: Mapping[str, Any] | None = None,
    note: str = "",
) -> dict[str, Any]:
    """Append the decision with its numbers to ``<home>/canary/decisions.jsonl``, write its report.

    Args:
        analysis: what ``analyze_canary`` returned.
        action: what was done: promote, rollback, wait, noop or skipped.
        decided_by: ``auto`` (the DAG), ``manual`` (the CLI) or another name of who decided.
        labels: ``move_labels``'s before/after when labels moved.
        note: a person's reason for a manual decision, or why an action was skipped.

    Returns:
        The record (also the last line of the file), with the report's path.
    """
    out = canary_dir(settings)
    stamp = utc_now()
    report_dir = out / "reports" / f"{stamp.strftime('%Y%m%dT%H%M%S%f')}-{action}"
    # An hourly "no rollout" needs a line in the log, not a page of empty bars.
    with_report = action != "noop"
    record = CanaryDecisionRecord(
        **{
            "recorded_at": stamp.isoformat(),
            "action": action,
            "decided_by": decided_by,
            "note": note,
            "labels": dict(labels) if labels else None,
            "report": str(report_dir / "index.html") if with_report else None,
            "code_version": code_version(),
            **{k: v for k, v in analysis.items() if k != "rule"},
            "rule": analysis.get("rule", RULE),
        }
    ).model_dump()
    if with_report:
        write_report(record, report_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / DECISIONS_FILE, "a") as f:
        f.write(json.dumps(record, default=str, sort_keys=True) + "\n")
    return record


def read_decisions(settings: Settings) -> list[dict[str, Any]]:
    path = canary_dir(settings) / DECISIONS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _move_labels(settings: Settings, action: Literal["promote", "rollback"]) -> dict[str, Any]:
    try:
        return move_labels(settings, action)
    except RegistryError as e:
        raise CanaryError(str(e)) from None


def apply(settings: Settings, analysis: Mapping[str, Any], decided_by: str = "auto") -> dict[str, Any]:
    """Carry out an analysis' decision and record it; labels move only for promote / rollback.

    An analysis made on other labels than today's (someone promoted in between) is not acted
    on: it is recorded as ``skipped``, since its numbers vouch for versions no longer in rollout.
    """
    decision = analysis["decision"]
    if decision in ("promote", "rollback"):
        now = serving_labels(settings)
        if analysis.get("serving") is not None and now != analysis["serving"]:
            note = f"models.config changed since the analysis (then {analysis['serving']}, now {now})"
            return record_decision(settings, analysis, "skipped", decided_by, note=note)
        moved = _move_labels(settings, decision)
        return record_decision(settings, analysis, decision, decided_by, labels=moved)
    return record_decision(settings, analysis, decision, decided_by)


def manual(settings: Settings, action: Literal["promote", "rollback"], reason: str = "") -> dict[str, Any]:
    """A person's promote or rollback (``recsys canary promote|rollback``), recorded with the
    numbers the analysis shows at that moment, whatever they say.

    A rollback needs no numbers: with the event log down (Redis unreachable, the file
    unreadable) it still moves the labels and is recorded with the reason the analysis could
    not run. A promote is refused then: the canary is never promoted blind.
    """
    try:
        analysis = analyze(settings)
    except Exception as e:  # noqa: BLE001 - any failure to read the log, whatever the backend
        if action != "rollback":
            raise CanaryError(f"cannot {action}: the canary analysis failed ({type(e).__name__}: {e})") from e
        analysis = _no_analysis(settings, f"{type(e).__name__}: {e}")
    moved = _move_labels(settings, action)
    return record_decision(settings, analysis, action, "manual", labels=moved, note=reason)


def _no_analysis(settings: Settings, error: str) -> dict[str, Any]:
    """What a decision is recorded with when the event log cannot be read: no numbers, the error."""
    return CanaryAnalysis(
        decision="wait",
        reason=f"analysis unavailable: the event log could not be read ({error})",
        guardrails={"checked": False, "ok": True, "broken": []},
        tests={},
        rule=RULE,
        arms={},
        window={"since": None, "until": None},
        serving=serving_labels(settings) or None,
        source="unavailable",
        config=settings.canary.model_dump(),
        analyzed_at=utc_now().isoformat(),
    ).model_dump()


def run_guardrails(settings: Settings, until: datetime | None = None) -> dict[str, Any]:
    """Guardrails only, acted on at once: roll back if the canary is failing or slow.

    Returns {"rolled_back": bool, "guardrails": ..., "record": ... (when one was written)}.
    """
    analysis = analyze(settings, until=until)
    if analysis["decision"] == "noop" or analysis["guardrails"]["ok"]:
        return {"rolled_back": False, "guardrails": analysis["guardrails"], "decision": analysis["decision"]}
    record = apply(settings, {**analysis, "decision": "rollback"}, decided_by="auto:guardrails")
    rolled_back = record["action"] == "rollback"
    return {"rolled_back": rolled_back, "guardrails": analysis["guardrails"], "record": record}


def run_analysis(settings: Settings, until: datetime | None = None, out_dir: Path | None = None) -> Path:
    """Analyze and write the decision manifest to ``analysis.json``; returns its path.

    The file lands in ``out_dir`` or ``<home>/canary/runs/<until>/`` (``latest`` without an
    end), so a re-run of the same interval replaces its own analysis.
    """
    analysis = analyze(settings, until=until)
    key = to_utc(until).strftime("%Y-%m-%dT%H%M%S") if until is not None else "latest"
    out_dir = out_dir or canary_dir(settings) / "runs" / key
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "analysis.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(analysis, indent=2, default=str))
    tmp.replace(path)
    return path


def run_decision(settings: Settings, analysis_path: Path) -> dict[str, Any]:
    """Act on a written analysis (promote, roll back, or only record a wait / noop)."""
    analysis = json.loads(Path(analysis_path).read_text())
    return apply(settings, analysis, decided_by="auto")
