"""What is fuzzed: each target takes arbitrary bytes and must end cleanly.

A target returns when hijack accepted the input or refused it with a
HijackError (what the CLI turns into one line and exit 1; what the daemon
logs as a refusal); anything else — another exception, a hang, a daemon
thread still running — fails it with an AssertionError. The same functions
run under hypothesis (tests/test_fuzz.py, part of `make test`) and under
atheris (tests/fuzz/run.py, `make fuzz`).

    crf_reader        the bytes as a CRF image: read_image and summarize (`hijack show`)
    node_handshake    the bytes as a peer's side of the TLS handshake, to a real daemon's
                      gate (hijack.node.gate): refused, no peer served, nothing left over
    node_client       the bytes as a daemon's side of the TLS handshake, to a mover's
                      Channel.open: refused
    node_certificate  the bytes as one of a node's certificate files (the first byte
                      picks which), loaded as a daemon or mover loads them, and as a
                      peer's certificate whose names are read (pki.certificate_names)
    node_session      a peer with a certificate of the cluster, past the handshake, then
                      sends the bytes: the first byte picks raw bytes or frames the
                      target makes (so JSON, the request and the image stream are
                      reached); served by a real NodeDaemon
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import io
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
from pathlib import Path

from hijack.errors import HijackError
from hijack.image import read_image
from hijack.image.summary import summarize
from hijack.node import daemon as node_daemon
from hijack.node import gate, pki
from hijack.node.channel import Channel, ChannelError, Kind

TIMEOUT = 5.0  # seconds any one read of a target may wait: past that, it hangs
MAX_INPUT = 64 * 1024  # bytes of an input used (all fit in a socket buffer: no deadlock)
FRAME_HEAD = struct.Struct("<BH")  # node_session framed mode: KIND, LENGTH, then the payload


def crf_reader(data: bytes) -> None:
    with contextlib.suppress(HijackError):
        summarize(read_image(io.BytesIO(data)))


@functools.cache
def certificates() -> Path:
    """A cluster made once per process: a CA, nodes "daemon" and "mover" on loopback."""
    directory = Path(tempfile.mkdtemp(prefix="hijack-fuzz-pki-"))
    atexit.register(shutil.rmtree, directory, True)  # made once, removed as the process ends
    pki.init_ca(directory)
    for name in ("daemon", "mover"):
        pki.add_node(directory, name, "127.0.0.1")
    return directory


def identity(name: str) -> pki.NodeIdentity:
    return pki.load_identity(certificates(), name)


class _Gate:
    """A real gate, run by a thread of its own, serving no one: no input may get past it."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.served: list[tuple[str, int]] = []
        self.gate = gate.Gate(
            self.listener,
            identity("daemon"),
            gate.Limits(handshake_timeout=TIMEOUT),
            lambda tls, peer: self.served.append(peer),
            lambda line: None,
        )
        threading.Thread(target=self.gate.run, daemon=True).start()


@functools.cache
def _gate() -> _Gate:
    return _Gate()


def node_handshake(data: bytes) -> None:
    door = _gate()
    address = door.listener.getsockname()[:2]
    # OSError: the gate may hang up before all is sent.
    with socket.create_connection(address, timeout=TIMEOUT) as peer, contextlib.suppress(OSError):
        peer.sendall(data[:MAX_INPUT])
        peer.shutdown(socket.SHUT_WR)
        while peer.recv(65536):  # what the gate answers, until it closes
            pass
    # Its side ends as ours does, a moment later: it must then hold nothing of ours.
    deadline = time.monotonic() + TIMEOUT
    while door.gate.pending or door.gate.per_address:
        if time.monotonic() > deadline:
            raise AssertionError("the gate still holds a connection whose peer is gone")
        time.sleep(0.001)
    if door.served:
        raise AssertionError(f"a peer without a certificate was served: {door.served}")


