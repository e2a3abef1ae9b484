"""What is fuzzed: each target takes arbitrary bytes and must end cleanly.

A target returns when hijack accepted the input or refused it with a
HijackError (what the CLI turns into one line and exit 1; what the daemon
logs as a refusal); anything else — another exception, a hang, a daemon
thread still running — fails it with an AssertionError. The same functions
run under hypothesis (tests/test_fuzz.py, part of `make test`) and under
atheris (tests/fuzz/run.py, `make fuzz`).

    crf_reader      the bytes as a CRF image: read_image and summarize (`hijack show`)
    node_handshake  the bytes as a peer's side of the handshake, to a daemon's Channel.accept
    node_client     the bytes as a daemon's answers, to a mover's Channel.open
    node_session    a peer that passed the handshake, then sends the bytes: the
                    first byte picks raw bytes (checked by MAC, so refused at once)
                    or frames the target MACs itself (so JSON, the request and the
                    image stream are reached); served by a real NodeDaemon
    shadow_relay    the bytes as a stranger's side of a relay connection, to a home
                    shadow's relay_link.accept (TLS first: none gets past it)
"""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import tempfile
import threading
from pathlib import Path

from hijack.errors import HijackError, ShadowError
from hijack.image import read_image
from hijack.image.summary import summarize
from hijack.node import daemon as node_daemon
from hijack.node import pki
from hijack.node.channel import Channel, ChannelError, Kind
from hijack.shadow import relay_link
from hijack.shadow.relay_link import ShadowIdentity, cluster_trust

KEY = bytes(range(32))
TIMEOUT = 5.0  # seconds any one read of a target may wait: past that, it hangs
MAX_INPUT = 64 * 1024  # bytes of an input used (all fit in a socket buffer: no deadlock)
FRAME_HEAD = struct.Struct("<BH")  # node_session framed mode: KIND, LENGTH, then the payload


def crf_reader(data: bytes) -> None:
    with contextlib.suppress(HijackError):
        summarize(read_image(io.BytesIO(data)))


def node_handshake(data: bytes) -> None:
    server, peer = _tcp_pair()
    with server, peer:
        peer.sendall(data[:MAX_INPUT])
        peer.shutdown(socket.SHUT_WR)
        try:
            Channel.accept(server, KEY, "fuzz")
        except ChannelError:
            return
        raise AssertionError("a peer without the key passed the handshake")


def node_client(data: bytes) -> None:
    client, daemon_end = _tcp_pair()
    with client, daemon_end:
        daemon_end.sendall(data[:MAX_INPUT])
        daemon_end.shutdown(socket.SHUT_WR)
        try:
            Channel.open(client, KEY, "fuzz", "fuzzed daemon")
        except ChannelError:
            return
        raise AssertionError("a daemon without the key passed the handshake")


_daemon: node_daemon.NodeDaemon | None = None


def node_session(data: bytes) -> None:
    global _daemon
    if _daemon is None:
        # Never serve()d: its listener is unused; each input gets its own connection.
        _daemon = node_daemon.NodeDaemon(("127.0.0.1", 0), KEY)
    client, served = _tcp_pair()
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
            channel = Channel.open(client, KEY, "fuzz", "the daemon")
            _send_session(channel, data[:MAX_INPUT])
            client.shutdown(socket.SHUT_WR)
            while client.recv(65536):  # its answers, until it hangs up
                pass
        except (ChannelError, OSError):
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


_SHADOW: ShadowIdentity | None = None


def shadow_relay(data: bytes) -> None:
    global _SHADOW
    if _SHADOW is None:  # made once: a key and a CA per input would be most of the time
        with tempfile.TemporaryDirectory() as directory:
            pki.init_ca(Path(directory))
            _SHADOW = ShadowIdentity()
            _SHADOW.trust(cluster_trust(Path(directory)))
    server, peer = _tcp_pair()
    with server, peer:
        peer.sendall(data[:MAX_INPUT])
        peer.shutdown(socket.SHUT_WR)
        server.settimeout(TIMEOUT)
        try:
            relay_link.accept(server, _SHADOW, KEY)
        except (ShadowError, OSError):  # ssl.SSLError is an OSError
            return
        raise AssertionError("a peer without a certificate passed the relay handshake")


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected TCP sockets over loopback, reads bounded by TIMEOUT."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        first = socket.create_connection(listener.getsockname()[:2])
        second, _ = listener.accept()
    for sock in (first, second):
        sock.settimeout(TIMEOUT)
    return first, second
