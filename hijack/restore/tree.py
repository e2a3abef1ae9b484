"""`hijack restore` of a tree stream (docs/crf.md §7b): every member back, with its relations.

As CRIU does, each member's memory is built before its children are forked, and
the rest of every member once the whole tree is:

1. Refusals, before anything is made: a member's pid taken (unless new pids are
   asked for), relations this version cannot make (relation_refusals).
2. The root's stub is spawned as a single process's is (hijack.sys.stub). Then,
   member by member in stream order (parents first), its memory is rebuilt
   (restorer.build_member_memory: layout and pages) and its children are forked
   from its stub, each by a clone3 injected into it (flags 0, its exit signal,
   set_tid its pid), traced by us from birth (PTRACE_O_TRACEFORK). A child so
   inherits its parent's private memory copy-on-write, and keeps what its own
   image says is still the parent's (hijack.restore.address_space): a tree that
   shared pages since a fork shares them again, not a copy per member. A session
   leader calls setsid as soon as it exists, before its children are forked
   (they inherit its session). A member sharing its parent's descriptor table or
   fs context (CLONE_FILES, CLONE_FS; TREE's `contexts`) is cloned with those
   flags: the stubs share them from birth (nothing is in them yet). A member
   sharing its parent's memory (CLONE_VM, with CLONE_SIGHAND if it shares its
   signal actions) is cloned with those flags once the parent's memory is
   built, and builds none (its image has no pages): its stub gets a scratch
   area of its own in that memory, and its finish leaves what is the memory's
   (and the signal actions) to its parent's.
3. Every stub forked: groups are made, leaders first (a group whose leader has
   exited gets a stand-in leader under its id, a sibling of its first member,
   which exits and is reaped once they joined). A zombie takes its name and
   exits with its wait status, untraced, so that its parent (its stub, later the
   restored process) reaps it; the exit signal it sent the stub is taken back,
   the original parent had it long ago.
4. Each member is finished as a single process is (restorer.finish_member:
   descriptors, threads, signals, credentials...), what members share made once
   (hijack.restore.shared); a member sharing its parent's descriptor table finds
   its descriptors made.
5. Every member starts, children first; a member that was stopped is stopped
   again, and its parent's stub (not started yet) takes back the wait report
   and the SIGCHLD that stop gave it.

A move with pre-copy does steps 1 to 3 before the freeze, from its rounds
(prebuild_tree, in the same order: each child forked from its filled parent,
each stub's exe link set then): its final image is rebuilt into those stubs if
the frozen tree is the one they were forked as (PrebuiltTree.fits), else they
are killed and the tree made anew. Into those stubs, step 4 is done for each
member as soon as its memory is rebuilt, while the next members' images still
come (every stub is forked: none inherits what a finish makes), but for a
post-copy's; what a finish writes into a member's memory waits for the last.

A failure at any step kills every stub made: never half a tree.
"""

from __future__ import annotations

import functools
import itertools
import os
import select
import signal
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO

from hijack.errors import ImageError, RestoreError
from hijack.image import records as rec
from hijack.image.codec import next_is_round, read_stream
from hijack.mutator.tracee import ALL_SIGNALS_BLOCKED, ThreadState, find_syscall_instruction
from hijack.registry import MemberRecord, Registry
from hijack.restore.address_space import AddressSpace, find_hole
from hijack.restore.precopy import set_exe
from hijack.restore.remote import SCRATCH_PROT, SCRATCH_SIZE, Stub
from hijack.restore.restorer import (
    CLONE_ARGS,
    Admit,
    MemberMemory,
    Rebuilt,
    RestoreResult,
    build_member_memory,
    finish_member,
    holder_of,
    lend,
    record_restored,
    restore,
    restore_rounds,
    start,
)
from hijack.restore.shared import TreeShared
from hijack.restore.tree_rounds import TreeRounds
from hijack.sys import pidfd, procfs
from hijack.sys import ptrace as pt
from hijack.sys.stub import STUB_OPTIONS, kill_stub, spawn_stub, wait_for_orphan_reaped
from hijack.sys.syscall_numbers import SYSCALL_NUMBERS
from hijack.testpoint import reached
from hijack.timing import Laps

if TYPE_CHECKING:  # (for its type only: it imports the dump, which imports the restorer)
    from hijack.restore.postcopy import LazyPages

