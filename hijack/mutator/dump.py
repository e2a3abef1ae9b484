"""`hijack dump`: write a CRF image of a live process.

All threads are stopped for the whole dump, so memory, registers and
descriptors are one consistent instant. What can be read from outside is read
from outside (/proc, ptrace); what only the process itself can tell (its brk,
its signal actions, each thread's clear-child-tid address and alternate signal
stack) is asked by injected system calls, through a scratch page that is
unmapped again before memory is read.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import io
import os
import signal
import socket as socket_module
import struct
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from stat import S_ISFIFO
from typing import BinaryIO, Protocol

from hijack import lockbook, objects
from hijack.errors import HijackError, ProcessGone, Unsupported
from hijack.image import records as rec
from hijack.image.codec import ImageWriter
from hijack.image.files import ImageFiles
from hijack.image.identity import file_identity, is_shared_library
from hijack.in_thread import InThread
from hijack.mutator.frozen_tree import FrozenTree, frozen_tree
from hijack.mutator.parasite import (
    Area,
    Batch,
    parasite_area,
    run_in_threads,
    unmap_area,
    without_area,
)
from hijack.mutator.shared_pages import SharedPages
from hijack.mutator.spliced_pages import PageSplicer, page_splicer
from hijack.mutator.tracee import (
    BORROWED_SCRATCH,
    ThreadState,
    TracedThread,
    Tracee,
    recorded_registers,
)
from hijack.mutator.tracee import scratch_page as scratch_page  # its old home: importers
from hijack.objects import unix
from hijack.objects.base import DEFAULT_GHOST_LIMIT
from hijack.objects.memfd import held_by_objects
from hijack.objects.tcp import NetworkLocks
from hijack.process import aio, settings, timers
from hijack.process.tree import read_tree, shared_context_refusals
from hijack.restore.plan import ATTACH_HINT, restore_problems
from hijack.restore.shared import copied_refusals
from hijack.restore.tree import relation_refusals
from hijack.sys import memory, procfs
from hijack.sys import ptrace as pt
from hijack.sys.process import get_robust_list
from hijack.sys.writeback import WritebackFile
from hijack.testpoint import reached
from hijack.timing import Laps

PAGE_SIZE = 4096
READ_CHUNK = 8 * 1024 * 1024  # bytes per process_vm_readv; one Pages record at most
IMAGE_PIPE_SIZE = 1024 * 1024  # fs.pipe-max-size's default: any user may ask for it
SIGACTION_SIZE = 32  # the kernel's struct sigaction on x86_64
SIG_DFL, SIG_IGN = 0, 1
PR_GET_TID_ADDRESS = 40
O_CLOEXEC = 0o2000000
# Made by the kernel at exec and moved, not stored, at restore.
KERNEL_MAPPINGS = ("[vdso]", "[vvar]", "[vvar_vclock]")
# Not part of the process's own address space layout: never in an image.
SKIPPED_MAPPINGS = ("[vsyscall]",)


@dataclass(frozen=True)
class DumpResult:
    pid: int
    threads: int
    image_bytes: int
    pages_stored: int
    frozen_ms: float  # how long the process was stopped
    members: int = 1  # processes in the tree dumped (PID and its descendants)
    pages_referenced: int = 0  # a tree's pages stored once for several members (COW)
    # What members of a tree killed without the check of their descriptors share that a
    # restore will make once for each (hijack.restore.shared.copied_refusals' lines).
    copied: tuple[str, ...] = ()
    # A snapshot dump's freeze, step by step (hijack.timing: ms in the order they ended),
    # and the system calls injected into the frozen process.
    freeze_steps: dict[str, float] = field(default_factory=dict)
    injected: int = 0
    # A snapshot by pre-copy rounds (hijack.mutator.snapshot_rounds): how many rounds
    # the image holds before its final IMAGE, and how long the process was stopped
    # to start tracking its writes (a pause of its own, before the freeze).
    rounds: int = 0
    tracking_pause_ms: float = 0.0


class Precopied(Protocol):
    """What a move's pre-copy rounds sent already (hijack.mutator.precopy.Precopy)."""

    def segments(self, segments: list[rec.Segment]) -> list[rec.Segment]:
        """The segments, PRECOPIED where the destination holds their pages."""

    def runs(self, segment: rec.Segment) -> list[tuple[int, int]]:
        """The pages of a PRECOPIED segment changed since they were sent."""

    def stored_runs(
        self, segment: rec.Segment, runs: list[tuple[int, int]]
    ) -> list[tuple[int, int]]:
        """`runs` of a segment stored whole, less those a post-copy leaves out."""

    def vm_flags(self, maps: list[procfs.MapEntry]) -> dict[int, tuple[str, ...]]:
        """The smaps VmFlags of `maps`, by start (read before the freeze where unchanged)."""

    def flags_known(self, maps: list[procfs.MapEntry]) -> bool:
        """Whether vm_flags(maps) answers without waiting for smaps to be read again."""

    def guard_regions(self) -> list[tuple[int, int]]:
        """The guard pages at the freeze (scanned beside the rest where scan_guards ran)."""

    @property
    def signal_actions(self) -> list[rec.SigAction]:
        """The signal actions read when the tracking started (read_signal_actions' `known`)."""

    @property
    def buffer(self) -> bytearray:
        """READ_CHUNK bytes the rounds read through (their pages touched already)."""


@dataclass
class PageCounts:
    untouched: int = 0
    from_files: int = 0


