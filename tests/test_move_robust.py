"""Moves at the edges: a process that stops reading, descriptors that come and go, streams
that ended, a mount namespace of its own, half-closed sockets, terminals it holds.

Each test builds a Cluster (tests/support/nodes.py) and moves a real process
with `hijack move` run inside the node it runs on, as tests/test_move.py does
(whose helpers these tests share).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from support import spawn_fixture
from support.cli import restored_pid
from support.nodes import Cluster, Node, read_line, two_nodes
from test_move import (
    EXIT_TIMEOUT,
    LINE_TIMEOUT,
    STREAM_TIMEOUT,
    ask,
    ask_moved,
    assert_ended_well,
    assert_untouched,
    finish_moved,
    line_from,
    move,
    pattern,
    pids_inside,
    poll_until,
    refusal_line,
    runs_in,
    shadow_status,
    spawn_python,
    wait_released,
    write_all,
)

from hijack.errors import HijackError
from hijack.node import mounts
from hijack.registry import Registry

# -- a process that stops reading -------------------------------------------------------

# Says "stalled" and reads nothing until SIGUSR1; then reads argv[1] bytes of
# its stdin and prints their count and SHA-256, then echoes stdin lines.
STALLER = """\
import hashlib, os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
print("stalled", flush=True)
signal.sigwait({signal.SIGUSR1})
wanted, digest, size = int(sys.argv[1]), hashlib.sha256(), 0
while size < wanted:
    chunk = os.read(0, min(1 << 20, wanted - size))
    if not chunk:
        break
    digest.update(chunk)
    size += len(chunk)
print(size, digest.hexdigest(), flush=True)
for line in sys.stdin:
    print(line.strip(), flush=True)
"""
STALLED_BYTES = 32 << 20  # more than the relay's socket buffers and the shadow's hold
ACK_WAIT = "1"  # seconds, for the mover of the test (HIJACK_ACK_WAIT)


def stream_row(home: Node, home_pid: int, stream_id: str) -> dict[str, Any]:
    """The home shadow's row of one relayed stream."""
    streams = shadow_status(home, home_pid)["streams"]
    return next(row for row in streams if row["id"] == stream_id)


def window_closed(node: Node, local: str, remote: str) -> bool:
    """Whether the TCP connection `local` -> `remote` in `node` has bytes queued and its
    peer's window closed (`ss -i` shows no snd_wnd when it is 0): they wait
    unacknowledged until the peer reads."""
    filters = ["state", "established", "src", local, "dst", remote]
    completed = node.run(["ss", "-tinH", *filters], timeout=10)
    fields = completed.stdout.split()
    window = re.search(r"\bsnd_wnd:(\d+)", completed.stdout)
    return len(fields) > 1 and fields[1] != "0" and (window is None or window[1] == "0")


def test_a_move_whose_acknowledgements_never_come_is_aborted_and_loses_no_byte(
    tmp_path: Path,
) -> None:
    with two_nodes(tmp_path) as (a, b):
        data = pattern(STALLED_BYTES, 23)
        staller = spawn_python(a, STALLER, str(len(data)))
        assert read_line(staller, LINE_TIMEOUT) == "stalled"
        home_pid = staller.pid
        moved = move(a, home_pid, b, precopy=False)
        assert staller.wait(EXIT_TIMEOUT) == -signal.SIGKILL  # the original
        assert staller.stdin is not None
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            written = pool.submit(write_all, staller.stdin, data)
            # Its socket at b takes no more: bytes wait unacknowledged in the
            # forwarder's end of it there (its relay is encrypted: the forwarder
            # acknowledges to the shadow only what reached that socket).
            relay = stream_row(a, home_pid, "fd:0")
            poll_until(
                lambda: window_closed(b, relay["shadow_end"], relay["relay"]),
                "the stalled process's relay closing its window on the shadow",
            )
            assert a.daemon_endpoint is not None
            b.env["HIJACK_ACK_WAIT"] = ACK_WAIT
            try:
                result = b.hijack("move", moved.pid, "--to", a.daemon_endpoint, "--no-precopy")
            finally:
                del b.env["HIJACK_ACK_WAIT"]
            line = refusal_line(result)
            assert "move aborted" in line and "unacknowledged" in line, line
            assert f"process {moved.pid} runs on here as before" in line, line
            # The original runs on at b, untouched; nothing of it was left at a.
            assert_untouched(moved.pid)
            assert runs_in(moved.pid, b)
            assert a.daemon is not None
            status = shadow_status(a, home_pid)
            assert pids_inside(a) == {a.daemon.pid, status["shadow_pid"]}
            assert status["location"] == "b", status
            with Registry(b.state_dir) as registry:
                aborted = [row.phase for row in registry.moves() if row.destination == "a"]
                assert aborted == ["failed"], registry.moves()
            # It reads now: every byte, in order, none twice.
            os.kill(moved.pid, signal.SIGUSR1)
            written.result(STREAM_TIMEOUT)
        expected = f"{len(data)} {hashlib.sha256(data).hexdigest()}"
        assert line_from(staller, STREAM_TIMEOUT) == expected
        # And the relays it kept still carry a move: home again.
        back = move(b, moved.pid, a, home=(a, home_pid), precopy=False)
        assert ask_moved(staller, "at home") == "at home"
        staller.stdin.close()
        assert_ended_well(back, "the staller, home again", tmp_path)
        wait_released(back)