EEXIST = 17
TIOCSCTTY, TIOCSPGRP = 0x540E, 0x5410
PR_SET_NAME = 15
SIG_DFL = 0
PAGE_SIZE, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS = 4096, 0x3, 0x22
MAP_FIXED_NOREPLACE = 0x100000
P_PID, WSTOPPED, WNOHANG = 1, 2, 1
STUB_EXIT_WAIT = 5.0  # seconds for a zombie's or a stand-in's stub to exit once let go
WALL = 0x40000000
# Where the injected calls that fork the tree find room for their arguments: the
# pristine stub's stack, below what exec put there (its stack mapping is 128 KiB at least).
STACK_SCRATCH_BELOW = 96 * 1024


@dataclass(frozen=True)
class TreeRestoreResult:
    members: tuple[RestoreResult, ...]  # the restored processes, root first
    zombies: tuple[tuple[int, int], ...]  # (pid in the image, pid now) of each zombie

    @property
    def root(self) -> RestoreResult:
        return self.members[0]


@dataclass(frozen=True)
class TreeMove:
    """What a move's daemon gives a tree it restores (restore()'s `provided`, `admit`,
    `before_start` and `mount_namespace`, hijack.restore.restorer, for a tree)."""

    # (member's pid in the image, descriptor number) -> our descriptor it gets instead
    given: dict[tuple[int, int], int] = field(default_factory=dict)
    admit: Admit | None = None
    # Once every member is rebuilt, before any starts: old pid -> pid now (raises to abort).
    before_start: Callable[[dict[int, int]], None] | None = None
    mount_namespace: int | None = None
    # The members' pages a pre-copy sent (hijack.restore.tree_rounds), if it came first.
    rounds: TreeRounds | None = None
    # The pty standing for the root's controlling terminal (its slave's path), if it had
    # one: the root leads a session and takes it before its children are forked, who
    # inherit it; `foreground`, the group (its id in the image) in the foreground there.
    controlling: str = ""
    foreground: int = 0
    # The tree of stubs the rounds built before the freeze (prebuild_tree), if any.
    prebuilt: PrebuiltTree | None = None
    laps: Laps | None = None  # the move's, on the destination (hijack.timing)
    # A post-copy move: given a member (its pid in the image), its segments in the image
    # and the pids of every member here, the pages it left on the source (or None).
    lazy: Callable[[int, tuple[rec.Segment, ...], list[int]], LazyPages | None] | None = None

    def provided(self, member: int) -> dict[int, int]:
        return {fd: ours for (pid, fd), ours in self.given.items() if pid == member}


@dataclass
class _Made:
    """The stubs of a tree being restored, by the pid each member had."""

    stubs: dict[int, Stub] = field(default_factory=dict)  # living members, by old pid
    pids: dict[int, int] = field(default_factory=dict)  # every member made: old pid -> new

    def kill_all(self) -> None:
        """Kill every member made, children before their parents (the root is our child,
        reaped; the others are reaped by their tracer's wait, or by init)."""
        for stub in reversed(list(self.stubs.values())):
            kill_stub(stub.pid)


class PrebuiltTree:
    """A moving tree's stubs, forked with its relations and laid out and filled from its
    pre-copy rounds while the originals still run (prebuild_tree): the freeze then only
    turns each one's layout into its final image's and writes what changed since, as a
    single process's pre-copied stub (hijack.restore.precopy). Its pids are decided
    here, once for all: the old ones if every one is free, else fresh ones."""

    def __init__(self, tree: rec.Tree, made: _Made, spaces: dict[int, AddressSpace]) -> None:
        self.tree = tree  # as the mover read it, running, after its last round
        self.made = made
        self.spaces = spaces  # by pid at the source: the members the rounds sent
        self.taken = False  # the final restore owns the stubs now (or they are killed)
        self.used = False  # the final restore was into them (else: the frozen tree differed)
        # The file each stub's exe link names (set_exe, or inherited from its parent's
        # stub at its fork), by pid at the source: the final restore leaves it if the
        # image names it (restorer._set_mm_map: two injected calls fewer each, frozen).
        self.exe: dict[int, str] = {}

    def fits(self, final: rec.Tree) -> bool:
        """Whether the frozen tree is the one built: the same members with the same
        relations and shared contexts (a member forked, exited, or changed its group since:
        not, and its final image is restored the whole way)."""
        return _relations(final) == _relations(self.tree)

    def give_back(self, rounds: TreeRounds) -> None:
        """Put the pages each stub was filled with back into its member's round file (they
        were dropped from it), before the stubs are discarded unused."""
        for pid, space in self.spaces.items():
            pages = rounds.pages_of(pid)
            if pages is not None and pages.lent:
                pages.take_back(space)

    def discard(self) -> None:
        """Kill every stub, unless the final restore has taken them."""
        for space in self.spaces.values():
            space.close()
        if not self.taken:
            self.made.kill_all()
            self.taken = True


