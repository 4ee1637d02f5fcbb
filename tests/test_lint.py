"""The linter is part of the test command: ruff, configured in pyproject.toml, finds nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing() -> None:
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert "No module named ruff" not in done.stderr, "ruff is not installed: pip install -e '.[test]'"
    assert done.returncode == 0, done.stdout + done.stderr
