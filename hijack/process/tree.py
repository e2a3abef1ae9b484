"""A process and all its descendants: the unit every command acts on.

The tree is read from /proc in one scan (this kernel has no
/proc/PID/task/TID/children: every process's stat is read once and the
parent links followed). A running tree changes while it is read — a member
forks, a child exits — so a reading is only final once every member is
stopped: callers freeze what they found and read again until two readings
agree (`same_members`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from hijack.errors import ProcessGone
from hijack.sys import kcmp, procfs


@dataclass(frozen=True, slots=True)
class Member:
    """One process of a tree, as /proc shows it."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str  # one letter, as in /proc/PID/stat: R, S, D, T, t, Z, ...
    exit_signal: int  # the signal its parent gets when it ends (SIGCHLD for a fork)
    comm: str
    threads: tuple[int, ...]  # ascending, the leader first; empty for a zombie

    @property
    def zombie(self) -> bool:
        return self.state == "Z"

    @property
    def stopped(self) -> bool:
        return self.state == "T"


@dataclass(frozen=True, slots=True)
class ProcessTree:
    """A root and its descendants, each parent before its children."""

    members: tuple[Member, ...]  # members[0] is the root

    @property
    def root(self) -> Member:
        return self.members[0]

    @property
    def pids(self) -> tuple[int, ...]:
        return tuple(member.pid for member in self.members)

    def member(self, pid: int) -> Member:
        for member in self.members:
            if member.pid == pid:
                return member
        raise KeyError(pid)

    def children_of(self, pid: int) -> tuple[Member, ...]:
        return tuple(member for member in self.members if member.ppid == pid)

    def depth_of(self, pid: int) -> int:
        """0 for the root, 1 for its children, and so on."""
        depth, member = 0, self.member(pid)
        while member.pid != self.root.pid:
            member, depth = self.member(member.ppid), depth + 1
        return depth

    def same_members(self, other: ProcessTree) -> bool:
        """Whether `other` holds the same processes with the same threads."""
        return {(m.pid, m.threads) for m in self.members} == {
            (m.pid, m.threads) for m in other.members
        }


def read_tree(root: int) -> ProcessTree:
    """The tree under process `root` now (ProcessGone if `root` does not exist)."""
    root_stat = procfs.read_stat(root)  # a root that does not exist is ProcessGone
    stats = {root: root_stat}
    children: dict[int, list[int]] = {}
    for pid in procfs.list_pids():
        if pid == root:
            continue
        try:
            stat = procfs.read_stat(pid)
        except ProcessGone:
            continue  # exited during the scan
        stats[pid] = stat
        children.setdefault(stat.ppid, []).append(pid)
    return _tree(root, stats, children)


def read_stopped_tree(root: int) -> ProcessTree:
    """read_tree of a tree whose members are stopped (frozen_tree's look once it seized
    them, to see whether a member forked before its stop): each member's children read
    from its /proc children files rather than by a scan of every process's stat (~20 ms
    a look on a loaded machine of 350 processes, within the freeze); read_tree where
    the kernel has no such files. A child not stopped yet is listed all the same: it is
    its stopped parent's list."""
    stats = {root: procfs.read_stat(root)}  # a root that does not exist is ProcessGone
    children: dict[int, list[int]] = {}
    level = [root]
    while level:
        below: list[int] = []
        for pid in level:
            try:
                listed = procfs.listed_children(pid)
            except ProcessGone:
                continue  # ended (a member's end is read_tree's to tell): no children
            if listed is None:
                return read_tree(root)
            for child in listed:
                try:
                    stats[child] = procfs.read_stat(child)
                except ProcessGone:
                    continue  # exited and reaped since
                children.setdefault(pid, []).append(child)
                below.append(child)
        level = below
    return _tree(root, stats, children)


def _tree(
    root: int, stats: dict[int, procfs.ProcStat], children: dict[int, list[int]]
) -> ProcessTree:
    """The tree below `root` as `children` lists it, each member from its `stats`."""
    members = [_member(stats[root])]
    for pid in _descendants(root, children):
        try:
            members.append(_member(stats[pid]))
        except ProcessGone:
            continue
    return ProcessTree(tuple(members))


def _descendants(root: int, children: dict[int, list[int]]) -> Iterator[int]:
    """Every descendant of `root`, breadth first: parents before their children."""
    level = sorted(children.get(root, []))
    while level:
        yield from level
        level = sorted(child for pid in level for child in children.get(pid, []))


def _member(stat: procfs.ProcStat) -> Member:
    threads: tuple[int, ...] = ()
    if stat.state != "Z":
        try:
            threads = tuple(procfs.list_threads(stat.pid))
        except ProcessGone:
            threads = ()
    return Member(
        pid=stat.pid,
        ppid=stat.ppid,
        pgid=stat.pgrp,
        sid=stat.session,
        state=stat.state,
        exit_signal=stat.exit_signal,
        comm=stat.comm,
        threads=threads,
    )


