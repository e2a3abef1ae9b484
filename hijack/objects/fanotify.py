"""fanotify groups: made anew by the restorer with their fanotify_init flags, every mark
added again by the path it names (an inode's found by its file handle at dump, as
inotify's watches are; a mount's and a file system's by the process's mountinfo).

Events queued but not read at the dump are lost: a program sees the accesses made
after the restore. (No peek; no call queues one but doing again what made it, and an
event names the process that caused it.) A mark on an inode, mount or file system
gone since is refused by name. fanotify_init needs CAP_SYS_ADMIN, as the original did.
"""

from __future__ import annotations

import os

from hijack.errors import HijackError, RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import DumpContext, Kind, RestoreContext, describe_fd
from hijack.sys import fanotify, procfs

KIND_NAMES = ("inode", "mount", "filesystem")


class Fanotify(Kind):
    name = "fanotify"
    record_types = (rec.FanotifyObject,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return entry.kind is procfs.FdKind.FANOTIFY

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        group = fanotify.read_group(dump.pid, info)
        marks = tuple(
            rec.FanotifyMark(
                kind=m.kind, mflags=m.mflags, mask=m.mask, ignored_mask=m.ignored_mask, path=m.path
            )
            for m in group.marks
        )
        key = ("fanotify", dump.descriptions[entry.fd])
        return dump.add_object(
            key,
            lambda id: rec.FanotifyObject(
                id=id, flags=group.flags, event_flags=group.event_flags, marks=marks
            ),
        )

    def refusal(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str | None:
        for mark in image.object_of(descriptor, rec.FanotifyObject).marks:
            if not os.path.exists(mark.path):
                return f"{describe_fd(descriptor)} (its mark on {mark.path}, now gone)"
        return None

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        found = restore.image.object_of(descriptor, rec.FanotifyObject)
        group = fanotify.Group(
            found.flags,
            found.event_flags,
            tuple(
                fanotify.Mark(m.kind, m.mflags, m.mask, m.ignored_mask, m.path) for m in found.marks
            ),
        )
        try:
            made = fanotify.make_group(group)
        except HijackError as error:
            raise RestoreError(
                f"cannot make the fanotify group of {describe_fd(descriptor)} again: {error}"
            ) from None
        restore.give_made(made, descriptor)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        group = image.object_of(descriptor, rec.FanotifyObject)
        marks = ", ".join(
            f"{KIND_NAMES[m.kind]} {m.path} {m.mask:#x}"
            + (f" ignoring {m.ignored_mask:#x}" if m.ignored_mask else "")
            for m in group.marks
        )
        return f"flags {group.flags:#x}, marks: {marks or 'none'}"
