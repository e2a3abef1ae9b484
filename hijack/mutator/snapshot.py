"""`hijack dump PID` (without --kill): a copy-on-write snapshot, a millisecond freeze.

The process is stopped only for what a copy of it cannot tell, then made to
fork a copy (hijack.mutator.shadow_fork: the copy is no child of it, is traced
from birth and never runs a single instruction of its own), and released.
The copy's memory is the process's memory at the instant of the fork; the
image's pages, signal actions and whatever else a fork copies as it is (the
memory's layout and brk, auxv, personality, the dumpable and THP-disable
flags) are read from the copy while the process runs on; then the copy is
killed.

Read while frozen, from the process itself:
- every thread's registers, signal mask, pending signals, rseq, robust list,
  clear-child-tid and alternate stack (the copy has one thread: the forker's);
- its timers and settings (a fork inherits neither interval nor POSIX timers,
  nor the parent-death signal and subreaper flag);
- its descriptors and the kernel objects behind them, the contents of its
  shared memory included: those are shared with the copy, not snapshotted,
  and the process changes them as it runs. The freeze grows with them, not
  with private memory;
- the pages of its MADV_DONTFORK mappings (absent in the copy) and
  MADV_WIPEONFORK mappings (zero in the copy).

The mappings' VmFlags (smaps walks every page table: 15 ms a GiB) are read
just before the freeze and used for every mapping still the same at the
freeze; a layout that changed in between has them read while frozen. So are
the other holders of its pipes (every process's descriptors: 2-15 ms by the
host's process count): the freeze reads only processes born since and the
known holders (hijack.objects.pipe.outside_holders tells what it rescans).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Hashable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import BinaryIO

from hijack import objects
from hijack.errors import ProcessGone
from hijack.image import records as rec
from hijack.image.codec import ImageWriter
from hijack.mutator.dump import (
    READ_CHUNK,
    DumpResult,
    ImageParts,
    PageCounts,
    _live,
    describe_segments,
    dump_options,
    keeps_zero_pages,
    read_all_credentials,
    read_header,
    read_memory_structure,
    read_rlimits,
    read_signal_actions,
    read_threads,
    runs_to_store,
    scratch_page,
    widen_if_pipe,
    write_parts,
    write_segment_pages,
    write_tree,
)
from hijack.mutator.frozen_tree import FrozenTree, frozen_tree
from hijack.mutator.shadow_fork import adopt_copy, discard_copy, fork_shadow_copy
from hijack.mutator.shared_pages import SharedPages
from hijack.mutator.spliced_pages import page_splicer
from hijack.mutator.tracee import Tracee, scratch_below_stack
from hijack.objects import pipe
from hijack.objects.base import DEFAULT_GHOST_LIMIT
from hijack.objects.memfd import held_by_objects
from hijack.process import aio, settings, timers
from hijack.process.tree import read_tree
from hijack.sys import memory, procfs
from hijack.sys import ptrace as pt
from hijack.testpoint import reached
from hijack.timing import Laps

# VmFlags of mappings whose pages a forked copy does not hold as they are.
NOT_FORKED = ("dc", "wf")  # MADV_DONTFORK, MADV_WIPEONFORK
CLOSE_RANGE_ALL = (0, (1 << 32) - 1, 0)
UNREAD_ACTION = rec.SigAction(sa_handler=0, sa_flags=0, sa_restorer=0, sa_mask=0)
# Read from the copy after the freeze (_write_from_copy) in place of these.
UNREAD_MM_FLAGS = (0, False)
UNREAD_MEMORY_STRUCTURE = rec.MemoryStructure(
    start_code=0,
    end_code=0,
    start_data=0,
    end_data=0,
    start_brk=0,
    brk=0,
    start_stack=0,
    arg_start=0,
    arg_end=0,
    env_start=0,
    env_end=0,
    personality=0,
    auxv=(),
    exe_file="",
)


Run = tuple[int, int]


@dataclass
class Frozen:
    """What was read while the process was stopped (the signal actions come from the copy)."""

    parts: ImageParts
    syscall_address: int
    counts: PageCounts = field(default_factory=PageCounts)
    # Unforked segments (start -> their pages, read while frozen).
    kept: dict[int, list[tuple[int, bytes]]] = field(default_factory=dict)
    # Segments whose pages the copy's pagemap does not show (start -> runs).
    runs: dict[int, list[Run]] = field(default_factory=dict)


def snapshot_dump(
    pid: int,
    out: BinaryIO,
    *,
    no_binary: bool = False,
    no_shared_libs: bool = False,
    on_complete: Callable[[], None] | None = None,
    ghost_limit: int = DEFAULT_GHOST_LIMIT,
    connections: bool = True,
) -> DumpResult:
    """Write an image of `pid` as it was at a freeze of about a millisecond; it runs on.

    `on_complete` runs once the whole image is written and flushed. `connections`: its
    TCP sockets are read as a restore rebuilds them (a listener's options, a connection's
    TCP_REPAIR state), as a dump stopped throughout reads them; else they are recorded as
    a move's are (relayed: no options, a connection not rebuilt).
    """
    widen_if_pipe(out)
    options = dump_options(no_binary=no_binary, no_shared_libs=no_shared_libs)
    # Slow to read (every page table): read while the process still runs.
    flags_before = procfs.read_smaps_flags(pid)
    maps_before = set(procfs.read_maps(pid))
    holders_before = pipe.scan_holders_before(pid)
    copy_pid = 0
    try:
        with Tracee.seize(pid) as tracee:
            laps = Laps(tracee.stopped_at or None)
            laps.lap("stop")
            reached("dump-seized")
            frozen = _read_frozen(
                tracee,
                options,
                flags_before,
                maps_before,
                holders_before,
                ghost_limit,
                laps,
                connections=connections,
            )
            copy_pid = fork_shadow_copy(tracee, intermediate_shares_memory=True)
            laps.lap("fork")
            _read_what_the_copy_lacks(pid, frozen)
            laps.lap("unforked pages")
        laps.lap("release")
        frozen_ms = tracee.pause_ms
        end, threads, written = _write_from_copy(_emptied_copy(copy_pid, frozen), frozen, out)
        reached("dump-written")
        if on_complete is not None:
            on_complete()
    finally:
        if copy_pid:
            discard_copy(copy_pid)
    return DumpResult(
        pid,
        threads,
        written,
        end.pages_stored,
        frozen_ms,
        freeze_steps=laps.laps,
        injected=tracee.injected,
    )


class TreeSnapshotUnavailable(Exception):
    """A tree snapshot_tree_dump cannot take (found once frozen, nothing written): it is
    dumped stopped throughout instead."""


def snapshot_tree_dump(
    root: int,
    out: BinaryIO,
    *,
    no_binary: bool = False,
    no_shared_libs: bool = False,
    on_complete: Callable[[], None] | None = None,
    ghost_limit: int = DEFAULT_GHOST_LIMIT,
    connections: bool = True,
) -> DumpResult:
    """The tree stream (docs/crf.md §7b) of `root` and its descendants as they were at one
    freeze of them all; they run on. `connections`: as snapshot_dump's.

    As snapshot_dump, member by member within one freeze: every member is stopped
    (hijack.mutator.frozen_tree), what a copy cannot tell is read from each, each forks
    its copy, and all are released; the images are then written from the copies, a
    private page members still share copy-on-write stored once (the copies map the
    very frames their members did at the freeze: hijack.mutator.shared_pages).
    Raises TreeSnapshotUnavailable, nothing written, for a tree with a member sharing
    its parent's memory (CLONE_VM: its copy would be its parent's).
    """
    widen_if_pipe(out)
    options = dump_options(no_binary=no_binary, no_shared_libs=no_shared_libs)
    # Slow to read (every page table, every process's descriptors): read while it runs.
    running = [member.pid for member in read_tree(root).members if not member.zombie]
    flags_before = {pid: _flags_or_none(pid) for pid in running}
    maps_before = {pid: set(_maps_or_none(pid)) for pid in running}
    holders_before = pipe.scan_holders_before(*running)
    copies: dict[int, int] = {}
    try:
        with frozen_tree(root) as tree:
            laps = Laps(min((t.stopped_at for t in tree.tracees.values()), default=0) or None)
            laps.lap("stop")
            reached("dump-seized")
            _refuse_unsnapshotable(tree)
            members = frozenset(tree.tracees)
            frozen: dict[int, Frozen] = {}
            tree_bytes: dict[Hashable, int] = {}  # shared memory's bytes: in one member's image
            sockets = _socket_table(tree) if connections else None
            injected = 0
            for pid, tracee in tree.tracees.items():
                frozen[pid] = _read_frozen(
                    tracee,
                    options,
                    flags_before.get(pid, {}),
                    maps_before.get(pid, set()),
                    holders_before,
                    ghost_limit,
                    laps,
                    connections=connections,
                    tree=members,
                    tree_bytes=tree_bytes,
                    sockets=sockets,
                )
            # Every member read before the first copy: a copy holds its member's pipes
            # (until it closes them, after the freeze), which the next would see held
            # by a process outside the tree.
            for pid, tracee in tree.tracees.items():
                copies[pid] = fork_shadow_copy(tracee, intermediate_shares_memory=True)
                laps.lap("fork")
                _read_what_the_copy_lacks(pid, frozen[pid])
                laps.lap("unforked pages")
                injected += tracee.injected
        laps.lap("release")
        frozen_ms = _tree_pause_ms(list(tree.tracees.values()))
        # Every copy emptied before the first image is written: a later member's would
        # hold what its member closes meanwhile (a client's connection) open until then.
        emptied = {pid: _emptied_copy(copy, frozen[pid]) for pid, copy in copies.items()}
        shared = SharedPages(copies=copies)

        def member_image(tracee: Tracee, shared: SharedPages) -> tuple[rec.End, int, int]:
            return _write_from_copy(emptied[tracee.pid], frozen[tracee.pid], out, shared)

        threads, written, pages = write_tree(tree, out, member_image, shared)
        reached("dump-written")
        if on_complete is not None:
            on_complete()
    finally:
        for copy_pid in copies.values():
            discard_copy(copy_pid)
    return DumpResult(
        root,
        threads,
        written,
        pages,
        frozen_ms,
        members=len(tree.record.members),
        pages_referenced=shared.referenced,
        freeze_steps=laps.laps,
        injected=injected,
    )


def _socket_table(tree: FrozenTree) -> dict[int, procfs.SocketInfo] | None:
    """The socket table of the tree's network namespace, read once for every member (each
    table read walks the kernel's whole hash of its kind: milliseconds), as a tree's move
    reads it; None if no member holds a socket."""
    inodes = {
        entry.ino
        for pid in tree.tracees
        for entry in procfs.list_fds(pid)
        if entry.kind is procfs.FdKind.SOCKET
    }
    return procfs.read_socket_table(tree.tree.root.pid, wanted=inodes) if inodes else None


def _tree_pause_ms(tracees: list[Tracee]) -> float:
    """From the first member stopped to the last one let go."""
    stopped = min(t.stopped_at for t in tracees)
    released = max(t.released_at or time.perf_counter() for t in tracees)
    return (released - stopped) * 1000


def _refuse_unsnapshotable(tree: FrozenTree) -> None:
    if any(rec.CloneFlags.VM in context.flags for context in tree.record.contexts):
        raise TreeSnapshotUnavailable("a member shares its parent's memory (CLONE_VM)")


def _flags_or_none(pid: int) -> dict[int, tuple[str, ...]]:
    """Its mappings' VmFlags, or none for a member that ended since (it is left out)."""
    try:
        return procfs.read_smaps_flags(pid)
    except ProcessGone:
        return {}


