"""epoll instances: made anew, their interest lists filled once every descriptor exists."""

from __future__ import annotations

import struct

from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import O_CLOEXEC, DumpContext, Kind, RestoreContext
from hijack.sys import procfs
from hijack.sys.process import epoll_entry_is_open_at

EPOLL_CTL_ADD = 1
EPOLL_EVENT = struct.Struct("<IQ")  # struct epoll_event is packed on x86_64


class Epoll(Kind):
    name = "epoll"
    record_types = (rec.EpollObject,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return entry.kind is procfs.FdKind.EPOLL

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        targets = live_targets(dump.pid, entry.fd, info.epoll_targets)
        # Every epoll shares one anonymous inode: the description is the instance.
        key = ("epoll", dump.descriptions[entry.fd])
        return dump.add_object(key, lambda id: rec.EpollObject(id=id, targets=targets))

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        made = restore.stub.call("epoll_create1", O_CLOEXEC)
        restore.place(made, descriptor)

    def finish(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        stub = restore.stub
        for target in restore.image.object_of(descriptor, rec.EpollObject).targets:
            if target.tfd not in restore.restored:
                continue  # dropped (--skip-unsupported): nothing to watch
            stub.reset_scratch()
            event = stub.put(EPOLL_EVENT.pack(target.events, target.data))
            stub.call("epoll_ctl", descriptor.fd, EPOLL_CTL_ADD, target.tfd, event)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        targets = image.object_of(descriptor, rec.EpollObject).targets
        watched = ", ".join(f"{t.tfd}:{t.events:#x}" for t in targets)
        return f"watching {len(targets)} ({watched})" if targets else "watching none"


def live_targets(
    pid: int, epoll_fd: int, targets: list[tuple[int, int, int]]
) -> tuple[rec.EpollTarget, ...]:
    """The entries of an epoll's interest list the process still holds under their numbers.

    An entry lives as long as its file, not its number: one whose number the
    process closed or reused while another holder (a dup, a child, its
    shadow's copy) kept the file open stays listed. Such an entry cannot be
    added again under that number (EBADF, or EEXIST beside the new file's
    entry), and it ends with that other holder's copy; it is left out.
    """
    kept = []
    seen: dict[int, int] = {}
    for tfd, events, data in targets:
        toff = seen.get(tfd, 0)  # fdinfo lists entries in the order kcmp counts them
        seen[tfd] = toff + 1
        if epoll_entry_is_open_at(pid, epoll_fd, tfd, toff):
            kept.append(rec.EpollTarget(tfd=tfd, events=events, data=data))
    return tuple(kept)
