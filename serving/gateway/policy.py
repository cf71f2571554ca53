"""Pure serving policy: arm assignment.

Kept free of I/O so each rule has a unit test with hand-checked numbers. The ordering rules
(score fusion, MMR diversity, exploration) live in the kernel, ``recsys.ranking``, because the
offline evaluation replays them too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

ARMS = ("stable", "canary", "holdout")


def assign_arm(user_id: str, fractions: Mapping[str, float], salt: str = "recsys") -> str:
    """Sticky arm of a user: a hash of (salt, user id) mapped onto the arms' fractions.

    The same user always lands in the same arm while fractions and salt stay the same, and
    growing the canary fraction only moves users from stable into canary (the holdout slice
    sits at the top of the hash range and does not move).
    """
    digest = hashlib.sha256(f"{salt}:{user_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    holdout = fractions.get("holdout", 0.0)
    canary = fractions.get("canary", 0.0)
    if u >= 1.0 - holdout:
        return "holdout"
    if u < canary:
        return "canary"
    return "stable"
