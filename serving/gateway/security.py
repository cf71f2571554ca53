"""Who may call the gateway, and how much they may send.

- ``ApiKeyGuard``: write endpoints need the ``X-API-Key`` header to equal the key in the
  environment variable ``security.api_key_env``; read endpoints too unless
  ``security.open_reads``. Admin endpoints (reload, canary promote and rollback) need the
  key in ``security.admin_key_env`` when that is set (production), so an event producer's
  key cannot move models; the API key where it is null (the embedded demo). The comparison
  is ``hmac.compare_digest`` over bytes, so the time it takes does not depend on how many
  leading characters of a guess are right. The keys are read once at startup and kept only
  as bytes in this object: never part of ``Settings``, never logged, never echoed in an error.
- ``BodyLimit``: an ASGI middleware that refuses a body above ``security.max_request_bytes``
  with 413, from the Content-Length header or, for a chunked body, as soon as the bytes
  read pass the limit, so an oversized request never sits whole in memory.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from fastapi import HTTPException
from fastapi.security import APIKeyHeader

from recsys.config import SecurityConfig

API_KEY_HEADER = "X-API-Key"
Access = Literal["read", "write", "admin"]

# OpenAPI documents the header (schemathesis and /docs send it); auto_error=False lets the
# guard word the 401 itself.
api_key_header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="The gateway's API key.")


class ApiKeyGuard:
    """Checks a request's API key for one kind of access (``read``, ``write`` or ``admin``).

    Args:
        config: the ``security`` section.
        environ: where the key is read from (default ``os.environ``); only the variable
            named by ``config.api_key_env`` is read.
    """

    def __init__(self, config: SecurityConfig, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        key = _read_key(env, config.api_key_env)
        self._key: bytes | None = key.encode() if key else None
        self.env_name = config.api_key_env
        self.open_reads = config.open_reads
        # Admin actions: a key of their own when security.admin_key_env names one.
        self.admin_env_name = config.admin_key_env or config.api_key_env
        admin = _read_key(env, self.admin_env_name)
        self._admin_key: bytes | None = admin.encode() if admin else None
        if config.admin_key_env and self._admin_key is not None and self._admin_key == self._key:
            raise ValueError(
                f"security.admin_key_env: {config.admin_key_env} holds the same key as "
                f"{config.api_key_env}; the admin key must be a key of its own"
            )

    @property
    def configured(self) -> bool:
        return self._key is not None

    @property
    def admin_configured(self) -> bool:
        return self._admin_key is not None

    def needs_key(self, access: Access) -> bool:
        return access != "read" or not self.open_reads

    def check(self, access: Access, presented: str | None) -> None:
        """Return if the request may proceed; raise 401/403/503 naming what is wrong (never the key)."""
        if not self.needs_key(access):
            return
        admin = access == "admin"
        key, env_name = (self._admin_key, self.admin_env_name) if admin else (self._key, self.env_name)
        if key is None:
            # Fail closed: a gateway started without a key takes no writes rather than anyone's.
            what = "admin key" if env_name != self.env_name else "API key"
            raise HTTPException(
                503,
                f"{access} endpoints are disabled: no {what} configured (set the environment "
                f"variable {env_name} for the gateway)",
            )
        if not presented:
            message = f"missing API key: send it in the {API_KEY_HEADER} header"
            raise HTTPException(401, message, {"WWW-Authenticate": "ApiKey"})
        if not hmac.compare_digest(presented.encode(), key):
            raise HTTPException(403, f"invalid API key in the {API_KEY_HEADER} header")


def _read_key(env: Mapping[str, str], name: str) -> str:
    """The key in variable ``name``, or in the file ``<name>_FILE`` names (a Compose or
    Kubernetes secret mounted as a file, the convention of the official Docker images)."""
    if env.get(name):
        return env[name]
    path = env.get(f"{name}_FILE")
    return Path(path).read_text().strip() if path else ""


class BodyLimit:
    """ASGI middleware: 413 for a request body above ``limit`` bytes (declared or streamed)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send, int(declared))
            return
        seen = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(seen, self.limit)
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge as e:
            # Raised while the app read the body and not turned into a response on the way up.
            if not started:
                await self._refuse(send, e.seen, at_least=True)

    async def _refuse(self, send: Any, size: int, at_least: bool = False) -> None:
        body = json.dumps({"detail": _too_large(size, self.limit, at_least)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    what = f"at least {size}" if at_least else str(size)
    return f"request body of {what} bytes exceeds security.max_request_bytes = {limit}"


class _TooLarge(HTTPException):
    # An HTTPException, so FastAPI's body parsing passes it on as a 413 instead of a 400.
    def __init__(self, seen: int, limit: int) -> None:
        super().__init__(413, _too_large(seen, limit, at_least=True))
        self.seen = seen
