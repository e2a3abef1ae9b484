"""The home shadow's native relay pump (hijack.shadow.pump): plain relays in their steady
state are spliced by relay-pump, and taken back by the shadow for a move, an end, a
failure, or a pump that died, without losing a byte."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import RunningFixture, spawn_fixture
from support.nodes import Cluster, Node, read_line
from test_move import (
    ECHO_SESSION,
    LINE_TIMEOUT,
    STREAM_TIMEOUT,
    Moved,
    ask,
    echo_stream,
    finish_moved,
    logs,
    move,
    poll_until,
    shadow_status,
    spawn_python,
)

from hijack.shadow import pump

PLAIN = ("--plain-relays",)


def pump_of(shadow_pid: int) -> int:
    """The pid of the shadow's relay-pump, 0 if it has none (running, or ended and not
    reaped yet: a zombie, known by its name, its exe link gone)."""
    for task in Path(f"/proc/{shadow_pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):  # gone meanwhile
                if Path(f"/proc/{child}/comm").read_text().strip() == pump.PROGRAM.name:
                    return int(child)
    return 0


def pump_sockets(shadow_pid: int) -> int:
    """Sockets the shadow's pump holds: its control socket, and two for each stream it
    carries (the original, the relay)."""
    fds = Path(f"/proc/{pump_of(shadow_pid)}/fd")
    return sum(1 for fd in fds.iterdir() if os.readlink(fd).startswith("socket:"))


def end_session(session: subprocess.Popen[bytes]) -> None:
    """Close an ECHO_SESSION's stdin: it closes its connection and exits 0."""
    assert session.stdin is not None
    session.stdin.close()
    assert session.wait(LINE_TIMEOUT) == 0


def relayed_bytes(home: Node, home_pid: int, stream: str) -> int:
    """bytes_out + bytes_in of `stream` as the shadow tells them (the pump's part too)."""
    rows = {row["id"]: row for row in shadow_status(home, home_pid)["streams"]}
    row = rows.get(stream, {})
    return int(row.get("bytes_out", 0)) + int(row.get("bytes_in", 0))


def test_streams_spliced_by_the_pump_go_on_intact_across_a_second_move(tmp_path: Path) -> None:
    assert pump.available(), "relay-pump is built at the suite's start"
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        for node in (b, c):
            node.start_daemon()
        with echo_stream(a, seed=7) as (server, client):
            session = spawn_python(a, ECHO_SESSION, "127.0.0.1", str(server.ready["port"]))
            assert read_line(session, LINE_TIMEOUT) == "connected"
            there = move(a, server.pid, b, options=PLAIN)
            server.wait_exit()
            assert ask(session, "on b") == "on b"
            # Its relay, plain, is the pump's now: what passes counts (asked of the pump).
            assert pump_of(there.shadow_pid), logs(tmp_path)
            rows = shadow_status(a, server.pid)["streams"]
            stream = next(row["id"] for row in rows if row["bytes_in"] == len("on b\n"))
            assert ask(session, "through the pump") == "through the pump"
            assert relayed_bytes(a, server.pid, stream) == 2 * len("on b\nthrough the pump\n")
            # Taken back for the move (the stream's bytes still flowing), given to it again.
            again = move(b, there.pid, c, home=(a, server.pid))
            assert ask(session, "on c") == "on c"
            client.assert_intact(STREAM_TIMEOUT)
            end_session(session)
            output = finish_moved(server, again, tmp_path)
        assert "over 2 connections" in output, output


@contextlib.contextmanager
def sessions_through_the_pump(
    tmp_path: Path, *programs: str
) -> Iterator[tuple[RunningFixture, Moved, list[subprocess.Popen[bytes]], Node]]:
    """An echo_server on node a with a session of each of `programs` connected, moved to
    b with plain relays; each session has had a line echoed through the pump. Yields the
    server, its move, the sessions and node a (its home)."""
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        with spawn_fixture("echo_server", netns=a.netns) as server:
            port = str(server.ready["port"])
            sessions = [spawn_python(a, program, "127.0.0.1", port) for program in programs]
            for session in sessions:
                assert read_line(session, LINE_TIMEOUT) == "connected"
            moved = move(a, server.pid, b, options=PLAIN)
            server.wait_exit()
            for session in sessions:
                assert ask(session, "through the pump") == "through the pump"
            assert pump_of(moved.shadow_pid), logs(tmp_path)
            yield server, moved, sessions, a


