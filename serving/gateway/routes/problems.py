"""Error answers: ``{"detail": ...}``, with a 422 naming each field and value refused."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


def problem(status: int, detail: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def short_value(value: Any) -> Any:
    """A refused value as the answer shows it: text for raw bytes, cut after 200 characters of JSON."""
    if isinstance(value, bytes | bytearray):
        # A body sent as text/plain reaches validation as raw bytes, which JSON cannot carry.
        value = bytes(value).decode("utf-8", errors="replace")
    text = json.dumps(value, default=str)
    return value if len(text) <= 200 else text[:200] + "..."


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A 422 listing each field, value and message; refused events are counted."""
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if p != "body"]
        problems.append(
            {"field": ".".join(loc), "value": short_value(err.get("input")), "message": err["msg"]}
        )
    gateway = getattr(request.app.state, "gateway", None)
    if request.url.path.startswith("/v1/events") and gateway is not None:
        gateway.metrics.events.labels(status="invalid").inc()
    return problem(422, problems)
