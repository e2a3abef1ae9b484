"""Post-copy moves: the process starts at the destination before all its pages are there.

The dirtier fixture rewrites its memory all the time (pages written, zeroed,
dropped, side mappings replaced and mprotected) and, at the end, checks every
page of it against what it last wrote: a page served stale, twice, or as
zeros where it held data fails it. Moved with `--postcopy`, the pages it
wrote during pre-copy's first round are left out of the final image and
reach it on first touch or pushed by the source.

Cut off mid-way (the source node's link down), the copy must be stopped
there, never left running on part of its memory, and both nodes must say so;
the original is held stopped at home as the only whole copy.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from support import RunningFixture, spawn_fixture
from support.nodes import Cluster, Node, link_down, link_up, shaped, two_nodes
from test_faults import finish, hijack_in
from test_move import (
    MOVED_LINE,
    Moved,
    daemon_log,
    finish_moved,
    kill_daemon,
    logs,
    poll_until,
    refusal_line,
    runs_in,
    shadow_status,
)

from hijack.registry import Registry

DIRTY_RATE = "100"  # MB/s the dirtier rewrites
SLOW_LINK_BITS = 128_000_000  # 16 MB/s: slower than the dirtier writes, even on a busy machine
POSTCOPY_LINE = re.compile(r"post-copy: ([\d.]+ \w+) served after the start")


def process_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def signal_masks(*pids: int) -> dict[int, str]:
    """Each thread's blocked signals (SigBlk), by tid, of the processes `pids`."""
    masks = {}
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            found = re.search(r"^SigBlk:\s*(\w+)", status, re.MULTILINE)
            assert found is not None, status
            masks[int(tid)] = found[1]
    return masks


def copy_stopped_and_reported(b: Node) -> int:
    """The pid of the copy node b stopped when its post-copy broke off (b's log says it)."""
    found = poll_until(
        lambda: re.search(r"post-copy broke off .*: process (\d+) is stopped", daemon_log(b)),
        "b reports the post-copy broken off",
    )
    copy = int(found[1])
    assert process_state(copy) == "T"
    return copy


def postcopy_stopped_at_start(a: Node, b: Node, pid: int) -> subprocess.Popen[str]:
    """`hijack move PID --postcopy` from a to b, stopped once the copy runs on b without
    its lazy pages (the test point `move-postcopy`)."""
    assert b.daemon_endpoint is not None
    return hijack_in(a, "move-postcopy", "move", pid, "--to", b.daemon_endpoint, "--postcopy")


def assert_broken_off(mover: subprocess.Popen[str], original: int) -> None:
    """The mover (continued) ends in one line saying the copy is stopped and the original
    held; the original is stopped, not ended: the only whole copy."""
    line = refusal_line(finish(mover, ("move",)))
    assert "post-copy" in line and "held stopped" in line, line
    assert process_state(original) == "T"


def the_original_goes_on(copy: int, original: RunningFixture) -> None:
    """As the line says: the copy killed, the original continued, every page of it as it
    wrote it."""
    os.kill(copy, signal.SIGKILL)
    os.kill(original.pid, signal.SIGCONT)
    original.assert_intact()


def moved_with_postcopy(a: Node, b: Node, pid: int, *options: str) -> Moved:
    """`hijack move PID` from a to b with `options`: it must succeed, some pages served
    after the start; once it returns every page is there, and the original is ended."""
    assert b.daemon_endpoint is not None
    result = a.hijack("move", pid, "--to", b.daemon_endpoint, *options)
    assert result.returncode == 0, f"{result.describe()}\n{logs(a.directory.parent)}"
    found = MOVED_LINE.search(result.stdout)
    assert found is not None, result.describe()
    assert POSTCOPY_LINE.search(result.stdout), result.describe()
    return Moved(int(found[3]), b, float(found[4]), shadow_status(a, pid)["shadow_pid"])


def test_a_postcopy_move_of_a_process_that_keeps_writing_arrives_with_every_page(
    tmp_path: Path,
) -> None:
    with two_nodes(tmp_path) as (a, b):
        with spawn_fixture("dirtier", "64", DIRTY_RATE, netns=a.netns) as dirtier:
            moved = moved_with_postcopy(a, b, dirtier.pid, "--postcopy")
            dirtier.wait_exit()  # the original, ended once the copy had every page
            assert runs_in(moved.pid, b)
            log = daemon_log(b)
            assert re.search(r"post-copy complete in [\d.]+ s: \d+ pages", log), log
            # Its userfaultfd is closed: no range of it is registered any more.
            smaps = Path(f"/proc/{moved.pid}/smaps").read_text()
            assert not re.search(r"^VmFlags:.* um\b", smaps, re.MULTILINE)
            output = finish_moved(dirtier, moved, tmp_path)
        assert "steps" in output