# -- descriptors that come and go -------------------------------------------------------


def test_a_process_replacing_epoll_watched_descriptors_during_precopy_moves_intact(
    tmp_path: Path,
) -> None:
    with two_nodes(tmp_path) as (a, b):
        # Its epoll always has entries for numbers it closed (the file kept by a
        # dup) and two entries under one number: each step checks its events.
        with spawn_fixture("epoller", netns=a.netns) as epoller:
            there = move(a, epoller.pid, b)
            epoller.wait_exit()
            back = move(b, there.pid, a, home=(a, epoller.pid))
            output = finish_moved(epoller, back, tmp_path)
        assert "steps=" in output


# -- streams that ended -----------------------------------------------------------------

# Accepts one connection on 127.0.0.1 (its port printed), sends it "last
# words"; a stdin line "reset" resets it (SO_LINGER 0) and says "reset".
RESETTING_PEER = """\
import socket, struct, sys
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
connection, _ = server.accept()
connection.sendall(b"last words")
for line in sys.stdin:
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()
    print("reset", flush=True)
"""

# Holds one TCP connection to 127.0.0.1:argv[1] that it never reads nor
# closes (a descriptor inherited by mistake), then echoes stdin lines;
# "check" prints what a look (MSG_PEEK) at that socket finds and its TCP
# state (1 established, 8 CLOSE_WAIT: its peer has ended); "write" sends a
# byte on it and prints "sent" or the error.
STRAY_HOLDER = """\
import socket, sys
stray = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
stray.setblocking(False)
print("holding", flush=True)
for line in sys.stdin:
    if line.strip() == "check":
        try:
            data = stray.recv(100, socket.MSG_PEEK)
        except OSError as error:
            data = type(error).__name__
        state = stray.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
        print(f"{data!r} {state}", flush=True)
    elif line.strip() == "write":
        try:
            stray.send(b"x")
            print("sent", flush=True)
        except OSError as error:
            print(type(error).__name__, flush=True)
    else:
        print(line.strip(), flush=True)
"""


