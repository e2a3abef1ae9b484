"""Multi-threaded processes: attach, dump and restore stop, save and rebuild every thread.

The fixtures (tests/fixtures/workers.c, churn.c) check their own state at the
finish: counters kept under a mutex and mirrored in TLS, threads parked in
each kind of blocking call that must wake on its event and not on EINTR,
ymm registers kept across a read(), PI and robust mutexes whose futex words
carry thread ids, threads created and joined thousands of times a second.
The tests add what only the outside can see: thread ids before and after,
the state the kernel keeps per thread (a second dump of the restored process
holds what the first image held), counters in the image against the process,
and an unmodified multi-threaded server from Debian, redis-server, serving the
same client connections across a dump and a restore.

What a user does runs through the CLI (`python -m hijack`, its own state
directory per test). A process restored that way, and a shadow whose target
ended, is re-parented to pytest (a child subreaper) and reaped here. Waits are
bounded and on pipes, pidfds and files; where a thread must be inside a
blocking call, /proc is polled with a bound. Every image a test writes is
decoded and re-encoded after it and must come out byte-identical.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import pytest
from support import RunningFixture, spawn_fixture
from support.cli import CLI_TIMEOUT, HijackCli, restored_pid
from support.copies import copy_beside_original, suffixed
from support.procview import has_exited, wait_in_syscall
from support.redis import REDIS_SERVER, Resp, redis_server

from hijack.image import records as rec
from hijack.image.codec import read_image, recode
from hijack.mutator.tracee import Tracee

EXIT_TIMEOUT = 30.0
POLL_TIMEOUT = 10.0
# Long enough that the sleeper still sleeps when the dump is taken (attach
# and dump take well under a second here, but several on a machine loaded
# by other suites), short enough not to slow the file much.
SLEEP_MS = 8000
CHURN_DUMPS = 10
CHURN_ATTACHES = 5
# A seize that misses a stop hangs: fail in seconds, not after the CLI's minute.
CHURN_CLI_TIMEOUT = 20.0
WORKERS = 8

# x86_64 system call numbers, as /proc/PID/syscall shows them.
SYS_READ = 0
SYS_NANOSLEEP = 35
SYS_ACCEPT = 43
SYS_FUTEX = 202
SYS_RESTART_SYSCALL = 219  # a sleep resumed after a live stop continues here
SYS_CLOCK_NANOSLEEP = 230  # glibc's nanosleep()
SYS_EPOLL_WAIT = 232
SYS_EPOLL_PWAIT = 281
SYS_ACCEPT4 = 288
# Where each parked thread of `workers` waits (its tid is in the ready line).
PARKED_IN = {
    "cond": (SYS_FUTEX,),
    "sleeper": (SYS_NANOSLEEP, SYS_CLOCK_NANOSLEEP, SYS_RESTART_SYSCALL),
    "dier": (SYS_FUTEX,),
    "epoll": (SYS_EPOLL_WAIT, SYS_EPOLL_PWAIT),
    "reader": (SYS_READ,),
    "acceptor": (SYS_ACCEPT, SYS_ACCEPT4),
}
# Parked threads whose registers must be exactly the image's after a restore:
# re-entered, their call stops where it stopped before. (The sleeper's is
# re-issued with the time that was left, so its arguments differ.)
SAME_REGISTERS = ("cond", "dier", "epoll", "reader", "acceptor")
ON_CHANGED = ("cond", "dier")  # waiting on the condition a thread's wake-up broadcasts

COUNTERS_LINE = re.compile(r"^counters=([\d,]+)$", re.MULTILINE)


@pytest.fixture
def hijack(tmp_path: Path) -> HijackCli:
    return HijackCli(tmp_path / "state")


@pytest.fixture(autouse=True)
def every_image_recodes(tmp_path: Path) -> Iterator[None]:
    yield
    for image in sorted(tmp_path.rglob("*.crf")):
        recoded = io.BytesIO()
        with open(image, "rb") as source:
            recode(source, recoded)
        assert recoded.getvalue() == image.read_bytes(), f"{image} does not re-encode the same"


# -- looking at processes and images --------------------------------------------------------------


def thread_ids(pid: int) -> set[int]:
    return {int(tid) for tid in os.listdir(f"/proc/{pid}/task")}


def task_state(pid: int, tid: int) -> str:
    text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    return text[text.rindex(")") + 2]


def tracer_of(pid: int, tid: int) -> int:
    for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/task/{tid}/status has no TracerPid")


def assert_untraced(pid: int) -> None:
    for tid in thread_ids(pid):
        # A short-lived thread gone since the listing: ENOENT, or ESRCH mid-read.
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            assert tracer_of(pid, tid) == 0, f"task {tid} is still traced"
            assert task_state(pid, tid) not in ("t", "T"), f"task {tid} is left stopped"


def threads_in(image: Path) -> dict[int, rec.Thread]:
    with open(image, "rb") as stream:
        return {r.tid: r for r in read_image(stream) if isinstance(r, rec.Thread)}


def counters_in_image(image: Path, address: int) -> list[int]:
    """The workers' 8 counters as the image holds them (the instant of the dump)."""
    size = WORKERS * 8
    with open(image, "rb") as stream:
        for record in read_image(stream):
            if isinstance(record, rec.Pages):
                offset = address - record.address
                if offset >= 0 and offset + size <= len(record.data):
                    return list(struct.unpack_from(f"<{WORKERS}Q", record.data, offset))
    raise AssertionError(f"{image} holds no page with the counters at {address:#x}")


