"""Where the repository and the shared data lie, wherever a test module sits in the tree."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Data sets kept next to the checkout (not in it): MovieLens and the like.
SHARED_DATA = REPO.parent / "shared" / "data"
