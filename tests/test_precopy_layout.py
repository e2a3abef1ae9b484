"""Pre-copy of a process whose memory layout changes between the rounds and the freeze.

Adjacent mappings of one kind merge into one VMA: what the first round saw as two
segments the freeze sees as one. Each part the destination holds from the rounds is
carried (PRECOPIED); only what was written since goes in the frozen image.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

from support import spawn_fixture
from support.nodes import two_nodes
from test_faults import finish, hijack_in, wait_stopped
from test_move import MOVED_LINE, Moved, finish_moved, logs, poll_until, shadow_status

from hijack.sys import procfs

FROZEN = re.compile(r"pre-copy rounds, ([\d.]+) (KiB|MiB|GiB|B) while frozen")
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def one_mapping_holds(pid: int, start: int, end: int) -> bool:
    return any(m.start <= start and end <= m.end for m in procfs.read_maps(pid))


def test_mappings_merged_since_the_first_round_are_carried_not_sent_frozen(
    tmp_path: Path,
) -> None:
    with (
        two_nodes(tmp_path) as (a, b),
        spawn_fixture("merging_maps", netns=a.netns) as fixture,
    ):
        big, small = int(fixture.ready["big"], 16), int(fixture.ready["small"], 16)
        assert not one_mapping_holds(fixture.pid, small, big + 1), "merged before the move"
        assert b.daemon_endpoint is not None
        mover = hijack_in(
            a, "move-first-round", "move", fixture.pid, "--to", b.daemon_endpoint, "--precopy"
        )
        # Between the first round and the freeze: the small mapping made read-write, one
        # VMA with the big one (8 MiB) and written anew.
        fixture.send(b"m")
        poll_until(
            lambda: one_mapping_holds(fixture.pid, small, big + 1), "the two mappings merged"
        )
        mover.send_signal(signal.SIGCONT)
        result = finish(mover, ("move",))
        assert result.returncode == 0, f"{result.describe()}\n{logs(tmp_path)}"
        print(result.stdout)
        found, frozen = MOVED_LINE.search(result.stdout), FROZEN.search(result.stdout)
        assert found is not None and frozen is not None, result.describe()
        # The small mapping's 64 KiB and the stack's pages, not the big one's 8 MiB again.
        assert float(frozen[1]) * UNITS[frozen[2]] < 1 << 20, result.stdout
        fixture.wait_exit()  # the original, killed by the move
        moved = Moved(
            int(found[3]), b, float(found[4]), shadow_status(a, fixture.pid)["shadow_pid"]
        )
        finish_moved(fixture, moved, tmp_path)


def test_a_layout_changed_just_before_the_stop_has_the_process_let_go_and_stopped_again(
    tmp_path: Path,
) -> None:
    """The mapping merged after the VmFlags were read, before the stop: the stop finds
    the layout changed, lets the process go at once and reads it again (the freeze does
    not read smaps frozen); the move says so, and the process arrives intact."""
    with (
        two_nodes(tmp_path) as (a, b),
        spawn_fixture("merging_maps", netns=a.netns) as fixture,
    ):
        big, small = int(fixture.ready["big"], 16), int(fixture.ready["small"], 16)
        assert b.daemon_endpoint is not None
        mover = hijack_in(
            a, "move-layout-read", "move", fixture.pid, "--to", b.daemon_endpoint, "--precopy"
        )
        fixture.send(b"m")
        poll_until(
            lambda: one_mapping_holds(fixture.pid, small, big + 1), "the two mappings merged"
        )
        mover.send_signal(signal.SIGCONT)
        wait_stopped(mover, "move-layout-read")  # read again, the layout as it is now
        mover.send_signal(signal.SIGCONT)
        result = finish(mover, ("move",))
        assert result.returncode == 0, f"{result.describe()}\n{logs(tmp_path)}"
        text = " ".join(result.stdout.split())
        assert "to start tracking and once to look at a changed layout" in text, result.stdout
        found = MOVED_LINE.search(result.stdout)
        assert found is not None, result.describe()
        fixture.wait_exit()  # the original, killed by the move
        moved = Moved(
            int(found[3]), b, float(found[4]), shadow_status(a, fixture.pid)["shadow_pid"]
        )
        finish_moved(fixture, moved, tmp_path)


def test_a_private_file_mappings_pages_go_again_only_where_they_differ(tmp_path: Path) -> None:
    """A writable private file mapping (a JVM's class-data archive): round 0 sent it whole;
    at the freeze its pages that are the file's go again only where they are not what was
    sent (a written page dropped since, a page whose file changed), not the 4 MiB again."""
    with (
        two_nodes(tmp_path) as (a, b),
        spawn_fixture("private_file", tmp_path / "mapped", netns=a.netns) as fixture,
    ):
        start = int(fixture.ready["map"], 16)
        page = 4096
        assert b.daemon_endpoint is not None
        mover = hijack_in(
            a, "move-first-round", "move", fixture.pid, "--to", b.daemon_endpoint, "--precopy"
        )
        # Between the first round and the freeze: pages 0-3 dropped (the file's again),
        # the file changed under pages 40-41, page 20 written (a scan reports that one).
        fixture.send(b"d")
        # Its last step, page 20 written, seen copied on write (pagemap: no longer the file's).
        page_20 = (start + 20 * page, start + 21 * page)
        poll_until(
            lambda: page_20 in procfs.written_runs(fixture.pid, *page_20),
            "pages 0-3 dropped, the file changed, page 20 written",
            timeout=60,
        )
        mover.send_signal(signal.SIGCONT)
        result = finish(mover, ("move",))
        assert result.returncode == 0, f"{result.describe()}\n{logs(tmp_path)}"
        found, frozen = MOVED_LINE.search(result.stdout), FROZEN.search(result.stdout)
        assert found is not None and frozen is not None, result.describe()
        # A few pages and the stack's, not the mapping's 4 MiB again.
        assert float(frozen[1]) * UNITS[frozen[2]] < 1 << 20, result.stdout
        fixture.wait_exit()  # the original, killed by the move
        moved = Moved(
            int(found[3]), b, float(found[4]), shadow_status(a, fixture.pid)["shadow_pid"]
        )
        finish_moved(fixture, moved, tmp_path)  # it checks every byte itself
