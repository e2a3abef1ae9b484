"""Post-copy moves of a tree: every member starts at the destination before all its pages
are there.

The tree_dirtier fixture is a parent and its children, each rewriting its own pages of
a region they share copy-on-write since the fork (and dropping some); at the end each
member checks every page of it against what it last wrote (a page served stale, to the
wrong member, or as zeros where it held data fails it). Moved with `--postcopy`, the
pages each member wrote since pre-copy's first round are left out of the final image
and reach it on first touch or pushed by the source, one page server for the whole tree.

Cut off mid-way (the source node's link down), every member there must be stopped, never
some running on part of their memory, and both nodes must say so; the originals are held
stopped at home as the only whole copy.
"""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from support import RunningFixture, spawn_fixture
from support.nodes import Cluster, link_down, link_up, shaped, two_nodes
from test_faults import finish, hijack_in
from test_move import (
    Moved,
    daemon_log,
    finish_moved,
    kill_daemon,
    poll_until,
    refusal_line,
    shadow_status,
)
from test_postcopy import POSTCOPY_LINE, SLOW_LINK_BITS, process_state, signal_masks
from test_tree_move import move_tree, wait_members

from hijack.process.tree import read_tree
from hijack.registry import Registry

CHILDREN = 3
MIB = 32
# Pages each member rewrites every 10 ms: 4 members x 64 pages = 100 MB/s nominal, far
# more than the shaped link drains (the fixture's real rate is bounded by its CPU).
PAGES_PER_TICK = "64"


def spawn_tree(netns: str) -> RunningFixture:
    """The tree_dirtier in `netns` (node a's)."""
    return spawn_fixture("tree_dirtier", str(CHILDREN), str(MIB), PAGES_PER_TICK, netns=netns)


def moved_by_postcopy(printed: str) -> None:
    assert POSTCOPY_LINE.search(" ".join(printed.split())), printed


def test_a_tree_moved_with_postcopy_arrives_with_every_members_pages(tmp_path: Path) -> None:
    with two_nodes(tmp_path) as (a, b), spawn_tree(a.netns) as tree:
        wait_members(tree.pid, CHILDREN + 1)
        there, printed = move_tree(a, tree.pid, b, "--postcopy")
        moved_by_postcopy(printed)
        log = daemon_log(b)
        complete = re.search(r"post-copy complete in [\d.]+ s: (\d+) pages", log)
        assert complete is not None and int(complete[1]) > 0, log
        assert re.search(r"post-copy of \d+ KiB of \d+ members of the tree", log), log
        tree.wait_exit()  # the original, ended once every member had every page
        # Every member's userfaultfd is closed: no range of any is registered any more.
        for member in read_tree(there).pids:
            smaps = Path(f"/proc/{member}/smaps").read_text()
            assert not re.search(r"^VmFlags:.* um\b", smaps, re.MULTILINE), member
        shadow = int(shadow_status(a, tree.pid)["shadow_pid"])
        finish_moved(tree, Moved(there, b, 0.0, shadow), tmp_path)


def test_a_tree_whose_rounds_do_not_converge_goes_on_with_postcopy_by_itself(
    tmp_path: Path,
) -> None:
    # Node a's link drains 16 MB/s: the members rewrite their pages faster than that, the
    # tree's rounds never shrink (as test_postcopy's single dirtier's).
    with (
        two_nodes(tmp_path) as (a, b),
        spawn_tree(a.netns) as tree,
        shaped([a], SLOW_LINK_BITS),
    ):
        wait_members(tree.pid, CHILDREN + 1)
        there, printed = move_tree(a, tree.pid, b)  # no option: the automatic choice
        moved_by_postcopy(printed)
        tree.wait_exit()
        shadow = int(shadow_status(a, tree.pid)["shadow_pid"])
        finish_moved(tree, Moved(there, b, 0.0, shadow), tmp_path)


