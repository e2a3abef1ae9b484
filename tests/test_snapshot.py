"""`hijack dump PID` without --kill: a copy-on-write snapshot, the process frozen only to fork.

The image must be the process exactly as it was at the freeze, although its
memory is read while the process runs on: the `snapcount` fixture keeps each
thread's count both in a register and in memory, and a restored thread whose
memory is ahead of (or behind) its registers fails its very next step.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

from support import spawn_fixture
from support.cli import HijackCli, restored_pid

from hijack.image.codec import read_image
from hijack.image.records import Pages, Thread
from hijack.sys import procfs

FROZEN = re.compile(r"frozen (\d+\.\d) ms")


def test_snapshot_image_is_the_state_at_the_freeze_while_the_process_runs_on(
    tmp_path: Path,
) -> None:
    hijack = HijackCli(tmp_path / "state")
    image = tmp_path / "snapcount.crf"
    with spawn_fixture("snapcount", fifos=True) as counting:
        result = hijack.ok("dump", counting.pid, "-o", image)
        assert FROZEN.search(result.stdout + result.stderr), result.describe()
        with open(image, "rb") as stream:
            records = list(read_image(stream))
        assert sum(isinstance(r, Thread) for r in records) == 4
        assert any(isinstance(r, Pages) for r in records)
        # The original runs on after the dump (it counts: its CPU time grows).
        old_pid = counting.pid
        ran = procfs.read_stat(old_pid).utime
        wait_until(lambda: procfs.read_stat(old_pid).utime > ran, "the original counting on")
        os.kill(old_pid, signal.SIGKILL)
        assert counting.wait_exit() == -signal.SIGKILL
        # Its pid is free again: the image comes back as it was at the freeze,
        # every thread's memory equal to its registers.
        pid = restored_pid(hijack.ok("restore", image))
        assert pid == old_pid
        counting.adopt(pid)
        counting.assert_intact()
    assert "PASS snapcount" in counting.stdout


def test_snapshot_leaves_no_copy_behind(tmp_path: Path) -> None:
    hijack = HijackCli(tmp_path / "state")
    with spawn_fixture("snapcount") as counting:
        hijack.ok("dump", counting.pid, "-o", tmp_path / "a.crf")
        children = Path(f"/proc/{counting.pid}/task/{counting.pid}/children").read_text()
        assert children.split() == [], "the target was left a child (the copy or its parent)"
        counting.assert_intact()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
