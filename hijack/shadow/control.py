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
import threading
import time
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


# Seconds a link proved ahead (LinksAhead) is used for: the shadow drops one whose header
# has not come within its HANDSHAKE_TIMEOUT (hijack.shadow.door: 5 s), as HomeShadow's.
AHEAD_FRESH = 2.5
# Seconds a relay waits for links still being proved ahead, before it makes its own.
AHEAD_WAIT = 5.0
AHEAD_MAX = 32  # links proved ahead for one move; its other relays make their own


class LinksAhead:
    """Connections to home shadows proved (TLS handshake, the token's proof) ahead of the
    relays a move makes while its process is frozen: a node's daemon or forwarder proves
    them as the mover says the freeze comes (the `links` message, docs/protocol.md), and
    open_link takes one instead of a handshake of its own (~5 ms of CPU each, in Python on
    both sides: the relays of a server with a few clients were most of a destination's
    freeze before its image came). Best effort: a relay finding none fresh connects as
    before; the unused are closed once stale (the shadow forgets them: PeerClosed)."""

    def __init__(self) -> None:
        self.ready = threading.Condition()
        self.links: dict[tuple[str, str], list[tuple[relay_link.TlsLink, float]]] = {}
        self.proving: dict[tuple[str, str], int] = {}  # links being made, by shadow

    def prove(self, home: HomeEndpoint, count: int) -> None:
        """Start proving `count` links to `home`, side by side, in the background."""
        key = (home.address, home.fingerprint)
        count = max(0, min(count, AHEAD_MAX))
        with self.ready:
            self.proving[key] = self.proving.get(key, 0) + count
        for _ in range(count):
            threading.Thread(target=self._prove_one, args=(home, key), daemon=True).start()

    def _prove_one(self, home: HomeEndpoint, key: tuple[str, str]) -> None:
        try:
            link: relay_link.TlsLink | None = prove_link(home)
        except ShadowError:
            link = None  # its relay connects as before (and says what is wrong)
        with self.ready:
            self.proving[key] -= 1
            if link is not None:
                self.links.setdefault(key, []).append((link, time.monotonic()))
            self.ready.notify_all()
        if link is not None:
            # Closed once stale if no relay took it: before the shadow's timeout, which
            # would log it; a link closed before its header goes without a line.
            expiry = threading.Timer(AHEAD_FRESH + 0.1, self._expire)
            expiry.daemon = True
            expiry.start()

    def take(self, home: HomeEndpoint) -> relay_link.TlsLink | None:
        """A fresh proved link to `home` (waiting for one being proved), or None."""
        key = (home.address, home.fingerprint)
        deadline = time.monotonic() + AHEAD_WAIT
        with self.ready:
            while True:
                self._expire_locked()
                if self.links.get(key):
                    return self.links[key].pop(0)[0]
                left = deadline - time.monotonic()
                if not self.proving.get(key) or left <= 0:
                    return None
                self.ready.wait(left)

    def _expire(self) -> None:
        with self.ready:
            self._expire_locked()

    def _expire_locked(self) -> None:
        now = time.monotonic()
        for key, links in list(self.links.items()):
            fresh = [(link, made) for link, made in links if now - made < AHEAD_FRESH]
            for link, made in links:
                if now - made >= AHEAD_FRESH:
                    link.sock.close()
            if fresh:
                self.links[key] = fresh
            else:
                del self.links[key]


LINKS_AHEAD = LinksAhead()  # this process's (a node's daemon, its forwarder)


def open_link(home: HomeEndpoint, header: Message, timeout: float = 10.0) -> relay_link.TlsLink:
    """A relay or listener connection to the home shadow, accepted, still inside TLS (on a
    link proved ahead, if there is one: LinksAhead)."""
    proved = LINKS_AHEAD.take(home)
    if proved is not None:
        try:
            proved.sock.settimeout(timeout)
            relay_link.send_header(proved, header, home.address)
            return _accepted(proved, header)
        except _Unanswered:
            raise  # it may have been accepted all the same: never asked twice
        except ShadowError:
            pass  # dropped by the shadow meanwhile: asked again on a link of its own
    link = relay_link.connect(home.address, home.fingerprint, home.token, header, timeout)
    return _accepted(link, header)


class _Unanswered(ShadowError):
    """The shadow did not answer a relay's header in time (open_link)."""


def _accepted(link: relay_link.TlsLink, header: Message) -> relay_link.TlsLink:
    """`link`, once the shadow accepted the relay its header asked for (closed if not)."""
    try:
        bound_backoff(link.sock)
        answer = link.read_exactly(len(RELAY_ACCEPTED))
    except TimeoutError as exc:
        link.sock.close()
        raise _Unanswered(f"the home shadow refused a relay: {exc}") from None
    except (OSError, ShadowError, ssl.SSLError) as exc:
        link.sock.close()
        raise ShadowError(f"the home shadow refused a relay: {exc}") from None
    if answer != RELAY_ACCEPTED:
        link.sock.close()
        raise _Unanswered(f"the home shadow refused a relay for {header.get('stream')}")
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
