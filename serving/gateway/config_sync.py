"""How a push or a label move reaches the model server: the gateway applies ``models.config``.

A push, the canary DAG's promote and rollback, ``recsys canary promote|rollback`` and the
admin endpoints write ``<models>/models.config`` (``recsys.model_registry``). The model
server does not watch that file: TF Serving reads it once, at start (compose runs it
without ``--model_config_file_poll_wait_seconds``). The gateway applies it instead. Its
refresh thread calls ``ModelConfigSync.check`` every ``gateway.refresh_seconds``; when the
file says something other than what this gateway last applied or refused, ``reload_models``
puts it in service in TF Serving's two checked steps, and then the gateway's own snapshot
follows. So a label change serves within one refresh period without anyone calling
``POST /v1/admin/reload``, and every change, whoever wrote it, gets the same checks: a
version that fails to load or lacks the gateway's signature is refused, and the labels that
served are put back.

It acts once per write of the file (its inode, time and size: every writer replaces it
whole) and remembers a refused write as it remembers an applied one, so it does not loop.
The labels a refusal puts back are a new write: either served already (``serves``: nothing
is sent) or applied once; if they are refused too, putting them back again changes nothing
and writes nothing. A model server that cannot be reached is tried again at the next check.
It never holds up a request: it runs on the refresh thread, and requests keep the snapshot
that serves until the next one is swapped in.
"""

from __future__ import annotations

import logging
from typing import Any

from recsys.model_registry import MODELS_CONFIG, read_models_config
from recsys.timeutil import utc_now
from serving.gateway.admin import AdminRefused, reload_models
from serving.gateway.metrics import GatewayMetrics

log = logging.getLogger("serving.gateway.config_sync")


class ModelConfigSync:
    """Keeps the model server on the labels of ``models.config`` (see the module).

    Args:
        gateway: what ``reload_models`` needs: ``settings``, ``client`` and ``refresh()``.
        metrics: counts each outcome (``recsys_gateway_model_config_applies_total``).
    """

    def __init__(self, gateway: Any, metrics: GatewayMetrics | None = None) -> None:
        self.gateway = gateway
        self.metrics = metrics
        # The write of models.config last applied, found served, or refused: (inode, mtime, size).
        self.seen: tuple[int, int, int] | None = None
        # What ``/readyz`` shows: the last outcome, the labels it was about, when, and why; and
        # the last refusal, which the next check (finding the put-back labels served) follows.
        self.state: dict[str, Any] = {}
        self.last_refused: dict[str, Any] | None = None

    def check(self) -> str | None:
        """Apply ``models.config`` when it changed since the last apply or refusal.

        Returns:
            None when there was nothing to do; else ``applied``, ``in_sync`` (the server
            already served it), ``refused`` (labels put back), ``unreachable`` (tried again
            at the next check) or ``error``. Never raises: the refresh thread goes on.
        """
        try:
            base = self.gateway.settings.models_dir
            try:
                st = (base / MODELS_CONFIG).stat()
            except FileNotFoundError:
                return None  # nothing pushed yet
            written = (st.st_ino, st.st_mtime_ns, st.st_size)
            if written == self.seen:
                return None
            labels = {m: s["labels"] for m, s in read_models_config(base).items()}
            try:
                result = reload_models(self.gateway)
            except AdminRefused as e:
                outcome = "unreachable" if e.retry else "refused"
                if not e.retry:
                    self.seen = written  # not tried again until models.config is written again
                return self._record(outcome, labels, e.problems)
            self.seen = written
            if result["changed"]:
                log.info("models.config applied to the model server: %s", labels)
            return self._record("applied" if result["changed"] else "in_sync", labels)
        except Exception as e:  # noqa: BLE001 - a bad check must not stop the refresh thread
            return self._record("error", None, [f"{type(e).__name__}: {e}"])

    def _record(self, outcome: str, labels: Any, problems: list[str] | None = None) -> str:
        state: dict[str, Any] = {"result": outcome, "labels": labels, "at": utc_now().isoformat()}
        if problems:
            state["problems"] = problems
        if outcome == "refused":
            self.last_refused = {k: v for k, v in state.items() if k != "result"}
        if self.last_refused is not None:
            state["last_refused"] = self.last_refused
        again = self.state.get("result") == outcome and self.state.get("problems") == problems
        if outcome in ("unreachable", "error") and not again:
            # Once per distinct failure, not at every check while it lasts.
            log.warning("models.config not applied (%s): %s", outcome, "; ".join(problems or []))
        self.state = state
        if self.metrics is not None:
            self.metrics.model_config_applies.labels(result=outcome).inc()
        return outcome
