"""The shadow's own TLS 1.3 record layer (hijack/shadow/tls_records.py): its key schedule
and records against RFC 8448's traces, and records carried with OpenSSL at the other end
of a real connection (the shadow's endpoint and a node's link), both ways, every byte; and
the native pump (relay_pump.c) handing a record it cannot take back to that layer."""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import select
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.certificates import one_node_cluster

from hijack.node import forwarder
from hijack.node.terminal import DATA, frame
from hijack.shadow import control, pump, relay_link, tls_records
from hijack.shadow.relay import RelayHub
from hijack.shadow.relay_link import ShadowIdentity, TlsLink
from hijack.shadow.tls_records import Direction, RecordError, RecordLayer

NODE = "n"
TIMEOUT = 10.0
SUITE_128 = "TLS_AES_128_GCM_SHA256"
# RFC 8448, section 3 (Simple 1-RTT Handshake): the application traffic secrets, their
# keys and ivs, and the first application data record each way (50 bytes 00..31; the
# server's is its second record: a NewSessionTicket was its first).
CLIENT_SECRET = "9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5"
SERVER_SECRET = "a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643"
CLIENT_KEY, CLIENT_IV = "17422dda596ed5d9acd890e3c63f5051", "5b78923dee08579033e523d9"
SERVER_KEY, SERVER_IV = "9f02283b6c9c07efc26bb9f2ac92e356", "cf782b88dd83549aadf1e984"
PAYLOAD = bytes(range(50))
CLIENT_RECORD = (
    "17030300 43a23f70 54b62c94 d0affafe 8228ba55 cbefacea 42f914aa 66bcab3f 2b9819a8"
    " a5b46b39 5bd54a9a 20441e2b 62974e1f 5a6292a2 977014bd 1e3deae6 3aeebb21 694915e4"
)
SERVER_RECORD = (
    "17030300 432e937e 11ef4ac7 40e538ad 36005fc4 a46932fc 3225d05f 82aa1b36 e30efaf9"
    " 7d90e6df fc602dcb 501a59a8 fcc49c4b f2e5f0a2 1c0047c2 abf33254 0dd032e1 67c2955d"
)
PATTERN = bytes(range(251))  # a prime length: a byte out of place shows


def only_suite(context: ssl.SSLContext, suite: str) -> None:
    """SSL_CTX_set_ciphersuites on `context` (Python 3.11 has no call for TLS 1.3 suites):
    its SSL_CTX is the first field after the object's header (CPython's PySSLContext)."""
    libssl = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]  # and what it links
    libssl.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    ctx = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    assert libssl.SSL_CTX_set_ciphersuites(ctx, suite.encode()) == 1


