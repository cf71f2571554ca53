"""The pure parts of the model server: models.config parsing and validation, version policies,
the version folders a base path holds, and REST JSON <-> tensor conversion.

Expected values follow TF Serving: e.g. an unset policy serves the single highest version,
and a folder named ``tmp`` or ``3.bak`` is not a version.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from serving.model_server import config as cfg
from serving.model_server.errors import ServingError
from serving.model_server.tensors import (
    COLUMNAR,
    DT_FLOAT,
    DT_INT32,
    DT_STRING,
    ROW,
    json_from_tensors,
    parse_predict_body,
    tensors_from_json,
)

CONFIG = """
model_config_list {
  config {
    name: "ranking"
    base_path: "/models/ranking"
    model_platform: "tensorflow"
    model_version_policy { specific { versions: 3 versions: 4 } }
    version_labels { key: "stable" value: 3 }
    version_labels { key: "canary" value: 4 }
  }
  config {
    name: "retrieval"
    base_path: "/models/retrieval"
    model_platform: "tensorflow"
  }
}
"""


def _model(policy: str = "") -> cfg.ModelConfig:
    entry = f'name: "m" base_path: "/m" model_platform: "tensorflow" {policy}'
    text = f"model_config_list {{ config {{ {entry} }} }}"
    return cfg.parse_model_server_config(text).model_config_list.config[0]


def test_parse_reads_models_policies_and_labels():
    config = cfg.parse_model_server_config(CONFIG)
    ranking, retrieval = config.model_config_list.config
    assert (ranking.name, ranking.base_path) == ("ranking", "/models/ranking")
    assert cfg.policy_name(ranking) == "specific"
    assert list(ranking.model_version_policy.specific.versions) == [3, 4]
    assert cfg.version_labels(ranking) == {"stable": 3, "canary": 4}
    # No policy given: TF Serving's default, latest with one version.
    assert cfg.policy_name(retrieval) == "latest"
    cfg.validate_model_server_config(config)


def test_config_text_round_trips():
    config = cfg.parse_model_server_config(CONFIG)
    assert cfg.parse_model_server_config(cfg.config_to_text(config)) == config


def test_bad_text_is_invalid_argument_naming_the_file():
    with pytest.raises(ServingError) as e:
        cfg.parse_model_server_config("model_config_list { config { nme: 1 } }", "/etc/models.config")
    assert e.value.code == "INVALID_ARGUMENT"
    assert "Invalid protobuf file: '/etc/models.config'" in e.value.message


def test_single_model_flags_make_a_one_model_config():
    config = cfg.single_model_config("default", "/models/default")
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == ("default", "/models/default", "tensorflow")
    assert cfg.policy_name(model) == "latest"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'config { name: "a" base_path: "/a" model_platform: "tensorflow" } '
            'config { name: "a" base_path: "/b" model_platform: "tensorflow" }',
            "Illegal to list model a multiple times in config list",
        ),
        (
            'config { name: "a" base_path: "models/a" model_platform: "tensorflow" }',
            "Expected model a to have an absolute path or URI; got base_path()=models/a",
        ),
        ('config { name: "a" base_path: "/a" }', "Illegal setting neither ModelServerConfig::model_type"),
        ('config { name: "a" base_path: "/a" model_platform: "pytorch" }', "unsupported platform pytorch"),
    ],
)
def test_validation_refuses_what_tf_serving_refuses(text: str, message: str):
    config = cfg.parse_model_server_config(f"model_config_list {{ {text} }}")
    with pytest.raises(ServingError) as e:
        cfg.validate_model_server_config(config)
    assert e.value.code == "INVALID_ARGUMENT"
    assert message in e.value.message


def test_a_uri_base_path_is_not_relative():
    config = cfg.parse_model_server_config(
        'model_config_list { config { name: "a" base_path: "gs://bucket/a" model_platform: "tensorflow" } }'
    )
    cfg.validate_model_server_config(config)


def test_only_model_config_lists_are_accepted():
    config = cfg.parse_model_server_config('custom_model_config { type_url: "x" }')
    with pytest.raises(ServingError) as e:
        cfg.validate_model_server_config(config)
    assert e.value.code == "FAILED_PRECONDITION"


@pytest.mark.parametrize(
    ("policy", "on_disk", "expected"),
    [
        ("", [1, 2, 3], [3]),  # default: latest 1
        ("model_version_policy { latest { num_versions: 2 } }", [1, 3, 2], [3, 2]),
        ("model_version_policy { latest { num_versions: 0 } }", [1, 2], [2]),  # below 1 counts as 1
        ("model_version_policy { latest { num_versions: 5 } }", [1, 2], [2, 1]),
        # Listed versions that are not on disk are simply not served (yet).
        ("model_version_policy { specific { versions: 1 versions: 4 } }", [1, 2, 3], [1]),
        ("model_version_policy { all {} }", [2, 10, 1], [10, 2, 1]),
        ("", [], []),
    ],
)
def test_aspired_versions(policy: str, on_disk: list[int], expected: list[int]):
    assert cfg.aspired_versions(_model(policy), on_disk) == expected


def _version(base: Path, name: str, complete: bool = True) -> None:
    (base / name).mkdir(parents=True)
    if complete:
        (base / name / "saved_model.pb").write_bytes(b"")


def test_list_versions_reads_integer_folders_with_a_saved_model(tmp_path: Path):
    _version(tmp_path, "1")
    _version(tmp_path, "0012")  # parsed as an integer: version 12
    _version(tmp_path, "tmp")  # not a number: ignored
    _version(tmp_path, "3.bak")
    _version(tmp_path, "4", complete=False)  # still being written: saved_model.pb comes last
    (tmp_path / "5").write_text("a file, not a folder")
    assert sorted(cfg.list_versions(tmp_path)) == [1, 12]
    assert cfg.list_versions(tmp_path)[12] == tmp_path / "0012"


def test_a_missing_base_path_has_no_versions(tmp_path: Path):
    assert cfg.list_versions(tmp_path / "nope") == {}


# --- REST JSON, as TF Serving's json_tensor.cc converts it ---------------------------

INPUTS = {"text": DT_STRING, "x": DT_FLOAT}


def _parse(body: object, inputs: dict[str, int] = INPUTS) -> tuple[str, dict[str, np.ndarray]]:
    return tensors_from_json(parse_predict_body(json.dumps(body).encode()), inputs, "")


def test_row_format_batches_instances():
    fmt, t = _parse({"instances": [{"text": "a", "x": 1}, {"text": "bc", "x": 2.5}]})
    assert fmt == ROW
    assert t["text"].tolist() == [b"a", b"bc"]
    assert t["x"].dtype == np.float32 and t["x"].tolist() == [1.0, 2.5]


def test_columnar_format_takes_whole_tensors_and_b64():
    fmt, t = _parse({"inputs": {"text": [{"b64": "aGk="}], "x": [[1.0]]}})
    assert fmt == COLUMNAR
    assert t["text"].tolist() == [b"hi"]
    assert t["x"].shape == (1, 1)


@pytest.mark.parametrize(
    ("body", "inputs", "message"),
    [
        ({"inputs": {"text": ["a"]}}, INPUTS, "Missing named input: x in 'inputs' object."),
        ({"instances": [{"text": "a"}]}, INPUTS, "keys must be equal to: text,x"),
        ({"instances": [1.5]}, {"n": DT_INT32}, "is not of expected type: int32"),
        ({"instances": ["a", "b"]}, INPUTS, "instances is a plain list"),
        ({"inputs": [[1.0], [2.0, 3.0]]}, {"x": DT_FLOAT}, "Encountered list at unexpected size"),
        ({"instances": []}, INPUTS, "No values in 'instances' array"),
        ({"foo": 1}, INPUTS, "Missing 'inputs' or 'instances' key"),
        ({"inputs": [16777217]}, {"x": DT_FLOAT}, "without loss of precision"),
    ],
)
def test_bad_json_is_invalid_argument(body: object, inputs: dict[str, int], message: str):
    with pytest.raises(ServingError) as e:
        _parse(body, inputs)
    assert e.value.code == "INVALID_ARGUMENT"
    assert message in e.value.message


def test_answers_use_the_request_format():
    outputs = {"score": np.array([0.1, 2.0], dtype=np.float32), "id": np.array([b"a", b"b"], dtype=object)}
    # float32 0.1 is written as 0.1, not 0.10000000149011612.
    assert json_from_tensors(outputs, ROW) == {
        "predictions": [{"id": "a", "score": 0.1}, {"id": "b", "score": 2.0}]
    }
    assert json_from_tensors(outputs, COLUMNAR) == {"outputs": {"id": ["a", "b"], "score": [0.1, 2.0]}}
    # One output: bare values, no object around them.
    assert json_from_tensors({"y": outputs["score"]}, ROW) == {"predictions": [0.1, 2.0]}
    # Binary outputs (named *_bytes) travel as base64.
    assert json_from_tensors({"img_bytes": np.array([b"hi"], dtype=object)}, COLUMNAR) == {
        "outputs": [{"b64": "aGk="}]
    }


def test_row_answers_need_one_batch_size():
    with pytest.raises(ServingError, match="inconsistent batch size"):
        json_from_tensors({"a": np.zeros(2), "b": np.zeros(3)}, ROW)
