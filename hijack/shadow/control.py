"""The control protocol of shadows (and, later, node daemons): JSON lines over a unix socket.

Each request is one JSON object on one line with an "op" field; each answer is
one JSON object on one line with "ok" true or false ("error" says why when
false). docs/protocol.md lists the operations.
"""

from __future__ import annotations

import json
import os
import socket
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
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
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