def hexbytes(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def pattern(size: int) -> bytes:
    return (PATTERN * (1 + size // len(PATTERN)))[:size]


def test_the_key_schedule_gives_rfc_8448s_keys() -> None:
    client = Direction(SUITE_128, hexbytes(CLIENT_SECRET))
    server = Direction(SUITE_128, hexbytes(SERVER_SECRET))
    assert (client.key.hex(), client.iv.hex()) == (CLIENT_KEY, CLIENT_IV)
    assert (server.key.hex(), server.iv.hex()) == (SERVER_KEY, SERVER_IV)


def test_a_key_log_frees_what_it_read_and_finds_every_line_written_after() -> None:
    """OpenSSL appends to the key log from whichever thread makes a handshake (the node
    forwarder's run side by side): what KeyLog read is freed as a hole, never cut off, so a
    line written after a read is found, and the memfd does not grow with the connections."""
    log = tls_records.KeyLog()
    try:
        with open(f"/proc/self/fd/{log.fd}", "a") as openssl:  # as OpenSSL opens it
            for number in range(200):
                random = number.to_bytes(32, "big")
                client, server = bytes([number % 256]) * 32, bytes([255 - number % 256]) * 32
                openssl.write(f"CLIENT_TRAFFIC_SECRET_0 {random.hex()} {client.hex()}\n")
                openssl.write(f"SERVER_TRAFFIC_SECRET_0 {random.hex()} {server.hex()}\n")
                openssl.flush()
                assert log.secrets(random) == (client, server), number
        status = os.fstat(log.fd)
        assert status.st_size > 200 * 2 * 150  # every line went to the end of the file
        assert status.st_blocks * 512 <= 2 * 4096, status.st_blocks  # all but its last page freed
    finally:
        log.close()


def test_records_are_rfc_8448s_both_ways_and_a_tampered_one_is_refused() -> None:
    def layer(reading: str, writing: str, written: int) -> RecordLayer:
        return RecordLayer(
            Direction(SUITE_128, hexbytes(reading)),
            Direction(SUITE_128, hexbytes(writing), written),
        )

    server = layer(CLIENT_SECRET, SERVER_SECRET, 1)
    client = layer(SERVER_SECRET, CLIENT_SECRET, 0)
    assert client.seal(PAYLOAD) == hexbytes(CLIENT_RECORD)
    assert server.seal(PAYLOAD) == hexbytes(SERVER_RECORD)
    # Opened in any cut, a byte at a time too.
    record = hexbytes(CLIENT_RECORD)
    assert b"".join(server.open(record[i : i + 1]) for i in range(len(record))) == PAYLOAD
    client.reading.sequence = 1
    assert client.open(hexbytes(SERVER_RECORD)) == PAYLOAD

    tampered = bytearray(client.seal(b"one more"))
    tampered[-1] ^= 1
    with pytest.raises(RecordError, match="bad record mac"):
        server.open(tampered)


@pytest.fixture
def pki_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return one_node_cluster(tmp_path, monkeypatch, NODE)


@contextlib.contextmanager
def linked(directory: Path, suite: str) -> Iterator[tuple[TlsLink, TlsLink, ShadowIdentity]]:
    """The shadow's side of a relay (past its exchange and RELAY_ACCEPTED), the node's
    (OpenSSL's) and the shadow's identity, over loopback TCP; `suite` the only one."""
    identity = ShadowIdentity()
    identity.trust(relay_link.cluster_trust(directory))
    assert identity.context is not None
    only_suite(identity.context, suite)
    token = secrets.token_bytes(32)
    endpoint = socket.create_server(("127.0.0.1", 0))
    address = f"127.0.0.1:{endpoint.getsockname()[1]}"
    accepted: list[TlsLink] = []

    def accept() -> None:
        connection, _ = endpoint.accept()
        _, link = relay_link.accept(connection, identity, token)
        link.write_all(control.RELAY_ACCEPTED)
        accepted.append(link)

    thread = threading.Thread(target=accept)
    thread.start()
    node = relay_link.connect(address, identity.fingerprint, token, {"kind": "relay"}, TIMEOUT)
    thread.join(TIMEOUT)
    assert node.read_exactly(len(control.RELAY_ACCEPTED)) == control.RELAY_ACCEPTED
    node.sock.settimeout(TIMEOUT)
    shadow = accepted[0]
    try:
        yield shadow, node, identity
    finally:
        for sock in (shadow.sock, node.sock, endpoint):
            sock.close()
        identity.keylog.close()


def receive(link: TlsLink, size: int) -> bytes:
    """`size` bytes from a non-blocking link (the shadow's), as its event loop reads them."""
    data = bytearray()
    while len(data) < size:
        try:
            chunk = link.recv()
        except BlockingIOError:
            assert select.select([link.sock], [], [], TIMEOUT)[0], "no data within the timeout"
            continue
        assert chunk, f"the end after {len(data)} bytes"
        data += chunk
    return bytes(data)


def send(link: TlsLink, data: bytes) -> None:
    buffer = bytearray(data)
    while buffer or link.pending:
        link.send_from(buffer)
        if buffer or link.pending:
            assert select.select([], [link.sock], [], TIMEOUT)[1], "no room within the timeout"


@pytest.mark.parametrize("suite", list(tls_records.SUITES))
def test_records_of_our_own_and_openssls_carry_a_bulk_stream_both_ways(
    pki_dir: Path, suite: str
) -> None:
    size = 3 * 1024 * 1024 + 7  # records of every size, and a last one cut short
    with linked(pki_dir, suite) as (shadow, node, identity):
        assert shadow.tls.cipher() is not None and shadow.tls.cipher()[0] == suite
        assert shadow.own_records(identity.keylog)
        shadow.sock.setblocking(False)
        errors: list[BaseException] = []

        def node_side() -> None:
            try:
                node.write_all(pattern(size))
                assert node.read_exactly(size) == pattern(size)[::-1]
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=node_side)
        thread.start()
        send(shadow, pattern(size)[::-1])
        assert receive(shadow, size) == pattern(size)
        thread.join(TIMEOUT)
        assert not errors, errors
        assert shadow.plain_sent == size


def test_a_suite_not_carried_stays_on_openssl(pki_dir: Path) -> None:
    with linked(pki_dir, "TLS_CHACHA20_POLY1305_SHA256") as (shadow, node, identity):
        assert shadow.tls.cipher() is not None
        assert shadow.tls.cipher()[0] == "TLS_CHACHA20_POLY1305_SHA256"
        assert not shadow.own_records(identity.keylog)
        node.write_all(b"still OpenSSL's")
        shadow.sock.setblocking(False)
        assert receive(shadow, 15) == b"still OpenSSL's"


def test_a_tampered_record_is_refused_at_both_ends(pki_dir: Path) -> None:
    with linked(pki_dir, SUITE_128) as (shadow, node, identity):
        assert shadow.own_records(identity.keylog)
        assert shadow.records is not None
        record = bytearray(shadow.records.seal(b"x" * 100))
        record[40] ^= 0x20
        shadow.sock.sendall(record)
        with pytest.raises(ssl.SSLError, match=r"BAD_RECORD_MAC|bad record mac"):
            node.read_exactly(100)
    with linked(pki_dir, SUITE_128) as (shadow, node, identity):
        assert shadow.own_records(identity.keylog)
        node.write_all(b"y" * 100)
        shadow.sock.setblocking(False)
        assert receive(shadow, 100) == b"y" * 100
        # The node's next record, tampered on the way (its sealed bytes taken from OpenSSL).
        node.tls.write(b"z" * 100)
        raw = bytearray(node.outgoing.read())
        raw[-3] ^= 1
        node.sock.sendall(raw)
        with pytest.raises(RecordError, match="bad record mac"):
            receive(shadow, 100)


def test_a_peer_that_ends_mid_record_gives_the_end_and_no_byte_of_it(pki_dir: Path) -> None:
    with linked(pki_dir, SUITE_128) as (shadow, node, identity):
        assert shadow.own_records(identity.keylog)
        node.tls.write(b"whole" + b"cut" * 50)
        raw = node.outgoing.read()
        node.tls.write(b"after")  # numbered after the cut one: never opened
        node.sock.sendall(raw[: len(raw) // 2])
        node.sock.shutdown(socket.SHUT_WR)
        shadow.sock.setblocking(False)
        while True:
            try:
                assert shadow.recv() == b""
                break
            except BlockingIOError:
                assert select.select([shadow.sock], [], [], TIMEOUT)[0]
        assert shadow.eof


def test_close_notify_is_the_end_of_the_stream(pki_dir: Path) -> None:
    with linked(pki_dir, SUITE_128) as (shadow, node, identity):
        assert shadow.own_records(identity.keylog)
        node.write_all(b"last words")
        with contextlib.suppress(ssl.SSLWantReadError):
            node.tls.unwrap()  # its close_notify, then it would wait for ours
        node.sock.sendall(node.outgoing.read())
        shadow.sock.setblocking(False)
        assert receive(shadow, 10) == b"last words"
        while not shadow.eof:
            try:
                assert shadow.recv() == b""
            except BlockingIOError:
                assert select.select([shadow.sock], [], [], TIMEOUT)[0]


@pytest.mark.parametrize("how", ["tampered", "cut", "end"])
def test_the_pump_leaves_a_bad_record_or_a_cut_one_to_the_shadow(
    pki_dir: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay the native pump carries (relay_pump.c, OP_ADD_TLS), its node's side played
    here (OpenSSL, the forwarder's frames): a record changed on the way is refused (the
    stream is reset, nothing of it reaches the original's peer); a peer that ends in the
    middle of a record gives the end, and no byte of that record; the node's END in a
    record of its own, the connection left open (as a forwarder does when its process
    ends), is the end too (the pump once kept a frame's head that ended a record until a
    next record came: none did, and the home shadow of a process ended elsewhere waited)."""
    if not pump.available():
        pytest.skip("relay-pump is not built")
    monkeypatch.setattr(pump, "ENCRYPTED", True)  # on (the default) whatever the environment says
    log: list[str] = []
    selector = selectors.DefaultSelector()
    hub = RelayHub(selector, log.append)
    peer, original = socket.socketpair()
    hub.adopt(5, original.detach(), False)
    try:
        with linked(pki_dir, SUITE_128) as (shadow, node, identity):
            assert shadow.own_records(identity.keylog)
            hub.attach_relay("fd:5", "m1", shadow)
            hub.migrated("m1", NODE, {}, {}, set())

            def run(until: Callable[[], bool], what: str) -> None:
                deadline = time.monotonic() + TIMEOUT
                while not until():
                    assert time.monotonic() < deadline, what
                    for key, events in selector.select(0.01):
                        key.data(key.fileobj, events)

            run(lambda: hub.streams["fd:5"].native > 0, "the pump taking the stream")
            node.write_all(frame(forwarder.ACK, forwarder.ACK_FORMAT.pack(0)))
            node.write_all(frame(DATA, b"through the pump"))
            peer.settimeout(TIMEOUT)
            assert peer.recv(100) == b"through the pump"
            if how == "end":
                node.write_all(frame(forwarder.END, b""))
                run(lambda: getattr(hub.streams["fd:5"].relay, "eof", True), "the node's END")
                run(lambda: hub.streams["fd:5"].shut_original, "the end passed on")
                assert peer.recv(100) == b""
                return
            node.tls.write(frame(DATA, b"never seen"))
            raw = bytearray(node.outgoing.read())
            if how == "tampered":
                raw[-1] ^= 1
                node.sock.sendall(raw)
                run(lambda: "fd:5" not in hub.streams, "the stream reset")
                assert any("bad record mac" in line for line in log), log
                with contextlib.suppress(ConnectionResetError):
                    assert peer.recv(100) == b""
            else:
                node.sock.sendall(raw[: len(raw) // 2])
                node.sock.shutdown(socket.SHUT_WR)
                run(
                    lambda: hub.streams["fd:5"].relay is None or hub.streams["fd:5"].relay.eof,
                    "the relay's end",
                )
                run(lambda: hub.streams["fd:5"].shut_original, "the end passed on")
                assert peer.recv(100) == b""
    finally:
        hub.close_pump()
        for stream in list(hub.streams.values()):
            hub._close(stream, reset=True)
        peer.close()
        selector.close()
