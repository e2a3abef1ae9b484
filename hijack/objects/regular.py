"""Regular files and directories, reopened by path at the same flags and offset."""

from __future__ import annotations

import os

from hijack.errors import RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import DumpContext, Kind, RestoreContext, describe_fd
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

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        restore.place(open_by_path(restore, descriptor, reopen_flags(descriptor)), descriptor)
        if descriptor.kind is rec.FdKind.REGULAR:
            restore.stub.call("lseek", descriptor.fd, descriptor.pos, SEEK_SET)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        return f"{descriptor.path} at offset {descriptor.pos}"
