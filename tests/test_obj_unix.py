"""Unix domain sockets rebuilt from the image alone (issue #12 item 3), end to end.

The unix_sockets fixture holds every shape (pairs of each type with data queued,
a listener with a connection waiting, an abstract name, descriptors in flight,
options) and checks them all itself at the finish. An unmodified python3 asyncio
server (its self-pipe is a socketpair) is dumped and restored without attach and
serves again. What cannot come back is refused by name, before anything is killed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support import spawn_fixture
from support.cli import HijackCli, restored_pid
from support.objects import (
    compare_views,
    dump_kill,
    proc_views,
    restore_adopted,
    shown_json,
    without_socket_inodes,
)
from support.procview import wait_in_syscall
from test_dump_restore import (
    EXIT_TIMEOUT,
    PYTHON,
    SYS_READ,
    Child,
    NothingStarted,
    assert_refused,
    wait_until,
)
from test_dump_restore import every_image_recodes as every_image_recodes  # autouse

from hijack.sys import unix_socket


def unix_details(document: dict[str, object]) -> dict[int, str]:
    descriptors = document["descriptors"]
    assert isinstance(descriptors, list)
    return {d["fd"]: d["details"] for d in descriptors if d["details"].startswith("unix: ")}


def test_every_kind_of_unix_socket_comes_back_with_its_queues(
    hijack: HijackCli, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    image = tmp_path / "unix.crf"
    with spawn_fixture("unix_sockets", data, fifos=True) as fixture:
        wait_in_syscall(fixture.pid, (SYS_READ,))
        before = proc_views(fixture.pid, without_socket_inodes)
        dump_kill(hijack, fixture, image)
        details = unix_details(shown_json(hijack, image))
        assert len(details) == 20, details
        assert any("listening on" in line and "2 connection(s) waiting" in line
                   for line in details.values()), details  # fmt: skip
        assert any("2 descriptor(s) in flight" in line for line in details.values()), details

        # Two socket files are gone (made again; one of a name bound relative to the cwd),
        # the others stayed behind (replaced).
        (data / "listener.sock").unlink()
        (data / "rel.sock").unlink()
        pid = restore_adopted(hijack, fixture, image)
        wait_in_syscall(pid, (SYS_READ,), describe=fixture.describe)
        assert stat.S_ISSOCK((data / "listener.sock").stat().st_mode)
        assert stat.S_ISSOCK((data / "rel.sock").stat().st_mode)
        compare_views(before, pid, without_socket_inodes)
        # Every queue read whole, in order, with boundaries, credentials, descriptors;
        # the waiting connection accepted and used.
        fixture.assert_intact()


def test_a_plain_dump_reads_the_queues_without_taking_anything(
    hijack: HijackCli, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    with spawn_fixture("unix_sockets", data) as fixture:
        hijack.ok("dump", fixture.pid, "-o", tmp_path / "unix.crf")
        # Its bytes, messages and descriptors are all still queued; its peek offset is back.
        fixture.assert_intact()


@contextmanager
def running(program: str, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """python3 -c PROGRAM ARGS, its stdin and stdout pipes of ours; killed and reaped after."""
    process = subprocess.Popen(
        [PYTHON, "-c", program, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        yield process
    finally:
        process.kill()
        process.wait(timeout=EXIT_TIMEOUT)
        for pipe in (process.stdin, process.stdout):
            if pipe is not None:
                pipe.close()


@contextmanager
def outside_peer(path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A python3 that listens on `path`, accepts one connection and holds it."""
    program = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)\n"
        "print('ready', flush=True)\n"
        "c, _ = s.accept(); c.recv(1)\n"
    )
    with running(program, str(path)) as peer:
        assert peer.stdout is not None and peer.stdout.readline() == b"ready\n"
        yield peer