def counters_in_process(pid: int, address: int) -> list[int]:
    with open(f"/proc/{pid}/mem", "rb") as memory:
        memory.seek(address)
        return list(struct.unpack(f"<{WORKERS}Q", memory.read(WORKERS * 8)))


def kept_per_thread(thread: rec.Thread) -> tuple[object, ...]:
    """What the kernel keeps for a thread that does not change while it runs."""
    return (
        thread.regs.fs_base,
        thread.regs.gs_base,
        thread.rseq,
        thread.robust_list,
        thread.clear_child_tid,
        thread.sigaltstack,
        thread.sigmask,
        thread.comm,
    )


def attach(hijack: HijackCli, pid: int, timeout: float = CLI_TIMEOUT) -> int:
    """`hijack attach PID`; the shadow's pid."""
    attached = hijack.ok("attach", "--json", pid, timeout=timeout)
    shadow: int = json.loads(attached.stdout)["shadow_pid"]
    return shadow


def wait_until(
    condition: Callable[[], bool],
    what: str,
    timeout: float = POLL_TIMEOUT,
    describe: Callable[[], str] = str,
) -> None:
    """Poll `condition` (a look at a file or /proc) until it holds; bounded."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s\n{describe()}")
        time.sleep(0.005)


class Reaped:
    """Around the life of a process that is, or becomes, our child (a restored process, a shadow).

    Leaving the block waits (bounded) for it to end and reaps it; if the
    block failed, or it does not end in time, it is killed first.
    """

    def __init__(self, pid: int, timeout: float = EXIT_TIMEOUT) -> None:
        self.pid = pid
        self.timeout = timeout
        self.returncode: int | None = None
        self._pidfd = os.pidfd_open(pid)

    def __enter__(self) -> Reaped:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            ended = exc_type is None and self._ended(self.timeout)
            if not ended:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                self._ended(self.timeout)
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        finally:
            os.close(self._pidfd)
        if exc_type is None and not ended:
            raise AssertionError(f"process {self.pid} still ran {self.timeout} s after its block")

    def _ended(self, timeout: float) -> bool:
        readable, _, _ = select.select([self._pidfd], [], [], timeout)
        return bool(readable)


# -- driving the workers fixture ----------------------------------------------------------------


def parked_tids(workers: RunningFixture) -> dict[str, int]:
    return {
        role: int(workers.ready[f"tid_{role}"])
        for role in PARKED_IN
        if f"tid_{role}" in workers.ready
    }


def wait_parked(workers: RunningFixture, *, sleeper: bool = True) -> None:
    """Every parked thread inside its blocking call, and main in its read of CONTROL_FD.

    `sleeper` False leaves the sleeper out: its SLEEP_MS may be over on a loaded machine.
    """
    for role, tid in parked_tids(workers).items():
        if role == "sleeper" and not sleeper:
            continue
        wait_in_syscall(tid, PARKED_IN[role], describe=workers.describe)
    wait_in_syscall(workers.pid, (SYS_READ,), describe=workers.describe)


def wait_for_line(
    output: Callable[[], str], line: str, pid: int, describe: Callable[[], str]
) -> None:
    """Wait until `line` is in `output()`; fail at once, saying why, if process `pid` ends."""
    wait_until(lambda: line in output() or has_exited(pid), f"{line!r} printed", describe=describe)
    assert line in output(), f"process {pid} ended before printing {line!r}\n{describe()}"


def wait_for_fixture_line(fixture: RunningFixture, line: str) -> None:
    wait_for_line(lambda: fixture.stdout, line, fixture.pid, fixture.describe)


def write_fifo(path: Path, data: bytes) -> None:
    # The fixture (or the shadow keeping its descriptors) holds it open for
    # reading: opening for writing does not block.
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        assert os.write(fd, data) == len(data)
    finally:
        os.close(fd)


def wake_parked(workers: RunningFixture, channels: Path | None) -> None:
    """Each parked thread gets its event and wakes; then the PI phase and the robust check."""
    workers.send(b"c")
    wait_for_fixture_line(workers, "woke cond")
    if channels is not None:
        write_fifo(channels / "epoll.fifo", b"epoll\n")
        wait_for_fixture_line(workers, "woke epoll")
        write_fifo(channels / "read.fifo", b"read\n")
        wait_for_fixture_line(workers, "woke reader")
        token = f"hello-{secrets.token_hex(8)}\n".encode()
        port = int(workers.ready["port"])
        with socket.create_connection(("127.0.0.1", port), timeout=POLL_TIMEOUT) as client:
            client.sendall(token)
            echoed = client.makefile("rb").readline()
        assert echoed == token, f"accept()ed connection echoed {echoed!r}\n{workers.describe()}"
        wait_for_fixture_line(workers, "woke acceptor")
    workers.send(b"p")
    wait_for_fixture_line(workers, "pi ok generation=1 ")
    workers.send(b"r")
    wait_for_fixture_line(workers, "robust ok")


def final_counters(output: str) -> list[int]:
    found = COUNTERS_LINE.search(output)
    assert found, output
    return [int(count) for count in found[1].split(",")]


# -- 0. the fixtures alone: they pass, and their checks bite --------------------------------------


def test_workers_and_churn_alone_pass_and_their_checks_bite(tmp_path: Path) -> None:
    for name in ("channels", "lazy", "wrong"):
        (tmp_path / name).mkdir()
    with spawn_fixture("workers", "100", tmp_path / "channels") as workers:
        wake_parked(workers, tmp_path / "channels")
        workers.assert_intact()
    assert "woke sleeper" in workers.stdout and "PASS workers" in workers.stdout
    with spawn_fixture("workers", "100", tmp_path / "lazy") as lazy:
        assert lazy.finish() == 1
    assert "FAIL workers: the cond thread was never woken" in lazy.stderr
    with spawn_fixture("workers", "100", tmp_path / "wrong") as wrong:
        write_fifo(tmp_path / "wrong" / "read.fifo", b"rEad\n")
        assert wrong.wait_exit() == 1  # at once, on its own
    assert 'FAIL workers: read(read.fifo): got "rEad' in wrong.stderr
    with spawn_fixture("churn") as churn:
        churn.assert_intact()
    assert re.search(r"^created=[1-9]\d* detached=[1-9]\d*$", churn.stdout, re.MULTILINE)


# -- 1. eight workers and six parked threads, attached, killed, restored -------------------------


def test_workers_killed_and_restored_count_on_wake_and_join(
    hijack: HijackCli, tmp_path: Path
) -> None:
    channels = tmp_path / "channels"
    channels.mkdir()
    image, again = tmp_path / "workers.crf", tmp_path / "restored.crf"
    with spawn_fixture("workers", str(SLEEP_MS), channels, fifos=True) as workers:
        old_pid, address = workers.pid, int(workers.ready["counters"], 16)
        parked = parked_tids(workers)
        wait_parked(workers)
        tids = thread_ids(old_pid)
        assert len(tids) == int(workers.ready["threads"]) == 1 + WORKERS + len(PARKED_IN)
        # Attached first: its shadow keeps the epoll instance, the FIFOs and
        # the listening socket for a restore on this node.
        with Reaped(attach(hijack, old_pid)):
            wait_parked(workers)  # back in their calls after the attach, not out with EINTR
            hijack.ok("dump", old_pid, "-o", image, "--kill")
            assert workers.wait_exit() == -signal.SIGKILL
            assert "woke" not in workers.stdout, "not dumped with every thread parked"
            assert set(threads_in(image)) == tids
            saved = counters_in_image(image, address)
            assert all(saved), f"a worker had not counted yet at the dump: {saved}"

            pid = restored_pid(hijack.ok("restore", image))
            workers.adopt(pid)
            assert pid == old_pid
            assert thread_ids(pid) == tids, "not every thread got its old tid back"
            # Every thread back in the call it was dumped in, the sleeper too
            # (with what was left of its sleep: it has not printed yet).
            wait_parked(workers)
            assert "woke" not in workers.stdout, workers.describe()
            # The workers go on from their saved counts, not from zero.
            resumed = counters_in_process(pid, address)
            assert all(now >= then for now, then in zip(resumed, saved, strict=True)), (
                f"counters went back: saved {saved}, now {resumed}"
            )
            wait_until(
                lambda: all(
                    now > then
                    for now, then in zip(counters_in_process(pid, address), saved, strict=True)
                ),
                "every worker counting again after the restore",
            )

            # A second dump of the restored process holds what the kernel
            # keeps per thread as the first image did: rseq area, robust
            # list, clear-child-tid, fs_base, altstack, mask, name; and each
            # thread that sits in its call exactly its registers.
            hijack.ok("dump", pid, "-o", again)
            first, second = threads_in(image), threads_in(again)
            assert set(second) >= tids - {parked["sleeper"]}, "threads lost by the restore"
            for tid in set(first) & set(second):
                assert kept_per_thread(second[tid]) == kept_per_thread(first[tid]), f"thread {tid}"
            # The sleeper's time may be up by now (a loaded machine): its wake-up broadcast
            # the condition the cond and dier threads wait on, and they waited again (in
            # the condition's other group: other registers). Still asleep in the second
            # image (one instant), it woke nobody.
            sleeper = second.get(parked["sleeper"])
            asleep = sleeper is not None and sleeper.regs.orig_rax in PARKED_IN["sleeper"]
            for role in SAME_REGISTERS:
                if role in ON_CHANGED and not asleep:
                    continue
                tid = parked[role]
                assert second[tid].regs == first[tid].regs, f"{role} thread {tid} moved"
            assert second[pid].regs == first[pid].regs, "main thread moved out of its read"
            assert all(thread.rseq.rseq_abi_pointer for thread in second.values())

            # Each parked thread wakes on its own event: epoll_wait gets its
            # FIFO ready (not EINTR), accept() a connection through the very
            # socket the shadow kept; PI and robust mutexes on the old tids.
            wake_parked(workers, channels)
            hijack.ok("detach", pid)
        # The sleeper slept its whole time; everyone joined; all invariants.
        workers.assert_intact()
    assert "woke sleeper" in workers.stdout
    finished = final_counters(workers.stdout)
    assert all(end > then for end, then in zip(finished, saved, strict=True)), (saved, finished)


# -- 2. an independent copy on new tids: glibc's cached thread ids are fixed ---------------------


def test_copy_on_new_tids_keeps_pi_and_robust_mutexes_working(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "workers.crf"
    with spawn_fixture("workers", str(SLEEP_MS), fifos=True) as original:
        wait_parked(original)
        original_tids = thread_ids(original.pid)
        hijack.ok("dump", original.pid, "-o", image)

        control = original.control_fifo
        assert control is not None
        stdout = Path(os.readlink(f"/proc/{original.pid}/fd/1"))
        stderr = Path(os.readlink(f"/proc/{original.pid}/fd/2"))
        with copy_beside_original(hijack, image, control, (stdout, stderr)) as (
            copy_pid,
            copy_control,
        ):
            copy_stdout, copy_stderr = suffixed(stdout, ".copy"), suffixed(stderr, ".copy")
            with Reaped(copy_pid) as copy:
                copy_tids = thread_ids(copy_pid)
                # The sleeper goes on with the rest of its nanosleep and ends with it: on a
                # loaded machine the dump and the restore can outlast it. It says so before
                # it ends, so read after the listing, its word covers a listing without it.
                sleeper_done = "woke sleeper" in copy_stdout.read_text()
                threads = len(original_tids)
                expected = {threads, threads - 1} if sleeper_done else {threads}
                assert len(copy_tids) in expected, (copy_tids, original_tids, sleeper_done)
                # The original holds every old tid: each thread of the copy has a new one.
                # (All but its sleeper's, which may have ended by now, on a loaded machine:
                # its tid, free again, is the copy's sleeper's to take.)
                held = original_tids - {parked_tids(original)["sleeper"]}
                assert not copy_tids & held, (copy_tids, held)
                # Threads that existed at the dump, now on new tids, contend for
                # a PI mutex (FUTEX_LOCK_PI/UNLOCK_PI check the tid glibc put in
                # the futex word) and one dies holding a robust mutex (the
                # kernel marks it only if the word holds the dead thread's tid).
                for command, line in ((b"c", "woke cond"), (b"p", "pi ok "), (b"r", "robust ok")):
                    copy_control.write(command)
                    wait_for_line(copy_stdout.read_text, line, copy_pid, copy_stderr.read_text)
                copy_control.close()
            assert copy.returncode == 0, f"the copy failed: {copy_stderr.read_text()}"
            assert "PASS workers" in copy_stdout.read_text()

        # The original, on its own tids, as intact as its copy.
        for command, line in ((b"c", "woke cond"), (b"p", "pi ok "), (b"r", "robust ok")):
            original.send(command)
            wait_for_fixture_line(original, line)
        original.assert_intact()
    assert "PASS workers" in original.stdout


# -- 3. threads created and exiting while attach and dump run ------------------------------------


def test_churning_threads_dumped_again_and_again_then_killed_and_restored(
    hijack: HijackCli, tmp_path: Path
) -> None:
    with spawn_fixture("churn", fifos=True) as churn:
        old_pid = churn.pid
        held: list[frozenset[int]] = []
        for round_number in range(CHURN_DUMPS):
            image = tmp_path / f"churn-{round_number}.crf"
            hijack.ok("dump", old_pid, "-o", image, timeout=CHURN_CLI_TIMEOUT)
            held.append(frozenset(threads_in(image)))
        killed = tmp_path / "churn-killed.crf"
        hijack.ok("dump", old_pid, "-o", killed, "--kill", timeout=CHURN_CLI_TIMEOUT)
        assert churn.wait_exit() == -signal.SIGKILL
        held.append(frozenset(threads_in(killed)))

        pid = restored_pid(hijack.ok("restore", killed))
        churn.adopt(pid)
        assert pid == old_pid
        # Spawners joining what they created, detached threads ending, keepers counting.
        churn.assert_intact()
    long_lived = 1 + 3 + 2  # main, spawners, keepers
    assert all(len(tids) >= long_lived for tids in held), [len(tids) for tids in held]
    # The dumps caught short-lived threads mid-life, and others each time.
    assert any(len(tids) > long_lived for tids in held), [len(tids) for tids in held]
    assert len(set(held)) > 1
    assert "PASS churn" in churn.stdout


def test_churning_threads_attached_and_detached_again_and_again(hijack: HijackCli) -> None:
    with spawn_fixture("churn") as churn:
        for _ in range(CHURN_ATTACHES):
            with Reaped(attach(hijack, churn.pid, CHURN_CLI_TIMEOUT)):
                assert_untraced(churn.pid)
                hijack.ok("detach", churn.pid)
            assert_untraced(churn.pid)
        churn.assert_intact()
    assert "PASS churn" in churn.stdout


# -- 4. an unmodified multi-threaded server: redis-server from Debian ------------------------------

REDIS_KEYS = 200
REDIS_BIG_VALUE = 1 << 20


@pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not installed (`make test` installs it: apt-get install redis-server)",
)
def test_attached_redis_server_keeps_its_clients_and_keys_through_dump_kill_and_restore(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "redis.crf"
    values = {f"key:{n}": secrets.token_hex(16) for n in range(REDIS_KEYS)}
    big = secrets.token_bytes(REDIS_BIG_VALUE)
    with redis_server(tmp_path) as (server, port, log):
        tasks = thread_ids(server.pid)
        # bio_close_file, bio_aof_fsync, bio_lazy_free, jemalloc_bg_thd beside main.
        assert len(tasks) > 1, f"redis-server runs {len(tasks)} thread: nothing to prove"
        before = Resp(port)  # connected before the attach: the shadow forks holding it
        for key, value in values.items():
            assert before.command("SET", key, value) == b"OK"
        with Reaped(attach(hijack, server.pid)):
            during = Resp(port)  # accepted after the attach: handed over at the dump
            assert during.command("SET", "big", big) == b"OK"
            hijack.ok("dump", server.pid, "-o", image, "--kill")
            assert server.wait(timeout=EXIT_TIMEOUT) == -signal.SIGKILL
            assert set(threads_in(image)) == tasks

            with Reaped(restored_pid(hijack.ok("restore", image))) as restored:
                assert restored.pid == server.pid
                assert thread_ids(restored.pid) == tasks
                # The same connections, which the shadow kept open.
                assert before.command("PING") == b"PONG"
                assert during.command("GET", "big") == big
                assert before.command("DBSIZE") == REDIS_KEYS + 1
                # And a new one, through the listening socket the shadow kept.
                after = Resp(port)
                for key, value in values.items():
                    assert after.command("GET", key) == value.encode(), key
                assert after.command("SET", "after", "restore") == b"OK"
                assert during.command("GET", "after") == b"restore"
                hijack.ok("detach", restored.pid)
                # A clean end: redis closes every client and exits 0.
                after.send("SHUTDOWN", "NOSAVE")
                assert all(client.closed_by_peer() for client in (after, before, during))
            for client in (before, during, after):
                client.close()
    assert restored.returncode == 0, log.read_text()


# -- 5. attach and detach: every thread stopped while seized, all intact after --------------------


def test_workers_all_stopped_while_seized_and_intact_through_attach_and_detach(
    hijack: HijackCli, tmp_path: Path
) -> None:
    channels = tmp_path / "channels"
    channels.mkdir()
    with spawn_fixture("workers", str(SLEEP_MS), channels) as workers:
        wait_parked(workers)
        tids = thread_ids(workers.pid)
        # The sleeper ends when its SLEEP_MS is up, which a loaded machine can
        # reach during this test: its end is the fixture's to check, not a loss.
        sleeper = {parked_tids(workers)["sleeper"]}
        with Tracee.seize(workers.pid) as tracee:
            assert set(tracee.thread_ids) - sleeper == tids - sleeper
            states = {tid: task_state(workers.pid, tid) for tid in tids - sleeper}
            assert set(states.values()) == {"t"}, f"not every task stopped: {states}"
        assert_untraced(workers.pid)
        wait_parked(workers, sleeper=False)
        with Reaped(attach(hijack, workers.pid)):
            assert thread_ids(workers.pid) - sleeper == tids - sleeper
            assert_untraced(workers.pid)
            # epoll_wait re-entered, nanosleep continued: no EINTR
            wait_parked(workers, sleeper=False)
            hijack.ok("detach", workers.pid)
        assert_untraced(workers.pid)
        woken = {line for line in workers.stdout.splitlines() if line.startswith("woke")}
        assert woken <= {"woke sleeper"}, workers.describe()
        wake_parked(workers, channels)
        workers.assert_intact()
    assert "PASS workers" in workers.stdout


# -- 6. thirty threads, each with its own altstack and clear-child-tid address ---------------------


@pytest.mark.parametrize("trap", ["caught", "ignored"])
def test_thirty_threads_keep_their_own_altstacks_and_tid_addresses_through_dump_and_restore(
    hijack: HijackCli, tmp_path: Path, trap: str
) -> None:
    # What only a call made in a thread tells (dump's per-thread batches): read side by side
    # in every thread at once, or, SIGTRAP ignored (no int3 may end code of ours), one call
    # at a time; the restored threads must each get their own back.
    image, again = tmp_path / "altstacks.crf", tmp_path / "restored.crf"
    arguments = ("30",) if trap == "caught" else ("30", "ignore-trap")
    with spawn_fixture("altstacks", *arguments, fifos=True) as fixture:
        tids = thread_ids(fixture.pid)
        assert len(tids) == int(fixture.ready["threads"]) == 31
        hijack.ok("dump", fixture.pid, "-o", image, "--kill")
        assert fixture.wait_exit() == -signal.SIGKILL
        first = threads_in(image)
        assert set(first) == tids
        assert_own_altstacks_and_slots(first, fixture)

        pid = restored_pid(hijack.ok("restore", image))
        fixture.adopt(pid)
        assert thread_ids(pid) == tids, "not every thread got its old tid back"
        # A dump of the restored process (a snapshot: read one call at a time) finds
        # each thread's own state again.
        hijack.ok("dump", pid, "-o", again)
        second = threads_in(again)
        assert set(second) == tids
        for tid in tids:
            assert kept_per_thread(second[tid]) == kept_per_thread(first[tid]), f"thread {tid}"
        fixture.assert_intact()  # each thread checks its own, a signal on its altstack
    assert "checked=31" in fixture.stdout


def assert_own_altstacks_and_slots(threads: dict[int, rec.Thread], fixture: RunningFixture) -> None:
    """Task i (main 0) of the altstacks fixture: slot `slots + 8i`, an altstack of
    `stack_size + 4096i` bytes; every task once (a mix-up pairs one's slot with another's)."""
    slots, size = int(fixture.ready["slots"], 16), int(fixture.ready["stack_size"])
    indexes = {}
    for tid, thread in threads.items():
        index, rest = divmod(thread.clear_child_tid - slots, 8)
        assert rest == 0, f"task {tid}: clear-child-tid {thread.clear_child_tid:#x}"
        altstack = thread.sigaltstack
        assert (altstack.ss_size, altstack.ss_flags) == (size + 4096 * index, 0), f"task {tid}"
        assert altstack.ss_sp, f"task {tid}: no altstack"
        indexes[tid] = index
    assert indexes[fixture.pid] == 0, "main's slot is another's"
    assert sorted(indexes.values()) == list(range(len(threads)))
