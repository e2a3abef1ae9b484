"""pidfds: opened again by the restorer on the process they refer to, and given.

A pidfd of the dumped process itself refers to the restored process. A pidfd of
another process is opened again only if that very process still runs (same pid
and start time); otherwise a restore refuses it by name. One of a process that
had exited (fdinfo Pid -1) cannot be made again.
"""

from __future__ import annotations

from hijack.errors import HijackError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import O_NONBLOCK, DumpContext, Kind, RestoreContext, describe_fd
from hijack.sys import pidfd, procfs


class Pidfd(Kind):
    name = "pidfd"
    record_types = (rec.PidfdObject,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return entry.kind is procfs.FdKind.PIDFD

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        pid = int(info.extra.get("Pid", ("-1",))[0])
        starttime = _starttime(pid) if pid > 0 else 0

        def make(id: int) -> rec.PidfdObject:
            return rec.PidfdObject(id=id, pid=pid, starttime=starttime, own=pid == dump.pid)

        return dump.add_object(("pidfd", dump.descriptions[entry.fd]), make)

    def refusal(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str | None:
        target = image.object_of(descriptor, rec.PidfdObject)
        if target.own:
            return None
        if target.pid <= 0:
            return f"{describe_fd(descriptor)}, a pidfd of a process that had exited"
        if _starttime(target.pid) != target.starttime:
            return f"{describe_fd(descriptor)}, a pidfd of process {target.pid}, now gone"
        return None

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        target = restore.image.object_of(descriptor, rec.PidfdObject)
        pid = restore.stub.pid if target.own else target.pid
        made = pidfd.pidfd_open(pid, descriptor.flags & O_NONBLOCK)
        restore.give_made(made, descriptor)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        target = image.object_of(descriptor, rec.PidfdObject)
        if target.own:
            return "of the process itself"
        return f"of process {target.pid}" if target.pid > 0 else "of a process that exited"


def _starttime(pid: int) -> int:
    try:
        return procfs.read_stat(pid).starttime
    except HijackError:
        return 0
