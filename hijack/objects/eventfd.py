"""eventfds: made anew by the restorer with their counter, and given to the stub."""

from __future__ import annotations

import os

from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import DumpContext, Kind, RestoreContext
from hijack.sys import procfs


class Eventfd(Kind):
    name = "eventfd"
    record_types = (rec.EventfdObject,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return entry.kind is procfs.FdKind.EVENTFD

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        semaphore = info.extra.get("eventfd-semaphore", ("0",))[0] == "1"

        def make(id: int) -> rec.EventfdObject:
            return rec.EventfdObject(id=id, count=info.eventfd_count, semaphore=semaphore)

        # Every eventfd shares one anonymous inode: the description is the counter.
        return dump.add_object(("eventfd", dump.descriptions[entry.fd]), make)

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        counter = restore.image.object_of(descriptor, rec.EventfdObject)
        made = os.eventfd(counter.count, os.EFD_CLOEXEC | (os.EFD_SEMAPHORE * counter.semaphore))
        restore.give_made(made, descriptor)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        counter = image.object_of(descriptor, rec.EventfdObject)
        return f"count {counter.count}" + (", semaphore" if counter.semaphore else "")