def test_a_stream_connected_to_a_process_outside_is_refused_by_name(
    hijack: HijackCli, tmp_path: Path
) -> None:
    path = tmp_path / "outside.sock"
    image = tmp_path / "client.crf"
    client_program = (
        "import socket, sys\n"
        "c = socket.socket(socket.AF_UNIX); c.connect(sys.argv[1])\n"
        "print(c.fileno(), flush=True)\n"
        "sys.stdin.read()\n"
        "c.sendall(b'x'); print('still connected', flush=True)\n"
    )
    with outside_peer(path), running(client_program, str(path)) as client:
        assert client.stdout is not None and client.stdin is not None
        fd = int(client.stdout.readline())
        result = hijack("dump", client.pid, "-o", image, "--kill")
        assert_refused(result, f"fd {fd} (socket", "connected to a peer outside", str(path))
        assert "not killing" in result.stderr
        # Untouched: it still runs, its connection still works.
        client.stdin.close()
        assert client.stdout.readline() == b"still connected\n"
        assert client.wait(timeout=EXIT_TIMEOUT) == 0
    # The image of a plain dump is refused the same way, before anything starts.
    path = tmp_path / "outside-again.sock"
    with outside_peer(path), running(client_program, str(path)) as client:
        assert client.stdout is not None and client.stdin is not None
        fd = int(client.stdout.readline())
        hijack.ok("dump", client.pid, "-o", image)
        client.stdin.close()
        assert client.wait(timeout=EXIT_TIMEOUT) == 0
    with NothingStarted(None):
        assert_refused(hijack("restore", image), f"fd {fd} (socket", "--skip-unsupported")


ASYNCIO_SERVER = """
import asyncio, sys

async def answer(reader, writer):
    line = await reader.readline()
    writer.write(b"echo " + line)
    await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


def ask(port: int, line: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(line)
        answer = b""
        while chunk := connection.recv(4096):
            answer += chunk
        return answer


def test_an_asyncio_server_serves_again_after_dump_kill_and_restore(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "asyncio.crf"
    output = tmp_path / "server.out"
    with open(output, "wb") as stdout:
        server = subprocess.Popen(
            [PYTHON, "-c", ASYNCIO_SERVER],
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.DEVNULL,
        )
    with Child(server.pid) as original:
        wait_until(lambda: output.read_bytes().endswith(b"\n"), "the asyncio server's port")
        port = int(output.read_bytes())
        assert ask(port, b"before\n") == b"echo before\n"
        hijack.ok("dump", server.pid, "-o", image, "--kill")
        assert original.wait() == -signal.SIGKILL
        server.returncode = -signal.SIGKILL
    document = shown_json(hijack, image)
    # Its self-pipe: a socketpair, both ends in the process.
    pair = [line for line in unix_details(document).values() if "inside the process" in line]
    assert len(pair) == 2, document["descriptors"]
    with Child(restored_pid(hijack.ok("restore", image))):
        assert ask(port, b"after\n") == b"echo after\n"
        assert ask(port, b"again\n") == b"echo again\n"


DATAGRAM_CLIENT = """
import signal, socket, sys
log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
log.connect(sys.argv[1])
log.send(b"before")
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
print("connected", flush=True)
count = 0
while True:
    signal.sigwait([signal.SIGUSR1])
    count += 1
    log.send(b"after %d" % count)
