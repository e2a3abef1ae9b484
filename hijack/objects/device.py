"""Character and block devices (not terminals), reopened by path."""

from __future__ import annotations

from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import DumpContext, Kind, RestoreContext
from hijack.objects.regular import path_refusal, reopen, reopen_flags, reopens_queued
from hijack.sys import procfs

O_NOCTTY = 0o400


class Device(Kind):
    name = "device"
    fd_kinds = (rec.FdKind.CHARDEV, rec.FdKind.BLOCKDEV)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return entry.kind in (procfs.FdKind.CHARDEV, procfs.FdKind.BLOCKDEV)

    def refusal(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str | None:
        return path_refusal(descriptor)

    def queues_only(self, descriptor: rec.FileDescriptor) -> bool:
        return reopens_queued(descriptor)

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        # Never acquire a controlling terminal by restoring.
        flags = reopen_flags(descriptor) | O_NOCTTY
        reopen(restore, descriptor, flags)
