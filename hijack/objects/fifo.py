"""Named FIFOs, reopened by path (their buffered bytes stay in the kernel's pipe while
any end is open elsewhere, and are lost otherwise)."""

from __future__ import annotations

from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import F_SETFL, O_NONBLOCK, DumpContext, Kind, RestoreContext
from hijack.objects.regular import open_by_path, path_refusal, reopen_flags
from hijack.sys import procfs

O_ACCMODE, O_RDONLY, O_WRONLY = 0o3, 0, 1


class Fifo(Kind):
    name = "fifo"
    fd_kinds = (rec.FdKind.FIFO,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return entry.kind is procfs.FdKind.FIFO

    def refusal(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str | None:
        return path_refusal(descriptor)

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        flags = reopen_flags(descriptor)
        stub = restore.stub
        placeholder = -1
        if flags & O_ACCMODE == O_WRONLY:
            # A write end opens only while a reader exists (ENXIO otherwise): hold
            # one for the moment of the open.
            placeholder = open_by_path(restore, descriptor, O_RDONLY | O_NONBLOCK)
        try:
            # Opening one end blocks until the other is open: open without
            # blocking, then put the real flags back.
            opened = open_by_path(restore, descriptor, flags | O_NONBLOCK)
        finally:
            if placeholder >= 0:
                stub.call("close", placeholder)
        restore.place(opened, descriptor)
        if not flags & O_NONBLOCK:
            stub.call("fcntl", descriptor.fd, F_SETFL, flags)
