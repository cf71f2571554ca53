"""TF Serving's REST API (``--rest_api_port``) on FastAPI, routed the way TF Serving routes it.

Paths (TF Serving's own regular expressions, case-insensitive, matched on the raw path)::

    GET  /v1/models/{model}[/versions/{v} | /labels/{l}]             model status
    GET  /v1/models/{model}[/versions/{v} | /labels/{l}]/metadata    signatures
    POST /v1/models/{model}[/versions/{v} | /labels/{l}]:predict     predict

Answers are JSON; failures are ``{"error": "<message>"}`` with the HTTP status TF Serving
maps the code to (400 for INVALID_ARGUMENT and FAILED_PRECONDITION, 404 for NOT_FOUND,
...). Model status and metadata are the gRPC answers printed with protobuf's JSON printer,
as TF Serving prints them, so ``version`` is a string (``"2"``) and enums are names.

A POST body above ``max_body_bytes`` (declared or streamed) is refused with 413 before it is
read whole; TF Serving leaves that to a proxy in front of it.

One quirk kept on purpose: TF Serving's status handler ignores a label, so
``GET /v1/models/m/labels/canary`` lists every version of ``m``; ask for the label's
predictions or metadata to learn which version it names.
"""

from __future__ import annotations

import json
import logging
import re
import time
from typing import Any
from urllib.parse import unquote

from fastapi import FastAPI, Request
from fastapi.responses import Response
from google.protobuf import json_format
from starlette.concurrency import run_in_threadpool

from serving.model_server.errors import ServingError, invalid_argument
from serving.model_server.grpc_service import metadata_proto, version_status_proto
from serving.model_server.manager import ServerCore
from serving.model_server.metrics import CONTENT_TYPE, PROMETHEUS_PATH, Metrics
from serving.model_server.tensors import json_from_tensors, parse_predict_body, tensors_from_json

_PREDICT_RE = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE,
)
_STATUS_RE = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE,
)
_INT64_MAX = 2**63 - 1
# The largest predict body read (a 1000-row ranking request in JSON is about 1 MB).
MAX_REST_BODY_BYTES = 32 * 1024 * 1024
log = logging.getLogger("serving.model_server")


def _json(obj: Any, status: int = 200, indent: int | None = None) -> Response:
    return Response(json.dumps(obj, indent=indent), status_code=status, media_type="application/json")


def _error(e: ServingError) -> Response:
    return _json({"error": e.message}, e.http_status, indent=4)


def _parse_path(method: str, path: str) -> tuple[str, int | None, str | None, str, bool]:
    """(model, version, label, method-or-subresource, matched) as ``ParseModelInfo`` does."""
    m = (_PREDICT_RE if method == "POST" else _STATUS_RE).fullmatch(path)
    if m is None:
        return "", None, None, "", False
    name, version_str, label, verb = m.groups()
    version = None
    if version_str:
        version = int(version_str)
        if version > _INT64_MAX:
            raise invalid_argument(f"Failed to convert version: {version_str} to numeric.")
    return unquote(name or ""), version, unquote(label) if label else None, verb or "", True


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or ``_TooLarge`` as soon as the declared or streamed size passes ``limit``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks, seen = [], 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(
    core: ServerCore,
    metrics: Metrics,
    prometheus_path: str | None = PROMETHEUS_PATH,
    max_body_bytes: int = MAX_REST_BODY_BYTES,
) -> FastAPI:
    """The REST front end over a ``ServerCore``.

    Args:
        core: the model manager to answer from.
        metrics: where requests are counted and what the Prometheus page renders.
        prometheus_path: where the metrics page is served; None to serve none.
        max_body_bytes: larger request bodies get 413 ``{"error": ...}`` unread.
    """
    app = FastAPI(title="model server (TF Serving REST API)", docs_url=None, redoc_url=None, openapi_url=None)

    if prometheus_path:

        @app.get(prometheus_path)
        def prometheus() -> Response:
            return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.api_route("/v1/{rest:path}", methods=["GET", "POST"])
    async def v1(request: Request) -> Response:
        raw = request.scope.get("raw_path") or request.url.path.encode()
        path = raw.decode("latin-1").split("?", 1)[0]
        try:
            body = await _read_body(request, max_body_bytes) if request.method == "POST" else b""
        except _TooLarge:
            message = f"Request body larger than {max_body_bytes} bytes"
            return _json({"error": message}, 413, indent=4)
        # Model work runs on a worker thread so one slow predict never blocks the event loop.
        return await run_in_threadpool(_handle, core, metrics, request.method, path, body)

    return app


