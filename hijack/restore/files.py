"""Restoring descriptors: what can be reopened by path is, at the same number, flags and offset.

Regular files, directories, named FIFOs, terminals and character devices are
reopened from their paths; epoll instances (with their interest lists) and
eventfds are made anew, and so is a TCP socket that was listening (bound to
its address again: clients that were waiting in its accept queue are lost).
Anonymous pipes and other sockets exist only in the kernel of the dumped
process: a restore gets them from the process's shadow (which keeps them
across `dump --kill`, the waiting clients too) or as relays to it (a move);
otherwise it refuses them by name before the stub is built.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass

from hijack.errors import RestoreError, Unsupported
from hijack.image import records as rec
from hijack.restore.remote import Stub
from hijack.sys import procfs

REOPENABLE = {
    rec.FdKind.REGULAR,
    rec.FdKind.DIRECTORY,
    rec.FdKind.FIFO,
    rec.FdKind.TTY,
    rec.FdKind.CHARDEV,
    rec.FdKind.BLOCKDEV,
}
# Made anew from what the image says of them.
RECREATED = {rec.FdKind.EPOLL, rec.FdKind.EVENTFD}
EPOLL_CTL_ADD = 1
TCP_LISTEN = 10  # the kernel's TCP state number
LISTEN_BACKLOG = socket.SOMAXCONN  # the kernel caps it at net.core.somaxconn
SOCKADDR_IN = struct.Struct("<H2s4s8x")  # family, port (network order), address
SOCKADDR_IN6 = struct.Struct("<H2sI16sI")  # family, port, flow info, address, scope id
EPOLL_EVENT = struct.Struct("<IQ")  # struct epoll_event is packed on x86_64
O_ACCMODE = 0o3
O_RDONLY, O_WRONLY = 0, 1
O_CREAT, O_EXCL, O_NOCTTY, O_TRUNC = 0o100, 0o200, 0o400, 0o1000
O_NONBLOCK = 0o4000
O_CLOEXEC = 0o2000000
# Flags that act at open time only: never replayed (O_TRUNC would empty the file).
OPEN_TIME_ONLY = O_CREAT | O_EXCL | O_TRUNC | O_CLOEXEC
F_DUPFD, F_SETFD, F_SETFL = 0, 2, 4
TCSETS, TIOCSWINSZ = 0x5402, 0x5414
TERMIOS = struct.Struct("<4IB19s")  # the kernel's struct termios
WINSIZE = struct.Struct("<4H")
# The status flags F_SETFL can change: O_APPEND, O_ASYNC, O_DIRECT, O_NOATIME, O_NONBLOCK.
SETTABLE_STATUS_FLAGS = 0o2000 | 0o20000 | 0o40000 | 0o1000000 | O_NONBLOCK
FD_CLOEXEC = 1
SEEK_SET = 0
AT_FDCWD = -100


@dataclass(frozen=True)
class ShadowHoldings:
    """What the shadow of a checkpointed process keeps for its restore."""

    shadow_pid: int
    control: str
    own_fd: dict[int, int]  # the process's descriptor number -> the shadow's
    identity: dict[int, tuple[int, int]]  # the process's descriptor number -> (dev, ino)


@dataclass(frozen=True)
class FilePlan:
    inherited: tuple[rec.FileDescriptor, ...]  # handed to the stub: from the shadow, or relays
    reopen: tuple[rec.FileDescriptor, ...]  # reopened by path
    dropped: tuple[rec.FileDescriptor, ...]  # left out (--skip-unsupported)


def describe(descriptor: rec.FileDescriptor) -> str:
    return f"fd {descriptor.fd} ({descriptor.kind.name.lower()} {descriptor.path})"


def plan_files(
    files: rec.Files,
    *,
    skip_unsupported: bool,
    holdings: ShadowHoldings | None = None,
    provided: frozenset[int] = frozenset(),
) -> FilePlan:
    """Decide for each descriptor where it comes from, or refuse naming those that cannot.

    `provided` are numbers the caller hands over ready-made (a move's relays).
    """
    inherited, reopenable, unsupported = [], [], []
    for descriptor in files.descriptors:
        held = holdings and holdings.identity.get(descriptor.fd) == (descriptor.dev, descriptor.ino)
        if descriptor.fd in provided or held:
            inherited.append(descriptor)
        elif (
            descriptor.kind in REOPENABLE
            or descriptor.kind in RECREATED
            or is_tcp_listener(descriptor)
        ):
            reopenable.append(descriptor)
        else:
            unsupported.append(descriptor)
    if unsupported and not skip_unsupported:
        raise Unsupported(
            "cannot restore "
            + ", ".join(describe(d) for d in unsupported)
            + " (use --skip-unsupported to drop them; attach the process before dumping it"
            " and its shadow keeps them)"
        )
    return FilePlan(tuple(inherited), tuple(reopenable), tuple(unsupported))


def is_tcp_listener(descriptor: rec.FileDescriptor) -> bool:
    info = descriptor.socket
    return (
        descriptor.kind is rec.FdKind.SOCKET
        and info is not None
        and info.family in (socket.AF_INET, socket.AF_INET6)
        and info.type == socket.SOCK_STREAM
        and info.state == TCP_LISTEN
    )


def sockaddr(family: int, address: str) -> bytes:
    """struct sockaddr_in / sockaddr_in6 of "1.2.3.4:80" or "[::1]:80"."""
    host, _, port = address.rpartition(":")
    packed_port = struct.pack("!H", int(port))
    ip = ipaddress.ip_address(host.strip("[]"))
    if family == socket.AF_INET:
        return SOCKADDR_IN.pack(family, packed_port, ip.packed)
    return SOCKADDR_IN6.pack(family, packed_port, 0, ip.packed, 0)


def close_foreign_descriptors(stub: Stub, keep: set[int]) -> None:
    """The stub inherited the restorer's descriptors: none of them belongs to the image."""
    for entry in procfs.list_fds(stub.pid):
        if entry.fd not in keep:
            stub.call("close", entry.fd)


def reopen(stub: Stub, descriptor: rec.FileDescriptor) -> None:
    if descriptor.kind is rec.FdKind.EPOLL:
        _place(stub, stub.call("epoll_create1", 0), descriptor)
        return
    if descriptor.kind is rec.FdKind.EVENTFD:
        nonblocking = descriptor.flags & O_NONBLOCK  # EFD_NONBLOCK is O_NONBLOCK
        counter = stub.call("eventfd2", descriptor.eventfd_count, nonblocking)
        _place(stub, counter, descriptor)
        return
    if is_tcp_listener(descriptor):
        _listen_again(stub, descriptor)
        return
    flags = descriptor.flags & ~OPEN_TIME_ONLY
    if descriptor.kind in (rec.FdKind.TTY, rec.FdKind.CHARDEV):
        flags |= O_NOCTTY  # never acquire a controlling terminal by restoring
    opening = flags
    if descriptor.kind is rec.FdKind.FIFO:
        # Opening one end of a FIFO blocks until the other end is open: open
        # without blocking, then put the real flags back.
        opening |= O_NONBLOCK
    stub.reset_scratch()
    path = stub.put_string(descriptor.path)
    placeholder = -1
    if descriptor.kind is rec.FdKind.FIFO and flags & O_ACCMODE == O_WRONLY:
        # A write end opens only while a reader exists (ENXIO otherwise): hold
        # one for the moment of the open.
        placeholder = stub.try_call("openat", AT_FDCWD, path, O_RDONLY | O_NONBLOCK, 0)
    opened = stub.try_call("openat", AT_FDCWD, path, opening, 0)
    if placeholder >= 0:
        stub.call("close", placeholder)
    if opened < 0:
        raise RestoreError(f"cannot reopen {describe(descriptor)}: errno {-opened}")
    _place(stub, opened, descriptor)
    if opening != flags:
        stub.call("fcntl", descriptor.fd, F_SETFL, flags)
    if descriptor.kind is rec.FdKind.REGULAR:
        stub.call("lseek", descriptor.fd, descriptor.pos, SEEK_SET)


def _listen_again(stub: Stub, descriptor: rec.FileDescriptor) -> None:
    """A listening TCP socket, bound to the image's address again, with its status flags."""
    info = descriptor.socket
    assert info is not None
    made = stub.call("socket", info.family, info.type, info.protocol)
    _place(stub, made, descriptor)
    stub.reset_scratch()
    # The old socket's accepted connections may linger in TIME_WAIT.
    one = stub.put(struct.pack("<i", 1))
    stub.call("setsockopt", descriptor.fd, socket.SOL_SOCKET, socket.SO_REUSEADDR, one, 4)
    address = sockaddr(info.family, info.local_address)
    bound = stub.try_call("bind", descriptor.fd, stub.put(address), len(address))
    if bound < 0:
        hint = " (does the original still run?)" if -bound == errno.EADDRINUSE else ""
        raise RestoreError(
            f"cannot listen again on {info.local_address} for {describe(descriptor)}: "
            f"{os.strerror(-bound)}{hint}"
        )
    stub.call("listen", descriptor.fd, LISTEN_BACKLOG)
    stub.call("fcntl", descriptor.fd, F_SETFL, descriptor.flags & SETTABLE_STATUS_FLAGS)


def _place(stub: Stub, opened: int, descriptor: rec.FileDescriptor) -> None:
    """Move descriptor `opened` of the stub to the image's number, with its close-on-exec."""
    if opened != descriptor.fd:
        stub.call("dup3", opened, descriptor.fd, O_CLOEXEC if descriptor.cloexec else 0)
        stub.call("close", opened)
    elif descriptor.cloexec:
        stub.call("fcntl", descriptor.fd, F_SETFD, FD_CLOEXEC)


def restore_files(stub: Stub, plan: FilePlan, inherited: dict[int, int]) -> None:
    """Give the stub the image's descriptors.

    `inherited` maps the image's numbers of the shadow's descriptions to the
    numbers the stub inherited them under from the restorer. They are parked
    above every number in play first, so nothing restored lands on them.
    """
    numbers = [d.fd for d in (*plan.inherited, *plan.reopen)] + list(inherited.values())
    parking = max(numbers, default=2) + 1
    parked = {
        image_fd: stub.call("fcntl", fd, F_DUPFD, parking) for image_fd, fd in inherited.items()
    }
    close_foreign_descriptors(stub, keep=set(parked.values()))
    # In ascending order every lower number of the image is taken when a file
    # is opened, so open() returns at most the wanted number and dup3 moves it.
    for descriptor in sorted(plan.reopen, key=lambda d: d.fd):
        reopen(stub, descriptor)
    for descriptor in plan.inherited:
        _place(stub, parked[descriptor.fd], descriptor)
        # A relay stands for the original: it takes the original's status
        # flags (a server's non-blocking listener must not block in accept).
        stub.call("fcntl", descriptor.fd, F_SETFL, descriptor.flags & SETTABLE_STATUS_FLAGS)
    # Every descriptor is in place now: fill the epoll interest lists.
    for descriptor in plan.reopen:
        for target in descriptor.epoll:
            stub.reset_scratch()
            event = stub.put(EPOLL_EVENT.pack(target.events, target.data))
            stub.call("epoll_ctl", descriptor.fd, EPOLL_CTL_ADD, target.tfd, event)


def set_up_terminals(stub: Stub, plan: FilePlan, fresh: frozenset[int]) -> int | None:
    """Give each terminal made for the process (`fresh`: a move's ptys) the settings and
    window size its terminal had; return the number of the one that was its controlling
    terminal, if any."""
    controlling = None
    for descriptor in plan.inherited:
        state = descriptor.terminal
        if descriptor.fd not in fresh or state is None:
            continue
        stub.reset_scratch()
        settings = TERMIOS.pack(
            state.c_iflag, state.c_oflag, state.c_cflag, state.c_lflag, state.c_line, state.c_cc
        )
        stub.call("ioctl", descriptor.fd, TCSETS, stub.put(settings))
        size = WINSIZE.pack(state.ws_row, state.ws_col, state.ws_xpixel, state.ws_ypixel)
        stub.call("ioctl", descriptor.fd, TIOCSWINSZ, stub.put(size))
        if state.controlling:
            controlling = descriptor.fd
    return controlling