def _relations(tree: rec.Tree) -> tuple[object, ...]:
    """What forking a tree of stubs depends on (a zombie's name too: it exits under it)."""
    members = tuple(
        (m.pid, m.ppid, m.pgid, m.sid, m.exit_signal, m.exit_code, m.state)
        + ((m.comm,) if m.state is rec.MemberState.ZOMBIE else ())
        for m in tree.members
    )
    return members, frozenset((c.pid, int(c.flags)) for c in tree.contexts)


def prebuild_tree(
    tree: rec.Tree,
    rounds: TreeRounds,
    mount_namespace: int | None = None,
    exe: dict[int, str] | None = None,
) -> PrebuiltTree:
    """Fork the tree of stubs of a moving tree (`tree`: its relations read while it runs,
    after its last round) under its old pids if all are free, else fresh ones; lay each
    member the rounds sent out as its round 0 and write every page they sent into it,
    parents first: a member's children are forked from its filled stub and keep the pages
    round 0 found shared with it (TreeRounds.inherited), copy-on-write. `exe`: each
    member's executable as the mover read it (by pid): its stub's exe link is set to it
    once filled, before its children are forked (they inherit it: set again only where
    theirs differs)."""
    refusals = relation_refusals(tree) + [
        f"process {c.pid} shares its parent's memory (CLONE_VM): such a tree moves without"
        " pre-copy (no stubs are built from rounds)"
        for c in tree.contexts
        if rec.CloneFlags.VM in c.flags
    ]
    if refusals:
        raise RestoreError(
            f"cannot restore the tree of process {tree.members[0].pid}: {'; '.join(refusals)}"
        )
    made = _Made()
    spaces: dict[int, AddressSpace] = {}
    links: dict[int, str] = {}  # what each stub's exe link names, set or inherited
    new_pids = bool(_taken_pids(tree))
    try:
        _fork_root(tree, made, new_pids, mount_namespace)
        # Parents first, each member's children forked once it is filled: they inherit
        # its pages copy-on-write and write only those of their own.
        for member in tree.imaged:
            pages = rounds.pages_of(member.pid)
            if pages is not None and pages.layout:  # else born after the rounds began
                parent = spaces.get(member.ppid)
                space = AddressSpace(made.stubs[member.pid], pages.layout)
                space.keep_unchanged = True  # its final image writes only what changed
                spaces[member.pid] = space
                space.build(inherited=parent.inherited_by_child(member.ppid) if parent else None)
                pages.fill(
                    space, rounds.inherited(member.pid, member.ppid) if parent else frozenset()
                )
                path = (exe or {}).get(member.pid, "")
                if path and links.get(member.ppid) != path:
                    if set_exe(made.stubs[member.pid], path):
                        links[member.pid] = path
                elif path:
                    links[member.pid] = path  # its parent's stub's, inherited at its fork
            _fork_children(tree, made, member, new_pids)
        _make_relations(tree, made, new_pids)
    except BaseException:
        # Not built: the final image builds each member from its round file.
        PrebuiltTree(tree, made, spaces).give_back(rounds)
        for space in spaces.values():
            space.close()
        made.kill_all()
        raise
    built = PrebuiltTree(tree, made, spaces)
    built.exe = links
    return built


def _record_tree(registry: Registry, tree: rec.Tree, rebuilt: list[Rebuilt], made: _Made) -> None:
    """Write the restored tree down: each member its shadow holds rehomed to it; a root
    with no shadow recorded as restored, with its living members (their pids now) for
    `hijack status` to draw."""
    root = rebuilt[0]
    if root.holdings is None:
        members = tuple(
            MemberRecord(
                pid=done.result.pid,
                root=root.result.pid,
                parent=made.pids.get(member.ppid, member.ppid),
                start_time=procfs.read_stat(done.result.pid).starttime,
                program=done.header.comm,
            )
            for member, done in zip(tree.imaged[1:], rebuilt[1:], strict=True)
        )
        registry.record_restored(root.result.pid, root.header.comm, members)
    else:
        record_restored(registry, root.header, root.result.pid, root.holdings)
    for done in rebuilt[1:]:
        if done.holdings is not None:
            record_restored(registry, done.header, done.result.pid, done.holdings)


