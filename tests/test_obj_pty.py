"""A pty pair held inside the process (master and slave both open in it), rebuilt from the image.

The `pty_pair` fixture leads a session whose controlling terminal is the
slave of a pair it holds, with raw-ish settings, a window size, packet mode
and bytes queued both ways. After `dump --kill` and a restore without attach
it checks everything itself (settings, size, modes, its queued bytes once
each, a round trip through the pair); this test compares /proc before and
after: the same descriptors (the new pair has the old index, free again once
the original is gone), the same session and controlling terminal. A plain
dump must leave the pair and its queued bytes as they were. A pair whose old
index another process took meanwhile comes back under another name.
"""

from __future__ import annotations

import os
from pathlib import Path

from support import spawn_fixture
from support.cli import HijackCli
from support.objects import compare_views, dump_kill, proc_views, restore_adopted
from support.procview import wait_in_syscall

from hijack.sys import procfs, pty

SYS_READ = 0


def controlling_terminal(pid: int) -> tuple[int, int]:
    """(major, minor) of the process's controlling terminal (tty_nr of /proc/PID/stat)."""
    tty_nr = procfs.read_stat(pid).tty_nr
    return (tty_nr >> 8) & 0xFFF, (tty_nr & 0xFF) | ((tty_nr >> 12) & 0xFFF00)


def test_pty_pair_is_rebuilt_with_its_settings_modes_and_queued_bytes(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "pty_pair.crf"
    with spawn_fixture("pty_pair", fifos=True) as fixture:
        index = int(fixture.ready["index"])
        slave_fd = int(fixture.ready["slave_fd"])
        wait_in_syscall(fixture.pid, (SYS_READ,))
        slave = os.stat(f"/proc/{fixture.pid}/fd/{slave_fd}").st_rdev
        assert controlling_terminal(fixture.pid) == (os.major(slave), os.minor(slave))
        before = proc_views(fixture.pid, views=("fd", "identity"))
        dump_kill(hijack, fixture, image)

        shown = hijack.ok("show", image).stdout
        details = (
            f"master of /dev/pts/{index}",
            f"slave of /dev/pts/{index}",
            "111x37",
            "packet mode",
            "locked",
            "controlling",
            "12 bytes queued in, 15 out",
        )
        for detail in details:
            assert detail in shown, shown

        old_pid = fixture.pid
        pid = restore_adopted(hijack, fixture, image)
        assert pid == old_pid
        wait_in_syscall(pid, (SYS_READ,), describe=fixture.describe)
        # Same numbers, same /dev/pts/N, same flags; same session, group and tty_nr.
        compare_views(before, pid)
        fixture.assert_intact()


def test_plain_dump_leaves_the_pair_and_its_queued_bytes_as_they_were(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "pty_pair.crf"
    with spawn_fixture("pty_pair") as fixture:
        wait_in_syscall(fixture.pid, (SYS_READ,))
        hijack.ok("dump", fixture.pid, "-o", image)
        # The dump read the queued bytes out and put them back: each arrives once,
        # with no echo, no status packet, the settings untouched.
        fixture.assert_intact()


def test_a_pair_whose_old_index_is_taken_comes_back_under_another_name(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "pty_pair.crf"
    masters: list[int] = []
    try:
        with spawn_fixture("pty_pair", fifos=True) as fixture:
            index = int(fixture.ready["index"])
            wait_in_syscall(fixture.pid, (SYS_READ,))
            dump_kill(hijack, fixture, image)
            # The old index taken (the kernel hands out the lowest free one): by us,
            # or by whoever came first.
            while not masters or pty.index_of(masters[-1]) < index:
                masters.append(os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC))

            pid = restore_adopted(hijack, fixture, image)
            wait_in_syscall(pid, (SYS_READ,), describe=fixture.describe)
            slave = os.readlink(f"/proc/{pid}/fd/{fixture.ready['slave_fd']}")
            assert slave != f"/dev/pts/{index}", slave
            # A pair all the same: the master's peer, settings, bytes, the session's terminal.
            fixture.assert_intact()
    finally:
        for master in masters:
            os.close(master)
