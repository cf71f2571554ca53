"""The model server and the gateway as the integration tests run them.

Starting, waiting for and stopping the processes is ``entrypoints.local_servers``, the code
``make demo`` and ``bench.serving`` use too. Here are what the tests add to it: their
gateway settings and API key, their timeouts, a server that does not come up reported as a
test failure (with the end of its log), and a gateway in this process for settings a
subprocess cannot be given.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from entrypoints import local_servers
from entrypoints.local_servers import (
    GATEWAY_SUBCOMMAND,
    LOOPBACK,
    LocalServer,
    LocalServing,
    ServerNotReady,
    ServingPorts,
    free_port,
    model_server_variables,
    model_status_url,
    server_environment,
    setting_variables,
    tf_serving_flags,
)
from recsys.config import Settings
from recsys.model_registry import MODELS_CONFIG

# What docker/gateway.Dockerfile runs (ENTRYPOINT + CMD, less the bind address and port):
# ``start_gateway`` runs the same command.
GATEWAY_COMMAND = ["recsys", *GATEWAY_SUBCOMMAND]
# The test gateways' API key (events and admin need it), given through the environment only.
API_KEY = "test-key-6f1c2b9e"
AUTH = {"X-API-Key": API_KEY}
FRACTIONS = {"canary": 0.2, "holdout": 0.1}
# The test gateways' settings beyond the defaults (passed to a subprocess as RECSYS_*).
GATEWAY_SETTINGS: dict[str, Any] = {
    "gateway.arm_fractions": FRACTIONS,
    # Exploration picks only never-shown items, i.e. the two new ones: deterministic enough to test.
    "gateway.new_item_days": 0,
    "gateway.exclude_out_of_stock": True,
    "gateway.refresh_seconds": 1.0,
}
MODEL_SERVER_READY_S = 90.0
GATEWAY_READY_S = 120.0


def gateway_env(home: Path, ports: ServingPorts | None = None) -> dict[str, str]:
    """A test gateway's environment: its home, the API key and ``GATEWAY_SETTINGS``, and the
    model server's ports when given (``serving`` adds those itself)."""
    env = {
        **server_environment(),
        "RECSYS_HOME": str(home),
        "RECSYS_API_KEY": API_KEY,
        **setting_variables(GATEWAY_SETTINGS),
    }
    if ports is not None:
        env.update(model_server_variables(ports.grpc, ports.rest))
    return env


def scann_model_server_flags(settings: Settings) -> list[str]:
    """Flags beyond the ports for a model server on the home's models.config with ScaNN's ops,
    as a ScaNN build of TF Serving serves a ``scann_ops`` retrieval model."""
    return tf_serving_flags(
        host=LOOPBACK,
        model_config_file=settings.models_dir / MODELS_CONFIG,
        allow_version_labels_for_unavailable_models=True,
        custom_op_modules="scann.scann_ops",
        # A version that fails to load ends at once; TF Serving's default retries for 5 minutes.
        max_num_load_retries=0,
        file_system_poll_wait_seconds=1,
    )


@contextmanager
def serving(
    model_server_flags: Sequence[str],
    logs: Path,
    env: Mapping[str, str],
    ports: ServingPorts | None = None,
) -> Iterator[LocalServing]:
    """A model server serving ``retrieval`` and a gateway on it, logs in ``logs``; a server
    that exits or does not answer in time fails the test."""
    try:
        with local_servers.local_serving(
            model_server_flags,
            logs,
            ready_model="retrieval",
            env=env,
            ports=ports,
            model_server_timeout_s=MODEL_SERVER_READY_S,
            gateway_timeout_s=GATEWAY_READY_S,
        ) as running:
            yield running
    except ServerNotReady as e:
        pytest.fail(str(e))


def start_model_server(
    flags: Sequence[str], log: Path, rest_port: int | None = None, ready_model: str | None = None
) -> LocalServer:
    """``recsys serve model-server`` with ``flags``; with ``ready_model``, waits until REST
    answers for it (a test failure otherwise); without, returns at once."""
    server = local_servers.start_model_server(flags, log)
    if ready_model is not None:
        assert rest_port is not None, "waiting for a model needs the REST port"
        try:
            server.wait_until_answers(model_status_url(rest_port, ready_model), MODEL_SERVER_READY_S)
        except ServerNotReady as e:
            server.stop()
            pytest.fail(str(e))
    return server


def start_gateway(env: Mapping[str, str], port: int, log: Path, log_mode: str = "wb") -> LocalServer:
    """``recsys serve gateway`` on loopback ``port``; does not wait (``wait_gateway_ready``)."""
    return local_servers.start_gateway(port, log, env, log_mode=log_mode)


def wait_gateway_ready(
    url: str, server: LocalServer | None = None, timeout_s: float = GATEWAY_READY_S
) -> None:
    """Wait until ``url``/readyz answers 200; a test failure if ``server`` exits first or time runs out."""
    try:
        local_servers.wait_until_answers(f"{url}/readyz", timeout_s, server=server)
    except ServerNotReady as e:
        pytest.fail(f"gateway not ready: {e}")


class InProcessGateway:
    """A gateway app on uvicorn in a thread, on a free loopback port: for settings a subprocess
    cannot be given (overrides in this process, an ``environ`` of its own). With
    ``expect_ready=False`` (a model server that is down), it waits for ``/healthz`` instead:
    such a gateway has loaded its models and items but is not ready."""

    def __init__(
        self,
        settings: Settings,
        environ: Mapping[str, str] | None = None,
        ready_timeout_s: float = 60,
        expect_ready: bool = True,
    ) -> None:
        import uvicorn

        from serving.gateway.app import create_app

        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        app = create_app(settings, wait_ready=True, environ=environ)
        self.server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        if expect_ready:
            wait_gateway_ready(self.url, timeout_s=ready_timeout_s)
        else:
            try:
                local_servers.wait_until_answers(f"{self.url}/healthz", ready_timeout_s)
            except ServerNotReady as e:
                pytest.fail(f"gateway not started: {e}")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
