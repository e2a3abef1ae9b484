"""Compile the C fixtures in tests/fixtures into a build directory outside the tree.

Each `NAME.c` becomes the executable `NAME`, built with `gcc -Wall -Werror -O0
-g` plus whatever its own `// CFLAGS: ...` line asks for (e.g. `-pthread`).
A binary is rebuilt only when its source or a shared header is newer, and is
replaced atomically, so several pytest sessions building at once never run a
half-written executable.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

FIXTURE_DIR = Path(__file__).resolve().parent.parent / "fixtures"
CFLAGS = ("-Wall", "-Werror", "-O0", "-g")
BUILD_DIR_VARIABLE = "HIJACK_FIXTURE_BUILD_DIR"

_EXTRA_CFLAGS = re.compile(r"^//\s*CFLAGS:(.*)$", re.MULTILINE)


class FixtureBuildError(Exception):
    """A fixture could not be compiled (the message carries gcc's output)."""


class GccMissing(FixtureBuildError):
    """No gcc on PATH: tests that need fixtures skip instead of failing."""


def fixture_names() -> list[str]:
    """Every fixture there is, by name (the .c files in tests/fixtures)."""
    return sorted(source.stem for source in FIXTURE_DIR.glob("*.c"))


def default_build_dir() -> Path:
    """$HIJACK_FIXTURE_BUILD_DIR, else a per-user directory under the temp dir.

    Keyed on the source directory and the flags so two checkouts (or a change
    of flags) never share binaries built from different sources.
    """
    override = os.environ.get(BUILD_DIR_VARIABLE)
    if override:
        return Path(override)
    key = hashlib.sha256(f"{FIXTURE_DIR}\0{' '.join(CFLAGS)}".encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"hijack-fixtures-{os.getuid()}-{key}"


def _extra_cflags(source: Path) -> list[str]:
    return [flag for match in _EXTRA_CFLAGS.findall(source.read_text()) for flag in match.split()]


def _compile(gcc: str, source: Path, binary: Path) -> None:
    partial = binary.with_name(f".{binary.name}.{os.getpid()}.partial")
    command = [gcc, *CFLAGS, *_extra_cflags(source), "-o", str(partial), str(source)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise FixtureBuildError(
            f"building fixture {source.name} failed:\n$ {' '.join(command)}\n{result.stderr}"
        )
    os.replace(partial, binary)


def build_fixtures(build_dir: Path | None = None) -> dict[str, Path]:
    """Build every fixture that is missing or older than its sources; return name -> binary."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise GccMissing("gcc is not installed (apt-get install gcc libc6-dev)")
    build_dir = build_dir or default_build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    newest_header = max((h.stat().st_mtime_ns for h in FIXTURE_DIR.glob("*.h")), default=0)
    binaries: dict[str, Path] = {}
    for source in sorted(FIXTURE_DIR.glob("*.c")):
        binary = build_dir / source.stem
        newest_input = max(source.stat().st_mtime_ns, newest_header)
        # Equal times are ambiguous (coarse clocks): rebuild rather than risk a stale binary.
        if not binary.exists() or binary.stat().st_mtime_ns <= newest_input:
            _compile(gcc, source, binary)
        binaries[source.stem] = binary
    return binaries


@functools.cache
def _session_binaries() -> dict[str, Path]:
    return build_fixtures()


def session_fixtures() -> dict[str, Path]:
    """Every fixture, built once per session (name -> binary); skip the test without gcc."""
    try:
        return _session_binaries()
    except GccMissing as missing:
        pytest.skip(str(missing))


def fixture_path(name: str) -> Path:
    """The built binary of fixture `name`."""
    binaries = session_fixtures()
    if name not in binaries:
        raise FixtureBuildError(f"no fixture {name!r}; there are: {', '.join(sorted(binaries))}")
    return binaries[name]
