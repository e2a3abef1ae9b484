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
from pathlib import Path

from support import spawn_fixture
from support.cli import HijackCli, restored_pid
from support.objects import hijack
from test_tree_restore import dump_kill_tree

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
