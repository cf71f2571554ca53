"""Loopback ports for the servers the tests start (Redis, PostgreSQL, Airflow, model server, gateway)."""

from __future__ import annotations

# One definition for the entry points and the tests: the servers' own start-up code picks
# its ports the same way.
from entrypoints.local_servers import free_port

__all__ = ["free_port"]
