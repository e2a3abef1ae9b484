"""Find, kill and reap processes a test left behind.

The pytest process is a child subreaper (conftest), so everything a test
starts stays its descendant even when an intermediate parent exits (a shadow
forked inside a fixture, a double-forked daemon). A descendant that appeared
during a test and is still there afterwards is a leak. Processes are named by
(pid, start time) so a recycled pid is never mistaken for the one recorded.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass

from hijack.sys.process import WALL

ProcessKey = tuple[int, int]


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    ppid: int
    state: str
    start_time: int  # clock ticks after boot: with pid, names one process over time
    cmdline: str

    @property
    def key(self) -> ProcessKey:
        return (self.pid, self.start_time)

    def describe(self) -> str:
        return f"pid {self.pid} (ppid {self.ppid}, state {self.state}): {self.cmdline}"


def read_process(pid: int) -> ProcessInfo | None:
    """/proc/PID/stat and cmdline, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline_file:
            raw_cmdline = cmdline_file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    cmdline = raw_cmdline.replace(b"\0", b" ").decode(errors="replace").strip()
    return ProcessInfo(
        pid=pid,
        ppid=int(fields[1]),
        state=fields[0],
        start_time=int(fields[19]),
        cmdline=cmdline or f"[{comm}]",
    )


def process_table() -> dict[int, ProcessInfo]:
    table: dict[int, ProcessInfo] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := read_process(int(entry))) is not None:
            table[info.pid] = info
    return table


def descendants(root_pid: int) -> list[ProcessInfo]:
    """Every process below root_pid (children, their children, ...), zombies included."""
    children: dict[int, list[ProcessInfo]] = {}
    for info in process_table().values():
        children.setdefault(info.ppid, []).append(info)
    found: list[ProcessInfo] = []
    pending = [root_pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child.pid)
    return found


def snapshot_descendants(root_pid: int) -> frozenset[ProcessKey]:
    return frozenset(info.key for info in descendants(root_pid))


def reap_new_zombies(root_pid: int, baseline: frozenset[ProcessKey]) -> None:
    """Reap root_pid's exited children that are not in `baseline`.

    Baseline children (a session-scoped daemon) are left for their owner,
    whose Popen still wants the exit status.
    """
    for info in descendants(root_pid):
        if info.ppid == root_pid and info.state == "Z" and info.key not in baseline:
            # ChildProcessError: someone else reaped it meanwhile.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(info.pid, os.WNOHANG | WALL)


ZOMBIE_GRACE = 2.0  # seconds a live parent (not us) has to reap a child that just exited


def find_leaked_processes(root_pid: int, baseline: frozenset[ProcessKey]) -> list[ProcessInfo]:
    """Descendants of root_pid that are not in `baseline`, after reaping exited children.

    A zombie whose parent is another process of ours that outlives the test (a shadow
    host, a daemon) is that parent's to reap, in its own time: it gets ZOMBIE_GRACE to,
    before it counts (one caught between its exit and its parent's wait is no leak)."""
    deadline = time.monotonic() + ZOMBIE_GRACE
    while True:
        reap_new_zombies(root_pid, baseline)
        leaked = [info for info in descendants(root_pid) if info.key not in baseline]
        reaped_elsewhere = all(i.state == "Z" and i.ppid != root_pid for i in leaked)
        if not leaked or not reaped_elsewhere or time.monotonic() > deadline:
            return leaked
        time.sleep(0.02)


def kill_and_reap(
    leaked: Sequence[ProcessInfo],
    root_pid: int,
    baseline: frozenset[ProcessKey],
    timeout: float = 10.0,
) -> list[ProcessInfo]:
    """SIGKILL each leaked process, wait for them to die, reap them; return any survivors.

    A survivor is one still running after `timeout`, or a zombie of a parent
    that is not ours to reap.
    """
    pidfds: dict[int, ProcessInfo] = {}
    for info in leaked:
        try:
            pidfd = os.pidfd_open(info.pid)
        except ProcessLookupError:
            continue
        current = read_process(info.pid)
        if current is None or current.key != info.key:
            os.close(pidfd)  # gone, and the pid already recycled
            continue
        # ProcessLookupError: exited (a zombie) already; still waited for below.
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        pidfds[pidfd] = info

    # A pidfd turns readable when its process has exited; orphaned zombies are
    # reparented to us before that, so once all are readable, all are reapable.
    deadline = time.monotonic() + timeout
    while pidfds:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        exited, _, _ = select.select(list(pidfds), [], [], remaining)
        for pidfd in exited:
            del pidfds[pidfd]
            os.close(pidfd)
    for pidfd in pidfds:
        os.close(pidfd)

    reap_new_zombies(root_pid, baseline)
    leaked_keys = {info.key for info in leaked}
    return [info for info in descendants(root_pid) if info.key in leaked_keys]
