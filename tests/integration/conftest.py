"""Integration fixtures: real servers on loopback, started and stopped by the tests themselves."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from recsys.config import Settings


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server on loopback for the session; yields its ``host:port``.

    Its own port and folder, no persistence (``--save "" --appendonly no``): nothing outlives
    the session and a developer's own Redis on 6379 is never touched.
    """
    workdir = tmp_path_factory.mktemp("redis")
    proc, port, log = start_redis(workdir)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop_redis(proc, log)


def start_redis(workdir: Path, port: int | None = None) -> tuple[subprocess.Popen[bytes], int, object]:
    """Start a private redis-server on loopback (no persistence); wait until it answers PING."""
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
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def gateway_template(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A built serving home, once per session: validated data, features in the SQLite online
    store, trained models pushed as version 1 (stable) and 2 (canary). Treat as read-only:
    ``copy_home`` gives each module its own copy to change and break."""
    from tests.integration.test_gateway import _build_home

    home = tmp_path_factory.mktemp("gateway_template")
    _build_home(tiny_raw, home)
    return home


def copy_home(template: Path, dest: Path) -> Settings:
    """Copy a built home to ``dest`` and re-point the absolute paths its configs hold; its Settings."""
    from recsys.config import load_settings

    shutil.copytree(template, dest)
    for name in ("models.config", "models.load.config"):
        path = dest / "models" / name
        if path.is_file():
            # TF Serving configs name each model's base path absolutely.
            path.write_text(path.read_text().replace(f"{template}/", f"{dest}/"))
    return load_settings(overrides={"home": str(dest)})
