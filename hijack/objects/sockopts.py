"""The options of an inet socket (SocketOptions), shared by the socket kinds.

Read at dump from a copy of the socket with getsockopt, kept as the kernel gave
them, and set again at restore on the new socket: those that only take effect
before bind (EARLY) before it, the rest, then the filter and its lock, after.
SO_RCVBUF/SO_SNDBUF are kept only when they differ from a new socket's (setting
them stops the kernel's tuning of the buffer); the kernel reports twice what
was asked, so half is set again (with the _FORCE variants: root may exceed
the sysctl maximum, as the original may have).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import DumpContext
from hijack.restore.remote import Stub
from hijack.sys import socket_filter

SOL_SOCKET, IPPROTO_IP, IPPROTO_IPV6, IPPROTO_TCP = 1, 0, 41, 6
SO_REUSEADDR, SO_KEEPALIVE, SO_REUSEPORT, SO_BINDTODEVICE = 2, 9, 15, 25
SO_SNDBUF, SO_RCVBUF, SO_SNDBUFFORCE, SO_RCVBUFFORCE = 7, 8, 32, 33
IP_FREEBIND, IP_TRANSPARENT = 15, 19
IPV6_V6ONLY, IPV6_TRANSPARENT, IPV6_FREEBIND = 26, 75, 78
INT, LINGER, NAME = 4, 8, 16  # the sizes read: an int, struct linger, an interface or algorithm

# (level, name, size) of every option kept, by the sockets they apply to.
SOCKET_OPTIONS = (
    (SOL_SOCKET, SO_REUSEADDR, INT),
    (SOL_SOCKET, SO_REUSEPORT, INT),
    (SOL_SOCKET, SO_KEEPALIVE, INT),
    (SOL_SOCKET, 13, LINGER),  # SO_LINGER
    (SOL_SOCKET, SO_RCVBUF, INT),
    (SOL_SOCKET, SO_SNDBUF, INT),
    (SOL_SOCKET, 18, INT),  # SO_RCVLOWAT
    (SOL_SOCKET, 12, INT),  # SO_PRIORITY
    (SOL_SOCKET, 36, INT),  # SO_MARK
    (SOL_SOCKET, SO_BINDTODEVICE, NAME),
    (SOL_SOCKET, 6, INT),  # SO_BROADCAST
    (SOL_SOCKET, 10, INT),  # SO_OOBINLINE
)
IPV4_OPTIONS = (
    (IPPROTO_IP, IP_FREEBIND, INT),
    (IPPROTO_IP, IP_TRANSPARENT, INT),
    (IPPROTO_IP, 1, INT),  # IP_TOS
    (IPPROTO_IP, 2, INT),  # IP_TTL
)
IPV6_OPTIONS = (
    (IPPROTO_IPV6, IPV6_V6ONLY, INT),
    (IPPROTO_IPV6, IPV6_FREEBIND, INT),
    (IPPROTO_IPV6, IPV6_TRANSPARENT, INT),
    (IPPROTO_IPV6, 67, INT),  # IPV6_TCLASS
    (IPPROTO_IPV6, 16, INT),  # IPV6_UNICAST_HOPS
)
TCP_OPTIONS = (
    (IPPROTO_TCP, 1, INT),  # TCP_NODELAY
    (IPPROTO_TCP, 3, INT),  # TCP_CORK
    (IPPROTO_TCP, 4, INT),  # TCP_KEEPIDLE
    (IPPROTO_TCP, 5, INT),  # TCP_KEEPINTVL
    (IPPROTO_TCP, 6, INT),  # TCP_KEEPCNT
    (IPPROTO_TCP, 18, INT),  # TCP_USER_TIMEOUT
    (IPPROTO_TCP, 13, NAME),  # TCP_CONGESTION
)
RAW_IPV4_OPTIONS = ((IPPROTO_IP, 3, INT),)  # IP_HDRINCL
RAW_ICMP_OPTIONS = ((255, 1, INT),)  # SOL_RAW, ICMP_FILTER: the ICMP types dropped

# Set before bind(): they decide whether and where it binds.
EARLY = frozenset(
    {
        (SOL_SOCKET, SO_REUSEADDR),
        (SOL_SOCKET, SO_REUSEPORT),
        (SOL_SOCKET, SO_BINDTODEVICE),
        (SOL_SOCKET, SO_RCVBUF),
        (SOL_SOCKET, SO_SNDBUF),
        (IPPROTO_IP, IP_FREEBIND),
        (IPPROTO_IP, IP_TRANSPARENT),
        (IPPROTO_IPV6, IPV6_V6ONLY),
        (IPPROTO_IPV6, IPV6_FREEBIND),
        (IPPROTO_IPV6, IPV6_TRANSPARENT),
    }
)
BUFFERS = {SO_RCVBUF: SO_RCVBUFFORCE, SO_SNDBUF: SO_SNDBUFFORCE}
STRINGS = frozenset({(SOL_SOCKET, SO_BINDTODEVICE), (IPPROTO_TCP, 13)})  # TCP_CONGESTION

SetOption = Callable[[int, int, bytes], None]  # level, name, value
AttachFilter = Callable[[bytes], None]


def _read(sock: socket.socket) -> dict[tuple[int, int], bytes]:
    table = [*SOCKET_OPTIONS, *IPV4_OPTIONS]
    if sock.family == socket.AF_INET6:
        table += IPV6_OPTIONS
    if sock.type == socket.SOCK_STREAM:
        table += TCP_OPTIONS
    if sock.type == socket.SOCK_RAW and sock.family == socket.AF_INET:
        table += RAW_IPV4_OPTIONS
        if sock.proto == socket.IPPROTO_ICMP:
            table += RAW_ICMP_OPTIONS
    if sock.type == socket.SOCK_RAW and sock.family == socket.AF_INET6:
        # Bound to its protocol from the start, so it can never be set.
        table.remove((IPPROTO_IPV6, IPV6_V6ONLY, INT))
    found = {}
    for level, name, size in table:
        try:
            found[level, name] = sock.getsockopt(level, name, size)
        except OSError:
            continue  # not an option of this socket
    return found


def dump_options(sock: socket.socket, socket_id: int, key: object, dump: DumpContext) -> None:
    """Add the SocketOptions of `sock` (a copy of the socket `socket_id`, kernel object `key`)."""
    found = _read(sock)
    with socket.socket(sock.family, sock.type, sock.proto) as fresh:
        default = _read(fresh)
    for name in BUFFERS:
        if found.get((SOL_SOCKET, name)) == default.get((SOL_SOCKET, name)):
            found.pop((SOL_SOCKET, name), None)
    code = socket_filter.get_filter(sock.fileno())
    locked = bool(sock.getsockopt(SOL_SOCKET, socket_filter.SO_LOCK_FILTER) if code else False)
    options = tuple(
        rec.SocketOption(level=level, name=name, value=value)
        for (level, name), value in found.items()
    )
    dump.add_object(
        ("options", key),
        lambda id: rec.SocketOptions(
            id=id, socket_id=socket_id, filter_locked=locked, options=options, filter=code
        ),
    )


def options_of(image: ImageFiles, socket_id: int) -> rec.SocketOptions | None:
    for record in image.objects.values():
        if isinstance(record, rec.SocketOptions) and record.socket_id == socket_id:
            return record
    return None


def set_early(found: rec.SocketOptions | None, set_option: SetOption) -> None:
    """The options a socket must have before it binds."""
    for option in found.options if found is not None else ():
        if (option.level, option.name) in EARLY:
            _set(option, set_option)


def set_late(
    found: rec.SocketOptions | None,
    set_option: SetOption,
    attach: AttachFilter,
    *,
    early_too: bool = False,
) -> None:
    """The other options, then the filter and its lock; `early_too`: all of them
    (a socket made bound already: IPV6_V6ONLY, which it cannot change, is left)."""
    if found is None:
        return
    for option in found.options:
        key = option.level, option.name
        if key not in EARLY or (early_too and key != (IPPROTO_IPV6, IPV6_V6ONLY)):
            _set(option, set_option)
    if found.filter:
        attach(found.filter)
    if found.filter_locked:
        set_option(SOL_SOCKET, socket_filter.SO_LOCK_FILTER, struct.pack("<i", 1))


def set_reuse(found: rec.SocketOptions | None, set_option: SetOption) -> None:
    """SO_REUSEADDR as it was (a listener binds with it on, whatever it had)."""
    for option in found.options if found is not None else ():
        if (option.level, option.name) == (SOL_SOCKET, SO_REUSEADDR):
            set_option(option.level, option.name, option.value)


def _set(option: rec.SocketOption, set_option: SetOption) -> None:
    if option.level == SOL_SOCKET and option.name in BUFFERS:
        (doubled,) = struct.unpack("<i", option.value)
        set_option(SOL_SOCKET, BUFFERS[option.name], struct.pack("<i", doubled // 2))
    elif (option.level, option.name) in STRINGS:
        if option.value.rstrip(b"\0"):  # none (bound to no device) is how a socket starts
            set_option(option.level, option.name, option.value.rstrip(b"\0"))
    else:
        set_option(option.level, option.name, option.value)


def our_setters(sock: socket.socket) -> tuple[SetOption, AttachFilter]:
    """Setters for a socket of ours."""

    def set_option(level: int, name: int, value: bytes) -> None:
        sock.setsockopt(level, name, value)

    return set_option, lambda code: socket_filter.attach_filter(sock.fileno(), code)


def stub_setters(stub: Stub, fd: int) -> tuple[SetOption, AttachFilter]:
    """Setters for the stub's socket `fd` (injected calls)."""

    def set_option(level: int, name: int, value: bytes) -> None:
        stub.reset_scratch()
        stub.call("setsockopt", fd, level, name, stub.put(value), len(value))

    def attach(code: bytes) -> None:
        stub.reset_scratch()
        program = socket_filter.filter_program(code, stub.put(code))
        stub.call(
            "setsockopt", fd, SOL_SOCKET, socket_filter.SO_ATTACH_FILTER, stub.put(program),
            len(program),
        )  # fmt: skip

    return set_option, attach


def describe_options(image: ImageFiles, socket_id: int) -> str:
    """ ", 14 options, a filter of 4 instructions (locked)" for `hijack show`."""
    found = options_of(image, socket_id)
    if found is None:
        return ""
    text = f", {len(found.options)} options"
    if found.filter:
        text += f", a filter of {len(found.filter) // 8} instructions"
        text += " (locked)" if found.filter_locked else ""
    return text
