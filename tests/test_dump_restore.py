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

import contextlib
import hashlib
import io
import json
import os
import random
import re
import resource
import secrets
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import find_leaked_processes, snapshot_descendants, spawn_fixture
from support.cli import RESTORED_LINE, CliResult, HijackCli, restored_pid
from support.copies import copy_beside_original, suffixed
from support.procview import (
    FdView,
    MapView,
    difference,
    fds_view,
    identity_view,
    maps_view,
    pipes_named_alike,
    processes_named,
    signal_bits,
    wait_in_syscall,
)

from hijack.errors import HijackError
from hijack.image.codec import SectionKind, recode
from hijack.image.identity import read_build_id
from hijack.restore.restorer import restore
from hijack.sys import kcmp, procfs

PYTHON = "/usr/bin/python3"  # an unmodified, dynamically linked distribution binary
SLEEP = "/usr/bin/sleep"  # copied under unique names, so its processes can be told apart
LIBC = "/lib/x86_64-linux-gnu/libc.so.6"
EXIT_TIMEOUT = 30.0
POLL_TIMEOUT = 10.0

# x86_64 system call numbers, as /proc/PID/syscall shows them.
SYS_READ = 0
SYS_NANOSLEEP = 35
SYS_CLOCK_NANOSLEEP = 230  # glibc's nanosleep()
SYS_SELECT = 23
SYS_PSELECT6 = 270  # glibc's select()
SLEEP_CALLS = (SYS_NANOSLEEP, SYS_CLOCK_NANOSLEEP)

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


class Child:
    """A process that became our child: wait for its exit, or kill and reap it.

    A process restored through the CLI becomes our child when restore exits,
    a shadow when the process it was forked from ends: pytest is a subreaper.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        if self.returncode is None:
            readable, _, _ = select.select([self._pidfd], [], [], timeout)
            if not readable:
                raise AssertionError(f"process {self.pid} still runs after {timeout} s")
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self.returncode is None:
                # ProcessLookupError: it exited already; reaped below.
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                self.wait()
        finally:
            os.close(self._pidfd)


def assert_refused(result: CliResult, *words: str) -> None:
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


class NothingStarted:
    """Around a refused restore: no new descendant of pytest, no new process named `comm`.

    Watching pytest's descendants catches any process the restore started,
    whatever became of it (pytest is a subreaper). Watching `comm` catches a
    process restored from the image anywhere on the machine; it is only
    meaningful for a name no one else uses, so the images these checks are
    made from are of programs copied under unique names (None: no such name).
    """

    def __init__(self, comm: str | None) -> None:
        self.comm = comm

    def __enter__(self) -> NothingStarted:
        self._descendants = snapshot_descendants(os.getpid())
        self._named = processes_named(self.comm) if self.comm else frozenset()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is not None:
            return
        started = find_leaked_processes(os.getpid(), self._descendants)
        assert not started, "processes started: " + ", ".join(p.describe() for p in started)
        if self.comm:
            named = processes_named(self.comm) - self._named
            assert not named, f"new processes named {self.comm}: {sorted(named)}"


def image_json(hijack: HijackCli, image: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(hijack.ok("show", "--json", image).stdout)
    return document


def descriptor_in(document: dict[str, Any], path: Path | str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [d for d in document["descriptors"] if d["path"] == str(path)]
    assert len(found) == 1, f"{path} in {document['descriptors']}"
    return found[0]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = POLL_TIMEOUT) -> None:
    """Poll `condition` (a look at a file or /proc) until it holds; bounded."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.005)


def fd_of(pid: int, path: Path) -> int:
    """The one descriptor of `pid` open on `path`."""
    [fd] = [
        fd
        for fd in map(int, os.listdir(f"/proc/{pid}/fd"))
        if os.readlink(f"/proc/{pid}/fd/{fd}") == str(path)
    ]
    return fd


def wait_for_growth(path: Path, what: str) -> None:
    """Wait (bounded) until the file at `path` is longer than now: its writer lives."""
    size = path.stat().st_size
    wait_until(lambda: path.stat().st_size > size, what)


def log_lines(log: Path) -> int:
    return log.read_bytes().count(b"\n")


def unique_program(directory: Path, source: str) -> Path:
    """A copy of `source` under a name no other process has (comm is the first 15 bytes)."""
    copy = directory / f"hj{secrets.token_hex(5)}"
    shutil.copy2(source, copy)
    return copy