def restore_image(
    stream: BinaryIO,
    *,
    skip_unsupported: bool = False,
    registry: Registry | None = None,
    new_pids: bool = False,
) -> RestoreResult | TreeRestoreResult:
    """`hijack restore`: the process of an image, or every member of a tree stream, or
    of a snapshot's rounds and image (docs/crf.md §7a, "In a file")."""
    stream, is_round = next_is_round(stream)
    if is_round:
        return restore_rounds(stream, skip_unsupported=skip_unsupported, registry=registry)
    records = read_stream(stream, scattered=True)
    first = next(records)
    if not isinstance(first, rec.Tree):
        return restore(
            stream,
            skip_unsupported=skip_unsupported,
            registry=registry,
            records=itertools.chain([first], records),
        )
    if not isinstance(next(records), rec.End):
        raise ImageError("the TREE is not followed by its END")
    return restore_tree(
        first, records, skip_unsupported=skip_unsupported, registry=registry, new_pids=new_pids
    )


def relation_refusals(tree: rec.Tree) -> list[str]:
    """What of the tree's relations a restore cannot make, one reason per member."""
    by_pid = {member.pid: member for member in tree.members}
    reasons = []
    for member in tree.members[1:]:
        what = f"process {member.pid} ({member.comm})"
        parent = by_pid[member.ppid]
        if member.sid not in (member.pid, parent.sid):
            reasons.append(
                f"{what} is in session {member.sid}, neither its own nor its parent's:"
                " restoring that is not implemented yet"
            )
        leader = by_pid.get(member.pgid)
        if leader is not None and leader.sid != member.sid:
            reasons.append(f"{what} is in group {member.pgid} of another session")
    return reasons


def restore_tree(
    tree: rec.Tree,
    records: Iterator[rec.Record],
    *,
    skip_unsupported: bool = False,
    registry: Registry | None = None,
    new_pids: bool | None = False,
    moved: TreeMove | None = None,
) -> TreeRestoreResult:
    """Restore the tree stream whose TREE (and its END) `records` yielded already.

    `new_pids` None: new pids only if a member's own is taken (a move). `moved`: what a
    move's daemon gives the tree (hijack.node.daemon).
    """
    refusals = relation_refusals(tree)
    if refusals:
        raise RestoreError(
            f"cannot restore the tree of process {tree.members[0].pid}: {'; '.join(refusals)}"
        )
    moved = moved or TreeMove()
    prebuilt = moved.prebuilt
    # Stubs forked before the freeze took no terminal (known only from the move's message).
    if prebuilt is not None and (moved.controlling or not prebuilt.fits(tree)):
        if moved.rounds is not None:
            prebuilt.give_back(moved.rounds)
        prebuilt.discard()  # its pids free again (reaped) before they are looked at
        prebuilt = None
    if prebuilt is not None:
        prebuilt.taken = prebuilt.used = True  # its pids were decided as it was forked
    elif new_pids is None:
        new_pids = bool(_taken_pids(tree))
    elif not new_pids:
        _refuse_taken_pids(tree)
    made = prebuilt.made if prebuilt is not None else _Made()
    shared = TreeShared(tree.shared)
    laps = moved.laps or Laps()
    memories: dict[int, MemberMemory] = {}
    try:
        if prebuilt is None:
            _fork_root(tree, made, bool(new_pids), moved.mount_namespace, moved)
            laps.lap("stubs")
        # Each member's memory, parents first; its children are forked from it once it
        # is built, and inherit it copy-on-write (as CRIU's premapped private memory). A
        # member sharing its parent's memory (CLONE_VM) builds none: it is its parent's.
        flags = {context.pid: context.flags for context in tree.contexts}
        owner: dict[int, int] = {}  # member -> the member whose memory it has (its own)
        rebuilt: list[Rebuilt] = []
        # Stubs built before the freeze are all forked already (none can inherit what a
        # finish makes): each member is finished as soon as its memory is, while the mover
        # still sends the next members' images, rather than all after the last one (then
        # the destination's tail of the freeze: ~2.5 ms a member at load 3). Not a
        # post-copy's (its pages made missing in a member a later one copies pages from);
        # what a finish writes into a member's memory (a thread's cached tid) waits until
        # every member's pages are in, as their copies come from the stubs.
        early = prebuilt is not None and moved.lazy is None
        later_writes: list[Callable[[], None]] = []

        def finish(member: rec.TreeMember) -> None:
            shares = flags.get(member.pid, rec.CloneFlags(0))
            rebuilt.append(
                finish_member(
                    memories.pop(member.pid),
                    shared,
                    skip_unsupported=skip_unsupported,
                    registry=registry,
                    own_parent=member is not tree.members[0],
                    parents_table=rec.CloneFlags.FILES in shares,
                    parents_handlers=rec.CloneFlags.SIGHAND in shares,
                    provided=functools.partial(moved.provided, member.pid),
                    take_locks=moved.admit is None,
                    laps=laps,
                    lazy=_lazy_of(moved, member.pid, made),
                    exe_set=prebuilt.exe.get(member.pid, "") if prebuilt is not None else "",
                    later_writes=later_writes if early else None,
                )
            )

        if early:
            reached("restore-tree-forked")
        for member in tree.imaged:
            own = rec.CloneFlags.VM not in flags.get(member.pid, rec.CloneFlags(0))
            owner[member.pid] = member.pid if own else owner[member.ppid]
            parent = memories.get(owner.get(member.ppid, member.ppid))
            memories[member.pid] = build_member_memory(
                made.stubs[member.pid],
                _one_image(records),
                shared,
                admit=moved.admit,
                rounds=moved.rounds.pages_of(member.pid) if moved.rounds else None,
                space=prebuilt.spaces.get(member.pid) if prebuilt is not None else None,
                inherited=(
                    parent.space.inherited_by_child(owner[member.ppid])
                    if parent is not None and prebuilt is None and own
                    else None
                ),
                laps=laps,
                parents_memory=not own,
            )
            if prebuilt is None:
                segments = memories[owner[member.pid]].image.segments.segments
                _fork_children(tree, made, member, bool(new_pids), segments)
                laps.lap("stubs")
            if early:
                finish(member)
        for _ in records:
            raise ImageError("records after the last image of the tree")
        if prebuilt is None:
            _make_relations(tree, made, bool(new_pids), moved)
            laps.lap("stubs")
        if not early:
            reached("restore-tree-forked")
            for member in tree.imaged:
                finish(member)
        for write in later_writes:
            write()
        unclaimed = shared.unclaimed()
        if unclaimed:
            raise RestoreError(f"cannot restore the tree: {'; '.join(unclaimed)}")
        shared.seal()
        reached("restore-tree-rebuilt")
        if moved.before_start is not None:
            moved.before_start({old: made.pids[old] for old in made.pids})
        pending = {done.header.pid: done.pending for done in rebuilt}
        for member in reversed(tree.imaged):  # children first: their parents still ours
            stub = made.stubs[member.pid]
            if member.state is rec.MemberState.STOPPED:
                os.kill(stub.pid, signal.SIGSTOP)  # taken once it runs: stopped again
            start(stub)
            parent_stub = made.stubs.get(member.ppid)
            if member.state is rec.MemberState.STOPPED and parent_stub is not None:
                _take_stop_report(parent_stub, stub.pid, pending[member.ppid])
    except BaseException:
        for memory in memories.values():
            memory.abandon()
        made.kill_all()
        raise
    finally:
        shared.close()
    if registry is not None:
        _record_tree(registry, tree, rebuilt, made)
    zombies = tuple(
        (m.pid, made.pids[m.pid]) for m in tree.members if m.state is rec.MemberState.ZOMBIE
    )
    return TreeRestoreResult(tuple(done.result for done in rebuilt), zombies)


