"""Freezing a whole process tree: every member and every thread stopped at once.

A running tree changes while it is read (a member forks, a child exits), but
a stopped process can neither fork nor exit: members found are seized and the
tree read again until a reading finds nothing new. What cannot be taken
(hijack.process.tree.untakeable) is refused by name before the first seize.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

from hijack.errors import NotAttachable, ProcessGone
from hijack.image import records as rec
from hijack.mutator.tracee import Tracee
from hijack.process.tree import (
    Member,
    ProcessTree,
    read_stopped_tree,
    read_tree,
    shared_contexts,
    untakeable,
)
from hijack.sys import kcmp, procfs

MAX_READINGS = 50  # a tree that still changes after this many is forking faster than we stop it


@dataclass(frozen=True)
class FrozenTree:
    tree: ProcessTree  # the final reading (under ptrace: stopped members read as 't')
    tracees: dict[int, Tracee]  # every member but the zombies, by pid
    record: rec.Tree  # the tree as its image records it (states from before the freeze)


@contextmanager
def frozen_tree(root: int) -> Iterator[FrozenTree]:
    """Seize `root` and all its descendants; release them all when the block ends.

    Raises NotAttachable naming every member that cannot be taken, before
    anything is touched; ProcessGone if `root` does not exist.
    """
    with ExitStack() as stack:
        tracees: dict[int, Tracee] = {}
        first_state: dict[int, str] = {}
        for _ in range(MAX_READINGS):
            tree = read_tree(root)
            if tree.root.zombie:  # it ended before we stopped it (its parent has not reaped it)
                raise NotAttachable(f"process {root} ({tree.root.comm}) is a zombie", pid=root)
            reasons = untakeable(tree)
            if reasons:
                raise NotAttachable(f"cannot take the tree of process {root}: {'; '.join(reasons)}")
            for member in tree.members:
                first_state.setdefault(member.pid, member.state)
            for member in tree.members:
                if member.zombie or member.pid in tracees:
                    continue
                try:
                    tracees[member.pid] = stack.enter_context(
                        Tracee.seize(member.pid, job_stopped=True)
                    )
                except ProcessGone:
                    if member.pid == root:
                        raise
                except NotAttachable:
                    # A member that exited since the reading (a shell's short-lived
                    # child) is a zombie now: the next reading records it as one.
                    if member.pid == root or not has_exited(member.pid):
                        raise
            # Every member seized and stopped: their children read from their own lists.
            again = read_stopped_tree(root)
            settled = again.same_members(tree) and all(
                m.pid in tracees for m in again.members if not m.zombie
            )
            if settled:
                break
        else:
            raise NotAttachable(
                f"the tree of process {root} kept changing over {MAX_READINGS} readings"
            )
        members = again.members
        yield FrozenTree(
            tree=again,
            tracees={m.pid: tracees[m.pid] for m in members if not m.zombie},
            record=rec.Tree(
                members=tuple(_recorded(m, first_state[m.pid]) for m in members),
                shared=_shared_descriptions(again),
                contexts=tuple(
                    rec.SharedContext(pid=pid, flags=rec.CloneFlags(flags))
                    for pid, flags in shared_contexts(again).items()
                ),
            ),
        )


def relations_now(root: int) -> rec.Tree:
    """The tree of `root` as its image would record it, read while it runs (no shared
    descriptions): what a destination forks its stubs by before the freeze, which
    checks the frozen tree is still this one."""
    tree = read_tree(root)
    return rec.Tree(
        members=tuple(_recorded(m, m.state) for m in tree.members),
        contexts=tuple(
            rec.SharedContext(pid=pid, flags=rec.CloneFlags(flags))
            for pid, flags in shared_contexts(tree).items()
        ),
    )


def has_exited(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie now, or reaped already)."""
    try:
        return procfs.read_stat(pid).state in ("Z", "X")
    except ProcessGone:
        return True  # reaped already: as good as a zombie for the next reading


def _shared_descriptions(tree: ProcessTree) -> tuple[rec.SharedDescription, ...]:
    """The open file descriptions members share (docs/crf.md §7b), read while all stop."""
    shared = kcmp.descriptions_across(
        [
            (m.pid, [(e.fd, e.dev, e.ino) for e in procfs.list_fds(m.pid)])
            for m in tree.members
            if not m.zombie
        ]
    )
    return tuple(
        rec.SharedDescription(pid=pid, fd=fd, holder_pid=holder_pid, holder_fd=holder_fd)
        for (pid, fd), (holder_pid, holder_fd) in shared.items()
    )


def _recorded(member: Member, state_before: str) -> rec.TreeMember:
    if member.zombie:
        state, exit_code = rec.MemberState.ZOMBIE, procfs.read_stat(member.pid).exit_code
    elif state_before == "T":
        state, exit_code = rec.MemberState.STOPPED, 0
    else:
        state, exit_code = rec.MemberState.RUNNING, 0
    return rec.TreeMember(
        pid=member.pid,
        ppid=member.ppid,
        pgid=member.pgid,
        sid=member.sid,
        exit_signal=member.exit_signal,
        exit_code=exit_code,
        state=state,
        comm=member.comm,
    )
