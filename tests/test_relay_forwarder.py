"""An encrypted relay end to end, in one test: the shadow's relays (RelayHub, run here) and
a node's forwarder (its own process), joined by TLS over loopback with the cluster's
certificates, between a socket standing for the original and one standing for the process.

What a move needs of them (hijack/node/forwarder.py): once `migrating` returns, every
byte the shadow sent is in the process's socket, so the mover can copy it from there.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import secrets
import select
import selectors
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.certificates import one_node_cluster

from hijack.errors import HijackError
from hijack.node.forwarder import ForwarderProcess, unacknowledged
from hijack.shadow import control, pump, relay_link, tls_records
from hijack.shadow.relay import RelayHub, Stream
from hijack.shadow.relay_link import ShadowIdentity, TlsLink
from hijack.sys import tcp_repair

NODE = "n"
STREAM = "fd:5"
TIMEOUT = 10.0
PATTERN = bytes(range(251))  # a prime length: a byte out of place shows


def pattern(offset: int, size: int) -> bytes:
    start = offset % len(PATTERN)
    whole = PATTERN * (2 + size // len(PATTERN))
    return whole[start : start + size]


def readable(sock: socket.socket) -> int:
    value = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", value)[0])


class Relayed:
    """One stream of a shadow relayed, encrypted, through this node's forwarder."""

    def __init__(self, directory: Path) -> None:
        self.log: list[str] = []
        self.selector = selectors.DefaultSelector()
        self.hub = RelayHub(self.selector, self.log.append)
        self.identity = ShadowIdentity()
        self.identity.trust(relay_link.cluster_trust(directory))
        self.token = secrets.token_bytes(32)
        self.endpoint = socket.create_server(("127.0.0.1", 0))
        address = f"127.0.0.1:{self.endpoint.getsockname()[1]}"
        self.home = control.HomeEndpoint(address, self.token, self.identity.fingerprint)
        # The original (the shadow holds it) and its peer (the test is that client).
        self.client, original = socket.socketpair()
        self.hub.adopt(5, original.detach(), False)
        self.forwarder = ForwarderProcess(self.log.append)
        self.process_end: socket.socket | None = None
        self.moves = itertools.count(1)

    @property
    def stream(self) -> Stream:
        return self.hub.streams[STREAM]

    @property
    def link(self) -> TlsLink:
        relay = self.stream.relay
        assert relay is not None and relay.link is not None
        return relay.link

    def move_in(self) -> socket.socket:
        """A relay made by the forwarder for a move, the active one once it is `migrated`:
        returns the process's end."""
        move = f"m{next(self.moves)}"
        accepted: list[TlsLink | BaseException] = []

        def accept() -> None:  # as the shadow's _accept_network
            try:
                connection, _ = self.endpoint.accept()
                connection.settimeout(TIMEOUT)
                header, link = relay_link.accept(connection, self.identity, self.token)
                assert header["stream"] == STREAM and header["move"] == move, header
                link.write_all(control.RELAY_ACCEPTED)
                if tls_records.OWN_RECORDS:  # as the shadow's _admitted
                    assert link.own_records(self.identity.keylog)
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                accepted.append(link)
            except BaseException as exc:
                accepted.append(exc)

        thread = threading.Thread(target=accept)
        thread.start()
        process_end = self.forwarder.relay(self.home, STREAM, move)
        thread.join(TIMEOUT)
        link = accepted[0]
        if isinstance(link, BaseException):
            raise link
        self.hub.attach_relay(STREAM, move, link)
        self.hub.migrated(move, NODE, {}, {}, set())
        self.process_end = process_end
        return process_end

    def unsent(self) -> int:
        """Ciphertext made here, not taken by our kernel yet (the native pump's, sealed by it
        and waiting in the out pipe, while it carries the stream)."""
        if self.stream.native:
            return self.hub._native_counts(self.stream)[2]
        return len(self.link.pending)

    def pump(self, seconds: float) -> None:
        """The shadow's event loop for `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for key, events in self.selector.select(0.005):
                key.data(key.fileobj, events)

    def close(self) -> None:
        for stream in list(self.hub.streams.values()):
            self.hub._close(stream, reset=True)
        self.hub.close_pump()
        for sock in (self.client, self.endpoint, self.process_end):
            if sock is not None:
                sock.close()
        self.selector.close()
        if self.forwarder.sock is not None:
            self.forwarder.sock.close()  # the forwarder ends with its last relay
        process = self.forwarder.process
        if process is not None:
            with contextlib.suppress(Exception):
                process.wait(TIMEOUT)


@pytest.fixture
def relayed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Relayed]:
    relayed = Relayed(one_node_cluster(tmp_path, monkeypatch, NODE))
    try:
        yield relayed
    finally:
        relayed.close()


def test_migrating_waits_for_ciphertext_the_shadow_had_not_sent_yet(relayed: Relayed) -> None:
    """The process stops reading long enough for every buffer on the way to fill (the
    forwarder's, both sockets', and the TLS records the shadow made but its kernel did not
    take), then reads on: `migrating` answers once every byte sent is in its socket.

    (It did not: encrypted and counted as sent, the records waiting in the shadow were
    sent only while it pumped, which `migrating` stops, and a move under load aborted
    with "did not take what its home shadow sent it", issue #16.)
    """
    process_end = relayed.move_in()
    relayed.client.setblocking(False)
    written = 0
    deadline = time.monotonic() + TIMEOUT
    while not relayed.unsent():
        assert time.monotonic() < deadline, "the buffers on the way never filled"
        with contextlib.suppress(BlockingIOError):
            written += relayed.client.send(pattern(written, 1 << 20))
        relayed.pump(0.01)
    relayed.pump(0.1)
    assert relayed.unsent(), "what waits in the shadow went out with nobody reading"

    received = bytearray()
    reading = threading.Event()

    def read() -> None:  # the process reads on
        process_end.settimeout(0.05)
        while not reading.is_set():
            with contextlib.suppress(TimeoutError):
                received.extend(process_end.recv(1 << 20))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        relayed.hub.migrating("m2", ack_wait=3.0)
        sent = relayed.link.plain_sent
        assert relayed.stream.relay is not None and relayed.stream.relay.acked == sent
    finally:
        reading.set()
        reader.join(TIMEOUT)
    # All it was sent is in its socket: read, or there to be read (what a mover copies).
    assert len(received) + readable(process_end) == sent, (len(received), sent)
    assert received == pattern(0, len(received))
    assert not relayed.link.pending


def test_a_hand_back_takes_every_byte_the_process_wrote_out_of_the_forwarder(
    relayed: Relayed,
) -> None:
    """Home again (docs/protocol.md): once the frozen process's send queue is empty, what it
    wrote may still be in the forwarder or on the TLS link; the mover says how much it wrote
    (TCP_INFO), and the shadow hands the original back only once all of it is written there."""
    process_end = relayed.move_in()
    size = 3 << 20  # less than the way to the shadow holds: the process's queue empties
    process_end.sendall(pattern(0, size))  # the shadow reads nothing meanwhile
    deadline = time.monotonic() + TIMEOUT
    while unacknowledged(process_end):
        assert time.monotonic() < deadline, "the forwarder did not take what the process wrote"
        time.sleep(0.01)
    written = tcp_repair.data_sent(process_end.fileno())
    assert written == size

    with pytest.raises(HijackError, match="did not say what the process wrote"):
        relayed.hub.hand_back("m2", [STREAM], 1.0)  # no count: nothing changed
    received = bytearray()
    reading = threading.Event()

    def read() -> None:  # the original's peer
        relayed.client.settimeout(0.05)
        while not reading.is_set():
            with contextlib.suppress(TimeoutError):
                received.extend(relayed.client.recv(1 << 20))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        originals = relayed.hub.hand_back("m2", [STREAM], 5.0, {STREAM: size})
    finally:
        reading.set()
        reader.join(TIMEOUT)
    assert list(originals) == [STREAM]
    assert len(received) + readable(relayed.client) == size
    assert received == pattern(0, len(received))


def test_an_encrypted_stream_taken_and_given_back_by_the_pump_loses_no_byte(
    relayed: Relayed, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The native pump carries an encrypted stream's records in its steady
    state (relay_pump.c, OP_ADD_TLS) and gives it back, record numbers, unsent records,
    unopened ones and undelivered bytes included, at every status, move and abort: a bulk
    echo both ways through all of that comes back whole and in order, counted exactly."""
    if not pump.available():
        pytest.skip("relay-pump is not built")
    monkeypatch.setattr(pump, "ENCRYPTED", True)
    monkeypatch.setattr(tls_records, "OWN_RECORDS", True)
    process_end = relayed.move_in()
    size = 48 << 20
    done = threading.Event()
    errors: list[BaseException] = []

    def echo() -> None:  # the process: sends back what it reads
        try:
            process_end.settimeout(TIMEOUT)
            echoed = 0
            while echoed < size:
                data = process_end.recv(1 << 20)
                assert data, f"the end after {echoed} bytes"
                process_end.sendall(data)
                echoed += len(data)
        except BaseException as exc:
            errors.append(exc)

    def client() -> None:  # the original's peer: bulk out, its echo back, compared
        try:
            relayed.client.settimeout(TIMEOUT)
            sender = threading.Thread(target=relayed.client.sendall, args=(pattern(0, size),))
            sender.start()
            received = bytearray()
            while len(received) < size:
                data = relayed.client.recv(1 << 20)
                assert data, f"the end after {len(received)} bytes"
                received += data
            sender.join(TIMEOUT)
            assert received == pattern(0, size), "the echo differs"
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    threads = [threading.Thread(target=echo), threading.Thread(target=client)]
    for thread in threads:
        thread.start()
    given_back = 0
    try:
        for turn in itertools.count():
            if done.is_set() or turn > 2000:
                break
            relayed.pump(0.01)
            if relayed.stream.native:
                relayed.hub._native_counts(relayed.stream)  # a status: counts, kept by it
                if turn % 2:
                    relayed.hub._reclaim()  # a swap's or a close's take-back
                    relayed.hub._refresh_interest()
                else:
                    relayed.hub.migrating(f"x{turn}", ack_wait=5.0)  # a move that aborts
                    relayed.hub.aborted(f"x{turn}")
                given_back += 1
    finally:
        done.wait(TIMEOUT)
        for thread in threads:
            thread.join(TIMEOUT)
    assert not errors, errors
    relayed.hub._reclaim()
    assert given_back >= 3, given_back
    assert relayed.stream.bytes_out == size and relayed.stream.bytes_in == size
    assert relayed.link.plain_sent == size


def forwarder_pumps(relayed: Relayed) -> list[int]:
    """The forwarder's native relay pumps running now (its children running relay-pump)."""
    process = relayed.forwarder.process
    assert process is not None
    found = []
    for task in Path(f"/proc/{process.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{child}/exe").resolve() == pump.PROGRAM.resolve():
                    found.append(int(child))
    return found


def wait_until(relayed: Relayed, done: Callable[[], bool], what: str) -> None:
    """Run the shadow's event loop until `done()`."""
    deadline = time.monotonic() + TIMEOUT
    while not done():
        assert time.monotonic() < deadline, f"not within {TIMEOUT:g} s: {what}"
        relayed.pump(0.01)


def test_the_forwarders_end_goes_through_its_native_pump_and_back_at_each_end(
    relayed: Relayed,
) -> None:
    """Past its opening exchange the forwarder's end of an encrypted relay is carried by its
    native pump (relay_pump.c, OP_ADD_FORWARD: DATA frames and ACKs out, the shadow's bytes
    in). At the shadow's end the pump gives it back, and the forwarder passes the end on
    after every byte; the process's end then goes the forwarder's own way; the pump ends
    once it carries nothing."""
    if not pump.available() or os.environ.get("HIJACK_FORWARDER_PUMP") == "0":
        pytest.skip("the forwarder's native pump is not in use (not built, or turned off)")
    process_end = relayed.move_in()
    wait_until(relayed, lambda: bool(forwarder_pumps(relayed)), "a pump in the forwarder")
    process_end.settimeout(TIMEOUT)
    size = 5 << 20
    sender = threading.Thread(target=relayed.client.sendall, args=(pattern(0, size),))
    sender.start()
    received = bytearray()
    process_end.setblocking(False)
    deadline = time.monotonic() + TIMEOUT
    while len(received) < size:  # the process reads while the shadow's loop runs
        assert time.monotonic() < deadline, f"{len(received)} of {size} bytes came"
        relayed.pump(0.001)
        with contextlib.suppress(BlockingIOError):
            received += process_end.recv(1 << 20)
    sender.join(TIMEOUT)
    relayed.client.setblocking(False)
    assert received == pattern(0, size)
    # Every byte is in the process's socket: the forwarder's ACKs (its pump's) say so.
    relay = relayed.stream.relay
    assert relay is not None

    def acked_all() -> bool:
        relayed.hub._reclaim()  # the shadow's own pump, if it carries the stream, keeps ACKs
        relayed.hub._refresh_interest()
        return relay.acked == size

    wait_until(relayed, acked_all, "the forwarder's ACK of every byte")

    relayed.client.shutdown(socket.SHUT_WR)  # the original's peer ends: the relay ends
    process_end.settimeout(TIMEOUT)
    wait_until(relayed, lambda: bool(select.select([process_end], [], [], 0)[0]), "the end")
    assert process_end.recv(16) == b"", "the shadow's end did not come to the process"

    answer = pattern(7, 1 << 20)  # the process answers, then ends: Python's way now
    process_end.sendall(answer)
    process_end.shutdown(socket.SHUT_WR)
    got = bytearray()
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert time.monotonic() < deadline, f"the answer's end: {len(got)} bytes came"
        relayed.pump(0.001)
        try:
            data = relayed.client.recv(1 << 20)
        except BlockingIOError:
            continue
        if not data:
            break
        got += data
    assert got == answer
    wait_until(relayed, lambda: not forwarder_pumps(relayed), "the pump's end")
