"""The channel between hijack nodes: frames over TLS 1.3, mutually authenticated.

Both ends present a node certificate of the cluster's CA (hijack.node.pki):
the daemon requires the client's, checks it chains to ca.crt, is in date
and not on revoked.crl; the client checks the same of the daemon's and that
it names the host it dialed (or the node it expects). Once the handshake is
done the daemon says `welcome`; from then on, frames (docs/protocol.md,
"Node channel"):

    frame ::= KIND:u8 LENGTH:u32 PAYLOAD

TLS gives them confidentiality and integrity (a record changed, dropped,
replayed or reordered ends the connection), so a frame carries no MAC of
its own any more. The channel's peer is the node its certificate names.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import struct
from typing import Any

from hijack.errors import HijackError
from hijack.node import pki

HEAD = struct.Struct("<BI")
MAX_FRAME = 16 * 1024 * 1024
DATA_FRAME = 1024 * 1024  # image bytes per DATA frame
# A frame this small goes out in one TLS record with its head; a larger one is
# sent from where it lies (a memoryview of the image), the head on its own.
JOINED_FRAME = 64 * 1024
PROTOCOL_VERSION = 2  # 1: the shared cluster key's HMAC handshake and MACed frames
MAX_ERROR = 1000  # characters of a peer's error message we repeat
DRAIN_CHUNK = 1 << 16  # bytes read at a time from a refused peer, and dropped


class Kind:
    MESSAGE = 1  # one JSON object
    DATA = 2  # a piece of the image stream
    DATA_END = 3  # the image stream is complete


class ChannelError(HijackError):
    """The peer is not who it claims, broke the protocol, or went away."""


class Channel:
    """Frames over a TLS connection with another node. Not thread-safe: one user at a time."""

    def __init__(self, sock: ssl.SSLSocket, peer: str) -> None:
        self.sock = sock
        self.peer = peer  # the peer's node name, as its verified certificate gives it

    # -- establishing -------------------------------------------------------------

    @classmethod
    def connect(
        cls,
        address: tuple[str, int],
        identity: pki.NodeIdentity,
        timeout: float = 10.0,
        expect: str | None = None,
    ) -> Channel:
        """Connect to the daemon at ADDRESS as this node.

        Its certificate must name the host dialed, or with `expect` be node
        EXPECT's (asking again a node whose name we know).
        """
        host, port = address
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ChannelError(f"cannot reach node {host}:{port}: {exc.strerror or exc}") from None
        try:
            # Small frames (prepared/commit) must not wait on Nagle.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            raise ChannelError(f"cannot reach node {host}:{port}") from None
        return cls.open(sock, identity, f"{host}:{port}", expect=expect, timeout=timeout)

    @classmethod
    def open(
        cls,
        sock: socket.socket,
        identity: pki.NodeIdentity,
        where: str,
        *,
        expect: str | None = None,
        timeout: float = 10.0,
    ) -> Channel:
        """Client side of the handshake on a connected socket (closed if it fails)."""
        try:
            tls = pki.handshake(sock, identity.client_context(), server=False, deadline=timeout)
        except HijackError as exc:
            sock.close()
            raise ChannelError(f"node {where}: {exc}") from None
        try:
            if expect is not None:
                pki.expect_peer(tls, expect)
            else:
                pki.names_host(tls, where.rpartition(":")[0])
            channel = cls(tls, pki.peer_name(tls))
            # Our certificate is checked by the daemon after our side of the
            # handshake is over: its refusal arrives here, as an alert.
            welcome = channel.expect("welcome")
            if welcome["welcome"] != PROTOCOL_VERSION:
                raise ChannelError(
                    f"node {where} speaks node protocol {welcome['welcome']!r:.20},"
                    f" not {PROTOCOL_VERSION}"
                )
            return channel
        except HijackError as exc:
            tls.close()
            raise ChannelError(f"node {where}: {exc}") from None
        except BaseException:
            tls.close()
            raise

    @classmethod
    def accept(cls, tls: ssl.SSLSocket) -> Channel:
        """Server side, once the TLS handshake is done (hijack.node.gate): say welcome."""
        channel = cls(tls, pki.peer_name(tls))
        channel.send({"welcome": PROTOCOL_VERSION})
        return channel

    def close(self) -> None:
        self.sock.close()

    def wake(self) -> None:
        """Make a read blocked on this channel in another thread return (an error)."""
        # The plain socket's shutdown: SSLSocket's would drop its TLS state under
        # the reader's feet.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)

    # -- frames -----------------------------------------------------------------

    def send_frame(self, kind: int, payload: bytes | memoryview) -> None:
        head = HEAD.pack(kind, len(payload))
        try:
            if len(payload) < JOINED_FRAME:
                self.sock.sendall(head + payload)
            else:
                self.sock.sendall(head)
                self.sock.sendall(payload)
        except OSError as exc:
            raise ChannelError(
                f"connection to {self.peer} lost: {pki.describe_tls_error(exc)}"
            ) from None

    def receive_frame(self) -> tuple[int, bytes]:
        head = self._read_exactly(HEAD.size)
        kind, length = HEAD.unpack(head)
        if length > MAX_FRAME:
            raise ChannelError(f"{self.peer} sent a frame of {length} bytes")
        if kind not in (Kind.MESSAGE, Kind.DATA, Kind.DATA_END):
            raise ChannelError(f"{self.peer} sent a frame of unknown kind {kind}")
        return kind, self._read_exactly(length)

    def _read_exactly(self, size: int) -> bytes:
        return _read_exactly(self.sock, size, self.peer)

    # -- messages ---------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        self.send_frame(Kind.MESSAGE, json.dumps(message, separators=(",", ":")).encode())

    def receive(self) -> dict[str, Any]:
        kind, payload = self.receive_frame()
        if kind != Kind.MESSAGE:
            raise ChannelError(f"{self.peer} sent a data frame where a message was due")
        return _decode(payload, self.peer)

    def refuse(self, reason: str) -> None:
        """Answer `error: reason`, then drop what the peer still sends until it closes.

        A peer in the middle of sending (a pre-copy round) reads the answer only
        once it has sent all: closing before that resets the connection, and the
        peer sees "connection reset" where the reason was due.
        """
        # ChannelError, OSError: gone, or silent past the socket's timeout.
        with contextlib.suppress(ChannelError, OSError):
            self.send({"error": reason})
            while self.sock.recv(DRAIN_CHUNK):
                pass

    def answer(self, message: dict[str, Any] | bytes) -> dict[str, Any]:
        """`message` (or a MESSAGE frame's payload) as it is, unless it is an `error`: raised."""
        if isinstance(message, bytes):
            message = _decode(message, self.peer)
        if "error" in message:
            # Shown as one line, whatever the peer put in it.
            reason = " ".join(str(message["error"]).split())[:MAX_ERROR]
            raise HijackError(f"{self.peer}: {reason}")
        return message

    def expect(self, field: str) -> dict[str, Any]:
        """The next message, which must have `field`; an `error` from the peer is raised."""
        message = self.answer(self.receive())
        if field not in message:
            raise ChannelError(f"{self.peer} answered without {field!r}: {message!r:.120}")
        return message


class DataReader:
    """The DATA frames of a channel as a read-only byte stream, ending at DATA_END."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._buffer = memoryview(b"")
        self._ended = False
        self.received = 0

    def read(self, size: int = -1) -> bytes:
        chunks = []
        wanted = size if size >= 0 else 1 << 62
        while wanted > 0:
            if not self._buffer and (self._ended or not self._fill()):
                break
            piece = self._buffer[:wanted]
            self._buffer = self._buffer[len(piece) :]
            chunks.append(bytes(piece))
            wanted -= len(piece)
        return b"".join(chunks)

    def drain(self) -> None:
        """Read and drop the rest of the stream, up to DATA_END (each frame still checked)."""
        while not self._ended and self._fill():
            pass
        self._buffer = memoryview(b"")

    def _fill(self) -> bool:
        kind, payload = self.channel.receive_frame()
        if kind == Kind.DATA_END:
            self._ended = True
            return False
        if kind != Kind.DATA:
            raise ChannelError(f"{self.channel.peer} sent a message inside the image stream")
        self._buffer = memoryview(payload)
        self.received += len(payload)
        return True


class DataWriter:
    """A write-only byte stream sent as DATA frames (buffered to DATA_FRAME bytes)."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._pending = bytearray()
        self.sent = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data).cast("B")
        if not self._pending and len(view) >= DATA_FRAME:
            self._send(view)  # large writes go out as they are, with no copy
        else:
            self._pending += view
            if len(self._pending) >= DATA_FRAME:
                self.flush()
        return len(view)

    def flush(self) -> None:
        if self._pending:
            self._send(memoryview(self._pending))
            self._pending = bytearray()

    def _send(self, view: memoryview) -> None:
        for start in range(0, len(view), MAX_FRAME):
            piece = view[start : start + MAX_FRAME]
            self.channel.send_frame(Kind.DATA, piece)
            self.sent += len(piece)

    def close(self) -> None:
        self.flush()
        self.channel.send_frame(Kind.DATA_END, b"")


def _decode(payload: bytes, peer: str) -> dict[str, Any]:
    try:
        message = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        # RecursionError: arrays or objects nested a thousand deep.
        raise ChannelError(f"{peer} sent a malformed message") from None
    if not isinstance(message, dict):
        raise ChannelError(f"{peer} sent a malformed message")
    return message


def _read_exactly(sock: socket.socket, size: int, peer: str) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    done = 0
    while done < size:
        try:
            got = sock.recv_into(view[done:])
        except TimeoutError:
            raise ChannelError(f"{peer} stopped answering") from None
        except OSError as exc:
            raise ChannelError(
                f"connection to {peer} lost: {pki.describe_tls_error(exc)}"
            ) from None
        if not got:
            raise ChannelError(f"{peer} closed the connection")
        done += got
    return bytes(buffer)