def dump(
    pid: int,
    out: BinaryIO,
    *,
    kill: bool = False,
    no_binary: bool = False,
    no_shared_libs: bool = False,
    on_complete: Callable[[], None] | None = None,
    before_kill: Callable[[tuple[int, ...]], None] | None = None,
    check_descriptors: bool = True,
    ghost_limit: int = DEFAULT_GHOST_LIMIT,
    image: str = lockbook.STDOUT,
    snapshot: str = "auto",
) -> DumpResult:
    """Write an image of `pid` and its descendants to `out`; they run on unless `kill`.

    A process without children gets a plain image; a tree, a tree stream
    (docs/crf.md §7b), its members all stopped together. Without `kill`, a snapshot: the
    process (every member of a tree) frozen only to read what a forked copy cannot tell,
    or, by rounds, what it wrote since the last round (hijack.mutator.snapshot).

    `on_complete` runs once the whole image is written and flushed, while the
    process is still stopped with `kill` (to put the file in place). With `kill`, the
    process is killed only after that, and after `before_kill(pids)` (which hands
    the descriptors of the processes `pids`, the tree's living members, root
    first, to its shadow): a failed dump never loses the process.
    With `kill`, an image a restore would refuse is refused before anything is
    written (Unsupported), and the process runs on; its descriptors are left
    out of that check unless `check_descriptors` (its shadow takes them over,
    or the user chose to drop them). A deleted file holding more than
    `ghost_limit` bytes of data is refused before anything is written. `image`: where
    `out` ends up (an absolute path, or lockbook.STDOUT), written down with the network
    locks a `kill` leaves for the restore (hijack.lockbook).
    `check_descriptors` also reads TCP sockets as a restore rebuilds them (snapshots too).
    `snapshot` (a single process, not `kill`): "rounds" (pre-copy rounds in the image:
    hijack.mutator.snapshot_rounds), "fork" (a forked copy: hijack.mutator.snapshot), or
    "auto": rounds for a process whose private memory a fork copies too slowly (the fork
    where its writes cannot be tracked).
    """
    if not kill:
        # Imported here: the snapshots are built of this module's parts.
        from hijack.mutator.snapshot import (
            TreeSnapshotUnavailable,
            snapshot_dump,
            snapshot_tree_dump,
        )
        from hijack.mutator.snapshot_rounds import TrackingUnavailable, rounds_dump, worth_rounds

        def snapshot_by(way: Callable[..., DumpResult]) -> DumpResult:
            return way(
                pid,
                out,
                no_binary=no_binary,
                no_shared_libs=no_shared_libs,
                on_complete=on_complete,
                ghost_limit=ghost_limit,
                connections=check_descriptors,
            )

        if len(read_tree(pid).members) > 1:
            # A tree: by forked copies; stopped throughout where those cannot be had.
            try:
                return snapshot_by(snapshot_tree_dump)
            except TreeSnapshotUnavailable:
                pass  # (nothing written: found once frozen, before any record)
        else:
            # A single process (a child forked after this look is not in its image). A big
            # one: rounds, since a fork's page-table copy alone outlasts the target freeze;
            # a small one: the fork, quicker than starting the tracking.
            if snapshot == "rounds" or (snapshot == "auto" and worth_rounds(pid)):
                try:
                    return snapshot_by(rounds_dump)
                except TrackingUnavailable:
                    if snapshot == "rounds":
                        raise  # (nothing written yet: the tracking comes first)
            return snapshot_by(snapshot_dump)
    widen_if_pipe(out)
    stopped_at = time.perf_counter()
    # Connections a killed process's restore rebuilds are locked while it is gone.
    locking = kill and check_descriptors
    with frozen_tree(pid) as frozen, contextlib.ExitStack() as held:
        # Every member's: a connection two members share (inherited) is locked once.
        locked: set[int] = set()
        members_locked = frozen.tracees if locking else {}
        locks = [held.enter_context(NetworkLocks(m, image, locked)) for m in members_locked]
        reached("dump-seized")
        members = len(frozen.record.members)
        copied: tuple[str, ...] = ()
        if kill and members > 1:
            refuse_unrestorable_tree(frozen, check_descriptors)
            if not check_descriptors:
                copied = tuple(copied_refusals(frozen.record))
        tracee = frozen.tracees[pid]

        tree_sockets = sockets_of(frozen.tracees) if members > 1 else frozenset()
        # The members sharing their parent's memory (CLONE_VM): their images hold no pages.
        vm_children = frozenset(
            c.pid for c in frozen.record.contexts if rec.CloneFlags.VM in c.flags
        )

        def write_member(member: Tracee, shared: SharedPages | None) -> tuple[rec.End, int, int]:
            check = functools.partial(
                refuse_unrestorable, member.pid, check_descriptors, tree_sockets=tree_sockets
            )
            return write_image(
                member,
                out=out,
                no_binary=no_binary,
                no_shared_libs=no_shared_libs,
                check=check if kill else None,
                ghost_limit=ghost_limit,
                connections=check_descriptors,
                tree=frozenset(frozen.tracees),
                shared_pages=shared,
                splice=shared is None,
                parents_memory=member.pid in vm_children,
                tree_bytes=tree_bytes,
            )

        shared_pages = SharedPages()
        tree_bytes: dict[Hashable, int] = {}  # shared memory's bytes: in one member's image
        if members == 1:
            end, threads, written = write_member(tracee, None)
            pages = end.pages_stored
        else:
            threads, written, pages = write_tree(frozen, out, write_member, shared_pages)
        reached("dump-written")
        if on_complete is not None:
            on_complete()
        if kill:
            if before_kill is not None:
                before_kill(tuple(frozen.tracees))
            reached("dump-handed-over")
            for lock in locks:
                lock.silence()
            for member in reversed(list(frozen.tracees.values())):
                kill_stopped(member)
            for lock in locks:
                lock.keep()
    frozen_ms = (time.perf_counter() - stopped_at) * 1000
    return DumpResult(
        pid, threads, written, pages, frozen_ms, members, shared_pages.referenced, copied
    )


def write_tree(
    frozen: FrozenTree,
    out: BinaryIO,
    image: Callable[[Tracee, SharedPages], tuple[rec.End, int, int]],
    shared: SharedPages | None = None,
) -> tuple[int, int, int]:
    """Write the tree stream of a frozen tree (docs/crf.md §7b): its TREE, then
    `image(tracee, shared)` of each member that is not a zombie, its private pages still
    shared copy-on-write with a member before it referred to, not stored again (`shared`
    tells how many); return threads, bytes and pages."""
    shared = SharedPages() if shared is None else shared
    writer = ImageWriter(out)
    writer.write(frozen.record)
    writer.close()
    threads, written, pages = 0, writer.bytes_written, 0
    for member in frozen.record.imaged:
        end, member_threads, member_written = image(frozen.tracees[member.pid], shared)
        shared.written.append(member.pid)
        threads, written = threads + member_threads, written + member_written
        pages += end.pages_stored
    return threads, written, pages


