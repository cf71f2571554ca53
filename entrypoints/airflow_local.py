"""Run Airflow on this machine with the project's DAGs: what ``make airflow`` and the UI test start.

Airflow 3 is several processes that share one metadata database (SQLite here, under
``<home>/airflow``):

- ``airflow api-server``: the UI and the REST API (``/api/v2``), and the *execution API*
  that running tasks report to;
- ``airflow scheduler``: creates runs and hands task instances to the LocalExecutor,
  whose workers it forks (they inherit this environment, ``RECSYS_*`` included);
- ``airflow dag-processor``: parses ``dags/`` into the database (the scheduler and UI
  never import DAG files themselves).

They must agree on one JWT secret (the scheduler signs each task's token, the API server
checks it) and on where the execution API is, so both are set here rather than left to
per-process defaults. Authentication is the SimpleAuthManager with everyone an admin: the
servers bind to loopback only, for one developer. Each process gets its own process group,
so stopping kills every child (LocalExecutor workers, gunicorn/uvicorn workers) too.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from recsys.layout import DAGS_DIR, REPO_ROOT

if TYPE_CHECKING:
    from recsys.config import AirflowConfig

COMPONENTS = ("api-server", "scheduler", "dag-processor")
# The CeleryExecutor's worker (production): takes task messages from the broker.
CELERY_WORKER = "celery worker"
# The project image's entry point (docker/Dockerfile): one Airflow command with the
# deployment's environment derived from the recsys profile (see ``exec_airflow``).
ENTRYPOINT = ("python", "-m", "entrypoints.airflow_local", "exec")


def airflow_overrides(config: AirflowConfig) -> dict[str, str]:
    """The ``AIRFLOW__*`` variables that the ``airflow`` section of the profile stands for."""
    out = {
        "AIRFLOW__CORE__EXECUTOR": config.executor,
        "AIRFLOW__CORE__PARALLELISM": str(config.parallelism),
    }
    if config.database_url:
        out["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = config.database_url
    if config.celery_broker_url:
        out["AIRFLOW__CELERY__BROKER_URL"] = config.celery_broker_url
    if config.celery_result_backend:
        out["AIRFLOW__CELERY__RESULT_BACKEND"] = config.celery_result_backend
    return out


def airflow_bin() -> str:
    """The ``airflow`` script of this interpreter's environment (the project's venv)."""
    return str(Path(sys.executable).parent / "airflow")


def airflow_env(
    airflow_home: Path,
    port: int = 8080,
    host: str = "127.0.0.1",
    base: Mapping[str, str] | None = None,
    dags_folder: Path = DAGS_DIR,
    config: AirflowConfig | None = None,
) -> dict[str, str]:
    """The environment every Airflow process of one local deployment shares.

    Args:
        airflow_home: AIRFLOW_HOME (metadata DB, logs, generated secrets).
        port: the API server's port (UI at ``http://{host}:{port}``).
        host: interface to bind and to reach the API server on.
        base: the environment to start from (default ``os.environ``); ``AIRFLOW__*`` already
            set there win over the defaults here, so a developer can still override anything.
        dags_folder: the DAG files to load.
        config: the profile's ``airflow`` section (executor, metadata DB, broker); None keeps
            the embedded LocalExecutor on SQLite.
    """
    airflow_home = Path(airflow_home).resolve()
    airflow_home.mkdir(parents=True, exist_ok=True)
    secret_file = airflow_home / "recsys_secrets.env"
    if not secret_file.exists():
        secret_file.write_text(f"jwt={secrets.token_urlsafe(32)}\nsession={secrets.token_urlsafe(32)}\n")
        secret_file.chmod(0o600)
    kept = dict(line.split("=", 1) for line in secret_file.read_text().split())
    url = f"http://{host}:{port}"
    defaults = {
        "AIRFLOW__CORE__DAGS_FOLDER": str(Path(dags_folder).resolve()),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        # Two cores: more parallel tasks only thrash (each imports TensorFlow or Feast).
        "AIRFLOW__CORE__PARALLELISM": "2",
        "AIRFLOW__CORE__AUTH_MANAGER": "airflow.api_fastapi.auth.managers.simple.simple_auth_manager."
        "SimpleAuthManager",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
        "AIRFLOW__API__HOST": host,
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": url,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": kept["session"],
        "AIRFLOW__API_AUTH__JWT_SECRET": kept["jwt"],
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
    }
    env = dict(os.environ if base is None else base)
    env["AIRFLOW_HOME"] = str(airflow_home)
    # The profile's choices go first, so they beat the embedded defaults below; an AIRFLOW__*
    # already in the environment beats both (setdefault).
    for key, value in (airflow_overrides(config) if config is not None else {}).items():
        env.setdefault(key, value)
    for key, value in defaults.items():
        env.setdefault(key, value)
    # Tasks import the project (components/) and find conf/recsys.yaml from the repo root.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TF_USE_LEGACY_KERAS", "1")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.setdefault("GX_ANALYTICS_ENABLED", "false")
    return env


@dataclass
class LocalAirflow:
    """The three processes of one local Airflow; ``start`` then ``stop`` (also a context manager)."""

    env: dict[str, str]
    log_dir: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    # Which Airflow commands to run (add CELERY_WORKER for the CeleryExecutor), and how to
    # launch one: the plain ``airflow`` script, or the image's ENTRYPOINT.
    components: tuple[str, ...] = COMPONENTS
    launcher: tuple[str, ...] | None = None

    def _command(self, *args: str) -> list[str]:
        if self.launcher is None:
            return [airflow_bin(), *args]
        head, *rest = self.launcher
        return [sys.executable if head == "python" else head, *rest, *args]

    @property
    def url(self) -> str:
        if "AIRFLOW__API__BASE_URL" in self.env:
            return self.env["AIRFLOW__API__BASE_URL"]
        # A deployment's environment for ENTRYPOINT names only host and port (as
        # ``exec_airflow`` reads them); the URL is derived from them there, and so here.
        host = self.env.get("AIRFLOW__API__HOST", "127.0.0.1")
        return f"http://{host}:{self.env.get('AIRFLOW__API__PORT', '8080')}"

    def migrate(self) -> None:
        """Create or upgrade the metadata database (idempotent)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / "db-migrate.log", "w") as log:
            cmd = self._command("db", "migrate")
            out = {"stdout": log, "stderr": subprocess.STDOUT}
            subprocess.run(cmd, env=self.env, cwd=REPO_ROOT, check=True, timeout=600, **out)

    def start(self) -> LocalAirflow:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for name in self.components:
            log = open(self.log_dir / f"{name.replace(' ', '-')}.log", "ab")  # noqa: SIM115 - the child owns it
            self.procs[name] = subprocess.Popen(
                self._command(*name.split()), env=self.env, cwd=REPO_ROOT,
                stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() reaches its workers too
            )  # fmt: skip
            log.close()
        return self

    def check_alive(self) -> None:
        """Raise naming the process (and its log's tail) that has exited."""
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                tail = (self.log_dir / f"{name.replace(' ', '-')}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"airflow {name} exited with {proc.returncode}:\n{tail}")

    def wait_healthy(self, timeout: float = 120.0) -> None:
        """Until the API server answers ``/api/v2/monitor/health`` and nothing has died."""
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                if httpx.get(f"{self.url}/api/v2/monitor/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API server at {self.url} did not come up in {timeout:.0f}s")
            time.sleep(1)

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM every process group, then SIGKILL what is left after ``grace`` seconds."""
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        # Workers of a group can outlive their leader: kill each group whatever its leader did.
        for proc in self.procs.values():
            _signal_group(proc, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait(timeout=10)

    def __enter__(self) -> LocalAirflow:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)  # start_new_session made pid the group id
    except (ProcessLookupError, PermissionError):
        pass


def exec_airflow(args: list[str]) -> int:
    """The images' entry point: ``airflow ARGS`` with the deployment's environment.

    The environment is this process's, plus what the recsys profile (``RECSYS_PROFILE`` /
    ``RECSYS_CONFIG``) says of Airflow: executor, metadata DB, broker (``AirflowConfig``),
    ``AIRFLOW_HOME`` under the shared home, the DAG folder, one JWT secret kept on the shared
    home so every container signs and checks task tokens alike. Then the process becomes
    ``airflow`` (exec), so signals from the container runtime reach Airflow directly.
    """
    from recsys.config import settings_from_environment

    settings = settings_from_environment()
    home = Path(os.environ.get("AIRFLOW_HOME") or settings.home / "airflow")
    port = int(os.environ.get("AIRFLOW__API__PORT", "8080"))
    host = os.environ.get("AIRFLOW__API__HOST", "127.0.0.1")
    env = airflow_env(home, port=port, host=host, config=settings.airflow)
    env.setdefault("RECSYS_HOME", str(settings.home))
    os.execve(airflow_bin(), [airflow_bin(), *args], env)
    return 1  # not reached: execve replaces this process


def main(argv: list[str] | None = None) -> int:
    """``make airflow``: migrate, start the three processes, print the URL, stop on Ctrl-C."""
    from recsys.config import settings_from_environment

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["exec"]:
        return exec_airflow(argv[1:])
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    settings = settings_from_environment()
    home = settings.home / "airflow"
    env = airflow_env(home, port=args.port, host=args.host, config=settings.airflow)
    # Tasks read the same state as the CLI does, wherever the shell's cwd was.
    env.setdefault("RECSYS_HOME", str(settings.home))
    airflow = LocalAirflow(env, home / "logs" / "processes")
    print(f"AIRFLOW_HOME={home} (metadata DB, logs); DAGs from {env['AIRFLOW__CORE__DAGS_FOLDER']}")
    airflow.migrate()
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    airflow.start()
    try:
        airflow.wait_healthy()
        print(f"Airflow UI: {airflow.url} (everyone is admin; bound to {args.host} only). Ctrl-C stops it.")
        print(f"process logs: {airflow.log_dir}")
        while not stopping:
            airflow.check_alive()
            time.sleep(1)
    except (RuntimeError, TimeoutError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        print("stopping Airflow...")
        airflow.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