def test_a_move_whose_rounds_do_not_converge_goes_on_with_postcopy_by_itself(
    tmp_path: Path,
) -> None:
    # The dirtier rewrites pages faster than node a's link (shaped to SLOW_LINK_BITS)
    # drains them: each round finds most of what it sent written again, so the rounds
    # never shrink. (On an unshaped link they may converge: the fixture's rate is bounded
    # by its CPU, and a round's size by its length: a round that happens to be short
    # makes the next one small, and the move rightly goes frozen.)
    with (
        two_nodes(tmp_path) as (a, b),
        spawn_fixture("dirtier", "32", "1000", netns=a.netns) as dirtier,
        shaped([a], SLOW_LINK_BITS),
    ):
        moved = moved_with_postcopy(a, b, dirtier.pid)  # no option: the automatic choice
        dirtier.wait_exit()
        finish_moved(dirtier, moved, tmp_path)


def test_children_forked_during_postcopy_see_every_page_their_parent_had(
    tmp_path: Path,
) -> None:
    with two_nodes(tmp_path) as (a, b):
        # Every 20 ms a child checks every page of the buffer as it was at its fork:
        # one forked before the last page arrived reads the missing ones through a
        # userfaultfd of its own (never as zeros).
        # "moved": no child at the freeze (a move takes a process with its children, and
        # so it is a single process moved), the first forks right after the restore.
        with spawn_fixture("dirtier", "64", DIRTY_RATE, "20", "moved", netns=a.netns) as dirtier:
            moved = moved_with_postcopy(a, b, dirtier.pid, "--postcopy")
            dirtier.wait_exit()
            output = finish_moved(dirtier, moved, tmp_path)
            log = daemon_log(b)
        followed = re.search(r"post-copy complete .* (\d+) forks followed", log)
        assert followed is not None and int(followed[1]) > 0, log
        assert re.search(r"\d+ forks", output), output


def test_a_source_cut_off_mid_postcopy_leaves_the_copy_stopped_and_the_original_held(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        # Short waits on a silent peer: the cut is noticed within seconds.
        for node in (a, b):
            node.env["HIJACK_PAGE_TIMEOUT"] = "2"
        a.start_daemon()
        b.start_daemon()
        with spawn_fixture("dirtier", "64", DIRTY_RATE, netns=a.netns) as dirtier:
            mover = postcopy_stopped_at_start(a, b, dirtier.pid)
            link_down(a)  # the source cut off
            try:
                mover.send_signal(signal.SIGCONT)
                assert_broken_off(mover, dirtier.pid)
            finally:
                link_up(a)
            with Registry(a.state_dir) as registry:
                assert registry.get(dirtier.pid).state == "held"
                (record,) = registry.moves()
            assert record.phase == "failed" and "post-copy" in (record.error or ""), record
            # On b: the copy stopped and reported, never running on part of its memory.
            copy = copy_stopped_and_reported(b)
            with Registry(b.state_dir) as registry:
                assert registry.get(copy).state == "held"
            the_original_goes_on(copy, dirtier)


def test_a_destination_daemon_killed_mid_postcopy_leaves_its_copy_stopped_not_on_zeros(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        a.env["HIJACK_PAGE_TIMEOUT"] = "2"
        a.start_daemon()
        b.start_daemon()
        with spawn_fixture("dirtier", "64", DIRTY_RATE, netns=a.netns) as dirtier:
            mover = postcopy_stopped_at_start(a, b, dirtier.pid)
            found = re.search(r"runs here as (\d+)", daemon_log(b))
            assert found is not None, daemon_log(b)
            copy = int(found[1])
            # The daemon serving its pages dies: its userfaultfd with it, but for
            # the keeper's copy, which stops the process.
            kill_daemon(b)
            mover.send_signal(signal.SIGCONT)
            assert_broken_off(mover, dirtier.pid)
            poll_until(lambda: process_state(copy) == "T", f"the copy {copy} stopped")
            the_original_goes_on(copy, dirtier)


def test_a_mover_killed_mid_postcopy_is_settled_by_recover_without_ending_the_original(
    tmp_path: Path,
) -> None:
    with (
        two_nodes(tmp_path) as (a, b),
        spawn_fixture("dirtier", "64", DIRTY_RATE, netns=a.netns) as dirtier,
    ):
        masks = signal_masks(dirtier.pid)
        mover = postcopy_stopped_at_start(a, b, dirtier.pid)
        mover.kill()  # the page server gone: its connection closes
        mover.wait()
        copy = copy_stopped_and_reported(b)
        # The kernel let the original go at the mover's death: the queued SIGSTOP holds it,
        # each thread as it stopped (the calls injected in it all put back).
        poll_until(lambda: process_state(dirtier.pid) == "T", "the original stopped")
        assert signal_masks(dirtier.pid) == masks
        settled = a.hijack_ok("recover").stdout
        assert "interrupted during post-copy" in settled, settled
        assert process_state(dirtier.pid) == "T"  # recover ends no copy of it
        with Registry(a.state_dir) as registry:
            assert registry.get(dirtier.pid).state == "held"
            (record,) = registry.moves()
        assert record.phase == "failed", record
        the_original_goes_on(copy, dirtier)
