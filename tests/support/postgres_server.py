"""A private PostgreSQL cluster on loopback for tests (the production Airflow database).

Its own free port and data folder; nothing touches a system PostgreSQL (5432). PostgreSQL
refuses to run as root, so when the tests run as root the cluster is created and started as
the ``postgres`` system user (``runuser``), in a folder that user owns (outside pytest's
root-only temporary tree).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.ports import free_port


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
