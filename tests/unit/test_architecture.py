"""The architecture is checked, not only drawn: layers (import-linter) and types (mypy).

The contracts live in pyproject.toml (``[tool.importlinter]``): the kernel ``recsys`` imports
nothing above it, pipeline steps (``components``) and the serving side (``serving``) never
import each other, entry points sit on top. ``make lint`` runs the same two commands.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.paths import REPO

BIN = Path(sys.executable).parent


def _run(tool: str) -> subprocess.CompletedProcess[str]:
    exe = BIN / tool if (BIN / tool).exists() else shutil.which(tool)
    assert exe, f"{tool} is not installed (make setup installs the dev extras)"
    return subprocess.run([str(exe)], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_imports_follow_the_layers() -> None:
    proc = _run("lint-imports")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "broken" in proc.stdout and "0 broken" in proc.stdout


def test_kernel_and_serving_type_check() -> None:
    proc = _run("mypy")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
