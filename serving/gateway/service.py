"""The gateway's work, apart from HTTP: recommend, take events, find similar items.

``Gateway`` builds the parts and starts and stops their background threads; each part does
one job:

- ``snapshot``: the models and item cache, reloaded off the request path, warmed, swapped whole;
- ``config_sync``: a changed ``models.config`` applied to the model server (checked, two steps);
- ``user_features``: the user's online row with a deadline and fallbacks, and ``UserActivity``;
- ``model_calls``: the model server's calls with their breaker, and the inputs they carry;
- ``candidates``, ``cold_start``, ``popularity``: where a request's candidates come from;
- ``recommendation_flow``: a recommendation request, stage by stage;
- ``impressions``: served requests and their impressions, written in batches;
- ``event_ingest``: posted events, durable first, then pushed online;
- ``similar``: neighbours of an item; ``readiness``: what ``/readyz`` reports.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from recsys.config import Settings
from recsys.event_log import open_event_log
from recsys.event_log.base import EventLog
from serving.clients import ModelServerClient
from serving.gateway.candidates import CandidateChain
from serving.gateway.config_sync import ModelConfigSync
from serving.gateway.event_ingest import EventIngest, OnlinePusher
from serving.gateway.exploration import ExplorationBandit
from serving.gateway.impressions import ImpressionWriter
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.model_calls import ModelCalls
from serving.gateway.readiness import Readiness
from serving.gateway.recommendation_flow import RecommendationFlow, Timer
from serving.gateway.schemas import Event, RecommendationRequest
from serving.gateway.similar import UnknownItem, similar_items
from serving.gateway.snapshot import NotReady, Snapshot, SnapshotRefresher, settle_heap
from serving.gateway.user_features import UserActivity, UserFeatures

__all__ = ["Gateway", "NotReady", "Timer", "UnknownItem", "UserActivity", "settle_heap"]


class Gateway:
    """The recommendation gateway's state and logic; ``serving.gateway.app`` puts HTTP on it.

    Args:
        settings: the configuration (``gateway`` section, feature store, model base path).
        store: a Feast store (default: ``recsys.online_features.get_store(settings)``).
        client: a model server client (default: from ``gateway.model_server_*``).
        event_log: the durable event log (default: ``open_event_log(settings)``, by backend).
    """

    def __init__(
        self,
        settings: Settings,
        store: Any = None,
        client: ModelServerClient | None = None,
        event_log: EventLog | None = None,
    ) -> None:
        from recsys.online_features import get_store

        self.settings = settings
        gw = settings.gateway
        self.metrics = GatewayMetrics()
        self.store = store if store is not None else get_store(settings)
        # Pushes read-modify-write a user's row: they take this lock, one at a time. Reads (per
        # request, and the item cache's rebuild) do not (see UserFeatures._read_user).
        self.store_lock = threading.Lock()
        host = gw.model_server_host
        self.client = client or ModelServerClient(
            rest_url=f"http://{host}:{gw.model_server_rest_port}",
            grpc_target=f"{host}:{gw.model_server_grpc_port}",
            timeout=gw.model_timeout_ms / 1000,
            transport=gw.protocol,
        )
        # SQLite file or Redis Streams, by gateway.event_log_backend; the same promises either way.
        self.event_log = event_log or open_event_log(settings)
        self.activity = UserActivity(
            max_items=settings.features.recent_items, max_shown=settings.gateway.session_shown_items
        )
        self.user_features = UserFeatures(settings, self.store)
        self.model_calls = ModelCalls(settings, self.client)
        # models.config reaches the model server through this gateway (refresh thread, admin).
        self.config_sync = ModelConfigSync(self, self.metrics)
        self.snapshots = SnapshotRefresher(
            settings,
            self.store,
            self.model_calls,
            self.user_features.defaults,
            apply_config=self.config_sync.check,
        )
        self.impressions = ImpressionWriter(settings, self.event_log, self.metrics)
        # The exploration slots' bandit: chooses at serve time, learns from posted clicks.
        self.exploration = ExplorationBandit(settings, self.metrics)
        self.pusher = OnlinePusher(settings, self.store, self.store_lock, self.metrics)
        self.event_ingest = EventIngest(
            settings,
            self.event_log,
            self.activity,
            self.pusher,
            self.metrics,
            self.exploration,
        )
        self.recommendations = RecommendationFlow(
            settings,
            self.snapshots,
            self.user_features,
            self.activity,
            self.model_calls,
            CandidateChain(settings, self.model_calls, self.metrics),
            self.impressions,
            self.metrics,
            self.exploration,
        )
        self._readiness = Readiness(settings, self.snapshots, self.client, self.event_log, self.config_sync)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, wait: bool = False) -> None:
        """Start the background threads: initial load + refresh, and the impression writer."""
        self.snapshots.start()
        self.impressions.start()
        self.pusher.start()
        if wait:
            self.snapshots.wait_loaded()

    def stop(self) -> None:
        self.snapshots.stop()
        self.impressions.stop()
        self.pusher.stop()
        self.user_features.close()
        self.client.close()
        self.event_log.close()

    # --- snapshot ----------------------------------------------------------------------

    def refresh(self) -> bool:
        """Reload model versions when models.config changed, items when a materialization landed."""
        return self.snapshots.refresh()

    def snapshot(self) -> Snapshot:
        """The models and item cache now serving; ``NotReady`` before the first load."""
        return self.snapshots.get()

    # --- requests ----------------------------------------------------------------------

    def recommend(self, req: RecommendationRequest) -> dict[str, Any]:
        """Top-k items for a user (``recommendation_flow``), from code with no running event loop."""
        return self.recommendations.recommend(req)

    async def recommend_async(self, req: RecommendationRequest) -> dict[str, Any]:
        """Top-k items for a user, on the running event loop without blocking it."""
        return await self.recommendations.recommend_async(req)

    def log_failed_request(self, user_id: str, latency_ms: float) -> None:
        """Record a request that ended in an error, so the canary guardrail counts it for its arm."""
        self.impressions.log_failed_request(user_id, latency_ms)

    def flush_impressions(self, timeout: float = 5.0) -> None:
        """Wait until the impressions queued so far are written (tests, shutdown)."""
        self.impressions.flush(timeout)

    def ingest(self, events: Sequence[Event]) -> dict[str, Any]:
        """Durable append first, then the user's in-process state, then the online-store queue."""
        return self.event_ingest.ingest(events)

    def flush_pushes(self, timeout: float = 5.0) -> bool:
        """Wait until the online-store pushes queued so far have been tried (tests, shutdown)."""
        return self.pusher.flush(timeout)

    def similar(self, item_id: str, k: int) -> dict[str, Any]:
        """Content/taste neighbours of an item in the stable retrieval version's embedding space."""
        return similar_items(self.snapshot(), self.settings.push.retrieval_model, item_id, k)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when models and items are loaded; the model server's state is reported."""
        return self._readiness.check()
