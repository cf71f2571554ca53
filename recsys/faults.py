"""Failpoints: named places where a process can be made to crash, to prove recovery.

``failpoint("push.between_models")`` does nothing unless the environment variable
``RECSYS_FAILPOINTS`` lists that name (comma-separated). Then the process ends at once with
``os._exit`` (no ``finally``, no cleanup, no flush), which is what a SIGKILL, an OOM kill or
a lost worker does to a task halfway through. The reliability tests set it on a child
process; nothing else should.
"""

from __future__ import annotations

import os
import sys

FAILPOINTS_ENV = "RECSYS_FAILPOINTS"
# The exit status of a process ended by a failpoint (as a shell reports a SIGKILL).
FAILPOINT_EXIT = 137


def failpoint(name: str) -> None:
    """Crash the process here if ``RECSYS_FAILPOINTS`` names ``name``."""
    armed = os.environ.get(FAILPOINTS_ENV, "")
    if armed and name in {n.strip() for n in armed.split(",")}:
        sys.stderr.write(f"failpoint {name}: exiting with {FAILPOINT_EXIT}\n")
        sys.stderr.flush()
        os._exit(FAILPOINT_EXIT)
