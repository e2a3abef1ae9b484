"""File locks and leases held again after `dump --kill` and a restore without attach.

The `locks` fixture holds a flock, two POSIX locks, an OFD lock and a read
lease. This test looks at them from another process (itself): F_GETLK,
F_OFD_GETLK, a refused flock, the lease in /proc/locks and, last, an open for
writing refused by the lease; the fixture checks them itself from a child it
forks, and says whether its lease was broken by that open (it must be: the
break signal, the one the process chose, reaches the restored process).
Between the dump and the restore the locks are free — the original is gone —
and a lock someone takes then makes the restore fail by name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import spawn_fixture
from support.cli import HijackCli
from support.objects import (
    assert_refused,
    compare_views,
    dump_kill,
    proc_views,
    restore_adopted,
)
from support.procview import (
    difference,
    locks_view,
    processes_named,
    wait_in_syscall,
)
from support.running import RunningFixture

from hijack.sys import locks

SYS_READ = 0
EXIT_TIMEOUT = 30.0
FLOCK = struct.Struct("<hh4xqqi4x")
F_OFD_GETLK = 36


@contextmanager
def opened(path: Path, flags: int = os.O_RDWR) -> Iterator[int]:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def lock_found(
    path: Path, command: int, lock_type: int, start: int, length: int
) -> tuple[int, int]:
    """(l_type, l_pid) of what F_GETLK / F_OFD_GETLK finds against a `lock_type` lock."""
    with opened(path) as fd:
        answer = fcntl.fcntl(fd, command, FLOCK.pack(lock_type, os.SEEK_SET, start, length, 0))
    found_type, _, _, _, pid = FLOCK.unpack(answer)
    return found_type, pid


def lease_lines(path: Path) -> list[str]:
    """The /proc/locks lines of leases on `path` (read directly: not through hijack)."""
    ino = f":{path.stat().st_ino} "
    return [
        line
        for line in Path("/proc/locks").read_text().splitlines()
        if "LEASE" in line and ino in line
    ]


def assert_held(data: Path, pid: int) -> None:
    """Every lock of the fixture, seen from this process."""
    with opened(data / "flock.dat") as fd, pytest.raises(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    posix = data / "posix.dat"
    assert lock_found(posix, fcntl.F_GETLK, fcntl.F_RDLCK, 10, 10) == (fcntl.F_WRLCK, pid)
    assert lock_found(posix, fcntl.F_GETLK, fcntl.F_WRLCK, 100, 100) == (fcntl.F_RDLCK, pid)
    assert lock_found(posix, fcntl.F_GETLK, fcntl.F_WRLCK, 20, 80)[0] == fcntl.F_UNLCK
    assert lock_found(data / "ofd.dat", F_OFD_GETLK, fcntl.F_RDLCK, 0, 50) == (fcntl.F_WRLCK, -1)
    leases = lease_lines(data / "lease.dat")
    assert len(leases) == 1 and f"ACTIVE    READ {pid} " in leases[0], leases
    leases = lease_lines(data / "wlease.dat")
    assert len(leases) == 1 and f"ACTIVE    WRITE {pid} " in leases[0], leases


@contextmanager
def locks_fixture(tmp_path: Path) -> Iterator[tuple[RunningFixture, Path]]:
    """The `locks` fixture holding its locks in a directory of its own, idle in its read."""
    data = tmp_path / "data"
    data.mkdir()
    with spawn_fixture("locks", data, fifos=True) as fixture:
        wait_in_syscall(fixture.pid, (SYS_READ,))
        yield fixture, data


def restore_it(hijack: HijackCli, fixture: RunningFixture, image: Path) -> int:
    """Restore `image` and follow the fixture into it, once idle in its read again."""
    pid = restore_adopted(hijack, fixture, image)
    wait_in_syscall(pid, (SYS_READ,), describe=fixture.describe)
    return pid


def assert_free(data: Path) -> None:
    """Nothing of the fixture's is held: its process is gone."""
    with opened(data / "flock.dat") as fd:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    for start, length in ((10, 10), (100, 100)):
        found = lock_found(data / "posix.dat", fcntl.F_GETLK, fcntl.F_WRLCK, start, length)
        assert found[0] == fcntl.F_UNLCK
    found = lock_found(data / "ofd.dat", F_OFD_GETLK, fcntl.F_WRLCK, 0, 0)
    assert found[0] == fcntl.F_UNLCK
    assert not lease_lines(data / "lease.dat") and not lease_lines(data / "wlease.dat")


