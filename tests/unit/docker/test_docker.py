"""docker/: the compose file fits the Compose specification, and the images run what the tests run.

No Docker engine runs here, so the checks are static but real: ``docker/compose.yaml`` is
validated against the Compose specification's JSON schema (vendored, see
``compose_spec/README.md``); the services, health checks and volumes that the production
profile (``conf/production.yaml``) relies on are present; and each image's ENTRYPOINT/CMD is
the command the integration tests start: ``entrypoints.airflow_local``'s entry point for
Airflow (tests/integration/entrypoints/test_airflow_postgres.py), ``recsys serve gateway`` for the
gateway (tests/integration/serving/test_production_gateway.py), and TF Serving flags that the
stand-in model server (``recsys serve model-server``) accepts. TF Serving is the stock image at
the exact ``tensorflow==`` pin of ``constraints.txt`` (a SavedModel is served by the TensorFlow
that exported it); the ScaNN-ops build is an optional variant with the same command.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from entrypoints.airflow_local import CELERY_WORKER, COMPONENTS, ENTRYPOINT
from recsys.config import ConfigError, default_config_path, load_settings
from recsys.layout import CONF_DIR
from tests.support.airflow_env import airflow_entrypoint
from tests.support.paths import REPO
from tests.support.servers import GATEWAY_COMMAND

DOCKER = REPO / "docker"
TF_SERVING = DOCKER / "tf-serving" / "Dockerfile"
SCANN_SERVING = DOCKER / "tf-serving" / "scann.Dockerfile"
SCHEMA = Path(__file__).parent / "compose_spec" / "compose_spec.json"
# Compose durations are Go's ("10s", "1m30s"), not ISO 8601: the format Compose itself checks.
DURATION = re.compile(r"(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+")
AIRFLOW_COMMANDS = [*(c.split() for c in (*COMPONENTS, CELERY_WORKER)), ["db", "migrate"]]
# ${NAME}, ${NAME:-default} or ${NAME-default}: Dockerfile ARGs and Compose's interpolation.
VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def validate(doc: dict[str, Any]) -> list[str]:
    checker = jsonschema.FormatChecker()
    checker.checks("duration")(lambda v: not isinstance(v, str) or DURATION.fullmatch(v) is not None)
    validator = jsonschema.Draft201909Validator(json.loads(SCHEMA.read_text()), format_checker=checker)
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)]


def instructions(dockerfile: Path, text: str | None = None) -> dict[str, Any]:
    """The last ENTRYPOINT and CMD (exec form, JSON), every COPY source, the ARG defaults and
    the FROM images (as written) of a Dockerfile, or of ``text`` in its place."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text() if text is None else text)
    out: dict[str, Any] = {"COPY": [], "ARG": {}, "FROM": []}
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word in ("ENTRYPOINT", "CMD"):
            out[word] = json.loads(rest)
        elif word == "COPY":
            out["COPY"] += [p for p in rest.split()[:-1] if not p.startswith("--")]
        elif word == "ARG":
            name, _, default = rest.strip().partition("=")
            out["ARG"][name] = default.strip("\"'")
        elif word == "FROM":
            out["FROM"] += [p for p in rest.split() if not p.startswith("--")][:1]
    return out


def base_images(image: dict[str, Any], build_args: dict[str, str] | None = None) -> list[str]:
    """The FROM images a build of ``image`` pulls: its ARG defaults, overridden by ``build_args``."""
    args = {**image["ARG"], **(build_args or {})}
    return [VARIABLE.sub(lambda m: args.get(m[1]) or m[2] or "", f) for f in image["FROM"]]


def interpolated(value: str) -> str:
    """A compose value as Compose fills it in with none of its variables set."""
    return VARIABLE.sub(lambda m: m[2] or "", value)


def tensorflow_pin(constraints: str) -> str:
    """The version of ``tensorflow==`` in constraints.txt's text (not tensorflow-*)."""
    (pin,) = re.findall(r"^tensorflow==([^\s;#]+)", constraints, re.MULTILINE)
    return str(pin)


def tf_serving_pin_errors(image: dict[str, Any], service: dict[str, Any], pin: str) -> list[str]:
    """Where the tf-serving service, or its Dockerfile built alone, runs anything but the stock
    ``tensorflow/serving:<pin>``."""
    expected = [f"tensorflow/serving:{pin}"]
    build_args = {name: interpolated(str(v)) for name, v in service["build"].get("args", {}).items()}
    errors = []
    if base_images(image) != expected:
        errors.append(f"the Dockerfile's FROM is {base_images(image)}, not {expected}")
    if base_images(image, build_args) != expected:
        errors.append(f"compose builds FROM {base_images(image, build_args)}, not {expected}")
    tag = interpolated(service["image"]).rpartition(":")[2]
    if tag != pin:
        errors.append(f"compose tags the image {tag!r}, not {pin!r}")
    return errors


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    assert validate(compose()) == []


