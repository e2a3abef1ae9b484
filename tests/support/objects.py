"""The steps every kind-of-object test (tests/test_obj_*.py) repeats: look at a fixture's
/proc views, dump it with --kill (no attach), restore it, look again and compare.

    hijack                              the CLI fixture (a state directory of the test's)
    proc_views(pid, normalize=...)      its maps, fds and identity, as sets
    dump_kill_and_restore(hijack, process, image)  -> the restored pid (adopted)
    compare_views(before, pid, normalize=...)      assert nothing differs

`normalize` maps an fd view to what must match: a rebuilt socket or pipe is a new
inode (procview.pipes_named_alike, without_socket_inodes), all else must not differ.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from support.cli import HijackCli, restored_pid
from support.procview import FdView, difference, fds_view, identity_view, maps_view
from support.running import RunningFixture

FdNormalize = Callable[[frozenset[FdView]], frozenset[FdView]]
Views = dict[str, frozenset[object]]
SOCKET_TARGET = re.compile(r"socket:\[\d+\]")


@pytest.fixture
def hijack(tmp_path: Path) -> HijackCli:
    return HijackCli(tmp_path / "state")


def same(view: frozenset[FdView]) -> frozenset[FdView]:
    return view


def without_socket_inodes(view: frozenset[FdView]) -> frozenset[FdView]:
    """A rebuilt socket is a new one: its inode differs, all else must not."""
    return frozenset(replace(e, target=SOCKET_TARGET.sub("socket:[]", e.target)) for e in view)


def proc_views(pid: int, normalize: FdNormalize = same) -> Views:
    """What a restore must give back: the process's maps, descriptors and identity."""
    return {
        "maps": frozenset(maps_view(pid)),
        "fd": frozenset(normalize(fds_view(pid))),
        "identity": frozenset(identity_view(pid)),
    }


def dump_kill_and_restore(hijack: HijackCli, process: RunningFixture, image: Path) -> int:
    """Dump `process` into `image` with --kill (no attach), check it died of it, restore it
    and adopt the restored process: its pid."""
    hijack.ok("dump", process.pid, "-o", image, "--kill")
    assert process.wait_exit() == -signal.SIGKILL
    pid = restored_pid(hijack.ok("restore", image))
    process.adopt(pid)
    return pid


def compare_views(before: Views, pid: int, normalize: FdNormalize = same) -> None:
    """Assert the restored process `pid` shows the views `before` again."""
    after = proc_views(pid, normalize)
    for what, old in before.items():
        found = difference(old, after[what])
        assert not found, f"/proc/{pid} {what}:\n{found}"
