"""inotify instances: made anew by the restorer, every watch added again on the inode it
named (found by its file handle at dump) with its mask, under its old watch descriptor.

Watch descriptors are handed out in increasing order, so watches are added in the
order of theirs, and the numbers of watches removed before the dump are used up by
a watch on a scratch directory removed at once. Events queued but not read at the
dump are not kept: a program sees the changes made after the restore. (There is no
peek: read takes them; and no call queues an event but doing again what made it,
which changes the files watched: measured on 6.18, an IN_MODIFY made again changes
the mtime, an IN_ATTRIB the ctime, an IN_OPEN brings an IN_CLOSE_NOWRITE, and name
events with their cookies cannot be made again.)
"""

from __future__ import annotations

import os
import tempfile

from hijack.errors import RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import O_NONBLOCK, DumpContext, Kind, RestoreContext
from hijack.sys import notify, procfs

IN_CREATE = 0x100


class Inotify(Kind):
    name = "inotify"
    record_types = (rec.InotifyObject,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return entry.kind is procfs.FdKind.INOTIFY

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        watches = tuple(
            rec.InotifyWatch(wd=watch.wd, mask=watch.mask, path=notify.watched_path(watch))
            for watch in notify.inotify_watches(info)
        )
        key = ("inotify", dump.descriptions[entry.fd])
        return dump.add_object(key, lambda id: rec.InotifyObject(id=id, watches=watches))

    def refusal(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str | None:
        for watch in image.object_of(descriptor, rec.InotifyObject).watches:
            if not os.path.exists(watch.path):
                return f"fd {descriptor.fd} (inotify watch {watch.wd} on {watch.path}, now gone)"
        return None

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        instance = restore.image.object_of(descriptor, rec.InotifyObject)
        made = notify.make_inotify(descriptor.flags & O_NONBLOCK)
        try:
            with tempfile.TemporaryDirectory(prefix="hijack-inotify-") as scratch:
                _add_watches(made, instance.watches, scratch)
            # Using numbers up queued IN_IGNORED events the process never caused.
            notify.discard_events(made)
            restore.give(made, descriptor)
        finally:
            os.close(made)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        watches = image.object_of(descriptor, rec.InotifyObject).watches
        listed = ", ".join(f"{w.wd}:{w.path} {w.mask:#x}" for w in watches)
        return f"watching {listed}" if watches else "watching nothing"


def _add_watches(fd: int, watches: tuple[rec.InotifyWatch, ...], scratch: str) -> None:
    """Add `watches` (ascending) under their own watch descriptors. A new instance hands
    out 1, 2, ... in turn, never reusing one: the numbers the process no longer used are
    used up by a watch on `scratch`, removed at once."""
    next_wd = 1
    for watch in watches:
        while next_wd < watch.wd:
            spent = notify.add_watch(fd, scratch, IN_CREATE)
            notify.remove_watch(fd, spent)
            next_wd = spent + 1
        wd = notify.add_watch(fd, watch.path, watch.mask)
        if wd != watch.wd:
            raise RestoreError(f"inotify watch on {watch.path} came back as {wd}, not {watch.wd}")
        next_wd = wd + 1