def test_a_source_cut_off_mid_postcopy_stops_every_member_of_the_copy_and_holds_the_tree(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        # Short waits on a silent peer: the cut is noticed within seconds.
        for node in (a, b):
            node.env["HIJACK_PAGE_TIMEOUT"] = "2"
        a.start_daemon()
        b.start_daemon()
        with spawn_tree(a.netns) as tree:
            wait_members(tree.pid, CHILDREN + 1)
            originals = list(read_tree(tree.pid).pids)
            assert b.daemon_endpoint is not None
            mover = hijack_in(
                a, "move-postcopy", "move", tree.pid, "--to", b.daemon_endpoint, "--postcopy"
            )
            link_down(a)  # the source cut off, the copies running there without some pages
            try:
                mover.send_signal(signal.SIGCONT)
                line = refusal_line(finish(mover, ("move",)))
            finally:
                link_up(a)
            assert "post-copy" in line and "held stopped" in line, line
            # Every original stopped, not ended: the only whole copy of the tree.
            for member in originals:
                assert process_state(member) == "T", member
            with Registry(a.state_dir) as registry:
                assert registry.get(tree.pid).state == "held"
                (record,) = registry.moves()
            assert record.phase == "failed" and "post-copy" in (record.error or ""), record
            # On b: every member of the copy stopped and reported, those with their whole
            # memory too: none runs on without the others.
            found = poll_until(
                lambda: re.search(
                    r"post-copy broke off .*: the tree of process (\d+) is stopped here"
                    r" \(every member: ([\d ]+)\)",
                    daemon_log(b),
                ),
                "b reports the tree's post-copy broken off",
            )
            copies = [int(pid) for pid in found[2].split()]
            assert len(copies) == CHILDREN + 1, found[0]
            for copy in copies:
                assert process_state(copy) == "T", copy
            with Registry(b.state_dir) as registry:
                assert registry.get(int(found[1])).state == "held"
            # As the line says: the copies killed, every original continued, every page
            # of every member as it wrote it.
            for copy in copies:
                os.kill(copy, signal.SIGKILL)
            for member in originals:
                os.kill(member, signal.SIGCONT)
            # Its home shadow relays to the copy (switched at the commit) and holds a copy
            # of every member's descriptors, the pipe that lets the children finish
            # among them: ended, as the copy it stands for is (docs/faults.md).
            shadow = int(shadow_status(a, tree.pid)["shadow_pid"])
            os.kill(shadow, signal.SIGKILL)
            tree.assert_intact()


def test_a_destination_daemon_killed_mid_postcopy_leaves_every_member_stopped(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        a.env["HIJACK_PAGE_TIMEOUT"] = "2"
        a.start_daemon()
        b.start_daemon()
        with spawn_tree(a.netns) as tree:
            wait_members(tree.pid, CHILDREN + 1)
            originals = list(read_tree(tree.pid).pids)
            assert b.daemon_endpoint is not None
            mover = hijack_in(
                a, "move-postcopy", "move", tree.pid, "--to", b.daemon_endpoint, "--postcopy"
            )
            found = re.search(r"runs here as (\d+)", daemon_log(b))
            assert found is not None, daemon_log(b)
            copies = list(read_tree(int(found[1])).pids)
            assert len(copies) == CHILDREN + 1, copies
            # The daemon serving their pages dies: the members' keepers (holding copies
            # of their userfaultfds) stop every member, whole or not.
            kill_daemon(b)
            mover.send_signal(signal.SIGCONT)
            line = refusal_line(finish(mover, ("move",)))
            assert "post-copy" in line and "held stopped" in line, line
            for copy in copies:
                poll_until(lambda copy=copy: process_state(copy) == "T", f"the copy {copy} stopped")
            for member in originals:
                assert process_state(member) == "T", member
            for copy in copies:
                os.kill(copy, signal.SIGKILL)
            for member in originals:
                os.kill(member, signal.SIGCONT)
            os.kill(int(shadow_status(a, tree.pid)["shadow_pid"]), signal.SIGKILL)
            tree.assert_intact()


def test_a_mover_killed_mid_postcopy_of_a_tree_is_settled_by_recover_ending_no_original(
    tmp_path: Path,
) -> None:
    with two_nodes(tmp_path) as (a, b), spawn_tree(a.netns) as tree:
        wait_members(tree.pid, CHILDREN + 1)
        originals = list(read_tree(tree.pid).pids)
        masks = signal_masks(*originals)
        assert b.daemon_endpoint is not None
        mover = hijack_in(
            a, "move-postcopy", "move", tree.pid, "--to", b.daemon_endpoint, "--postcopy"
        )
        mover.kill()  # the page server gone: its connection closes
        mover.wait()
        found = poll_until(
            lambda: re.search(r"every member: ([\d ]+)\)", daemon_log(b)),
            "b reports the tree's post-copy broken off",
        )
        copies = [int(pid) for pid in found[1].split()]
        for copy in copies:
            assert process_state(copy) == "T", copy
        # The kernel let the originals go at the mover's death: the queued SIGSTOP holds them,
        # each thread as it stopped (the calls injected in it all put back: a thread left on
        # our registers would run on from the injection's syscall instruction, its mask
        # blocking every signal).
        for member in originals:
            poll_until(lambda member=member: process_state(member) == "T", f"{member} stopped")
        assert signal_masks(*originals) == masks
        settled = a.hijack_ok("recover").stdout
        assert "interrupted during post-copy" in settled and "every member" in settled, settled
        for member in originals:
            assert process_state(member) == "T", member  # recover ends no copy of it
        with Registry(a.state_dir) as registry:
            assert registry.get(tree.pid).state == "held"
        for copy in copies:
            os.kill(copy, signal.SIGKILL)
        for member in originals:
            os.kill(member, signal.SIGCONT)
        os.kill(int(shadow_status(a, tree.pid)["shadow_pid"]), signal.SIGKILL)
        tree.assert_intact()