def write_image(
    tracee: Tracee,
    out: BinaryIO,
    *,
    no_binary: bool = False,
    no_shared_libs: bool = False,
    precopied: Precopied | None = None,
    check: Callable[[tuple[rec.Segment, ...], ImageFiles], None] | None = None,
    ghost_limit: int = DEFAULT_GHOST_LIMIT,
    connections: bool = False,
    laps: Laps | None = None,
    holders_before: procfs.HolderScan | None = None,
    sockets: dict[int, procfs.SocketInfo] | None = None,
    tree: frozenset[int] = frozenset(),
    shared_pages: SharedPages | None = None,
    splice: bool = False,
    parents_memory: bool = False,
    parasite: Area | None = None,
    brk: int | None = None,
    maps: list[procfs.MapEntry] | None = None,
    injected: Injected | None = None,
    head_first: bool = False,
    tree_bytes: dict[Hashable, int] | None = None,
) -> tuple[rec.End, int, int]:
    """Write the image of a seized process to `out`; return its END, threads and size.

    With `precopied`, the image is the final one of a move after pre-copy
    rounds (docs/crf.md §7a): only what changed since of what they sent.
    `check(segments, files)` may refuse the image before its first byte is written.
    A deleted file the process holds may put at most `ghost_limit` bytes in it.
    `connections`: established TCP connections are read with TCP_REPAIR (hijack.objects.tcp).
    `laps` (a move's, hijack.timing) gets a lap at the end of each step.
    `holders_before`: who held its pipes before it was stopped (hijack.objects.pipe);
    `sockets`: its network namespace's socket tables, read since it was stopped.
    `tree`: the members of the tree dumped with it (the pipes joining them are inside).
    `shared_pages`: the frames the tree's images before this one stored (a tree stream's
    member): its private pages among them are referred to, not stored again.
    `splice`: its pages go from the process to `out` without passing through hijack, where
    `out` is a file (hijack.mutator.spliced_pages); not with `precopied` or `shared_pages`.
    `parents_memory`: a tree's member sharing its parent's memory (CLONE_VM): its image
    holds no pages, its parent's has them (its layout is described all the same).
    `parasite`: an area for the batched calls (hijack.mutator.parasite) mapped already;
    `brk`: the program break, read already (read_brk).
    `maps`: its layout, read since it was stopped and before `parasite` was mapped (a
    move's freeze reads it first: read once, not twice).
    `injected`: what its batches told, run already (queue_injected: a tree's members'
    side by side) and the process put back; nothing is injected here then.
    `head_first`: `out` flushed once the records before the pages are in it (a move's:
    the destination rebuilds the descriptors and layout while the rest comes); with `brk`
    given, they are read and written before the injected calls run (they need no other).
    `tree_bytes`: a tree stream's memory objects whose bytes an image before this one holds
    (hijack.objects.base.DumpContext.tree_bytes): not stored again.
    """
    laps = laps or Laps()
    pid = tracee.pid
    options = dump_options(no_binary=no_binary, no_shared_libs=no_shared_libs)
    # `maps` given: read before the area was mapped, its own layout as it is. (Should the
    # area have merged with a neighbour of its kind, unmapping it gives the neighbour back
    # its range: the calls run in it all the same.)
    if maps is None:
        maps = procfs.read_maps(pid)
        if parasite is not None:
            unmerged = without_area(maps, parasite)
            if unmerged is None:  # merged with a neighbour: one of our own, below
                unmap_area(tracee, parasite)
                parasite = None
            else:
                maps = unmerged
    aio_rings = aio.read_rings(pid, maps, moving=precopied is not None) if injected is None else ()
    maps = [entry for entry in maps if not aio.is_aio_ring(entry)]  # made again by io_setup
    referable = shared_pages.referable if shared_pages is not None else frozenset()

    def head(brk: int, credentials: Credentials) -> tuple[ImageWriter, list[rec.Segment]]:
        """The image's records before its pages, written (and `out` flushed if head_first):
        they need no injected call but the program break's."""
        files = objects.read_files(
            pid,
            connections=connections,
            maps=maps,
            ghost_limit=ghost_limit,
            holders_before=holders_before,
            sockets=sockets,
            tree=tree,
            tree_bytes=tree_bytes,
        )
        laps.lap("image: descriptors")
        flags = precopied.vm_flags(maps) if precopied is not None else None
        segments = held_by_objects(describe_segments(pid, maps, options, flags=flags), files)
        if precopied is not None:
            segments = precopied.segments(segments)
        laps.lap("image: segments")
        if check is not None:
            check(tuple(segments), files)
        dumped = {thread.tid for thread in _live(tracee)}
        writer = ImageWriter(out, referable=referable)
        write_head(
            writer,
            ImageHead(
                header=read_header(pid, options),
                credentials=credentials[0],
                thread_credentials=tuple(own for own in credentials[1] if own.tid in dumped),
                rlimits=read_rlimits(pid),
                memory_structure=read_memory_structure(pid, brk),
                segments=segments,
                files=files,
            ),
        )
        if head_first:
            out.flush()
        laps.lap("image: head")
        return writer, segments

    # A move's, its program break read already: its head goes before the injected calls
    # (the destination rebuilds its layout and descriptors while they run, issue #17).
    # (Not where smaps is read again, in a thread: the injected calls then run beside it.)
    early = None
    known_flags = precopied is None or precopied.flags_known(maps)
    if injected is None and head_first and brk is not None and known_flags:
        known = read_all_credentials(pid, tracee.thread_ids)
        early = head(brk, known)
    if injected is None:
        # Every call below in a batch (hijack.mutator.parasite): the injection thread's
        # calls in one, every other thread's two in one of its own, all run side by side.
        # In `parasite`, an area the caller mapped (and unmaps), or one mapped here.
        with contextlib.nullcontext(parasite) if parasite else parasite_area(tracee) as area:
            batch = Batch(area)
            read_main = _queue_main(
                tracee, batch, brk, precopied, aio_rings, known if early is not None else None
            )
            # Run with every other thread's two calls, side by side (one stop each, at once).
            others = [thread for thread in _live(tracee) if thread.tid != tracee.injection_tid]
            queue_other = functools.partial(queue_thread, tracee)
            main = [(tracee.injection_tid, batch)]
            records = run_in_threads(tracee, area, others, queue_other, queued=main)
            injected = read_main(dict(zip((t.tid for t in others), records, strict=True)))
        tracee.put_back()  # nothing more is injected: a killed hijack leaves it correct
    laps.lap("image: injected")
    writer, segments = early if early is not None else head(injected.brk, injected.credentials)
    tail = ImageTail(
        threads=injected.threads,
        signal_state=rec.SignalState(
            actions=tuple(injected.actions),
            shared_pending=tuple(pt.peek_pending_signals(tracee.injection_tid, shared=True)),
        ),
        cwd=rec.Cwd(cwd=procfs.read_cwd(pid), root=procfs.read_root(pid)),
        settings=injected.settings,
        timers=injected.timers,
    )

    def write_pages(writer: ImageWriter) -> PageCounts:
        if parents_memory:
            return PageCounts()  # its parent's image holds them: one memory, stored once
        if not splice:
            return write_memory(pid, segments, writer, precopied, shared_pages)
        with page_splicer(tracee, out, pipes=False) as splicer:
            return write_memory(pid, segments, writer, splicer=splicer)

    return write_tail(out, writer, write_pages, tail)