def _lazy_of(
    moved: TreeMove, member: int, made: _Made
) -> Callable[[tuple[rec.Segment, ...]], LazyPages | None] | None:
    """rebuild_member's `lazy` for `member` of a post-copy move: every living member's
    pid here goes with it (its keeper stops them all, hijack.restore.postcopy)."""
    lazy = moved.lazy
    if lazy is None:
        return None
    return lambda segments: lazy(member, segments, [s.pid for s in made.stubs.values()])


def _refuse_taken_pids(tree: rec.Tree) -> None:
    taken = _taken_pids(tree)
    if taken:
        raise RestoreError(
            f"cannot restore the tree of process {tree.members[0].pid} under its pids:"
            f" {'; '.join(taken)} (--new-pids restores it under new ones)"
        )


def _taken_pids(tree: rec.Tree) -> list[str]:
    """Which pids of the tree (its members' and its groups') another process holds."""
    taken = []
    for member in tree.members:
        wait_for_orphan_reaped(member.pid)
        holder = holder_of(member.pid)
        if holder:
            taken.append(f"pid {member.pid} ({member.comm}) is held by {holder}")
    for group in orphaned_groups(tree):
        holder = holder_of(group)
        if holder:
            taken.append(f"pid {group} (the id of a process group of the tree) is held by {holder}")
    return taken


def _one_image(records: Iterator[rec.Record]) -> Iterator[rec.Record]:
    """The records of the next image of the stream, up to its END."""
    for record in records:
        yield record
        if isinstance(record, rec.End):
            return