def test_the_schema_check_bites() -> None:
    doc = compose()
    broken = copy.deepcopy(doc)
    broken["services"]["redis"]["healthcheck"]["interval"] = "ten seconds"
    broken["services"]["gateway"]["volume"] = ["models:/models"]  # a misspelt key
    errors = validate(broken)
    assert any("interval" in e for e in errors) and any("volume" in e for e in errors)


def test_every_part_of_the_production_shape_is_a_service_with_a_health_check() -> None:
    services = compose()["services"]
    expected = {
        "postgres", "redis", "airflow-init", "airflow-api-server", "airflow-scheduler",
        "airflow-dag-processor", "airflow-worker", "tf-serving", "gateway", "redis-events",
    }  # fmt: skip
    assert expected <= set(services)
    for name, svc in services.items():
        if name != "airflow-init":  # a one-shot migration: "completed successfully" is its check
            assert svc.get("healthcheck", {}).get("test"), f"{name} has no health check"
    # The event log's durability promise rests on the broker fsyncing every write.
    redis_cmd = services["redis-events"]["command"][-1]
    assert "--appendonly yes" in redis_cmd and "--appendfsync always" in redis_cmd


def test_model_base_path_and_home_are_shared_volumes_where_the_profile_expects_them() -> None:
    doc = compose()
    profile = load_settings(CONF_DIR / "production.yaml")
    models, home = str(profile.models_dir), str(profile.home)

    def mounts(service: str) -> dict[str, str]:
        out = {}
        for v in doc["services"][service].get("volumes", []):
            if isinstance(v, dict):  # long syntax: a tmpfs has no source
                out[v["target"]] = v.get("source", v["type"])
                continue
            source, target, *_ = v.split(":")
            out[target] = source
        return out

    for svc in ("airflow-worker", "airflow-scheduler", "tf-serving", "gateway"):
        assert mounts(svc).get(models) == "models", f"{svc} does not mount the models volume at {models}"
    for svc in ("airflow-worker", "airflow-scheduler", "airflow-dag-processor", "gateway"):
        assert mounts(svc).get(home) == "recsys-home", f"{svc} does not mount the home volume at {home}"
    assert {"models", "recsys-home", "postgres-data", "redis-data"} <= set(doc["volumes"])
    flags = dict(f.split("=", 1) for f in doc["services"]["tf-serving"]["command"])
    assert flags["--model_config_file"] == f"{models}/models.config"
    # The gateway finds TF Serving by the service name and ports the profile names.
    assert profile.gateway.model_server_host == "tf-serving"
    assert flags["--port"] == str(profile.gateway.model_server_grpc_port)
    assert flags["--rest_api_port"] == str(profile.gateway.model_server_rest_port)


def test_airflow_image_runs_the_entry_point_the_tests_start_airflow_with() -> None:
    image = instructions(DOCKER / "Dockerfile")
    assert image["ENTRYPOINT"] == list(ENTRYPOINT)
    assert airflow_entrypoint("db", "migrate")[1:] == [*ENTRYPOINT[1:], "db", "migrate"]
    assert image["CMD"] in AIRFLOW_COMMANDS
    services = compose()["services"]
    for name, svc in services.items():
        if name.startswith("airflow-"):
            assert svc["image"] == "recsys:latest" and svc["build"]["dockerfile"] == "docker/Dockerfile"
            assert svc["command"] in AIRFLOW_COMMANDS, f"{name}: {svc['command']}"


def test_gateway_image_runs_the_command_the_production_gateway_test_runs() -> None:
    image = instructions(DOCKER / "gateway.Dockerfile")
    argv = image["ENTRYPOINT"] + image["CMD"]
    assert argv[: len(GATEWAY_COMMAND)] == GATEWAY_COMMAND
    assert argv[argv.index("--port") + 1] == "8080"
    assert compose()["services"]["gateway"]["environment"]["RECSYS_PROFILE"] == "production"


def test_tf_serving_flags_are_ones_the_stand_in_model_server_accepts() -> None:
    import typer.main

    from entrypoints.cli import app

    cli = typer.main.get_command(app)
    model_server = cli.commands["serve"].commands["model-server"]
    known = {opt for p in model_server.params for opt in p.opts}
    image = instructions(TF_SERVING)
    flags = compose()["services"]["tf-serving"]["command"] + image["CMD"]
    unknown = [f for f in flags if f.split("=", 1)[0] not in known]
    assert unknown == []
    assert image["ENTRYPOINT"] == ["/usr/bin/tensorflow_model_server"]


def test_tf_serving_is_the_stock_image_at_the_tensorflow_that_exports_the_models() -> None:
    pin = tensorflow_pin((REPO / "constraints.txt").read_text())
    service = compose()["services"]["tf-serving"]
    image = instructions(TF_SERVING)
    assert service["build"]["dockerfile"] == "docker/tf-serving/Dockerfile"
    assert tf_serving_pin_errors(image, service, pin) == []
    assert not any("latest" in i for i in (*base_images(image), service["image"]))
    # docker/.env fills compose's variables: the example leaves the tag to compose.yaml.
    lines = (DOCKER / ".env.example").read_text().splitlines()
    example = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    assert example.get("TF_SERVING_TAG", pin) == pin