def test_lock_lines_of_this_process_parse_as_the_kernel_prints_them(tmp_path: Path) -> None:
    path = tmp_path / "ranges.dat"
    path.write_bytes(bytes(300))
    with opened(path) as fd, opened(path) as other:
        fcntl.fcntl(fd, fcntl.F_SETLK, FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 10, 10, 0))
        fcntl.fcntl(fd, fcntl.F_SETLK, FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 200, 0, 0))
        fcntl.fcntl(other, locks.F_OFD_SETLK, FLOCK.pack(fcntl.F_RDLCK, os.SEEK_SET, 50, 5, 0))
        fdinfo = Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
        held = locks.parse_fdinfo_locks(
            tuple(line.partition("\t")[2] for line in fdinfo if line.startswith("lock:"))
        )
        everywhere = [lock for lock in locks.read_proc_locks() if lock.ino == path.stat().st_ino]
    assert [(lock.lock_class, lock.write, lock.start, lock.end, lock.length) for lock in held] == [
        (locks.LockClass.POSIX, True, 10, 19, 10),
        (locks.LockClass.POSIX, False, 200, locks.OFFSET_MAX, 0),
    ]
    assert {lock.pid for lock in held} == {os.getpid()}
    # /proc/locks has both POSIX locks and the OFD lock (its pid is -1), on this file.
    assert sorted((lock.lock_class.value, lock.pid, lock.start) for lock in everywhere) == [
        ("OFDLCK", -1, 50), ("POSIX", os.getpid(), 10), ("POSIX", os.getpid(), 200),
    ]  # fmt: skip
    device = os.stat(path).st_dev
    assert {(lock.dev_major, lock.dev_minor) for lock in everywhere} == {
        (os.major(device), os.minor(device))
    }


def test_locks_and_lease_are_held_again_after_kill_and_restore(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "locks.crf"
    with locks_fixture(tmp_path) as (fixture, data):
        assert_held(data, fixture.pid)
        before = proc_views(fixture.pid, views=("fd", "identity"))
        locks_before = locks_view(fixture.pid)
        old_pid = fixture.pid
        dump_kill(hijack, fixture, image)
        assert_free(data)

        shown = hijack.ok("show", image).stdout
        for held in ("flock LOCK_EX", "posix write lock on bytes 10-19",
                     "posix read lock on bytes 100-199", "ofd write lock on bytes 0-49",
                     "read lease", "write lease"):  # fmt: skip
            assert held in shown, shown

        pid = restore_it(hijack, fixture, image)
        assert pid == old_pid
        compare_views(before, pid)
        assert not (found := difference(locks_before, locks_view(pid))), found
        assert_held(data, pid)
        # An opener for writing breaks the lease: refused now, and the restored
        # process gets the break's signal, its own (F_SETSIG), which it counts.
        with pytest.raises(BlockingIOError):
            os.open(data / "lease.dat", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        fixture.assert_intact()
    assert "lease broken by an opener" in fixture.stdout


def test_restore_refuses_by_name_a_lock_another_process_took_meanwhile(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "locks.crf"
    with locks_fixture(tmp_path) as (fixture, data):
        flock_fd = int(fixture.ready["flock_fd"])
        dump_kill(hijack, fixture, image)

        with opened(data / "flock.dat") as taken:
            fcntl.flock(taken, fcntl.LOCK_EX | fcntl.LOCK_NB)
            refused = hijack("restore", image)
            assert_refused(
                refused, f"flock LOCK_EX of fd {flock_fd}", "flock.dat", "another process holds"
            )
            assert not processes_named("locks"), "a refused restore left a process"
        # Released: the same image restores.
        assert_held(data, restore_it(hijack, fixture, image))
        fixture.assert_intact()
    assert "lease held" in fixture.stdout


def test_an_attached_process_gets_its_locks_back_through_the_descriptions_its_shadow_kept(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "locks.crf"
    with locks_fixture(tmp_path) as (fixture, data):
        shadow = json.loads(hijack.ok("attach", "--json", fixture.pid).stdout)["shadow_pid"]
        shadow_handle = os.pidfd_open(shadow)
        try:
            dump_kill(hijack, fixture, image)
            # The shadow's copies of the descriptions keep what they own; the
            # POSIX locks were the process's, gone with it.
            with opened(data / "flock.dat") as fd, pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            posix = lock_found(data / "posix.dat", fcntl.F_GETLK, fcntl.F_WRLCK, 10, 10)
            assert posix[0] == fcntl.F_UNLCK

            pid = restore_it(hijack, fixture, image)
            hijack.ok("detach", pid)  # the shadow ends: what it held is the process's alone
            assert select.select([shadow_handle], [], [], EXIT_TIMEOUT)[0], "shadow still runs"
            assert_held(data, pid)
            fixture.assert_intact()
        finally:
            # Our child since the fixture ended (pytest is a subreaper): reaped here.
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(shadow_handle, signal.SIGKILL)
            os.waitpid(shadow, 0)
            os.close(shadow_handle)
    assert "lease held" in fixture.stdout