"""


def test_a_datagram_socket_connected_to_a_name_outside_connects_again(
    hijack: HijackCli, tmp_path: Path
) -> None:
    """As a program logging to /dev/log: the receiver outside stays, the sender moves on."""
    path = tmp_path / "log.sock"
    output = tmp_path / "client.out"
    image = tmp_path / "logger.crf"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(str(path))
        receiver.settimeout(10)
        with open(output, "wb") as stdout:
            client = subprocess.Popen(
                [PYTHON, "-c", DATAGRAM_CLIENT, str(path)],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.DEVNULL,
            )
        with Child(client.pid) as original:
            assert receiver.recv(100) == b"before"
            wait_until(lambda: output.read_bytes() == b"connected\n", "the client connected")
            hijack.ok("dump", client.pid, "-o", image, "--kill")
            assert original.wait() == -signal.SIGKILL
            client.returncode = -signal.SIGKILL
        [line] = unix_details(shown_json(hijack, image)).values()
        assert line == f"unix: datagram, connected to {path}", line
        with Child(restored_pid(hijack.ok("restore", image))) as restored:
            os.kill(restored.pid, signal.SIGUSR1)
            assert receiver.recv(100) == b"after 1"


CARRIER = """
import socket, sys
connection = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
left, right = socket.socketpair()
socket.send_fds(left, [b"a connection"], [connection.fileno()])
connection.close()
print(right.fileno(), flush=True)
sys.stdin.read()
data, fds, _, _ = socket.recv_fds(right, 100, 1)
print(data.decode(), len(fds), flush=True)
"""


def test_a_descriptor_in_flight_that_cannot_come_back_is_refused_by_name(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "carrier.crf"
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        with running(CARRIER, str(port)) as carrier:
            assert carrier.stdout is not None and carrier.stdin is not None
            fd = int(carrier.stdout.readline())
            result = hijack("dump", carrier.pid, "-o", image, "--kill")
            assert_refused(
                result, f"fd {fd} (socket", "carrying in flight", "127.0.0.1", "not killing"
            )
            # Untouched: the connection is still queued, whole.
            carrier.stdin.close()
            assert carrier.stdout.readline() == b"a connection 1\n"


def test_peeking_a_queue_takes_nothing_and_puts_the_peek_offset_back() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    readable, writable = os.pipe()
    try:
        left.sendall(b"before ")
        socket.send_fds(left, [b"carrying"], [readable])
        left.sendall(b" after")
        right.setsockopt(socket.SOL_SOCKET, unix_socket.SO_PEEK_OFF, 3)
        messages = unix_socket.peek_queue(right, socket.SOCK_STREAM, shut_for_reading=False)
        try:
            # The descriptor rides on the last byte of the run that carried it.
            assert [(m.data, len(m.fds)) for m in messages] == [
                (b"before carryin", 0),
                (b"g", 1),
                (b" after", 0),
            ]
            assert os.fstat(messages[1].fds[0]).st_ino == os.fstat(readable).st_ino
        finally:
            for message in messages:
                unix_socket.close_all(message.fds)
        assert right.getsockopt(socket.SOL_SOCKET, unix_socket.SO_PEEK_OFF) == 3
        right.setsockopt(socket.SOL_SOCKET, unix_socket.SO_PEEK_OFF, -1)
        data, fds, _, _ = socket.recv_fds(right, 100, 1)
        assert data == b"before carrying" and len(fds) == 1
        os.close(fds[0])
        assert right.recv(100) == b" after"
        # sock_diag sees the pair as each other's peer.
        table = unix_socket.unix_sockets(os.getpid())
        ends = [os.fstat(end.fileno()).st_ino for end in (left, right)]
        assert [table[inode].peer for inode in ends] == ends[::-1]
    finally:
        for fd in (readable, writable):
            os.close(fd)
        left.close()
        right.close()


def test_zero_length_datagrams_are_peeked_in_order_and_left_in_place() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    sent = [b"", b"behind it", b"", b"", b"last"]
    with left, right:
        for data in sent:
            left.send(data)
        right.recv(1, socket.MSG_PEEK)  # the process peeked at the head itself
        queued = unix_socket.peek_queue(right, socket.SOCK_DGRAM, shut_for_reading=False)
        assert [message.data for message in queued] == sent
        assert [right.recv(100) for _ in sent] == sent


def test_an_attached_process_gets_its_stream_to_a_process_outside_from_its_shadow(
    hijack: HijackCli, tmp_path: Path
) -> None:
    path = tmp_path / "outside.sock"
    image = tmp_path / "client.crf"
    output = tmp_path / "client.out"
    client_program = (
        "import signal, socket, sys\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])\n"
        "c = socket.socket(socket.AF_UNIX); c.connect(sys.argv[1])\n"
        "print('connected', flush=True)\n"
        "signal.sigwait([signal.SIGUSR1])\n"
        "c.sendall(b'x')\n"
    )
    with outside_peer(path) as peer:
        with open(output, "wb") as stdout:
            client = subprocess.Popen(
                [PYTHON, "-c", client_program, str(path)],
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.DEVNULL,
            )
        with Child(client.pid) as original:
            wait_until(lambda: output.read_bytes() == b"connected\n", "the client connected")
            shadow = json.loads(hijack.ok("attach", "--json", client.pid).stdout)["shadow_pid"]
            hijack.ok("dump", client.pid, "-o", image, "--kill")
            assert original.wait() == -signal.SIGKILL
            client.returncode = -signal.SIGKILL
        with Child(shadow) as holder, Child(restored_pid(hijack.ok("restore", image))) as restored:
            os.kill(restored.pid, signal.SIGUSR1)
            # The peer outside got the byte on its very connection, then it ends.
            assert peer.wait(timeout=EXIT_TIMEOUT) == 0
            assert restored.wait() == 0
            holder.wait()
