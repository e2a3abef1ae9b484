"""The fixtures run alone, without hijack, pass their own checks, and the checks bite.

Everything later tests conclude from a fixture's exit code rests on this file:
a fixture that fails here on its own says nothing about hijack.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import signal
import socket
import stat
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from support import (
    FixtureError,
    build_fixtures,
    find_leaked_processes,
    find_leftover_temp_dirs,
    fixture_names,
    kill_and_reap,
    snapshot_descendants,
    snapshot_temp_dirs,
    spawn_fixture,
)

from hijack.errors import HijackError
from hijack.sys import pidfd

TESTS_DIR = Path(__file__).parent


def test_every_fixture_is_built_and_used_by_a_test(fixture_bin: Callable[[str], Path]) -> None:
    test_sources = "\n".join(path.read_text() for path in TESTS_DIR.rglob("test_*.py"))
    for name in fixture_names():
        assert os.access(fixture_bin(name), os.X_OK), f"fixture {name} was not built"
        assert f'"{name}"' in test_sources, f"fixture {name} is used by no test"


def test_build_is_reused_until_its_binary_is_older_than_the_source(tmp_path: Path) -> None:
    first = build_fixtures(tmp_path)
    built_at = {name: path.stat().st_mtime_ns for name, path in first.items()}
    assert {n: p.stat().st_mtime_ns for n, p in build_fixtures(tmp_path).items()} == built_at
    os.utime(first["counter"], ns=(0, 0))  # as if counter.c had changed since
    rebuilt = build_fixtures(tmp_path)
    assert rebuilt["counter"].stat().st_mtime_ns > 0
    assert rebuilt["threads"].stat().st_mtime_ns == built_at["threads"]


# -- dirtier -------------------------------------------------------------------


def test_dirtier_keeps_writing_and_catches_a_page_changed_behind_its_back() -> None:
    with spawn_fixture("dirtier", "4", "50") as dirtier:
        assert dirtier.ready["pages"] == "1024"
        dirtier.assert_intact()
        assert "steps" in dirtier.stdout
    with spawn_fixture("dirtier", "4", "0") as dirtier:  # RATE 0: it writes nothing more
        page = int(dirtier.ready["buffer"], 16) + 100 * 4096
        with open(f"/proc/{dirtier.pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(page + 7)
            mem.write(b"?")
        assert dirtier.finish(10.0) == 1
        assert "buffer page 100 does not hold what was written there last" in dirtier.stderr


# -- epoller -------------------------------------------------------------------


def eventfd_copy(pid: int, fd: int) -> int | None:
    """Our copy of descriptor `fd` of `pid` if it is an eventfd; None if not (or gone)."""
    try:
        copy = pidfd.copy_fd(pid, fd)
    except HijackError:
        return None
    if os.readlink(f"/proc/self/fd/{copy}") == "anon_inode:[eventfd]":
        return copy
    os.close(copy)
    return None


def test_epoller_checks_its_events_and_sees_one_it_did_not_cause() -> None:
    with spawn_fixture("epoller") as epoller:
        assert epoller.ready["slots"] == "32"
        epoller.assert_intact()
        assert "steps=" in epoller.stdout
    with spawn_fixture("epoller") as epoller:
        # A count behind its back, in any of its eventfds (it replaces them all
        # the time: the first one still there): that entry fires beside the one
        # it expects.
        copy = next(
            copied
            for fd in os.listdir(f"/proc/{epoller.pid}/fd")
            if (copied := eventfd_copy(epoller.pid, int(fd))) is not None
        )
        try:
            os.write(copy, (1).to_bytes(8, "little"))
            assert epoller.finish(10.0) == 1
        finally:
            os.close(copy)
        assert "events ready, not 1" in epoller.stderr or "counted 2" in epoller.stderr


# -- counter -------------------------------------------------------------------


def test_counter_counts_and_finds_its_log_intact(tmp_path: Path) -> None:
    with spawn_fixture("counter", "counter.log", "3", cwd=tmp_path) as counter:
        assert counter.ready == {"lines": "3"}
        counter.assert_intact()
    lines = (tmp_path / "counter.log").read_text().split()
    assert len(lines) >= 3
    assert lines == [str(n) for n in range(1, len(lines) + 1)]
    assert f"lines={len(lines)}" in counter.stdout


def test_counter_fails_when_its_log_is_rewritten(tmp_path: Path) -> None:
    log = tmp_path / "counter.log"
    with spawn_fixture("counter", log, "2") as counter:
        # A repeat, whatever the counter appends before or after it.
        log.write_text("1\n1\n")
        assert counter.finish() == 1
    assert "FAIL counter: log line" in counter.stderr


# -- blocked -------------------------------------------------------------------


def _signal_bits(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"/proc/{pid}/status has no {field}")


@pytest.mark.parametrize("mode", ["read", "select", "nanosleep"])
def test_blocked_in_each_mode_finishes_intact(mode: str) -> None:
    payload = f"payload-{secrets.token_hex(32)}\n"
    argument = "200" if mode == "nanosleep" else payload
    with spawn_fixture("blocked", mode, argument) as blocked:
        assert blocked.ready == {"mode": mode}
        # The signal state a restore must rebuild, as the kernel shows it.
        assert _signal_bits(blocked.pid, "SigCgt") & (1 << (signal.SIGUSR1 - 1))
        assert _signal_bits(blocked.pid, "SigBlk") & (1 << (signal.SIGUSR2 - 1))
        if mode != "nanosleep":
            blocked.send(payload.encode())
        blocked.assert_intact()


@pytest.mark.parametrize("mode", ["read", "select"])
def test_blocked_fails_on_a_wrong_payload(mode: str) -> None:
    expected = f"payload-{secrets.token_hex(32)}\n"
    with spawn_fixture("blocked", mode, expected) as blocked:
        blocked.send(expected.replace("payload", "PAYLOAD").encode())
        assert blocked.finish() == 1
    assert "payload differs at byte 0" in blocked.stderr


# -- echo_server and stream_client ---------------------------------------------------


def test_echo_server_echoes_8_mib_to_a_stream_client() -> None:
    size = 8 << 20
    with spawn_fixture("echo_server") as server:
        port = server.ready["port"]
        with spawn_fixture("stream_client", "127.0.0.1", port, str(size), "7") as client:
            assert int(client.ready["local_port"]) > 0
            client.assert_intact()
        server.assert_intact()
    assert f"echoed {size} bytes over 1 connections" in server.stdout


@pytest.mark.parametrize("waits_in", [(), ("0", "epoll")], ids=["poll", "epoll"])
def test_echo_server_serves_several_clients_at_once(waits_in: tuple[str, ...]) -> None:
    size = 1 << 20
    with spawn_fixture("echo_server", *waits_in) as server, contextlib.ExitStack() as clients:
        port = server.ready["port"]
        running = [
            clients.enter_context(
                spawn_fixture("stream_client", "127.0.0.1", port, str(size), str(seed))
            )
            for seed in (1, 2, 3)
        ]
        for client in running:
            client.assert_intact()
        server.assert_intact()
    assert f"echoed {3 * size} bytes over 3 connections" in server.stdout


def test_stream_client_reports_the_first_corrupted_byte() -> None:
    corrupt_offset = 1000

    def corrupting_echo(listener: socket.socket) -> None:
        connection, _ = listener.accept()
        with connection, contextlib.suppress(OSError):  # the client hangs up on the bad byte
            offset = 0
            while data := connection.recv(65536):
                echoed = bytearray(data)
                if offset <= corrupt_offset < offset + len(echoed):
                    echoed[corrupt_offset - offset] ^= 0xFF
                connection.sendall(echoed)
                offset += len(data)

    with socket.create_server(("127.0.0.1", 0)) as listener:
        server = threading.Thread(target=corrupting_echo, args=(listener,), daemon=True)
        server.start()
        port = str(listener.getsockname()[1])
        with spawn_fixture("stream_client", "127.0.0.1", port, "65536", "5") as client:
            assert client.finish() == 1
        server.join(timeout=10)
        assert not server.is_alive()
    assert f"echoed byte at offset {corrupt_offset} is" in client.stderr


# -- threads and mapped ---------------------------------------------------------


def test_threads_keep_their_invariants() -> None:
    with spawn_fixture("threads") as threads:
        assert threads.ready == {"threads": "6"}
        assert len(os.listdir(f"/proc/{threads.pid}/task")) == 6
        threads.assert_intact()
    assert int(threads.stdout.split("total=")[1].split()[0]) >= 4


def test_sleepers_each_time_out_after_their_time() -> None:
    with spawn_fixture("sleepers", "300") as sleepers:
        assert sleepers.ready == {"threads": "8"}
        assert len(os.listdir(f"/proc/{sleepers.pid}/task")) == 8
        sleepers.assert_intact()  # every call timed out, none early, none with EINTR
    assert "PASS sleepers" in sleepers.stdout


def test_mapped_holds_its_mappings_files_and_pipe(tmp_path: Path) -> None:
    with spawn_fixture("mapped", tmp_path) as mapped:
        maps = Path(f"/proc/{mapped.pid}/maps").read_text().splitlines()
        for key, perms in (("private", "rw-p"), ("shared", "rw-s"), ("readonly", "r--p")):
            start = f"{int(mapped.ready[key], 16):x}-"
            assert any(line.startswith(start) and f" {perms} " in line for line in maps), key
        file_fd = mapped.ready["file_fd"]
        assert os.readlink(f"/proc/{mapped.pid}/fd/{file_fd}") == str(tmp_path / "regular.dat")
        assert "pos:\t1234\n" in Path(f"/proc/{mapped.pid}/fdinfo/{file_fd}").read_text()
        mapped.assert_intact()


def test_mapped_notices_its_open_file_changed(tmp_path: Path) -> None:
    with spawn_fixture("mapped", tmp_path) as mapped:
        (tmp_path / "regular.dat").write_bytes(bytes(10000))
        assert mapped.finish() == 1
    assert "regular.dat: byte 1234" in mapped.stderr


# -- the harness itself -----------------------------------------------------------


def test_a_fixture_that_dies_before_ready_fails_with_its_stderr() -> None:
    with pytest.raises(FixtureError, match=r"(?s)fixture counter .*exit code 2.*usage: counter"):
        spawn_fixture("counter")


def test_a_fixture_that_ignores_eof_is_killed_at_the_finish_timeout() -> None:
    with spawn_fixture("blocked", "nanosleep", "600000") as sleeper:
        with pytest.raises(FixtureError, match=r"did not exit within 0\.2 s"):
            sleeper.finish(timeout=0.2)
        assert sleeper.returncode == -signal.SIGKILL


def test_send_to_a_fixture_that_does_not_read_is_bounded() -> None:
    with (
        spawn_fixture("blocked", "nanosleep", "600000") as sleeper,
        pytest.raises(FixtureError, match="CONTROL_FD not read"),
    ):
        sleeper.send(bytes(1 << 20), timeout=0.2)  # far more than a pipe holds


def _fixture_environ(pid: int) -> dict[bytes, bytes]:
    return dict(
        entry.split(b"=", 1)
        for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")[:-1]
    )


def _respawn(
    binary: Path, args: tuple[str, ...], environ: dict[bytes, bytes], sources: dict[int, str]
) -> int:
    """A restore in miniature: a new process with `environ` whose stdout, stderr and
    CONTROL_FD are the files at `sources` (fd -> path), reopened at the same fd numbers."""
    control_fd = int(environ[b"CONTROL_FD"])
    flags = {1: os.O_WRONLY | os.O_APPEND, 2: os.O_WRONLY | os.O_APPEND, control_fd: os.O_RDONLY}
    reopened: dict[int, int] = {}
    try:
        for fd, path in sources.items():
            opened = os.open(path, flags[fd])
            # Far above any target number, so no dup2 below overwrites a source.
            reopened[fd] = fcntl.fcntl(opened, fcntl.F_DUPFD_CLOEXEC, 1000)
            os.close(opened)
        return os.posix_spawn(
            binary,
            [str(binary), *args],
            environ,
            file_actions=[
                *((os.POSIX_SPAWN_DUP2, source, fd) for fd, source in reopened.items()),
                # It says ready again, to nobody: the harness already heard it.
                (os.POSIX_SPAWN_OPEN, int(environ[b"READY_FD"]), os.devnull, os.O_WRONLY, 0),
            ],
        )
    finally:
        for source in reopened.values():
            os.close(source)


def _respawn_in_place(pid: int, binary: Path, *args: str) -> int:
    """_respawn with the very open files of `pid` (the same descriptions, through /proc)."""
    environ = _fixture_environ(pid)
    control_fd = int(environ[b"CONTROL_FD"])
    sources = {fd: f"/proc/{pid}/fd/{fd}" for fd in (1, 2, control_fd)}
    return _respawn(binary, args, environ, sources)


def test_a_fixture_is_followed_into_the_process_that_replaces_it(
    fixture_bin: Callable[[str], Path],
) -> None:
    payload = f"payload-{secrets.token_hex(32)}\n"
    with spawn_fixture("blocked", "read", payload) as blocked:
        original = blocked.pid
        successor = _respawn_in_place(original, fixture_bin("blocked"), "read", payload)
        os.kill(original, signal.SIGKILL)  # as `hijack dump --kill` would
        assert blocked.wait_exit() == -signal.SIGKILL
        blocked.adopt(successor)
        blocked.send(payload.encode())  # through the pipe the first process was given
        blocked.assert_intact()
    assert blocked.pid == successor
    assert "PASS blocked" in blocked.stdout


# -- FIFO mode ------------------------------------------------------------------


def test_a_fixture_runs_and_finishes_with_fifos(tmp_path: Path) -> None:
    before = snapshot_temp_dirs()
    with spawn_fixture("counter", tmp_path / "counter.log", "2", fifos=True) as counter:
        assert counter.ready == {"lines": "2"}
        assert counter.control_fifo is not None
        assert stat.S_ISFIFO(counter.control_fifo.stat().st_mode)
        control_fd = int(_fixture_environ(counter.pid)[b"CONTROL_FD"])
        assert os.readlink(f"/proc/{counter.pid}/fd/{control_fd}") == str(counter.control_fifo)
        [fifo_dir] = find_leftover_temp_dirs(before)
        assert counter.control_fifo.parent == fifo_dir
        counter.assert_intact()
    assert "PASS counter" in counter.stdout
    assert not fifo_dir.exists()


def test_a_fifo_fixture_is_followed_into_a_process_that_reopens_control_by_path(
    fixture_bin: Callable[[str], Path],
) -> None:
    payload = f"payload-{secrets.token_hex(32)}\n"
    with spawn_fixture("blocked", "read", payload, fifos=True) as blocked:
        assert blocked.control_fifo is not None
        original = blocked.pid
        environ = _fixture_environ(original)
        # What a restore from an image has: paths, not the dead process's descriptors.
        sources = {fd: os.readlink(f"/proc/{original}/fd/{fd}") for fd in (1, 2)}
        sources[int(environ[b"CONTROL_FD"])] = str(blocked.control_fifo)
        os.kill(original, signal.SIGKILL)
        assert blocked.wait_exit() == -signal.SIGKILL
        # Sent while no fixture process holds CONTROL: the FIFO must keep it.
        blocked.send(payload.encode())
        blocked.adopt(_respawn(fixture_bin("blocked"), ("read", payload), environ, sources))
        blocked.assert_intact()
    assert "PASS blocked" in blocked.stdout


def test_leak_check_finds_kills_and_reaps_an_orphaned_grandchild() -> None:
    root = os.getpid()
    before = snapshot_descendants(root)
    # sh exits at once; its background child is orphaned and, pytest being a
    # subreaper, becomes pytest's child instead of PID 1's.
    started = subprocess.run(
        ["sh", "-c", "sleep 600 </dev/null >/dev/null 2>&1 & echo $!"],
        capture_output=True,
        text=True,
        check=True,
    )
    orphan = int(started.stdout)
    leaked = find_leaked_processes(root, before)
    assert [(info.pid, info.ppid, info.cmdline) for info in leaked] == [(orphan, root, "sleep 600")]
    assert kill_and_reap(leaked, root, before) == []
    assert find_leaked_processes(root, before) == []
    assert not Path(f"/proc/{orphan}").exists()


def test_temp_dir_check_sees_the_output_of_a_fixture_never_ended() -> None:
    before = snapshot_temp_dirs()
    fixture = spawn_fixture("blocked", "nanosleep", "0")
    try:
        [leftover] = find_leftover_temp_dirs(before)
        assert (leftover / "stderr").exists()
    finally:
        fixture.kill()
    assert find_leftover_temp_dirs(before) == []
    assert not leftover.exists()
