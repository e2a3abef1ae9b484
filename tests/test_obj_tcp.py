"""Established TCP connections survive `dump --kill` + `restore` without attach.

The echo server is dumped with --kill while a client streams a checksummed
stream through it: its connection is checkpointed with TCP_REPAIR, locked
(nftables, through pyroute2) while the server is gone, and rebuilt by the
restore. The client, untouched, must see every byte echoed in order and no
reset; the server must end intact.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest
from support import spawn_fixture
from support.cli import HijackCli, restored_pid
from support.objects import dump_kill, objects_of, restore_adopted, shown_json
from support.procview import has_exited
from support.redis import REDIS_SERVER, Resp, redis_server
from test_faults import deliver, finish, hijack_at

from hijack.sys import netlock, procfs

STREAM_BYTES = 512 * 1024 * 1024  # long enough to be mid-stream at the dump
POLL_TIMEOUT = 10.0


def wait_for_connection(pid: int) -> None:
    """Until `pid` holds an established TCP connection (it accepted its client); bounded."""
    deadline = time.monotonic() + POLL_TIMEOUT
    while time.monotonic() < deadline:
        sockets = procfs.read_socket_table(pid)
        inodes = {entry.ino for entry in procfs.list_fds(pid)}
        if any(s.state == "ESTABLISHED" for ino, s in sockets.items() if ino in inodes):
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} accepted no connection within {POLL_TIMEOUT} s")


@pytest.fixture
def hijack(tmp_path: Path, no_leaked_network_locks: None) -> HijackCli:
    return HijackCli(tmp_path / "state")


def test_a_server_killed_mid_stream_and_restored_keeps_its_client(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "echo.crf"
    with spawn_fixture("echo_server", fifos=True) as server:
        port = server.ready["port"]
        with spawn_fixture("stream_client", "127.0.0.1", port, str(STREAM_BYTES), "7") as client:
            wait_for_connection(server.pid)
            locks_before = set(netlock.locks_held(client.pid))  # another suite's may be there
            dump_kill(hijack, server, image)
            # Until the restore, what the client sends is dropped, not answered by a reset.
            assert len(set(netlock.locks_held(client.pid)) - locks_before) == 1
            shown = shown_json(hijack, image)
            [connection] = objects_of(shown, "TcpConnection")
            assert connection["local_address"] == f"127.0.0.1:{port}"
            assert "tcp: 127.0.0.1:" in hijack.ok("show", image).stdout

            restore_adopted(hijack, server, image)
            assert set(netlock.locks_held(client.pid)) == locks_before
            # The client goes on to the end of its stream, every echoed byte checked.
            assert client.wait_exit(timeout=120) == 0, client.describe()
        server.assert_intact()
    assert "echoed" in server.stdout


@pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not installed (`make test` installs it: apt-get install redis-server)",
)
def test_an_unattached_redis_server_keeps_its_clients_through_dump_kill_and_restore(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "redis.crf"
    with redis_server(tmp_path) as (server, port, log):
        client = Resp(port)
        assert client.command("SET", "before", "the dump") == b"OK"
        hijack.ok("dump", server.pid, "-o", image, "--kill")
        assert server.wait(timeout=30) == -signal.SIGKILL
        # Sent while redis is gone: the lock holds it back until the restore.
        client.send("GET", "before")
        restored = restored_pid(hijack.ok("restore", image))
        other: Resp | None = None
        try:
            assert restored == server.pid
            assert client.reply() == b"the dump"
            assert client.command("SET", "after", "the restore") == b"OK"
            other = Resp(port)
            assert other.command("GET", "after") == b"the restore"
            client.send("SHUTDOWN", "NOSAVE")
            assert client.closed_by_peer()
            # A clean end: it is our child now (the suite is a subreaper).
            _, status = os.waitpid(restored, 0)
            assert os.waitstatus_to_exitcode(status) == 0, log.read_text()
        finally:
            if not has_exited(restored):
                os.kill(restored, signal.SIGKILL)
                os.waitpid(restored, 0)
            client.close()
            if other is not None:
                other.close()


# What the fixture must read to the end of its connection after the restore, and write
# then ("epipe": its sending side is shut, a write must fail).
CLOSING_CASES = {
    "FIN_WAIT2": ("after the restore", "epipe"),  # it half-closed; the peer still sends
    "FIN_WAIT1": ("late", "epipe"),  # its FIN not yet acknowledged
    "CLOSE_WAIT": ("unread", "reply"),  # the peer closed; bytes left to read, then EOF
    "LAST_ACK": ("unread", "epipe"),  # both closed, its FIN not yet acknowledged
    "CLOSING": ("-", "epipe"),  # both sent a FIN before either was acknowledged
    "SHUT_RD": ("-", "still writing"),  # it shut its reading side: ESTABLISHED still
}


def wait_for_state(pid: int, port: int, state: str) -> None:
    """Until the TCP socket of `pid` on local port `port` is in `state`; bounded."""
    deadline = time.monotonic() + POLL_TIMEOUT
    seen = ""
    while time.monotonic() < deadline:
        for found in procfs.read_socket_table(pid).values():
            if found.type == socket.SOCK_STREAM and found.local.endswith(f":{port}"):
                seen = found.state
        if seen == state:
            return
        time.sleep(0.005)
    raise AssertionError(f"the connection of {pid} from port {port} is {seen}, not {state}")


def read_to_end(peer: socket.socket) -> bytes:
    """Every byte until the other end's FIN (a reset raises)."""
    data = b""
    while chunk := peer.recv(4096):
        data += chunk
    return data