def start_sleeper(program: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`program 3600` (a copy of sleep), returned once it really sleeps."""
    sleeper = subprocess.Popen(
        [str(program), "3600"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
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


def spliced_sections(image: Path) -> int:
    """How many SPLICED_PAGES sections the image holds (pages hijack never held)."""
    return sum(
        tag == SectionKind.SPLICED_PAGES.value.decode()
        for tag, _, _ in sections(image.read_bytes())
    )


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
        # Zero-copy: its pages went from the process to the file without passing through
        # hijack (vmsplice + splice), and come back intact (its own check, below).
        assert spliced_sections(image) > 0
        at_dump = log.read_bytes()  # final: the process is gone
        assert at_dump.count(b"\n") >= 3
        # The log fd's offset in the image is where the next line goes.
        assert descriptor_in(image_json(hijack, image), log)["pos"] == len(at_dump)

        # wait_exit() reaped the old process, so its pid is free again.
        pid = restored_pid(hijack.ok("restore", image))
        assert pid == old_pid
        counter.adopt(pid)
        # Going on: lines beyond the dump, in the same log.
        wait_for_growth(log, "the restored counter logging")
        # Its own check: log exactly 1..N, count == N * 2^16, the 8 MiB heap intact.
        counter.assert_intact()
    assert log.read_bytes().startswith(at_dump)
    assert f"lines={log_lines(log)}" in counter.stdout


# -- 2. blocked: dumped inside read / select / nanosleep ------------------------------------------

SLEEP_MS = 8000  # long enough for a dump and a restore on a loaded machine (3 s was not)


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
        wait_in_syscall(pid, calls[mode], describe=blocked.describe)
        usr1, usr2 = 1 << (signal.SIGUSR1 - 1), 1 << (signal.SIGUSR2 - 1)
        assert signal_bits(pid, "SigCgt") & usr1, "SIGUSR1 handler lost"
        assert signal_bits(pid, "SigBlk") & (usr1 | usr2) == usr2, "signal mask changed"

        if mode == "nanosleep":
            # Had the restore dropped what was left of the sleep, it would end
            # now, before its time: the fixture checks that it slept SLEEP_MS.
            assert time.monotonic() - started < SLEEP_MS / 1000, "restore too slow to tell"
        else:
            blocked.send(payload.encode())
        # In a read of CONTROL (past select or the sleep, which a handler
        # would interrupt with EINTR; in read mode, the very read the payload
        # may still be on its way to): SA_RESTART restarts it, and the
        # handler, installed before the dump, must run once.
        wait_in_syscall(
            pid,
            (SYS_READ,),
            first_arg=control_fd,
            timeout=SLEEP_MS / 1000 + POLL_TIMEOUT,
            describe=blocked.describe,
        )
        os.kill(pid, signal.SIGUSR1)
        blocked.assert_intact()
    assert "PASS blocked" in blocked.stdout


# -- 2b. sleepers: timed sleeps, whose restart state only the old kernel had -------------------

SLEEPERS_MS = 15000  # long enough for an attach, a dump and a restore at load 8-9 (8 s was not)
# Each sleeper thread (by name) and the calls /proc may show it in; 219 is
# restart_syscall, where a live release leaves a thread the kernel continues.
SYS_RESTART_SYSCALL = 219
SLEEPER_CALLS = {
    "poll": {7},
    "ppoll": {271},
    "select": {SYS_SELECT, SYS_PSELECT6},
    "nanosleep": {SYS_NANOSLEEP},
    "nanosleep-rem": {SYS_NANOSLEEP},
    "futex": {202},
    "futex-abs": {202},
}


def sleeping_threads(pid: int) -> dict[str, int | None]:
    """Each sleeper thread's name and the call it blocks in (None: not blocked in one)."""
    found: dict[str, int | None] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            name = (task / "comm").read_text().strip()
            if name in SLEEPER_CALLS:
                words = (task / "syscall").read_text().split()
                found[name] = int(words[0]) if words[0].lstrip("-").isdigit() else None
    return found


def wait_for_sleepers(pid: int, *, restarted: bool = False) -> None:
    """Bounded poll of /proc until every sleeper blocks in its call."""
    deadline = time.monotonic() + POLL_TIMEOUT
    while True:
        seen = sleeping_threads(pid)
        allowed = {
            name: calls | ({SYS_RESTART_SYSCALL} if restarted else set())
            for name, calls in SLEEPER_CALLS.items()
        }
        if all(seen.get(name) in calls for name, calls in allowed.items()):
            return
        assert time.monotonic() < deadline, f"process {pid}: sleepers not all asleep: {seen}"
        time.sleep(0.01)


@pytest.mark.parametrize("attached_before", [False, True], ids=["dumped", "attached-then-dumped"])
def test_timed_sleeps_go_on_sleeping_after_restore(
    hijack: HijackCli, tmp_path: Path, attached_before: bool
) -> None:
    """poll, ppoll, select, nanosleep and futex waits with timeouts neither end early nor fail.

    Stopped inside such a call, a thread shows ERESTART_RESTARTBLOCK (or
    another restart value); the new process has no restart block, so the
    restore re-issues the call itself. After an attach and detach, the live
    kernel continues the poll and the relative futex wait in restart_syscall,
    which hides the call: the dump must find it on the thread's kernel stack.
    """
    image = tmp_path / "sleepers.crf"
    with spawn_fixture("sleepers", str(SLEEPERS_MS), fifos=True) as sleepers:
        started = time.monotonic()
        assert sleepers.ready == {"threads": "8"}
        wait_for_sleepers(sleepers.pid)
        if attached_before:
            hijack.ok("attach", sleepers.pid)
            hijack.ok("detach", sleepers.pid)
            wait_for_sleepers(sleepers.pid, restarted=True)
            # Those the live kernel continues exactly: the dump must name their call.
            seen = sleeping_threads(sleepers.pid)
            assert seen["poll"] == seen["futex"] == SYS_RESTART_SYSCALL, seen
        hijack.ok("dump", sleepers.pid, "-o", image, "--kill")
        assert sleepers.wait_exit() == -signal.SIGKILL

        pid = restored_pid(hijack.ok("restore", image))
        sleepers.adopt(pid)
        wait_for_sleepers(pid)
        assert time.monotonic() - started < SLEEPERS_MS / 1000, "restore too slow to tell"
        # Each thread checks it timed out, after the whole time, with no EINTR.
        sleepers.assert_intact()
    assert "PASS sleepers" in sleepers.stdout


# -- 3. dump without --kill: the original runs on, the image makes an independent copy -----------


def test_dump_leaves_the_original_running_and_its_image_restores_an_independent_copy(
    hijack: HijackCli, tmp_path: Path
) -> None:
    log = tmp_path / "counter.log"
    image = tmp_path / "counter.crf"
    with spawn_fixture("counter", log, "2", fifos=True) as original:
        assert original.control_fifo is not None
        hijack.ok("dump", original.pid, "-o", image)
        assert spliced_sections(image) > 0  # from the snapshot's copy, as --kill's
        document = image_json(hijack, image)
        logged = descriptor_in(document, log)["pos"]
        wait_until(lambda: log.stat().st_size > logged, "the original logging after the dump")

        # The copy gets a log of its own, as it was at the dump; each counter
        # checks the log at its path when it finishes, so the copy finishes first.
        by_fd = {descriptor["fd"]: descriptor for descriptor in document["descriptors"]}
        stdout, stderr = Path(by_fd[1]["path"]), Path(by_fd[2]["path"])
        with (
            copy_beside_original(
                hijack,
                image,
                original.control_fifo,
                (stdout, stderr),
                kept_apart={log: log.read_bytes()[:logged]},
            ) as (copy_pid, copy_control),
            Child(copy_pid) as copy,
        ):
            assert copy.pid != original.pid
            # Both count at once, each in its own log.
            wait_for_growth(log, "the copy logging")
            wait_for_growth(suffixed(log, ".original"), "the original logging")
            copy_control.close()
            copy_stderr = suffixed(stderr, ".copy")
            assert copy.wait() == 0, f"the copy failed: {copy_stderr.read_text()}"
            assert "PASS counter" in suffixed(stdout, ".copy").read_text()
        copy_log = log.read_bytes()
        os.replace(suffixed(log, ".original"), log)
        original.assert_intact()
    assert "PASS counter" in original.stdout
    # The two logs share exactly the lines written before the dump.
    assert copy_log[:logged] == log.read_bytes()[:logged]


# -- threads, streamed: `hijack dump PID -o - --kill | hijack restore -` --------------------------


def test_threads_streamed_from_dump_into_restore_run_on_intact(
    hijack: HijackCli, tmp_path: Path
) -> None:
    with spawn_fixture("threads", fifos=True) as threads:
        tasks = len(os.listdir(f"/proc/{threads.pid}/task"))
        assert tasks == int(threads.ready["threads"])
        # A real pipe: restore reads the image while dump writes it, and its
        # stub exists before the dump ends the original (so: another pid).
        program = f"{shlex.quote(sys.executable)} -m hijack"
        command = f"{program} dump {threads.pid} -o - --kill | {program} restore -"
        piped = subprocess.run(
            ["sh", "-c", command],
            env={**os.environ, "HIJACK_STATE_DIR": str(hijack.state_dir)},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=EXIT_TIMEOUT,
            check=False,
        )
        assert piped.returncode == 0, f"$ {command}\n{piped.stdout}{piped.stderr}"
        assert threads.wait_exit() == -signal.SIGKILL
        found = RESTORED_LINE.search(piped.stdout)
        assert found, piped.stdout
        threads.adopt(int(found[1]))
        assert len(os.listdir(f"/proc/{threads.pid}/task")) == tasks
        # Workers still counting under their mutex, the waiter still parked.
        threads.assert_intact()
    assert "PASS threads" in threads.stdout


# -- 4. and 5. an unmodified python3, dumped mid-run ---------------------------------------------

WORK_ITERATIONS = 30_000_000  # about two seconds of pure Python here
WORK_DIGESTS = 100_000
WORK_SCRIPT = f"""\
import hashlib

print("started", flush=True)
total = 0
for i in range({WORK_ITERATIONS}):
    total += i * i
digest = b"seed"
for _ in range({WORK_DIGESTS}):
    digest = hashlib.sha256(digest).digest()
print(f"total={{total}} sha256={{digest.hex()}}", flush=True)
"""


def expected_work_output() -> str:
    n = WORK_ITERATIONS
    digest = b"seed"
    for _ in range(WORK_DIGESTS):
        digest = hashlib.sha256(digest).digest()
    return f"started\ntotal={(n - 1) * n * (2 * n - 1) // 6} sha256={digest.hex()}\n"


@contextlib.contextmanager
def python_at_work(directory: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """/usr/bin/python3 running WORK_SCRIPT, its stdout in a file; yielded once it started."""
    script, output = directory / "work.py", directory / "work.out"
    script.write_text(WORK_SCRIPT)
    with open(output, "wb") as stdout, open(directory / "work.err", "wb") as stderr:
        worker = subprocess.Popen(
            [PYTHON, str(script)], stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr
        )
    try:
        wait_until(lambda: output.read_bytes().startswith(b"started\n"), "python3 starting")
        yield worker, output
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait(timeout=EXIT_TIMEOUT)


def test_unmodified_python3_dumped_mid_run_prints_the_right_result_after_restore(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "python3.crf"
    with python_at_work(tmp_path) as (worker, output):
        hijack.ok("dump", worker.pid, "-o", image, "--kill")
        assert worker.wait(timeout=EXIT_TIMEOUT) == -signal.SIGKILL
    assert output.read_text() == "started\n", "not dumped mid-run"
    memory = image_json(hijack, image)["memory"]
    libraries = {row["path"] for row in memory if ".so" in row["path"]}
    assert len(memory) > 30 and len(libraries) >= 4, f"few mappings: {memory}"

    with Child(restored_pid(hijack.ok("restore", image))) as restored:
        assert restored.wait() == 0, (tmp_path / "work.err").read_text()
    assert output.read_text() == expected_work_output()


def test_image_without_binary_and_libraries_is_much_smaller_and_restores_the_same(
    hijack: HijackCli, tmp_path: Path
) -> None:
    full, small = tmp_path / "full.crf", tmp_path / "small.crf"
    with python_at_work(tmp_path) as (worker, output):
        hijack.ok("dump", worker.pid, "-o", full)
        hijack.ok("dump", worker.pid, "-o", small, "--kill", "--no-binary", "--no-shared-libs")
        assert worker.wait(timeout=EXIT_TIMEOUT) == -signal.SIGKILL
    assert output.read_text() == "started\n", "not dumped mid-run"
    full_size, small_size = full.stat().st_size, small.stat().st_size
    print(f"python3 image: full {full_size} bytes, --no-binary --no-shared-libs {small_size}")
    assert small_size < full_size / 2, f"full {full_size} bytes, small {small_size}"

    document = image_json(hijack, small)
    assert document["process"]["options"] == ["NO_BINARY", "NO_SHARED_LIBS"]
    exe = document["process"]["exe"]
    contents = {(row["path"], row["contents"]) for row in document["memory"]}
    assert (exe, "FILE") in contents and (exe, "STORED") not in contents, contents
    libc = {row["contents"] for row in document["memory"] if "/libc.so" in row["path"]}
    assert libc == {"FILE"}, contents

    with Child(restored_pid(hijack.ok("restore", small))) as restored:
        assert restored.wait() == 0, (tmp_path / "work.err").read_text()
    assert output.read_text() == expected_work_output()


def flip_build_id(program: Path) -> None:
    """Change one byte of the ELF build-id note, keeping the file's size and mtime."""
    build_id = read_build_id(str(program))
    assert build_id, f"{program} has no build-id"
    data = bytearray(program.read_bytes())
    at = data.index(build_id)
    data[at] ^= 0xFF
    times = program.stat()
    program.write_bytes(data)
    os.utime(program, ns=(times.st_atime_ns, times.st_mtime_ns))


@pytest.mark.parametrize(
    ("mapped_file", "change"),
    [
        ("executable", "appended"),
        ("executable", "touched"),
        ("executable", "build-id"),  # same size and mtime: only the build-id tells
        ("library", "appended"),
    ],
)
def test_restore_refuses_a_mapped_file_changed_since_the_dump(
    hijack: HijackCli, tmp_path: Path, mapped_file: str, change: str
) -> None:
    program = unique_program(tmp_path, SLEEP)
    image = tmp_path / "sleeper.crf"
    if mapped_file == "executable":
        changed, option, env = program, "--no-binary", {}
    else:
        # The program maps a copy of libc, found first on LD_LIBRARY_PATH.
        libraries = tmp_path / "lib"
        libraries.mkdir()
        changed = libraries / "libc.so.6"
        shutil.copy2(LIBC, changed)
        option, env = "--no-shared-libs", {"LD_LIBRARY_PATH": str(libraries)}
    sleeper = start_sleeper(program, env)
    try:
        hijack.ok("dump", sleeper.pid, "-o", image, "--kill", option)
    finally:
        sleeper.kill()
        sleeper.wait(timeout=EXIT_TIMEOUT)
    rows = image_json(hijack, image)["memory"]
    assert {row["contents"] for row in rows if row["path"] == str(changed)} == {"FILE"}

    if change == "appended":
        with open(changed, "ab") as appending:
            appending.write(b"\0")
    elif change == "touched":
        times = changed.stat()
        os.utime(changed, ns=(times.st_atime_ns, times.st_mtime_ns + 1_000_000_000))
    else:
        flip_build_id(changed)
    with NothingStarted(program.name):
        assert_refused(hijack("restore", image), str(changed), "changed since the dump")


# -- 6. truncated, corrupted and foreign images --------------------------------------------------


@pytest.fixture(scope="module")
def sleeper_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A real image (of a sleep under a unique name) and that name, for tests to damage."""
    directory = tmp_path_factory.mktemp("sleeper")
    program = unique_program(directory, SLEEP)
    image = directory / "sleeper.crf"
    sleeper = start_sleeper(program)
    try:
        HijackCli(directory / "state").ok("dump", sleeper.pid, "-o", image, "--kill")
    finally:
        sleeper.kill()
        sleeper.wait(timeout=EXIT_TIMEOUT)
    assert_recodes(image)
    return image, program.name


def test_restore_refuses_a_truncated_image(
    hijack: HijackCli, tmp_path: Path, sleeper_image: tuple[Path, str]
) -> None:
    image, comm = sleeper_image
    data = image.read_bytes()
    found = sections(data)
    middle = {tag: offset + size // 2 for tag, offset, size in reversed(found)}  # first of each
    cuts = {
        "in-signature": 5,
        "in-section-header": found[1][1] + 3,
        "in-SEGS": middle["SEGS"],
        "in-SPLC": middle["SPLC"],  # its pages: spliced by the dump
        "before-END": found[-1][1],
        "one-byte-short": len(data) - 1,
    }
    for where, cut in cuts.items():
        truncated = tmp_path / f"cut-{where}.bad"  # the name shows in a failure
        truncated.write_bytes(data[:cut])
        with NothingStarted(comm):
            assert_refused(hijack("restore", truncated), "truncated")


def test_restore_refuses_an_image_with_a_bit_flipped_in_any_section(
    hijack: HijackCli, tmp_path: Path, sleeper_image: tuple[Path, str]
) -> None:
    image, comm = sleeper_image
    data = image.read_bytes()
    seen_tags: set[str] = set()
    for index, (tag, offset, size) in enumerate(sections(data)):
        damaged = bytearray(data)
        # Inside the payload; of SPLICED_PAGES, in the address: its data has no checksum.
        inside = 8 + index % 8 if tag == "SPLC" else size // 2
        damaged[offset + inside] ^= 1 << (index % 8)
        bad = tmp_path / f"flip-{index}-{tag}.bad"
        bad.write_bytes(damaged)
        with NothingStarted(comm):
            if tag not in seen_tags:
                # The first section of each kind through the CLI, as a user would.
                expected = f"checksum mismatch in section {SectionKind(tag.encode()).name}"
                assert_refused(hijack("restore", bad), f"{expected} at byte {offset}")
                seen_tags.add(tag)
            else:
                # The others through the API, which is what the CLI runs: faster.
                with open(bad, "rb") as stream, pytest.raises(HijackError, match="checksum"):
                    restore(stream)


@pytest.mark.parametrize("kind", ["elf", "random", "empty", "text"])
def test_restore_refuses_a_file_that_is_no_image(
    hijack: HijackCli, tmp_path: Path, kind: str
) -> None:
    foreign = tmp_path / f"{kind}.bad"
    if kind == "elf":
        shutil.copy(SLEEP, foreign)
    elif kind == "random":
        foreign.write_bytes(b"\x8f" + random.Random(1).randbytes(64 * 1024))
    elif kind == "empty":
        foreign.touch()
    else:
        foreign.write_text("CRF is the Checkpoint/Restart File\n")
    with NothingStarted(None):
        assert_refused(hijack("restore", foreign), "not a CRF image")
    assert_refused(hijack("show", foreign), "not a CRF image")


# -- 7. /proc views before the dump and after the restore ----------------------------------------
#
# What may legitimately differ: nothing in these views, because they leave out
# what a faithful restore cannot keep (see support/procview.py): the
# [vsyscall] page; the device and inode of each mapping (a shared anonymous
# mapping is a new shmem object after a restore); the pid, the parent and the
# kernel's task flags. The restored process is a freshly exec'd stub emptied
# and refilled, so its heap, stack, vdso and vvar are all where the image had
# them, and the views must agree entry for entry.


def assert_same_views(before: frozenset[object], after: frozenset[object], what: str) -> None:
    assert not (found := difference(before, after)), f"{what}:\n{found}"


def test_proc_views_of_mapped_agree_before_dump_and_after_restore(
    hijack: HijackCli, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    image = tmp_path / "mapped.crf"
    with spawn_fixture("mapped", data, fifos=True) as mapped:
        # Idle in its read of CONTROL: nothing changes while we look.
        wait_in_syscall(mapped.pid, (SYS_READ,))
        # A limit of its own, so that one the restore left at the restorer's shows.
        _, hard = resource.prlimit(mapped.pid, resource.RLIMIT_NOFILE)
        resource.prlimit(mapped.pid, resource.RLIMIT_NOFILE, (321, hard))
        maps_before, fds_before = maps_view(mapped.pid), pipes_named_alike(fds_view(mapped.pid))
        identity_before = identity_view(mapped.pid)
        hijack.ok("dump", mapped.pid, "-o", image, "--kill")
        assert mapped.wait_exit() == -signal.SIGKILL

        pid = restored_pid(hijack.ok("restore", image))
        mapped.adopt(pid)
        wait_in_syscall(pid, (SYS_READ,), describe=mapped.describe)
        assert_same_views(maps_before, maps_view(pid), f"/proc/{pid}/maps")
        assert_same_views(fds_before, pipes_named_alike(fds_view(pid)), f"/proc/{pid}/fd")
        assert_same_views(identity_before, identity_view(pid), f"/proc/{pid} identity")
        # Contents, protections, the file under the private mapping, the offset, the
        # self-pipe's 1000 bytes (once).
        mapped.assert_intact()


def test_skip_unsupported_drops_exactly_the_pipe_to_another_process(
    hijack: HijackCli, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    image = tmp_path / "mapped.crf"
    # Without FIFOs its CONTROL_FD is a pipe whose other end this test holds.
    with spawn_fixture("mapped", data) as mapped:
        [control] = [
            e
            for e in procfs.list_fds(mapped.pid)
            if e.kind is procfs.FdKind.PIPE
            and e.fd not in (int(mapped.ready["pipe_read_fd"]), int(mapped.ready["pipe_write_fd"]))
        ]
        wait_in_syscall(mapped.pid, (SYS_READ,), first_arg=control.fd)
        assert_refused(hijack("dump", mapped.pid, "-o", image, "--kill"), "pipe", "not killing")
        hijack.ok("dump", mapped.pid, "-o", image, "--kill", "--skip-unsupported")
        assert mapped.wait_exit() == -signal.SIGKILL

        with NothingStarted(None):
            assert_refused(hijack("restore", image), "pipe", "--skip-unsupported")
        restored = hijack.ok("restore", "--skip-unsupported", image)
        dropped = re.findall(r"dropped fd (\d+) \(pipe pipe:\[\d+\]\)", restored.stdout)
        assert dropped == [str(control.fd)], restored.describe()
        mapped.adopt(restored_pid(restored))
        # Back in its read of CONTROL, it finds the descriptor gone at once, and says so.
        assert mapped.finish() == 1
    assert "read(CONTROL_FD): Bad file descriptor" in mapped.stderr


# -- 8. hijack show --------------------------------------------------------------------------------

SUMMARY_KEYS = {
    "summary_version",
    "format_version",
    "image_bytes",
    "process",
    "threads",
    "memory",
    "descriptors",
    "objects",
    "settings",
    "timers",
    "pages",
    "rounds",
}
PROCESS_KEYS = {
    "pid",
    "ppid",
    "pgid",
    "sid",
    "comm",
    "argv",
    "exe",
    "node",
    "created_ns",
    "options",
    "uid",
    "gid",
    "cwd",
    "root",
}
THREAD_KEYS = {"tid", "comm", "rip", "rsp", "sigmask", "pending", "own_credentials"}
MEMORY_KEYS = {"start", "end", "size", "perms", "path", "contents", "stored_bytes"}
DESCRIPTOR_KEYS = {
    "fd",
    "kind",
    "path",
    "flags",
    "pos",
    "cloexec",
    "description_id",
    "object_id",
    "details",
}
PAGES_KEYS = {"stored", "zero", "untouched", "file", "referenced"}


def test_show_describes_a_real_image_as_text_and_as_json(hijack: HijackCli, tmp_path: Path) -> None:
    image = tmp_path / "blocked.crf"
    payload = f"payload-{secrets.token_hex(16)}\n"
    with spawn_fixture("blocked", "read", payload, fifos=True) as blocked:
        assert blocked.control_fifo is not None
        pid = blocked.pid
        wait_in_syscall(pid, (SYS_READ,))
        maps, fds = maps_view(pid), fds_view(pid)
        exe = os.readlink(f"/proc/{pid}/exe")
        hijack.ok("dump", pid, "-o", image)
        text = hijack.ok("show", image).stdout
        document = image_json(hijack, image)
        # The dump without --kill left it as it was.
        blocked.send(payload.encode())
        blocked.assert_intact()

    assert re.search(rf"^blocked pid {pid} \(ppid {os.getpid()},", text, re.MULTILINE), text
    assert f"exe {exe}" in text and f"argv {exe} read {payload.strip()}" in text, text
    for title in ("threads", "memory", "descriptors"):
        assert re.search(rf"^ +{title} *$", text, re.MULTILINE), f"no {title} table:\n{text}"
    for shown in (exe, "[stack]", "[vdso]", str(blocked.control_fifo)):
        assert shown in text, f"{shown} not shown:\n{text}"
    assert re.search(rf"│ {pid} +│ blocked +│ 0x[0-9a-f]+ +│", text), text

    # The documented keys (docs/crf.md §13), every one, nothing else.
    assert set(document) == SUMMARY_KEYS
    assert set(document["process"]) == PROCESS_KEYS
    assert all(set(thread) == THREAD_KEYS for thread in document["threads"])
    assert all(set(row) == MEMORY_KEYS for row in document["memory"])
    assert all(set(fd) == DESCRIPTOR_KEYS for fd in document["descriptors"])
    assert set(document["pages"]) == PAGES_KEYS
    # And what they say is what /proc said.
    process = document["process"]
    assert (process["pid"], process["comm"], process["exe"]) == (pid, "blocked", exe)
    assert process["argv"] == [exe, "read", payload]
    assert process["options"] == []
    assert document["image_bytes"] == image.stat().st_size
    [thread] = document["threads"]
    assert thread["tid"] == pid
    assert int(thread["sigmask"], 16) == 1 << (signal.SIGUSR2 - 1)
    shown_maps = frozenset(
        MapView(int(row["start"], 16), int(row["end"], 16), row["perms"], row["path"])
        for row in document["memory"]
    )
    assert_same_views(maps, shown_maps, "show --json memory against /proc/PID/maps")
    shown_fds = frozenset(
        FdView(fd["fd"], fd["path"], fd["pos"], fd["flags"]) for fd in document["descriptors"]
    )
    assert_same_views(fds, shown_fds, "show --json descriptors against /proc/PID/fd")
    assert document["pages"]["stored"] > 0


# -- 9. an unmodified python3 -m http.server: sockets wait for `hijack move` ---------------------


@contextlib.contextmanager
def http_server(directory: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, bytes]]:
    """/usr/bin/python3 -m http.server on 127.0.0.1 and a free port; yields (server, port, page).

    Its stdout is a file, not a pipe, so that the listening socket is the one
    descriptor a local restore cannot bring back.
    """
    site = directory / "site"
    site.mkdir()
    page = f"<p>served by python3 -m http.server {secrets.token_hex(8)}</p>\n".encode()
    (site / "page.html").write_bytes(page)
    output = directory / "server.out"
    with open(output, "wb") as stdout:
        server = subprocess.Popen(
            [PYTHON, "-m", "http.server", "0", "--bind", "127.0.0.1", "--directory", str(site)],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},  # its "Serving" line at once
        )
    try:
        # Printed once the socket listens, with the port the kernel chose.
        serving = re.compile(rb"^Serving HTTP on 127\.0\.0\.1 port (\d+) ", re.MULTILINE)
        wait_until(lambda: serving.search(output.read_bytes()) is not None, "http.server serving")
        found = serving.search(output.read_bytes())
        assert found is not None
        yield server, int(found[1]), page
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=EXIT_TIMEOUT)


def fetch(port: int, name: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{name}", timeout=10) as response:
        body: bytes = response.read()
        return body


def dump_http_server(hijack: HijackCli, directory: Path) -> tuple[Path, int, bytes]:
    """An image of a serving http.server (killed by the dump): (image, port, page)."""
    image = directory / "http-server.crf"
    with http_server(directory) as (server, port, page):
        assert fetch(port, "page.html") == page
        hijack.ok("dump", server.pid, "-o", image, "--kill")
        assert server.wait(timeout=EXIT_TIMEOUT) == -signal.SIGKILL
    return image, port, page


def test_python_http_server_serves_pages_after_restore(hijack: HijackCli, tmp_path: Path) -> None:
    image, port, page = dump_http_server(hijack, tmp_path)
    document = image_json(hijack, image)
    [listening] = [fd for fd in document["descriptors"] if fd["kind"] == "SOCKET"]
    [socket_object] = [o for o in document["objects"] if o["id"] == listening["object_id"]]
    assert socket_object["record"] == "InetSocket", socket_object
    assert socket_object["local_address"] == f"127.0.0.1:{port}", socket_object
    # ", N options": the listener's socket options (hijack.objects.sockopts)
    assert listening["details"].startswith(f"inet: tcp 127.0.0.1:{port} LISTEN, "), listening
    # Nothing kept it: the restore listens on the same address again.
    with Child(restored_pid(hijack.ok("restore", image))) as restored:
        assert fetch(port, "page.html") == page
        assert fetch(port, "page.html") == page
        entry = next(e for e in procfs.list_fds(restored.pid) if e.fd == listening["fd"])
        assert entry.kind is procfs.FdKind.SOCKET


def test_a_second_copy_cannot_listen_where_its_original_still_does(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "http-server.crf"
    with http_server(tmp_path) as (server, port, page):
        hijack.ok("dump", server.pid, "-o", image)
        with NothingStarted(None):
            assert_refused(
                hijack("restore", image), f"cannot listen again on 127.0.0.1:{port}", "in use"
            )
        assert fetch(port, "page.html") == page


def test_an_established_connection_dumped_with_kill_comes_back_to_its_client(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "echo.crf"
    with spawn_fixture("echo_server", fifos=True) as server:
        port = int(server.ready["port"])
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"ping")
            assert client.recv(4) == b"ping"
            # Sent while the server is gone: held back by the lock, then echoed.
            hijack.ok("dump", server.pid, "-o", image, "--kill")
            assert server.wait_exit() == -signal.SIGKILL
            client.sendall(b"pong")
            shown = image_json(hijack, image)
            [connection] = [fd for fd in shown["descriptors"] if "ESTABLISHED" in fd["details"]]
            assert connection["details"].startswith(f"tcp: 127.0.0.1:{port} -> ")
            server.adopt(restored_pid(hijack.ok("restore", image)))
            client.settimeout(30)
            assert client.recv(4) == b"pong"
        server.assert_intact()


def test_attached_python_http_server_serves_pages_after_dump_kill_and_restore(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "http-server.crf"
    with http_server(tmp_path) as (server, port, page):
        shadow = json.loads(hijack.ok("attach", "--json", server.pid).stdout)["shadow_pid"]
        # --kill hands the descriptors, listening socket included, to the shadow.
        hijack.ok("dump", server.pid, "-o", image, "--kill")
        assert server.wait(timeout=EXIT_TIMEOUT) == -signal.SIGKILL
        old_pid = server.pid
    with Child(shadow) as holder, Child(restored_pid(hijack.ok("restore", image))) as restored:
        assert restored.pid == old_pid
        # The very socket the server listened on, back from its shadow.
        assert fetch(port, "page.html") == page
        hijack.ok("detach", restored.pid)
        holder.wait()


def test_an_image_file_is_readable_by_its_owner_only(hijack: HijackCli, tmp_path: Path) -> None:
    # It holds the process's memory: keys, passwords, whatever the process had.
    image = tmp_path / "sleeper.crf"
    old_umask = os.umask(0o022)
    try:
        with spawn_fixture("blocked", "nanosleep", "0") as sleeper:
            hijack.ok("dump", sleeper.pid, "-o", image)
            sleeper.assert_intact()
    finally:
        os.umask(old_umask)
    assert image.stat().st_mode & 0o777 == 0o600


# -- 10. never kill what cannot come back: dump --kill refuses what a restore would -----------


def assert_runs(pid: int) -> None:
    """Still running (or sleeping): neither dead nor a zombie."""
    assert procfs.read_stat(pid).state not in ("Z", "X"), (
        f"process {pid} is {procfs.read_stat(pid)}"
    )


def test_dump_kill_of_a_removed_sysv_segment_is_no_refusal_and_it_comes_back(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "shm.crf"
    # As a postmaster's: "/SYSV00000000 (deleted)", removed while attached, so it goes
    # with the process; the restore makes it again (tests/test_obj_ipc.py has the rest).
    with spawn_fixture("sysv_shm", fifos=True) as shm:
        [segment] = [m for m in procfs.read_maps(shm.pid) if m.path.startswith("/SYSV")]
        assert segment.deleted and segment.shared, segment
        hijack.ok("dump", shm.pid, "-o", image, "--kill")
        assert shm.wait_exit() == -signal.SIGKILL
        shm.adopt(restored_pid(hijack.ok("restore", image)))
        assert segment in procfs.read_maps(shm.pid)
        shm.assert_intact()


def test_dump_kill_refuses_a_pipe_to_an_outside_process_unless_attached(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "counter.crf"
    # CONTROL_FD is an anonymous pipe whose other end is ours: outside the dump.
    with spawn_fixture("counter", tmp_path / "counter.log", "2") as counter:
        [pipe] = [e for e in procfs.list_fds(counter.pid) if e.kind is procfs.FdKind.PIPE]
        refused = hijack("dump", counter.pid, "-o", image, "--kill")
        assert_refused(refused, "not killing", f"fd {pipe.fd} (pipe {pipe.target})", "attach")
        assert not image.exists()
        assert_runs(counter.pid)

        # Attached, its shadow keeps the pipe: the dump kills, the restore gets the pipe back.
        shadow = json.loads(hijack.ok("attach", "--json", counter.pid).stdout)["shadow_pid"]
        hijack.ok("dump", counter.pid, "-o", image, "--kill")
        assert counter.wait_exit() == -signal.SIGKILL
        with Child(shadow) as holder:
            counter.adopt(restored_pid(hijack.ok("restore", image)))
            hijack.ok("detach", counter.pid)
            holder.wait()
            counter.assert_intact()


# -- 11. one open file description, dup'ed: restored as one ---------------------------------------


def test_dup_ed_descriptors_of_a_file_share_one_offset_after_restore(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "shared.crf"
    with spawn_fixture("shared_offset", tmp_path / "shared.txt", fifos=True) as shared:
        first, second, apart = (int(shared.ready[key]) for key in ("first", "second", "apart"))
        fds_before = fds_view(shared.pid)
        hijack.ok("dump", shared.pid, "-o", image, "--kill")
        assert shared.wait_exit() == -signal.SIGKILL
        document = image_json(hijack, image)
        description = {d["fd"]: d["description_id"] for d in document["descriptors"]}
        assert description[first] == description[second] != description[apart]
        shown = hijack.ok("show", image).stdout
        assert re.search(rf"│ {second} .*\(the open file of fd {first}\)", shown), shown
        assert f"(the open file of fd {second})" not in shown, shown

        pid = restored_pid(hijack.ok("restore", image))
        shared.adopt(pid)
        assert_same_views(fds_before, fds_view(pid), f"/proc/{pid}/fd")
        assert kcmp.same_description(pid, first, second)
        assert not kcmp.same_description(pid, first, apart)
        shared.assert_intact()  # it writes through `second` and finds `first` moved on


EPOLL_OVER_A_PIPE = """
import os, select, sys, time
ready, pipe_read = int(sys.argv[1]), int(sys.argv[2])
counter = os.eventfd(1)
watcher = select.epoll()
watcher.register(counter, select.EPOLLIN)
watcher.register(pipe_read, select.EPOLLIN)
os.write(ready, f"{watcher.fileno()} {counter} {pipe_read}".encode())
os.close(ready)
while True:
    time.sleep(3600)
"""


def test_an_epoll_watching_a_dropped_pipe_watches_the_rest_after_restore(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "epoll.crf"
    ready_read, ready_write = os.pipe()
    # A pipe whose write end stays here: no restore can rebuild its read end.
    outside_read, outside_write = os.pipe()
    with open(tmp_path / "out", "wb") as out:
        process = subprocess.Popen(
            [PYTHON, "-c", EPOLL_OVER_A_PIPE, str(ready_write), str(outside_read)],
            pass_fds=(ready_write, outside_read),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
        )
    os.close(ready_write)
    os.close(outside_read)
    try:
        with os.fdopen(ready_read, "rb") as ready:
            epoll_fd, counter, pipe_read = map(int, ready.read().split())
        hijack.ok("dump", process.pid, "-o", image, "--kill", "--skip-unsupported")
        assert process.wait(timeout=EXIT_TIMEOUT) == -signal.SIGKILL
    finally:
        process.kill()
        process.wait()
        os.close(outside_write)
    # EPOLLIN as registered; the kernel adds EPOLLERR and EPOLLHUP (0x18) to every entry.
    details = {d["fd"]: d["details"] for d in image_json(hijack, image)["descriptors"]}
    # In the kernel's order (by its file structures' addresses): either way round.
    assert details[epoll_fd] in (
        f"epoll: watching 2 ({counter}:0x19, {pipe_read}:0x19)",
        f"epoll: watching 2 ({pipe_read}:0x19, {counter}:0x19)",
    ), details
    assert details[counter] == "eventfd: count 1", details
    assert details[pipe_read] == f"pipe: read end, shared with process {os.getpid()}", details
    restored = hijack.ok("restore", "--skip-unsupported", image)
    assert f"dropped fd {pipe_read} (pipe" in restored.stdout, restored.describe()
    with Child(restored_pid(restored)) as child:
        watched = procfs.read_fdinfo(child.pid, epoll_fd).epoll_targets
        assert [tfd for tfd, _, _ in watched] == [counter], watched
        assert {e.fd for e in procfs.list_fds(child.pid)} >= {epoll_fd, counter}
        assert pipe_read not in {e.fd for e in procfs.list_fds(child.pid)}
