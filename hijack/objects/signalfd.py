"""signalfds: made anew by the restorer with their mask, and given. The signals they
read are the process's pending signals, which the image queues again."""

from __future__ import annotations

from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import O_NONBLOCK, DumpContext, Kind, RestoreContext
from hijack.sys import notify, procfs


class Signalfd(Kind):
    name = "signalfd"
    record_types = (rec.SignalfdObject,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return entry.kind is procfs.FdKind.SIGNALFD

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        mask = notify.signalfd_mask(info)
        key = ("signalfd", dump.descriptions[entry.fd])
        return dump.add_object(key, lambda id: rec.SignalfdObject(id=id, sigmask=mask))

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        signals = restore.image.object_of(descriptor, rec.SignalfdObject)
        made = notify.make_signalfd(signals.sigmask, descriptor.flags & O_NONBLOCK)
        restore.give_made(made, descriptor)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        mask = image.object_of(descriptor, rec.SignalfdObject).sigmask
        numbers = [str(n) for n in range(1, 65) if mask >> (n - 1) & 1]
        return f"signals {', '.join(numbers) or 'none'}"