def test_a_client_reset_while_the_pump_carries_it_ends_its_stream_only(tmp_path: Path) -> None:
    with sessions_through_the_pump(tmp_path, RESETTING_SESSION, ECHO_SESSION) as found:
        server, moved, (doomed, kept), _ = found
        assert ask(doomed, "reset") == "reset sent"
        assert doomed.wait(LINE_TIMEOUT) == 0
        # The pump gave the failed stream back; the shadow passed its end on to the
        # process, which closed it; the other one goes on.
        poll_until(lambda: "passing its end on to the process" in logs(tmp_path), "the reset")
        assert ask(kept, "still here") == "still here"
        end_session(kept)
        output = finish_moved(server, moved, tmp_path)
    assert "over 2 connections" in output, output


def test_a_pump_that_dies_hands_its_streams_back_to_the_shadow(tmp_path: Path) -> None:
    with sessions_through_the_pump(tmp_path, ECHO_SESSION) as (server, moved, (session,), _):
        os.kill(pump_of(moved.shadow_pid), signal.SIGKILL)  # the pump this test's move started
        poll_until(lambda: "relaying in Python" in logs(tmp_path), "the streams taken back")
        poll_until(lambda: not pump_of(moved.shadow_pid), "the pump reaped")
        assert ask(session, "through the shadow") == "through the shadow"
        end_session(session)
        output = finish_moved(server, moved, tmp_path)
    assert "over 1 connections" in output, output


def test_a_bulk_stream_through_the_pump_is_spliced_intact_and_counted(tmp_path: Path) -> None:
    # A read that fills the pump's buffer has the rest of its event spliced through the
    # stream's pipes (relay_pump.c, pump()): every byte comes back, in order, counted.
    with sessions_through_the_pump(tmp_path, BULK_SESSION) as (server, moved, (session,), a):
        rows = shadow_status(a, server.pid)["streams"]
        stream = next(row["id"] for row in rows if row["bytes_in"] == len("through the pump\n"))
        assert session.stdin is not None
        session.stdin.write(f"bulk {BULK}\n".encode())
        assert read_line(session, STREAM_TIMEOUT) == f"intact {BULK}"  # not a line's wait
        assert relayed_bytes(a, server.pid, stream) == 2 * (len("through the pump\n") + BULK)
        assert pump_of(moved.shadow_pid)  # still the pump's: nothing ended or failed
        assert ask(session, "after the bulk") == "after the bulk"
        end_session(session)
        output = finish_moved(server, moved, tmp_path)
    assert "over 1 connections" in output, output


