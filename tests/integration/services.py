"""Production services on loopback for tests: Redis with an fsynced AOF, a private PostgreSQL.

Each instance gets its own free port and data folder; nothing touches a system Redis (6379)
or PostgreSQL (5432). PostgreSQL refuses to run as root, so when the tests run as root the
cluster is created and started as the ``postgres`` system user (``runuser``), in a folder
that user owns (outside pytest's root-only temporary tree).
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import free_port


@dataclass
class RedisProc:
    """A redis-server with an append-only file fsynced at every write (the event log's setting)."""

    workdir: Path
    port: int
    proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, appendfsync: str = "always") -> RedisProc:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed: run `make system-deps` (apt-get install redis-server)")  # noqa: E501
        log = open(self.workdir / "redis.log", "a")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--save", "", "--appendonly", "yes", "--appendfsync", appendfsync, "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()
        self.wait()
        return self

    def wait(self, timeout: float = 15) -> None:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    # Loading the AOF after a restart answers LOADING until done.
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.BusyLoadingError):
                    pass
                if self.proc is not None and self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = (self.workdir / "redis.log").read_text()[-2000:]
                    pytest.fail(f"redis-server did not start: {tail}")
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown hook, no final save: only what was already written survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def aof_redis(workdir: Path) -> Iterator[RedisProc]:
    """A private Redis with ``appendonly yes`` and ``appendfsync always``, stopped on exit."""
    workdir.mkdir(parents=True, exist_ok=True)
    server = RedisProc(workdir, free_port()).start()
    try:
        yield server
    finally:
        server.stop()


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        pytest.fail(f"PostgreSQL's {name} is not installed: run `make system-deps` (apt-get install postgresql)")  # noqa: E501
    return found[-1]


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb and postgres refuse root; as any other user the command runs as it is.
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextmanager
def postgres_server(database: str = "airflow") -> Iterator[str]:
    """A private PostgreSQL cluster on a free loopback port; yields a SQLAlchemy URL to ``database``.

    Trust authentication on loopback only (a throwaway cluster); ``fsync=off`` because the
    cluster dies with the test and the two cores are better spent on the DAG.
    """
    folder = Path(tempfile.mkdtemp(prefix="recsys-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()
    pg_ctl = _pg_bin("pg_ctl")
    subprocess.run(
        _as_postgres([_pg_bin("initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    opts = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=100"
    try:
        subprocess.run(
            _as_postgres([pg_ctl, "-D", str(data), "-o", opts, "-l", str(folder / "pg.log"), "-w", "start"]),
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        subprocess.run(
            _as_postgres([_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database]),  # noqa: E501
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{database}"
    finally:
        subprocess.run(
            _as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"]),
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(folder, ignore_errors=True)
