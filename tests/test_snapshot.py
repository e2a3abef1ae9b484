"""`hijack dump PID` without --kill: a copy-on-write snapshot, the process frozen only to fork.

The image must be the process exactly as it was at the freeze, although its
memory is read while the process runs on: the `snapcount` fixture keeps each
thread's count both in a register and in memory, and a restored thread whose
memory is ahead of (or behind) its registers fails its very next step.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support import spawn_fixture
from support.cli import HijackCli, restored_pid
from test_tree_restore import kill_tree, reap_killed

from hijack.image.codec import read_image, recode, skip_rounds
from hijack.image.records import ContentsKind, Pages, Segments, Thread
from hijack.sys import procfs

FROZEN = re.compile(r"frozen (\d+\.\d)\s+ms")  # (the console may wrap a long line there)


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


# -- by pre-copy rounds (hijack.mutator.snapshot_rounds) ----------------------------------

ROUNDS_LINE = re.compile(r"in (\d+) pre-copy rounds? while it ran")


def rounds_in(image: Path) -> int:
    with open(image, "rb") as stream:
        return skip_rounds(stream)[1]


def test_a_snapshot_by_rounds_is_the_state_at_the_freeze_threads_and_all(tmp_path: Path) -> None:
    """The counters fixture (4 threads) counts on through the rounds: each thread's memory
    must come back equal to its registers, as read at the freeze, not as a round read it."""
    hijack = HijackCli(tmp_path / "state")
    image = tmp_path / "rounds.crf"
    with spawn_fixture("snapcount", fifos=True) as counting:
        result = hijack.ok("dump", counting.pid, "-o", image, "--snapshot", "rounds")
        assert FROZEN.search(result.stdout), result.describe()
        said = ROUNDS_LINE.search(result.stdout)
        assert said, result.describe()
        assert rounds_in(image) == int(said[1]) >= 1
        with open(image, "rb") as stream:
            records = list(read_image(skip_rounds(stream)[0]))
        assert sum(isinstance(r, Thread) for r in records) == 4
        segments = next(r for r in records if isinstance(r, Segments)).segments
        assert any(s.contents is ContentsKind.PRECOPIED for s in segments)
        # `show` reads it: the rounds, and what the PRECOPIED segments hold with them.
        shown = hijack.ok("show", image).stdout
        assert "pre-copy round" in shown, shown
        document = json.loads(hijack.ok("show", "--json", image).stdout)
        assert len(document["rounds"]) == int(said[1])
        assert document["rounds"][0]["pages"] > 0
        assert document["image_bytes"] == image.stat().st_size
        # The codec re-encodes it to itself, rounds included.
        recoded = io.BytesIO()
        with open(image, "rb") as source:
            recode(source, recoded)
        assert recoded.getvalue() == image.read_bytes()
        # A core of it: the rounds' pages under the image's.
        hijack.ok("core", image, "-o", tmp_path / "rounds.core")
        assert (tmp_path / "rounds.core").stat().st_size > 0
        old_pid = counting.pid
        os.kill(old_pid, signal.SIGKILL)
        assert counting.wait_exit() == -signal.SIGKILL
        pid = restored_pid(hijack.ok("restore", image))
        assert pid == old_pid
        counting.adopt(pid)
        counting.assert_intact()
    assert "PASS snapcount" in counting.stdout


def test_a_snapshot_by_rounds_of_a_process_rewriting_dropping_and_remapping(
    tmp_path: Path,
) -> None:
    """The dirtier rewrites, zeroes, drops (MADV_DONTNEED) and remaps its memory while the
    rounds are written: later rounds' pages and the freeze's must override earlier ones,
    dropped pages come back as zeros, remapped mappings as they were at the freeze."""
    hijack = HijackCli(tmp_path / "state")
    image = tmp_path / "dirtier.crf"
    with spawn_fixture("dirtier", "32", "200", fifos=True) as dirtier:
        hijack.ok("dump", dirtier.pid, "-o", image, "--snapshot", "rounds")
        assert rounds_in(image) >= 1
        old_pid = dirtier.pid
        os.kill(old_pid, signal.SIGKILL)
        assert dirtier.wait_exit() == -signal.SIGKILL
        # From stdin: the rounds are read as they come, as a move's destination reads them.
        with open(image, "rb") as stream:
            restored = hijack.ok("restore", "-", stdin=stream)
        dirtier.adopt(restored_pid(restored))
        dirtier.assert_intact()


def test_a_small_process_is_snapshot_by_a_fork(tmp_path: Path) -> None:
    """auto: below ROUNDS_MIN_BYTES of private memory the fork's freeze is the shorter."""
    hijack = HijackCli(tmp_path / "state")
    image = tmp_path / "small.crf"
    with spawn_fixture("snapcount") as counting:
        result = hijack.ok("dump", counting.pid, "-o", image)
        assert not ROUNDS_LINE.search(result.stdout), result.describe()
        assert rounds_in(image) == 0
        counting.assert_intact()


