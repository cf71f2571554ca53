"""docker/compose.yaml closes the control plane: each check reads the compose file (and the
production profile) and names what is open.

- the gateway gets its API key and its admin key as two Compose secrets, the profile names an
  admin key variable apart from the API key's;
- nothing is published on all interfaces but the gateway (Airflow's UI on loopback; Redis,
  PostgreSQL and TF Serving not published at all);
- every Redis has a password and a ``maxmemory``; the event log's Redis is not the feature
  store's (nor the broker's);
- the gateway gets neither Airflow's database URL nor its secrets folder (<home>/airflow);
- Airflow runs the FAB auth manager, not the simple one;
- one way label changes reach TF Serving: the gateway's reload call, never the server polling
  ``models.config`` (the compose file says so where TF Serving is defined, the README too).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import yaml

from recsys.config import load_settings
from recsys.layout import CONF_DIR
from tests.support.paths import REPO

COMPOSE = REPO / "docker" / "compose.yaml"
FAB = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    return dict(e.split("=", 1) for e in env) if isinstance(env, list) else dict(env)


def _host_of(url_var: str) -> str:
    # "redis://:${PASS:?..}@redis-events:6379/0" -> "redis-events" (Compose interpolates later)
    return url_var.rsplit("@", 1)[-1].split(":")[0].split(",")[0]


def test_the_gateway_gets_its_api_key_and_admin_key_as_separate_secrets() -> None:
    doc = _compose()
    gateway = doc["services"]["gateway"]
    assert set(gateway.get("secrets", [])) >= {"recsys_api_key", "recsys_admin_key"}
    assert {"recsys_api_key", "recsys_admin_key"} <= set(doc.get("secrets", {}))
    env = _environment(gateway)
    assert env["RECSYS_API_KEY_FILE"] == "/run/secrets/recsys_api_key"
    assert env["RECSYS_ADMIN_KEY_FILE"] == "/run/secrets/recsys_admin_key"
    assert "RECSYS_API_KEY" not in env and "RECSYS_ADMIN_KEY" not in env  # no key in plain sight
    profile = load_settings(CONF_DIR / "production.yaml")
    admin = env.get("RECSYS_SECURITY__ADMIN_KEY_ENV", profile.security.admin_key_env)
    assert admin and admin != profile.security.api_key_env


def test_only_the_gateway_is_published_beyond_loopback() -> None:
    for name, service in _compose()["services"].items():
        for port in service.get("ports", []):
            spec = str(port)
            if name == "gateway":
                assert spec.startswith("${GATEWAY_BIND"), f"gateway: {spec} binds no configured interface"
                continue
            assert spec.startswith("127.0.0.1:"), f"{name} publishes {spec} beyond loopback"
    for name in ("redis", "redis-events", "postgres", "tf-serving"):
        assert not _compose()["services"][name].get("ports"), f"{name} is published"


def test_every_redis_has_a_password_and_a_memory_bound() -> None:
    redises = {n: s for n, s in _compose()["services"].items() if str(s.get("image", "")).startswith("redis")}
    assert {"redis", "redis-events"} <= set(redises)
    for name, service in redises.items():
        command = " ".join(service["command"])
        assert "--requirepass" in command, f"{name} has no password"
        assert "--maxmemory " in command and "--maxmemory-policy noeviction" in command, name
        assert "REDIS_PASSWORD:?" in _environment(service)["REDIS_PASSWORD"], f"{name}: password not required"


def test_the_event_log_redis_is_apart_from_the_feature_store_and_broker() -> None:
    services = _compose()["services"]
    env = _environment(services["gateway"])
    events = _host_of(env["RECSYS_GATEWAY__EVENT_LOG_REDIS_URL"])
    features = _host_of(env["RECSYS_FEATURES__REDIS_CONNECTION_STRING"])
    broker = _host_of(_environment(services["airflow-worker"])["RECSYS_AIRFLOW__CELERY_BROKER_URL"])
    assert events == "redis-events" and events not in (features, broker)
    assert "--appendfsync always" in " ".join(services[events]["command"])
    profile = load_settings(CONF_DIR / "production.yaml")
    assert urlsplit(profile.gateway.event_log_redis_url).hostname == events


def test_the_gateway_gets_no_airflow_secret() -> None:
    gateway = _compose()["services"]["gateway"]
    env = _environment(gateway)
    leaked = [k for k, v in env.items() if k.startswith(("AIRFLOW", "RECSYS_AIRFLOW")) or "POSTGRES" in v]
    assert leaked == [], f"the gateway gets Airflow's settings: {leaked}"
    home = str(load_settings(CONF_DIR / "production.yaml").home)
    # <home>/airflow holds Airflow's generated JWT and session secrets: shadowed by an empty tmpfs.
    hidden = [v for v in gateway["volumes"] if isinstance(v, dict) and v.get("type") == "tmpfs"]
    assert any(v["target"] == f"{home}/airflow" for v in hidden), "the gateway can read <home>/airflow"


def test_airflow_runs_the_fab_auth_manager() -> None:
    for name, service in _compose()["services"].items():
        if name.startswith("airflow-"):
            env = _environment(service)
            assert env.get("AIRFLOW__CORE__AUTH_MANAGER") == FAB, (
                f"{name}: {env.get('AIRFLOW__CORE__AUTH_MANAGER')}"
            )
            assert not any(k.startswith("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER") for k in env), name


def test_tf_serving_learns_of_label_changes_only_from_the_gateway() -> None:
    command = _compose()["services"]["tf-serving"]["command"]
    flags = dict(f.split("=", 1) if "=" in f else (f, "") for f in command)
    # TF Serving's default is 0 (read once at start); with polling on, each poll would apply
    # models.config unchecked and override the gateway's refusal of a broken canary.
    assert flags.get("--model_config_file_poll_wait_seconds", "0") == "0", command
    assert flags["--model_config_file"] == "/models/models.config"
    gateway = _compose()["services"]["gateway"]
    # The gateway applies models.config and puts back refused labels: it needs the volume writable.
    assert "models:/models" in gateway["volumes"], gateway["volumes"]
    text = COMPOSE.read_text()
    definition = text[: text.index("\n  tf-serving:")].rsplit("\n\n", 1)[-1]
    assert "HandleReloadConfigRequest" in definition and "gateway" in definition, definition
    # The docs tell the same: no model server started with polling on, and the mechanism named.
    docs = [REPO / "README.md", REPO / "RELIABILITY.md", *sorted((REPO / "docs").glob("*.md"))]
    for doc in docs:
        polling = re.search(r"model_config_file_poll_wait_seconds[= ]+[1-9]", doc.read_text())
        assert polling is None, f"{doc.name} runs a model server that polls models.config: {polling}"
    assert "serving/gateway/config_sync.py" in (REPO / "README.md").read_text()
