"""Integration fixtures: real servers on loopback, started and stopped by the tests themselves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.homes import build_serving_home
from tests.support.redis_server import start_redis, stop_redis


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


@pytest.fixture(scope="session")
def gateway_template(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A built serving home, once per session: validated data, features in the SQLite online
    store, trained models pushed as version 1 (stable) and 2 (canary). Treat as read-only:
    ``copy_home`` gives each module its own copy to change and break."""
    home = tmp_path_factory.mktemp("gateway_template")
    build_serving_home(tiny_raw, home)
    return home
