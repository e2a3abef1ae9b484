"""pidfds: stable handles on processes, and copying descriptors out of them."""

from __future__ import annotations

import select

from hijack.sys.libc import raw_syscall


def pidfd_open(pid: int) -> int:
    return raw_syscall("pidfd_open", pid, 0, pid=pid)


def pidfd_getfd(pidfd: int, target_fd: int, pid: int | None = None) -> int:
    """Duplicate descriptor `target_fd` of the process behind `pidfd` into this one."""
    return raw_syscall(
        "pidfd_getfd", pidfd, target_fd, 0, pid=pid, what=f"fd {target_fd} of process {pid}"
    )


def wait_exit(pidfd: int, timeout: float) -> bool:
    """True once the process behind `pidfd` has exited (pidfds poll readable then)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))