def test_dump_kill_refuses_a_snapshot_choice(tmp_path: Path) -> None:
    hijack = HijackCli(tmp_path / "state")
    with spawn_fixture("snapcount") as counting:
        refused = hijack(
            "dump", counting.pid, "-o", tmp_path / "x.crf", "--kill", "--snapshot", "rounds"
        )
        assert refused.returncode == 1, refused.describe()
        assert refused.stderr.count("\n") == 1 and "--snapshot" in refused.stderr, (
            refused.describe()
        )
        counting.assert_intact()


# -- a tree (hijack.mutator.snapshot.snapshot_tree_dump) -----------------------------------

TREE_CHILDREN, TREE_MIB, TREE_PAGES_PER_TICK = 3, 16, "4"


def test_a_tree_s_snapshot_is_every_member_at_one_freeze_while_it_runs_on(
    tmp_path: Path,
) -> None:
    """tree_dirtier's members keep rewriting pages they share copy-on-write since the fork,
    remembering in their own memory what each holds, and count in memory all of them share
    (MAP_SHARED, a memfd) and in their own. A plain dump of the tree freezes every member
    only to read what a copy cannot tell and to fork its copy; their pages are read from
    the copies while they run on. Restored once the original is gone, each member finds
    every page as it last wrote it and its count equal to the shared slots: an image read
    member by member while they ran would have pages newer than their records, and own
    counts ahead of the shared ones. Pages the members share are still stored once."""
    hijack = HijackCli(tmp_path / "state")
    image = tmp_path / "tree.crf"
    with (
        contextlib.ExitStack() as stack,
        spawn_fixture(
            "tree_dirtier", str(TREE_CHILDREN), str(TREE_MIB), TREE_PAGES_PER_TICK, fifos=True
        ) as tree,
    ):
        children = [int(pid) for pid in tree.ready.values()]
        stack.callback(kill_tree, children)  # the fixture ends its root only
        dumped = hijack.ok("dump", tree.pid, "-o", image)
        said = " ".join(dumped.stdout.split())  # as one line (the console wraps long paths)
        assert "the tree of process" in said, dumped.describe()
        assert "left running" in said and FROZEN.search(said), dumped.describe()
        shown = json.loads(hijack.ok("show", "--json", image).stdout)
        assert sorted(int(pid) for pid in shown["images"]) == sorted([tree.pid, *children])
        referenced = sum(body["pages"]["referenced"] for body in shown["images"].values())
        # (Fewer as they write on: each child's region once at least.)
        assert referenced > TREE_CHILDREN * TREE_MIB * 256 // 2, shown["images"]
        assert_shared_memory_stored_once(shown, tree.pid)
        # No copy left behind: each member's children are what they were.
        assert Path(f"/proc/{tree.pid}/task/{tree.pid}/children").read_text().split() == [
            str(pid) for pid in children
        ]
        for child in children:
            assert Path(f"/proc/{child}/task/{child}/children").read_text().split() == []
        # The tree runs on after the dump (it writes: its CPU time grows).
        ran = procfs.read_stat(tree.pid).utime
        wait_until(lambda: procfs.read_stat(tree.pid).utime > ran, "the original running on")
        for pid in (*children, tree.pid):
            os.kill(pid, signal.SIGKILL)
        assert tree.wait_exit() == -signal.SIGKILL
        reap_killed(children)
        assert restored_pid(hijack.ok("restore", image)) == tree.pid
        tree.adopt(tree.pid)
        tree.assert_intact()


