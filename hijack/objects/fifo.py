"""Named FIFOs, reopened by path, with the bytes they buffered.

A FIFO's bytes live in the kernel only while some process has it open. One
that only the dumped process had open loses them when it dies: they are in
the image (read without being taken, hijack.objects.pipe), and the restorer
opens the FIFO itself, writes them in and holds it until the process has
its own descriptors of it. One another process holds open keeps its bytes:
they are neither stored nor written again.
"""

from __future__ import annotations

from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import F_SETFL, O_NONBLOCK, DumpContext, Kind, RestoreContext
from hijack.objects.pipe import describe_buffer, dump_buffered, fill
from hijack.objects.regular import open_by_path, path_refusal, reopen_flags
from hijack.sys import pipe, procfs

O_ACCMODE, O_RDONLY, O_WRONLY = 0o3, 0, 1


class Fifo(Kind):
    name = "fifo"
    record_types = (rec.FifoObject,)
    fd_kinds = (rec.FdKind.FIFO,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return entry.kind is procfs.FdKind.FIFO

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        def make(
            object_id: int, size: int, packets: tuple[int, ...], outside: set[int]
        ) -> rec.ObjectRecord:
            return rec.FifoObject(
                id=object_id, pipe_size=size, packets=packets, held_outside=bool(outside)
            )

        key = ("fifo", entry.dev, entry.ino)
        return dump_buffered(dump, entry, key, make, members_inside=True)

    def refusal(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str | None:
        return path_refusal(descriptor)

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        fifo = restore.image.object_of(descriptor, rec.FifoObject)
        if not fifo.held_outside and restore.built(fifo.id) is None:
            ours = pipe.open_fifo(descriptor.path)
            restore.keep(fifo.id, ours)
            fill(ours, restore.image, fifo.id, fifo.pipe_size, fifo.packets)
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

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        fifo = image.object_of(descriptor, rec.FifoObject)
        if fifo.held_outside:
            return f"{descriptor.path}, held open by another process too"
        return f"{descriptor.path}, {describe_buffer(image, fifo.id, fifo.pipe_size, fifo.packets)}"
