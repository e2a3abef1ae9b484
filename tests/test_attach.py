"""`hijack attach` and `hijack detach` on real, unmodified processes.

Every test runs real fixtures (tests/fixtures) or real programs under the real
kernel: hijack seizes them, forks a shadow out of them and lets them go; the
fixture's own verdict at the end says whether anything it holds was disturbed.
Waits are on pipes, pidfds and sockets, bounded; where a fixture must be inside
a blocking call before the attach, /proc is polled in a bounded loop (the
fixture says ready just before it enters the call).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import spawn_fixture
from support.cli import CliResult, HijackCli

from hijack.mutator import attach as attaching
from hijack.mutator.tracee import Tracee
from hijack.registry import Registry
from hijack.shadow import control

PROC_TIMEOUT = 10.0  # bounded polls of /proc state
EXIT_TIMEOUT = 10.0

# x86_64 system call numbers, as /proc/PID/syscall shows them.
SYS_READ = 0
SYS_PSELECT6 = 270  # glibc's select()
SYS_CLOCK_NANOSLEEP = 230  # glibc's nanosleep()
SYS_RESTART_SYSCALL = 219  # a sleep resumed after a stop continues here
SYS_KCMP = 312
KCMP_FILE = 0

_libc = ctypes.CDLL(None, use_errno=True)


# -- looking at processes from outside (plain /proc, not hijack's own parsers) ----------


def _stat_fields(path: str) -> list[str]:
    """Fields 3.. of a /proc stat file (after the comm, which may hold spaces)."""
    text = Path(path).read_text()
    return text[text.rindex(")") + 2 :].split()


def process_state(pid: int, tid: int | None = None) -> str:
    return _stat_fields(f"/proc/{pid}/task/{tid or pid}/stat")[0]


def parent_pid(pid: int) -> int:
    return int(_stat_fields(f"/proc/{pid}/stat")[1])


def status_field(pid: int, field: str, tid: int | None = None) -> str:
    for line in Path(f"/proc/{pid}/task/{tid or pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return value.strip()
    raise AssertionError(f"/proc/{pid}/status has no {field}")


def thread_ids(pid: int) -> set[int]:
    return {int(tid) for tid in os.listdir(f"/proc/{pid}/task")}


def fd_numbers(pid: int) -> set[int]:
    return {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}


def fd_position(pid: int, fd: int) -> int:
    for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines():
        if line.startswith("pos:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/fdinfo/{fd} has no pos")


def fd_table(pid: int) -> dict[int, tuple[str, str]]:
    """fd -> (what it points to, its fdinfo flags): how the process sees its descriptors."""
    table = {}
    for fd in fd_numbers(pid):
        flags = next(
            line.split()[1]
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
            if line.startswith("flags:")
        )
        table[fd] = (os.readlink(f"/proc/{pid}/fd/{fd}"), flags)
    return table


def socket_fds(pid: int) -> list[int]:
    return [fd for fd, (link, _) in fd_table(pid).items() if link.startswith("socket:")]


def children_of(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of every process whose parent is `pid`, zombies included."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                fields = _stat_fields(f"/proc/{name}/stat")
                if int(fields[1]) == pid:
                    found.append((int(name), fields[0]))
    return found


def same_open_file(pid: int, fd: int, other_pid: int, other_fd: int) -> bool:
    """kcmp(KCMP_FILE): do the two descriptors point to one open file description?"""
    result = _libc.syscall(
        ctypes.c_long(SYS_KCMP),
        ctypes.c_long(pid),
        ctypes.c_long(other_pid),
        ctypes.c_long(KCMP_FILE),
        ctypes.c_long(fd),
        ctypes.c_long(other_fd),
    )
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"kcmp({pid}:{fd}, {other_pid}:{other_fd}): {os.strerror(err)}")
    return bool(result == 0)


def wait_in_syscall(
    pid: int, numbers: Collection[int], tid: int | None = None, timeout: float = PROC_TIMEOUT
) -> int:
    """Wait until the task sleeps inside one of the system calls `numbers`; return which.

    A bounded poll of /proc: the fixture says ready just before the call, and
    the kernel offers no event for "entered a system call" short of tracing it.
    """
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        try:
            seen = Path(f"/proc/{pid}/task/{tid or pid}/syscall").read_text().strip()
            state = process_state(pid, tid)
        except (FileNotFoundError, ProcessLookupError):
            raise AssertionError(f"task {tid or pid} exited while we waited for it") from None
        number = seen.split()[0]
        if state == "S" and number.lstrip("-").isdigit() and int(number) in numbers:
            return int(number)
        os.sched_yield()
    raise AssertionError(
        f"task {tid or pid} not asleep in system call {sorted(numbers)} within {timeout} s "
        f"(last seen: {seen!r})"
    )


def wait_until(condition: Callable[[], bool], what: str, timeout: float = PROC_TIMEOUT) -> None:
    """Bounded poll of /proc-derived state that has no event to wait on."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        os.sched_yield()


