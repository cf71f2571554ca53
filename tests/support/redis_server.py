"""Private redis-servers on loopback for tests: one without persistence, one with an fsynced AOF.

Each instance gets its own free port and data folder; nothing touches a system Redis (6379).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.ports import free_port


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


def start_redis(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen[bytes], int, object]:
    """Start a private redis-server on loopback (no persistence); wait until it answers PING.

    Returns the process, its port and its open log file (``stop_redis`` closes it).
    """
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed: run `make system-deps` (apt-get install redis-server)")
    import redis

    port = port or free_port()
    log = open(workdir / "redis.log", "a")  # noqa: SIM115 - closed after the server stops
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir), "--save", "",
         "--appendonly", "no", "--daemonize", "no"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return proc, port, log
            except redis.ConnectionError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"redis-server did not start: {(workdir / 'redis.log').read_text()}")
                time.sleep(0.05)
    finally:
        client.close()


def stop_redis(proc: subprocess.Popen[bytes], log: object) -> None:
    """Stop a redis-server from ``start_redis`` (SIGTERM, SIGKILL after 10 s) and close its log."""
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()  # type: ignore[attr-defined]