# -- 2. forking the tree --------------------------------------------------------------


def _fork_root(
    tree: rec.Tree,
    made: _Made,
    new_pids: bool,
    mount_namespace: int | None = None,
    moved: TreeMove | None = None,
) -> None:
    """The root's stub, leading its session (and taking the terminal) if it did."""
    controlling = moved.controlling if moved else ""
    root = tree.members[0]
    pid = spawn_stub(root.pid, mount_namespace)  # or a new pid where that one is taken
    made.stubs[root.pid] = stub = Stub(pid, find_syscall_instruction(pid))
    made.pids[root.pid] = pid
    if not new_pids and pid != root.pid:
        raise RestoreError(f"pid {root.pid} ({root.comm}) was taken meanwhile: try again")
    pt.set_options(pid, STUB_OPTIONS | pt.PTRACE_O_TRACEFORK)  # its children are ours too
    _scratch_on_stack(stub)
    # Only a session leader takes a controlling terminal: a moved root leads a session of
    # its own there, as a single process does (its session's leader, a shell, stayed home).
    if root.sid == root.pid or controlling:
        stub.call("setsid")
    if controlling:
        _terminal_call(stub, controlling, TIOCSCTTY)
    if any(m.ppid == root.pid and m.state is rec.MemberState.ZOMBIE for m in tree.members):
        _default_action(stub, signal.SIGCHLD)


def _fork_children(
    tree: rec.Tree,
    made: _Made,
    parent: rec.TreeMember,
    new_pids: bool,
    segments: tuple[rec.Segment, ...] = (),
) -> None:
    """Fork the children of `parent` (zombies included) from its stub: each with its pid,
    the contexts it shares with its parent, its session if it leads one. A parent whose
    memory is built already has a scratch area of its own, which its children inherit;
    a pristine one's is on its stack. A child sharing its parent's memory (CLONE_VM) gets
    a scratch area of its own in that memory, outside `segments` (the image's layout of
    it, objects mapped later included): the two stubs' injected calls never overwrite
    each other's arguments, and each finish unmaps its own."""
    stub = made.stubs[parent.pid]
    zombie_parents = {m.ppid for m in tree.members if m.state is rec.MemberState.ZOMBIE}
    contexts = {context.pid: int(context.flags) for context in tree.contexts}
    for member in tree.members[1:]:
        if member.ppid != parent.pid:
            continue
        child = _fork_member(stub, member, new_pids, contexts.get(member.pid, 0))
        made.stubs[member.pid] = child
        made.pids[member.pid] = child.pid
        if contexts.get(member.pid, 0) & rec.CloneFlags.VM:
            _own_scratch(child, segments)
        else:
            child.use_scratch(stub.scratch)
        if member.sid == member.pid:
            child.call("setsid")
        if member.pid in zombie_parents:
            _default_action(child, signal.SIGCHLD)  # a SIGCHLD ignored would reap them


def _make_relations(
    tree: rec.Tree, made: _Made, new_pids: bool, moved: TreeMove | None = None
) -> None:
    """Once every member is forked: process groups (stand-in leaders for those whose leader
    exited), the terminal's foreground group, zombies."""
    controlling = moved.controlling if moved else ""
    groups = orphaned_groups(tree)
    for group, first in groups.items():
        _make_group_leader(made, group, first, new_pids)
    _make_groups(tree, made)
    for group, first in groups.items():
        _end_group_leader(made, group, made.stubs[first.ppid])
    foreground = made.pids.get(moved.foreground) if moved and moved.foreground else None
    if controlling and foreground is not None:
        _terminal_call(made.stubs[tree.members[0].pid], controlling, TIOCSPGRP, foreground)
    for member in tree.members:
        if member.state is rec.MemberState.ZOMBIE:
            _exit_as_zombie(made, member)


def _terminal_call(stub: Stub, path: str, request: int, pointed: int | None = None) -> None:
    """ioctl `request` by `stub` on the pty whose slave is `path`, opened here and lent to
    it (a stub in another mount namespace may not see our /dev/pts), then closed there: no
    child forked after inherits it. `pointed`: an int the argument points to, if any."""
    ours = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        fd = lend(stub, {0: ours})[0]
    finally:
        os.close(ours)
    try:
        argument = 0 if pointed is None else stub.put(struct.pack("<i", pointed))
        stub.call("ioctl", fd, request, argument)
    finally:
        stub.call("close", fd)


