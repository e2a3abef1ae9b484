"""What the members of a tree share beyond descriptions: stored once, restored as sharing.

The tree_cow fixture: a parent fills private memory, forks children, and each
member then writes pages of its own. Dumped with --kill, the pages all members
still share copy-on-write are stored once (the first member's image holds
them, the others' refer to it: PAGE_REFERENCE), so the image is about one copy
plus the diverged pages, not one copy per member; `hijack show` says how much
each member's image holds and how much was stored once. Restored, every member
checks every page: those it shared and those it wrote.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import spawn_fixture
from support.cli import HijackCli, restored_pid
from support.objects import assert_refused, hijack
from test_tree_restore import FORKPTY_PROGRAM, dump_kill_tree, reap_killed

from hijack.sys import kcmp

__all__ = ["hijack"]  # a fixture, used by name

MIB = 1024 * 1024
PAGE = 4096
CHILDREN = 4
REGION_MIB = 16
DIVERGED_PAGES = 64  # each member's own, after the fork (tree_cow.c's DIVERGED)


def test_pages_shared_copy_on_write_are_stored_once(hijack: HijackCli, tmp_path: Path) -> None:
    image = tmp_path / "cow.crf"
    with spawn_fixture("tree_cow", str(CHILDREN), str(REGION_MIB), fifos=True) as tree:
        children = [int(pid) for pid in tree.ready.values()]
        assert len(children) == CHILDREN
        dump_kill_tree(hijack, tree, image)

        one_copy = REGION_MIB * MIB
        diverged = (CHILDREN + 1) * DIVERGED_PAGES * PAGE
        size = image.stat().st_size
        # The region once (the parent's pages, and the first child's where the parent wrote
        # over its own), each member's own pages, and one member's libraries and stacks.
        assert size < one_copy + diverged + DIVERGED_PAGES * PAGE + 4 * MIB, size
        assert size < (CHILDREN + 1) * one_copy / 3, "well below one copy per member"

        shown = json.loads(hijack.ok("show", "--json", image).stdout)
        referenced = {
            int(pid): body["pages"]["referenced"] for pid, body in shown["images"].items()
        }
        assert referenced[tree.pid] == 0, "the root's image refers to nothing: it is first"
        region_pages = one_copy // PAGE
        for child in children:
            # A child's shared pages (all but its own) are another member's.
            assert referenced[child] >= region_pages - 2 * DIVERGED_PAGES, referenced
        text = hijack.ok("show", image).stdout
        assert "stored once" in text and "referred to" in text, text

        assert restored_pid(hijack.ok("restore", image)) == tree.pid
        tree.adopt(tree.pid)
        # Each member checks every page of its region: shared and its own.
        tree.assert_intact()


def pss_kib(pids: list[int]) -> int:
    """The members' memory, each page shared by N counted 1/N in each (smaps_rollup)."""
    total = 0
    for pid in pids:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        total += int(rollup.split("Pss:")[1].split()[0])
    return total


SHARED_MIB = 64


def test_a_restored_tree_shares_its_copy_on_write_pages_again(
    hijack: HijackCli, tmp_path: Path
) -> None:
    """Dumped with --kill and restored, the children are forked from their parent once its
    memory is rebuilt and keep its pages copy-on-write: the tree holds the region about
    once again (the sum of the members' PSS), not once per member. Let go, each child
    writes over pages all members share and checks its region; the parent, after them,
    finds none of their writes (copy-on-write intact)."""
    image = tmp_path / "cow.crf"
    with spawn_fixture("tree_cow", str(CHILDREN), str(SHARED_MIB), fifos=True) as tree:
        pids = [tree.pid, *(int(pid) for pid in tree.ready.values())]
        before = pss_kib(pids)
        dump_kill_tree(hijack, tree, image)
        restored = hijack.ok("restore", image)
        assert restored_pid(restored) == tree.pid
        tree.adopt(tree.pid)
        after = pss_kib(pids)
        region = SHARED_MIB * 1024
        own = (CHILDREN + 1) * DIVERGED_PAGES * PAGE // 1024
        # The region once, each member's own pages, libraries and stacks (a few MiB);
        # unshared it would be CHILDREN + 1 regions.
        assert after < region + 2 * own + 8 * 1024, (before, after)
        assert after < before * 1.25 + 4 * 1024, (before, after)
        tree.assert_intact()


