"""What the routes are given per request: the app's gateway and the API key checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Security

from serving.gateway.security import Access, ApiKeyGuard, api_key_header
from serving.gateway.service import Gateway


async def current_gateway(request: Request) -> Gateway:
    """The gateway the app's lifespan started (``app.state.gateway``); a 503 naming why while
    it is still being built (``serving.gateway.app.GatewayStarter`` retries a dependency down)."""
    # async: FastAPI would run a plain def dependency on the thread pool, one more thread hop.
    gateway = getattr(request.app.state, "gateway", None)
    if gateway is None:
        starter = getattr(request.app.state, "starter", None)
        reason = starter.reason if starter is not None else "starting"
        raise HTTPException(503, detail=f"not ready: {reason}", headers={"Retry-After": "1"})
    return gateway


CurrentGateway = Annotated[Gateway, Depends(current_gateway)]


@dataclass(frozen=True)
class AccessChecks:
    """One route dependency per access level, each checking the ``X-API-Key`` header."""

    read: Any
    write: Any
    admin: Any


def access_checks(guard: ApiKeyGuard) -> AccessChecks:
    """The dependencies for ``dependencies=[...]`` of each route, checked by ``guard``."""

    def requires(access: Access) -> Any:
        # async: the check never blocks, and FastAPI would run a plain def dependency on the
        # thread pool, one more thread hop per request before the endpoint's own.
        async def check(key: str | None = Security(api_key_header)) -> None:
            guard.check(access, key)

        return Depends(check)

    return AccessChecks(read=requires("read"), write=requires("write"), admin=requires("admin"))