@dataclass(frozen=True)
class Injected:
    """What only the stopped process itself tells its image (its batches' calls)."""

    brk: int
    actions: list[rec.SigAction]
    threads: list[rec.Thread]
    settings: rec.ProcessSettings
    timers: rec.Timers
    # Read from /proc while the batch runs (a JVM's 31 threads: 1.5 ms), with it.
    credentials: Credentials


def queue_injected(
    tracee: Tracee, area: Area, *, precopied: Precopied | None = None
) -> tuple[list[tuple[int, Batch]], Callable[[], Injected]]:
    """Every call write_image asks inside the stopped process, queued in `area` (mapped
    since it was stopped, as big as parasite.area_size tells): the injection thread's in
    one batch at its start, every other thread's two in one of its own after it, laid out
    at once; the batches by tid, and a function telling what they read once run (the
    caller runs them, a tree's members' side by side: parasite.run_across)."""
    maps = procfs.read_maps(tracee.pid)
    aio_rings = aio.read_rings(tracee.pid, maps, moving=precopied is not None)
    batch = Batch(area)
    read_main = _queue_main(tracee, batch, None, precopied, aio_rings)
    batches = [(tracee.injection_tid, batch)]
    threads_read: dict[int, Callable[[], rec.Thread]] = {}
    for thread in _live(tracee):
        if thread.tid != tracee.injection_tid:
            own = Batch(area, batches[-1][1].end)
            threads_read[thread.tid] = queue_thread(tracee, thread, own)
            batches.append((thread.tid, own))
    return batches, lambda: read_main(threads_read)


def _queue_main(
    tracee: Tracee,
    batch: Batch,
    brk: int | None,
    precopied: Precopied | None,
    aio_rings: tuple[rec.AioRing, ...],
    credentials: Credentials | None = None,
) -> Callable[[dict[int, Callable[[], rec.Thread]]], Injected]:
    """The injection thread's calls of an image, in `batch`; the returned function tells
    them once it ran, given the other threads' records (queue_thread's, by tid).
    `credentials`: read_all_credentials', read already (else read beside the batch)."""
    brk_call = batch.call("brk", 0) if brk is None else None
    known = precopied.signal_actions if precopied is not None else None
    actions_read = queue_signal_actions(tracee, batch, known)
    main_read = queue_thread(tracee, tracee.threads[tracee.injection_tid], batch)
    settings_read = settings.queue_settings(
        tracee,
        batch,
        batch.area.address,
        tracee.thread_ids,
        aio_rings=aio_rings,
        guard_regions=precopied.guard_regions if precopied is not None else None,
    )
    timers_read = timers.queue_timers(tracee, batch)
    # Each thread's /proc status (a JVM's 31: 1.5 ms), read while the batch runs.
    credentials_read = (
        None
        if credentials is not None
        else InThread(
            read_all_credentials, tracee.pid, tracee.thread_ids, name="hijack-credentials"
        )
    )

    def read(others: dict[int, Callable[[], rec.Thread]]) -> Injected:
        read_now = credentials_read.result() if credentials_read is not None else credentials
        assert read_now is not None
        found = {tracee.injection_tid: main_read, **others}
        told = brk_call.result if brk_call is not None else brk
        assert told is not None
        return Injected(
            brk=told,
            actions=actions_read(),
            threads=[found[thread.tid]() for thread in _live(tracee)],
            settings=settings_read(),
            timers=timers_read(),
            credentials=read_now,
        )

    return read


def dump_options(*, no_binary: bool, no_shared_libs: bool) -> rec.DumpOptions:
    options = rec.DumpOptions(0)
    if no_binary:
        options |= rec.DumpOptions.NO_BINARY
    if no_shared_libs:
        options |= rec.DumpOptions.NO_SHARED_LIBS
    return options


# A process's credentials and its threads' own (read_all_credentials).
Credentials = tuple[rec.Credentials, tuple[rec.ThreadCredentials, ...]]


@dataclass
class ImageHead:
    """The records of an image before its pages, in the order they are written."""

    header: rec.ImageHeader
    credentials: rec.Credentials
    thread_credentials: tuple[rec.ThreadCredentials, ...]
    rlimits: rec.Rlimits
    memory_structure: rec.MemoryStructure
    segments: list[rec.Segment]
    files: ImageFiles


@dataclass
class ImageTail:
    """The records of an image after its pages, in the order they are written."""

    threads: list[rec.Thread]
    signal_state: rec.SignalState
    cwd: rec.Cwd
    settings: rec.ProcessSettings
    timers: rec.Timers


@dataclass
class ImageParts(ImageHead, ImageTail):
    """Every record of an image but its pages."""


def write_parts(
    out: BinaryIO,
    parts: ImageParts,
    write_pages: Callable[[ImageWriter], PageCounts],
    *,
    referable: frozenset[int] = frozenset(),
) -> tuple[rec.End, int, int]:
    """Write an image of `parts`, its pages by `write_pages`; return its END, threads and size.
    `referable`: the members of its tree stream its pages may refer to (written before)."""
    writer = ImageWriter(out, referable=referable)
    write_head(writer, parts)
    return write_tail(out, writer, write_pages, parts)


def write_head(writer: ImageWriter, head: ImageHead) -> None:
    """The records of the image before its pages."""
    writer.write(head.header)
    writer.write(head.credentials)
    for thread_credentials in head.thread_credentials:
        writer.write(thread_credentials)
    writer.write(head.rlimits)
    writer.write(head.memory_structure)
    writer.write(rec.Segments(segments=tuple(head.segments)))
    writer.write(head.files.files)
    for section in head.files.sections:
        writer.write(section)


def write_tail(
    out: BinaryIO,
    writer: ImageWriter,
    write_pages: Callable[[ImageWriter], PageCounts],
    tail: ImageTail,
) -> tuple[rec.End, int, int]:
    """The pages (by `write_pages`) and the records after them, END last; return END, the
    threads and the image's size."""
    counts = write_pages(writer)
    for thread_record in tail.threads:
        writer.write(thread_record)
    writer.write(tail.signal_state)
    writer.write(tail.cwd)
    writer.write(tail.settings)
    writer.write(tail.timers)
    end = writer.close(pages_untouched=counts.untouched, pages_file=counts.from_files)
    out.flush()
    return end, len(tail.threads), writer.bytes_written