def test_a_stream_whose_peer_reset_it_after_a_move_moves_on_as_an_ended_stream(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        for node in cluster:
            node.start_daemon()
        peer = spawn_python(a, RESETTING_PEER)
        holder = spawn_python(a, STRAY_HOLDER, read_line(peer, LINE_TIMEOUT))
        assert read_line(holder, LINE_TIMEOUT) == "holding"
        home_pid = holder.pid
        moved = move(a, home_pid, b)
        assert holder.wait(EXIT_TIMEOUT) == -signal.SIGKILL
        assert ask_moved(holder, "check") == "b'last words' 1"
        # The shadow sees the reset: the process sees its stream end, its last
        # words still there to read.
        assert ask(peer, "reset") == "reset"
        poll_until(
            lambda: ask_moved(holder, "check") == "b'last words' 8",
            "the moved process seeing the end of the stream its peer reset",
        )
        here, pid = b, moved.pid
        for there in (c, a):
            moved = move(here, pid, there, home=(a, home_pid))
            assert ask_moved(holder, f"on {there.name}") == f"on {there.name}"
            assert ask_moved(holder, "check") == "b'last words' 8", there.name
            here, pid = there, moved.pid
        # What it writes there is refused, as by the peer that reset it.
        poll_until(
            lambda: ask_moved(holder, "write") in ("ConnectionResetError", "BrokenPipeError"),
            "a write to the ended stream failing",
        )
        assert holder.stdin is not None
        holder.stdin.close()
        assert_ended_well(moved, "the holder of an ended stream", tmp_path)
        wait_released(moved)


# -- a mount namespace of its own -------------------------------------------------------

# Holds argv[1] open, then for each stdin line: "held" prints what its held
# descriptor reads, "open" what the path reads when opened again, "ns" its
# mount namespace; anything else is echoed.
UNSHARE_MOUNTS = ("unshare", "--mount", "--propagation", "private")
PRIVATE_READER = """\
import os, sys
path = sys.argv[1]
held = os.open(path, os.O_RDONLY)
for line in sys.stdin:
    word = line.strip()
    if word == "held":
        print(os.pread(held, 100, 0).decode().strip(), flush=True)
    elif word == "open":
        with open(path) as reopened:
            print(reopened.read().strip(), flush=True)
    elif word == "ns":
        print(os.readlink("/proc/self/ns/mnt"), flush=True)
    else:
        print(word, flush=True)
"""


def spawn_private_reader(node: Node, private: Path) -> subprocess.Popen[bytes]:
    """PRIVATE_READER of `private`/data in `node`, in a mount namespace of its own with a
    tmpfs of its own over `private`, as systemd's PrivateTmp makes one: the same path
    names another file there."""
    script = (
        f"mount -t tmpfs private {private} && echo its own file > {private}/data"
        f' && exec "$0" -c "$1" {private}/data'
    )
    return node.spawn(
        [*UNSHARE_MOUNTS, "sh", "-c", script, sys.executable, PRIVATE_READER],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        bufsize=0,
    )


@pytest.mark.parametrize("precopy", [True, False], ids=["precopy", "no-precopy"])
def test_a_process_in_its_own_mount_namespace_moves_twice_and_keeps_its_files(
    tmp_path: Path, precopy: bool
) -> None:
    private = tmp_path / "private"
    private.mkdir()
    (private / "data").write_text("the host's file\n")
    with Cluster(tmp_path / "cluster", nodes=2) as cluster:
        a, b = cluster.nodes
        a.start_daemon()
        b.start_daemon()
        reader = spawn_private_reader(a, private)
        namespace = ask(reader, "ns")
        assert namespace != os.readlink("/proc/self/ns/mnt")
        assert ask(reader, "held") == "its own file"
        here, pid = a, reader.pid
        for there in (b, a):
            moved = move(here, pid, there, home=(a, reader.pid), precopy=precopy)
            if here is a:
                assert reader.wait(EXIT_TIMEOUT) == -signal.SIGKILL
            assert ask_moved(reader, "ns") == namespace, there.name
            assert ask_moved(reader, "held") == "its own file", there.name
            assert ask_moved(reader, "open") == "its own file", there.name
            here, pid = there, moved.pid
        assert reader.stdin is not None
        reader.stdin.close()
        assert_ended_well(moved, "the reader in its own mount namespace", tmp_path)
        wait_released(moved)


def test_a_mount_namespace_no_process_here_holds_is_refused_by_name() -> None:
    own = mounts.describe(os.getpid(), None)
    own["host"] = False  # as on a machine whose pid 1 cannot be looked at
    assert mounts.open_namespace(own, "me") is None  # the daemon's own: nothing to enter
    gone = {"id": "mnt:[1]", "holders": [0, 0], "host": False}
    with pytest.raises(HijackError, match=r"refusing x \(pid 7\): .* \(mnt:\[1\]\) that this"):
        mounts.open_namespace(gone, "x (pid 7)")


# -- a half-closed socket -----------------------------------------------------------------

# Accepts one connection (its port printed), reads it to its end and prints
# "eof" and what it read; then each stdin line: "answer" sends "answer\n",
# "close" closes the connection; each says so.
HALF_PEER = """\
import socket, sys
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
connection, _ = server.accept()
heard = b""
while chunk := connection.recv(100):
    heard += chunk
print(f"eof {heard!r}", flush=True)
for line in sys.stdin:
    if line.strip() == "answer":
        connection.sendall(b"answer\\n")
    else:
        connection.close()
    print(line.strip(), flush=True)
"""

# Connects to 127.0.0.1:argv[1], says "bye" and shuts its writing side; then
# each stdin line: "state" prints the connection's TCP state,
# "read" a line it reads from it ("" at its end), "write" whether a write
# fails; anything else is echoed.
HALF_CLOSER = """\
import socket, sys
connection = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
connection.sendall(b"bye")
connection.shutdown(socket.SHUT_WR)
reader = connection.makefile("rb")
print("shut", flush=True)
for line in sys.stdin:
    word = line.strip()
    if word == "state":
        print(connection.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0], flush=True)
    elif word == "read":
        print(repr(reader.readline()), flush=True)
    elif word == "write":
        try:
            connection.send(b"more")
            print("written", flush=True)
        except OSError as error:
            print(type(error).__name__, flush=True)
    else:
        print(word, flush=True)
"""
HALF_CLOSED = {"4", "5"}  # TCP states FIN_WAIT1, FIN_WAIT2: its end sent, the peer's not


def test_a_socket_the_process_half_closed_stays_half_closed_across_moves(tmp_path: Path) -> None:
    with two_nodes(tmp_path) as (a, b):
        peer = spawn_python(a, HALF_PEER)
        closer = spawn_python(a, HALF_CLOSER, read_line(peer, LINE_TIMEOUT))
        assert read_line(closer, LINE_TIMEOUT) == "shut"
        assert read_line(peer, LINE_TIMEOUT) == "eof b'bye'"
        assert ask(closer, "state") in HALF_CLOSED
        assert ask(closer, "write") == "BrokenPipeError"
        here, pid = a, closer.pid
        for there in (b, a):
            moved = move(here, pid, there, home=(a, closer.pid), precopy=False)
            if here is a:
                assert closer.wait(EXIT_TIMEOUT) == -signal.SIGKILL
            assert ask_moved(closer, "state") in HALF_CLOSED, there.name
            assert ask_moved(closer, "write") == "BrokenPipeError", there.name
            here, pid = there, moved.pid
        # Its reading side is as open as before: the peer's answer, then its end.
        assert ask(peer, "answer") == "answer"
        assert ask_moved(closer, "read") == "b'answer\\n'"
        assert ask(peer, "close") == "close"
        assert ask_moved(closer, "read") == "b''"
        assert closer.stdin is not None
        closer.stdin.close()
        assert_ended_well(moved, "the half-closer", tmp_path)
        wait_released(moved)


def test_a_process_in_its_own_mount_namespace_restored_keeps_its_files_and_moves(
    tmp_path: Path,
) -> None:
    private = tmp_path / "private"
    private.mkdir()
    (private / "data").write_text("the host's file\n")
    image = tmp_path / "reader.crf"
    with Cluster(tmp_path / "cluster", nodes=2) as cluster:
        a, b = cluster.nodes
        a.start_daemon()
        b.start_daemon()
        reader = spawn_private_reader(a, private)
        namespace = ask(reader, "ns")
        a.hijack_ok("attach", reader.pid)
        a.hijack_ok("dump", reader.pid, "-o", image, "--kill")
        assert reader.wait(EXIT_TIMEOUT) == -signal.SIGKILL
        # Restored where its shadow holds what it held: in its own namespace again.
        restored = restored_pid(a.hijack_ok("restore", image))
        assert ask_moved(reader, "ns") == namespace
        assert ask_moved(reader, "held") == "its own file"
        assert ask_moved(reader, "open") == "its own file"
        moved = move(a, restored, b, home=(a, reader.pid), precopy=False)
        assert ask_moved(reader, "open") == "its own file"
        assert reader.stdin is not None
        reader.stdin.close()
        assert_ended_well(moved, "the restored reader", tmp_path)
        wait_released(moved)
