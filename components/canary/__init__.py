"""Canary analysis: does the newest model serve users at least as well as the stable one?

After a push, ``models.config`` labels two versions of each model: ``stable`` (most traffic)
and ``canary`` (the newest). The gateway assigns each user to an arm by a sticky hash —
``stable``, ``canary``, or a popularity ``holdout`` that no model serves — and logs every
request it answers with its arm, model versions, latency and status, plus impressions and
outcomes (click, add_to_cart, purchase, ...) as events carrying the ``request_id``
(``recsys.event_log.sqlite``). This package reads that log, measures each arm, and decides:

- ``rollback``: a guardrail broke (the canary's error rate or p99 latency above its limit —
  checked first, and acted on at once, even before a sample is large enough for a CTR
  test), or the canary is significantly worse than stable (or than the popularity holdout);
- ``promote``: the canary is significantly *not worse* than stable beyond a margin
  (a non-inferiority test);
- ``wait``: not enough requests or impressions yet, or the tests are inconclusive;
- ``noop``: no rollout in progress (no ``models.config``, or canary == stable).

The metric is click-through **per request** (the share of served requests with at least one
click): users are randomized into arms, and requests are much closer to independent trials
than the impressions inside one response, whose clicks are correlated (a user who clicks
one slot is likelier to click another). Click-through per impression is reported beside it.

Promotion sets ``stable := canary`` for both models (retrieval and ranking), rollback sets
``canary := stable``. Every decision, automatic (the ``canary_rollout`` DAG) or manual
(``recsys canary promote|rollback``), is appended with its numbers to
``<home>/canary/decisions.jsonl`` and gets an HTML report with a CTR plot.
"""

from components.canary.analysis import analyze, analyze_canary
from components.canary.arms import ARMS, ArmStats, arm_stats
from components.canary.decision import RULE, Decision, check_guardrails, compare, decide
from components.canary.report import plot_ctr, write_report
from components.canary.rollout import (
    DECISIONS_FILE,
    CanaryError,
    apply,
    manual,
    read_decisions,
    record_decision,
    run_analysis,
    run_decision,
    run_guardrails,
)
from components.canary.stats import normal_cdf, wilson_interval, z_test_not_worse, z_test_worse

__all__ = [
    "ARMS",
    "DECISIONS_FILE",
    "RULE",
    "ArmStats",
    "CanaryError",
    "Decision",
    "analyze",
    "analyze_canary",
    "apply",
    "arm_stats",
    "check_guardrails",
    "compare",
    "decide",
    "manual",
    "normal_cdf",
    "plot_ctr",
    "read_decisions",
    "record_decision",
    "run_analysis",
    "run_decision",
    "run_guardrails",
    "wilson_interval",
    "write_report",
    "z_test_not_worse",
    "z_test_worse",
]
