"""Bounded requests to the model server: body size, declared tensor shapes, metric labels.

The REST app and the gRPC servicer are the real ones over a stand-in ``ServerCore`` that
serves one model, ``scorer``, with a ``serving_default`` signature taking ``x: float[N]``.
"""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving.model_server.errors import ServingError, not_found
from serving.model_server.grpc_service import PredictionServicer
from serving.model_server.metrics import UNKNOWN_MODEL, Metrics
from serving.model_server.rest import create_app
from serving.model_server.tensors import DT_FLOAT, DT_STRING, ndarray_from_proto


class StubServable:
    name, version = "scorer", 3
    signature_defs = {"serving_default": object()}

    def input_dtypes(self, signature: str) -> dict[str, int]:
        return {"x": DT_FLOAT}

    def run(self, signature: str, inputs: dict[str, np.ndarray], *_: Any) -> Any:
        return "serving_default", {"y": inputs["x"] * 2}


class StubCore:
    def get_servable(self, name: str, version: int | None = None, label: str | None = None) -> Any:
        if name != "scorer":
            raise not_found(f"Servable not found for request: Latest({name})")
        return StubServable()

    def model_status(self, name: str, version: int | None = None) -> list[Any]:
        raise not_found(f"Could not find any versions of model {name}")


@pytest.fixture
def metrics() -> Metrics:
    m = Metrics()
    m.set_available("scorer", 1)  # what the manager reports for each configured model
    return m


def _proto(dtype: int, shape: list[int], **values: Any) -> Any:
    from tensorflow.core.framework import tensor_pb2

    proto = tensor_pb2.TensorProto(dtype=dtype, **values)
    for d in shape:
        proto.tensor_shape.dim.add(size=d)
    return proto


def test_rest_bodies_above_the_limit_get_413_declared_or_streamed(metrics: Metrics) -> None:
    client = TestClient(create_app(StubCore(), metrics, max_body_bytes=1024))  # type: ignore[arg-type]
    ok = client.post("/v1/models/scorer:predict", json={"inputs": {"x": [1.0, 2.0]}})
    assert ok.status_code == 200 and ok.json() == {"outputs": [2.0, 4.0]}
    big = b'{"inputs": {"x": [' + b"1.0," * 400 + b"1.0]}}"
    r = client.post("/v1/models/scorer:predict", content=big)
    assert r.status_code == 413 and "1024 bytes" in r.json()["error"]

    def chunks() -> Any:  # no Content-Length: the limit holds on what is streamed
        for _ in range(10):
            yield b" " * 200

    r = client.post("/v1/models/scorer:predict", content=chunks())
    assert r.status_code == 413


# Shapes that need more values than the proto carries. The first three are the memory bombs
# (a few bytes asking for megabytes to terabytes); the rest were refused already and must stay so.
OVERSIZED = [
    (DT_FLOAT, [1 << 21], {}),  # no values: "zeros" for two million elements
    (DT_STRING, [1 << 22], {"string_val": [b"a"]}),  # one string copied four million times
    (DT_FLOAT, [10**12], {"float_val": [1.0]}),  # one value "filling" a terabyte tensor
    (DT_FLOAT, [4], {"float_val": [1.0, 2.0]}),
    (DT_FLOAT, [8], {"tensor_content": np.ones(2, np.float32).tobytes()}),
    (DT_FLOAT, [-1, 2], {"float_val": [1.0, 2.0]}),
]


def test_a_shape_that_needs_more_values_than_sent_is_invalid_argument(metrics: Metrics) -> None:
    from tensorflow_serving.apis import predict_pb2

    # TensorFlow's compact form stays readable: tf.make_tensor_proto(0.5, shape=[3]) writes one
    # value for three elements, and TF Serving takes it.
    assert ndarray_from_proto(_proto(DT_FLOAT, [3], float_val=[0.5])).tolist() == [0.5, 0.5, 0.5]

    class Aborted(Exception):
        pass

    class Context:
        def abort(self, code: grpc.StatusCode, message: str) -> None:
            self.code, self.message = code, message
            raise Aborted

    for dtype, shape, values in OVERSIZED:
        proto = _proto(dtype, shape, **values)
        with pytest.raises(ServingError) as err:
            ndarray_from_proto(proto)
        assert err.value.code == "INVALID_ARGUMENT", shape
        # The same through gRPC's Predict: INVALID_ARGUMENT, nothing allocated.
        request = predict_pb2.PredictRequest()
        request.model_spec.name = "scorer"
        request.inputs["x"].CopyFrom(proto)
        context = Context()
        with pytest.raises(Aborted):
            PredictionServicer(StubCore(), metrics).Predict(request, context)  # type: ignore[arg-type]
        assert context.code == grpc.StatusCode.INVALID_ARGUMENT, shape


def test_metric_labels_come_only_from_loaded_models_and_signatures(metrics: Metrics) -> None:
    client = TestClient(create_app(StubCore(), metrics))  # type: ignore[arg-type]
    for n in range(50):  # names a scanner or a typo might send
        client.post(f"/v1/models/nope-{n}:predict", json={"inputs": {"x": [1.0]}})
        client.post(f"/v1/models/scorer/versions/{900 + n}:PREDICT", json={"inputs": {"x": [1.0]}})
        client.post("/v1/models/scorer:predict", json={"signature_name": f"sig-{n}", "inputs": [1.0]})
        client.get(f"/v1/models/nope-{n}")
    client.post("/v1/models/scorer:predict", json={"inputs": {"x": [1.0]}})
    text = client.get("/monitoring/prometheus/metrics").text
    assert "nope-" not in text and "sig-" not in text and 'version="9' not in text
    assert f'model_name="{UNKNOWN_MODEL}"' in text
    assert (
        'model_server_requests_total{api="predict",code="OK",model="scorer",protocol="rest",'
        'signature="serving_default",version="3"} 1.0'
    ) in text
    assert 'api="PREDICT"' not in text