def _maps_or_none(pid: int) -> list[procfs.MapEntry]:
    try:
        return procfs.read_maps(pid)
    except ProcessGone:
        return []


def _read_frozen(
    tracee: Tracee,
    options: rec.DumpOptions,
    flags_before: dict[int, tuple[str, ...]],
    maps_before: set[procfs.MapEntry],
    holders_before: procfs.HolderScan,
    ghost_limit: int,
    laps: Laps,
    *,
    connections: bool = False,
    tree: frozenset[int] = frozenset(),
    tree_bytes: dict[Hashable, int] | None = None,
    sockets: dict[int, procfs.SocketInfo] | None = None,
) -> Frozen:
    """Everything of the image but what the copy tells, read from the stopped process.
    `connections`, `tree`, `tree_bytes` and `sockets`: as hijack.objects.read_files takes
    them."""
    pid = tracee.pid
    maps = procfs.read_maps(pid)
    # An AIO context's ring: kept as such (its unreaped events read now), made again by
    # io_setup at restore, not a mapping of the image (hijack.process.aio).
    aio_rings = aio.read_rings(pid, maps, moving=False)
    with scratch_below_stack(tracee, maps) as scratch:
        threads = read_threads(tracee, _live(tracee), scratch)
        laps.lap("threads")
        process_settings = settings.read_settings(
            tracee, scratch, tracee.thread_ids, aio_rings=aio_rings, mm_flags=UNREAD_MM_FLAGS
        )
        process_timers = timers.read_timers(tracee, scratch)
    tracee.put_back()
    laps.lap("settings and timers")
    maps = [entry for entry in maps if not aio.is_aio_ring(entry)]
    files = objects.read_files(
        pid,
        connections=connections,
        maps=maps,
        ghost_limit=ghost_limit,
        holders_before=holders_before,
        tree=tree,
        tree_bytes=tree_bytes,
        sockets=sockets,
    )
    laps.lap("descriptors")
    if all(entry in maps_before for entry in maps):
        flags = {entry.start: flags_before.get(entry.start, ()) for entry in maps}
    else:
        flags = procfs.read_smaps_flags(pid)  # the layout changed since: read them now
    credentials, thread_credentials = read_all_credentials(pid, [t.tid for t in threads])
    parts = ImageParts(
        header=read_header(pid, options),
        credentials=credentials,
        thread_credentials=thread_credentials,
        rlimits=read_rlimits(pid),
        memory_structure=UNREAD_MEMORY_STRUCTURE,
        segments=held_by_objects(describe_segments(pid, maps, options, flags=flags), files),
        files=files,
        threads=threads,
        signal_state=rec.SignalState(
            # Read from the copy, which inherits them (64 calls: 3 ms or more).
            actions=(UNREAD_ACTION,) * rec.SIGNAL_COUNT,
            shared_pending=tuple(pt.peek_pending_signals(tracee.injection_tid, shared=True)),
        ),
        cwd=rec.Cwd(cwd=procfs.read_cwd(pid), root=procfs.read_root(pid)),
        settings=process_settings,
        timers=process_timers,
    )
    laps.lap("process")
    return Frozen(parts, tracee.syscall_address)


