"""Conformance of the model server with TF Serving, driven as TF Serving's own clients drive it.

One real server process (``recsys serve model-server`` with tensorflow_model_server's
flags) on free loopback ports serves tiny SavedModels built here in TF Serving's layout.
gRPC calls use the official ``tensorflow_serving.apis`` stubs and ``tf.make_tensor_proto``;
REST calls are plain JSON over httpx. Each scenario that changes state (a new version on
disk, a corrupt version, label moves) has its own model, so tests do not depend on order.

The test model (``Scorer``) has two signatures:
- ``serving_default(text: string[N], x: float[N]) -> {score: len(text) + x + bias, echo: text + "!"}``
- ``other(x: float[N]) -> {doubled: 2x + bias}``
and ``bias`` is the version number, so every answer shows which version served it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from entrypoints.local_servers import LocalServer
from tests.support.polling import wait_for
from tests.support.ports import free_port
from tests.support.scorer_model import build_scorer, import_tensorflow
from tests.support.servers import start_model_server

pytestmark = pytest.mark.integration


def model_entry(name: str, base: Path, policy: str = "", labels: dict[str, int] | None = None) -> str:
    label_text = " ".join(f'version_labels {{ key: "{k}" value: {v} }}' for k, v in (labels or {}).items())
    return (
        f'config {{ name: "{name}" base_path: "{base / name}" model_platform: "tensorflow" '
        f"{policy} {label_text} }}"
    )


@dataclass
class Server:
    base: Path
    grpc_port: int
    rest_port: int
    log: Path
    process: LocalServer

    @property
    def rest(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"


BASE_MODELS = ("scorer", "warm", "pinned", "rolling", "guarded", "canary")


def base_config(base: Path, canary: str = "") -> str:
    """The server's models.config; ``canary`` replaces the canary model's entry."""
    return (
        "model_config_list {\n"
        + "\n".join(
            [
                model_entry("scorer", base),
                model_entry("warm", base),
                model_entry("pinned", base, "model_version_policy { specific { versions: 1 versions: 3 } }"),
                model_entry("rolling", base),
                model_entry("guarded", base),
                canary or model_entry("canary", base, "model_version_policy { specific { versions: 1 } }"),
            ]
        )
        + "\n}\n"
    )


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("models")
    build_scorer(base / "scorer" / "1", 1)
    build_scorer(base / "scorer" / "2", 2)
    (base / "scorer" / "tmp").mkdir()  # not a version: ignored
    build_scorer(base / "warm" / "1", 1, warmup_records=3)
    for v in (1, 2, 3):
        build_scorer(base / "pinned" / str(v), v)
    build_scorer(base / "rolling" / "1", 1)
    build_scorer(base / "guarded" / "1", 1)
    for v in (1, 2):
        build_scorer(base / "canary" / str(v), v)
    config = base / "models.config"
    config.write_text(base_config(base))
    grpc_port, rest_port = free_port(), free_port()
    log = base / "server.log"
    args = [
        "--port", str(grpc_port), "--rest_api_port", str(rest_port), "--host", "127.0.0.1",
        "--model_config_file", str(config), "--file_system_poll_wait_seconds", "1",
        "--allow_reload_config",  # the canary moves below go through HandleReloadConfigRequest
        # A corrupt version should end at once; TF Serving's default retries for 5 minutes.
        "--max_num_load_retries", "0",
    ]  # fmt: skip
    process = start_model_server(args, log, rest_port, "scorer")
    try:
        yield Server(base, grpc_port, rest_port, log, process)
    finally:
        process.stop()


@pytest.fixture(scope="session")
def stubs(server: Server) -> Iterator[tuple[Any, Any]]:
    import grpc
    from tensorflow_serving.apis import model_service_pb2_grpc, prediction_service_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    yield (
        prediction_service_pb2_grpc.PredictionServiceStub(channel),
        model_service_pb2_grpc.ModelServiceStub(channel),
    )
    channel.close()


def status(server: Server, model: str) -> dict[int, dict[str, Any]]:
    r = httpx.get(f"{server.rest}/v1/models/{model}", timeout=5)
    assert r.status_code == 200, r.text
    return {int(s["version"]): s for s in r.json()["model_version_status"]}


def predict_request(model: str, text: list[str], x: list[float], **spec: Any) -> Any:
    tf = import_tensorflow()
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    for k, v in spec.items():
        if k == "version":
            request.model_spec.version.value = v
        else:
            setattr(request.model_spec, k, v)
    request.inputs["text"].CopyFrom(tf.make_tensor_proto(text))
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x, dtype=tf.float32))
    return request


# --- REST ---------------------------------------------------------------------------


def test_rest_status_by_model_and_version(server: Server):
    r = httpx.get(f"{server.rest}/v1/models/scorer")
    # latest { num_versions: 1 } is the default: version 2 serves, version 1 was never loaded.
    assert r.json() == {
        "model_version_status": [
            {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}
        ]
    }
    assert httpx.get(f"{server.rest}/v1/models/scorer/versions/2").json()["model_version_status"][0][
        "state"
    ] == ("AVAILABLE")
    r = httpx.get(f"{server.rest}/v1/models/scorer/versions/1")
    assert r.status_code == 404
    assert r.json() == {"error": "Could not find version 1 of model scorer"}
    r = httpx.get(f"{server.rest}/v1/models/nope")
    assert (r.status_code, r.json()) == (404, {"error": "Could not find any versions of model nope"})


def test_rest_metadata(server: Server):
    r = httpx.get(f"{server.rest}/v1/models/scorer/metadata")
    assert r.status_code == 200
    body = r.json()
    assert body["model_spec"] == {"name": "scorer", "signature_name": "", "version": "2"}
    sigs = body["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "other"} <= set(sigs)
    default = sigs["serving_default"]
    assert default["method_name"] == "tensorflow/serving/predict"
    assert default["inputs"]["text"]["dtype"] == "DT_STRING"
    assert default["inputs"]["x"]["tensor_shape"]["dim"] == [{"size": "-1", "name": ""}]
    assert set(default["outputs"]) == {"score", "echo"}
    r = httpx.get(f"{server.rest}/v1/models/scorer/versions/1/metadata")
    assert (r.status_code, r.json()) == (
        404,
        {"error": "Servable not found for request: Specific(scorer, 1)"},
    )


def test_rest_predict_row_and_columnar(server: Server):
    url = f"{server.rest}/v1/models/scorer:predict"
    r = httpx.post(url, json={"instances": [{"text": "abc", "x": 1.5}, {"text": "hé", "x": 0}]})
    assert r.status_code == 200, r.text
    # score = characters + x + bias (version 2)
    assert r.json() == {"predictions": [{"echo": "abc!", "score": 6.5}, {"echo": "hé!", "score": 4.0}]}
    r = httpx.post(url, json={"inputs": {"text": ["abc", {"b64": "eHk="}], "x": [0.25, 1]}})
    assert r.json() == {"outputs": {"echo": ["abc!", "xy!"], "score": [5.25, 5.0]}}


def test_rest_signature_name_version_and_label_urls(server: Server):
    body = {"signature_name": "other", "instances": [1.0, 2.0]}
    # One output: predictions are bare values.
    assert httpx.post(f"{server.rest}/v1/models/scorer:predict", json=body).json() == {
        "predictions": [4.0, 6.0]
    }
    r = httpx.post(
        f"{server.rest}/v1/models/pinned/versions/1:predict",
        json={"signature_name": "other", "inputs": [1.0]},
    )
    assert r.json() == {"outputs": [3.0]}
    r = httpx.post(f"{server.rest}/v1/models/scorer/versions/1:predict", json=body)
    assert (r.status_code, r.json()) == (
        404,
        {"error": "Servable not found for request: Specific(scorer, 1)"},
    )
    # An unknown label is INVALID_ARGUMENT in TF Serving (ServerCore::GetModelVersionForLabel), so 400.
    r = httpx.post(f"{server.rest}/v1/models/scorer/labels/nope:predict", json=body)
    assert (r.status_code, r.json()) == (400, {"error": "Unrecognized servable version label: nope"})


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"inputs": {"text": ["a"]}}, 400, "Missing named input: x in 'inputs' object."),
        ({"instances": [{"text": 3, "x": 1.0}]}, 400, "is not of expected type: string"),
        ({"instances": [{"text": "a", "x": "b"}]}, 400, "is not of expected type: float"),
        # Mismatched batch sizes reach the graph, which refuses them (INVALID_ARGUMENT).
        ({"inputs": {"text": ["a", "b"], "x": [1.0, 2.0, 3.0]}}, 400, "Incompatible shapes"),
        ({"signature_name": "nope", "inputs": [1.0]}, 400, 'Serving signature name: "nope" not found'),
        ({"instances": [1.0], "inputs": [1.0]}, 400, "expecting only one of 'inputs' or 'instances'"),
        ("{not json", 400, "JSON Parse error"),
    ],
)
def test_rest_errors(server: Server, body: Any, status: int, message: str):
    url = f"{server.rest}/v1/models/scorer:predict"
    r = httpx.post(url, content=body) if isinstance(body, str) else httpx.post(url, json=body)
    assert r.status_code == status, r.text
    assert list(r.json()) == ["error"]
    assert message in r.json()["error"]


def test_rest_unknown_model_and_bad_path(server: Server):
    r = httpx.post(f"{server.rest}/v1/models/nope:predict", json={"instances": [1.0]})
    assert (r.status_code, r.json()) == (404, {"error": "Servable not found for request: Latest(nope)"})
    r = httpx.get(f"{server.rest}/v1/modelz/scorer")
    assert (r.status_code, r.json()) == (400, {"error": "Malformed request: GET /v1/modelz/scorer"})


# --- gRPC ---------------------------------------------------------------------------


def test_grpc_predict_and_metadata(server: Server, stubs: tuple[Any, Any]):
    tf = import_tensorflow()
    from tensorflow_serving.apis import get_model_metadata_pb2

    prediction, _ = stubs
    response = prediction.Predict(predict_request("scorer", ["abc", "d"], [1.0, 2.0]), timeout=10)
    assert (response.model_spec.name, response.model_spec.version.value) == ("scorer", 2)
    assert response.model_spec.signature_name == "serving_default"
    assert tf.make_ndarray(response.outputs["score"]).tolist() == [6.0, 5.0]
    assert tf.make_ndarray(response.outputs["echo"]).tolist() == [b"abc!", b"d!"]

    response = prediction.Predict(predict_request("pinned", ["a"], [0.0], version=3), timeout=10)
    assert response.model_spec.version.value == 3
    assert tf.make_ndarray(response.outputs["score"]).tolist() == [4.0]

    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "scorer"
    meta = prediction.GetModelMetadata(request, timeout=10)
    assert meta.model_spec.version.value == 2
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    meta.metadata["signature_def"].Unpack(sig_map)
    assert set(sig_map.signature_def["other"].inputs) == {"x"}


def test_grpc_errors_carry_tf_serving_codes(server: Server, stubs: tuple[Any, Any]):
    import grpc

    tf = import_tensorflow()
    prediction, _ = stubs
    with pytest.raises(grpc.RpcError) as e:
        prediction.Predict(predict_request("nope", ["a"], [1.0]), timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND

    request = predict_request("scorer", ["a"], [1.0])
    del request.inputs["x"]
    with pytest.raises(grpc.RpcError) as e:
        prediction.Predict(request, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Missing but required: {x}" in e.value.details()

    request = predict_request("scorer", ["a"], [1.0])
    request.inputs["x"].CopyFrom(tf.make_tensor_proto([1], dtype=tf.int64))
    with pytest.raises(grpc.RpcError) as e:
        prediction.Predict(request, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "to be float but int64 is provided" in e.value.details()

    with pytest.raises(grpc.RpcError) as e:
        prediction.Predict(predict_request("scorer", ["a"], [1.0], signature_name="nope"), timeout=10)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    with pytest.raises(grpc.RpcError) as e:
        prediction.Predict(predict_request("scorer", ["a"], [1.0], version_label="nope"), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_grpc_model_status(server: Server, stubs: tuple[Any, Any]):
    import grpc
    from tensorflow_serving.apis import get_model_status_pb2

    _, models = stubs
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "pinned"
    response = models.GetModelStatus(request, timeout=10)
    # specific {1, 3}: version 2 is on disk but never aspired, so the server never saw it.
    rows = {
        s.version: get_model_status_pb2.ModelVersionStatus.State.Name(s.state)
        for s in response.model_version_status
    }
    assert rows == {3: "AVAILABLE", 1: "AVAILABLE"}
    request.model_spec.version.value = 2
    with pytest.raises(grpc.RpcError) as e:
        models.GetModelStatus(request, timeout=10)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


# --- versions, labels and reloads ----------------------------------------------------


def test_new_version_on_disk_replaces_the_old_without_restart(server: Server):
    assert status(server, "rolling")[1]["state"] == "AVAILABLE"
    build_scorer(server.base / "rolling" / "2", 2)
    # latest 1: version 2 loads, then version 1 unloads (END, status OK).
    wait_for(lambda: status(server, "rolling").get(1, {}).get("state") == "END")
    rows = status(server, "rolling")
    assert rows[2]["state"] == "AVAILABLE"
    assert rows[1]["status"] == {"error_code": "OK", "error_message": ""}
    r = httpx.post(
        f"{server.rest}/v1/models/rolling:predict", json={"signature_name": "other", "inputs": [0.0]}
    )
    assert r.json() == {"outputs": [2.0]}


def test_corrupt_version_is_reported_and_never_replaces_the_serving_one(server: Server):
    bad = server.base / "guarded" / ".tmp-2"
    bad.mkdir()
    (bad / "saved_model.pb").write_bytes(b"not a SavedModel")
    bad.rename(server.base / "guarded" / "2")
    wait_for(lambda: status(server, "guarded").get(2, {}).get("state") == "END")
    rows = status(server, "guarded")
    assert rows[2]["status"]["error_code"] == "DATA_LOSS"
    assert "saved_model.pb" in rows[2]["status"]["error_message"]
    assert rows[1]["state"] == "AVAILABLE"
    time.sleep(1.5)  # another poll: still version 1
    r = httpx.post(
        f"{server.rest}/v1/models/guarded:predict", json={"signature_name": "other", "inputs": [0.0]}
    )
    assert r.json() == {"outputs": [1.0]}


def test_moving_a_label_takes_load_then_label(server: Server, stubs: tuple[Any, Any]):
    import grpc
    from tensorflow_serving.apis import model_management_pb2

    from serving.model_server.config import parse_model_server_config

    _, models = stubs
    base = server.base

    def reload(canary_entry: str) -> Any:
        request = model_management_pb2.ReloadConfigRequest()
        request.config.CopyFrom(parse_model_server_config(base_config(base, canary_entry)))
        return models.HandleReloadConfigRequest(request, timeout=30)

    one = "model_version_policy { specific { versions: 1 } }"
    both = "model_version_policy { specific { versions: 1 versions: 2 } }"
    response = reload(model_entry("canary", base, one, {"stable": 1}))
    assert response.status.error_code == 0
    # Version 2 is on disk but not loaded: a label may not point at it yet.
    with pytest.raises(grpc.RpcError) as e:
        reload(model_entry("canary", base, one, {"stable": 1, "canary": 2}))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "Request to assign label to version 2 of model canary" in e.value.details()
    # First update: load version 2 ...
    reload(model_entry("canary", base, both, {"stable": 1}))
    wait_for(lambda: status(server, "canary").get(2, {}).get("state") == "AVAILABLE")
    # ... second update: point the label at it.
    reload(model_entry("canary", base, both, {"stable": 1, "canary": 2}))
    body = {"signature_name": "other", "inputs": [0.0]}
    assert httpx.post(f"{server.rest}/v1/models/canary/labels/canary:predict", json=body).json() == {
        "outputs": [2.0]
    }
    assert httpx.post(f"{server.rest}/v1/models/canary/labels/stable:predict", json=body).json() == {
        "outputs": [1.0]
    }
    r = httpx.get(f"{server.rest}/v1/models/canary/labels/canary/metadata")
    assert r.json()["model_spec"]["version"] == "2"
    # REST's predict answer names no version: the client calls the version the label resolves
    # to, so its answer does name the version that served (the canary's evidence needs it).
    from serving.clients import ModelServerClient

    with ModelServerClient(rest_url=server.rest, grpc_target=f"127.0.0.1:{server.grpc_port}") as c:
        for label, version in (("canary", 2), ("stable", 1)):
            out = c.predict("canary", {"x": [0.0]}, label=label, signature_name="other", transport="rest")
            assert (out.version, out.outputs["doubled"].tolist()) == (version, [float(version)])
    # TF Serving's status handler ignores the label and lists every version of the model.
    r = httpx.get(f"{server.rest}/v1/models/canary/labels/canary")
    assert [s["version"] for s in r.json()["model_version_status"]] == ["2", "1"]


def test_warmup_records_replayed_before_available(server: Server):
    assert status(server, "warm")[1]["state"] == "AVAILABLE"
    assert "Number of warmup records read: 3." in server.log.read_text()


def test_prometheus_metrics(server: Server):
    httpx.post(f"{server.rest}/v1/models/scorer:predict", json={"inputs": {"text": ["a"], "x": [1.0]}})
    httpx.post(f"{server.rest}/v1/models/scorer:predict", json={"inputs": {"text": ["a"]}})
    r = httpx.get(f"{server.rest}/monitoring/prometheus/metrics")
    assert r.status_code == 200
    text = r.text
    assert ':tensorflow:serving:request_count{model_name="scorer",status="OK"}' in text
    assert ':tensorflow:serving:request_count{model_name="scorer",status="INVALID_ARGUMENT"}' in text
    assert (
        ':tensorflow:serving:request_latency_bucket{model_name="scorer",API="predict",entrypoint="REST"'
        in text
    )
    assert ":tensorflow:serving:model_warmup_latency_count" in text
    assert (
        'model_server_requests_total{api="predict",code="OK",model="scorer",protocol="rest",'
        'signature="serving_default",version="2"}'
    ) in text
    assert 'model_server_request_latency_seconds_count{api="predict",model="scorer"' in text


def test_load_failures_are_counted(server: Server):
    wait_for(lambda: status(server, "guarded").get(2, {}).get("state") == "END", timeout=30)
    text = httpx.get(f"{server.rest}/monitoring/prometheus/metrics").text
    assert 'model_server_load_failures_total{code="DATA_LOSS",model="guarded",version="2"} 1.0' in text
    assert ':tensorflow:cc:saved_model:load_attempt_count{model_path="' in text and 'status="fail"' in text


# --- startup flags -------------------------------------------------------------------


def test_single_model_flags(server: Server, tmp_path: Path):
    rest = free_port()
    args = ["--port", str(free_port()), "--rest_api_port", str(rest), "--host", "127.0.0.1",
            "--model_name", "solo", "--model_base_path", str(server.base / "scorer"),
            "--tensorflow_intra_op_parallelism", "1", "--tensorflow_inter_op_parallelism", "2",
            "--grpc_max_threads", "3"]  # fmt: skip
    proc = start_model_server(args, tmp_path / "solo.log", rest, "solo")
    try:
        body = {"signature_name": "other", "inputs": [0.0]}
        assert httpx.post(f"http://127.0.0.1:{rest}/v1/models/solo:predict", json=body).json() == {
            "outputs": [2.0]
        }
        text = (tmp_path / "solo.log").read_text()
        assert "TensorFlow threads: intra-op 1, inter-op 2" in text
        assert re.search(r"Running gRPC ModelServer at 127\.0\.0\.1:\d+ \(3 threads\)", text), text[-2000:]
    finally:
        proc.stop()


def test_labels_at_startup_need_the_flag_and_config_file_polling(server: Server, tmp_path: Path):
    config = tmp_path / "models.config"
    config.write_text("model_config_list { " + model_entry("scorer", server.base, "", {"stable": 2}) + " }")
    rest = free_port()
    args = ["--port", str(free_port()), "--rest_api_port", str(rest), "--host", "127.0.0.1",
            "--model_config_file", str(config)]  # fmt: skip
    # Without the flag TF Serving refuses: labels are checked before any version has loaded.
    proc = start_model_server(args, tmp_path / "refused.log")
    assert proc.process.wait(timeout=60) != 0
    assert "Failed to start server" in (tmp_path / "refused.log").read_text()
    assert "not currently available for inference" in (tmp_path / "refused.log").read_text()
    args += [
        "--allow_version_labels_for_unavailable_models=true",
        "--model_config_file_poll_wait_seconds",
        "1",
    ]
    proc = start_model_server(args, tmp_path / "ok.log", rest, "scorer")
    try:
        url = f"http://127.0.0.1:{rest}/v1/models"
        r = httpx.post(
            f"{url}/scorer/labels/stable:predict", json={"signature_name": "other", "inputs": [0.0]}
        )
        assert r.json() == {"outputs": [2.0]}
        assert httpx.get(f"{url}/pinned").status_code == 404
        # With --model_config_file_poll_wait_seconds the file is re-read: a model added there
        # is served without a restart.
        pinned = model_entry(
            "pinned", server.base, "model_version_policy { specific { versions: 1 versions: 3 } }"
        )
        scorer = model_entry("scorer", server.base, "", {"stable": 2})
        config.write_text(f"model_config_list {{ {scorer} {pinned} }}")
        wait_for(lambda: httpx.get(f"{url}/pinned").status_code == 200)
        assert [s["version"] for s in httpx.get(f"{url}/pinned").json()["model_version_status"]] == ["3", "1"]
    finally:
        proc.stop()


def test_client_helper_against_the_server(server: Server):
    from serving.clients import ModelServerClient

    with ModelServerClient(
        rest_url=server.rest, grpc_target=f"127.0.0.1:{server.grpc_port}", timeout=10
    ) as c:
        for transport in ("rest", "grpc"):
            out = c.predict("scorer", {"text": ["abc"], "x": [1.0]}, transport=transport)
            # TF Serving's REST answer does not say which version served; gRPC's does.
            assert out.version == (2 if transport == "grpc" else None)
            assert out.outputs["score"].dtype == "float32" and out.outputs["score"].tolist() == [6.0]
            assert out.outputs["echo"].tolist() == ["abc!"]
            assert c.predict(
                "pinned", {"x": [0.0]}, version=1, signature_name="other", transport=transport
            ).outputs["doubled"].tolist() == [1.0]
        assert [s.state for s in c.status("scorer")] == ["AVAILABLE"]
        assert c.metadata("scorer")["serving_default"]["inputs"]["x"]["dtype"] == "DT_FLOAT"


def test_async_predict_answers_as_the_blocking_one_and_keeps_the_codes(server: Server):
    import asyncio

    from serving.clients import ModelServerClient, ModelServerError

    async def calls(c: ModelServerClient) -> tuple[list[Any], str]:
        # Side by side on one loop: the calls wait on grpc.aio, none holds a thread.
        answers = await asyncio.gather(
            *(c.predict_async("scorer", {"text": [f"t{i}"], "x": [float(i)]}) for i in range(8))
        )
        try:
            await c.predict_async("no-such-model", {"x": [1.0]})
        except ModelServerError as e:
            code = e.code
        else:
            code = "answered"
        await c.close_async_channel()
        return list(answers), code

    with ModelServerClient(grpc_target=f"127.0.0.1:{server.grpc_port}", timeout=10) as c:
        # Two loops in turn: each gets a channel of its own.
        for _ in range(2):
            answers, code = asyncio.run(calls(c))
            for i, out in enumerate(answers):
                same = c.predict("scorer", {"text": [f"t{i}"], "x": [float(i)]})
                assert out.version == same.version == 2
                assert out.outputs["score"].tolist() == same.outputs["score"].tolist()
                assert out.outputs["echo"].tolist() == [f"t{i}!"]
            assert code == "NOT_FOUND"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


def test_thread_flags_after_tensorflow_started_are_refused_not_ignored():
    from serving.model_server.errors import ServingError
    from serving.model_server.server import apply_tensorflow_threading

    tf = import_tensorflow()
    _ = tf.constant(1.0) + 1.0  # TensorFlow's pools are now fixed in this process
    before = tf.config.threading.get_intra_op_parallelism_threads()
    with pytest.raises(ServingError) as e:
        apply_tensorflow_threading(before + 3, 0)
    assert (
        e.value.code == "FAILED_PRECONDITION"
        and f"tensorflow_intra_op_parallelism={before + 3}" in e.value.message
    )
    apply_tensorflow_threading(0, 0)  # 0: TensorFlow's choice, nothing to set


def test_tensors_are_built_before_tensorflow_has_run_anything():
    # The servable builds input tensors without tf.constant; in a process where TensorFlow
    # has not run an op yet, that must still work (the eager context is set up first).
    code = (
        "import numpy as np, tensorflow as tf\n"
        "from serving.model_server.servable import _tensor_maker\n"
        "tensor = _tensor_maker()\n"
        "a = np.empty(2, dtype=object); a[:] = [b'x', b'yz']\n"
        "ones = np.ones(2, np.float32)\n"
        "print(tensor(a, tf.string).numpy().tolist(), tensor(ones, tf.float32).numpy().tolist())\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[b'x', b'yz'] [1.0, 1.0]"
