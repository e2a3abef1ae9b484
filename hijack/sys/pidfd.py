"""pidfds: stable handles on processes, and copying descriptors out of them."""

from __future__ import annotations

import os
import select

from hijack.sys.libc import raw_syscall


def pidfd_open(pid: int, flags: int = 0) -> int:
    """A pidfd of `pid`; `flags` may hold PIDFD_NONBLOCK (O_NONBLOCK)."""
    return raw_syscall("pidfd_open", pid, flags, pid=pid)


def pidfd_getfd(pidfd: int, target_fd: int, pid: int | None = None) -> int:
    """Duplicate descriptor `target_fd` of the process behind `pidfd` into this one."""
    return raw_syscall(
        "pidfd_getfd", pidfd, target_fd, 0, pid=pid, what=f"fd {target_fd} of process {pid}"
    )


def copy_fd(pid: int, target_fd: int) -> int:
    """Our own copy of descriptor `target_fd` of process `pid` (pidfd_open + pidfd_getfd)."""
    handle = pidfd_open(pid)
    try:
        return pidfd_getfd(handle, target_fd, pid)
    finally:
        os.close(handle)


def wait_exit(pidfd: int, timeout: float) -> bool:
    """True once the process behind `pidfd` has exited (pidfds poll readable then)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))