def untakeable(tree: ProcessTree) -> list[str]:
    """Why members of `tree` cannot be taken, one reason per member (empty: all can).

    Checked before anything is touched: a member traced by another tracer, in
    a pid namespace below ours (its pids there are not ours to give back), a
    kernel thread, hijack itself, or one waiting for its vfork child (a freeze would
    wait for the child's exec or exit).
    """
    ours = len(procfs.read_status(os.getpid()).nspid)
    reasons = []
    for member in tree.members:
        what = f"process {member.pid} ({member.comm})"
        if member.pid == os.getpid():
            reasons.append(f"{what} is hijack itself")
            continue
        try:
            if procfs.is_kernel_thread(member.pid):
                reasons.append(f"{what} is a kernel thread")
                continue
            if member.zombie:
                continue  # nothing to trace; its exit status is in its stat
            status = procfs.read_status(member.pid)
        except ProcessGone:
            continue  # gone since the reading: the next reading will not have it
        if status.tracer_pid not in (0, os.getpid()):
            tracer = _comm_or_gone(status.tracer_pid)
            reasons.append(f"{what} is traced by pid {status.tracer_pid} ({tracer})")
        elif len(status.nspid) > ours:
            reasons.append(f"{what} is in a pid namespace of its own")
        elif waiting := vfork_wait(member.pid, member.comm):
            reasons.append(waiting)
    return reasons


# How long a process waiting for its vfork child is given to be let go. A shell runs
# each command by vfork and exec: its child execs within microseconds (milliseconds on a
# loaded machine), and a pipeline caught in that instant was refused. A child that runs on
# instead of exec'ing keeps its parent unstoppable as long as it runs: that is refused.
VFORK_PATIENCE = 1.0
VFORK_POLL = 0.002


def vfork_wait(pid: int, comm: str) -> str:
    """Why process `pid` cannot be taken now if it waits for its vfork child (still, after
    VFORK_PATIENCE seconds); else ""."""
    deadline = time.monotonic() + VFORK_PATIENCE
    while procfs.waiting_for_vfork(pid) is not None:
        if time.monotonic() >= deadline:
            break
        time.sleep(VFORK_POLL)
    else:
        return ""
    return (
        f"process {pid} ({comm}) waits for its vfork child to exec or exit (no stop"
        " reaches it meanwhile): try again once it did"
    )


def _comm_or_gone(pid: int) -> str:
    try:
        return procfs.read_comm(pid)
    except ProcessGone:
        return "gone"


# The contexts a restore shares again, by the kcmp kind telling them: the member is cloned
# from its parent with the flag (CLONE_VM and CLONE_SIGHAND: once its parent's memory is
# built, docs/crf.md §7b).
CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
RESTORED_CONTEXTS = {
    kcmp.KCMP_VM: CLONE_VM,
    kcmp.KCMP_FILES: CLONE_FILES,
    kcmp.KCMP_FS: CLONE_FS,
    kcmp.KCMP_SIGHAND: CLONE_SIGHAND,
}


def shared_contexts(tree: ProcessTree) -> dict[int, int]:
    """The CLONE_VM, CLONE_FILES, CLONE_FS and CLONE_SIGHAND each living member of the
    stopped `tree` shares with its parent (a living member too), by pid; those sharing
    none are left out."""
    living = {member.pid for member in tree.members if not member.zombie}
    found = {}
    for member in tree.members[1:]:
        if member.pid not in living or member.ppid not in living:
            continue
        flags = 0
        for kind, flag in RESTORED_CONTEXTS.items():
            if kcmp.shares_context(member.ppid, member.pid, kind):
                flags |= flag
        if flags:
            found[member.pid] = flags
    return found


def shared_context_refusals(tree: ProcessTree) -> list[str]:
    """The members sharing a kernel context with another (clone with CLONE_VM, CLONE_FILES,
    CLONE_FS or CLONE_SIGHAND but not a thread) that a restore would make separate copies
    of: one reason per pair and context, for the stopped `tree`. A context shared along
    parent links (shared_contexts) is restored shared."""
    living = [member for member in tree.members if not member.zombie]
    with_parent = shared_contexts(tree)
    ppid = {member.pid: member.ppid for member in tree.members}

    def first_holder(pid: int, flag: int) -> int:
        """The member whose context of `flag` `pid` has, along parent links."""
        while with_parent.get(pid, 0) & flag:
            pid = ppid[pid]
        return pid

    reasons = []
    for index, member in enumerate(living):
        for other in living[:index]:
            for kind, what in kcmp.SHARED_CONTEXTS.items():
                if not kcmp.shares_context(other.pid, member.pid, kind):
                    continue
                flag = RESTORED_CONTEXTS.get(kind)
                if flag is None:
                    reasons.append(
                        f"process {member.pid} ({member.comm}) shares {what} with process"
                        f" {other.pid}: restoring that is not implemented yet"
                    )
                elif first_holder(member.pid, flag) != first_holder(other.pid, flag):
                    reasons.append(
                        f"process {member.pid} ({member.comm}) shares {what} with process"
                        f" {other.pid}, not as a child with its parent: restoring that is not"
                        " implemented yet"
                    )
    return reasons


def memory_sharers(tree: ProcessTree) -> list[str]:
    """The members of `tree` sharing their parent's memory (CLONE_VM, not a thread), one
    line each: a move takes such a tree frozen whole, without pre-copy (its rounds and
    prebuilt stubs are one memory per member; the destination builds that memory once,
    from the parent's image, as a restore does)."""
    living = {member.pid for member in tree.members if not member.zombie}
    return [
        f"process {member.pid} ({member.comm}) shares its memory (CLONE_VM) with its parent"
        f" {member.ppid}"
        for member in tree.members[1:]
        if member.pid in living
        and member.ppid in living
        and kcmp.shares_context(member.ppid, member.pid, kcmp.KCMP_VM)
    ]
