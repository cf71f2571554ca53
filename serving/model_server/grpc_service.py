"""TF Serving's gRPC API on the official generated services of ``tensorflow-serving-api``.

``PredictionService``: Predict and GetModelMetadata (Classify, Regress and MultiInference
answer UNIMPLEMENTED). ``ModelService``: GetModelStatus and HandleReloadConfigRequest.
Requests and answers are the official protos, and failures are gRPC statuses with TF
Serving's codes (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ...), so a client
written with ``prediction_service_pb2_grpc.PredictionServiceStub`` against this server runs
unchanged against ``tensorflow_model_server``.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent import futures
from typing import Any

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.model_server.errors import CODES, ServingError, invalid_argument
from serving.model_server.manager import ServerCore, VersionState
from serving.model_server.metrics import Metrics
from serving.model_server.tensors import ndarray_from_proto, proto_from_ndarray

log = logging.getLogger("serving.model_server")
# TF Serving lifts gRPC's 4 MB default: requests of 1000 candidates' features are large.
MAX_MESSAGE_BYTES = 2**31 - 1


def _abort(context: grpc.ServicerContext, e: ServingError) -> None:
    context.abort(getattr(grpc.StatusCode, e.code), e.message)


def _spec(model_spec: Any) -> tuple[str, int | None, str | None]:
    which = model_spec.WhichOneof("version_choice")
    version = model_spec.version.value if which == "version" else None
    label = model_spec.version_label if which == "version_label" else None
    return model_spec.name, version, label


def version_status_proto(states: list[VersionState]) -> get_model_status_pb2.GetModelStatusResponse:
    """GetModelStatusResponse for monitor rows (``status`` always set, as TF Serving sets it)."""
    response = get_model_status_pb2.GetModelStatusResponse()
    for s in states:
        row = response.model_version_status.add()
        row.version = s.version
        row.state = get_model_status_pb2.ModelVersionStatus.State.Value(s.state)
        row.status.error_code = CODES[s.error_code]
        row.status.error_message = s.error_message
    return response


def metadata_proto(
    core: ServerCore, name: str, version: int | None, label: str | None, fields: list[str]
) -> get_model_metadata_pb2.GetModelMetadataResponse:
    """GetModelMetadataResponse with the SignatureDefMap packed under ``signature_def``."""
    if not fields:
        raise invalid_argument("GetModelMetadataRequest must specify at least one metadata_field")
    for f in fields:
        if f != "signature_def":
            raise invalid_argument(f"Metadata field {f} is not supported")
    servable = core.get_servable(name, version, label)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    response.model_spec.name = servable.name
    response.model_spec.version.value = servable.version
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    for key, sig in servable.signature_defs.items():
        sig_map.signature_def[key].CopyFrom(sig)
    response.metadata["signature_def"].Pack(sig_map)
    return response


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata over the manager's servables."""

    def __init__(self, core: ServerCore, metrics: Metrics) -> None:
        self.core = core
        self.metrics = metrics

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802 - gRPC's name
        t0 = time.perf_counter()
        name, version, label = _spec(request.model_spec)
        signature = request.model_spec.signature_name or "serving_default"
        served: int | None = None
        label_signature = ""  # a metric label only once the servable has run it
        code = "OK"
        try:
            if not request.HasField("model_spec"):
                raise invalid_argument("Missing ModelSpec")
            servable = self.core.get_servable(name, version, label)
            served = servable.version
            if signature in servable.signature_defs:
                label_signature = signature
            try:
                inputs = {alias: ndarray_from_proto(t) for alias, t in request.inputs.items()}
            except ServingError:
                raise
            except Exception as e:  # noqa: BLE001 - any malformed TensorProto
                raise invalid_argument(f"tensor parsing error: {e}") from None
            signature, outputs = servable.run(signature, inputs, list(request.output_filter))
            label_signature = signature
            response = predict_pb2.PredictResponse()
            response.model_spec.name = name
            response.model_spec.signature_name = signature
            response.model_spec.version.value = servable.version
            sig = servable.signature_defs[signature]
            for alias, array in outputs.items():
                proto_from_ndarray(array, sig.outputs[alias].dtype, into=response.outputs[alias])
            return response
        except ServingError as e:
            code = e.code
            _abort(context, e)
        finally:
            self.metrics.record_request(
                model=name,
                version=served,
                signature=label_signature,
                api="predict",
                protocol="grpc",
                code=code,
                seconds=time.perf_counter() - t0,
            )

    def GetModelMetadata(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        t0 = time.perf_counter()
        name, version, label = _spec(request.model_spec)
        code = "OK"
        served: int | None = None
        try:
            if not request.HasField("model_spec"):
                raise invalid_argument("Missing ModelSpec")
            response = metadata_proto(self.core, name, version, label, list(request.metadata_field))
            served = response.model_spec.version.value
            return response
        except ServingError as e:
            code = e.code
            _abort(context, e)
        finally:
            self.metrics.record_request(
                model=name,
                version=served,
                signature="",
                api="GetModelMetadata",
                protocol="grpc",
                code=code,
                seconds=time.perf_counter() - t0,
            )


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus and HandleReloadConfigRequest (the config API behind canary moves)."""

    def __init__(self, core: ServerCore, metrics: Metrics, reload_root: str | None = None) -> None:
        self.core = core
        self.metrics = metrics
        # Not TF Serving's behaviour: reloads are refused unless the server was started with
        # --allow_reload_config, and then take only base paths under this folder.
        self.reload_root = reload_root

    def GetModelStatus(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        try:
            if not request.HasField("model_spec"):
                raise invalid_argument("Missing ModelSpec")
            # TF Serving answers by version when one is given and otherwise for every
            # version; a label in the spec is not consulted.
            spec = request.model_spec
            version = spec.version.value if spec.WhichOneof("version_choice") == "version" else None
            return version_status_proto(self.core.model_status(spec.name, version))
        except ServingError as e:
            _abort(context, e)

    def HandleReloadConfigRequest(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        response = model_management_pb2.ReloadConfigResponse()
        try:
            if request.config.WhichOneof("config") != "model_config_list":
                raise invalid_argument(
                    "ServerModelConfig type not supported by HandleReloadConfigRequest. "
                    "Only ModelConfigList is currently supported"
                )
            check_reload_allowed(request.config, self.reload_root)
            self.core.reload_config(request.config)
            response.status.error_code = 0
            return response
        except ServingError as e:
            log.error("ReloadConfig failed: %s", e.message)
            _abort(context, e)


def check_reload_allowed(config: Any, root: str | None) -> None:
    """Refuse a reload (PERMISSION_DENIED) unless enabled, and any base path outside ``root``.

    The reload RPC can point the server at any folder it can read, so it is the model
    server's control plane: closed unless the server was started with
    ``--allow_reload_config``, and then only for base paths under the model root (symbolic
    links and ``..`` resolved first).
    """
    if root is None:
        raise ServingError(
            "PERMISSION_DENIED",
            "HandleReloadConfigRequest is disabled on this server (start it with --allow_reload_config)",
        )
    real_root = os.path.realpath(root)
    for model in config.model_config_list.config:
        real = os.path.realpath(model.base_path)
        if os.path.commonpath([real_root, real]) != real_root:
            raise ServingError(
                "PERMISSION_DENIED",
                f"base_path {model.base_path!r} of model {model.name!r} is outside the model root {root}",
            )


def create_grpc_server(
    core: ServerCore,
    metrics: Metrics,
    port: int,
    host: str = "0.0.0.0",
    max_workers: int = 16,
    reload_root: str | None = None,
) -> tuple[grpc.Server, int]:
    """A started-able gRPC server with both services; returns it and the bound port.

    Args:
        port: 0 picks a free port (the bound one is returned).
        host: TF Serving listens on all interfaces (``0.0.0.0``); tests pass ``127.0.0.1``.
        reload_root: HandleReloadConfigRequest takes base paths under this folder only;
            None refuses every reload.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(core, metrics), server
    )
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(
        ModelServicer(core, metrics, reload_root), server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"could not bind gRPC port {host}:{port}")
    return server, bound
