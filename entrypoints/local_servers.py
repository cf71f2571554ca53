"""The model server and the gateway as local processes: started, waited for, stopped.

``make demo``, the serving benchmark (``bench.serving``) and the integration tests run the
two servers the same way, from here: ``recsys serve model-server`` (tensorflow_model_server's
flags) and ``recsys serve gateway`` as child processes on free loopback ports, the gateway
pointed at the model server through ``RECSYS_GATEWAY__MODEL_SERVER_*`` variables, each
process writing one log file, each waited for until it answers over HTTP, and stopped with
SIGTERM (SIGKILL when it does not exit in time), the gateway first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from recsys.config import ENV_PREFIX
from recsys.layout import REPO_ROOT

# The console script installed beside the interpreter that runs this (the project's .venv).
RECSYS = Path(sys.executable).parent / "recsys"
LOOPBACK = "127.0.0.1"
# What follows ``recsys`` on each server's command line.
MODEL_SERVER_SUBCOMMAND = ("serve", "model-server")
GATEWAY_SUBCOMMAND = ("serve", "gateway")
# Every server process: TensorFlow quiet, and on Keras 2 (TFRS needs tf_keras).
TENSORFLOW_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_USE_LEGACY_KERAS": "1"}
MODEL_SERVER_LOG = "model_server.log"
GATEWAY_LOG = "gateway.log"


class ServerNotReady(RuntimeError):
    """A server process exited, or did not answer, before it was ready."""


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def setting_variable(dotted: str) -> str:
    """The variable that overrides a setting (``gateway.refresh_seconds``:
    ``RECSYS_GATEWAY__REFRESH_SECONDS``)."""
    return ENV_PREFIX + "__".join(part.upper() for part in dotted.split("."))


def server_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (this process's environment when None) with TensorFlow's variables for a server."""
    return {**(os.environ if base is None else base), **TENSORFLOW_ENV}


def model_server_variables(grpc_port: int, rest_port: int, host: str | None = None) -> dict[str, str]:
    """The ``RECSYS_*`` variables that point a gateway at a model server (its host when given)."""
    out = {
        setting_variable("gateway.model_server_grpc_port"): str(grpc_port),
        setting_variable("gateway.model_server_rest_port"): str(rest_port),
    }
    if host is not None:
        out[setting_variable("gateway.model_server_host")] = host
    return out


def setting_variables(settings: Mapping[str, Any]) -> dict[str, str]:
    """``RECSYS_*`` variables for settings by dotted name; values other than strings as JSON
    (which the config reads as YAML: numbers, booleans, lists and mappings keep their type)."""
    return {
        setting_variable(dotted): value if isinstance(value, str) else json.dumps(value)
        for dotted, value in settings.items()
    }


