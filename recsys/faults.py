"""Failpoints: named places where a process can be made to crash, to prove recovery.

``failpoint("push.between_models")`` does nothing unless the environment variable
``RECSYS_FAILPOINTS`` lists that name (comma-separated). Then the process ends at once with
``os._exit`` (no ``finally``, no cleanup, no flush), which is what a SIGKILL, an OOM kill or
a lost worker does to a task halfway through. The reliability tests set it on a child
process; nothing else should.

``armed("event_log.commit_per_row")`` asks the same variable whether a *behaviour* failpoint is
on: the code then misbehaves on purpose (a log that commits row by row, or acknowledges an
event before writing it), so a test can show that its check catches that fault.
"""

from __future__ import annotations

import os
import sys

FAILPOINTS_ENV = "RECSYS_FAILPOINTS"
# The exit status of a process ended by a failpoint (as a shell reports a SIGKILL).
FAILPOINT_EXIT = 137

# Behaviour failpoints of the event logs (``armed``): each breaks one promise on purpose, so a
# test can show that its check catches the broken log. Never set outside tests.
# Each event (SQLite) or script call (Redis) committed on its own: no batch transaction.
COMMIT_PER_ROW = "event_log.commit_per_row"
# ``append`` answers at once and writes a second later: a SIGKILL loses acknowledged events.
ACK_BEFORE_WRITE = "event_log.ack_before_write"
ACK_BEFORE_WRITE_DELAY_S = 1.0


def armed(name: str) -> bool:
    """Whether ``RECSYS_FAILPOINTS`` names ``name`` (read at each call, never cached)."""
    listed = os.environ.get(FAILPOINTS_ENV, "")
    return bool(listed) and name in {n.strip() for n in listed.split(",")}


def failpoint(name: str) -> None:
    """Crash the process here if ``RECSYS_FAILPOINTS`` names ``name``."""
    if armed(name):
        sys.stderr.write(f"failpoint {name}: exiting with {FAILPOINT_EXIT}\n")
        sys.stderr.flush()
        os._exit(FAILPOINT_EXIT)
