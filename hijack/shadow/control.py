"""The control protocol of shadows (and, later, node daemons): JSON lines over a unix socket.

Each request is one JSON object on one line with an "op" field; each answer is
one JSON object on one line with "ok" true or false ("error" says why when
false). docs/protocol.md lists the operations.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import socket
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hijack.errors import ShadowError

Message = dict[str, Any]
MAX_LINE = 1 << 20  # a control answer larger than this is a broken peer
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 for the terminating NUL


@contextmanager
def unix_address(path: str) -> Iterator[str]:
    """An address for `path` that fits in sun_path.

    A long path (a deep state directory) is reached through an O_PATH
    descriptor on its directory: /proc/self/fd/N/name is short, and bind()
    and connect() resolve it to the same file.
    """
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield path
        return
    directory = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{directory}/{os.path.basename(path)}"
    finally:
        os.close(directory)


def encode(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> Message:
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        # RecursionError: arrays or objects nested a thousand deep.
        raise ShadowError(f"malformed control message: {exc}") from None
    if not isinstance(message, dict):
        raise ShadowError("malformed control message: not an object")
    return message


MAX_FDS = 250  # descriptors passed with one request (SCM_MAX_FD is 253)


def request(path: str, message: Message, timeout: float = 3.0, fds: Sequence[int] = ()) -> Message:
    """Send one request, with `fds` attached (SCM_RIGHTS), to `path`; return the answer.

    Raises ShadowError when the socket cannot be reached, the peer does not
    answer within `timeout`, or it answers with ok=false.
    """
    if len(fds) > MAX_FDS:
        raise ShadowError(f"{len(fds)} descriptors in one request; at most {MAX_FDS}")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(timeout)
            with unix_address(path) as address:
                sock.connect(address)
            data = encode(message)
            sent = socket.send_fds(sock, [data], list(fds)) if fds else 0
            if sent < len(data):
                # Never an empty send: the shadow may have answered and closed
                # already, and sending nothing to a closed socket fails (EPIPE).
                sock.sendall(data[sent:])
            answer = _read_line(sock)
    except TimeoutError:
        raise ShadowError(f"no answer from {path} within {timeout:g} s") from None
    except OSError as exc:
        raise ShadowError(f"cannot reach control socket {path}: {exc.strerror or exc}") from None
    reply = decode(answer)
    if not reply.get("ok"):
        raise ShadowError(f"{message.get('op')} refused: {reply.get('error', 'no reason given')}")
    return reply


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a unix socket (SO_PEERCRED)."""
    credentials = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", credentials)
    return int(uid)


def receive(sock: socket.socket) -> tuple[Message, list[int]]:
    """One request and the descriptors that came with it (the server side of request())."""
    first, fds, _flags, _address = socket.recv_fds(sock, MAX_LINE, MAX_FDS)
    try:
        if not first:
            raise ShadowError("empty control request")
        line = first if b"\n" in first else first + _read_line(sock)
        return decode(line.split(b"\n", 1)[0]), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ShadowError("control socket closed before answering")
        chunks.append(chunk)
        size += len(chunk)
        if b"\n" in chunk:
            return b"".join(chunks).split(b"\n", 1)[0]
        if size > MAX_LINE:
            raise ShadowError("control answer too long")


# -- the shadow's TCP endpoint: relays and requests from other nodes ----------------
#
#   shadow -> client   NONCE:16
#   client -> shadow   HMAC-SHA256(token, NONCE):32 LENGTH:u32 HEADER:LENGTH (JSON)
#   header {"kind": "relay", "stream": ID, "move": ID[, "terminal": PTY]}
#                                                       -> shadow answers RELAY_ACCEPTED,
#       then the connection carries the stream's raw bytes;
#   header {"kind": "control", "request": {...}}       -> shadow answers LENGTH:u32 JSON.
# The token is the migrant's own secret, given to the shadow by the first move
# and to each node it goes to inside the authenticated move channel.