def refuse_unrestorable_tree(frozen: FrozenTree, check_descriptors: bool) -> None:
    """Never kill a tree that could not come back as it is: refuse what a restore of its
    relations would refuse, what members share that no image records, and (unless its
    shadow keeps their descriptors: not `check_descriptors`) what members share that a
    restore would copy for each."""
    reasons = relation_refusals(frozen.record) + shared_context_refusals(frozen.tree)
    if check_descriptors:
        reasons += copied_refusals(frozen.record)
    if reasons:
        root = frozen.record.members[0].pid
        raise Unsupported(f"not killing the tree of process {root}: {'; '.join(reasons)}")


def sockets_of(pids: Iterable[int]) -> frozenset[int]:
    """The inodes of the sockets the stopped processes `pids` hold."""
    return frozenset(
        entry.ino
        for pid in pids
        for entry in procfs.list_fds(pid)
        if entry.kind is procfs.FdKind.SOCKET
    )


def refuse_unrestorable(
    pid: int,
    check_descriptors: bool,
    segments: tuple[rec.Segment, ...],
    files: ImageFiles,
    *,
    tree_sockets: frozenset[int] = frozenset(),
) -> None:
    """Never kill what cannot come back: refuse what a restore of this image would refuse.
    `tree_sockets`: the sockets of the tree the process is dumped with (a socket pair
    joining two members is made again for both: hijack.objects.unix.joins_members)."""

    def held(descriptor: rec.FileDescriptor) -> bool:
        sock = files.objects.get(descriptor.object_id)
        joins = isinstance(sock, rec.UnixSocket) and unix.joins_members(sock, files, tree_sockets)
        return joins or not check_descriptors

    problems = restore_problems(segments, files, held=held)
    reasons = list(problems.mappings)
    if problems.descriptors:
        reasons.append(
            f"a restore could not rebuild {', '.join(r for _, r in problems.descriptors)}"
            f" ({ATTACH_HINT}; or --skip-unsupported to kill it anyway and drop them)"
        )
    if reasons:
        raise Unsupported(f"not killing process {pid}: {'; '.join(reasons)}")


def dump_to_file(
    pid: int,
    path: Path,
    *,
    kill: bool = False,
    no_binary: bool = False,
    no_shared_libs: bool = False,
    before_kill: Callable[[tuple[int, ...]], None] | None = None,
    check_descriptors: bool = True,
    ghost_limit: int = DEFAULT_GHOST_LIMIT,
    snapshot: str = "auto",
) -> DumpResult:
    """dump() into `path`, through a temporary file renamed when the image is complete.

    A failed dump leaves no partial image behind (and, with `kill`, the
    process alive): the file is synced and in place before the process dies.
    """
    partial = path.with_name(f".{path.name}.partial")
    placed = False
    try:
        # 0600: the image holds the process's memory, its secrets included. Its pages go
        # to the disk as they are written: the sync before it is put in place waits less.
        with WritebackFile(io.FileIO(partial, "wb", opener=_owner_only)) as out:

            def put_in_place() -> None:
                nonlocal placed
                os.fsync(out.fileno())
                os.replace(partial, path)
                placed = True

            return dump(
                pid,
                out,
                kill=kill,
                no_binary=no_binary,
                no_shared_libs=no_shared_libs,
                on_complete=put_in_place,
                before_kill=before_kill,
                check_descriptors=check_descriptors,
                ghost_limit=ghost_limit,
                image=str(path.resolve()),
                snapshot=snapshot,
            )
    except OSError as exc:
        raise HijackError(f"cannot write image {path}: {exc.strerror or exc}") from None
    except BaseException:
        if placed and kill:
            # Interrupted between the image and the kill: the process runs on,
            # and an image of it that could be restored beside it is no good.
            path.unlink(missing_ok=True)
        raise
    finally:
        partial.unlink(missing_ok=True)


def widen_if_pipe(out: BinaryIO) -> None:
    """Give a pipe we write an image to a bigger buffer: with the default 64 KiB,
    writer and reader take turns every 64 KiB and a dump runs at half speed."""
    try:
        fd = out.fileno()
        if S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, IMAGE_PIPE_SIZE)
    except (OSError, ValueError, io.UnsupportedOperation):
        pass  # not a file, or a size above this user's limit: the default does, only slower


