"""The gateway's calls to the model server: the inputs they carry, and a breaker around them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

import numpy as np

from recsys.config import Settings
from recsys.feature_schema import RANK_CANDIDATES_SIGNATURE
from recsys.item_ages import ages_of
from serving.clients import ModelServerClient, ModelServerError
from serving.gateway.catalog import ItemCatalog, ModelVersions
from serving.gateway.schemas import RecommendationRequest

log = logging.getLogger("serving.gateway")
# A dependency that failed hard is not called again for this long (a tiny circuit breaker,
# one per (model, label)): a dead model server then costs one timeout per window and label,
# not one per request, and a slow or broken canary never opens the breaker of stable.
BREAKER_SECONDS = {"UNAVAILABLE": 1.0, "DEADLINE_EXCEEDED": 1.0, "NOT_FOUND": 5.0, "FAILED_PRECONDITION": 5.0}
# Failures that mean "the server is down or too busy", as opposed to "cannot serve this model".
OVERLOAD_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED")
# The versions the model server's answers named during one request (``ModelCalls.recording``).
_SERVED: ContextVar[dict[str, int] | None] = ContextVar("served_versions", default=None)


T = TypeVar("T")


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine run from synchronous code, where it never waits.

    The request path is written once, as coroutines: on the gateway's event loop the model
    calls wait on ``grpc.aio`` and the loop serves other requests meanwhile; called from
    code with no running loop (``Gateway.recommend`` in a script or a test) the same calls
    block and return, so the coroutine finishes at its first step.
    """
    try:
        coro.send(None)
    except StopIteration as done:
        return cast(T, done.value)
    coro.close()
    raise RuntimeError("run_sync: the coroutine waited on an event loop; await it there instead")


def _event_loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _column(value: Any, dtype: str, n: int) -> np.ndarray:
    if dtype == "string":
        out = np.empty(n, dtype=object)
        out[:] = str(value)
        return out
    return np.full(n, value, dtype=np.int64 if dtype.startswith("int") else np.float32)


