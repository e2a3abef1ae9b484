"""Run the `hijack` command as a user does: a separate `python -m hijack` process.

Each test gets its own state directory (HIJACK_STATE_DIR), so tests never see
each other's registry rows or shadows. Every run is bounded by a timeout; a
run that exceeds it fails the test with what the command printed so far.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

CLI_TIMEOUT = 60.0
# Wide enough that rich never shortens a path in the descriptor table: tests
# look for whole paths in the output.
CLI_COLUMNS = "250"
RESTORED_LINE = re.compile(r"^restored process (\d+) ", re.MULTILINE)

# What a command line is made of: paths are given as they are.
Argument = str | int | os.PathLike[str]


@dataclass(frozen=True)
class CliResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        """The whole run, for assertion messages."""
        return (
            f"$ hijack {' '.join(self.argv)}  -> exit {self.returncode}\n"
            f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"
        )


class HijackCli:
    """`hijack ARGS...` with the state directory `state_dir`; with `netns`, run inside that
    network namespace (where the sockets a dump reads or a restore makes live)."""

    def __init__(self, state_dir: Path, netns: str | None = None) -> None:
        self.state_dir = state_dir
        self.netns = netns

    def __call__(
        self, *args: Argument, timeout: float = CLI_TIMEOUT, stdin: BinaryIO | None = None
    ) -> CliResult:
        """`stdin`: a file the command reads as its standard input (else /dev/null)."""
        argv = tuple(os.fspath(arg) if isinstance(arg, os.PathLike) else str(arg) for arg in args)
        env = {
            **os.environ,
            "HIJACK_STATE_DIR": str(self.state_dir),
            "COLUMNS": CLI_COLUMNS,
        }
        from support.nodes import entering_namespace  # nodes imports this module

        try:
            with entering_namespace(self.netns) if self.netns else nullcontext() as enter:
                completed = subprocess.run(
                    [sys.executable, "-m", "hijack", *argv],
                    env=env,
                    stdin=subprocess.DEVNULL if stdin is None else stdin,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    check=False,
                    preexec_fn=enter,
                )
        except subprocess.TimeoutExpired as expired:
            raise AssertionError(
                f"$ hijack {' '.join(argv)} did not finish within {timeout} s\n"
                f"--- stdout ---\n{_text(expired.stdout)}--- stderr ---\n{_text(expired.stderr)}"
            ) from None
        return CliResult(argv, completed.returncode, completed.stdout, completed.stderr)

    def ok(
        self, *args: Argument, timeout: float = CLI_TIMEOUT, stdin: BinaryIO | None = None
    ) -> CliResult:
        """Run and demand exit 0 and a quiet stderr."""
        result = self(*args, timeout=timeout, stdin=stdin)
        assert result.returncode == 0, result.describe()
        assert result.stderr == "", result.describe()
        return result


def restored_pid(result: CliResult) -> int:
    """The pid `hijack restore` says it restored."""
    found = RESTORED_LINE.search(result.stdout)
    assert found, result.describe()
    return int(found[1])


def _text(output: str | bytes | None) -> str:
    if output is None:
        return ""
    return output.decode(errors="replace") if isinstance(output, bytes) else output