def orphaned_groups(tree: rec.Tree) -> dict[int, rec.TreeMember]:
    """The process groups of members whose leader has exited (the root's excepted: it is
    outside the tree), each with its first member."""
    pids = {member.pid for member in tree.members}
    root = tree.members[0]
    found: dict[int, rec.TreeMember] = {}
    for member in tree.members[1:]:
        if member.pgid not in pids and member.pgid != root.pgid:
            found.setdefault(member.pgid, member)
    return found


def _make_group_leader(made: _Made, group: int, first: rec.TreeMember, new_pids: bool) -> None:
    """A stand-in for the exited leader of process group `group`, as CRIU makes: a sibling
    of its first member (in its session) under the group's id, leading the group until
    the members have joined it (_end_group_leader)."""
    stand_in = rec.TreeMember(
        pid=group,
        ppid=first.ppid,
        pgid=group,
        sid=first.sid,
        exit_signal=signal.SIGCHLD,
        exit_code=0,
        state=rec.MemberState.RUNNING,
        comm=f"leader of group {group}",
    )
    leader = _fork_member(made.stubs[first.ppid], stand_in, new_pids)
    made.stubs[group] = leader  # a group's id is no member's pid: never a member's key
    made.pids[group] = leader.pid
    leader.call("setpgid", 0, 0)


def _end_group_leader(made: _Made, group: int, parent: Stub) -> None:
    """The stand-in leader exits and its parent's stub reaps it: the group lives on in its
    members, leaderless as it was."""
    leader = made.stubs.pop(group)
    _let_exit(leader, "exit_group", [0], f"the stand-in leader of group {group}")
    parent.try_call("wait4", leader.pid, 0, WALL, 0)  # ECHILD: SIGCHLD ignored reaped it
    _take_signal(parent, signal.SIGCHLD)


def _own_scratch(stub: Stub, segments: tuple[rec.Segment, ...]) -> None:
    """Map a scratch area for `stub`, in a hole of the memory it shares with its parent
    and of that memory's final layout `segments` (its top holds the stub's batches of
    calls, hijack.mutator.parasite: apart from its parent's too)."""
    occupied = [(s.start, s.end) for s in segments]
    occupied += [(m.start, m.end) for m in procfs.read_maps(stub.pid)]
    address = find_hole(occupied, SCRATCH_SIZE)
    flags = MAP_PRIVATE_ANONYMOUS | MAP_FIXED_NOREPLACE
    stub.call("mmap", address, SCRATCH_SIZE, SCRATCH_PROT, flags, -1, 0)
    stub.use_scratch(address)


def _scratch_on_stack(stub: Stub) -> None:
    rsp = pt.get_registers(stub.pid).rsp
    stub.use_scratch((rsp - STACK_SCRATCH_BELOW) & ~0xFFF)


def _fork_member(parent: Stub, member: rec.TreeMember, new_pids: bool, flags: int = 0) -> Stub:
    """Fork `member` from its parent's stub, with its pid; with `new_pids`, a new one
    where its own is taken. `flags`: the CLONE_FILES and CLONE_FS it shares with its parent
    (the stubs share that table or context from birth; the parent's rebuild fills it), its
    CLONE_VM and CLONE_SIGHAND (the parent's memory is built: the child's image has none;
    no stack is given, the stub never runs but for the calls injected, one at a time)."""
    parent.reset_scratch()
    set_tid = parent.put(struct.pack("<i", member.pid))
    args = CLONE_ARGS.pack(flags, 0, 0, 0, member.exit_signal, 0, 0, 0, set_tid, 1, 0)
    pid = parent.try_call("clone3", parent.put(args), CLONE_ARGS.size)
    if pid == -EEXIST and new_pids:
        args = CLONE_ARGS.pack(flags, 0, 0, 0, member.exit_signal, 0, 0, 0, 0, 0, 0)
        pid = parent.try_call("clone3", parent.put(args), CLONE_ARGS.size)
    if pid == -EEXIST:
        raise RestoreError(f"pid {member.pid} ({member.comm}) was taken meanwhile: try again")
    if pid < 0:
        raise RestoreError(f"cannot fork process {member.pid} ({member.comm}): {os.strerror(-pid)}")
    result = pt.wait_for(pid)  # traced from birth (TRACEFORK): its first stop
    if result is None or not result.stopped:
        reason = result.describe() if result else "did not stop"
        raise RestoreError(f"the stub of process {member.pid} {reason} instead of stopping")
    return Stub(pid, parent.tracee.syscall_address)


def _default_action(stub: Stub, number: int) -> None:
    stub.reset_scratch()
    stub.call("rt_sigaction", number, stub.put_u64s(SIG_DFL, 0, 0, 0), 0, 8)


