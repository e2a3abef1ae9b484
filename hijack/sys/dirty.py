"""Which pages a process wrote: userfaultfd write-protection, async mode, read by PAGEMAP_SCAN.

No soft-dirty bits on this kernel (KERNEL-NOTES, "Tracking dirty pages"). A
userfaultfd registered in write-protect mode with UFFD_FEATURE_WP_ASYNC needs
no fault handler: a write to a protected page just clears its protection, and
PAGEMAP_SCAN on /proc/PID/pagemap reports the pages without it ("written"),
protecting them again as it goes (PM_SCAN_WP_MATCHING).

The userfaultfd must be made in the target's own memory, so its creation is a
sequence of injected calls (hijack.mutator.precopy); this module holds the
kernel's structures and the scan, which works from outside the process.
"""

from __future__ import annotations

import ctypes
import os
import struct

from hijack.sys.errors import raise_for_errno
from hijack.sys.libc import libc


def _iowr(kind: int, number: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | number


UFFD_API = 0xAA
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFDIO_REGISTER_MODE_WP = 2
# struct uffdio_api {api, features, ioctls}; struct uffdio_register {start, len, mode, ioctls}
UFFDIO_API_STRUCT = struct.Struct("<3Q")
UFFDIO_REGISTER_STRUCT = struct.Struct("<4Q")
UFFDIO_API = _iowr(UFFD_API, 0x3F, UFFDIO_API_STRUCT.size)
UFFDIO_REGISTER = _iowr(UFFD_API, 0x00, UFFDIO_REGISTER_STRUCT.size)
UFFD_USER_MODE_ONLY = 1  # what an unprivileged process may have (vm.unprivileged_userfaultfd=0)
USERFAULTFD_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY
TRACKING_FEATURES = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED

PM_SCAN_WP_MATCHING = 1 << 0
PAGE_IS_WPALLOWED = 1 << 0  # in a range registered for async write-protection
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_GUARD = 1 << 8  # Linux 6.14+: a page of a MADV_GUARD_INSTALL region
USER_SPACE_END = 0x7FFFFFFFF000
REGIONS_PER_CALL = 4096


class _ScanArgument(ctypes.Structure):
    """struct pm_scan_arg (include/uapi/linux/fs.h)."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "size",
            "flags",
            "start",
            "end",
            "walk_end",
            "vec",
            "vec_len",
            "max_pages",
            "category_inverted",
            "category_mask",
            "category_anyof_mask",
            "return_mask",
        )
    ]


class _PageRegion(ctypes.Structure):
    _fields_ = [
        ("start", ctypes.c_uint64),
        ("end", ctypes.c_uint64),
        ("categories", ctypes.c_uint64),
    ]


PAGEMAP_SCAN = _iowr(ord("f"), 16, ctypes.sizeof(_ScanArgument))

_ioctl = libc.ioctl
_ioctl.restype = ctypes.c_int


def negotiate_features(uffd: int) -> int:
    """UFFDIO_API on our own userfaultfd asking for the tracking features: those granted."""
    api = bytearray(UFFDIO_API_STRUCT.pack(UFFD_API, TRACKING_FEATURES, 0))
    buffer = (ctypes.c_char * len(api)).from_buffer(api)
    if _ioctl(uffd, UFFDIO_API, buffer) != 0:
        raise_for_errno(ctypes.get_errno(), "ioctl(UFFDIO_API)")
    del buffer
    features: int = UFFDIO_API_STRUCT.unpack(api)[1]
    return features


def present_in(pid: int, start: int, end: int) -> list[tuple[int, int]]:
    """The present pages of [start, end) of `pid`, by PAGEMAP_SCAN (no tracking needed)."""
    scanner = WrittenPages(pid, -1)
    try:
        return scanner._scan(start, end, PAGE_IS_PRESENT)
    finally:
        scanner.close()


def guard_regions(pid: int) -> list[tuple[int, int]]:
    """The [start, end) runs of `pid`'s memory made guard pages (MADV_GUARD_INSTALL)."""
    scanner = WrittenPages(pid, -1)
    try:
        return scanner._scan(0, USER_SPACE_END, PAGE_IS_GUARD)
    finally:
        scanner.close()


class WrittenPages:
    """The pages `pid` writes from now on, over its userfaultfd `uffd` (ours; closed by close()).

    Tracking lasts while the userfaultfd is open: closing it unregisters every
    range and lifts every protection, so the process goes on as if never watched.
    """

    def __init__(self, pid: int, uffd: int) -> None:
        self.pid = pid
        self.uffd = uffd
        self._pagemap = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self._regions = (_PageRegion * REGIONS_PER_CALL)()

    def collect(self) -> list[tuple[int, int]]:
        """[start, end) runs written since the last collect (the first: every present page),
        protected again for the next one."""
        return self._scan(0, USER_SPACE_END, PAGE_IS_WRITTEN, wp=True)

    def untracked(self) -> list[tuple[int, int]]:
        """The mapped ranges not registered for tracking: mappings made, replaced or moved
        since (and shared ones). Quick: the kernel skips every registered mapping whole.
        Mappings without pages (the vdso's) are not listed."""
        return self._scan(0, USER_SPACE_END, PAGE_IS_WPALLOWED, inverted=PAGE_IS_WPALLOWED)

    def absent(self, start: int, end: int) -> list[tuple[int, int]]:
        """The pages of [start, end) neither present nor swapped (in anonymous memory: zero)."""
        gone = PAGE_IS_PRESENT | PAGE_IS_SWAPPED
        return self._scan(start, end, gone, inverted=gone)

    def _scan(
        self, start: int, end: int, category: int, *, inverted: int = 0, wp: bool = False
    ) -> list[tuple[int, int]]:
        """Merged runs of the pages of [start, end) in `category` (after `inverted` flips)."""
        runs: list[tuple[int, int]] = []
        argument = _ScanArgument(
            size=ctypes.sizeof(_ScanArgument),
            flags=PM_SCAN_WP_MATCHING if wp else 0,
            start=start,
            end=end,
            vec=ctypes.addressof(self._regions),
            vec_len=REGIONS_PER_CALL,
            category_inverted=inverted,
            category_mask=category,
            return_mask=category,
        )
        while argument.start < argument.end:
            found = _ioctl(self._pagemap, PAGEMAP_SCAN, ctypes.byref(argument))
            if found < 0:
                raise_for_errno(ctypes.get_errno(), "ioctl(PAGEMAP_SCAN)", self.pid)
            for region in self._regions[:found]:
                if runs and runs[-1][1] == region.start:
                    runs[-1] = (runs[-1][0], region.end)
                else:
                    runs.append((region.start, region.end))
            if argument.walk_end <= argument.start:
                break
            argument.start = argument.walk_end
        return runs

    def close(self) -> None:
        """End the tracking (safe to call twice)."""
        for fd in (self._pagemap, self.uffd):
            if fd >= 0:
                os.close(fd)
        self._pagemap = self.uffd = -1