def _handle(core: ServerCore, metrics: Metrics, method: str, path: str, body: bytes) -> Response:
    t0 = time.perf_counter()
    name, version, label, verb, served, signature, api = "", None, None, "", None, "", "unknown"
    code = "OK"
    try:
        name, version, label, verb, matched = _parse_path(method, path)
        if not matched:
            raise invalid_argument(f"Malformed request: {method} {path}")
        if version is not None and label is not None:
            raise invalid_argument(
                f"Both model version ({version}) and model version label ({label}) cannot be supplied."
            )
        if method == "POST":
            api = verb.lower()  # the path matches case-insensitively; the label is one spelling
            if verb != "predict":
                raise ServingError("UNIMPLEMENTED", f"{verb} is not supported by this model server")
            doc = parse_predict_body(body)
            requested_signature = doc.get("signature_name", "")
            wanted = requested_signature or "serving_default"
            servable = core.get_servable(name, version, label)
            served = servable.version
            if wanted not in servable.signature_defs:
                raise invalid_argument(f'Serving signature name: "{wanted}" not found in signature def')
            signature = wanted  # a label value only once the servable has it
            fmt, inputs = tensors_from_json(doc, servable.input_dtypes(signature), requested_signature)
            _, outputs = servable.run(signature, inputs)
            return _json(json_from_tensors(outputs, fmt))
        if not name:
            raise invalid_argument("Missing model name in request.")
        if verb:
            api = "GetModelMetadata"
            response = metadata_proto(core, name, version, label, ["signature_def"])
            served = response.model_spec.version.value
            return _json(_metadata_json(response), indent=1)
        api = "GetModelStatus"
        states = core.model_status(name, version)
        status = version_status_proto(states)
        return Response(
            json_format.MessageToJson(status, always_print_fields_with_no_presence=True),
            media_type="application/json",
        )
    except ServingError as e:
        code = e.code
        return _error(e)
    except Exception as e:  # noqa: BLE001 - a bug must still answer in TF Serving's error shape
        log.exception("REST request %s %s failed", method, path)
        code = "INTERNAL"
        return _error(ServingError("INTERNAL", str(e)))
    finally:
        if name:
            # Label values only from what the server loaded: a URL's unknown model, version
            # or signature must not create a new series (metrics.py maps unknown models).
            metrics.record_request(
                model=name,
                version=served,
                signature=signature,
                api=api,
                protocol="rest",
                code=code,
                seconds=time.perf_counter() - t0,
            )


def _metadata_json(response: Any) -> dict[str, Any]:
    """TF Serving's metadata JSON: ``model_spec`` and ``metadata.signature_def`` printed apart.

    TF Serving prints the two parts separately (with proto field names) and joins them,
    rather than printing the ``Any`` in the response, and so does this.
    """
    from tensorflow_serving.apis import get_model_metadata_pb2

    sig_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(sig_map)
    opts = {"preserving_proto_field_name": True, "always_print_fields_with_no_presence": True}
    return {
        "model_spec": json.loads(json_format.MessageToJson(response.model_spec, **opts)),
        "metadata": {"signature_def": json.loads(json_format.MessageToJson(sig_map, **opts))},
    }
