"""Temporary directories the harness creates itself, tracked so none outlives its test.

Tests should use pytest's tmp_path; this is for what the harness needs on its
own (a fixture's captured stdout/stderr). Each directory is removed when its
owner is done; one still present after its test is a leak the per-test check
reports.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

_created: set[Path] = set()


def make_temp_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    _created.add(path)
    return path


def remove_temp_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    _created.discard(path)


def snapshot_temp_dirs() -> frozenset[Path]:
    """The harness's directories that exist now (to tell a test's own leftovers apart)."""
    return frozenset(path for path in _created if path.exists())


def find_leftover_temp_dirs(baseline: frozenset[Path]) -> list[Path]:
    """Harness directories created since `baseline` and still present."""
    return sorted(snapshot_temp_dirs() - baseline)
