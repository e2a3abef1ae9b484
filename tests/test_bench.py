"""The benchmarks run in a short mode in CI, so they cannot rot. Nothing is timed here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_bench_prints_every_figure_beside_its_baseline() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    for figure in ("dump to a file", "dump to a pipe", "restore from a file"):
        assert figure in result.stdout, result.stdout
    assert result.stdout.count("ratio") == 3, result.stdout