class ModelCalls:
    """Predict calls to the retrieval and ranking models, each behind the breaker.

    Args:
        settings: the configuration (push model names, objective weights).
        client: the model server client.
    """

    def __init__(self, settings: Settings, client: ModelServerClient) -> None:
        self.settings = settings
        self.client = client
        self._broken: dict[tuple[str, str], tuple[float, str]] = {}

    @staticmethod
    @contextlib.contextmanager
    def recording() -> Iterator[dict[str, int]]:
        """Collect, for the calls made inside the block, the version each model's answer named.

        What the canary analysis trusts: the version that actually served a request, not the
        one the label was expected to point at (a label moves between the gateway's snapshot
        and the call, and a server may not have applied a new config yet). An answer that
        names no version (TF Serving's REST) records nothing.
        """
        served: dict[str, int] = {}
        token = _SERVED.set(served)
        try:
            yield served
        finally:
            _SERVED.reset(token)

    def breaker_open(self, model: str, label: str) -> bool:
        """Whether calls to ``model`` under ``label`` are refused at once right now."""
        return self._broken.get((model, label), (0.0, ""))[0] > time.monotonic()

    async def call(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        label: str,
        signature: str,
        output_filter: Sequence[str] = (),
    ) -> Any:
        """One predict, refused at once while the breaker of (``model``, ``label``) is open.

        On a running event loop the call waits without blocking it (``predict_async``); with
        none it blocks (``run_sync``). The version the answer names is recorded for the
        request (``recording``).
        """
        now = time.monotonic()
        until, code = self._broken.get((model, label), (0.0, ""))
        if until > now:
            # The same code that opened the breaker: the fallback chain reads it.
            raise ModelServerError(code, f"{model}@{label}: skipped while the breaker is open")
        try:
            if _event_loop_running():
                pred = await self.client.predict_async(
                    model, inputs, label=label, signature_name=signature, output_filter=output_filter
                )
            else:
                pred = self.client.predict(
                    model, inputs, label=label, signature_name=signature, output_filter=output_filter
                )
        except ModelServerError as e:
            wait = BREAKER_SECONDS.get(e.code)
            if wait:
                self._broken[(model, label)] = (now + wait, e.code)
            raise
        served = _SERVED.get()
        if served is not None and pred.version:
            served[model] = int(pred.version)
        return pred

    def query_inputs(
        self, inputs: dict[str, str], row: dict[str, Any], recent: list[str], req: RecommendationRequest
    ) -> dict[str, np.ndarray]:
        """One query row for the query tower, from the user's features and the request context.

        ``recent_item_ages``: the seconds from each of ``recent`` to now, from the times the
        user's row stores for them (``recsys.item_ages.ages_of``); an item the row has no time
        for (one this process saw before the store did) reads as "age not known".
        """
        ctx = req.context
        now = datetime.now(UTC)
        values = {
            **row,
            "user_id": req.user_id,
            "recent_items": " ".join(recent),
            "hour": ctx.hour if ctx.hour is not None else now.hour,
            "device": ctx.device,
        }
        if "recent_item_ages" in inputs:
            stored_items, stored_times = row.get("recent_items"), row.get("recent_item_times")
            values["recent_item_ages"] = ages_of(recent, stored_items, stored_times, int(now.timestamp()))
        return {
            name: _column(values.get(name, "" if t == "string" else 0), t, 1) for name, t in inputs.items()
        }

    def ranker_inputs(
        self,
        inputs: dict[str, str],
        query: dict[str, np.ndarray],
        row: dict[str, Any],
        catalog: ItemCatalog,
        pos: np.ndarray,
        user_inputs: frozenset[str] = frozenset(),
    ) -> dict[str, np.ndarray]:
        """Columns for the ranker: the item side gathered from the cache for every candidate;
        the user side once (``user_inputs``, the ``rank_candidates`` signature) or repeated
        on every row (pair rows, the ``rank`` signature)."""
        out: dict[str, np.ndarray] = {}
        for name, dtype in inputs.items():
            if name not in user_inputs and (name == "item_id" or name in catalog.columns):
                out[name] = catalog.request_column(name, dtype)[pos]
                continue
            value = query[name][0] if name in query else row.get(name, "" if dtype == "string" else 0)
            out[name] = _column(value, dtype, 1 if name in user_inputs else len(pos))
        return out

    def ranking_request(
        self,
        versions: ModelVersions,
        version: int | None,
        query: dict[str, np.ndarray],
        row: dict[str, Any],
        catalog: ItemCatalog,
        pos: np.ndarray,
    ) -> tuple[dict[str, np.ndarray], str] | None:
        """The ranking call for a version: its columns and signature (None: inputs not known).

        ``rank_candidates`` (user side once) where the version has it, else pair rows to ``rank``.
        """
        key = version if version is not None else -1
        inputs = versions.ranking_inputs.get(key)
        if not inputs:
            return None
        user_inputs = versions.ranking_user_inputs.get(key, frozenset())
        signature = RANK_CANDIDATES_SIGNATURE if user_inputs else "rank"
        return self.ranker_inputs(inputs, query, row, catalog, pos, user_inputs), signature

    async def rank(
        self,
        versions: ModelVersions,
        label: str,
        query: dict[str, np.ndarray],
        row: dict[str, Any],
        catalog: ItemCatalog,
        pos: np.ndarray,
    ) -> np.ndarray | None:
        """One batched predict of all candidates; the weighted objective per candidate, or None."""
        model = self.settings.push.ranking_model
        try:
            ranking = self.ranking_request(versions, versions.version(model, label), query, row, catalog, pos)
            if ranking is None:
                return None
            columns, signature = ranking
            # Only the combined score crosses the wire, unless the gateway weighs objectives itself.
            only = () if self.settings.gateway.objective_weights else ("score",)
            pred = await self.call(model, columns, label, signature, only)
        except Exception as e:  # noqa: BLE001 - an unranked list beats no list
            log.warning("ranking failed: %s", e)
            return None
        return self._weighted(pred.outputs)

    async def score_pairs(self, label: str, columns: dict[str, np.ndarray]) -> np.ndarray:
        """The ranker's weighted objective for pair rows (one row per (user, item), every input
        ``[B]``) through its ``serving_default`` signature; raises when the call fails.

        For explanations: a leave-one-input-out batch varies user inputs from row to row,
        which ``rank_candidates`` (the user side once) cannot carry.
        """
        model = self.settings.push.ranking_model
        only = () if self.settings.gateway.objective_weights else ("score",)
        pred = await self.call(model, columns, label, "serving_default", only)
        return self._weighted(pred.outputs)

    def _weighted(self, outputs: Mapping[str, np.ndarray]) -> np.ndarray:
        """The ranker's combined score, or the objectives weighted by ``gateway.objective_weights``."""
        weights = self.settings.gateway.objective_weights
        if weights:
            return cast(
                np.ndarray, sum(w * outputs[o].astype(np.float32) for o, w in weights.items() if o in outputs)
            )
        return outputs["score"].astype(np.float32)

    def pair_rows(
        self,
        versions: ModelVersions,
        label: str,
        query: dict[str, np.ndarray],
        row: dict[str, Any],
        catalog: ItemCatalog,
        pos: np.ndarray,
    ) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
        """One ranker row per (user, item at ``pos``), with the same values ``rank`` sends, and the
        ranker's inputs; None when the label's ranking version is not known."""
        version = versions.version(self.settings.push.ranking_model, label)
        inputs = versions.ranking_inputs.get(version if version is not None else -1)
        if not inputs:
            return None
        return self.ranker_inputs(inputs, query, row, catalog, pos), inputs
