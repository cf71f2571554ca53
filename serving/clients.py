"""A small client for TF Serving's APIs (the real server or ``serving.model_server``), with timeouts.

The gateway asks a model server three things: *predict* (run a signature on a batch),
*status* (which versions are AVAILABLE) and *metadata* (a signature's inputs and outputs).
``ModelServerClient`` does each over REST (plain JSON, the columnar ``inputs`` format) or
gRPC (the official ``tensorflow_serving.apis`` stubs), addressing a model by its latest
version, a version number, or a version label (``stable``, ``canary``).

Inputs are given as lists or NumPy arrays and converted to the dtypes the signature
declares (read once from metadata and cached), so ``{"x": [1, 2]}`` feeds a float input
correctly over either transport. Outputs come back as NumPy arrays; string tensors as
object arrays of ``str`` from both transports. Every call has a deadline; a failure is a
``ModelServerError`` carrying TF Serving's canonical code (``NOT_FOUND``,
``INVALID_ARGUMENT``, ``DEADLINE_EXCEEDED``, ``UNAVAILABLE``, ...), so callers can fall
back on exactly the failures they mean to.

Only the gRPC path imports TensorFlow (the serving protos need it); a REST-only client
stays light.
"""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import numpy as np

Transport = Literal["rest", "grpc"]

_HTTP_CODES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
               409: "ALREADY_EXISTS", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 501: "UNIMPLEMENTED",
               503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}  # fmt: skip
_DTYPES = {"DT_FLOAT": np.float32, "DT_DOUBLE": np.float64, "DT_INT32": np.int32, "DT_INT64": np.int64,
           "DT_INT16": np.int16, "DT_INT8": np.int8, "DT_UINT8": np.uint8, "DT_BOOL": np.bool_,
           "DT_HALF": np.float16, "DT_STRING": object}  # fmt: skip
_DTYPE_ENUMS = {"DT_FLOAT": 1, "DT_DOUBLE": 2, "DT_INT32": 3, "DT_UINT8": 4, "DT_INT16": 5, "DT_INT8": 6,
                "DT_STRING": 7, "DT_INT64": 9, "DT_BOOL": 10, "DT_HALF": 19}  # fmt: skip
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    # gRPC's reconnect backoff grows to 120 s by default: a server that comes back after a long
    # outage would wait that long to be used again.
    ("grpc.max_reconnect_backoff_ms", 2000),
]
# DataType enum -> the little-endian NumPy dtype of its ``tensor_content`` (looked up per input).
_LITTLE_ENDIAN = {
    e: np.dtype(_DTYPES[name]).newbyteorder("<") for name, e in _DTYPE_ENUMS.items() if name != "DT_STRING"
}