def _read_what_the_copy_lacks(pid: int, frozen: Frozen) -> None:
    """Still frozen: the pages of the segments a fork does not copy as they are, and the
    runs of those whose pages the copy's page tables do not show."""
    with memory.MemoryFile(pid) as mem:
        for segment in frozen.parts.segments:
            if any(flag in segment.vm_flags for flag in NOT_FORKED):
                frozen.kept[segment.start] = [
                    (start, _read(pid, mem, segment, start, end))
                    for start, end in runs_to_store(pid, segment, frozen.counts)
                ]
            elif _copy_hides_pages(segment):
                frozen.runs[segment.start] = runs_to_store(pid, segment, frozen.counts)


def _copy_hides_pages(segment: rec.Segment) -> bool:
    """A mapping of a file whose stored pages are the ones present (a deleted file's):
    fork copies no page table of a mapping that holds no anonymous page, so the copy
    would show none present."""
    return (
        segment.contents is rec.ContentsKind.STORED
        and segment.inode != 0
        and not keeps_zero_pages(segment)
    )


def _read(pid: int, mem: memory.MemoryFile, segment: rec.Segment, start: int, end: int) -> bytes:
    buffer = bytearray(end - start)
    if segment.prot & rec.Prot.READ:
        memory.read_into(pid, start, buffer)
    else:
        mem.read_into(start, buffer)
    return bytes(buffer)


