"""The shadow's UDP relays (hijack.shadow.datagram) on real loopback sockets in this process.

An "original" UDP socket stands for the one the shadow keeps at home and a
"process" socket for the moved process's: peers send to the original, the
process answers whoever the relays show it, and the peers must hear back from
the original's address, one datagram for one datagram. The shadow's event
loop is played by `pump`, which runs the selector's callbacks until a
condition holds (bounded).
"""

from __future__ import annotations

import os
import resource
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hijack.node import pki
from hijack.shadow import datagram
from hijack.shadow.datagram import DatagramStream, parse_address, unmapped
from hijack.shadow.datagram_link import DatagramLink, StandIns
from hijack.shadow.relay_link import ShadowIdentity, TlsLink, _node_context, cluster_trust

WAIT = 5.0  # seconds a pump may take

# (selector, original, process socket, the stream relaying between them)
Relayed = tuple[selectors.BaseSelector, socket.socket, socket.socket, DatagramStream]


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(WAIT)
    return sock


def address(sock: socket.socket) -> str:
    host, port = sock.getsockname()
    return f"{host}:{port}"


def pump(selector: selectors.BaseSelector, until: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not until():
        assert time.monotonic() < deadline, "the relays did not get there in time"
        for key, events in selector.select(0.05):
            key.data(key.fileobj, events)


def waiting(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


@pytest.fixture
def relayed() -> Iterator[Relayed]:
    """A stream relaying an original to a process socket, both fresh."""
    selector = selectors.DefaultSelector()
    original, process = udp_socket(), udp_socket()
    stream = DatagramStream("fd:7", original.fileno(), selector, lambda text: None)
    stream.migrated(address(process), "", [])
    try:
        yield selector, original, process, stream
    finally:
        stream.close()
        selector.close()
        original.close()
        process.close()


def echo_through(
    selector: selectors.BaseSelector, process: socket.socket, peer: socket.socket
) -> tuple[str, str]:
    """The process echoes one datagram it got; (the relay it came from, who the peer heard)."""
    pump(selector, lambda: waiting(process))
    data, relay = process.recvfrom(65536)
    process.sendto(data, relay)
    pump(selector, lambda: waiting(peer))
    echo, sender = peer.recvfrom(65536)
    assert echo == data
    return f"{relay[0]}:{relay[1]}", f"{sender[0]}:{sender[1]}"


def test_each_peer_has_its_relay_and_hears_the_original_address(relayed: Relayed) -> None:
    selector, original, process, stream = relayed
    peers = [udp_socket() for _ in range(3)]
    try:
        relays = {}
        for size in (1, 1400, 65507):
            for peer in peers:
                peer.sendto(bytes([size % 251]) * size, original.getsockname())
                relay, heard = echo_through(selector, process, peer)
                assert heard == address(original)
                assert relays.setdefault(address(peer), relay) == relay  # the same each time
        assert len(set(relays.values())) == 3
        row = stream.describe()
        assert (row["peers"], row["datagrams_out"], row["datagrams_in"]) == (3, 9, 9), row
    finally:
        for peer in peers:
            peer.close()


def test_only_the_process_speaks_through_a_relay(relayed: Relayed) -> None:
    selector, original, process, stream = relayed
    with udp_socket() as peer, udp_socket() as stranger:
        peer.sendto(b"hello", original.getsockname())
        pump(selector, lambda: waiting(process))
        _, relay = process.recvfrom(65536)
        stranger.sendto(b"not from the process", relay)
        pump(selector, lambda: stream.dropped == 1)
        assert not waiting(peer)


def test_the_peer_table_is_bounded_and_idle_relays_expire(
    relayed: Relayed,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    selector, original, process, stream = relayed
    monkeypatch.setattr(datagram, "PEER_LIMIT", 4)
    peers = [udp_socket() for _ in range(10)]
    try:
        for peer in peers:
            peer.sendto(b"flood", original.getsockname())
            pump(selector, lambda: waiting(process))
            assert process.recv(65536) == b"flood"  # still delivered
            assert len(stream.peers) <= 4
        # The latest peers keep their relays and are answered.
        peers[-1].sendto(b"again", original.getsockname())
        assert echo_through(selector, process, peers[-1])[1] == address(original)
        stream.expire(time.monotonic() + datagram.PEER_IDLE + 1)
        assert stream.peers == {}
    finally:
        for peer in peers:
            peer.close()


def test_out_of_descriptors_a_new_peer_takes_the_oldest_relay(relayed: Relayed) -> None:
    selector, original, process, stream = relayed
    peers = [udp_socket() for _ in range(8)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Room for about three relays from here on (the listing's own descriptor
    # counts as taken, so one more).
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit_leaving(3), hard))
    try:
        for peer in peers:
            peer.sendto(b"one more", original.getsockname())
            pump(selector, lambda: waiting(process))
            assert process.recv(65536) == b"one more"
        assert 1 <= len(stream.peers) <= 4 < len(peers)  # each new peer took an old one's place
        assert stream.dropped == 0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for peer in peers:
            peer.close()


def limit_leaving(free: int) -> int:
    """The descriptor limit under which exactly `free` more descriptors can be opened."""
    taken = {int(name) for name in os.listdir("/proc/self/fd")}
    limit = 0
    while limit - len(taken & set(range(limit))) < free:
        limit += 1
    return limit


def test_a_connected_original_keeps_one_relay_that_never_expires() -> None:
    selector = selectors.DefaultSelector()
    with udp_socket() as original, udp_socket() as server, udp_socket() as process:
        original.connect(server.getsockname())
        stream = DatagramStream("fd:3", original.fileno(), selector, lambda text: None)
        try:
            port = stream.connected_relay_port
            assert port
            process.connect(("127.0.0.1", port))
            stream.migrated(address(process), f"127.0.0.1:{port}", [])
            process.send(b"request")
            pump(selector, lambda: waiting(server))
            request, sender = server.recvfrom(65536)
            assert (request, sender) == (b"request", original.getsockname())
            server.sendto(b"answer", sender)
            pump(selector, lambda: waiting(process))
            assert process.recv(65536) == b"answer"
            stream.expire(time.monotonic() + datagram.PEER_IDLE + 1)
            assert stream.connected_relay_port == port
        finally:
            stream.close()
            selector.close()


def test_unread_datagrams_go_again_to_the_next_process_socket(relayed: Relayed) -> None:
    selector, original, process, stream = relayed
    with udp_socket() as peer, udp_socket() as next_process:
        peer.sendto(b"first", original.getsockname())
        pump(selector, lambda: waiting(process))
        # The process was frozen before reading it: the mover took it, unread.
        first, relay = process.recvfrom(65536)
        stream.migrating()
        peer.sendto(b"second", original.getsockname())  # waits in the original
        stream.migrated(address(next_process), "", [(f"{relay[0]}:{relay[1]}", first)])
        pump(selector, lambda: waiting(next_process))
        assert next_process.recvfrom(65536) == (b"first", relay)
        pump(selector, lambda: waiting(next_process))
        assert next_process.recvfrom(65536) == (b"second", relay)
        # A late answer of the previous process socket still reaches the peer.
        process.sendto(b"late", relay)
        pump(selector, lambda: waiting(peer))
        assert peer.recv(65536) == b"late"


def test_what_the_new_process_writes_before_the_shadow_knows_it_is_not_lost(
    relayed: Relayed,
) -> None:
    selector, original, process, stream = relayed
    with udp_socket() as peer, udp_socket() as next_process, udp_socket() as stranger:
        peer.sendto(b"hello", original.getsockname())
        pump(selector, lambda: waiting(process))
        _, relay = process.recvfrom(65536)
        stream.migrating()
        # Running on its new node, not yet announced by the mover.
        next_process.sendto(b"early", relay)
        stranger.sendto(b"not from the process", relay)
        pump(selector, lambda: len(stream.held_back) == 2)
        assert not waiting(peer)
        stream.migrated(address(next_process), "", [])
        pump(selector, lambda: waiting(peer))
        assert peer.recvfrom(65536) == (b"early", original.getsockname())
        assert stream.dropped == 1


def test_addresses_read_as_ipv4_whatever_way_a_mapped_one_is_written() -> None:
    assert unmapped("::ffff:10.77.0.2") == unmapped("::ffff:a4d:2") == "10.77.0.2"
    assert unmapped("::1") == "::1"
    assert parse_address("[::ffff:a4d:2]:5353") == ("10.77.0.2", 5353)
    assert parse_address("10.0.0.1:53") == ("10.0.0.1", 53)


@pytest.fixture
def linked(tmp_path: Path) -> Iterator[tuple[Relayed, StandIns]]:
    """As `relayed`, but encrypted: the stream's datagrams go through a TLS datagram link to
    the node's stand-ins (hijack.shadow.datagram_link), one selector pumping both ends."""
    pki.init_ca(tmp_path)
    pki.add_node(tmp_path, "node")
    identity = ShadowIdentity()
    identity.trust(cluster_trust(tmp_path))
    shadow_end, node_end = socket.socketpair()
    node_link: list[TlsLink] = []
    thread = threading.Thread(
        target=lambda: node_link.append(
            TlsLink.handshake(node_end, _node_context(tmp_path, "node", 0.0), server=False)
        )
    )
    thread.start()
    assert identity.context is not None
    shadow_link = TlsLink.handshake(shadow_end, identity.context, server=True)
    thread.join()
    selector = selectors.DefaultSelector()
    original, process = udp_socket(), udp_socket()
    stream = DatagramStream("fd:7", original.fileno(), selector, lambda text: None)
    for sock in (shadow_end, node_end):
        sock.setblocking(False)
    stream.attach_link("move", DatagramLink(shadow_link))
    stand_ins = StandIns(DatagramLink(node_link[0]), "127.0.0.1", process.getsockname())

    def node_side(fileobj: object, events: int) -> None:
        for gone in stand_ins.from_shadow():
            selector.unregister(gone)
            gone.close()
        for port, sock in stand_ins.by_port.items():
            try:
                selector.get_key(sock)
            except KeyError:
                selector.register(sock, selectors.EVENT_READ, lambda *_, p=port: from_process(p))
        stand_ins.link.flush()

    def from_process(port: int) -> None:
        stand_ins.from_process(port)
        stand_ins.link.flush()

    selector.register(node_end, selectors.EVENT_READ, node_side)
    stream.migrated(address(process), "", [], "move")
    try:
        yield (selector, original, process, stream), stand_ins
    finally:
        stream.close()
        stand_ins.close()
        selector.close()
        original.close()
        process.close()


def test_a_datagram_link_carries_datagrams_whole_and_drops_stand_ins_with_relays(
    linked: tuple[Relayed, StandIns],
) -> None:
    (selector, original, process, stream), stand_ins = linked
    peers = [udp_socket() for _ in range(3)]
    try:
        for size in (0, 1, 1400, 65507):
            for peer in peers:
                payload = os.urandom(size)
                peer.sendto(payload, original.getsockname())
                relay, heard = echo_through(selector, process, peer)
                # The process hears its peers at the stand-ins of its node, answers there,
                # and the peer hears the original's address: one datagram for one.
                assert relay in {address(sock) for sock in stand_ins.by_port.values()}
                assert heard == address(original)
        assert stream.link is not None and len(stand_ins.by_port) == 3
        described = stream.describe()
        assert described["encrypted"] and len(described["aliases"]) == 3, described
        assert described["datagrams_out"] == described["datagrams_in"] == 12, described
        # Idle relays expire at the shadow: their stand-ins at the node go too.
        stream.expire(time.monotonic() + datagram.PEER_IDLE + 1)
        pump(selector, lambda: not stand_ins.by_port)
        assert stream.describe()["aliases"] == {}
    finally:
        for peer in peers:
            peer.close()