def _make_groups(tree: rec.Tree, made: _Made) -> None:
    """Each member into its process group: those leading one first, then the others (a
    session leader leads its group already)."""
    root = tree.members[0]
    root_group = procfs.read_stat(made.pids[root.pid]).pgrp
    leaders = [m for m in tree.members if m.pgid == m.pid]
    for member in leaders + [m for m in tree.members if m.pgid != m.pid]:
        pid = made.pids[member.pid]
        if member.pgid == member.pid:
            target = pid
        elif member.pgid in made.pids:
            target = made.pids[member.pgid]
        else:
            target = root_group  # the root's group, outside the tree (relation_refusals)
        if procfs.read_stat(pid).pgrp != target:
            made.stubs[member.pid].call("setpgid", 0, target)


def _exit_as_zombie(made: _Made, member: rec.TreeMember) -> None:
    """Let the stub of `member` exit as it did, untraced: its parent's stub reaps it never;
    the restored parent will. The exit signal it sends the parent's stub is taken back."""
    stub = made.stubs.pop(member.pid)
    parent = made.stubs[member.ppid]
    stub.reset_scratch()
    stub.call("prctl", PR_SET_NAME, stub.put_string(member.comm[:15]), 0, 0, 0)
    status = member.exit_code
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        if number != signal.SIGKILL:  # its action is the default always (and cannot be set)
            _default_action(stub, number)
        call, args = "tgkill", [stub.pid, stub.pid, number]
    else:
        call, args = "exit_group", [os.WEXITSTATUS(status)]
    _let_exit(stub, call, args, f"the zombie {member.pid} ({member.comm})")
    if member.exit_signal:
        _take_signal(parent, member.exit_signal)


def _let_exit(stub: Stub, call: str, args: list[int], what: str) -> None:
    """Let the stub run its last call (`call`: exit_group or tgkill) as nobody's tracee,
    and wait until it has exited."""
    thread = stub.tracee.threads[stub.pid]
    registers = thread.saved_registers.replace(
        rax=SYSCALL_NUMBERS[call],
        rip=stub.tracee.syscall_address,
        orig_rax=-1 & 0xFFFFFFFFFFFFFFFF,
        **dict(zip(("rdi", "rsi", "rdx"), args, strict=False)),
    )
    handle = pidfd.pidfd_open(stub.pid)
    try:
        pt.set_registers(stub.pid, registers)
        pt.set_signal_mask(stub.pid, 0)
        pt.detach(stub.pid)
        thread.state = ThreadState.RELEASED
        readable, _, _ = select.select([handle], [], [], STUB_EXIT_WAIT)
        if not readable:
            raise RestoreError(f"{what} did not exit")
    finally:
        os.close(handle)


def _take_stop_report(parent: Stub, child: int, pending: frozenset[int]) -> None:
    """Once `child` has stopped again, take back from its parent's finished stub what
    that told it: its wait report (WSTOPPED) and the SIGCHLD, unless the image has a
    SIGCHLD pending of its own; the original parent had them long ago. The stub's
    registers and mask are its process's already: put back after the calls."""
    deadline = time.monotonic() + STUB_EXIT_WAIT
    while procfs.read_stat(child).state != "T":
        if time.monotonic() > deadline:
            raise RestoreError(f"process {child} did not stop again")
        time.sleep(0.002)  # no descriptor tells of another process's stop
    registers = pt.get_registers(parent.pid)
    mask = pt.get_signal_mask(parent.pid)
    pt.set_signal_mask(parent.pid, ALL_SIGNALS_BLOCKED)  # the SIGCHLD waits for us
    page = parent.call("mmap", 0, PAGE_SIZE, PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS, -1, 0)
    try:
        parent.use_scratch(page)
        info = parent.put(bytes(128))  # a siginfo_t
        parent.call("waitid", P_PID, child, info, WSTOPPED | WNOHANG, 0)
        if signal.SIGCHLD not in pending:
            _take_signal(parent, signal.SIGCHLD)
    finally:
        parent.call("munmap", page, PAGE_SIZE)
        pt.set_registers(parent.pid, registers)
        pt.set_signal_mask(parent.pid, mask)


def _take_signal(stub: Stub, number: int) -> None:
    """Take back the signal `number` a child's exit sent the stub (its mask blocks every
    signal while calls are injected): the process it becomes had it long ago."""
    stub.reset_scratch()
    wanted = stub.put_u64s(1 << (number - 1))
    stub.try_call("rt_sigtimedwait", wanted, 0, stub.put_u64s(0, 0), 8)
