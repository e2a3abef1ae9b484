"""Whatever no other kind rebuilds (anonymous pipes, unix sockets, signalfd, ...):
refused by name, unless the process's shadow keeps it (or a move relays it)."""

from __future__ import annotations

from hijack.errors import RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import DumpContext, Kind, RestoreContext, describe_fd
from hijack.sys import procfs


class Other(Kind):
    name = "other"
    fd_kinds = tuple(rec.FdKind)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return True

    def refusal(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str | None:
        return describe_fd(descriptor)

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        raise RestoreError(f"cannot restore {describe_fd(descriptor)}")  # refused by the plan