def test_a_busy_polling_pump_carries_a_stream_whole_and_sleeps_once_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HIJACK_BUSY_POLL_US (the move's environment, passed on to its shadow and from it to the
    pump): the pump looks for its next event without sleeping for that long after each
    batch. A bulk stream and lines go through it whole; once the stream is quiet the pump
    sleeps in epoll_wait (state S), not spinning for good."""
    monkeypatch.setenv("HIJACK_BUSY_POLL_US", "200")
    with sessions_through_the_pump(tmp_path, BULK_SESSION) as (server, moved, (session,), _):
        carrier = pump_of(moved.shadow_pid)
        environment = Path(f"/proc/{carrier}/environ").read_bytes().split(b"\0")
        assert b"HIJACK_BUSY_POLL_US=200" in environment
        assert session.stdin is not None
        session.stdin.write(f"bulk {BULK // 4}\n".encode())
        assert read_line(session, STREAM_TIMEOUT) == f"intact {BULK // 4}"
        for line in ("one", "two", "three"):
            assert ask(session, line) == line

        def asleep() -> bool:
            stat = Path(f"/proc/{carrier}/stat").read_text()
            return stat.rpartition(")")[2].split()[0] == "S"

        poll_until(asleep, "the busy-polling pump asleep once its stream is quiet")
        end_session(session)
        output = finish_moved(server, moved, tmp_path)
    assert "over 1 connections" in output, output


BULK = 48 << 20  # bytes: many reads that fill the pump's 64 KiB buffer, its pipes full

# An ECHO_SESSION whose "bulk N" line sends N random bytes (while reading their echo)
# and says whether all came back as sent.
BULK_SESSION = """\
import os, socket, sys, threading
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=120) as connection:
    print("connected", flush=True)
    for line in sys.stdin:
        if line.startswith("bulk "):
            size = int(line.split()[1])
            sent = os.urandom(size)
            sender = threading.Thread(target=connection.sendall, args=(sent,))
            sender.start()
            echoed = bytearray()
            while len(echoed) < size:
                data = connection.recv(1 << 20)
                if not data:
                    break
                echoed += data
            sender.join()
            print(f"intact {size}" if echoed == sent else f"differs at {size}", flush=True)
            continue
        connection.sendall(line.encode())
        echoed = b""
        while not echoed.endswith(b"\\n"):
            echoed += connection.recv(65536)
        print(echoed.decode(), end="", flush=True)
"""

# An ECHO_SESSION whose "reset" line closes its connection with a reset (SO_LINGER 0).
RESETTING_SESSION = """\
import socket, struct, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as connection:
    print("connected", flush=True)
    for line in sys.stdin:
        if line == "reset\\n":
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            print("reset sent", flush=True)
            break
        connection.sendall(line.encode())
        echoed = b""
        while not echoed.endswith(b"\\n"):
            echoed += connection.recv(65536)
        print(echoed.decode(), end="", flush=True)
"""


def test_an_encrypted_stream_through_the_pump_survives_moves_away_on_and_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An encrypted relay's records sealed and opened by the pump
    (relay_pump.c, OP_ADD_TLS). The stream is taken back and handed over again around each
    status and move (a -> b, b -> c, c -> home): bulk echoes both ways come back whole and
    in order, and the counts the shadow gives are exact."""
    assert pump.available(), "relay-pump is built at the suite's start"
    monkeypatch.setenv("HIJACK_PUMP_ENCRYPTED", "1")  # both on (the default), whatever the env
    monkeypatch.setenv("HIJACK_OWN_RECORDS", "1")
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        for node in cluster:
            node.start_daemon()
        with spawn_fixture("echo_server", netns=a.netns) as server:
            session = spawn_python(a, BULK_SESSION, "127.0.0.1", str(server.ready["port"]))
            assert read_line(session, LINE_TIMEOUT) == "connected"
            away = move(a, server.pid, b)  # encrypted relays: the default
            server.wait_exit()
            assert ask(session, "on b") == "on b"
            poll_until(lambda: pump_of(away.shadow_pid) > 0, "the pump started")
            rows = shadow_status(a, server.pid)["streams"]
            stream = next(row["id"] for row in rows if row["bytes_in"] == len("on b\n"))
            assert session.stdin is not None
            moved = len("on b\n")
            home_shadow = away.shadow_pid  # the same through every move
            for turn, there in enumerate((b, c)):
                session.stdin.write(f"bulk {BULK // 4}\n".encode())
                session.stdin.flush()
                assert read_line(session, STREAM_TIMEOUT) == f"intact {BULK // 4}"
                moved += BULK // 4
                assert relayed_bytes(a, server.pid, stream) == 2 * moved  # a status
                # The pump carries it (again, after the move before), the status left it there.
                poll_until(lambda: pump_sockets(home_shadow) == 3, "the pump carrying it")
                destination = c if turn == 0 else a
                away = move(there, away.pid, destination, home=(a, server.pid))
                line = f"after move {turn}"
                assert ask(session, line) == line
                moved += len(line) + 1
            end_session(session)
            output = finish_moved(server, away, tmp_path)
        assert "over 1 connections" in output, output
