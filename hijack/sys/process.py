"""Process-wide kernel calls: prctl, signals by pid, waiting."""

from __future__ import annotations

import ctypes
import os

from hijack.sys.errors import kernel_call, raise_for_errno
from hijack.sys.libc import libc, raw_syscall

PR_SET_CHILD_SUBREAPER = 36

_prctl = libc.prctl
_prctl.restype = ctypes.c_int
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def set_child_subreaper() -> None:
    """Make orphaned descendants of this process its children, so it can reap them.

    PID 1 on these machines does not reap orphans promptly; whoever starts
    processes that may be orphaned (a shadow whose intermediate parent exited)
    takes them in instead.
    """
    if _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise_for_errno(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def get_robust_list(tid: int) -> tuple[int, int]:
    """get_robust_list(2) of another thread: (list head address, head size)."""
    head = ctypes.c_uint64()
    length = ctypes.c_size_t()
    raw_syscall(
        "get_robust_list",
        tid,
        ctypes.addressof(head),
        ctypes.addressof(length),
        pid=tid,
        what=f"thread {tid}",
    )
    return head.value, length.value


def send_signal(pid: int, signal_number: int) -> None:
    with kernel_call("kill", pid):
        os.kill(pid, signal_number)


WALL = 0x40000000  # __WALL: wait for threads and non-SIGCHLD children too
