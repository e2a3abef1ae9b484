"""A file's pages sent to its disk as they are written, not all at its sync.

An image is synced before it is put in place (and before a `dump --kill` ends the
process): a sync after a GiB was written waits for the whole GiB to reach the disk
(~0.27 s here). sync_file_range(SYNC_FILE_RANGE_WRITE) starts the writeback of the
pages written so far without waiting for it, so the disk works while the image is
still being made and the sync at the end finds little left.
"""

from __future__ import annotations

import contextlib
import io

from hijack.errors import HijackError
from hijack.sys.libc import raw_syscall

SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_EVERY = 8 * 1024 * 1024  # bytes written between two starts


def start_writeback(fd: int, offset: int = 0, length: int = 0) -> None:
    """Have the kernel start writing the dirty pages of file `fd` in [offset, offset +
    length) (length 0: to its end) to its disk now, without waiting. Only sooner: a
    failure is ignored (the sync at the end writes them all the same)."""
    with contextlib.suppress(HijackError):
        raw_syscall("sync_file_range", fd, offset, length, SYNC_FILE_RANGE_WRITE)


class WritebackFile(io.BufferedWriter):
    """A file written through a buffer whose written pages start going to the disk every
    WRITEBACK_EVERY bytes (what is written around it, e.g. by splice(2), too)."""

    def __init__(self, raw: io.FileIO) -> None:
        super().__init__(raw)
        self._since = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        written = super().write(data)
        self._since += written
        if self._since >= WRITEBACK_EVERY:
            self._since = 0
            start_writeback(self.fileno())
        return written
