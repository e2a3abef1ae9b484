"""Pre-copy for a live move: memory streams in rounds while the process runs.

1. `Precopy.start`: the process is stopped for a moment while a userfaultfd is
   made inside it (injected calls) and registered in write-protect async mode
   over each private mapping; the mover takes it out (pidfd_getfd) and closes
   the process's own copy, so no image ever shows it. A first scan arms the
   tracking (hijack.sys.dirty).
2. Round 0 sends every page a plain image would hold (docs/crf.md §7a); each
   later round the pages written since the scan before, zero pages included.
   The rounds stop when what is left is small, stops shrinking, or after
   MAX_ROUNDS.
3. The final image (dump.write_image with this object as `precopied`), taken
   with the process frozen, marks PRECOPIED the segments the destination holds
   already — tracked all along (still registered: a mapping made, replaced or
   moved since is not), inside a round-0 segment with the same backing, and
   anonymous or not writable, or a single process's — and stores only their
   pages written since the last round, pages owed (a read that failed while
   the process changed its layout) and, as zero pages, pages the process
   dropped since they were sent.
4. `close()` ends the tracking, success or not: the registrations go with the
   userfaultfd, so an original that resumes runs as if never watched.

A page of a writable private file mapping that the process drops reverts to
the file's, which no scan reports: the final image sends again every page of
it that is the file's now (not copied on write), beside those written. A
tree's member sends such a mapping whole (its members' copy-on-write sharing
of it is the tree's to keep).
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

from hijack.errors import HijackError
from hijack.image import records as rec
from hijack.image.codec import ImageWriter
from hijack.in_thread import InThread
from hijack.mutator.dump import (
    KERNEL_MAPPINGS,
    READ_CHUNK,
    PageCounts,
    describe_segments,
    file_end,
    queue_signal_actions,
    runs_to_store,
    scratch_page,
)
from hijack.mutator.parasite import Batch, parasite_area
from hijack.mutator.tracee import Tracee
from hijack.objects.memfd import holds_object
from hijack.sys import dirty, memory, pidfd, procfs
from hijack.testpoint import reached

Run = tuple[int, int]
Frames = dict[int, tuple[int, int]]  # a page frame number -> (pid, address) that sent it
T = TypeVar("T")

# Auto mode: below this much private resident memory (a small C program) the
# whole image is about what pre-copy would leave for the freeze anyway, and
# setting up the tracking stops the process once more.
PRECOPY_MIN_BYTES = 1024 * 1024
MAX_ROUNDS = 8  # round 0, then at most 7 rounds of written pages
LAST_ROUND_BYTES = 1024 * 1024  # a round this small is the last: the rest goes frozen
SHRINK = 0.5  # a round must send at most this share of the one before, or it is the last
TRACKING_FLAGS = ("uw", "um")  # smaps VmFlags of a userfaultfd registration
LAYOUT_READS = 5  # reads of smaps before a freeze, while the layout changes under them
RESEIZES = 2  # stops let go at once before a freeze, the layout changed (hijack.node.move)
_AFTER_ALL = 1 << 64  # sorts after every end: bisect by start alone


def worth_precopying(*pids: int) -> bool:
    """Whether the processes (a tree's members) hold enough private memory together for
    pre-copy to shorten their freeze."""
    private = sum(entry.anonymous for pid in pids for entry in procfs.read_smaps(pid).values())
    return private >= PRECOPY_MIN_BYTES


@dataclass(frozen=True)
class RoundSent:
    number: int
    pages: int
    image_bytes: int


class Precopy:
    """The mover's side of the rounds; also the `precopied` plan of the final image."""

    def __init__(self, pid: int, tracking: dirty.WrittenPages, pause_ms: float = 0.0) -> None:
        self.pid = pid
        self.tracking = tracking
        self.pause_ms = pause_ms  # how long the process was stopped to start the tracking
        self.rounds = 0
        self.bytes_sent = 0  # by the rounds, framing included (the mover counts)
        self.base: list[rec.Segment] = []  # round 0's layout, as the destination built it
        # Round 0's writable private file mappings' pages as the destination holds them
        # (what the rounds sent), by the segment's start: at the freeze, their pages that
        # are the file's read the same as sent need not go again (runs()).
        self.held_files: dict[int, HeldPages] = {}
        self.held_bytes = 0
        # `base` and its segments' starts (sorted, the segments disjoint: /proc's maps).
        self._base_starts: tuple[list[rec.Segment], list[int]] = (self.base, [])
        self.sent: list[Run] = []  # every page sent to the destination, merged
        self.owed: list[Run] = []  # written pages not sent yet
        self.final_written: list[Run] = []
        # Every page a scan after round 0's start saw written, the rounds' (a tree's member:
        # what its referrers' copies there may differ from, Changes); the freeze's is
        # final_written.
        self.rewritten: list[Run] = []
        self._untracked: list[Run] = []  # at the freeze: mappings the destination cannot keep
        self._flags: dict[procfs.MapEntry, tuple[str, ...]] = {}
        self._flags_now: InThread[dict[int, tuple[str, ...]]] | None = None  # read at the freeze
        self._layout_changed = False
        self._guards: InThread[list[Run]] | None = None  # scanned at the freeze, aside
        self._maps_stopped: list[procfs.MapEntry] | None = None  # layout_held's, for freeze
        self.layout_stops = 0  # stops let go at once, the layout changed (hijack.node.move)
        self.maps_at_freeze: list[procfs.MapEntry] = []  # the layout freeze() saw
        self.signal_actions: list[rec.SigAction] = []  # as the tracking started
        # Post-copy (hijack.mutator.postcopy): the final image leaves out the
        # `lazy` pages, which the destination fetches on first touch; `pinned`
        # pages (those the restore itself touches) are never lazy.
        self.postcopy = False
        # The automatic choice (neither --precopy nor --postcopy): the rounds ended
        # converged, but a move's catch-up rounds just before the freeze may still leave
        # the rest to post-copy (hijack.node.move); `last_round` is what they compare with.
        self.auto_postcopy = False
        self.last_round: RoundSent | None = None
        # The destination proves links to the home shadow ahead of the freeze, for the
        # relays it makes then (the `links` message, hijack.node.move).
        self.links_ahead = False
        self.pinned: list[Run] = []
        self.lazy: list[Run] = []
        # A tree's member: the lazy candidates decided at the freeze, before any image is
        # written (plan_lazy), which the destination clips to the image's segments as
        # `segments` does here (lazy_in): the same runs on both sides.
        self.planned: list[Run] | None = None
        # Touched by the rounds: the final image reads through it too (allocating
        # READ_CHUNK bytes at the freeze costs 2-3 ms: the kernel zeroes each page).
        self.buffer = bytearray(READ_CHUNK)
        # A tree's member (hijack.node.tree_move): its pages read through /proc/PID/mem,
        # which does not pin them (process_vm_readv does, and the kernel unshares a page
        # shared copy-on-write since a fork that is pinned: each member would get a copy).
        # Round 0 sends a page whose frame a member before it sent as a reference to that
        # member's page (`references`: start, end, member, its start); checked at the freeze.
        self.through_mem = False
        self.references: list[tuple[int, int, int, int]] = []

    @classmethod
    def start(cls, pid: int) -> Precopy:
        """Stop the process for a moment to start tracking what it writes."""
        stopped_at = time.perf_counter()
        with Tracee.seize(pid) as tracee:
            with parasite_area(tracee) as area:
                # Stopped anyway: the freeze will only ask again for what may differ.
                batch = Batch(area)  # 64 calls, one stop
                read_actions = queue_signal_actions(tracee, batch)
                batch.run(tracee)
                actions = read_actions()
            tracking = armed_tracking(pid, _userfaultfd_inside(tracee))
        precopy = cls(pid, tracking, (time.perf_counter() - stopped_at) * 1000)
        precopy.signal_actions = actions
        return precopy

    def close(self) -> None:
        self.tracking.close()

    # -- rounds -------------------------------------------------------------------

    def send_round(self, out: BinaryIO, frames: Frames | None = None) -> RoundSent:
        """Write the next round to `out` while the process runs. `frames` (a tree's): the
        frames members before this one sent in round 0, where (pid, address); round 0 refers
        to them rather than sends them again (`references`), and adds its own."""
        number = self.rounds
        written = [] if number == 0 else self.tracking.collect()
        if self.through_mem and written:
            self.rewritten = union_runs(self.rewritten, written)
        writer = ImageWriter(out)
        writer.write(rec.Round(pid=self.pid, number=number))
        # Only round 0's layout is built: later rounds' segments just bound
        # their pages, and go without VmFlags (smaps is slow to read). What a
        # memory object holds (a memfd, shared anonymous memory) comes whole
        # with its object in the final image, and is mapped from it there.
        maps = [m for m in procfs.read_maps(self.pid) if not holds_object(m)]
        flags: dict[int, tuple[str, ...]] | None = None if number == 0 else {}
        segments = _without_tracking_flags(
            describe_segments(self.pid, maps, rec.DumpOptions(0), flags=flags)
        )
        writer.write(rec.Segments(segments=tuple(segments)))
        owed = union_runs(self.owed, written)
        asked: list[Run] = []
        sent_now: list[Run] = []
        with memory.MemoryFile(self.pid) as mem:
            for segment in segments:
                if number == 0:
                    runs = runs_to_store(self.pid, segment, PageCounts())
                    keep_zero = _is_file_backed(segment)
                    if frames is not None and not segment.shared:
                        runs, referred = self._refer_to_sent(runs, frames)
                        asked += referred
                        sent_now += referred
                elif segment.contents is rec.ContentsKind.STORED and self._within_base(segment):
                    runs, keep_zero = clip_runs(owed, segment.start, segment.end), True
                else:
                    continue
                asked += runs
                sent_now += self._send(mem, segment, runs, writer, keep_zero)
        if number == 0:
            self.base = [s for s in segments if s.path not in KERNEL_MAPPINGS]
            owed = union_runs(asked, [])
        # What could not be sent (a read failed: the layout changed; or outside
        # what the destination holds) stays owed: if its mapping is carried
        # after all, the final image sends it.
        self.owed = subtract_runs(owed, union_runs(sent_now, []))
        self.sent = union_runs(self.sent, sent_now)
        end = writer.close()
        self.rounds += 1
        return RoundSent(number, end.pages_stored, writer.bytes_written)

    def _send(
        self,
        mem: memory.MemoryFile,
        segment: rec.Segment,
        runs: list[Run],
        writer: ImageWriter,
        keep_zero: bool,
    ) -> list[Run]:
        """Send `runs` of `segment`; return those sent (a read fails if the layout changed)."""
        sent: list[Run] = []
        pieces = [
            (chunk, min(chunk + READ_CHUNK, end))
            for start, end in runs
            for chunk in range(start, end, READ_CHUNK)
        ]
        readable = bool(segment.prot & rec.Prot.READ)
        index = 0
        while index < len(pieces):
            # Scattered pages (a round's usual lot) are read many in one call.
            batch = [pieces[index]]
            size = batch[0][1] - batch[0][0]
            while (
                readable
                and index + len(batch) < len(pieces)
                and len(batch) < memory.IOV_MAX
                and size + pieces[index + len(batch)][1] - pieces[index + len(batch)][0]
                <= READ_CHUNK
            ):
                batch.append(pieces[index + len(batch)])
                size += batch[-1][1] - batch[-1][0]
            index += len(batch)
            if readable and not self.through_mem:
                done = memory.read_gathered(self.pid, batch, self.buffer)
            elif readable:
                done = 0
                for start, end in batch:
                    try:
                        mem.read_into(start, memoryview(self.buffer)[done : done + end - start])
                    except HijackError:
                        break
                    done += end - start
            else:
                try:
                    mem.read_into(batch[0][0], memoryview(self.buffer)[:size])
                    done = size
                except HijackError:
                    done = 0
            offset = 0
            for start, end in batch:
                if offset + end - start > done:
                    break  # not mapped any more, from here on: owed
                view = memoryview(self.buffer)[offset : offset + end - start]
                writer.write_pages(start, view, keep_zero_pages=keep_zero)
                if keep_zero:  # every page stored, as read: the destination's now
                    self._hold(segment, start, view)
                sent.append((start, end))
                offset += end - start
        return sent

    def _refer_to_sent(self, runs: list[Run], frames: Frames) -> tuple[list[Run], list[Run]]:
        """`runs` split into those to send and those whose frames a member before this one
        sent (their references kept); the frames of those to send remembered."""
        own: list[Run] = []
        referred: list[Run] = []
        for start, end in runs:
            entries = procfs.read_pagemap(self.pid, start, end)
            for index, entry in enumerate(entries):
                address = start + index * rec.PAGE_SIZE
                frame = entry & procfs.PM_PFN_MASK if entry & procfs.PM_PRESENT else 0
                found = frames.setdefault(frame, (self.pid, address)) if frame else None
                if found is None or found[0] == self.pid:
                    _extend(own, address)
                    continue
                _extend(referred, address)
                last = self.references[-1] if self.references else None
                if (
                    last is not None
                    and last[1] == address
                    and last[2] == found[0]
                    and last[3] + (address - last[0]) == found[1]
                ):
                    self.references[-1] = (last[0], address + rec.PAGE_SIZE, last[2], last[3])
                else:
                    self.references.append((address, address + rec.PAGE_SIZE, *found))
        return own, referred

    def stale_references(self, changes: Changes) -> None:
        """At the freeze (the tree frozen): a page referred to in round 0 that may not hold
        what its member sent any more, or that its member could not send, is stored in the
        final image (`changes`: the tree's, Changes).

        The destination copied the page from its member's as round 0 sent it, and a
        frame shared copy-on-write never changes while shared: a write (by either) breaks
        the sharing. So its bytes here may differ from that copy only if this member
        wrote it (the scans see that: in a later round, or in the final image already),
        dropped it (MADV_DONTNEED: absent now, zero), or its mapping was replaced (not
        tracked any more). Whatever its member did to its own copy since (wrote, dropped,
        replaced) counts too, as ever: the destination may inherit the member's page
        rather than copy it (hijack.restore.tree_rounds). No page table is compared:
        reading and comparing every member's pagemap over the referred ranges (9 x 256
        MiB of a server's workers) took 70-90 ms of the freeze."""
        stale: list[Run] = []
        own = changes.own(self.pid)
        for start, end, member, source in self.references:
            size = end - start
            theirs = changes.of(member)
            if theirs is None or clip_runs(changes.sent(member), source, source + size) != [
                (source, source + size)
            ]:
                stale.append((start, end))
                continue
            shift = start - source
            changed = clip_runs(theirs, source, source + size)
            stale += [(low + shift, high + shift) for low, high in changed]
            stale += clip_runs(own, start, end)
        self.final_written = union_runs(self.final_written, stale)

    def written_to_drop(self) -> list[Run]:
        """For post-copy, while the process runs: the pages written since the last round in
        memory that may be lazy, coalesced as the final image's lazy runs will be. The
        destination drops them now rather than while the process is frozen; owed from here
        on, they are lazy or sent at the freeze."""
        written = self.tracking.collect()
        if self.through_mem:
            self.rewritten = union_runs(self.rewritten, written)
        dropped: list[Run] = []
        for base in self.base:
            if lazy_capable(base):
                dropped += coalesce_runs(clip_runs(written, base.start, base.end))
        # What was written elsewhere stays owed too: the scan protected it again.
        # (Only that: the written pages inside `dropped` are a great many runs,
        # and the freeze merges what is owed with what it scans.)
        elsewhere = subtract_runs(written, dropped)
        self.owed = union_runs(self.owed, union_runs(dropped, elsewhere))
        return dropped

    def should_continue(self, last: RoundSent, before: RoundSent | None) -> bool:
        """Whether another round is worth it after `last` (and the round `before` it)."""
        if self.rounds >= MAX_ROUNDS:
            return False
        if last.number == 0:
            return True
        if last.pages * rec.PAGE_SIZE <= LAST_ROUND_BYTES:
            return False
        return before is None or before.number == 0 or last.pages <= before.pages * SHRINK

    # -- the final image (the process is frozen) -------------------------------------

    def prepare_freeze(self, catch_up: Callable[[], object] | None = None) -> None:
        """Read the VmFlags of every mapping while the process still runs (smaps is slow),
        as late as can be: the freeze reads smaps again (its page walk, ~15-25 ms a GiB,
        within the freeze) only if the layout changed since.

        Each mapping's flags are read with its range (read_smaps_layout): a mapping
        changed while smaps was read keeps its old range there. `catch_up` (a move's
        last round: what the process wrote until now, smaps' time included) runs after
        each read; then the layout is read: if a mapping changed since its flags were
        read, all that again (a few times), so that the layout checked is the one just
        before the stop (hijack.node.move). (The round before smaps rather than after
        made the stop find the layout unchanged more often, but left what the process
        wrote while smaps was read to the freeze: a frozen image ~1.5x, and the freeze
        longer in the moves that needed no smaps read again, most of them when idle.)"""
        # A layout read at a stop since let go (layout_held) is the process's no more.
        self._maps_stopped = None
        for _ in range(LAYOUT_READS):
            self._flags = procfs.read_smaps_layout(self.pid)
            if catch_up is not None:
                catch_up()
            if all(entry in self._flags for entry in procfs.read_maps(self.pid)):
                reached("move-layout-read")
                return

    def layout_held(self) -> bool:
        """Whether the layout of the process (stopped: it stays so until the freeze) is
        the one prepare_freeze read the flags of."""
        self._maps_stopped = procfs.read_maps(self.pid)
        return all(entry in self._flags for entry in self._maps_stopped)

    def freeze(self, *, read_flags: bool = True) -> None:
        """The last scan: what was written since the last round. Call with the process stopped.
        Without `read_flags`, the caller calls read_flags itself (having mapped what it
        must first: an mmap waits for that read's hold on the memory map)."""
        self.final_written = union_runs(self.tracking.collect(), self.owed)
        self._untracked = self.tracking.untracked()
        self.maps_at_freeze = self._maps_stopped or procfs.read_maps(self.pid)
        self._maps_stopped = None
        self._layout_changed = not all(entry in self._flags for entry in self.maps_at_freeze)
        if read_flags:
            self.read_flags()

    def read_flags(self) -> None:
        if self._layout_changed and self._flags_now is None:
            # The layout changed since prepare_freeze (a mapping made or replaced):
            # smaps is read again, in a thread, while the freeze goes on with the
            # injected calls and the descriptors (its kernel walk of every page
            # table, ~11 ms a GiB, runs on another core meanwhile).
            self._flags_now = InThread(procfs.read_smaps_flags, self.pid, name="hijack-smaps")

    def scan_guards(self) -> None:
        """Start the scan for guard pages in a thread (the process stopped, and mapped
        what it must: the scan holds the memory map as smaps does). PAGEMAP_SCAN for
        PAGE_IS_GUARD sorts every page of the address space into its categories (~0.8 ms
        a GiB idle, 1.5-8 ms under load: not the written scan's fast path), one ioctl
        with the GIL let go: it overlaps the injected calls and the descriptors, which
        wait on the process and on ptrace rather than on a CPU. Nothing the process maps
        changes meanwhile: it is stopped (the area mapped for the calls is none of its
        own). (The scan for pages dropped since they were sent stays in runs(): beside
        the calls, its Python loop over hundreds of runs held the GIL from the mover's
        own thread.)"""
        if self._guards is None:
            self._guards = InThread(dirty.guard_regions, self.pid, name="hijack-guards")

    @property
    def untracked_at_freeze(self) -> list[Run]:
        """The mapped ranges not tracked at the freeze (mappings made, replaced or moved
        since the tracking started)."""
        return self._untracked

    def guard_regions(self) -> list[Run]:
        """The process's guard pages (MADV_GUARD_INSTALL) at the freeze."""
        if self._guards is None:
            return dirty.guard_regions(self.pid)
        return self._guards.result()

    def flags_known(self, maps: list[procfs.MapEntry]) -> bool:
        """Whether vm_flags(maps) answers from the flags read before the freeze."""
        return all(entry in self._flags for entry in maps)

    def vm_flags(self, maps: list[procfs.MapEntry]) -> dict[int, tuple[str, ...]]:
        if not all(entry in self._flags for entry in maps):
            # The layout changed since: read now (the process is stopped).
            flags_now = self._flags_now or InThread(
                procfs.read_smaps_flags, self.pid, name="hijack-smaps"
            )
            return flags_now.result()
        return {entry.start: self._flags[entry] for entry in maps}

    def segments(self, segments: list[rec.Segment]) -> list[rec.Segment]:
        """The final image's segments: PRECOPIED where the destination holds the pages."""
        marked = []
        self.lazy = []
        for segment in (piece for whole in segments for piece in self._split_at_base(whole)):
            carried = (
                not clip_runs(self._untracked, segment.start, segment.end)
                and segment.contents is rec.ContentsKind.STORED
                and not segment.shared
                and (
                    segment.inode == 0
                    or not segment.prot & rec.Prot.WRITE
                    or not self.through_mem  # a single process: see runs()
                )
                and self._within_base(segment)
            )
            contents = rec.ContentsKind.PRECOPIED if carried else segment.contents
            flags = tuple(flag for flag in segment.vm_flags if flag not in TRACKING_FLAGS)
            marked.append(dataclasses.replace(segment, contents=contents, vm_flags=flags))
            if self.postcopy and carried and lazy_capable(marked[-1]):
                if self.planned is not None:
                    self.lazy += clip_runs(self.planned, segment.start, segment.end)
                    continue
                written = clip_runs(self.final_written, segment.start, segment.end)
                self.lazy += subtract_runs(coalesce_runs(written), self.pinned)
            elif self.postcopy and self.planned is None and fresh_lazy_capable(marked[-1]):
                # Memory the rounds did not build (mapped or grown since round 0: a
                # server's new arenas and thread stacks) is mapped anew there, all
                # missing: what it holds here (its present pages: the tracking never
                # saw it written) is lazy too, not sent in the freeze.
                present = procfs.present_runs(self.pid, segment.start, segment.end)
                self.lazy += subtract_runs(coalesce_runs(present), self.pinned)
        return marked

    def plan_lazy(self) -> list[Run]:
        """A tree's member, frozen (after freeze() and with `pinned` read): the pages
        that may be lazy, told to the destination before any image (docs/protocol.md,
        "Post-copy of a tree"); the final image leaves out those inside its PRECOPIED
        lazy-capable segments (lazy_in), on both sides alike."""
        planned: list[Run] = []
        for base in self.base:
            if lazy_capable(base):
                written = clip_runs(self.final_written, base.start, base.end)
                planned += subtract_runs(coalesce_runs(written), self.pinned)
        self.planned = planned
        return planned

    def runs(self, segment: rec.Segment) -> list[Run]:
        """The pages of a PRECOPIED segment the final image stores (zero pages included)."""
        runs = clip_runs(self.final_written, segment.start, segment.end)
        if segment.inode == 0:
            # Sent before, gone since (MADV_DONTNEED and the like): zero now.
            sent = clip_runs(self.sent, segment.start, segment.end)
            if sent:
                absent = self.tracking.absent(segment.start, segment.end)
                runs = union_runs(runs, [r for run in absent for r in clip_runs(sent, *run)])
        elif segment.prot & rec.Prot.WRITE:
            # A writable private file mapping: a page of it the process dropped since
            # it was sent reverts to the file's, which no scan reports, and a page that is
            # the file's shows the file's changes. Its pages copied on write and in memory
            # are the scans'; every other (the file's: never written, or dropped since) goes
            # again, zero ones too, where it does not read as sent (_unlike_held). (A page
            # dropped under the tracking's write protection leaves a marker pagemap reports
            # as swapped: not a copy. A JVM's class-data archive: 12 MiB sent whole in every
            # freeze once, then its 3 MiB that are the file's.)
            copied = procfs.copied_runs(self.pid, segment.start, segment.end)
            end = min(segment.end, file_end(self.pid, segment))
            files = subtract_runs([(segment.start, end)], copied)
            runs = union_runs(runs, self._unlike_held(files))
        if self.lazy:
            # Fetched from the frozen original when first touched (or pushed later).
            runs = subtract_runs(runs, clip_runs(self.lazy, segment.start, segment.end))
        return runs

    def stored_runs(self, segment: rec.Segment, runs: list[Run]) -> list[Run]:
        """The runs of a segment stored whole (not PRECOPIED) that the final image writes:
        `runs` less its lazy pages (fresh_lazy_capable)."""
        if self.lazy and segment.contents is rec.ContentsKind.STORED:
            return subtract_runs(runs, clip_runs(self.lazy, segment.start, segment.end))
        return runs

    def _hold(self, segment: rec.Segment, start: int, view: memoryview) -> None:
        """Keep the copy of pages just sent of a writable private file mapping (runs())."""
        if segment.inode == 0 or segment.shared or not segment.prot & rec.Prot.WRITE:
            return
        if self.through_mem:  # a tree's member: such a mapping is never carried (segments())
            return
        if self.rounds == 0:  # round 0's own segment: base is this round's
            held = self.held_files.get(segment.start)
            if held is None:
                if self.held_bytes + segment.size > HELD_FILES_LIMIT:
                    return  # too much kept: its pages go at the freeze, as sent before
                held = self.held_files[segment.start] = HeldPages(segment.start, segment.size)
                self.held_bytes += segment.size
        else:
            held = self._held_at(start)
            if held is None:
                return
        held.keep(start, view)

    def _held_at(self, address: int) -> HeldPages | None:
        over = self._bases_over(address, address + 1)
        return self.held_files.get(over[0].start) if over else None

    def _unlike_held(self, files: list[Run]) -> list[Run]:
        """The pages of `files` (a PRECOPIED writable private file mapping's pages that are
        the file's now: never written, or dropped since) that the destination may not hold
        as they are: those no round sent, or that read otherwise than sent. (A JVM's
        class-data archive: 3 MiB, nearly all of it the same, went in every freeze: 5-10 ms
        at the destination.) Read through `buffer`, before the segment's pages are."""
        if not files:
            return files
        held = self._held_at(files[0][0])
        if held is None:
            return files
        unlike: list[Run] = []
        for start, end in files:
            for chunk in range(start, end, len(self.buffer)):
                size = min(end - chunk, len(self.buffer))
                try:
                    memory.read_into(self.pid, chunk, memoryview(self.buffer)[:size])
                except HijackError:
                    unlike.append((chunk, chunk + size))  # as before: sent, read then
                    continue
                if held.same(chunk, self.buffer, 0, size):
                    continue
                for page in range(0, size, rec.PAGE_SIZE):
                    if not held.same(chunk + page, self.buffer, page, rec.PAGE_SIZE):
                        _extend(unlike, chunk + page)
        return union_runs(unlike, [])

    def _split_at_base(self, segment: rec.Segment) -> list[rec.Segment]:
        """`segment` cut where round 0's segments begin and end inside it. Adjacent
        mappings of one kind merge into one VMA (a process maps a small area beside a big
        one, or gives two back their old protection): round 0 saw two segments, the freeze
        sees one, and a segment carried only if it lies within one segment of round 0 sent
        the whole GiB again, frozen (1 move in 5 of the dirtier froze 2 s). Each piece is
        carried or not on its own; the destination maps them side by side again."""
        cuts = sorted(
            {
                edge
                for base in self._bases_over(segment.start, segment.end)
                for edge in (base.start, base.end)
                if segment.start < edge < segment.end
            }
        )
        if not cuts:
            return [segment]
        edges = [segment.start, *cuts, segment.end]
        file_backed = segment.inode != 0  # its offset follows the piece's start
        return [
            dataclasses.replace(
                segment,
                start=start,
                end=end,
                offset=segment.offset + (start - segment.start) * file_backed,
            )
            for start, end in itertools.pairwise(edges)
        ]

    def _within_base(self, segment: rec.Segment) -> bool:
        for base in self._bases_over(segment.start, segment.start + 1):
            if base.start <= segment.start and segment.end <= base.end:
                return (
                    base.contents is rec.ContentsKind.STORED
                    and (base.inode, base.dev_major, base.dev_minor, base.shared)
                    == (segment.inode, segment.dev_major, segment.dev_minor, segment.shared)
                    and (
                        segment.inode == 0
                        or segment.offset - base.offset == segment.start - base.start
                    )
                )
        return False

    def _bases_over(self, start: int, end: int) -> list[rec.Segment]:
        """Round 0's segments that overlap [start, end), found by bisection: a freeze asks
        for each of its segments (a JVM's ~230 against ~230 took 6-12 ms of the freeze when
        every base was looked at each time)."""
        if self._base_starts[0] is not self.base:
            self._base_starts = (self.base, [base.start for base in self.base])
        base, starts = self._base_starts
        first = max(bisect.bisect_right(starts, start) - 1, 0)
        over = []
        for index in range(first, len(base)):
            if base[index].start >= end:
                break
            if base[index].end > start:
                over.append(base[index])
        return over


# Bytes of writable private file mappings a move keeps a copy of (Precopy.held_files); past
# it, their pages that are the file's go again at the freeze.
HELD_FILES_LIMIT = 64 * 1024 * 1024


class HeldPages:
    """A round 0 segment's pages as sent to the destination: their bytes at their offsets
    in the segment, and which pages were sent."""

    def __init__(self, start: int, size: int) -> None:
        self.start = start
        self.data = bytearray(size)
        self.sent = bytearray(size // rec.PAGE_SIZE)  # 1: the page's bytes are in data

    def keep(self, address: int, view: memoryview) -> None:
        """The pages at `address` were sent as `view` holds them (what lies outside the
        segment is not kept: the rounds send only inside round 0's segments)."""
        low = max(address, self.start)
        high = min(address + len(view), self.start + len(self.data))
        if low >= high:
            return
        offset = low - self.start
        self.data[offset : offset + high - low] = view[low - address : high - address]
        first = offset // rec.PAGE_SIZE
        self.sent[first : first + (high - low) // rec.PAGE_SIZE] = b"\x01" * (
            (high - low) // rec.PAGE_SIZE
        )

    def same(self, address: int, buffer: bytearray, at: int, size: int) -> bool:
        """Whether the `size` bytes of `buffer` at `at` are what was sent at `address`."""
        offset = address - self.start
        if offset < 0 or offset + size > len(self.data):
            return False
        first = offset // rec.PAGE_SIZE
        if self.sent.find(0, first, first + size // rec.PAGE_SIZE) != -1:
            return False
        return memory.same(self.data, offset, buffer, at, size)


LAZY_GAP = 64 * 1024  # written runs this close are one lazy run (each costs a call there)
MAX_LAZY_RUNS = 512  # per segment: past this, runs further apart are joined too


class Changes:
    """At a tree's freeze, before any member's stale references are added to its final
    image (Precopy.stale_references): what each member did to its memory since round 0
    that the rounds' copies at the destination do not show. Of each member: what it
    wrote since its tracking started (every later round's scan, and the freeze's, owed
    pages included), its mappings made, replaced or moved since (untracked), and its
    pages absent now (dropped) over what it refers to or is referred to in."""

    def __init__(self, precopied: dict[int, Precopy]) -> None:
        self._precopied = precopied
        # Each member's runs that references name, as referrer or as referred to.
        named: dict[int, list[Run]] = {}
        for precopy in precopied.values():
            for start, end, member, source in precopy.references:
                named.setdefault(precopy.pid, []).append((start, end))
                named.setdefault(member, []).append((source, source + end - start))
        self._own: dict[int, list[Run]] = {}
        self._changed: dict[int, list[Run]] = {}
        for pid, runs in named.items():
            tracked = precopied.get(pid)
            if tracked is None:
                continue  # ended since: everything referred to in it is stale
            dropped: list[Run] = []
            for start, end in union_runs(runs, []):
                dropped += tracked.tracking.absent(start, end)
            own = union_runs(tracked.untracked_at_freeze, dropped)
            self._own[pid] = own
            self._changed[pid] = union_runs(
                union_runs(tracked.rewritten, tracked.final_written), own
            )

    def sent(self, pid: int) -> list[Run]:
        """What member `pid` sent in its rounds; nothing for one that ended since."""
        found = self._precopied.get(pid)
        return found.sent if found is not None else []

    def of(self, pid: int) -> list[Run] | None:
        """Member `pid`'s pages that may not hold what round 0 sent of them; None for a
        member that ended since (its rounds stopped)."""
        if pid not in self._precopied:
            return None
        return self._changed.get(pid, [])

    def own(self, pid: int) -> list[Run]:
        """Member `pid`'s pages dropped or no longer tracked (what it wrote is in its final
        image, or a later round sent it)."""
        return self._own.get(pid, [])


def lazy_capable(segment: rec.Segment) -> bool:
    """Whether a PRECOPIED segment may have pages left out for post-copy: private anonymous
    memory (all userfaultfd's missing mode serves), readable and writable, not locked (mlock
    would touch every page while the process is built)."""
    return (
        segment.inode == 0
        and not segment.shared
        and segment.prot & (rec.Prot.READ | rec.Prot.WRITE) == rec.Prot.READ | rec.Prot.WRITE
        and not segment.path.startswith("[v")  # [vdso], [vvar], [vsyscall]
        and "lo" not in segment.vm_flags
    )


def fresh_lazy_capable(segment: rec.Segment) -> bool:
    """Whether a segment the final image stores whole (not PRECOPIED) may have pages left
    out for post-copy: private anonymous memory as lazy_capable's, which the destination
    maps anew (AddressSpace.adopt_final: nothing of round 0 is kept there), so every page
    the image does not write is missing. Not the main stack (it grows down into what the
    restore maps beside it)."""
    return (
        segment.contents is rec.ContentsKind.STORED
        and lazy_capable(segment)
        and segment.path != "[stack]"
        and "gd" not in segment.vm_flags
    )


def lazy_in(segments: Sequence[rec.Segment], planned: list[Run]) -> list[Run]:
    """The lazy runs of a final image whose member planned `planned` (Precopy.plan_lazy):
    those inside its PRECOPIED segments that may be lazy; what Precopy.segments leaves
    out of the image, as the destination reads it from the image's segments."""
    lazy: list[Run] = []
    for segment in segments:
        if segment.contents is rec.ContentsKind.PRECOPIED and lazy_capable(segment):
            lazy += clip_runs(planned, segment.start, segment.end)
    return lazy


def coalesce_runs(runs: list[Run]) -> list[Run]:
    """`runs` (sorted, disjoint) with the gaps under LAZY_GAP filled, and wider gaps as
    needed to keep at most MAX_LAZY_RUNS."""
    gap = LAZY_GAP
    while True:
        joined: list[Run] = []
        for start, end in runs:
            if joined and start - joined[-1][1] <= gap:
                joined[-1] = (joined[-1][0], end)
            else:
                joined.append((start, end))
        if len(joined) <= MAX_LAZY_RUNS:
            return joined
        gap *= 4


def armed_tracking(pid: int, uffd: int) -> dirty.WrittenPages:
    """Track what process `pid` writes through its userfaultfd `uffd` (ours now: closed on
    failure), armed: from its return on every write is seen."""
    try:
        tracking = dirty.WrittenPages(pid, uffd)
    except BaseException:
        os.close(uffd)
        raise
    try:
        tracking.collect()
    except BaseException:
        tracking.close()
        raise
    return tracking


def _userfaultfd_inside(tracee: Tracee) -> int:
    """Make a userfaultfd in the stopped process, register its private mappings, take it out.

    Returns our copy. The process's own descriptor is closed before it runs again.
    """
    pid = tracee.pid
    with scratch_page(tracee) as scratch:
        uffd = tracee.checked_syscall("userfaultfd", dirty.USERFAULTFD_FLAGS)
        try:
            api = dirty.UFFDIO_API_STRUCT.pack(dirty.UFFD_API, dirty.TRACKING_FEATURES, 0)
            memory.write(pid, scratch, api)
            tracee.checked_syscall("ioctl", uffd, dirty.UFFDIO_API, scratch)
            groups: list[list[Run]] = []  # runs of adjacent private mappings
            for mapping in procfs.read_maps(pid):
                if mapping.shared or mapping.path in (*KERNEL_MAPPINGS, "[vsyscall]"):
                    continue
                if mapping.start <= scratch < mapping.end:
                    continue  # ours, gone in a moment
                if groups and groups[-1][-1][1] == mapping.start:
                    groups[-1].append((mapping.start, mapping.end))
                else:
                    groups.append([(mapping.start, mapping.end)])
            for group in groups:
                # One call for a whole group (each costs a round trip into the
                # stopped process); if one of its mappings cannot be tracked,
                # one by one. One that cannot is simply not carried: it stays
                # untracked and goes whole in the final image.
                whole = (group[0][0], group[-1][1])
                if not _register(tracee, uffd, scratch, whole) and len(group) > 1:
                    for run in group:
                        _register(tracee, uffd, scratch, run)
            ours = pidfd.copy_fd(pid, uffd)
        finally:
            tracee.syscall("close", uffd)
    return ours


def _register(tracee: Tracee, uffd: int, scratch: int, run: Run) -> bool:
    start, end = run
    mode = dirty.UFFDIO_REGISTER_MODE_WP
    register = dirty.UFFDIO_REGISTER_STRUCT.pack(start, end - start, mode, 0)
    memory.write(tracee.pid, scratch, register)
    return tracee.syscall("ioctl", uffd, dirty.UFFDIO_REGISTER, scratch) >= 0


def _without_tracking_flags(segments: list[rec.Segment]) -> list[rec.Segment]:
    """Segments as a plain dump describes them: no trace of the userfaultfd."""
    return [
        dataclasses.replace(
            segment, vm_flags=tuple(f for f in segment.vm_flags if f not in TRACKING_FLAGS)
        )
        for segment in segments
    ]


def _extend(runs: list[Run], address: int) -> None:
    """Add the page at `address` (above every run) to `runs`."""
    if runs and runs[-1][1] == address:
        runs[-1] = (runs[-1][0], address + rec.PAGE_SIZE)
    else:
        runs.append((address, address + rec.PAGE_SIZE))


def _is_file_backed(segment: rec.Segment) -> bool:
    return segment.path.startswith("/") and segment.inode != 0 and not segment.shared


# -- sets of page runs: sorted, disjoint [start, end) pairs ---------------------------


def union_runs(first: list[Run], second: list[Run]) -> list[Run]:
    merged: list[Run] = []
    for start, end in sorted(first + second):
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def clip_runs(runs: list[Run], start: int, end: int) -> list[Run]:
    """The parts of `runs` (sorted, disjoint) inside [start, end)."""
    first = max(bisect.bisect_right(runs, (start, _AFTER_ALL)) - 1, 0)
    clipped: list[Run] = []
    for index in range(first, len(runs)):
        run_start, run_end = runs[index]
        if run_start >= end:
            break
        if run_end > start and start < end:
            clipped.append((max(run_start, start), min(run_end, end)))
    return clipped


def subtract_runs(runs: list[Run], removed: list[Run]) -> list[Run]:
    result: list[Run] = []
    index = 0
    for start, end in runs:
        while index < len(removed) and removed[index][1] <= start:
            index += 1
        cursor = start
        probe = index
        while probe < len(removed) and removed[probe][0] < end:
            gap_end = removed[probe][0]
            if gap_end > cursor:
                result.append((cursor, gap_end))
            cursor = max(cursor, removed[probe][1])
            probe += 1
        if cursor < end:
            result.append((cursor, end))
    return result
