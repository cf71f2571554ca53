"""``POST /v1/admin/reload``, ``POST /v1/admin/canary/promote|rollback`` (``serving.gateway.admin``),
``GET /v1/admin/exploration`` (the exploration bandit's posteriors)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from serving.gateway.admin import AdminRefused, ManualRollout, move_canary, reload_models
from serving.gateway.routes.dependencies import AccessChecks, CurrentGateway
from serving.gateway.routes.problems import problem
from serving.gateway.schemas import AdminRequest


async def _run_admin(action: Callable[[], dict[str, Any]]) -> Any:
    try:
        return await run_in_threadpool(action)
    except AdminRefused as e:
        return problem(409, {"action": e.action, "problems": e.problems, **e.detail})


def admin_router(access: AccessChecks, manual_rollout: ManualRollout | None) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/admin/reload", dependencies=[access.admin])
    async def admin_reload(gateway: CurrentGateway) -> Any:
        """Apply models.load.config then models.config to the model server; refresh the gateway.

        409 when a labelled version failed to load or lacks the signature the gateway calls:
        the labels that were serving stay, and the answer names each model, version and error.
        """
        return await _run_admin(lambda: reload_models(gateway))

    @router.post("/v1/admin/canary/{action}", dependencies=[access.admin])
    async def admin_canary(
        action: Literal["promote", "rollback"], gateway: CurrentGateway, body: AdminRequest | None = None
    ) -> Any:
        """``promote`` (stable := canary, only if the canary serves) or ``rollback`` (canary := stable)."""
        reason = body.reason if body else ""
        return await _run_admin(lambda: move_canary(gateway, action, reason, manual_rollout))

    @router.get("/v1/admin/exploration", dependencies=[access.read])
    def admin_exploration(gateway: CurrentGateway, top: int = 20) -> Any:
        """The exploration bandit: its policy, totals, and the arms with most slot impressions."""
        return gateway.exploration.summary(max(0, min(top, 1000)))

    return router
