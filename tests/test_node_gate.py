"""The node daemon's gate (hijack/node/gate.py) on loopback, with its limits made small:
connections per address, handshakes under way (who is evicted), authenticated peers
served, the handshake deadline; and a revocation list changed while it runs."""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hijack.errors import HijackError
from hijack.node import gate, pki
from hijack.node.channel import Channel

WAIT = 10.0


@pytest.fixture
def certificates(tmp_path: Path) -> Path:
    directory = tmp_path / "pki"
    pki.init_ca(directory)
    for name in ("daemon", "mover", "other"):
        pki.add_node(directory, name, "127.0.0.1")
    return directory


@contextlib.contextmanager
def running_gate(certificates: Path, limits: gate.Limits) -> Iterator[tuple[gate.Gate, int]]:
    """A gate on a loopback port whose served peers are answered `pong` and then held
    until the block ends."""
    release = threading.Event()
    lines: list[str] = []

    def serve(tls: ssl.SSLSocket, peer: tuple[str, int]) -> None:
        channel = Channel.accept(tls)
        channel.receive()
        channel.send({"pong": True})
        release.wait(WAIT)

    listener = socket.create_server(("127.0.0.1", 0))
    door = gate.Gate(
        listener, pki.load_identity(certificates, "daemon"), limits, serve, lines.append
    )
    thread = threading.Thread(target=door.run)
    thread.start()
    try:
        yield door, listener.getsockname()[1]
    finally:
        release.set()
        door.stop()
        thread.join(WAIT)
        listener.close()
    assert not thread.is_alive()


def closed_by_peer(sock: socket.socket, timeout: float = WAIT) -> bool:
    """Whether the other end closes `sock` within `timeout` (it sends nothing before)."""
    readable, _, _ = select.select([sock], [], [], timeout)
    if not readable:
        return False
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def silent(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def ping(certificates: Path, port: int, name: str = "mover") -> Channel:
    channel = Channel.connect(
        ("127.0.0.1", port), pki.load_identity(certificates, name), timeout=WAIT
    )
    channel.send({"op": "ping"})
    assert channel.receive() == {"pong": True}
    return channel


def test_one_address_gets_at_most_its_share(certificates: Path) -> None:
    with running_gate(certificates, gate.Limits(per_address=3)) as (_, port):
        held = [silent(port) for _ in range(3)]
        extra = silent(port)
        assert closed_by_peer(extra)
        assert not any(closed_by_peer(sock, 0.2) for sock in held)
        # Another address is not counted with it.
        other = silent(port, "127.0.0.2")
        assert not closed_by_peer(other, 0.2)
        for sock in [*held, extra, other]:
            sock.close()


def test_a_flood_of_handshakes_evicts_itself_not_the_node(certificates: Path) -> None:
    limits = gate.Limits(handshakes=4, per_address=10)
    with running_gate(certificates, limits) as (door, port):
        flood = [silent(port, "127.0.0.2") for _ in range(3)]
        # A fourth handshake under way from the node's own address, then more flood:
        # each new one evicts the oldest of the address with the most under way.
        node = socket.create_connection(("127.0.0.1", port))
        flood += [silent(port, "127.0.0.2") for _ in range(6)]
        assert sum(closed_by_peer(sock, 1.0) for sock in flood) == 6
        assert not closed_by_peer(node, 0.2)
        channel = Channel.open(node, pki.load_identity(certificates, "mover"), f"127.0.0.1:{port}")
        channel.send({"op": "ping"})
        assert channel.receive() == {"pong": True}
        channel.close()
        for sock in flood:
            sock.close()
        assert len(door.pending) <= 4


def test_past_the_served_limit_a_node_hears_busy(certificates: Path) -> None:
    with running_gate(certificates, gate.Limits(connections=1)) as (_, port):
        first = ping(certificates, port)
        with pytest.raises(HijackError, match="serves as many connections as it may"):
            ping(certificates, port, "other")
        first.close()


def test_a_silent_peer_is_closed_at_the_handshake_deadline(certificates: Path) -> None:
    with running_gate(certificates, gate.Limits(handshake_timeout=0.3)) as (door, port):
        sock = silent(port)
        assert closed_by_peer(sock)
        sock.close()
        assert not door.pending


def test_a_revocation_takes_effect_at_the_next_connection(certificates: Path) -> None:
    with running_gate(certificates, gate.Limits()) as (_, port):
        ping(certificates, port).close()
        pki.revoke(certificates, "mover")
        with pytest.raises(HijackError, match=r"refused our certificate \(certificate revoked\)"):
            ping(certificates, port)
        ping(certificates, port, "other").close()


def test_a_mover_refuses_a_revoked_daemon(certificates: Path) -> None:
    with running_gate(certificates, gate.Limits()) as (_, port):
        pki.revoke(certificates, "daemon")
        # The mover reads the list as it starts; the daemon serves on with its own key.
        with pytest.raises(HijackError, match="certificate is refused: certificate revoked"):
            ping(certificates, port)