def node_client(data: bytes) -> None:
    client, daemon_end = _tcp_pair()
    with client, daemon_end:
        daemon_end.sendall(data[:MAX_INPUT])
        daemon_end.shutdown(socket.SHUT_WR)
        try:
            Channel.open(client, identity("mover"), "127.0.0.1:1", timeout=TIMEOUT)
        except ChannelError:
            return
        raise AssertionError("a daemon without a certificate passed the handshake")


CERTIFICATE_FILES = ("ca.crt", "revoked.crl", "nodes/mover.crt", "nodes/mover.key")


def node_certificate(data: bytes) -> None:
    body = data[1:MAX_INPUT]
    with contextlib.suppress(HijackError):
        pki.certificate_names(body)
    with tempfile.TemporaryDirectory(prefix="hijack-fuzz-") as temporary:
        directory = Path(temporary) / "pki"
        shutil.copytree(certificates(), directory)
        replaced = CERTIFICATE_FILES[data[0] % len(CERTIFICATE_FILES)] if data else "ca.crt"
        (directory / replaced).write_bytes(body)
        with contextlib.suppress(HijackError):
            pki.load_identity(directory, "mover").client_context()
        with contextlib.suppress(HijackError):
            pki.load_crl(directory)


_daemon: node_daemon.NodeDaemon | None = None


def node_session(data: bytes) -> None:
    global _daemon
    if _daemon is None:
        # Never serve()d: its listener is unused; each input gets its own connection.
        _daemon = node_daemon.NodeDaemon(("127.0.0.1", 0), identity("daemon"), gate.Limits())
    client, served = _tls_pair()
    failures: list[BaseException] = []

    def serve() -> None:
        try:
            assert _daemon is not None
            _daemon._serve_peer(served, ("fuzz", 0))
        except BaseException as exc:
            failures.append(exc)

    server_thread = threading.Thread(target=serve, daemon=True)
    server_thread.start()
    with client:
        try:
            channel = Channel(client, "daemon")
            channel.expect("welcome")
            _send_session(channel, data[:MAX_INPUT])
            socket.socket.shutdown(client, socket.SHUT_WR)
            while client.recv(65536):  # its answers, until it hangs up
                pass
        except (HijackError, OSError):
            pass  # the daemon may hang up on us at any point: that is a refusal
        server_thread.join(TIMEOUT * 2)
    assert not server_thread.is_alive(), "the daemon still serves a finished peer"
    if failures:
        raise AssertionError(f"the daemon failed with {failures[0]!r}") from failures[0]


def _send_session(channel: Channel, data: bytes) -> None:
    if not data or data[0] % 2 == 0:
        channel.sock.sendall(data[1:])
        return
    rest = memoryview(data)[1:]
    while len(rest) >= FRAME_HEAD.size:
        kind, length = FRAME_HEAD.unpack(rest[: FRAME_HEAD.size])
        payload = rest[FRAME_HEAD.size : FRAME_HEAD.size + length]
        rest = rest[FRAME_HEAD.size + length :]
        # Kinds past DATA_END are sent as they are: the daemon must refuse them too.
        channel.send_frame(kind % (Kind.DATA_END + 2), payload)


def _tls_pair() -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """(mover's end, daemon's end) of a TLS connection with the cluster's certificates."""
    client, server = _tcp_pair()
    accepted: list[ssl.SSLSocket | BaseException] = []

    def accept() -> None:
        try:
            context = identity("daemon").server_context()
            accepted.append(pki.handshake(server, context, server=True, deadline=TIMEOUT))
        except BaseException as exc:
            accepted.append(exc)

    thread = threading.Thread(target=accept)
    thread.start()
    mover = pki.handshake(
        client, identity("mover").client_context(), server=False, deadline=TIMEOUT
    )
    thread.join()
    if isinstance(accepted[0], BaseException):
        raise accepted[0]
    for sock in (mover, accepted[0]):
        sock.settimeout(TIMEOUT)
    return mover, accepted[0]


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets over loopback, reads bounded by TIMEOUT."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        first = socket.create_connection(listener.getsockname()[:2])
        second, _ = listener.accept()
    for sock in (first, second):
        sock.settimeout(TIMEOUT)
    return first, second