RELAY_ACCEPTED = b"RLY1"
TCP_RTO_MAX_MS = 44  # <linux/tcp.h>, Linux 6.14
RELAY_RTO_MAX_MS = 1000  # the least the kernel takes
# Retried a second apart, the kernel's 15 tries (tcp_retries2) would give a relay
# up after 15 s of outage; with its back-off they last about 15 minutes: kept so.
RELAY_GIVE_UP_MS = 15 * 60 * 1000


def bound_backoff(sock: socket.socket) -> None:
    """Retransmit at most RELAY_RTO_MAX_MS apart on `sock` (a relay, or a connection that
    stands for one).

    By default TCP doubles the wait after each lost try, up to 2 minutes:
    bytes sent while a link was down for 20 s would wait up to 13 s more
    once it is back (an in-doubt move settled by `hijack recover`, a
    partition healed). Capped, they go within a second; RELAY_GIVE_UP_MS
    keeps the time a relay survives an outage. Older kernels refuse the
    option and keep their back-off.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, TCP_RTO_MAX_MS, RELAY_RTO_MAX_MS)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, RELAY_GIVE_UP_MS)


_LENGTH = struct.Struct("<I")
# A `migrated` request carries the unread bytes of every stream (base64): up to a
# socket receive buffer each. Only a peer that proved the token gets this far.
HEADER_LIMIT = 256 << 20


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ShadowError("the shadow's peer closed the connection")
        data += chunk
    return bytes(data)


def server_handshake(sock: socket.socket, token: bytes) -> Message:
    nonce = secrets.token_bytes(16)
    sock.sendall(nonce)
    proof = _exactly(sock, 32)
    if not token or not hmac.compare_digest(proof, hmac.digest(token, nonce, "sha256")):
        raise ShadowError("wrong token")
    (length,) = _LENGTH.unpack(_exactly(sock, _LENGTH.size))
    if length > HEADER_LIMIT:
        raise ShadowError("header too long")
    return decode(_exactly(sock, length))


def send_framed(sock: socket.socket, message: Message) -> None:
    payload = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(_LENGTH.pack(len(payload)) + payload)


def _client(address: str, token: bytes, header: Message, timeout: float) -> socket.socket:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ShadowError(f"no address of the home shadow to reach (have {address!r})")
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError as exc:
        raise ShadowError(
            f"cannot reach the home shadow at {address}: {exc.strerror or exc}"
        ) from None
    bound_backoff(sock)
    try:
        nonce = _exactly(sock, 16)
        payload = json.dumps(header, separators=(",", ":")).encode()
        sock.sendall(hmac.digest(token, nonce, "sha256") + _LENGTH.pack(len(payload)) + payload)
    except (OSError, ShadowError) as exc:
        sock.close()
        raise ShadowError(f"handshake with the home shadow at {address} failed: {exc}") from None
    return sock


def remote_request(address: str, token: bytes, message: Message, timeout: float = 10.0) -> Message:
    """A request to the shadow at `address` (another node's view of it)."""
    with _client(address, token, {"kind": "control", "request": message}, timeout) as sock:
        try:
            (length,) = _LENGTH.unpack(_exactly(sock, _LENGTH.size))
            reply = decode(_exactly(sock, length))
        except OSError as exc:
            raise ShadowError(f"the home shadow at {address} did not answer: {exc}") from None
    if not reply.get("ok"):
        raise ShadowError(f"{message.get('op')} refused: {reply.get('error', 'no reason given')}")
    return reply


def open_relay(
    address: str, token: bytes, stream: str, move: str, timeout: float = 10.0, terminal: str = ""
) -> socket.socket:
    """A relay connection to the home shadow for `stream`, ready to carry raw bytes.

    `terminal`: the pty at the node that stands for the stream (a terminal).
    """
    header = {"kind": "relay", "stream": stream, "move": move}
    if terminal:
        header["terminal"] = terminal
    sock = _client(address, token, header, timeout)
    try:
        if _exactly(sock, len(RELAY_ACCEPTED)) != RELAY_ACCEPTED:
            raise ShadowError(f"the home shadow refused a relay for {stream}")
    except (OSError, ShadowError):
        sock.close()
        raise
    sock.settimeout(None)
    return sock
