"""Regular files and directories, reopened by path at the same flags and offset."""

from __future__ import annotations

import os
import resource

from hijack.errors import RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import F_DUPFD, DumpContext, Kind, RestoreContext, describe_fd
from hijack.sys import procfs

O_CREAT, O_EXCL, O_TRUNC, O_CLOEXEC = 0o100, 0o200, 0o1000, 0o2000000
# Flags that act at open time only: never replayed (O_TRUNC would empty the file).
OPEN_TIME_ONLY = O_CREAT | O_EXCL | O_TRUNC | O_CLOEXEC
O_TMPFILE_BIT = 0o20000000  # __O_TMPFILE
O_TMPFILE = O_TMPFILE_BIT | 0o200000  # as open(2) takes it: with O_DIRECTORY
AT_FDCWD = -100
SEEK_SET = 0
DELETED = " (deleted)"


def open_by_path(restore: RestoreContext, descriptor: rec.FileDescriptor, flags: int) -> int:
    """Open the descriptor's path in the stub with `flags`; the stub's new descriptor."""
    stub = restore.stub
    stub.reset_scratch()
    opened = stub.try_call("openat", AT_FDCWD, stub.put_string(descriptor.path), flags, 0)
    if opened < 0:
        raise RestoreError(f"cannot reopen {describe_fd(descriptor)}: errno {-opened}")
    return opened


def reopen(
    restore: RestoreContext, descriptor: rec.FileDescriptor, flags: int, offset: int | None = None
) -> None:
    """Open the descriptor's path in the stub with `flags` at its number (and `offset`),
    by calls that read none of their results here: in the batch of the descriptors around
    it (hijack.restore.files), or one of its own, not a stop for each (issue #17).

    The open takes the lowest free number, which may be the descriptor's own or not:
    the new description goes above it first (F_DUPFD), the open's number is closed, and
    dup3 puts it at its number with its close-on-exec, whichever it was."""
    stub = restore.stub
    if not reopens_queued(descriptor):
        restore.place(open_by_path(restore, descriptor, flags), descriptor)
        if offset is not None:
            stub.call("lseek", descriptor.fd, offset, SEEK_SET)
        return
    with stub.batched():
        path = stub.put_string(descriptor.path)
        failure = f"cannot reopen {describe_fd(descriptor)}"
        opened = stub.queue("openat", AT_FDCWD, path, flags, 0, failure=failure)
        above = stub.queue("fcntl", opened, F_DUPFD, descriptor.fd + 1)
        stub.queue("close", opened)
        stub.queue("dup3", above, descriptor.fd, O_CLOEXEC if descriptor.cloexec else 0)
        stub.queue("close", above)
        if offset is not None:
            stub.queue("lseek", descriptor.fd, offset, SEEK_SET)


def reopens_queued(descriptor: rec.FileDescriptor) -> bool:
    """Whether reopen() queues its calls: not where no number is left above the
    descriptor's in the stub (which has the restorer's limits until the process's own are
    set, after its descriptors); that one is reopened one call at a time."""
    return descriptor.fd + 1 < resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def reopen_flags(descriptor: rec.FileDescriptor) -> int:
    """The flags to open `descriptor`'s file with again.

    A file made by open(DIR, O_TMPFILE) keeps O_TMPFILE in its flags, and
    O_DIRECTORY with it: an open with them fails (ENOTDIR, the file is not the
    directory it was made in), so they are left out: the new description differs
    only there (fdinfo, F_GETFL), where nothing acts on them after the open.
    """
    flags = descriptor.flags & ~OPEN_TIME_ONLY
    if flags & O_TMPFILE_BIT:
        flags &= ~O_TMPFILE
    return flags


def is_deleted(path: str, dev: int, ino: int) -> bool:
    """Whether /proc marked the file (dev, ino) deleted: its link ends in " (deleted)" and
    no file literally named so is that file."""
    if not path.endswith(DELETED):
        return False
    try:
        found = os.stat(path)
    except OSError:
        return True
    return (found.st_dev, found.st_ino) != (dev, ino)


def path_refusal(descriptor: rec.FileDescriptor) -> str | None:
    """A descriptor reopened by path cannot come back if its file is gone."""
    if is_deleted(descriptor.path, descriptor.dev, descriptor.ino):
        return f"{describe_fd(descriptor)}, a deleted file"
    if not os.path.lexists(descriptor.path):
        return f"{describe_fd(descriptor)}, whose file is gone"
    return None


class Regular(Kind):
    name = "regular"
    fd_kinds = (rec.FdKind.REGULAR, rec.FdKind.DIRECTORY)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return entry.kind in (procfs.FdKind.REGULAR, procfs.FdKind.DIRECTORY)

    def refusal(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str | None:
        return path_refusal(descriptor)

    def queues_only(self, descriptor: rec.FileDescriptor) -> bool:
        return reopens_queued(descriptor)

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        offset = descriptor.pos if descriptor.kind is rec.FdKind.REGULAR else None
        reopen(restore, descriptor, reopen_flags(descriptor), offset)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        return f"{descriptor.path} at offset {descriptor.pos}"