def reap_exited(pid: int, timeout: float = EXIT_TIMEOUT) -> None:
    """Demand that `pid` has exited (bounded, on its pidfd) and reap it if it is our child.

    Shadows end up children of pytest, the subreaper above every fixture
    (conftest), once the intermediate process they were forked from exits.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # gone and reaped already
    try:
        readable, _, _ = select.select([pidfd], [], [], timeout)
        assert readable, f"process {pid} still runs {timeout} s after it was told to end"
    finally:
        os.close(pidfd)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def still_running(pid: int) -> bool:
    try:
        return process_state(pid) not in ("Z", "X")
    except FileNotFoundError:
        return False


def assert_refused(result: CliResult, *phrases: str) -> None:
    """Exit 1 with exactly one line on stderr, naming the reason, and no traceback."""
    assert result.returncode == 1, result.describe()
    assert "Traceback" not in result.stderr, result.describe()
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.describe()
    assert lines[0].startswith("hijack: "), result.describe()
    for phrase in phrases:
        assert phrase in lines[0], result.describe()


# -- pytest fixtures -----------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path) -> HijackCli:
    return HijackCli(tmp_path / "s")


@contextlib.contextmanager
def attached(cli: HijackCli, pid: int, *, same_fds: bool = True) -> Iterator[dict[str, Any]]:
    """`hijack attach --json PID` ... `hijack detach PID`, both demanded to succeed.

    Yields the parsed attach output. With `same_fds`, the target's descriptor
    table (targets and flags, close-on-exec included) must be the same after
    the attach and after the detach as before: the shadow's changes to its
    copies must not reach the target. After the detach the shadow must have
    exited; it is reaped. If the body fails, the detach is best effort and the
    leak check cleans up whatever remains.
    """
    before = fd_table(pid) if same_fds else {}
    info = json.loads(cli.ok("attach", "--json", pid).stdout)
    try:
        if same_fds:
            assert fd_table(pid) == before, "the attach changed the target's descriptors"
        yield info
    except BaseException:
        cli("detach", pid)
        raise
    cli.ok("detach", pid)
    reap_exited(info["shadow_pid"])
    if same_fds:
        assert fd_table(pid) == before, "the target's descriptors changed while attached"


def assert_untraced(pid: int) -> None:
    """No task of `pid` is traced or left stopped."""
    for tid in thread_ids(pid):
        assert status_field(pid, "TracerPid", tid) == "0", f"task {tid} is still traced"
        assert process_state(pid, tid) not in ("t", "T"), f"task {tid} is left stopped"


# -- 1. attach + detach through the CLI: every fixture's own check passes --------------


def test_counter_counts_on_intact_through_attach_and_detach(cli: HijackCli, tmp_path: Path) -> None:
    with spawn_fixture("counter", tmp_path / "counter.log", "3") as counter:
        with attached(cli, counter.pid):
            assert_untraced(counter.pid)
        assert_untraced(counter.pid)
        counter.assert_intact()  # the log is exactly 1..N: no line skipped or repeated
    assert "PASS counter" in counter.stdout


@pytest.mark.parametrize(
    ("mode", "argument", "inside"),
    [
        ("read", "payload-read\n", {SYS_READ}),
        ("select", "payload-select\n", {SYS_PSELECT6}),
        # Long enough to outlast the attach (seconds on a loaded machine: 3 s did
        # not): the test checks the sleep was still going on after it.
        ("nanosleep", "8000", {SYS_CLOCK_NANOSLEEP, SYS_RESTART_SYSCALL}),
    ],
)
def test_a_blocked_call_is_resumed_after_attach_and_detach(
    cli: HijackCli, mode: str, argument: str, inside: set[int]
) -> None:
    with spawn_fixture("blocked", mode, argument) as blocked:
        wait_in_syscall(blocked.pid, inside - {SYS_RESTART_SYSCALL})
        with attached(cli, blocked.pid):
            # Back inside the same call (or the kernel's continuation of the sleep),
            # not returned from it with EINTR or a leaked -ERESTART*.
            wait_in_syscall(blocked.pid, inside)
        wait_in_syscall(blocked.pid, inside)
        if mode != "nanosleep":
            blocked.send(argument.encode())
        blocked.assert_intact()


def test_echo_server_streams_on_through_attach_and_detach(cli: HijackCli) -> None:
    # At ~250 MB/s here, long enough to be streaming before, during and after both.
    size = 1 << 30
    with spawn_fixture("echo_server") as server:
        port = server.ready["port"]
        with spawn_fixture("stream_client", "127.0.0.1", port, str(size), "11") as client:
            # The client is ready once connected; the server accepts a moment later.
            # Its descriptor table must be settled before attached() takes a copy.
            wait_until(
                lambda: len(socket_fds(server.pid)) == 2, "the echo server to accept the client"
            )
            with attached(cli, server.pid):
                assert still_running(client.pid), "the stream ended before the attach: too short"
            assert still_running(client.pid), "the stream ended before the detach: too short"
            client.assert_intact(timeout=120)  # every echoed byte checked, in order
        server.assert_intact()
    assert f"echoed {size} bytes over 1 connections" in server.stdout


def test_mapped_memory_files_and_pipe_are_intact_after_attach_and_detach(
    cli: HijackCli, tmp_path: Path
) -> None:
    with spawn_fixture("mapped", tmp_path) as mapped:
        maps_before = Path(f"/proc/{mapped.pid}/maps").read_text()
        with attached(cli, mapped.pid):
            pass
        # The injected mmap for execve's arguments happened in the shadow, not here.
        assert Path(f"/proc/{mapped.pid}/maps").read_text() == maps_before
        mapped.assert_intact()


# -- 2. many cycles on a busy target -------------------------------------------------------


def test_200_attach_detach_cycles_leave_a_busy_counter_intact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cycles = 200
    pauses: list[float] = []
    started = time.monotonic()
    with (
        Registry(tmp_path / "s") as registry,
        spawn_fixture("counter", tmp_path / "counter.log", "1") as counter,
    ):
        for _ in range(cycles):
            result = attaching.attach(counter.pid, registry)
            pauses.append(result.pause_ms)
            attaching.detach(counter.pid, registry)
            assert result.record.shadow_pid is not None
            reap_exited(result.record.shadow_pid)
        assert children_of(counter.pid) == []
        assert_untraced(counter.pid)
        counter.assert_intact()
    elapsed = time.monotonic() - started
    with capsys.disabled():
        print(
            f"\n{cycles} attach/detach cycles in {elapsed:.1f} s: target pause median "
            f"{statistics.median(pauses):.2f} ms, max {max(pauses):.2f} ms"
        )


# -- 3. the shadow holds the target's own open file descriptions ---------------------------


def test_shadow_holds_the_same_sockets(cli: HijackCli) -> None:
    with (
        spawn_fixture("echo_server") as server,
        socket.create_connection(("127.0.0.1", int(server.ready["port"])), timeout=10) as peer,
    ):
        # Echoed means accepted: the server now holds the connected socket too.
        peer.sendall(b"ping")
        assert peer.recv(4) == b"ping"
        with attached(cli, server.pid) as info:
            shadow = info["shadow_pid"]
            sockets = [entry["fd"] for entry in info["fds"] if entry["kind"] == "socket"]
            assert len(sockets) >= 2, info  # the listener and the connection
            for fd in sockets:
                ours = os.stat(f"/proc/{server.pid}/fd/{fd}")
                theirs = os.stat(f"/proc/{shadow}/fd/{fd}")
                assert (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino), fd
            for fd in fd_numbers(server.pid):
                assert same_open_file(server.pid, fd, shadow, fd), f"fd {fd}"
            # The connection still works while the shadow holds it too.
            peer.sendall(b"pong")
            assert peer.recv(4) == b"pong"
        peer.close()
        server.assert_intact()


def test_a_connection_the_target_closes_is_not_kept_open_by_its_shadow(cli: HijackCli) -> None:
    with (
        spawn_fixture("echo_server") as server,
        socket.create_connection(("127.0.0.1", int(server.ready["port"])), timeout=10) as peer,
    ):
        peer.sendall(b"ping")
        assert peer.recv(4) == b"ping"
        with attached(cli, server.pid, same_fds=False) as info:
            shadow = info["shadow_pid"]
            # The server closes its end once we close ours. The FIN only goes
            # out when the shadow's copy is closed too, which it does once it
            # sees the target's fd gone (docs/protocol.md: once a second).
            peer.shutdown(socket.SHUT_WR)
            peer.settimeout(5.0)
            assert peer.recv(1) == b"", "the server's end was not closed"
            # What the shadow still holds (its own numbers: one resting as its holder and
            # woken again may have reused a number the server closed for its own files).
            held = control.request(info["control"], {"op": "status"})["fds"]
            assert {entry["fd"] for entry in held} < {entry["fd"] for entry in info["fds"]}
            for entry in held:
                fd, own = entry["fd"], entry["own_fd"]
                assert same_open_file(server.pid, fd, shadow, own), f"shadow kept fd {fd}"
        server.assert_intact()
    assert "echoed 4 bytes over 1 connections" in server.stdout


def test_a_brief_answer_leaves_out_the_descriptors_and_changes_nothing(cli: HijackCli) -> None:
    """`brief` (a frozen mover's requests): the status fields without `fds` and `members`
    (the shadow's socket tables, milliseconds of a freeze), the rest as in full."""
    with spawn_fixture("echo_server") as server:
        with attached(cli, server.pid) as info:
            full = control.request(info["control"], {"op": "status"})
            # An adopt of no descriptor, without hold, changes nothing: its answer alone
            # differs.
            brief = control.request(info["control"], {"op": "adopt", "fds": [], "brief": True})
            assert "fds" not in brief and "members" not in brief, brief
            assert {k: v for k, v in full.items() if k not in ("fds", "members")} == brief
            assert control.request(info["control"], {"op": "adopt", "fds": []}) == full
        server.assert_intact()


def test_shadow_sees_the_file_offset_the_target_moves(cli: HijackCli, tmp_path: Path) -> None:
    log = tmp_path / "counter.log"
    with spawn_fixture("counter", log, "1") as counter:
        [log_fd] = [
            fd
            for fd in fd_numbers(counter.pid)
            if os.readlink(f"/proc/{counter.pid}/fd/{fd}") == str(log)
        ]
        with attached(cli, counter.pid) as info:
            shadow = info["shadow_pid"]
            at_attach = fd_position(shadow, log_fd)
            # The counter appends a line every 2^16 counts: its offset moves at once.
            wait_until(
                lambda: fd_position(counter.pid, log_fd) > at_attach,
                "the counter to append to its log",
            )
            moved_to = fd_position(counter.pid, log_fd)
            # One shared description: the shadow's copy has moved with it (and
            # can only be further on, as the counter keeps appending).
            assert fd_position(shadow, log_fd) >= moved_to > at_attach
            assert same_open_file(counter.pid, log_fd, shadow, log_fd)
        counter.assert_intact()


# -- 4. a multi-threaded target ---------------------------------------------------------------


def test_threads_all_stopped_while_seized_and_intact_after(cli: HijackCli) -> None:
    with spawn_fixture("threads") as threads:
        tids = thread_ids(threads.pid)
        assert len(tids) == 6
        with Tracee.seize(threads.pid) as tracee:
            assert set(tracee.thread_ids) == tids
            for tid in tids:
                assert process_state(threads.pid, tid) == "t", f"task {tid} is not stopped"
        assert_untraced(threads.pid)
        with attached(cli, threads.pid):
            assert thread_ids(threads.pid) == tids
            assert_untraced(threads.pid)
        assert thread_ids(threads.pid) == tids
        threads.assert_intact()  # every invariant, and every worker ran
    assert "PASS threads" in threads.stdout


# -- 5. bad input: one clear line, exit 1 (2 for bad usage) ----------------------------------


def test_a_pid_that_does_not_exist_is_refused(cli: HijackCli) -> None:
    # Pids run from 1 to pid_max - 1: pid_max itself never names a process.
    absent = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert_refused(cli("attach", absent), str(absent), "does not exist")


def assert_no_shadow_dir(cli: HijackCli, pid: int) -> None:
    """A refused attach leaves nothing behind in the state directory."""
    leftover = cli.state_dir / "shadows" / str(pid)
    assert not leftover.exists(), f"refused attach left {leftover}"


def test_a_kernel_thread_is_refused(cli: HijackCli) -> None:
    assert status_field(2, "Name") == "kthreadd"
    assert_refused(cli("attach", 2), "kernel thread")
    assert_no_shadow_dir(cli, 2)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_a_process_traced_by_strace_is_refused_and_left_alone(cli: HijackCli) -> None:
    payload = "payload-traced\n"
    with spawn_fixture("blocked", "read", payload) as blocked:
        strace = subprocess.Popen(
            ["strace", "-p", str(blocked.pid), "-o", "/dev/null"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(
                lambda: status_field(blocked.pid, "TracerPid") == str(strace.pid),
                "strace to attach",
            )
            assert_refused(cli("attach", blocked.pid), "already traced", str(strace.pid))
            assert_no_shadow_dir(cli, blocked.pid)
            assert status_field(blocked.pid, "TracerPid") == str(strace.pid)
        finally:
            strace.terminate()  # strace detaches on SIGTERM
            strace.wait(timeout=EXIT_TIMEOUT)
        assert_untraced(blocked.pid)
        blocked.send(payload.encode())
        blocked.assert_intact()


def _namespace_init(unshare_pid: int) -> int | None:
    """From our side, the namespace's init is unshare's child whose innermost pid is 1."""
    for child, _state in children_of(unshare_pid):
        with contextlib.suppress(FileNotFoundError, AssertionError):
            if status_field(child, "NSpid").split()[-1] == "1":
                return child
    return None


def test_the_init_of_a_pid_namespace_is_refused(cli: HijackCli) -> None:
    unshare = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "sleep", "600"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    init: int | None = None
    try:
        wait_until(
            lambda: _namespace_init(unshare.pid) is not None, "unshare to fork the namespace's init"
        )
        init = _namespace_init(unshare.pid)
        assert init is not None
        assert_refused(cli("attach", init), str(init), "the init of a pid namespace")
        assert_no_shadow_dir(cli, init)
        assert status_field(init, "TracerPid") == "0"
    finally:
        # Killing its init ends the namespace; unshare then exits on its own.
        if init is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(init, signal.SIGKILL)
        else:
            unshare.kill()
        unshare.wait(timeout=EXIT_TIMEOUT)


@pytest.mark.parametrize("text", ["abc", "12x", "0", "-3"])
def test_an_unparsable_pid_is_a_usage_error(cli: HijackCli, text: str) -> None:
    for command in ("attach", "detach"):
        result = cli(command, text)
        assert result.returncode == 2, result.describe()
        assert "Traceback" not in result.stderr, result.describe()
        assert "not a process id" in result.stderr, result.describe()


def test_attaching_twice_is_refused(cli: HijackCli, tmp_path: Path) -> None:
    with spawn_fixture("counter", tmp_path / "counter.log") as counter:
        with attached(cli, counter.pid) as info:
            assert_refused(cli("attach", counter.pid), "already attached", str(info["shadow_pid"]))
            assert still_running(info["shadow_pid"]), "the refused attach ended the shadow"
        counter.assert_intact()


def test_detach_of_an_unknown_pid_is_refused(cli: HijackCli, tmp_path: Path) -> None:
    with spawn_fixture("counter", tmp_path / "counter.log") as counter:
        assert_refused(cli("detach", counter.pid), str(counter.pid), "not attached")
        counter.assert_intact()


# -- 6. an unmodified program: python3 -m http.server ------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_for_line(stream: Any, prefix: str, timeout: float) -> str:
    """The first line of `stream` (a pipe) starting with `prefix`, within `timeout`."""
    deadline = time.monotonic() + timeout
    buffered = b""
    while True:
        remaining = deadline - time.monotonic()
        readable, _, _ = select.select([stream], [], [], max(remaining, 0))
        if not readable:
            raise AssertionError(f"no {prefix!r} line within {timeout} s (got {buffered!r})")
        chunk = os.read(stream.fileno(), 4096)
        if not chunk:
            raise AssertionError(f"output ended before a {prefix!r} line (got {buffered!r})")
        buffered += chunk
        for line in buffered.decode(errors="replace").splitlines():
            if line.startswith(prefix):
                return line


def _fetch(port: int, name: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{name}", timeout=10) as response:
        body: bytes = response.read()
        return body


def test_python_http_server_serves_during_and_after_attach(cli: HijackCli, tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    page = b"<p>served by an unmodified python3 -m http.server</p>\n"
    (site / "page.html").write_bytes(page)
    python = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
    # http.server's command line takes no port 0: pick a free one (a small race
    # with other programs binding it, accepted).
    port = _free_port()
    server = subprocess.Popen(
        [python, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", site],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # its "Serving" line comes at once
    )
    try:
        assert server.stdout is not None
        # Printed after the socket listens: connections are accepted from now on.
        _wait_for_line(server.stdout, "Serving HTTP on", timeout=PROC_TIMEOUT)
        assert _fetch(port, "page.html") == page
        # Connection sockets come and go with each request: no descriptor table check.
        with attached(cli, server.pid, same_fds=False) as info:
            assert any(entry["kind"] == "socket" for entry in info["fds"]), info
            assert _fetch(port, "page.html") == page
        assert _fetch(port, "page.html") == page
        assert_untraced(server.pid)
        assert server.poll() is None, "http.server exited"
    finally:
        server.kill()
        server.wait(timeout=EXIT_TIMEOUT)
        if server.stdout is not None:
            server.stdout.close()


# -- 7. what attach prints ------------------------------------------------------------------------


def test_attach_names_the_shadow_and_shows_the_descriptor_table(
    cli: HijackCli, tmp_path: Path
) -> None:
    log = tmp_path / "counter.log"
    with spawn_fixture("counter", log) as counter:
        held = fd_numbers(counter.pid)
        result = cli.ok("attach", counter.pid)
        try:
            found = re.search(r"shadow (\d+) holds (\d+) descriptors", result.stdout)
            assert found, result.describe()
            shadow = int(found[1])
            assert int(found[2]) == len(held), result.describe()
            cmdline = Path(f"/proc/{shadow}/cmdline").read_bytes().split(b"\0")
            assert b"hijack.shadow" in cmdline and str(counter.pid).encode() in cmdline
            rows = [
                [cell.strip() for cell in line.split("│")[1:-1]]
                for line in result.stdout.splitlines()
                if line.startswith("│")
            ]
            assert {int(row[0]) for row in rows} == held, result.describe()
            [log_fd] = [
                fd for fd in held if os.readlink(f"/proc/{counter.pid}/fd/{fd}") == str(log)
            ]
            assert [str(log_fd), "regular", str(log)] in rows, result.describe()
        finally:
            cli.ok("detach", counter.pid)
        reap_exited(shadow)

        with attached(cli, counter.pid) as info:
            assert info["pid"] == counter.pid
            assert isinstance(info["shadow_pid"], int) and still_running(info["shadow_pid"])
            assert info["shadow_pid"] != shadow  # a new shadow for a new attach
            assert {entry["fd"] for entry in info["fds"]} == held
            for entry in info["fds"]:
                assert set(entry) >= {"fd", "kind", "target"}, entry
                assert entry["target"] == os.readlink(f"/proc/{counter.pid}/fd/{entry['fd']}")
        counter.assert_intact()


# -- 8. the shadow is nobody's burden ------------------------------------------------------------


def test_shadow_is_not_the_targets_child_and_leaves_no_zombie(
    cli: HijackCli, tmp_path: Path
) -> None:
    with spawn_fixture("counter", tmp_path / "counter.log") as counter:
        assert children_of(counter.pid) == []
        with attached(cli, counter.pid) as info:
            shadow = info["shadow_pid"]
            assert parent_pid(shadow) != counter.pid
            # Neither the shadow nor the intermediate it was forked through
            # (reaped inside the target) is left as the target's child.
            assert children_of(counter.pid) == []
        assert children_of(counter.pid) == []
        counter.assert_intact()


# -- and the shadow's end -------------------------------------------------------------------------


def test_shadow_ends_with_its_target_and_detach_still_forgets_it(
    cli: HijackCli, tmp_path: Path
) -> None:
    with spawn_fixture("counter", tmp_path / "counter.log") as counter:
        info = json.loads(cli.ok("attach", "--json", counter.pid).stdout)
        counter.assert_intact()
        reap_exited(info["shadow_pid"])  # it followed its target out
        cli.ok("detach", counter.pid)
    assert_refused(cli("detach", counter.pid), "not attached")


def test_attach_works_under_a_long_state_dir(tmp_path: Path) -> None:
    # The control socket's path is longer than AF_UNIX's 107 bytes here.
    deep = HijackCli(tmp_path / ("state-" + "d" * 80))
    assert len(str(deep.state_dir / "shadows" / "99999" / "control.sock")) > 107
    with spawn_fixture("blocked", "nanosleep", "0") as sleeper:
        with attached(deep, sleeper.pid):
            pass
        sleeper.assert_intact()


def test_the_shadow_answers_only_root_and_the_targets_user(tmp_path: Path) -> None:
    """Even with its socket opened to everyone by mistake, the shadow checks SO_PEERCRED."""
    # pytest's tmp_path sits under a 0700 directory: another user could not
    # even reach the socket, which is not what this test is about.
    with (
        tempfile.TemporaryDirectory(dir="/tmp") as reachable,
        spawn_fixture("counter", str(tmp_path / "counter.log")) as counter,
        Registry(Path(reachable)) as registry,
    ):
        Path(reachable).chmod(0o755)
        result = attaching.attach(counter.pid, registry)
        control_path = result.record.shadow_control
        assert control_path is not None
        try:
            Path(control_path).parent.chmod(0o777)
            Path(control_path).chmod(0o777)
            probe = (
                "import socket, sys\n"
                "s = socket.socket(socket.AF_UNIX)\n"
                "s.connect(sys.argv[1])\n"
                "try:\n"
                '    s.sendall(b\'{"op": "status"}\\n\')\n'
                "    print(repr(s.recv(100)))\n"
                "except (ConnectionResetError, BrokenPipeError):\n"
                "    print('reset')\n"
            )
            nobody = subprocess.run(
                ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                 "/usr/bin/python3", "-c", probe, control_path],
                capture_output=True, text=True, timeout=30, check=False,
            )  # fmt: skip
            assert nobody.stdout.strip() in ("reset", "b''"), nobody.stdout + nobody.stderr
        finally:
            attaching.detach(counter.pid, registry)
        assert counter.finish() == 0, counter.describe()