def test_a_tree_whose_member_shares_its_parent_s_memory_is_dumped_stopped_throughout(
    tmp_path: Path,
) -> None:
    """A member made by clone(CLONE_VM) has no memory of its own to fork a copy of: its
    tree is dumped stopped throughout, as before the tree snapshot, and comes back whole."""
    hijack = HijackCli(tmp_path / "state")
    image = tmp_path / "vm.crf"
    with contextlib.ExitStack() as stack, spawn_fixture("tree_vm", fifos=True) as tree:
        child = int(tree.ready["child"])
        stack.callback(kill_tree, [child])  # the fixture ends its root only
        dumped = hijack.ok("dump", tree.pid, "-o", image)
        assert "left running" in " ".join(dumped.stdout.split()), dumped.describe()
        shown = json.loads(hijack.ok("show", "--json", image).stdout)
        assert shown["contexts"] == [{"pid": child, "flags": "VM|SIGHAND"}]
        for pid in (child, tree.pid):
            os.kill(pid, signal.SIGKILL)
        assert tree.wait_exit() == -signal.SIGKILL
        reap_killed([child])
        assert restored_pid(hijack.ok("restore", image)) == tree.pid
        tree.adopt(tree.pid)
        tree.assert_intact()


def assert_shared_memory_stored_once(shown: dict[str, Any], root: int) -> None:
    """tree_dirtier's MAP_SHARED anonymous page and memfd, in every member's image: their
    bytes in the root's, each child's record naming it (docs/crf.md §7b, version 10)."""
    for pid, body in shown["images"].items():
        memory = [o for o in body["objects"] if o["record"] in ("SharedAnonymous", "MemfdObject")]
        assert len(memory) == 2, memory
        if int(pid) == root:
            assert all(o["bytes_in"] == 0 and o["data_bytes"] > 0 for o in memory), memory
        else:
            assert all(o["bytes_in"] == root and o["data_bytes"] == 0 for o in memory), memory


@pytest.mark.parametrize("attached", [False, True], ids=["dumped", "attached"])
def test_a_tree_killed_stores_the_memory_its_members_share_once(
    tmp_path: Path, attached: bool
) -> None:
    """dump --kill (the tree stopped throughout): the bytes of the memory the members share
    are in the root's image only, and the restored tree shares them again (each member
    finds every member's count in both shared pages). Attached first, the members'
    descriptors come back from their shadow."""
    hijack = HijackCli(tmp_path / "state")
    image = tmp_path / "killed.crf"
    with (
        contextlib.ExitStack() as stack,
        spawn_fixture(
            "tree_dirtier", str(TREE_CHILDREN), "4", TREE_PAGES_PER_TICK, fifos=True
        ) as tree,
    ):
        children = [int(pid) for pid in tree.ready.values()]
        stack.callback(kill_tree, children)  # the fixture ends its root only
        if attached:
            hijack.ok("attach", tree.pid)
        hijack.ok("dump", tree.pid, "-o", image, "--kill")
        assert tree.wait_exit() == -signal.SIGKILL
        reap_killed(children)
        assert_shared_memory_stored_once(
            json.loads(hijack.ok("show", "--json", image).stdout), tree.pid
        )
        assert restored_pid(hijack.ok("restore", image)) == tree.pid
        tree.adopt(tree.pid)
        if attached:
            hijack.ok("detach", tree.pid)
        tree.assert_intact()
