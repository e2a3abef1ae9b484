"""Restore an independent copy of a process beside its running original.

A restore reopens every descriptor by path: the copy would share the
original's control FIFO, output files and logs, and each would break the
other's checks. So for the time of the restore each path holds a fresh file
of its own, while the original goes on through its descriptors to the files
set aside; then the original's files go back to their paths and the copy's
keep a ".copy" suffix.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from support.cli import HijackCli, restored_pid


def suffixed(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


@contextlib.contextmanager
def copy_beside_original(
    hijack: HijackCli,
    image: Path,
    control: Path,
    outputs: Sequence[Path],
    kept_apart: Mapping[Path, bytes] | None = None,
) -> Iterator[tuple[int, BinaryIO]]:
    """`hijack restore IMAGE` beside the original; yields (copy's pid, the copy's CONTROL end).

    `control` is the original's control FIFO, `outputs` files it writes
    (stdout, stderr), both swapped back after the restore. `kept_apart` are
    files each process must keep on its own path meanwhile (a log each checks
    at its path when it ends): the copy starts with the given content at the
    path, the original's moves to ".original" for good. Closing the copy's
    CONTROL end (or leaving the block) ends the copy's control input.
    """
    swapped = [control, *outputs]
    for path in (*swapped, *(kept_apart or {})):
        os.rename(path, suffixed(path, ".original"))
    for path, content in (kept_apart or {}).items():
        path.write_bytes(content)
    os.mkfifo(control, 0o600)
    for path in outputs:
        path.touch()
    # Read-write: opening never blocks, and the copy's CONTROL ends when we close it.
    with open(control, "r+b", buffering=0) as copy_control:
        try:
            copy_pid = restored_pid(hijack.ok("restore", image))
        finally:
            for path in swapped:
                os.rename(path, suffixed(path, ".copy"))
                os.rename(suffixed(path, ".original"), path)
        yield copy_pid, copy_control
