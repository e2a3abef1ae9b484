"""The steps every kind-of-object test (tests/test_obj_*.py) repeats: look at a fixture's
/proc views, dump it with --kill (no attach), restore it, look again and compare.

    hijack                                         the CLI fixture (its own state directory)
    proc_views(pid, normalize=..., views=...)      its maps, fds and identity, as sets
    dump_kill(hijack, process, image)              dump --kill; it died of the kill
    shown_json(hijack, image)                      `show --json` of the image, parsed
    objects_of(shown, record)                      its objects of one record kind
    restore_adopted(hijack, process, image)        -> the restored pid (adopted)
    dump_kill_and_restore(hijack, process, image)  -> both steps, nothing between them
    compare_views(before, pid, normalize=...)      assert nothing differs
    assert_recodes(image)                          the image re-encodes to itself
    assert_refused(result, *words)                 exit 1, one `hijack:` line naming words

A test that looks at the image (or at what the kill freed) between the dump and the
restore calls dump_kill and restore_adopted itself.

`normalize` maps an fd view to what must match: a rebuilt socket or pipe is a new
inode (procview.pipes_named_alike, without_socket_inodes), all else must not differ.
"""

from __future__ import annotations

import io
import json
import re
import signal
from collections.abc import Callable, Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from hijack.image.codec import recode
from support.cli import CliResult, HijackCli, restored_pid
from support.procview import FdView, difference, fds_view, identity_view, maps_view
from support.running import RunningFixture

FdNormalize = Callable[[frozenset[FdView]], frozenset[FdView]]
Views = dict[str, frozenset[object]]
ALL_VIEWS = ("maps", "fd", "identity")
SOCKET_TARGET = re.compile(r"socket:\[\d+\]")
PIPE_TARGET = re.compile(r"pipe:\[\d+\]")


@pytest.fixture
def hijack(tmp_path: Path) -> HijackCli:
    return HijackCli(tmp_path / "state")


def same(view: frozenset[FdView]) -> frozenset[FdView]:
    return view


def without_socket_inodes(view: frozenset[FdView]) -> frozenset[FdView]:
    """A rebuilt socket is a new one: its inode differs, all else must not."""
    return frozenset(replace(e, target=SOCKET_TARGET.sub("socket:[]", e.target)) for e in view)


def without_pipe_inodes(view: frozenset[FdView]) -> frozenset[FdView]:
    """A pipe a restore makes again is a new one: its inode differs, all else must not."""
    return frozenset(replace(e, target=PIPE_TARGET.sub("pipe:[]", e.target)) for e in view)


def proc_views(
    pid: int, normalize: FdNormalize = same, views: Collection[str] = ALL_VIEWS
) -> Views:
    """What a restore must give back: the process's maps, descriptors and identity (or
    those of them in `views`: compare_views compares what was taken)."""
    taken: dict[str, Callable[[], frozenset[object]]] = {
        "maps": lambda: frozenset(maps_view(pid)),
        "fd": lambda: frozenset(normalize(fds_view(pid))),
        "identity": lambda: frozenset(identity_view(pid)),
    }
    return {what: view() for what, view in taken.items() if what in views}


def dump_kill(hijack: HijackCli, process: RunningFixture, image: Path) -> None:
    """Dump `process` into `image` with --kill (no attach) and check it died of it."""
    hijack.ok("dump", process.pid, "-o", image, "--kill")
    assert process.wait_exit() == -signal.SIGKILL


def shown_json(hijack: HijackCli, image: Path) -> dict[str, Any]:
    """What `show --json` says of `image`."""
    shown: dict[str, Any] = json.loads(hijack.ok("show", "--json", image).stdout)
    return shown


def objects_of(shown: dict[str, Any], record: str) -> list[dict[str, Any]]:
    """The objects of `shown` (shown_json) whose record is `record`."""
    return [o for o in shown["objects"] if o["record"] == record]


def restore_adopted(hijack: HijackCli, process: RunningFixture, image: Path) -> int:
    """Restore `image` and follow `process` into the restored process: its pid."""
    pid = restored_pid(hijack.ok("restore", image))
    process.adopt(pid)
    return pid


def dump_kill_and_restore(hijack: HijackCli, process: RunningFixture, image: Path) -> int:
    """dump_kill, then restore_adopted: the restored pid."""
    dump_kill(hijack, process, image)
    return restore_adopted(hijack, process, image)


def compare_views(before: Views, pid: int, normalize: FdNormalize = same) -> None:
    """Assert the restored process `pid` shows the views `before` again."""
    after = proc_views(pid, normalize)
    for what, old in before.items():
        found = difference(old, after[what])
        assert not found, f"/proc/{pid} {what}:\n{found}"


def assert_recodes(image: Path) -> None:
    """Decoding `image` and encoding it again gives it back byte for byte."""
    recoded = io.BytesIO()
    with open(image, "rb") as source:
        recode(source, recoded)
    assert recoded.getvalue() == image.read_bytes(), f"{image} does not re-encode to itself"


def assert_refused(result: CliResult, *words: str) -> None:
    """Exit 1, one `hijack: ...` line on stderr naming `words`, no traceback."""
    assert result.returncode == 1, result.describe()
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hijack: "), result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    for word in words:
        assert word in lines[0], result.describe()
