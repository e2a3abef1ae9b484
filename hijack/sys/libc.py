"""ctypes access to the C library and to raw system calls."""

from __future__ import annotations

import ctypes
import errno as errno_codes

from hijack.sys.errors import raise_for_errno
from hijack.sys.syscall_numbers import SYSCALL_NUMBERS

libc = ctypes.CDLL(None, use_errno=True)


class Iovec(ctypes.Structure):
    """struct iovec."""

    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_syscall = libc.syscall
_syscall.restype = ctypes.c_long


def raw_syscall(name: str, *args: int, pid: int | None = None, what: str = "") -> int:
    """Call system call `name` in this process; raise a HijackError on failure."""
    while True:
        result = int(
            _syscall(ctypes.c_long(SYSCALL_NUMBERS[name]), *(ctypes.c_long(a) for a in args))
        )
        if result != -1:
            return result
        err = ctypes.get_errno()
        if err != errno_codes.EINTR:
            raise_for_errno(err, name, pid, what)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt(3) parameters


def keep_freed_memory(keep: int) -> None:
    """Have malloc keep up to `keep` bytes it freed for the next allocations, and serve
    blocks below that from its heap, instead of handing them back to the kernel at each
    free (a relay's buffers of 256 KiB were mapped, faulted in zeroed and trimmed again
    for every one: the system time of a bulk stream through Python's TLS)."""
    libc.mallopt(M_MMAP_THRESHOLD, keep)
    libc.mallopt(M_TRIM_THRESHOLD, keep)
