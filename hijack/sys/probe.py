"""Harmless tries of the kernel features hijack relies on, for `hijack check`.

Each probe does the real thing on something of its own — a child it starts, its
own memory, a namespace nobody else sees — and undoes it, so that what it
reports is what this kernel and these privileges allow, not what a version
number suggests. A probe returns a short detail on success and raises
HijackError (or OSError) saying what failed otherwise.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess

from hijack.errors import HijackError
from hijack.sys import dirty, pidfd
from hijack.sys import ptrace as pt
from hijack.sys.errors import raise_for_errno
from hijack.sys.libc import libc, raw_syscall
from hijack.sys.stub import kill_stub, spawn_stub

PR_SET_MM = 35
PR_SET_MM_MAP_SIZE = 15
CLONE_NEWNET = 0x40000000
YAMA_SCOPE = "/proc/sys/kernel/yama/ptrace_scope"
NS_LAST_PID = "/proc/sys/kernel/ns_last_pid"
PID_MAX = "/proc/sys/kernel/pid_max"
# A free pid is looked for this far above the last one handed out, out of the
# way of processes starting meanwhile.
SET_TID_DISTANCE = 5000
SET_TID_TRIES = 8

# Capabilities by number (linux/capability.h).
CAPABILITIES = {
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_NET_ADMIN": 12,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_RESOURCE": 24,
    "CAP_CHECKPOINT_RESTORE": 40,
}


def effective_capabilities() -> set[str]:
    """The names of CAPABILITIES this process has in its effective set."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                mask = int(line.split()[1], 16)
                return {name for name, bit in CAPABILITIES.items() if mask >> bit & 1}
    return set()


def ptrace_scope() -> int | None:
    """Yama's ptrace_scope (0..3), None where Yama is not built in."""
    try:
        with open(YAMA_SCOPE) as scope:
            return int(scope.read())
    except FileNotFoundError:
        return None


def proc_shows_own_pids() -> str:
    """Whether /proc is mounted for the pid namespace hijack runs in: every pid hijack
    reads there, and the /proc/PID it reads, must be the pids it signals and forks."""
    own = os.getpid()
    try:
        shown = os.readlink("/proc/self")
    except OSError as exc:
        raise HijackError(f"/proc/self cannot be read: {exc.strerror}") from None
    if shown != str(own):
        raise HijackError(
            f"/proc is another pid namespace's: it shows this process as {shown}, not {own}"
            " (in a pid namespace of its own, mount /proc for it: unshare --mount-proc)"
        )
    return f"/proc shows this pid namespace (this process is {own} in both)"


def try_seize() -> str:
    """Seize, interrupt and release a child of ours (a `cat` reading its stdin)."""
    child = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        pt.seize(child.pid, 0)
        pt.interrupt(child.pid)
        result = pt.wait_for(child.pid)
        if result is None or not result.stopped:
            seen = result.describe() if result else "no answer"
            raise HijackError(f"a seized child did not stop ({seen})")
        pt.detach(child.pid)
        return "PTRACE_SEIZE and PTRACE_INTERRUPT of a child work"
    finally:
        child.kill()
        child.wait()


def _free_pid() -> int:
    with open(NS_LAST_PID) as last, open(PID_MAX) as limit:
        start, pid_max = int(last.read()), int(limit.read())
    for offset in range(SET_TID_DISTANCE, pid_max, 97):
        candidate = (start + offset) % pid_max
        if candidate > 300 and not os.path.exists(f"/proc/{candidate}"):
            return candidate
    raise HijackError("no free pid found to try clone3 with set_tid on")


def try_set_tid() -> str:
    """Start a restore stub under a pid we choose (clone3 set_tid), then end it."""
    for _ in range(SET_TID_TRIES):
        wanted = _free_pid()
        got = spawn_stub(wanted)
        kill_stub(got)
        if got == wanted:
            return f"clone3 with set_tid gave a stub pid {wanted}"
        # Taken between the look and the clone, or refused: spawn_stub falls back
        # to any pid in both cases; another free pid tells which.
    raise HijackError("clone3 with set_tid never gave the pid asked for")


def try_mm_map() -> str:
    """prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE): the kernel knows PR_SET_MM_MAP."""
    size = ctypes.c_uint(0)
    if libc.prctl(PR_SET_MM, PR_SET_MM_MAP_SIZE, ctypes.addressof(size), 0, 0) != 0:
        raise_for_errno(ctypes.get_errno(), "prctl(PR_SET_MM_MAP_SIZE)")
    return f"PR_SET_MM_MAP takes a {size.value}-byte prctl_mm_map"


def try_dirty_tracking() -> str:
    """A userfaultfd with async write-protection and a PAGEMAP_SCAN of our own memory."""
    uffd = raw_syscall("userfaultfd", dirty.USERFAULTFD_FLAGS)
    try:
        missing = dirty.TRACKING_FEATURES & ~dirty.negotiate_features(uffd)
    finally:
        os.close(uffd)
    if missing:
        raise HijackError(f"userfaultfd lacks feature bits {missing:#x} (WP_ASYNC, WP_UNPOPULATED)")
    with mmap.mmap(-1, mmap.PAGESIZE * 4) as region:
        region[0] = 1
        first_byte = ctypes.c_char.from_buffer(region)
        address = ctypes.addressof(first_byte)
        present = dirty.present_in(os.getpid(), address, address + len(region))
        del first_byte  # the mapping cannot close while ctypes holds a view of it
    if not present:
        raise HijackError("PAGEMAP_SCAN did not find a page just written")
    return "userfaultfd WP_ASYNC and PAGEMAP_SCAN work"


def try_pidfd_getfd() -> str:
    """pidfd_open + pidfd_getfd on ourselves."""
    handle = pidfd.pidfd_open(os.getpid())
    try:
        os.close(pidfd.pidfd_getfd(handle, handle, os.getpid()))
    finally:
        os.close(handle)
    return "pidfd_open and pidfd_getfd work"


def try_network_namespace() -> str:
    """A child of ours makes a network namespace of its own and exits."""
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only unshares and exits
        os._exit(0 if libc.unshare(CLONE_NEWNET) == 0 else 1)
    _, status = os.waitpid(child, 0)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        raise HijackError("unshare(CLONE_NEWNET) failed in a child")
    return "a network namespace can be made"
