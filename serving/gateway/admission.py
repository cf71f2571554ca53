"""How many requests the gateway admits at once: a fixed bound, or one that follows latency.

A fixed bound (``gateway.max_concurrent_requests``) has to be sized by hand to the machine:
too high and, past capacity, admitted requests queue inside the gateway and all of them get
slow (their features and model calls miss their deadlines and fall back); too low and a
burst at a sustainable rate is shed. ``AdaptiveLimit`` finds the bound instead, as Envoy's
adaptive concurrency filter and Netflix's concurrency-limits do, by additive increase and
multiplicative decrease on the latency of what it admitted: over each window of finished
requests, a p90 above ``target_s`` cuts the limit by ``backoff``; at or under it the limit
grows by one. Past capacity the limit settles where admitted requests still finish within
the target, and the rest are shed at once (503 with Retry-After), so throughput stays near
capacity and the admitted keep their latency. ``max_concurrent_requests`` stays its ceiling.

Both bounds are an ``Admission``: the middleware (``serving.gateway.app.ConcurrencyLimit``)
asks it whether one more request may start and tells it how long each admitted one took.
Pure and single-threaded: the middleware calls it from the event loop only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol


class Admission(Protocol):
    """How many requests may be in flight at once, and what moves that bound."""

    @property
    def limit(self) -> float: ...

    @property
    def setting(self) -> str:
        """The configuration that sets the bound, for the 503's message."""
        ...

    @property
    def epoch(self) -> int: ...

    def admits(self, in_flight: int) -> bool: ...

    def record(self, seconds: float, admitted_epoch: int) -> bool: ...


@dataclass
class FixedLimit:
    """``gateway.max_concurrent_requests``: the same bound whatever the latency."""

    limit: int
    setting: str = "gateway.max_concurrent_requests"
    epoch: int = 0

    def admits(self, in_flight: int) -> bool:
        return in_flight < self.limit

    def record(self, seconds: float, admitted_epoch: int) -> bool:
        return False


@dataclass
class AdaptiveLimit:
    """An in-flight bound moved by the latency of the requests it admitted.

    Args:
        ceiling: the most requests ever admitted at once (``max_concurrent_requests``).
        floor: the fewest; a limit of one would serialise the gateway behind its slowest call.
        target_s: the p90 latency, in the gateway, that admitted requests should keep.
        window: finished requests per decision; samples of requests admitted before the last
            change are not counted, so one slow spell is not punished twice.
        backoff: the factor a decrease multiplies the limit by.
    """

    ceiling: int
    floor: int
    target_s: float
    window: int = 32
    backoff: float = 0.8
    limit: float = field(init=False)
    setting: str = field(
        init=False, default="the adaptive limit under gateway.adaptive_concurrency_target_ms"
    )
    _samples: list[float] = field(init=False, default_factory=list)
    _epoch: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if not 1 <= self.floor <= self.ceiling:
            raise ValueError(f"floor={self.floor} must be between 1 and ceiling={self.ceiling}")
        if self.target_s <= 0 or self.window < 1 or not 0 < self.backoff < 1:
            raise ValueError(
                f"target_s={self.target_s} must be > 0, window={self.window} >= 1, "
                f"backoff={self.backoff} in (0, 1)"
            )
        self.limit = float(self.ceiling)

    def admits(self, in_flight: int) -> bool:
        """Whether one more request may start while ``in_flight`` are running."""
        return in_flight < math.floor(self.limit)

    @property
    def epoch(self) -> int:
        """Changes with every move of the limit; a request records the one it was admitted in."""
        return self._epoch

    def record(self, seconds: float, admitted_epoch: int) -> bool:
        """Count one finished request's latency; True when the limit moved."""
        if admitted_epoch != self._epoch:
            return False
        self._samples.append(seconds)
        if len(self._samples) < self.window:
            return False
        ordered = sorted(self._samples)
        p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
        before = self.limit
        if p90 > self.target_s:
            self.limit = max(float(self.floor), self.limit * self.backoff)
        else:
            self.limit = min(float(self.ceiling), self.limit + 1.0)
        self._samples.clear()
        if self.limit != before:
            self._epoch += 1
            return True
        return False