@pytest.mark.parametrize(
    ("case", "host"),
    [(case, "127.0.0.1") for case in CLOSING_CASES]
    # The FIN it sent, the FIN it received, over IPv6.
    + [("FIN_WAIT1", "::1"), ("LAST_ACK", "::1")],
)
def test_a_closing_connection_comes_back_in_its_state(
    case: str, host: str, hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "closing.crf"
    expect_read, write = CLOSING_CASES[case]
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with (
        socket.create_server((host, 0), family=family) as listener,
        spawn_fixture(
            "tcp_closing", host, str(listener.getsockname()[1]), expect_read, write, fifos=True
        ) as fixture,
    ):
        peer, _ = listener.accept()
        with peer, contextlib.ExitStack() as drops:
            peer.settimeout(POLL_TIMEOUT)
            assert peer.recv(5) == b"hello"
            ours = int(fixture.ready["port"])
            ends = (host, listener.getsockname()[1]), (host, ours)

            def drop_what_it_sends() -> None:
                # Its FIN then never reaches the peer, nor is acknowledged.
                netlock.lock(os.getpid(), *ends)
                drops.callback(netlock.unlock, os.getpid(), *ends)

            state = case
            if case == "FIN_WAIT2":
                fixture.send(b"w")
                assert peer.recv(10) == b""
            elif case == "FIN_WAIT1":
                drop_what_it_sends()
                fixture.send(b"w")
            elif case in ("CLOSE_WAIT", "LAST_ACK"):
                peer.sendall(b"unread")
                peer.shutdown(socket.SHUT_WR)
                if case == "LAST_ACK":
                    wait_for_state(fixture.pid, ours, "CLOSE_WAIT")
                    drop_what_it_sends()
                    fixture.send(b"w")
            elif case == "CLOSING":
                drop_what_it_sends()
                fixture.send(b"w")
                wait_for_state(fixture.pid, ours, "FIN_WAIT1")
                peer.shutdown(socket.SHUT_WR)
            else:
                fixture.send(b"r")
                assert peer.recv(1) == b"r"
                state = "ESTABLISHED"
            wait_for_state(fixture.pid, ours, state)

            dump_kill(hijack, fixture, image)
            drops.close()  # the fixture is gone: only the dump's lock holds the peer back
            shown = hijack.ok("show", image).stdout
            at = f"[{host}]" if family == socket.AF_INET6 else host
            assert f"{at}:{ours} -> {at}:{ends[0][1]} {state}" in shown, shown
            assert ("reading shut" in shown) == (case == "SHUT_RD"), shown
            assert "inet: tcp 0.0.0.0:0 CLOSE" in shown, shown  # never bound
            assert f"inet: tcp 127.0.0.1:{fixture.ready['bound']} CLOSE" in shown, shown

            restore_adopted(hijack, fixture, image)
            if case in ("FIN_WAIT2", "FIN_WAIT1"):
                peer.sendall(expect_read.encode())
                peer.shutdown(socket.SHUT_WR)
            fixture.assert_intact()
            # Exactly what the fixture wrote since, then its FIN: never a reset.
            assert read_to_end(peer) == (b"" if write == "epipe" else write.encode())


def echoed(client: socket.socket, data: bytes) -> bytes:
    client.sendall(data)
    received = b""
    while len(received) < len(data) and (chunk := client.recv(len(data) - len(received))):
        received += chunk
    return received


def lock_standings(hijack: HijackCli) -> list[tuple[int, str]]:
    """The network locks `hijack status --json` shows: (pid, standing) each."""
    document = json.loads(hijack.ok("status", "--json").stdout)
    return [(lock["pid"], lock["standing"]) for lock in document["network_locks"]]


def test_recover_lifts_the_lock_of_a_dump_killed_before_it_killed(
    hijack: HijackCli, tmp_path: Path
) -> None:
    with spawn_fixture("echo_server", fifos=True) as server:
        client = socket.create_connection(("127.0.0.1", int(server.ready["port"])), timeout=10)
        with client:
            assert echoed(client, b"before") == b"before"
            locks_before = set(netlock.locks_held(os.getpid()))
            dump = hijack_at(
                "dump-handed-over", hijack.state_dir, "dump", server.pid, "-o",
                tmp_path / "echo.crf", "--kill",
            )  # fmt: skip
            deliver(dump, signal.SIGKILL)
            finish(dump)
            # It runs on, but its connection is locked: its client would never reach it.
            assert len(set(netlock.locks_held(os.getpid())) - locks_before) == 1
            assert lock_standings(hijack) == [(server.pid, "stale: the process was not killed")]
            shown = hijack.ok("status").stdout
            assert "network locks" in shown and "`hijack recover` lifts them" in shown, shown
            recovered = hijack.ok("recover").stdout
            assert "lifted: the process was not killed" in recovered, recovered
            assert lock_standings(hijack) == []
            assert set(netlock.locks_held(os.getpid())) == locks_before
            assert echoed(client, b"after the recover") == b"after the recover"
            assert "nothing to recover" in hijack.ok("recover").stdout
        server.assert_intact()


def test_recover_keeps_the_lock_an_image_waits_on_and_lifts_it_once_the_image_is_gone(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "echo.crf"
    with spawn_fixture("echo_server", fifos=True) as server:
        client = socket.create_connection(("127.0.0.1", int(server.ready["port"])), timeout=10)
        with client:
            assert echoed(client, b"before") == b"before"
            locks_before = set(netlock.locks_held(os.getpid()))
            dump_kill(hijack, server, image)
            recovered = hijack.ok("recover").stdout
            assert f"kept: its image {image} waits for its restore" in recovered, recovered
            assert len(set(netlock.locks_held(os.getpid())) - locks_before) == 1
            assert lock_standings(hijack) == [(server.pid, "waits for its restore")]
            assert "`hijack recover`" not in hijack.ok("status").stdout
            image.unlink()
            assert lock_standings(hijack) == [(server.pid, "stale: its image is gone")]
            recovered = hijack.ok("recover").stdout
            assert f"lifted: its image {image} is gone" in recovered, recovered
            assert set(netlock.locks_held(os.getpid())) == locks_before
            # No restore can come: the kernel now resets the connection.
            with pytest.raises(ConnectionResetError):
                echoed(client, b"to no one")


@pytest.mark.parametrize(
    ("outcome", "host"),
    [
        ("accepted", "127.0.0.1"),
        ("refused", "127.0.0.1"),
        ("accepted", "::1"),
        # Blocked in connect(): the kernel restarts it after the restore, and it waits on.
        ("blocking", "127.0.0.1"),
    ],
)
def test_a_connect_in_progress_goes_on_after_the_restore(
    outcome: str, host: str, hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "syn_sent.crf"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    with contextlib.ExitStack() as held:
        held.enter_context(listener)
        listener.bind((host, 0))
        listener.listen(0)  # one waiting client fills its accept queue
        port = listener.getsockname()[1]
        filler = held.enter_context(socket.create_connection((host, port), timeout=POLL_TIMEOUT))
        # Its SYN meets a full queue and is dropped: the fixture stays in SYN_SENT.
        fixture = held.enter_context(
            spawn_fixture("tcp_syn_sent", host, str(port), outcome, fifos=True)
        )
        ours = int(fixture.ready["port"])
        wait_for_state(fixture.pid, ours, "SYN_SENT")

        hijack.ok("dump", fixture.pid, "-o", image, "--kill")
        assert fixture.wait_exit() == -signal.SIGKILL
        # Closed in SYN_SENT, it sent nothing: no lock holds its peer back.
        ends = (host, ours), (host, port)
        assert netlock.lock_name(*ends) not in netlock.locks_held(os.getpid())
        shown = hijack.ok("show", image).stdout
        at = f"[{host}]" if family == socket.AF_INET6 else host
        assert f"{at}:{ours} -> {at}:{port} SYN_SENT" in shown, shown
        if outcome == "refused":
            filler.close()
            listener.close()  # the new SYN meets a closed port: a reset

        pid = restored_pid(hijack.ok("restore", image))
        fixture.adopt(pid)
        if outcome != "refused":
            listener.settimeout(POLL_TIMEOUT)
            listener.accept()[0].close()  # the filler: room for the fixture's SYN
            peer, address = listener.accept()
            with peer:
                assert address[1] == ours
                peer.settimeout(POLL_TIMEOUT)
                peer.sendall(b"welcome")
                peer.shutdown(socket.SHUT_WR)
                fixture.assert_intact()
                assert read_to_end(peer) == b"hello"
        else:
            fixture.assert_intact()
