"""Dumping a forked tree (issue #13 item 3): pages shared copy-on-write since a fork are
stored once.

tree_cow: a parent fills SIZE MiB, forks 8 children, each member then writes 64
pages of its own. Its dump (members left running: a snapshot) is set beside the dump of
the same memory in one process (tree_cow with no child): the image's size as a
ratio, the time the members were frozen, and the tree's PSS before and after
(a dump must not unshare what the members share). Then the tree is dumped with
--kill and restored: its PSS after the restore beside the original's (the
children are forked from their rebuilt parent and share its pages again), and
every member checks its pages.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.testnodes import spawn_fixture
from hijack.mutator.dump import DumpResult, dump
from hijack.restore.tree import restore_image
from hijack.sys.process import set_child_subreaper

CHILDREN = 8
SIZE_LIMIT = 1.2  # the tree's image at most this many times the one process's
CHECK_TIMEOUT = 600.0  # s: 9 members each checking 256 MiB on a loaded machine
RESTORED_LIMIT = 1.2  # the restored tree's PSS at most this many times the original's


def _pss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        total += int(rollup.split("Pss:")[1].split()[0])
    return total


def _dump_tree_cow(children: int, size_mib: int, directory: Path) -> tuple[DumpResult, int, int]:
    """Dump a tree_cow of `children` children: its result, and its PSS before and after."""
    with spawn_fixture("tree_cow", str(children), str(size_mib), fifos=True) as tree:
        pids = [tree.pid, *(int(pid) for pid in tree.ready.values())]
        before = _pss_kib(pids)
        with open(directory / "tree.crf", "wb") as out:
            result = dump(tree.pid, out, check_descriptors=False)
        after = _pss_kib(pids)
        tree.assert_intact(CHECK_TIMEOUT)
    return result, before, after


def _restore_tree_cow(size_mib: int, directory: Path) -> tuple[int, int, float]:
    """Dump a tree_cow of CHILDREN children with --kill and restore it: its PSS before and
    after, and the restore's time (s)."""
    set_child_subreaper()  # the killed children are ours to reap, their pids free again
    with spawn_fixture("tree_cow", str(CHILDREN), str(size_mib), fifos=True) as tree:
        children = [int(pid) for pid in tree.ready.values()]
        pids = [tree.pid, *children]
        before = _pss_kib(pids)
        image = directory / "killed.crf"
        with open(image, "wb") as out:
            dump(tree.pid, out, check_descriptors=False, kill=True)
        tree.wait_exit()
        for child in children:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(child, 0)
        started = time.monotonic()
        with open(image, "rb") as stream:
            restore_image(stream)
        took = time.monotonic() - started
        tree.adopt(tree.pid)
        after = _pss_kib(pids)
        tree.assert_intact(CHECK_TIMEOUT)
    return before, after, took


def measure_tree_dumps(size_mib: int) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="hijack-bench-tree-", dir="/tmp") as name:
        directory = Path(name)
        alone, _, _ = _dump_tree_cow(0, size_mib, directory)
        tree, before, after = _dump_tree_cow(CHILDREN, size_mib, directory)
        original, restored, took = _restore_tree_cow(size_mib, directory)
    ratio = tree.image_bytes / alone.image_bytes
    met = "met" if ratio <= SIZE_LIMIT else "NOT met"
    mib = 1024 * 1024
    return [
        f"tree dump, 1 + {CHILDREN} children sharing {size_mib} MiB copy-on-write:"
        f" image {tree.image_bytes / mib:.1f} MiB ({tree.pages_referenced} pages stored once),"
        f" one process {alone.image_bytes / mib:.1f} MiB: ratio {ratio:.2f},"
        f" limit {SIZE_LIMIT:.2f}: {met}; the tree frozen {tree.frozen_ms:.0f} ms (a snapshot:"
        f" each member forks a copy within one freeze, its pages read from it after);"
        f" tree PSS {before // 1024} MiB before the dump, {after // 1024} MiB after",
        f"tree restore, 1 + {CHILDREN} children sharing {size_mib} MiB copy-on-write (dump"
        f" --kill, restore): memory (sum of PSS) {restored // 1024} MiB restored, original"
        f" {original // 1024} MiB: x{restored / original:.2f}, limit x{RESTORED_LIMIT:.2f}:"
        f" {'met' if restored <= original * RESTORED_LIMIT else 'NOT met'}; restored in"
        f" {took:.1f} s",
    ]


if __name__ == "__main__":
    for line in measure_tree_dumps(int(sys.argv[1]) if len(sys.argv) > 1 else 256):
        print(line)