class ModelServerError(Exception):
    """A failed call: TF Serving's canonical code, the HTTP status (REST) and the server's message."""

    def __init__(self, code: str, message: str, http_status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.http_status = http_status


def _model_server_error(e: Any) -> ModelServerError:
    """A failed gRPC call (blocking or ``grpc.aio``) as a ``ModelServerError`` with its code."""
    return ModelServerError(e.code().name, e.details() or "")


@dataclass(frozen=True)
class Prediction:
    """Outputs of one predict call.

    ``version`` is the version that answered: gRPC's answer names it; over REST (whose answer
    does not) a call by label goes to the version the label resolves to, so it is that one.
    """

    outputs: dict[str, np.ndarray]
    model: str
    version: int | None
    signature_name: str


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: str
    error_code: str
    error_message: str


class ModelServerClient:
    """Predict, status and metadata against a TF Serving-compatible server.

    Args:
        rest_url: e.g. ``http://127.0.0.1:8501``.
        grpc_target: e.g. ``127.0.0.1:8500``.
        timeout: seconds per call (a call may override it).
        transport: the default transport; gRPC when a target is given, else REST.
        metadata_ttl: seconds to trust cached signature dtypes.
    """

    def __init__(
        self,
        rest_url: str | None = None,
        grpc_target: str | None = None,
        timeout: float = 1.0,
        transport: Transport | None = None,
        metadata_ttl: float = 60.0,
    ) -> None:
        if not rest_url and not grpc_target:
            raise ValueError("give rest_url, grpc_target or both")
        self.rest_url = rest_url.rstrip("/") if rest_url else None
        self.grpc_target = grpc_target
        self.timeout = timeout
        self.transport: Transport = transport or ("grpc" if grpc_target else "rest")
        self.metadata_ttl = metadata_ttl
        self._http = httpx.Client(timeout=timeout) if rest_url else None
        self._channel: Any = None
        self._stubs: tuple[Any, Any] | None = None
        # grpc.aio's channel and stub, bound to the event loop that made them (``predict_async``).
        self._aio: tuple[Any, Any, Any] | None = None
        self._lock = threading.Lock()
        self._signatures: dict[tuple[str, int | None, str | None], tuple[float, dict[str, Any]]] = {}
        # REST: the version each label resolves to (TF Serving's REST predict answer names none).
        self._label_versions: dict[tuple[str, str], tuple[float, int]] = {}

    # --- plumbing -------------------------------------------------------------------

    def __enter__(self) -> ModelServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        if self._channel is not None:
            self._channel.close()

    def _grpc(self) -> tuple[Any, Any]:
        if self.grpc_target is None:
            raise ValueError("this client has no grpc_target")
        with self._lock:
            if self._stubs is None:
                os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
                import grpc
                from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

                self._channel = grpc.insecure_channel(self.grpc_target, options=_CHANNEL_OPTIONS)
                self._stubs = (
                    prediction_service_pb2_grpc.PredictionServiceStub(self._channel),
                    model_service_pb2_grpc.ModelServiceStub(self._channel),
                )
            return self._stubs

    def _aio_predict_stub(self) -> Any:
        """The prediction stub of a ``grpc.aio`` channel on the running event loop (made on first
        use there; a channel serves the loop it was made on only)."""
        import asyncio

        loop = asyncio.get_running_loop()
        if self._aio is None or self._aio[0] is not loop:
            if self.grpc_target is None:
                raise ValueError("this client has no grpc_target")
            os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
            from grpc import aio
            from tensorflow_serving.apis import prediction_service_pb2_grpc

            channel = aio.insecure_channel(self.grpc_target, options=_CHANNEL_OPTIONS)
            self._aio = (loop, channel, prediction_service_pb2_grpc.PredictionServiceStub(channel))
        return self._aio[2]

    async def close_async_channel(self) -> None:
        """Close the ``grpc.aio`` channel, on the loop that made it (``close`` does the rest)."""
        if self._aio is not None:
            channel, self._aio = self._aio[1], None
            await channel.close()

    def _call_grpc(self, method: Any, request: Any, timeout: float | None) -> Any:
        import grpc

        try:
            return method(request, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise _model_server_error(e) from None

    def _rest(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        if self._http is None:
            raise ValueError("this client has no rest_url")
        try:
            r = self._http.request(
                method, f"{self.rest_url}{path}", json=body, timeout=timeout or self.timeout
            )
        except httpx.TimeoutException as e:
            raise ModelServerError("DEADLINE_EXCEEDED", str(e) or "request timed out") from None
        except httpx.TransportError as e:
            raise ModelServerError("UNAVAILABLE", str(e) or type(e).__name__) from None
        try:
            data = r.json()
        except ValueError:
            data = {"error": r.text}
        if r.status_code != 200:
            message = data.get("error", r.text) if isinstance(data, dict) else r.text
            raise ModelServerError(_HTTP_CODES.get(r.status_code, "INTERNAL"), message, r.status_code)
        return data

    @staticmethod
    def _path(model: str, version: int | None, label: str | None) -> str:
        if version is not None and label:
            raise ValueError("give a version or a label, not both")
        if version is not None:
            return f"/v1/models/{model}/versions/{version}"
        if label:
            return f"/v1/models/{model}/labels/{label}"
        return f"/v1/models/{model}"

    @staticmethod
    def _spec(spec: Any, model: str, version: int | None, label: str | None, signature: str = "") -> None:
        spec.name = model
        if version is not None:
            spec.version.value = version
        elif label:
            spec.version_label = label
        if signature:
            spec.signature_name = signature

    # --- the three questions ----------------------------------------------------------

    def metadata(
        self,
        model: str,
        version: int | None = None,
        label: str | None = None,
        *,
        transport: Transport | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """The model's signatures as TF Serving's JSON prints them: ``{name: SignatureDef JSON}``."""
        if (transport or self.transport) == "rest":
            data = self._rest("GET", self._path(model, version, label) + "/metadata", timeout=timeout)
            return data["metadata"]["signature_def"]["signature_def"]
        from google.protobuf import json_format
        from tensorflow_serving.apis import get_model_metadata_pb2

        prediction, _ = self._grpc()
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec, model, version, label)
        response = self._call_grpc(prediction.GetModelMetadata, request, timeout)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(sig_map)
        return json_format.MessageToDict(sig_map, preserving_proto_field_name=True)["signature_def"]

    def label_version(
        self, model: str, label: str, *, transport: Transport | None = None, timeout: float | None = None
    ) -> int:
        """The version ``label`` resolves to on the server now (GetModelMetadata's ``model_spec``).

        Raises:
            ModelServerError: the label is unknown to the server (or the call failed).
        """
        if (transport or self.transport) == "rest":
            data = self._rest("GET", self._path(model, None, label) + "/metadata", timeout=timeout)
            return int(data["model_spec"]["version"])
        from tensorflow_serving.apis import get_model_metadata_pb2

        prediction, _ = self._grpc()
        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._spec(request.model_spec, model, None, label)
        return int(self._call_grpc(prediction.GetModelMetadata, request, timeout).model_spec.version.value)

    def _label_version(self, model: str, label: str, timeout: float | None) -> int:
        """The version ``label`` resolves to on the server (REST metadata), cached ``metadata_ttl``.

        TF Serving's REST predict answer carries no ``model_spec``: a call by label could not
        say which version served it. Calling the version the label resolves to can: the server
        answers only if that version is loaded. A label moved since is seen at the next
        resolve (or at once after ``reload_config``).
        """
        cached = self._label_versions.get((model, label))
        if cached is None or time.monotonic() - cached[0] > self.metadata_ttl:
            cached = (time.monotonic(), self.label_version(model, label, transport="rest", timeout=timeout))
            self._label_versions[(model, label)] = cached
        return cached[1]

    def _fresh_signatures(self, model: str, version: int | None, label: str | None) -> dict[str, Any] | None:
        """The model's signatures from the metadata cache while fresh, else None."""
        cached = self._signatures.get((model, version, label))
        if cached is None or time.monotonic() - cached[0] > self.metadata_ttl:
            return None
        return cached[1]

    def _signature(
        self,
        model: str,
        version: int | None,
        label: str | None,
        name: str,
        transport: Transport,
        timeout: float | None,
    ) -> dict[str, Any]:
        sigs = self._fresh_signatures(model, version, label)
        if sigs is None:
            sigs = self.metadata(model, version, label, transport=transport, timeout=timeout)
            self._signatures[(model, version, label)] = (time.monotonic(), sigs)
        if name not in sigs:
            raise ModelServerError(
                "INVALID_ARGUMENT", f'Serving signature name: "{name}" not found in signature def'
            )
        return sigs[name]

    def predict(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        version: int | None = None,
        label: str | None = None,
        signature_name: str = "serving_default",
        output_filter: Sequence[str] = (),
        transport: Transport | None = None,
        timeout: float | None = None,
    ) -> Prediction:
        """Run a signature on a batch.

        Args:
            model: the model name.
            inputs: ``{input alias: array-like}``, batch first.
            version: a version number, or
            label: a version label (``canary``); neither means the latest version.
            signature_name: which signature to run.
            output_filter: outputs to return (gRPC only; REST returns all).
            transport: ``rest`` or ``grpc`` (default: the client's).
            timeout: seconds for this call.

        Raises:
            ModelServerError: with the server's code and message.
        """
        transport = transport or self.transport
        sig = self._signature(model, version, label, signature_name, transport, timeout)
        if transport == "rest":
            arrays = {k: _as_array(v, sig["inputs"].get(k, {}).get("dtype")) for k, v in inputs.items()}
            if label and version is None:
                # By the version the label names, so the answer is known to come from it.
                version, label = self._label_version(model, label, timeout), None
            body = {"signature_name": signature_name, "inputs": {k: _to_json(a) for k, a in arrays.items()}}
            data = self._rest("POST", self._path(model, version, label) + ":predict", body, timeout)
            names = sorted(sig["outputs"])
            raw = data["outputs"] if len(names) > 1 else {names[0]: data["outputs"]}
            outputs = {k: _as_array(v, sig["outputs"].get(k, {}).get("dtype")) for k, v in raw.items()}
            return Prediction(outputs, model, version, signature_name)
        prediction, _ = self._grpc()
        request = self._predict_request(model, inputs, sig, version, label, signature_name, output_filter)
        return self._prediction(self._call_grpc(prediction.Predict, request, timeout), model)

    async def predict_async(
        self,
        model: str,
        inputs: Mapping[str, Any],
        *,
        label: str | None = None,
        signature_name: str = "serving_default",
        output_filter: Sequence[str] = (),
        timeout: float | None = None,
    ) -> Prediction:
        """``predict`` from a running event loop, without blocking it: over ``grpc.aio`` when the
        client's transport is gRPC; REST, and signature metadata not yet cached, on a thread."""
        import asyncio

        if self.transport == "rest":
            return await asyncio.to_thread(
                self.predict, model, inputs, label=label, signature_name=signature_name,
                output_filter=output_filter, timeout=timeout,
            )  # fmt: skip
        sig: dict[str, Any] | None = (self._fresh_signatures(model, None, label) or {}).get(signature_name)
        if sig is None:
            sig = await asyncio.to_thread(
                self._signature, model, None, label, signature_name, "grpc", timeout
            )
        stub = self._aio_predict_stub()
        request = self._predict_request(model, inputs, sig, None, label, signature_name, output_filter)
        import grpc

        try:
            response = await stub.Predict(request, timeout=timeout or self.timeout)
        except grpc.RpcError as e:
            raise _model_server_error(e) from None
        return self._prediction(response, model)

    def _predict_request(
        self,
        model: str,
        inputs: Mapping[str, Any],
        sig: dict[str, Any],
        version: int | None,
        label: str | None,
        signature_name: str,
        output_filter: Sequence[str],
    ) -> Any:
        """A gRPC ``PredictRequest``; bytes go into ``string_val`` as they are (only JSON needs text)."""
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        self._spec(request.model_spec, model, version, label, signature_name)
        for k, v in inputs.items():
            dtype = sig["inputs"].get(k, {}).get("dtype")
            _fill_tensor_proto(request.inputs[k], _as_array(v, dtype, decode=False), dtype or "")
        request.output_filter.extend(output_filter)
        return request

    @staticmethod
    def _prediction(response: Any, model: str) -> Prediction:
        from serving.model_server.tensors import ndarray_from_proto

        outputs = {k: _decode_strings(ndarray_from_proto(t)) for k, t in response.outputs.items()}
        return Prediction(
            outputs, model, response.model_spec.version.value, response.model_spec.signature_name
        )

    def status(
        self,
        model: str,
        version: int | None = None,
        *,
        transport: Transport | None = None,
        timeout: float | None = None,
    ) -> list[VersionStatus]:
        """Every version the server knows of (highest first), or one version."""
        if (transport or self.transport) == "rest":
            data = self._rest("GET", self._path(model, version, None), timeout=timeout)
            return [
                VersionStatus(
                    int(s["version"]), s["state"], s["status"]["error_code"], s["status"]["error_message"]
                )
                for s in data["model_version_status"]
            ]
        from tensorflow_serving.apis import get_model_status_pb2

        _, models = self._grpc()
        request = get_model_status_pb2.GetModelStatusRequest()
        self._spec(request.model_spec, model, version, None)
        response = self._call_grpc(models.GetModelStatus, request, timeout)
        from serving.model_server.errors import CODE_NAMES

        return [
            VersionStatus(
                s.version,
                get_model_status_pb2.ModelVersionStatus.State.Name(s.state),
                CODE_NAMES.get(s.status.error_code, str(s.status.error_code)),
                s.status.error_message,
            )
            for s in response.model_version_status
        ]

    def reload_config(self, config: Any, timeout: float | None = None) -> None:
        """HandleReloadConfigRequest (gRPC only): replace the served ``ModelServerConfig``."""
        from tensorflow_serving.apis import model_management_pb2

        _, models = self._grpc()
        request = model_management_pb2.ReloadConfigRequest()
        request.config.CopyFrom(config)
        self._call_grpc(models.HandleReloadConfigRequest, request, timeout or max(self.timeout, 30.0))
        self._signatures.clear()
        self._label_versions.clear()

    def wait_until_available(
        self, model: str, version: int | None = None, timeout: float = 30.0
    ) -> VersionStatus:
        """Poll status until the version (or any version) is AVAILABLE; raise DEADLINE_EXCEEDED."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                for s in self.status(model, version):
                    if s.state == "AVAILABLE":
                        return s
                    last = f"version {s.version} is {s.state} {s.error_message}".strip()
            except ModelServerError as e:
                last = e.message
            time.sleep(0.2)
        raise ModelServerError("DEADLINE_EXCEEDED", f"{model} not available after {timeout}s: {last}")


def _fill_tensor_proto(proto: Any, array: np.ndarray, dtype: str) -> None:
    """Write ``array`` into a request's TensorProto the way ``tf.make_tensor_proto`` does.

    Numbers go as raw little-endian bytes in ``tensor_content`` (one copy, however many
    rows); strings as ``string_val``. A 1000-row ranking request has ~25 columns, so the
    per-element Python work of the typed ``*_val`` fields would cost milliseconds a call.
    """
    enum = _DTYPE_ENUMS.get(dtype) or _DTYPE_ENUMS.get(_dtype_name(array), 7)
    proto.dtype = enum
    for size in array.shape:
        proto.tensor_shape.dim.add(size=int(size))
    if enum == _DTYPE_ENUMS["DT_STRING"]:
        values = array.reshape(-1).tolist()
        try:
            # bytes (the gateway's wire cache) and str go in as they are, checked in C;
            # anything else (numbers, None) is refused whole and converted below.
            proto.string_val.extend(values)
        except TypeError:
            del proto.string_val[:]
            proto.string_val.extend([v if isinstance(v, bytes) else str(v).encode() for v in values])
    else:
        proto.tensor_content = np.ascontiguousarray(array, dtype=_LITTLE_ENDIAN[enum]).tobytes()


def _dtype_name(array: np.ndarray) -> str:
    if array.dtype == object or array.dtype.kind in ("S", "U"):
        return "DT_STRING"
    found = (name for name, t in _DTYPES.items() if t is not object and np.dtype(t) == array.dtype)
    return next(found, "DT_FLOAT")


def _as_array(value: Any, dtype: str | None, decode: bool = True) -> np.ndarray:
    np_type = _DTYPES.get(dtype or "")
    if np_type is object:
        array = np.asarray(value, dtype=object)
        return _decode_strings(array) if decode else array
    return np.asarray(value, dtype=np_type) if np_type is not None else np.asarray(value)


def _decode_strings(array: np.ndarray) -> np.ndarray:
    if array.dtype != object and array.dtype.kind not in ("S", "U"):
        return array
    values = array.reshape(-1).tolist()
    if all(type(v) is str for v in values):
        return array  # already text (a request built by the caller): nothing to decode
    flat = [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else v for v in values]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(array.shape)


def _to_json(array: np.ndarray) -> Any:
    if array.dtype == object or array.dtype.kind in ("S", "U"):

        def conv(v: Any) -> Any:
            if isinstance(v, bytes):
                try:
                    return v.decode("utf-8")
                except UnicodeDecodeError:
                    return {"b64": base64.b64encode(v).decode("ascii")}
            return str(v)

        flat = [conv(v) for v in array.reshape(-1)]
        holder = np.empty(len(flat), dtype=object)
        holder[:] = flat
        return holder.reshape(array.shape).tolist()
    return array.tolist()