def test_the_tf_serving_pin_check_bites() -> None:
    constraints = (REPO / "constraints.txt").read_text()
    pin = tensorflow_pin(constraints)
    service = compose()["services"]["tf-serving"]
    text = TF_SERVING.read_text()
    image = instructions(TF_SERVING)
    for wrong in ("ARG TF_SERVING_TAG=2.19.0", "ARG TF_SERVING_TAG=latest"):
        changed = instructions(TF_SERVING, text.replace(f"ARG TF_SERVING_TAG={pin}", wrong))
        assert [e for e in tf_serving_pin_errors(changed, service, pin) if "Dockerfile's FROM" in e]
    scann_base = text.replace("FROM tensorflow/serving:", "FROM google/tf-serving-scann:")
    other_base = instructions(TF_SERVING, scann_base)
    assert len(tf_serving_pin_errors(other_base, service, pin)) == 2
    moved = copy.deepcopy(service)
    moved["build"]["args"]["TF_SERVING_TAG"] = "${TF_SERVING_TAG:-latest}"
    (error,) = tf_serving_pin_errors(image, moved, pin)
    assert error.startswith("compose builds FROM ['tensorflow/serving:latest']")
    moved = copy.deepcopy(service)
    moved["image"] = "recsys-tf-serving:latest"
    (error,) = tf_serving_pin_errors(image, moved, pin)
    assert "tags the image 'latest'" in error
    # constraints.txt moving to another TensorFlow without the images.
    bumped = tensorflow_pin(constraints.replace(f"\ntensorflow=={pin}\n", "\ntensorflow==2.99.0\n"))
    assert bumped == "2.99.0" and len(tf_serving_pin_errors(image, service, bumped)) == 3


def test_scann_serving_is_an_optional_variant_with_the_stock_command() -> None:
    pin = tensorflow_pin((REPO / "constraints.txt").read_text())
    builds = {svc["build"]["dockerfile"] for svc in compose()["services"].values() if "build" in svc}
    assert SCANN_SERVING.is_file() and "docker/tf-serving/scann.Dockerfile" not in builds
    stock, scann = instructions(TF_SERVING), instructions(SCANN_SERVING)
    # Swapping the two changes only the base.
    for word in ("ENTRYPOINT", "CMD", "COPY"):
        assert scann[word] == stock[word], word
    # A ScaNN build at the same TensorFlow: never the stock image (no ScaNN ops), never a moving tag.
    (base,) = base_images(scann)
    assert base.rpartition(":")[2] == pin and not base.startswith("tensorflow/serving:")
    # The server that a scann_ops export names in its requirements.json is that build.
    for path in (None, CONF_DIR / "recsys.yaml", CONF_DIR / "production.yaml"):
        assert load_settings(path).push.scann_server_image.rpartition(":")[2] == pin, path


def test_dockerfiles_copy_only_what_exists() -> None:
    dockerfiles = (DOCKER / "Dockerfile", DOCKER / "gateway.Dockerfile", TF_SERVING, SCANN_SERVING)
    for dockerfile in dockerfiles:
        for source in instructions(dockerfile)["COPY"]:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY {source} does not exist"


def test_production_profile_selects_every_production_twin() -> None:
    path = default_config_path({"RECSYS_PROFILE": "production"}, cwd=REPO)
    assert path == CONF_DIR / "production.yaml"
    s = load_settings(path, env={"RECSYS_PROFILE": "production"})
    assert s.features.online_store == "redis"
    assert s.airflow.executor in ("CeleryExecutor", "KubernetesExecutor")
    assert s.airflow.database_url.startswith("postgresql") and s.airflow.celery_broker_url.startswith("redis://")
    assert s.gateway.event_log_backend == "redis_streams" and s.gateway.event_log_require_fsync
    assert s.models_dir == Path("/models") and s.gateway.model_server_host == "tf-serving"
    # Secrets come from the environment: no URL in the profile carries a password.
    urls = (s.airflow.database_url, s.airflow.celery_result_backend, s.gateway.event_log_redis_url)
    assert all(urlsplit(u).password is None for u in urls)


def test_unknown_profile_and_bad_airflow_section_are_refused_by_name() -> None:
    with pytest.raises(ConfigError, match=r"RECSYS_PROFILE='prod'.*profiles: .*production"):
        default_config_path({"RECSYS_PROFILE": "prod"}, cwd=REPO)
    with pytest.raises(ConfigError, match="celery_broker_url"):
        load_settings(
            overrides={"airflow.executor": "CeleryExecutor", "airflow.database_url": "postgresql://h/db"}
        )
    with pytest.raises(ConfigError, match="database_url on PostgreSQL"):
        load_settings(overrides={"airflow.executor": "KubernetesExecutor"})