CONTEXTS = {"files": kcmp.KCMP_FILES, "fs": kcmp.KCMP_FS}


def contexts_shared(pid: int, other: int) -> set[str]:
    return {name for name, kind in CONTEXTS.items() if kcmp.shares_context(pid, other, kind)}


@pytest.mark.parametrize(
    ("mode", "flags", "attached"),
    [
        ("files", "FILES", False),
        ("fs", "FS", False),
        ("both", "FS|FILES", False),
        ("both", "FS|FILES", True),
    ],
    ids=["files", "fs", "both", "both-attached"],
)
def test_a_descriptor_table_or_fs_context_shared_with_the_parent_is_shared_again(
    hijack: HijackCli, tmp_path: Path, mode: str, flags: str, attached: bool
) -> None:
    """A child made by clone(CLONE_FILES), clone(CLONE_FS) or both is cloned so again from
    its parent at the restore: once restored, the file it opens, the directory it enters
    and the umask it sets are its parent's too (the fixture checks), and not where they
    share nothing. Attached first, its shadow's descriptors go to the table once."""
    image = tmp_path / "contexts.crf"
    opened, entered = tmp_path / "opened", tmp_path / "entered"
    opened.write_text("the child opens me\n")
    entered.mkdir()
    with spawn_fixture("tree_contexts", mode, opened, entered, fifos=True) as tree:
        child = int(tree.ready["child"])
        shared = contexts_shared(tree.pid, child)
        assert shared == ({"files", "fs"} if mode == "both" else {mode})
        if attached:
            hijack.ok("attach", tree.pid)
        dump_kill_tree(hijack, tree, image)
        shown = json.loads(hijack.ok("show", "--json", image).stdout)
        assert shown["contexts"] == [{"pid": child, "flags": flags}]
        assert "with its parent" in hijack.ok("show", image).stdout

        assert restored_pid(hijack.ok("restore", image)) == tree.pid
        tree.adopt(tree.pid)
        assert contexts_shared(tree.pid, child) == shared
        if attached:
            (row,) = json.loads(hijack.ok("status", "--json").stdout)["processes"]
            assert (row["pid"], row["state"]) == (tree.pid, "attached"), row
            hijack.ok("detach", tree.pid)
        tree.assert_intact()


def test_a_child_sharing_its_parent_s_memory_is_not_killed(
    hijack: HijackCli, tmp_path: Path
) -> None:
    """clone(CLONE_VM | CLONE_SIGHAND) without CLONE_THREAD (CLONE_SIGHAND comes only with
    CLONE_VM) is refused by name before the kill: the tree runs on."""
    image = tmp_path / "vm.crf"
    opened, entered = tmp_path / "opened", tmp_path / "entered"
    opened.write_text("")
    entered.mkdir()
    with spawn_fixture("tree_contexts", "vm", opened, entered, fifos=True) as tree:
        child = int(tree.ready["child"])
        refused = hijack("dump", tree.pid, "-o", image, "--kill")
        assert_refused(
            refused,
            f"not killing the tree of process {tree.pid}",
            f"process {child} (tree_contexts) shares its memory (CLONE_VM) with process {tree.pid}",
        )
        assert "CLONE_SIGHAND" in refused.stderr
        assert not image.exists()
        tree.assert_intact()


def test_a_tree_killed_skipping_what_it_shares_says_what_will_be_copied(
    hijack: HijackCli, tmp_path: Path
) -> None:
    """With --skip-unsupported, a tree whose members share what a restore would make once
    for each (forkpty: the master in the parent, the slave in the child) is killed, and
    the dump says, by name, what its restore will not share."""
    process = subprocess.Popen([sys.executable, "-c", FORKPTY_PROGRAM], stdout=subprocess.PIPE)
    child = 0
    try:
        assert process.stdout is not None
        words = process.stdout.readline().split()
        assert words[0] == b"ready", words
        child = int(words[1])
        dumped = hijack.ok(
            "dump", process.pid, "-o", tmp_path / "pty.crf", "--kill", "--skip-unsupported"
        )
        assert "not shared after a restore (--skip-unsupported)" in dumped.stdout, dumped.stdout
        assert "holds the master of pty /dev/pts/" in dumped.stdout
        assert process.wait() == -signal.SIGKILL
    finally:
        process.kill()
        process.wait()
        if child:
            reap_killed([child])