def _owner_only(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def kill_stopped(tracee: Tracee) -> None:
    """SIGKILL a seized process and collect each thread's death as its tracer.

    Until its tracer has seen it die, a traced thread stays hidden from its
    real parent's wait(); collecting it lets the parent reap the process.
    """
    we_are_parent = procfs.read_stat(tracee.pid).ppid == os.getpid()
    os.kill(tracee.pid, signal.SIGKILL)
    # The leader's death is reported only once every other thread has been
    # collected: collect them first. If we are its parent too, collecting the
    # leader would reap it: leave that to our caller's own wait().
    ordered = sorted(tracee.threads.values(), key=lambda thread: thread.tid == tracee.pid)
    for thread in ordered:
        if thread.state is ThreadState.GONE or (thread.tid == tracee.pid and we_are_parent):
            thread.state = ThreadState.GONE
            continue
        with contextlib.suppress(ProcessGone):
            while not (result := pt.wait_for(thread.tid)) or not result.exited:
                pass
        thread.state = ThreadState.GONE


def _live(tracee: Tracee) -> list[TracedThread]:
    return [tracee.threads[tid] for tid in tracee.thread_ids]


def read_header(pid: int, options: rec.DumpOptions) -> rec.ImageHeader:
    stat = procfs.read_stat(pid)
    return rec.ImageHeader(
        pid=pid,
        ppid=stat.ppid,
        pgid=stat.pgrp,
        sid=stat.session,
        comm=procfs.read_comm(pid),
        argv=tuple(procfs.read_cmdline(pid)),
        exe=procfs.read_exe(pid),
        node=socket_module.gethostname(),
        created_ns=time.time_ns(),
        options=options,
    )


def read_credentials(pid: int, tid: int | None = None) -> rec.Credentials:
    """The credentials of process `pid` (its leader's), or of its thread `tid`."""
    status = procfs.read_status(pid, tid)
    uid, euid, suid, fsuid = status.uid
    gid, egid, sgid, fsgid = status.gid
    return rec.Credentials(
        uid=uid,
        euid=euid,
        suid=suid,
        fsuid=fsuid,
        gid=gid,
        egid=egid,
        sgid=sgid,
        fsgid=fsgid,
        groups=tuple(status.groups),
        cap_inheritable=status.cap_inh,
        cap_permitted=status.cap_prm,
        cap_effective=status.cap_eff,
        cap_bounding=status.cap_bnd,
        cap_ambient=status.cap_amb,
        umask=status.umask or 0,
        no_new_privs=status.no_new_privs,
    )


def read_all_credentials(pid: int, thread_ids: Iterable[int]) -> Credentials:
    """The process's credentials and those of its threads that have their own."""
    process = read_credentials(pid)
    return process, read_thread_credentials(pid, thread_ids, process)


def read_thread_credentials(
    pid: int, thread_ids: Iterable[int], process: rec.Credentials
) -> tuple[rec.ThreadCredentials, ...]:
    """The threads of `pid` whose credentials differ from the process's (`process`): the
    kernel keeps them per thread (docs/crf.md, THREAD_CREDENTIALS). The umask is the fs
    context's, not the thread's: not compared."""
    found = []
    for tid in thread_ids:
        if tid == pid:
            continue
        own = replace(read_credentials(pid, tid), umask=process.umask)
        if own != process:
            found.append(rec.ThreadCredentials(tid=tid, credentials=own))
    return tuple(found)


def read_rlimits(pid: int) -> rec.Rlimits:
    limits = sorted(procfs.read_limits(pid), key=lambda limit: limit.resource)
    return rec.Rlimits(
        limits=tuple(
            rec.Rlimit(resource=lim.resource, rlim_cur=lim.soft, rlim_max=lim.hard)
            for lim in limits
        )
    )


def read_memory_structure(pid: int, brk: int) -> rec.MemoryStructure:
    stat = procfs.read_stat(pid)
    return rec.MemoryStructure(
        start_code=stat.start_code,
        end_code=stat.end_code,
        start_data=stat.start_data,
        end_data=stat.end_data,
        start_brk=stat.start_brk,
        brk=brk,
        start_stack=stat.start_stack,
        arg_start=stat.arg_start,
        arg_end=stat.arg_end,
        env_start=stat.env_start,
        env_end=stat.env_end,
        auxv=tuple(
            rec.AuxvEntry(a_type=a_type, a_val=a_val) for a_type, a_val in procfs.read_auxv(pid)
        ),
        exe_file=procfs.read_exe(pid),
        personality=procfs.read_personality(pid),
    )


def read_brk(tracee: Tracee, area: Area) -> int:
    """The program break (brk(0): one stop in `area`). brk takes the memory map's write
    lock even to tell it: asked before anything reads smaps, it waits for no reader."""
    batch = Batch(area)
    call = batch.call("brk", 0)
    batch.run(tracee)
    assert call.result is not None
    return call.result


def read_signal_actions(
    tracee: Tracee, scratch: int, known: list[rec.SigAction] | None = None
) -> list[rec.SigAction]:
    """queue_signal_actions, one call at a time, each writing its 32 bytes at `scratch`
    (borrowed stack bytes hold no more)."""
    found = []
    for entry in _actions_known(tracee, known):
        if isinstance(entry, rec.SigAction):
            found.append(entry)
            continue
        tracee.checked_syscall("rt_sigaction", entry, 0, scratch, 8)
        found.append(_sigaction(memory.read(tracee.pid, scratch, SIGACTION_SIZE)))
    return found


def _actions_known(tracee: Tracee, known: list[rec.SigAction] | None) -> list[rec.SigAction | int]:
    """Each signal's action where `known` tells it (see queue_signal_actions), or its
    number where it must be asked."""
    status = procfs.read_status(tracee.pid) if known is not None else None
    found: list[rec.SigAction | int] = []
    for signal_number in range(1, rec.SIGNAL_COUNT + 1):
        if status is not None and known is not None and signal_number != signal.SIGCHLD:
            bit = 1 << (signal_number - 1)
            now = SIG_IGN if status.sig_ign & bit else SIG_DFL
            before = known[signal_number - 1]
            if not status.sig_cgt & bit and before.sa_handler == now:
                found.append(before)
                continue
        found.append(signal_number)
    return found


def queue_signal_actions(
    tracee: Tracee, batch: Batch, known: list[rec.SigAction] | None = None
) -> Callable[[], list[rec.SigAction]]:
    """Every signal action of the stopped process (one injected call each, in `batch`);
    the returned function tells them once it ran.

    With `known`, the actions read a while before (a move's pre-copy): those
    of signals neither caught then nor now, nor SIGCHLD, are taken from it when
    /proc shows them still default or still ignored. For such a signal no
    handler runs, so its flags and mask change nothing (SIGCHLD's do).
    """
    found: list[rec.SigAction | int] = []  # an action, or where the kernel writes it
    for entry in _actions_known(tracee, known):
        if isinstance(entry, rec.SigAction):
            found.append(entry)
            continue
        written = batch.buffer(SIGACTION_SIZE)
        batch.call("rt_sigaction", entry, 0, written, 8)
        found.append(written)

    def actions() -> list[rec.SigAction]:
        return [
            entry
            if isinstance(entry, rec.SigAction)
            else _sigaction(batch.read(entry, SIGACTION_SIZE))
            for entry in found
        ]

    return actions


def _sigaction(raw: bytes) -> rec.SigAction:
    handler, flags, restorer, mask = struct.unpack("<4Q", raw)
    return rec.SigAction(sa_handler=handler, sa_flags=flags, sa_restorer=restorer, sa_mask=mask)


def read_threads(tracee: Tracee, threads: list[TracedThread], scratch: int) -> list[rec.Thread]:
    """queue_thread for each, run with `scratch` (at least 48 bytes) for what they write
    (one call at a time: the scratch is not executable)."""
    area = Area(scratch, BORROWED_SCRATCH, executable=False)
    records = run_in_threads(tracee, area, threads, functools.partial(queue_thread, tracee))
    return [record() for record in records]


def queue_thread(tracee: Tracee, thread: TracedThread, batch: Batch) -> Callable[[], rec.Thread]:
    """A thread's record; its two calls go in `batch`, which must run in that thread."""
    tid_address = batch.buffer(8)
    batch.call("prctl", PR_GET_TID_ADDRESS, tid_address, 0, 0, 0)
    altstack = batch.buffer(24)
    batch.call("sigaltstack", 0, altstack)

    def record() -> rec.Thread:
        (clear_child_tid,) = struct.unpack("<Q", batch.read(tid_address, 8))
        ss_sp, ss_flags, ss_size = struct.unpack("<Qi4xQ", batch.read(altstack, 24))
        return _thread_record(tracee, thread, clear_child_tid, ss_sp, ss_flags, ss_size)

    return record


def _thread_record(
    tracee: Tracee,
    thread: TracedThread,
    clear_child_tid: int,
    ss_sp: int,
    ss_flags: int,
    ss_size: int,
) -> rec.Thread:
    tid = thread.tid
    rseq = pt.get_rseq_configuration(tid)
    head, head_length = get_robust_list(tid)
    registers = recorded_registers(thread)
    return rec.Thread(
        tid=tid,
        comm=procfs.read_task_comm(tracee.pid, tid),
        regs=rec.UserRegsStruct(**{name: getattr(registers, name) for name in pt.REGISTER_NAMES}),
        xstate=pt.get_xstate(tid),
        sigmask=thread.signal_mask,
        pending=tuple(pt.peek_pending_signals(tid, shared=False)),
        rseq=rec.RseqConfiguration(
            rseq_abi_pointer=rseq.rseq_abi_pointer,
            rseq_abi_size=rseq.rseq_abi_size,
            signature=rseq.signature,
            flags=rseq.flags,
        ),
        robust_list=rec.RobustList(head=head, len=head_length),
        clear_child_tid=clear_child_tid,
        sigaltstack=rec.SigAltStack(ss_sp=ss_sp, ss_flags=ss_flags & 0xFFFFFFFF, ss_size=ss_size),
    )


def describe_segments(
    pid: int,
    maps: list[procfs.MapEntry],
    options: rec.DumpOptions,
    *,
    flags: dict[int, tuple[str, ...]] | None = None,
) -> list[rec.Segment]:
    """The segments of `maps`, with the VmFlags `flags` (by start; default: read from smaps,
    which walks every page table: tens of milliseconds for a big process)."""
    flags = procfs.read_smaps_flags(pid) if flags is None else flags
    exe = procfs.read_exe(pid)
    segments = []
    for mapping in maps:
        if mapping.path in SKIPPED_MAPPINGS:
            continue
        contents, identity = _contents_of(pid, mapping, exe, options)
        segments.append(
            rec.Segment(
                start=mapping.start,
                end=mapping.end,
                prot=rec.Prot(
                    (rec.Prot.READ if mapping.readable else 0)
                    | (rec.Prot.WRITE if mapping.writable else 0)
                    | (rec.Prot.EXEC if mapping.executable else 0)
                ),
                shared=mapping.shared,
                offset=mapping.offset,
                dev_major=mapping.dev_major,
                dev_minor=mapping.dev_minor,
                inode=mapping.inode,
                path=mapping.path,
                vm_flags=tuple(flags.get(mapping.start, ())),
                contents=contents,
                file=identity,
            )
        )
    return segments


def _is_file_mapping(mapping: procfs.MapEntry) -> bool:
    return mapping.inode != 0 and mapping.path.startswith("/") and not mapping.deleted


def _contents_of(
    pid: int, mapping: procfs.MapEntry, exe: str, options: rec.DumpOptions
) -> tuple[rec.ContentsKind, rec.FileIdentity | None]:
    """How a segment's bytes get back at restore (docs/crf.md, "Segment contents")."""
    if mapping.path in KERNEL_MAPPINGS:
        return rec.ContentsKind.NONE, None
    if not _is_file_mapping(mapping):
        return rec.ContentsKind.STORED, None
    if mapping.shared:
        # The file itself holds a shared mapping's bytes.
        return rec.ContentsKind.NONE, None
    leave_out = (mapping.path == exe and rec.DumpOptions.NO_BINARY in options) or (
        mapping.path != exe
        and rec.DumpOptions.NO_SHARED_LIBS in options
        and is_shared_library(mapping.path)
    )
    if leave_out:
        link = f"/proc/{pid}/map_files/{mapping.start:x}-{mapping.end:x}"
        return rec.ContentsKind.FILE, file_identity(link, mapping.path)
    return rec.ContentsKind.STORED, None


def write_memory(
    pid: int,
    segments: list[rec.Segment],
    writer: ImageWriter,
    precopied: Precopied | None = None,
    shared_pages: SharedPages | None = None,
    *,
    splicer: PageSplicer | None = None,
) -> PageCounts:
    counts = PageCounts()
    # Reused: reading into fresh buffers is several times slower. A move's rounds have one
    # touched already: a fresh one costs 2-3 ms of a freeze (the kernel zeroes its pages).
    buffer = precopied.buffer if precopied is not None else bytearray(READ_CHUNK)
    # A move's final image: the pages written since the last round, a few here and there.
    gathered = GatheredRuns(pid, writer, buffer) if precopied is not None else None
    with memory.MemoryFile(pid) as mem:
        for segment in segments:
            write_segment_pages(
                pid,
                mem,
                segment,
                writer,
                counts,
                buffer,
                precopied,
                shared_pages=shared_pages,
                splicer=splicer,
                gathered=gathered,
            )
        if gathered is not None:
            gathered.flush()
    return counts


GATHERED_RUN_LIMIT = 64 * 1024  # longer runs go as PAGES of their own: no gain in gathering


class GatheredRuns:
    """Short runs of pages, read by one vectored process_vm_readv and stored as one
    SCATTERED_PAGES section (docs/crf.md): the pages a process wrote since the last pre-copy
    round lie a page or two apart all over its memory, and a read and a PAGES section each
    cost more than their bytes (~200 runs: 3 ms of the freeze's 4-8 ms of pages). The runs
    are added in ascending order; `flush` before any other pages are written."""

    def __init__(self, pid: int, writer: ImageWriter, buffer: bytearray) -> None:
        self.pid = pid
        self.writer = writer
        self.buffer = buffer
        self.runs: list[tuple[int, int]] = []
        self.size = 0

    def add(self, start: int, end: int) -> None:
        if len(self.runs) == rec.MAX_SCATTERED_RUNS or self.size + end - start > min(
            len(self.buffer), rec.MAX_PAGES_DATA
        ):
            self.flush()
        self.runs.append((start, end))
        self.size += end - start

    def flush(self) -> None:
        if not self.runs:
            return
        done = memory.read_gathered(self.pid, self.runs, self.buffer)
        view = memoryview(self.buffer)[: self.size]
        if done != self.size:  # frozen, these pages readable: not short unless it is gone
            raise HijackError(
                f"process_vm_readv of process {self.pid}: {done} of {self.size} bytes"
                f" of {len(self.runs)} runs",
                pid=self.pid,
            )
        self.writer.write_scattered_pages([(a, b - a) for a, b in self.runs], view)
        self.runs, self.size = [], 0


def write_segment_pages(
    pid: int,
    mem: memory.MemoryFile,
    segment: rec.Segment,
    writer: ImageWriter,
    counts: PageCounts,
    buffer: bytearray,
    precopied: Precopied | None = None,
    runs: list[tuple[int, int]] | None = None,
    through_mem: bool = False,
    shared_pages: SharedPages | None = None,
    splicer: PageSplicer | None = None,
    gathered: GatheredRuns | None = None,
) -> None:
    """Store the pages of one segment of `pid`, read through `buffer` (READ_CHUNK bytes):
    its `runs`, by default runs_to_store()'s; all through /proc/PID/mem if `through_mem`.
    With `shared_pages` (a tree's member), its private pages another member stored
    already are referred to (hijack.mutator.shared_pages). With `splicer`, those of a
    readable segment are spliced instead, never read (hijack.mutator.spliced_pages).
    With `gathered`, the short runs of a readable PRECOPIED segment join it; it is flushed
    before this segment's other pages."""
    # A file-backed segment is restored from its file, where a page left out
    # is the file's, not zero: its zero pages are stored too.
    keep_zero = keeps_zero_pages(segment)
    if segment.contents is rec.ContentsKind.PRECOPIED and precopied is not None:
        # Over what the rounds sent: a page now zero must be sent as such. (Not
        # runs_to_store's pagemap read as well: 3-5 ms a GiB of a freeze, unused.)
        keep_zero, runs = True, precopied.runs(segment)
    elif runs is None:
        runs = runs_to_store(pid, segment, counts)
        if precopied is not None:
            runs = precopied.stored_runs(segment, runs)  # a post-copy's lazy ones left out
    if splicer is not None and not segment.prot & rec.Prot.READ:
        splicer = None  # vmsplice honours protections: read through /proc/PID/mem
    gathering = (
        gathered is not None
        and segment.contents is rec.ContentsKind.PRECOPIED
        and bool(segment.prot & rec.Prot.READ)  # process_vm_readv honours protections
        and not through_mem
    )
    for start, end in runs:
        if gathered is not None:
            if gathering and end - start < GATHERED_RUN_LIMIT:
                gathered.add(start, end)
                continue
            gathered.flush()  # pages ascend: those gathered before go first
        if splicer is not None:  # a whole run: the process fills the next pipes meanwhile
            start += splice_pages(splicer, writer, start, end - start)
        for chunk_start in range(start, end, READ_CHUNK):
            length = min(READ_CHUNK, end - chunk_start)
            view = memoryview(buffer)[:length]
            frames = None
            if (
                shared_pages is not None
                and not segment.shared
                and segment.contents is not rec.ContentsKind.PRECOPIED  # over the rounds'
            ):
                frames = procfs.read_pagemap(pid, chunk_start, chunk_start + length)
            if through_mem or frames is not None:
                # process_vm_readv pins what it reads, and the kernel unshares an anonymous
                # page shared copy-on-write that is pinned: each member would get a copy
                # of every page (a tree running on after its dump would double its memory,
                # and pagemap tell the copies' frames). /proc/PID/mem does not pin.
                mem.read_into(chunk_start, view)
            else:
                _read_memory(pid, mem, segment, chunk_start, view)
            if shared_pages is not None and frames is not None:
                file = None
                if _is_file_backed(segment):
                    offset = segment.offset + chunk_start - segment.start
                    file = (segment.dev_major, segment.dev_minor, segment.inode, offset)
                shared_pages.write(
                    writer, pid, chunk_start, view, frames, keep_zero_pages=keep_zero, file=file
                )
            else:
                writer.write_pages(chunk_start, view, keep_zero_pages=keep_zero)


def splice_pages(splicer: PageSplicer, writer: ImageWriter, address: int, length: int) -> int:
    """Splice the pages at [address, address + length) into the image as far as the
    process can give them, a section (at most a group of pipes) at a time; return how
    many bytes it gave (the rest: to be read)."""
    done = 0
    while done < length:
        taken = splicer.fill(address + done, length - done)
        if not taken:
            break
        writer.write_spliced_pages(address + done, taken, splicer.put)
        done += taken
    return done


def keeps_zero_pages(segment: rec.Segment) -> bool:
    """Whether a segment's zero pages are stored too (its restore maps a file beneath)."""
    return _is_file_backed(segment) and segment.contents is rec.ContentsKind.STORED


def _is_file_backed(segment: rec.Segment) -> bool:
    return segment.path.startswith("/") and segment.inode != 0 and not segment.shared


def runs_to_store(pid: int, segment: rec.Segment, counts: PageCounts) -> list[tuple[int, int]]:
    pages = segment.size // PAGE_SIZE
    if segment.contents in (rec.ContentsKind.NONE, rec.ContentsKind.PRECOPIED):
        return []
    if segment.contents is rec.ContentsKind.FILE:
        # Only the pages the process changed: the rest come from the file.
        runs = procfs.written_runs(pid, segment.start, segment.end)
        counts.from_files += pages - _pages_in(runs)
        return runs
    if _is_file_backed(segment):
        # Stored whole, so the image does not depend on the file: every page
        # that exists in the file (touching those past its end would fault).
        return [(segment.start, min(segment.end, file_end(pid, segment)))]
    runs = procfs.present_runs(pid, segment.start, segment.end)
    counts.untouched += pages - _pages_in(runs)
    return runs


def _pages_in(runs: list[tuple[int, int]]) -> int:
    return sum(end - start for start, end in runs) // PAGE_SIZE


def file_end(pid: int, segment: rec.Segment) -> int:
    try:
        size = os.stat(f"/proc/{pid}/map_files/{segment.start:x}-{segment.end:x}").st_size
    except OSError:
        return segment.end
    in_file = max(0, size - segment.offset)
    return segment.start + (in_file + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


def _read_memory(
    pid: int, mem: memory.MemoryFile, segment: rec.Segment, address: int, view: memoryview
) -> None:
    if segment.prot & rec.Prot.READ:
        memory.read_into(pid, address, view)
    else:
        mem.read_into(address, view)