def _emptied_copy(copy_pid: int, frozen: Frozen) -> Tracee:
    """The copy (stopped at its birth), adopted, its descriptors closed: its references to
    the process's open files must not outlive them (a socket the process closes meanwhile
    must close now, not when the copy dies). The copy holds no locks of its own to release."""
    copy = Tracee(
        copy_pid,
        {copy_pid: adopt_copy(copy_pid)},
        syscall_address=frozen.syscall_address,
        injection_tid=copy_pid,
    )
    copy.checked_syscall("close_range", *CLOSE_RANGE_ALL)
    return copy


def _write_from_copy(
    copy: Tracee, frozen: Frozen, out: BinaryIO, shared: SharedPages | None = None
) -> tuple[rec.End, int, int]:
    """The rest of the image, from the copy (_emptied_copy) while the process runs.
    `shared`: a tree's (its member's pages the images before stored are referred to)."""
    copy_pid = copy.pid
    # A fork copies these as they were: asked of the copy, not of the frozen process.
    with scratch_page(copy) as scratch:
        actions = read_signal_actions(copy, scratch)
    dumpable, thp_disable = settings.read_mm_flags(copy)
    parts = dataclasses.replace(
        frozen.parts,
        signal_state=dataclasses.replace(frozen.parts.signal_state, actions=tuple(actions)),
        settings=dataclasses.replace(
            frozen.parts.settings, dumpable=dumpable, thp_disable=thp_disable
        ),
        # The memory's layout (code, data, brk, stack, arguments, auxv): the copy's mm.
        memory_structure=read_memory_structure(copy_pid, copy.checked_syscall("brk", 0)),
    )

    def write_pages(writer: ImageWriter) -> PageCounts:
        buffer = bytearray(READ_CHUNK)
        # The copy never runs: its pages may go to a pipe or a socket by reference too
        # (not a tree member's: its pages are compared with the others', read).
        splicing = page_splicer(copy, out, pipes=True) if shared is None else nullcontext(None)
        with memory.MemoryFile(copy_pid) as mem, splicing as splicer:
            for segment in frozen.parts.segments:
                kept = frozen.kept.get(segment.start)
                if kept is None:
                    runs = frozen.runs.get(segment.start)
                    # Not process_vm_readv: it pins pages, and pinning a page the
                    # copy shares with the process copies it first (unsharing):
                    # a GiB more memory and twice the time for a GiB read. vmsplice
                    # takes references without pinning: no copy either.
                    write_segment_pages(
                        copy_pid,
                        mem,
                        segment,
                        writer,
                        frozen.counts,
                        buffer,
                        runs=runs,
                        through_mem=True,
                        splicer=splicer,
                        shared_pages=shared,
                    )
                    continue
                for start, data in kept:
                    writer.write_pages(start, data, keep_zero_pages=keeps_zero_pages(segment))
        return frozen.counts

    referable = shared.referable if shared is not None else frozenset()
    return write_parts(out, parts, write_pages, referable=referable)