def tf_serving_flags(**values: Any) -> list[str]:
    """Model server flags from option values by name, e.g. ``max_num_load_retries=0``.

    Names are ``ServerOptions`` fields (a typo fails here, not in the child); booleans become
    ``--name`` or ``--name=false``, everything else ``--name value``.
    """
    from serving.model_server.server import ServerOptions

    known = {f.name for f in dataclasses.fields(ServerOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"not model server options: {unknown}; known: {sorted(known)}")
    flags: list[str] = []
    for name, value in values.items():
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--{name}=false")
        else:
            flags += [f"--{name}", str(value)]
    return flags


def model_status_url(rest_port: int, model: str) -> str:
    """The model server's REST status of ``model``: 200 once a version of it is loaded."""
    return f"http://{LOOPBACK}:{rest_port}/v1/models/{model}"


def wait_until_answers(
    url: str, timeout_s: float, poll_s: float = 0.2, server: LocalServer | None = None
) -> None:
    """Poll ``url`` until it answers 200.

    Raises:
        ServerNotReady: ``server`` (when given) exited first, or ``timeout_s`` passed; with the
            last answer or error, and the end of the server's log.
    """
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if server is not None and not server.running():
            raise ServerNotReady(
                f"{server.name} exited with {server.process.returncode} before {url} answered:\n"
                + server.log_tail()
            )
        try:
            answer = httpx.get(url, timeout=2)
            if answer.status_code == 200:
                return
            last = f"{answer.status_code} {answer.text}"
        except httpx.HTTPError as e:
            last = str(e) or type(e).__name__
        time.sleep(poll_s)
    tail = server.log_tail() if server is not None else ""
    raise ServerNotReady(f"{url} did not answer within {timeout_s:.0f}s: {last}\n{tail}")


@dataclass
class LocalServer:
    """One server process started here, the log it writes, and how it is stopped."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    # In a process group of its own: signals go to the group, so children it forked go too.
    own_process_group: bool = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def wait_until_answers(self, url: str, timeout_s: float, poll_s: float = 0.2) -> None:
        """Poll ``url`` until it answers 200; ServerNotReady if this process exits first or time runs out."""
        wait_until_answers(url, timeout_s, poll_s, server=self)

    def send_signal(self, signum: int) -> None:
        if self.own_process_group:
            os.killpg(self.process.pid, signum)
        else:
            self.process.send_signal(signum)

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns once the process is gone."""
        if self.running():
            self.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            self.process.wait()


def _start(
    name: str,
    args: Sequence[str],
    log: Path,
    env: Mapping[str, str] | None,
    log_mode: str,
    own_process_group: bool,
) -> LocalServer:
    log.parent.mkdir(parents=True, exist_ok=True)
    # The child keeps its own handle on the log; this one closes at once.
    with open(log, log_mode) as out:
        process = subprocess.Popen(
            [str(RECSYS), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(server_environment() if env is None else env),
            cwd=REPO_ROOT,
            start_new_session=own_process_group,
        )
    return LocalServer(name, process, log, own_process_group)


def start_model_server(
    flags: Sequence[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    *,
    log_mode: str = "wb",
    own_process_group: bool = False,
) -> LocalServer:
    """``recsys serve model-server`` with ``flags``, its output to ``log``; does not wait.

    ``env`` is the whole environment (default: this process's, with ``TENSORFLOW_ENV``).
    """
    return _start("model server", [*MODEL_SERVER_SUBCOMMAND, *flags], log, env, log_mode, own_process_group)


def start_gateway(
    port: int,
    log: Path,
    env: Mapping[str, str] | None = None,
    *,
    host: str = LOOPBACK,
    log_mode: str = "wb",
    own_process_group: bool = False,
) -> LocalServer:
    """``recsys serve gateway`` on ``host:port``, its output to ``log``; does not wait.

    ``env`` is the whole environment; it names the model server (``model_server_variables``).
    """
    args = [*GATEWAY_SUBCOMMAND, "--host", host, "--port", str(port)]
    return _start("gateway", args, log, env, log_mode, own_process_group)


@dataclass(frozen=True)
class ServingPorts:
    """The model server's gRPC and REST ports and the gateway's HTTP port."""

    grpc: int
    rest: int
    gateway: int

    @classmethod
    def free(cls) -> ServingPorts:
        return cls(free_port(), free_port(), free_port())


@dataclass
class LocalServing:
    """A running model server and a running gateway that talks to it."""

    ports: ServingPorts
    model_server: LocalServer
    gateway: LocalServer
    # From the gateway's start to its first ready answer (it loads catalogs and warms models).
    gateway_ready_s: float

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.gateway}"


@contextmanager
def local_serving(
    model_server_flags: Sequence[str],
    logs: Path,
    *,
    ready_model: str,
    env: Mapping[str, str] | None = None,
    ports: ServingPorts | None = None,
    model_server_host: str | None = None,
    model_server_timeout_s: float = 120.0,
    gateway_timeout_s: float = 120.0,
    poll_s: float = 0.2,
    stop_timeout_s: float = 15.0,
    own_process_groups: bool = False,
) -> Iterator[LocalServing]:
    """Start the model server, wait until it serves ``ready_model``, start the gateway, wait
    until it is ready; yield both; stop the gateway, then the model server, also on failure.

    Args:
        model_server_flags: its flags beyond the two ports, which are added here.
        logs: the folder of ``model_server.log`` and ``gateway.log``.
        env: both processes' environment (default: this process's, with ``TENSORFLOW_ENV``);
            the variables naming the model server are added here.
        ports: the ports to use (default: free ones).
        model_server_host: set as the gateway's ``gateway.model_server_host`` when given.
        own_process_groups: each server in a process group of its own (stopped as a group),
            and out of this terminal's Ctrl-C.

    Raises:
        ServerNotReady: a server exited or did not answer in time (both are stopped by then).
    """
    ports = ports or ServingPorts.free()
    environment = {
        **(server_environment() if env is None else env),
        **model_server_variables(ports.grpc, ports.rest, model_server_host),
    }
    # The gateway's admin endpoints move labels through the reload RPC, which the stand-in
    # model server takes only when asked (and only for base paths beside models.config).
    flags = ["--port", str(ports.grpc), "--rest_api_port", str(ports.rest), "--allow_reload_config",
             *model_server_flags]  # fmt: skip
    started: list[LocalServer] = []
    try:
        model_server = start_model_server(
            flags, logs / MODEL_SERVER_LOG, environment, own_process_group=own_process_groups
        )
        started.append(model_server)
        model_server.wait_until_answers(
            model_status_url(ports.rest, ready_model), model_server_timeout_s, poll_s
        )
        begun = time.perf_counter()
        gateway = start_gateway(
            ports.gateway, logs / GATEWAY_LOG, environment, own_process_group=own_process_groups
        )
        started.append(gateway)
        gateway.wait_until_answers(f"http://{LOOPBACK}:{ports.gateway}/readyz", gateway_timeout_s, poll_s)
        yield LocalServing(ports, model_server, gateway, time.perf_counter() - begun)
    finally:
        for server in reversed(started):
            server.stop(stop_timeout_s)
