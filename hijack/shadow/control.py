"""The control protocol of shadows (and, later, node daemons): JSON lines over a unix socket.

Each request is one JSON object on one line with an "op" field; each answer is
one JSON object on one line with "ok" true or false ("error" says why when
false). docs/protocol.md lists the operations.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from hijack.errors import ShadowError
from hijack.shadow import relay_link

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
# A shadow at rest (hijack.shadow.holder) answers most requests only after a Python
# start: 0.1 s on an idle machine, seconds under load. A dead shadow is refused at once.
REQUEST_TIMEOUT = 15.0


def request(
    path: str, message: Message, timeout: float = REQUEST_TIMEOUT, fds: Sequence[int] = ()
) -> Message:
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


def hold(
    path: str, message: Message, timeout: float = REQUEST_TIMEOUT
) -> tuple[socket.socket, Message]:
    """request(), on a connection kept open after the answer: the shadow watches it, and
    undoes what the request began when it closes without the step that ends it (a socket
    swap's `write`: its coordinator died). The caller closes it when done."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        with unix_address(path) as address:
            sock.connect(address)
        sock.sendall(encode(message))
        answer = _read_line(sock)
    except TimeoutError:
        sock.close()
        raise ShadowError(f"no answer from {path} within {timeout:g} s") from None
    except OSError as exc:
        sock.close()
        raise ShadowError(f"cannot reach control socket {path}: {exc.strerror or exc}") from None
    reply = decode(answer)
    if not reply.get("ok"):
        sock.close()
        raise ShadowError(f"{message.get('op')} refused: {reply.get('error', 'no reason given')}")
    return sock, reply


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
# TLS 1.3 first (hijack.shadow.relay_link: the shadow's pinned certificate, the
# node's cluster certificate), then inside it:
#   shadow -> client   NONCE:16
#   client -> shadow   HMAC-SHA256(token, NONCE):32 LENGTH:u32 HEADER:LENGTH (JSON)
#   header {"kind": "relay", "stream": ID, "move": ID, "mode": "tls"|"plain"
#           [, "terminal": PTY][, "ends": [PROCESS END, ITS PEER]]}
#                                                       -> shadow answers RELAY_ACCEPTED,
#       then the connection carries the stream's bytes (in TLS, or raw for "plain");
#   header {"kind": "listener", "stream": ID, "move": ID, "listener": "ip:port"}
#                                                       -> shadow answers RELAY_ACCEPTED,
#       then sends a line {"accept": "acc:K"} for each client to connect there;
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


@dataclass(frozen=True)
class HomeEndpoint:
    """How a node reaches a migrant's home shadow (the move's `home`, the registry's row)."""

    address: str  # "ip:port" of the shadow's TCP endpoint
    token: bytes  # the migrant's secret
    fingerprint: str  # SHA-256 of the shadow's certificate (hex)
    plain: bool = False  # relays leave TLS after the handshake (`hijack move --plain-relays`)


def remote_request(
    home: HomeEndpoint,
    message: Message,
    timeout: float = 10.0,
    proved: relay_link.TlsLink | None = None,
) -> Message:
    """A request to the shadow at `home` (another node's view of it), inside TLS; on
    `proved` (prove_link's, fresh: the shadow waits HANDSHAKE_TIMEOUT for its header) if
    given, else on a new connection."""
    header = {"kind": "control", "request": message}
    if proved is None:
        link = relay_link.connect(home.address, home.fingerprint, home.token, header, timeout)
    else:
        link = proved
        link.sock.settimeout(timeout)
        relay_link.send_header(link, header, home.address)
    with link.sock:
        try:
            reply = relay_link.read_answer(link)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ShadowError(f"the home shadow at {home.address} did not answer: {exc}") from None
    if not reply.get("ok"):
        raise ShadowError(f"{message.get('op')} refused: {reply.get('error', 'no reason given')}")
    return reply


def prove_link(home: HomeEndpoint, timeout: float = 10.0) -> relay_link.TlsLink:
    """A connection to the shadow at `home`, its TLS handshake and our proof of the token
    done: a later remote_request on it (`proved`) spends none of that time."""
    return relay_link.connect_proved(home.address, home.fingerprint, home.token, timeout)


def open_link(home: HomeEndpoint, header: Message, timeout: float = 10.0) -> relay_link.TlsLink:
    """A relay or listener connection to the home shadow, accepted, still inside TLS."""
    link = relay_link.connect(home.address, home.fingerprint, home.token, header, timeout)
    try:
        bound_backoff(link.sock)
        if link.read_exactly(len(RELAY_ACCEPTED)) != RELAY_ACCEPTED:
            raise ShadowError(f"the home shadow refused a relay for {header.get('stream')}")
    except (OSError, ShadowError, ssl.SSLError) as exc:
        link.sock.close()
        raise ShadowError(f"the home shadow refused a relay: {exc}") from None
    link.sock.settimeout(None)
    return link


def open_plain_relay(
    home: HomeEndpoint, stream: str, move: str, timeout: float = 10.0, terminal: str = ""
) -> socket.socket:
    """A relay connection for `stream` that has left TLS: raw bytes both ways, as the process
    needs its descriptor to be (`terminal`: the pty at the node that stands for it)."""
    header = {"kind": "relay", "stream": stream, "move": move, "mode": relay_link.PLAIN}
    if terminal:
        header["terminal"] = terminal
    return open_link(home, header, timeout).sock
