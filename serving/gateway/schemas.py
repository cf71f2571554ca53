"""The gateway's request and response bodies (pydantic): what OpenAPI at /docs shows.

Ids follow the data contract (``recsys.contracts.ID_PATTERN``); an event must carry a
timezone-aware timestamp and a finite value, so what the log stores is what the pipeline's
validation would accept.

Every list and string a request carries is bounded here (``max_length``), so a request's
cost is bounded before any work starts; the limits an operator may want to tighten are
configuration too (``gateway.max_filter_categories``, ``gateway.max_exclude_item_ids``,
``gateway.max_batch_events``), checked by the routes with a 422 naming the field and bound.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from recsys.contracts import DEVICES, EVENT_TYPES, ID_PATTERN

Id = Annotated[str, Field(pattern=ID_PATTERN, examples=["u_42"])]
EventType = Literal[EVENT_TYPES]  # type: ignore[valid-type]
Device = Literal[DEVICES]  # type: ignore[valid-type]
# Hard caps of the request schema (configuration may set lower limits, never higher ones).
MAX_CATEGORY_CHARS = 128
MAX_FILTER_CATEGORIES = 1_000
MAX_EXCLUDE_ITEM_IDS = 10_000
Category = Annotated[str, Field(max_length=MAX_CATEGORY_CHARS, examples=["books"])]
# The earliest event time the log takes: the Unix epoch. Feature timestamps are epoch seconds
# and the pipeline's frames hold nanoseconds since it, so older times (year 1, say) cannot
# be stored faithfully; they are refused here rather than failing later.
EARLIEST_EVENT_TS = datetime(1970, 1, 1, tzinfo=UTC)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Context(Strict):
    """What is known about the request itself (the query tower's context features)."""

    device: Device = "unknown"
    # Hour of day (UTC) of the request; default: now.
    hour: int | None = Field(None, ge=0, le=23)
    session_id: str | None = Field(None, max_length=128)


class Filters(Strict):
    """Per-request filters, applied on top of the configured business rules."""

    # Keep only items with at least one of these categories (empty: no restriction).
    categories: list[Category] = Field([], max_length=MAX_FILTER_CATEGORIES)
    exclude_categories: list[Category] = Field([], max_length=MAX_FILTER_CATEGORIES)


class RecommendationRequest(Strict):
    user_id: Id
    k: int | None = Field(
        None, ge=1, description="Items to return (default gateway.default_k, max gateway.max_k)."
    )
    context: Context = Context()
    exclude_item_ids: list[Id] = Field([], max_length=MAX_EXCLUDE_ITEM_IDS)
    filters: Filters = Filters()
    explain: bool = Field(
        False,
        description="Add each item's attribution: the ranker inputs that moved its score most "
        "(one more ranker call).",
    )


class Attribution(BaseModel):
    """What moved an item's score: a ranker input, or the source that placed an item the
    ranker did not score."""

    # "input": a ranker input (recent_items, user_id, item_id, category, hour, device, a
    # profile or count feature by name); "source": what placed an unranked item
    # (exploration, segment_popularity, global_popularity, cold_start, retrieval, ...).
    kind: Literal["input", "source"]
    name: str
    # The ranker's score as served minus its score with this input at its default ("" for
    # text, 0 for numbers): positive when the input raised the score. Null for a source.
    effect: float | None


class RecommendedItem(BaseModel):
    item_id: str
    # The ranker's weighted score (or the candidate source's score: similarity, popularity);
    # null for an exploration slot, which is there because it is new, not because it scored.
    score: float | None
    # What put the item in the list: the recent item it is near, the category it shares
    # with the recent items, popularity, exploration, or the model's prediction.
    reason: str
    # Only with ``explain: true``: the inputs that moved the ranker's score most, largest
    # effect first (or the item's source); empty when the explaining call failed (the list
    # itself stands); absent without ``explain``.
    attribution: list[Attribution] | None = None


class RecommendationResponse(BaseModel):
    request_id: str
    user_id: str
    arm: str
    model_versions: dict[str, int]
    cold_start: bool
    # Degraded paths this request took, e.g. ["candidates:exact"]; empty when none.
    fallback: list[str]
    candidate_source: str
    # How many candidates the source gave and how many the ranker scored (after filtering).
    counts: dict[str, int]
    items: list[RecommendedItem]
    timings_ms: dict[str, float]


class Event(Strict):
    """One interaction, as the events contract defines it (``recsys.contracts.EVENTS``)."""

    event_id: Id
    user_id: Id
    item_id: Id
    event_type: EventType
    value: float | None = Field(None, allow_inf_nan=False)
    ts: AwareDatetime
    session_id: str = Field("", max_length=128)
    device: Device = "unknown"
    request_id: str | None = Field(None, max_length=128)

    @field_validator("value")
    @classmethod
    def _finite(cls, v: float | None) -> float | None:
        if v is not None and not math.isfinite(v):
            raise ValueError("value must be a finite number")
        return v

    @field_validator("ts")
    @classmethod
    def _plausible_time(cls, v: datetime, info: ValidationInfo) -> datetime:
        """Not before the epoch; with ``context={"now": ..., "max_future_skew_seconds": ...}``
        (the events route gives it), not further ahead of now than the allowed clock skew."""
        # timestamp(), not astimezone(UTC): year 1 or 9999 with an offset overflows the latter.
        at = v.timestamp()
        if at < EARLIEST_EVENT_TS.timestamp():
            raise ValueError(f"ts {v.isoformat()} is before {EARLIEST_EVENT_TS.isoformat()}")
        context = info.context or {}
        if "max_future_skew_seconds" in context:
            now: datetime = context.get("now") or datetime.now(UTC)
            skew = float(context["max_future_skew_seconds"])
            if at > now.timestamp() + skew:
                raise ValueError(
                    f"ts {v.isoformat()} is more than {skew:g} s ahead of the gateway's clock "
                    f"({now.isoformat()}; gateway.max_event_future_skew_seconds)"
                )
        return v

    def record(self) -> dict[str, Any]:
        out = self.model_dump()
        out["ts"] = self.ts.isoformat()
        return out


class AdminRequest(Strict):
    """An admin action's body: only why (recorded with the decision). Never a path."""

    reason: str = Field("", max_length=500)


class EventBatch(Strict):
    events: list[Event]


class EventResult(BaseModel):
    event_id: str
    status: Literal["accepted", "duplicate"]


class EventsResponse(BaseModel):
    accepted: int
    duplicates: int
    # The online-store push happens after the answer, from a bounded queue. False when the
    # queue was full and some accepted events will not be pushed: they are durable, the
    # gateway's own state reflects them, and the next feature rebuild brings the store along.
    push_queued: bool
    results: list[EventResult]


def validation_problems(error: ValidationError, prefix: str = "") -> list[dict[str, Any]]:
    """Pydantic errors as ``{field, value, message}``: the field path and the value refused."""
    out = []
    for err in error.errors():
        loc = prefix
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        value = err.get("input")
        if isinstance(value, datetime):
            value = value.isoformat()
        out.append({"field": loc, "value": _jsonable(value), "message": err["msg"]})
    return out


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in list(value.items())[:20]}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in list(value)[:20]]
    return str(value)
