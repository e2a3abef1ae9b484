"""`hijack dump` and `hijack restore`, end to end, on real processes.

Each test dumps a real process — a C fixture (tests/fixtures) that checks its
own state at the finish, or an unmodified /usr/bin/python3 — and restores it,
then lets the process itself say whether it is intact. What a user does runs
through the CLI, each command a separate `python -m hijack` process with its
own state directory; a process restored that way is orphaned when restore
exits and re-parented to pytest (a child subreaper, see conftest), which reaps
it. Waits are bounded and on pipes, pidfds and files; where a process must be
inside a blocking call before the dump, /proc is polled with a bound.

Every image a test writes (`*.crf` under its tmp_path) is decoded and
re-encoded after the test and must come out byte-identical (docs/crf.md §10).
Images a test damages on purpose are named `*.bad`.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import secrets
import select
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import descendants, find_leaked_processes, snapshot_descendants, spawn_fixture
from support.cli import CliResult, HijackCli
from support.procview import (
    difference,
    fds_view,
    maps_view,
    processes_named,
    signal_bits,
    wait_in_syscall,
)

from hijack.errors import HijackError
from hijack.image.codec import recode
from hijack.restore.restorer import restore

PYTHON = "/usr/bin/python3"  # an unmodified, dynamically linked distribution binary
EXIT_TIMEOUT = 30.0
POLL_TIMEOUT = 10.0

# x86_64 system call numbers, as /proc/PID/syscall shows them.
SYS_READ = 0
SYS_NANOSLEEP = 35
SYS_CLOCK_NANOSLEEP = 230  # glibc's nanosleep()
SYS_SELECT = 23
SYS_PSELECT6 = 270  # glibc's select()
SLEEP_CALLS = (SYS_NANOSLEEP, SYS_CLOCK_NANOSLEEP)

RESTORED_LINE = re.compile(r"^restored process (\d+) ", re.MULTILINE)
# Section framing (docs/crf.md §4, §5): signature, then TAG LENGTH PAYLOAD CRC.
SIGNATURE_SIZE = 8
SECTION_HEAD = struct.Struct("<4sI")
CRC_SIZE = 4


# -- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def hijack(tmp_path: Path) -> HijackCli:
    return HijackCli(tmp_path / "state")


def assert_recodes(image: Path) -> None:
    """Decoding and re-encoding the image gives its bytes back exactly (docs/crf.md §10)."""
    original = image.read_bytes()
    recoded = io.BytesIO()
    with open(image, "rb") as source:
        recode(source, recoded)
    assert recoded.getvalue() == original, f"{image} does not re-encode to the same bytes"


@pytest.fixture(autouse=True)
def every_image_recodes(tmp_path: Path) -> Iterator[None]:
    yield
    for image in sorted(tmp_path.rglob("*.crf")):
        assert_recodes(image)


def restored_pid(result: CliResult) -> int:
    found = RESTORED_LINE.search(result.stdout)
    assert found, result.describe()
    return int(found[1])


class Restored:
    """A restored process that is our child: wait for its exit, or kill and reap it.

    Via the CLI it became our child when restore exited (pytest is a
    subreaper); via the API it is our child from the start.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        if self.returncode is None:
            readable, _, _ = select.select([self._pidfd], [], [], timeout)
            if not readable:
                raise AssertionError(f"restored process {self.pid} still runs after {timeout} s")
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def __enter__(self) -> Restored:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self.returncode is None:
                # ProcessLookupError: it exited already; reaped below.
                try:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.wait()
        finally:
            os.close(self._pidfd)


def assert_refused(result: CliResult, *words: str) -> str:
    """Exit 1, nothing on stdout, one `hijack: ...` line on stderr naming `words`."""
    assert result.returncode == 1, result.describe()
    assert result.stdout == "", result.describe()
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("hijack: "), result.describe()
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, (
        result.describe()
    )
    for word in words:
        assert word in lines[0], result.describe()
    return lines[0]


class NothingStarted:
    """Around a refused restore: no new descendant of pytest, no new process named `comm`.

    Watching pytest's descendants catches any process the restore started
    (whatever it became: pytest is a subreaper); watching the comm catches a
    process restored from the image anywhere on the machine, which is why the
    images these checks use are of programs with unique names.
    """

    def __init__(self, comm: str) -> None:
        self.comm = comm

    def __enter__(self) -> NothingStarted:
        self._descendants = snapshot_descendants(os.getpid())
        self._named = processes_named(self.comm)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None:
            return
        started = find_leaked_processes(os.getpid(), self._descendants)
        assert not started, "processes started: " + ", ".join(p.describe() for p in started)
        named = processes_named(self.comm) - self._named
        assert not named, f"new processes named {self.comm}: {sorted(named)}"


