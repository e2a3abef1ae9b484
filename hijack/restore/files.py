"""Restoring descriptors: what can be reopened by path is, at the same number, flags and offset.

Regular files, directories, named FIFOs, terminals and character devices are
reopened from their paths. Everything else (anonymous pipes, sockets, epoll,
eventfd, ...) exists only in the kernel of the dumped process: a local restore
cannot bring it back, and says so before the stub is built (a move proxies
such descriptors through the shadow instead).
"""

from __future__ import annotations

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
O_ACCMODE = 0o3
O_CREAT, O_EXCL, O_NOCTTY, O_TRUNC = 0o100, 0o200, 0o400, 0o1000
O_NONBLOCK = 0o4000
O_CLOEXEC = 0o2000000
# Flags that act at open time only: never replayed (O_TRUNC would empty the file).
OPEN_TIME_ONLY = O_CREAT | O_EXCL | O_TRUNC | O_CLOEXEC
F_SETFD, F_SETFL = 2, 4
FD_CLOEXEC = 1
SEEK_SET = 0
AT_FDCWD = -100


@dataclass(frozen=True)
class FilePlan:
    restore: tuple[rec.FileDescriptor, ...]
    dropped: tuple[rec.FileDescriptor, ...]


def describe(descriptor: rec.FileDescriptor) -> str:
    return f"fd {descriptor.fd} ({descriptor.kind.name.lower()} {descriptor.path})"


def plan_files(files: rec.Files, *, skip_unsupported: bool) -> FilePlan:
    """Split the descriptors into those to reopen and those to drop, or refuse."""
    unsupported = tuple(d for d in files.descriptors if d.kind not in REOPENABLE)
    if unsupported and not skip_unsupported:
        raise Unsupported(
            "cannot restore "
            + ", ".join(describe(d) for d in unsupported)
            + " (use --skip-unsupported to drop them; `hijack move` proxies them)"
        )
    supported = tuple(d for d in files.descriptors if d.kind in REOPENABLE)
    return FilePlan(supported, unsupported)


def close_foreign_descriptors(stub: Stub) -> None:
    """The stub inherited the restorer's descriptors: none of them belongs to the image."""
    for entry in procfs.list_fds(stub.pid):
        stub.call("close", entry.fd)


def reopen(stub: Stub, descriptor: rec.FileDescriptor) -> None:
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
    opened = stub.try_call("openat", AT_FDCWD, path, opening, 0)
    if opened < 0:
        raise RestoreError(f"cannot reopen {describe(descriptor)}: errno {-opened}")
    if opened != descriptor.fd:
        stub.call("dup3", opened, descriptor.fd, O_CLOEXEC if descriptor.cloexec else 0)
        stub.call("close", opened)
    elif descriptor.cloexec:
        stub.call("fcntl", descriptor.fd, F_SETFD, FD_CLOEXEC)
    if opening != flags:
        stub.call("fcntl", descriptor.fd, F_SETFL, flags)
    if descriptor.kind is rec.FdKind.REGULAR:
        stub.call("lseek", descriptor.fd, descriptor.pos, SEEK_SET)


def restore_files(stub: Stub, plan: FilePlan) -> None:
    close_foreign_descriptors(stub)
    # In ascending order every lower number of the image is taken when a file
    # is opened, so open() returns at most the wanted number and dup3 moves it.
    for descriptor in sorted(plan.restore, key=lambda d: d.fd):
        reopen(stub, descriptor)
