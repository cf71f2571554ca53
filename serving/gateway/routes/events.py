"""``POST /v1/events``: one event or ``{"events": [...]}``, validated all or nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from recsys.config import Settings
from serving.gateway.routes.dependencies import AccessChecks, CurrentGateway
from serving.gateway.routes.problems import problem, short_value
from serving.gateway.schemas import Event, EventsResponse, validation_problems

# An event is flat ({"events": [{...}]} is three levels deep): a body nested deeper than this
# is refused before validation walks it (recursion in the parser, pydantic and the 422 itself).
MAX_JSON_DEPTH = 32


def json_depth(value: Any, limit: int) -> int:
    """How deeply ``value`` nests lists and objects, counted up to ``limit + 1`` (iterative)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def events_router(settings: Settings, access: AccessChecks) -> APIRouter:
    router = APIRouter()

    @router.post(
        "/v1/events",
        response_model=EventsResponse,
        dependencies=[access.write],
        # The body is parsed in the endpoint (one event, a list, or {"events": [...]}), so
        # FastAPI cannot derive its schema: the document names both shapes.
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "oneOf": [
                                {"$ref": "#/components/schemas/Event"},
                                {"$ref": "#/components/schemas/EventBatch"},
                            ]
                        }
                    }
                },
            }
        },
    )
    async def events(request: Request, gateway: CurrentGateway) -> Any:
        """One event, or ``{"events": [...]}``: durable, idempotent by event_id, then pushed online."""
        g = gateway
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            g.metrics.events.labels(status="invalid").inc()
            return problem(422, [{"field": "body", "value": None, "message": f"not JSON: {e}"}])
        except RecursionError:  # nested past the parser's own recursion limit
            body = None
            too_deep = True
        else:
            too_deep = json_depth(body, MAX_JSON_DEPTH) > MAX_JSON_DEPTH
        if too_deep:
            g.metrics.events.labels(status="invalid").inc()
            message = f"JSON nested deeper than {MAX_JSON_DEPTH} levels (an event is flat)"
            return problem(422, [{"field": "body", "value": None, "message": message}])
        if isinstance(body, dict) and "events" in body:
            raw, prefix = body["events"], "events"
        elif isinstance(body, list):
            raw, prefix = body, "events"
        else:
            raw, prefix = [body], ""
        if not isinstance(raw, list) or not raw:
            g.metrics.events.labels(status="invalid").inc()
            return problem(
                422, [{"field": prefix or "body", "value": short_value(raw), "message": "no events"}]
            )
        limit = settings.gateway.max_batch_events
        if len(raw) > limit:
            g.metrics.events.labels(status="invalid").inc(len(raw))
            return problem(
                422,
                [{"field": "events", "value": len(raw), "message": f"at most {limit} events per request"}],
            )
        parsed: list[Event] = []
        problems: list[dict[str, Any]] = []
        # A timestamp further ahead of this clock than the allowed skew is refused (the schema).
        context = {
            "now": datetime.now(UTC),
            "max_future_skew_seconds": settings.gateway.max_event_future_skew_seconds,
        }
        for n, item in enumerate(raw):
            try:
                parsed.append(Event.model_validate(item, context=context))
            except ValidationError as e:
                problems += validation_problems(e, f"{prefix}[{n}]" if prefix else "")
        if problems:
            # All or nothing: a batch with one bad event stores none, so a retry is simple.
            g.metrics.events.labels(status="invalid").inc(len(raw))
            return problem(422, problems)
        out = await run_in_threadpool(g.ingest, parsed)
        g.metrics.requests.labels(endpoint="events", status="200").inc()
        return out

    return router
