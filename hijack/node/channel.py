"""An authenticated channel between hijack nodes, over one TCP connection.

Handshake (docs/protocol.md, "Node channel"), with K the cluster key:

    client -> server   HELLO {node, nonce_c}
    server -> client   {node, nonce_s, proof_s = HMAC(K, "server" nonce_c nonce_s)}
    client -> server   {proof_c = HMAC(K, "client" nonce_s nonce_c)}

Each side proves it holds K without sending it; a peer with another key (or
none) is refused at its first proof. Both then derive a session key
S = HMAC(K, "session" nonce_c nonce_s), and every later frame carries
HMAC(S, direction seq kind length payload): a frame changed, dropped, replayed
or reordered on the way fails its check, so the image stream is protected end
to end.

    frame ::= KIND:u8 LENGTH:u32 PAYLOAD MAC:32
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import socket
import struct
from pathlib import Path
from typing import Any

from hijack.errors import HijackError
from hijack.registry import state_dir

MAC_SIZE = 32
NONCE_SIZE = 32
HEAD = struct.Struct("<BI")
MAX_FRAME = 16 * 1024 * 1024
DATA_FRAME = 1024 * 1024  # image bytes per DATA frame
PROTOCOL_VERSION = 1
MAX_ERROR = 1000  # characters of a peer's error message we repeat
DRAIN_CHUNK = 1 << 16  # bytes read at a time from a refused peer, and dropped


class Kind:
    HANDSHAKE = 0  # before the session key exists: not MACed
    MESSAGE = 1  # one JSON object
    DATA = 2  # a piece of the image stream
    DATA_END = 3  # the image stream is complete


class ChannelError(HijackError):
    """The peer is not who it claims, broke the protocol, or went away."""


def cluster_key_path() -> Path:
    return Path(os.environ.get("HIJACK_CLUSTER_KEY") or state_dir() / "cluster.key")


def load_cluster_key(path: Path | None = None) -> bytes:
    """The cluster key: hex in a file only root can read (`hijack cluster init` writes it)."""
    path = path or cluster_key_path()
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise HijackError(
            f"no cluster key at {path} ({exc.strerror}); create one with `hijack cluster init`"
        ) from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise HijackError(f"the cluster key in {path} is not hex") from None
    if len(key) < 16:
        raise HijackError(f"the cluster key in {path} is too short (at least 16 bytes)")
    return key


def create_cluster_key(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32) + "\n")


def _proof(key: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.digest(key, role + first + second, "sha256")


class Channel:
    """Authenticated frames over a connected socket. Not thread-safe: one user at a time."""

    def __init__(self, sock: socket.socket, session_key: bytes, is_client: bool, peer: str) -> None:
        self.sock = sock
        self.peer = peer  # the peer's node name
        self._key = session_key
        self._send_direction = b"C" if is_client else b"S"
        self._receive_direction = b"S" if is_client else b"C"
        self._sent = 0
        self._received = 0

    # -- establishing -------------------------------------------------------------

    @classmethod
    def connect(
        cls, address: tuple[str, int], key: bytes, node: str, timeout: float = 10.0
    ) -> Channel:
        host, port = address
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise ChannelError(f"cannot reach node {host}:{port}: {exc.strerror or exc}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            sock.close()
            raise ChannelError(f"cannot reach node {host}:{port}") from None
        return cls.open(sock, key, node, f"{host}:{port}")

    @classmethod
    def open(cls, sock: socket.socket, key: bytes, node: str, where: str) -> Channel:
        """Client side of the handshake on a connected socket (closed if it fails)."""
        try:
            nonce_c = secrets.token_bytes(NONCE_SIZE)
            _send_plain(sock, {"hello": PROTOCOL_VERSION, "node": node, "nonce": nonce_c.hex()})
            answer = _receive_plain(sock)
            nonce_s = bytes.fromhex(str(answer.get("nonce", "")))
            expected = _proof(key, b"server", nonce_c, nonce_s)
            if not hmac.compare_digest(bytes.fromhex(str(answer.get("proof", ""))), expected):
                raise ChannelError(f"node {where} does not hold our cluster key")
            _send_plain(sock, {"proof": _proof(key, b"client", nonce_s, nonce_c).hex()})
            session = _proof(key, b"session", nonce_c, nonce_s)
            channel = cls(sock, session, True, str(answer.get("node", where)))
            channel.expect("welcome")
            return channel
        except (OSError, ValueError) as exc:
            sock.close()
            raise ChannelError(f"handshake with {where} failed: {exc}") from None
        except BaseException:
            sock.close()
            raise

    @classmethod
    def accept(cls, sock: socket.socket, key: bytes, node: str) -> Channel:
        """Server side of the handshake; raises ChannelError for a peer without the key."""
        hello = _receive_plain(sock)
        if hello.get("hello") != PROTOCOL_VERSION:
            raise ChannelError(f"not a hijack node (or another protocol version): {hello!r:.80}")
        try:
            nonce_c = bytes.fromhex(str(hello.get("nonce", "")))
        except ValueError:
            raise ChannelError("malformed hello") from None
        nonce_s = secrets.token_bytes(NONCE_SIZE)
        proof = _proof(key, b"server", nonce_c, nonce_s).hex()
        _send_plain(sock, {"node": node, "nonce": nonce_s.hex(), "proof": proof})
        answer = _receive_plain(sock)
        expected = _proof(key, b"client", nonce_s, nonce_c)
        try:
            given = bytes.fromhex(str(answer.get("proof", "")))
        except ValueError:
            given = b""
        if not hmac.compare_digest(given, expected):
            raise ChannelError(f"peer {hello.get('node')!r} does not hold the cluster key")
        session = _proof(key, b"session", nonce_c, nonce_s)
        channel = cls(sock, session, False, str(hello.get("node", "?")))
        channel.send({"welcome": True})
        return channel

    def close(self) -> None:
        self.sock.close()

    # -- frames -----------------------------------------------------------------

    def _mac(
        self, direction: bytes, sequence: int, head: bytes, payload: bytes | memoryview
    ) -> bytes:
        mac = hmac.new(self._key, direction + sequence.to_bytes(8, "little") + head, "sha256")
        mac.update(payload)
        return mac.digest()

    def send_frame(self, kind: int, payload: bytes | memoryview) -> None:
        head = HEAD.pack(kind, len(payload))
        mac = self._mac(self._send_direction, self._sent, head, payload)
        self._sent += 1
        try:
            self.sock.sendall(head)
            self.sock.sendall(payload)
            self.sock.sendall(mac)
        except OSError as exc:
            raise ChannelError(f"connection to {self.peer} lost: {exc.strerror or exc}") from None

    def receive_frame(self) -> tuple[int, bytes]:
        head = self._read_exactly(HEAD.size)
        kind, length = HEAD.unpack(head)
        if length > MAX_FRAME:
            raise ChannelError(f"{self.peer} sent a frame of {length} bytes")
        payload = self._read_exactly(length)
        mac = self._read_exactly(MAC_SIZE)
        expected = self._mac(self._receive_direction, self._received, head, payload)
        if not hmac.compare_digest(mac, expected):
            raise ChannelError(f"a frame from {self.peer} failed its integrity check")
        self._received += 1
        return kind, payload

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


def _send_plain(sock: socket.socket, message: dict[str, Any]) -> None:
    payload = json.dumps(message).encode()
    sock.sendall(HEAD.pack(Kind.HANDSHAKE, len(payload)) + payload)


def _receive_plain(sock: socket.socket) -> dict[str, Any]:
    kind, length = HEAD.unpack(_read_exactly(sock, HEAD.size, "peer"))
    if kind != Kind.HANDSHAKE or length > 4096:
        raise ChannelError("not a hijack handshake")
    return _decode(_read_exactly(sock, length, "peer"), "peer")


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
            raise ChannelError(f"connection to {peer} lost: {exc.strerror or exc}") from None
        if not got:
            raise ChannelError(f"{peer} closed the connection")
        done += got
    return bytes(buffer)