def image_json(hijack: HijackCli, image: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(hijack.ok("show", "--json", image).stdout)
    return document


def descriptor_in(document: dict[str, Any], path: Path | str) -> dict[str, Any]:
    [found] = [d for d in document["descriptors"] if d["path"] == str(path)]
    return found


def wait_until(condition: Callable[[], bool], what: str, timeout: float = POLL_TIMEOUT) -> None:
    """Poll `condition` (a look at a file or /proc) until it holds; bounded."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.005)


def fd_of(pid: int, path: Path) -> int:
    [fd] = [
        fd
        for fd in map(int, os.listdir(f"/proc/{pid}/fd"))
        if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path)
    ]
    return fd


def log_lines(log: Path) -> int:
    return log.read_bytes().count(b"\n")


def unique_program(directory: Path, source: str) -> Path:
    """A copy of `source` under a name no other process has (comm is the first 15 bytes)."""
    copy = directory / f"hj{secrets.token_hex(5)}"
    shutil.copy2(source, copy)
    return copy


def start_sleeper(program: Path) -> subprocess.Popen[bytes]:
    """`program 3600` (a copy of sleep), returned once it really sleeps."""
    sleeper = subprocess.Popen(
        [str(program), "3600"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_in_syscall(sleeper.pid, SLEEP_CALLS)
    except BaseException:
        sleeper.kill()
        sleeper.wait()
        raise
    return sleeper


def sections(image: bytes) -> list[tuple[str, int, int]]:
    """(tag, offset, total size) of every section of a well-formed image."""
    found = []
    offset = SIGNATURE_SIZE
    while offset < len(image):
        tag, length = SECTION_HEAD.unpack_from(image, offset)
        size = SECTION_HEAD.size + length + CRC_SIZE
        found.append((tag.decode(), offset, size))
        offset += size
    assert offset == len(image)
    return found


# -- 1. counter: killed, restored, continues from its count ---------------------------------------


def test_counter_killed_and_restored_continues_from_its_saved_count(
    hijack: HijackCli, tmp_path: Path
) -> None:
    log = tmp_path / "counter.log"
    image = tmp_path / "counter.crf"
    with spawn_fixture("counter", log, "3", fifos=True) as counter:
        old_pid = counter.pid
        hijack.ok("dump", old_pid, "-o", image, "--kill")
        assert counter.wait_exit() == -signal.SIGKILL
        at_dump = log.read_bytes()  # final: the process is gone
        assert at_dump.count(b"\n") >= 3
        # The log fd's offset in the image is where the next line goes.
        assert descriptor_in(image_json(hijack, image), log)["pos"] == len(at_dump)

        # wait_exit() reaped the old process, so its pid is free again.
        pid = restored_pid(hijack.ok("restore", image))
        assert pid == old_pid
        counter.adopt(pid)
        # Going on: lines beyond the dump, in the same log.
        wait_until(lambda: log_lines(log) > at_dump.count(b"\n"), "restored counter logging")
        # Its own check: log exactly 1..N, count == N * 2^16, the 8 MiB heap intact.
        counter.assert_intact()
    assert log.read_bytes().startswith(at_dump)
    assert f"lines={log_lines(log)}" in counter.stdout


# -- 2. blocked: dumped inside read / select / nanosleep ------------------------------------------

SLEEP_MS = 2000


@pytest.mark.parametrize("mode", ["read", "select", "nanosleep"])
def test_blocked_call_resumes_after_restore_with_its_signal_state(
    hijack: HijackCli, tmp_path: Path, mode: str
) -> None:
    image = tmp_path / f"blocked-{mode}.crf"
    payload = f"payload-{secrets.token_hex(16)}\n"
    argument = str(SLEEP_MS) if mode == "nanosleep" else payload
    calls = {"read": (SYS_READ,), "select": (SYS_SELECT, SYS_PSELECT6), "nanosleep": SLEEP_CALLS}
    # The handler must run exactly once: the SIGUSR1 this test sends after the restore.
    with spawn_fixture("blocked", mode, argument, "1", fifos=True) as blocked:
        started = time.monotonic()
        assert blocked.control_fifo is not None
        control_fd = fd_of(blocked.pid, blocked.control_fifo)
        wait_in_syscall(blocked.pid, calls[mode])
        hijack.ok("dump", blocked.pid, "-o", image, "--kill")
        assert blocked.wait_exit() == -signal.SIGKILL

        pid = restored_pid(hijack.ok("restore", image))
        blocked.adopt(pid)
        # Back inside the same call, waiting as before.
        wait_in_syscall(pid, calls[mode])
        usr1, usr2 = 1 << (signal.SIGUSR1 - 1), 1 << (signal.SIGUSR2 - 1)
        assert signal_bits(pid, "SigCgt") & usr1, "SIGUSR1 handler lost"
        assert signal_bits(pid, "SigBlk") & (usr1 | usr2) == usr2, "signal mask changed"

        if mode == "nanosleep":
            # Had the restore dropped what was left of the sleep, it would end
            # now, before its time: the fixture checks that it slept SLEEP_MS.
            assert time.monotonic() - started < SLEEP_MS / 1000, "restore too slow to tell"
        else:
            blocked.send(payload.encode())
        # Past the blocking call, in the read that waits for CONTROL's EOF,
        # where SA_RESTART makes a SIGUSR1 harmless: the handler must run.
        wait_in_syscall(pid, (SYS_READ,), first_arg=control_fd, timeout=SLEEP_MS / 1000 + 10)
        os.kill(pid, signal.SIGUSR1)
        blocked.assert_intact()
    assert "PASS blocked" in blocked.stdout
