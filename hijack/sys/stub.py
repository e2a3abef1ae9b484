"""The stub a restore builds a process in: a traced child stopped right after exec.

At the exec trap of a freshly exec'd program, nothing of it has run yet: no TLS,
no rseq, no libc state (KERNEL-NOTES). What it has is an address space the
restorer empties and refills, and a vdso with a `syscall` instruction to inject
through.

clone3 with set_tid gives the stub the pid the image had when that pid is free.
The child side runs a few lines of Python between clone3 and execve: the call
is made through ctypes.PyDLL, which keeps the GIL held across it, so the child
starts with the GIL owned by its only thread.
"""

from __future__ import annotations

import ctypes
import errno as errno_codes
import os
import signal
import time

from hijack.errors import HijackError, ProcessGone
from hijack.sys import procfs
from hijack.sys import ptrace as pt
from hijack.sys.errors import raise_for_errno
from hijack.sys.syscall_numbers import SYSCALL_NUMBERS

STUB_PROGRAM = "/bin/true"
CLONE_NEWNS = 0x00020000
ORPHAN_REAP_WAIT = 5.0  # seconds
STUB_OPTIONS = pt.PTRACE_O_TRACESYSGOOD | pt.PTRACE_O_TRACECLONE | pt.PTRACE_O_EXITKILL

_python_libc = ctypes.PyDLL(None, use_errno=True)
_syscall_holding_gil = _python_libc.syscall
_syscall_holding_gil.restype = ctypes.c_long


class _CloneArgs(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("pidfd", ctypes.c_uint64),
        ("child_tid", ctypes.c_uint64),
        ("parent_tid", ctypes.c_uint64),
        ("exit_signal", ctypes.c_uint64),
        ("stack", ctypes.c_uint64),
        ("stack_size", ctypes.c_uint64),
        ("tls", ctypes.c_uint64),
        ("set_tid", ctypes.c_uint64),
        ("set_tid_size", ctypes.c_uint64),
        ("cgroup", ctypes.c_uint64),
    ]


def fork_with_pid(wanted_pid: int | None) -> int:
    """fork() through clone3, with pid `wanted_pid` if given; -errno on failure. The child
    holds the GIL and must exec (or _exit) at once."""
    set_tid = (ctypes.c_int32 * 1)(wanted_pid or 0)
    args = _CloneArgs(exit_signal=signal.SIGCHLD)
    if wanted_pid:
        args.set_tid = ctypes.addressof(set_tid)
        args.set_tid_size = 1
    result = int(
        _syscall_holding_gil(
            ctypes.c_long(SYSCALL_NUMBERS["clone3"]),
            ctypes.c_void_p(ctypes.addressof(args)),
            ctypes.c_size_t(ctypes.sizeof(args)),
        )
    )
    return -ctypes.get_errno() if result < 0 else result


def _become_stub(mount_namespace: int | None) -> None:
    """In the child: enter `mount_namespace` (a descriptor of one) if given, ask to be
    traced and exec the stub program. Never returns."""
    try:
        if mount_namespace is not None:
            number = ctypes.c_long(SYSCALL_NUMBERS["setns"])
            if _syscall_holding_gil(number, ctypes.c_long(mount_namespace), CLONE_NEWNS) != 0:
                os._exit(126)  # the parent sees no exec trap: a failed stub
        pt.traceme()
        os.execv(STUB_PROGRAM, [STUB_PROGRAM])
    finally:
        os._exit(127)


def spawn_stub(wanted_pid: int | None, mount_namespace: int | None = None) -> int:
    """Start a traced stub, stopped at its exec trap; return its pid.

    It gets `wanted_pid` when that pid is free, and any pid otherwise. With
    `mount_namespace` (a descriptor of /proc/PID/ns/mnt) it lives in that
    mount namespace, entered before its exec: every path the restore opens
    in it, and the process's own later, is looked up there.
    """
    if wanted_pid:
        wait_for_orphan_reaped(wanted_pid)
    pid = fork_with_pid(wanted_pid) if wanted_pid else -errno_codes.EEXIST
    if pid in (-errno_codes.EEXIST, -errno_codes.EINVAL):
        pid = fork_with_pid(None)  # the old pid is taken (or never existed here)
    if pid < 0:
        raise_for_errno(-pid, "clone3")
    if pid == 0:
        _become_stub(mount_namespace)
    result = pt.wait_for(pid)
    if result is None or not result.stopped or result.stop_signal != signal.SIGTRAP:
        reason = result.describe() if result else "did not stop"
        raise HijackError(f"the restore stub {pid} {reason} instead of stopping at exec")
    pt.set_options(pid, STUB_OPTIONS)
    return pid


def wait_for_orphan_reaped(pid: int) -> None:
    """Give the reaper of a dead orphan holding `pid` a moment to reap it.

    A process killed by `dump --kill` stays a zombie until its parent reaps
    it; an orphan's parent is init, which does so soon but not at once (up to
    two seconds with the init of a firecracker VM, measured). A restore run
    right after the dump would otherwise give the process a fresh pid. A
    zombie whose living parent has not reaped it may never be reaped: that is
    not waited for.
    """
    deadline = time.monotonic() + ORPHAN_REAP_WAIT
    while time.monotonic() < deadline:
        try:
            stat = procfs.read_stat(pid)
        except ProcessGone:
            return
        if stat.state != "Z" or stat.ppid != 1:
            return
        time.sleep(0.02)  # no descriptor tells of a reap by another process


def kill_stub(pid: int) -> None:
    """Kill a stub that will not be finished and reap it (it is our child)."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while True:
        try:
            reaped, status = os.waitpid(pid, 0x40000000)  # __WALL
        except ChildProcessError:
            return
        if reaped == pid and (os.WIFEXITED(status) or os.WIFSIGNALED(status)):
            return
