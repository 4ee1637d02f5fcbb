"""``make device-check DRY_RUN=1`` on a machine without a GPU: it lists every stage with its time limit and
command, checks the environment (imports, devices, the CuPy distribution), installs and runs nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]


def test_the_dry_run_prints_the_stages_and_checks_the_environment(tmp_path):
    result = subprocess.run(["make", "--no-print-directory", "device-check", "DRY_RUN=1", f"OUT={tmp_path}",
                             f"PYTHON={sys.executable}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    for stage in ("install", "conformance-torch", "conformance-cupy", "conformance-numba_cuda", "cuda-tests",
                  "bench-targets", "bench-sweep"):
        assert re.search(rf"^  {stage} ?\|\s*\d+\s*\|", text, re.MULTILINE), stage
    assert "--no-deps --no-build-isolation -e ." in text
    assert f"{sys.executable} -m refattn bench --targets --device cuda --json {tmp_path}/targets.json" in text
    limits = [int(n) for n in re.findall(r"^  [\w-]+ ?\| ?(\d+) ?\|", text, re.MULTILINE)]
    deadline = int(re.search(r"deadline (\d+)s", text).group(1))
    assert deadline < 9 * 60 and limits  # every stage's limit shrinks to what is left of the deadline
    for package in ("numpy", "scipy", "torch", "cupy", "numba", "pytest"):
        assert re.search(rf"^{package}\s+\S", text, re.MULTILINE), package
    assert "cupy distribution" in text and "nvidia-smi" in text
    assert "dry run: nothing installed or run" in text
    assert (tmp_path / "summary.txt").read_text().startswith("refattn device check")
    assert not (tmp_path / "all-results.tar.gz").exists()


def test_a_stage_past_the_deadline_is_recorded_as_not_run_and_the_results_are_packed(tmp_path):
    result = subprocess.run(["scripts/device_check.sh", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "DEADLINE": "3"})
    assert result.returncode == 1, result.stdout + result.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert re.search(r"^install\s+0s\s+not run: the deadline was reached$", summary, re.MULTILINE), summary
    assert re.search(r"^total\s+\d+s\s+some stage failed$", summary, re.MULTILINE), summary
    assert (tmp_path / "all-results.tar.gz").stat().st_size > 0
