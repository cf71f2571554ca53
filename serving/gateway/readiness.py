"""``/readyz``: ready once models and the item cache are loaded and the model server has
answered once; the model server's state is shown.

A gateway started while its model server is down serves popularity (marked in ``fallback``)
but is not ready, so a rollout with a wrong model server address stops at the first replica
instead of replacing good ones; it becomes ready by itself when the server answers. A model
server lost *after* that keeps the gateway ready, naming the models in ``degraded``: every
replica would lose it at once, and answering degraded beats answering nothing.
"""

from __future__ import annotations

import time
from typing import Any

from recsys.config import Settings
from recsys.event_log.base import EventLog
from serving.clients import ModelServerClient, ModelServerError
from serving.gateway.config_sync import ModelConfigSync
from serving.gateway.snapshot import SnapshotRefresher

# Probes come often; the model server is asked about its models at most this often.
SERVER_STATUS_SECONDS = 2.0


class Readiness:
    """The readiness check and what it reports.

    Args:
        settings: the configuration (push model names).
        snapshots: the snapshot loader (loaded or not, its error, the last warm-up).
        client: the model server client, asked for each model's version states.
        event_log: the event log, whose location is reported.
        config_sync: the applier of ``models.config``, whose last outcome is reported.
    """

    def __init__(
        self,
        settings: Settings,
        snapshots: SnapshotRefresher,
        client: ModelServerClient,
        event_log: EventLog,
        config_sync: ModelConfigSync | None = None,
    ) -> None:
        self.settings = settings
        self.config_sync = config_sync
        self.snapshots = snapshots
        self.client = client
        self.event_log = event_log
        self._status_cache: tuple[float, dict[str, Any]] | None = None
        # Whether the model server has answered a status call since this gateway started.
        self.model_server_answered = False

    def check(self) -> tuple[bool, dict[str, Any]]:
        """Ready when models and items are loaded and the model server has answered once; the
        model server's state is reported."""
        snap = self.snapshots.current
        checks: dict[str, Any] = {"event_log": self.event_log.location}
        if snap is None:
            checks["models"] = self.snapshots.load_error or "loading"
            return False, checks
        checks["models"] = snap.versions.labels
        checks["items"] = len(snap.catalog)
        now = time.monotonic()
        if self._status_cache is None or now - self._status_cache[0] > SERVER_STATUS_SECONDS:
            server: dict[str, Any] = {}
            for model in (self.settings.push.retrieval_model, self.settings.push.ranking_model):
                try:
                    states = self.client.status(model, timeout=0.5)
                    server[model] = {str(s.version): s.state for s in states}
                    self.model_server_answered = True
                except ModelServerError as e:
                    server[model] = f"{e.code}: {e.message[:200]}"
                    # NOT_FOUND etc. is the server answering; UNAVAILABLE and deadlines are not.
                    if e.code not in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN"):
                        self.model_server_answered = True
            self._status_cache = (now, server)
        checks["model_server"] = self._status_cache[1]
        degraded = [
            m
            for m, s in checks["model_server"].items()
            if not isinstance(s, dict) or "AVAILABLE" not in s.values()
        ]
        checks["degraded"] = degraded
        checks["warm_up"] = dict(self.snapshots.warm_up_results)
        if self.config_sync is not None:
            # The last change of models.config this gateway applied, found served, or refused.
            checks["model_config"] = dict(self.config_sync.state)
        if not self.model_server_answered:
            gw = self.settings.gateway
            checks["waiting_for"] = (
                f"the model server ({gw.model_server_host}, gRPC {gw.model_server_grpc_port}, "
                f"REST {gw.model_server_rest_port}) has not answered since start"
            )
            return False, checks
        return True, checks
