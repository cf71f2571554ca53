"""``POST /v1/events``: one event or ``{"events": [...]}``, validated all or nothing."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from recsys.config import Settings
from serving.gateway.routes.dependencies import AccessChecks, CurrentGateway
from serving.gateway.routes.problems import problem, short_value
from serving.gateway.schemas import Event, EventsResponse, validation_problems


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
        for n, item in enumerate(raw):
            try:
                parsed.append(Event.model_validate(item))
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
