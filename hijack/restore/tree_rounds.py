"""The receiving side of a tree's pre-copy: each member's pages kept until its rebuild.

A single process's rounds build its stub as they come (hijack.restore.precopy); a
tree's stubs are forked once the rounds are over and the tree's relations are known
(hijack.restore.tree.prebuild_tree, before the freeze), so each member's rounds are
kept meanwhile in a memory file of its own (a memfd), each page at its address as
offset: a later round's page overwrites the earlier one. A page round 0 sent as a
reference to another member's page (the same frame there: shared copy-on-write since a
fork) is copied in the kernel from that member's file (copy_file_range). The stubs
built, what each file holds is written into its stub laid out as round 0 (`fill`).
If the frozen tree is not the one built, the final image rebuilds each member anew and
what its file holds inside the image's PRECOPIED segments is written into the stub
(`apply`), before the final image's pages, which go over it: the files are kept until
the move ends for that. What a stub was filled with is dropped from its file meanwhile
(its memory held once, not twice), and read back from the stub if that is discarded
(`take_back`).

A child's stub is forked from its parent's once that is filled, and inherits its pages
copy-on-write (hijack.restore.address_space): `fill` leaves out the pages round 0
referred to the parent's at the same address where neither sent them again since
(`inherited`), so they stay the parent's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import BinaryIO

from hijack.errors import HijackError, ImageError, RestoreError
from hijack.image import records as rec
from hijack.image.codec import read_round
from hijack.restore.address_space import AddressSpace, outside
from hijack.sys import memory

# Offsets are signed: pages above this (the vsyscall page) are never PRECOPIED anyway.
MAX_OFFSET = 1 << 62
APPLY_CHUNK = 8 * 1024 * 1024
PUNCH_HOLE = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE


class MemberPages:
    """One member's pages from the rounds, by address."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = os.memfd_create(f"hijack-rounds-{pid}", os.MFD_CLOEXEC)
        self.rounds = 0
        self.layout: tuple[rec.Segment, ...] = ()  # round 0's segments: what a stub is built to
        # Round 0's pages copied from another member's at the same address: page -> member.
        self.referred: dict[int, int] = {}
        self.rewritten: set[int] = set()  # pages a round after round 0 sent
        # Filled into the stub and dropped from the file (its memory held once): the runs,
        # taken back from the stub if it is discarded (take_back); lost if that failed.
        self.lent: list[tuple[int, int]] = []
        self.lost = False

    def write(self, pages: rec.Pages) -> None:
        if pages.address + len(pages.data) <= MAX_OFFSET:
            os.pwrite(self.fd, pages.data, pages.address)
        if self.rounds:
            for page in range(pages.address, pages.address + len(pages.data), rec.PAGE_SIZE):
                self.rewritten.add(page)
                self.referred.pop(page, None)

    def copy_from(self, other: MemberPages, start: int, end: int, source: int) -> None:
        """The pages [start, end) are `other`'s at `source` (round 0's references)."""
        if max(end, source + end - start) > MAX_OFFSET:
            raise ImageError(f"a reference at {start:#x} lies above the user address space")
        if source == start:
            for page in range(start, end, rec.PAGE_SIZE):
                self.referred[page] = other.pid
        done = 0
        while done < end - start:
            copied = os.copy_file_range(
                other.fd, self.fd, end - start - done, source + done, start + done
            )
            if copied == 0:  # past the end of `other`'s file: holes, zero pages
                break
            done += copied

    def apply(self, space: AddressSpace, segments: tuple[rec.Segment, ...]) -> int:
        """Write what the rounds sent inside the PRECOPIED `segments` into the stub; the
        bytes written."""
        kept = tuple(s for s in segments if s.contents is rec.ContentsKind.PRECOPIED)
        return self._write_into(space, kept)

    def fill(self, space: AddressSpace, inherited: frozenset[int] = frozenset()) -> int:
        """Write every page the rounds sent into a stub laid out as round 0 (`layout`),
        before the freeze (hijack.restore.tree.prebuild_tree), but the pages `inherited`
        from the parent's stub as they are (TreeRounds.inherited); the bytes written."""
        skip = _runs(sorted(page for page in inherited if space.inherits(page)))
        written = self._write_into(space, self.layout, skip, lend=True)
        space.forget_unwritten()
        return written

    def take_back(self, space: AddressSpace) -> None:
        """Put what fill() dropped from the file back, read from the stub it filled (not run
        since): the stub is about to be discarded, and the final image may need the pages
        (`apply`)."""
        lent, self.lent = self.lent, []
        try:
            with memory.MemoryFile(space.stub.pid) as mem:
                for start, end in lent:
                    for chunk in range(start, end, APPLY_CHUNK):
                        data = bytearray(min(APPLY_CHUNK, end - chunk))
                        mem.read_into(chunk, data)
                        os.pwrite(self.fd, data, chunk)
        except (HijackError, OSError):
            self.lost = True

    def _write_into(
        self,
        space: AddressSpace,
        segments: tuple[rec.Segment, ...],
        skip: list[tuple[int, int]] | None = None,
        lend: bool = False,
    ) -> int:
        """What the file holds inside `segments`, into the stub, but the runs `skip` (sorted).
        The stub reads its writable memory from the file itself (a pread it is made to
        call, on its copy of the file's descriptor): one copy, in the kernel, rather than
        through our memory; the rest is written as pages are. `lend`: each run is then
        dropped from the file (the stub punches the hole), the stub's now (`lent`)."""
        if self.lost:
            raise RestoreError(
                f"the pre-copied pages of process {self.pid} were lost with its stub"
            )
        stub = space.stub
        written = 0
        handle = stub.call("pidfd_open", os.getpid(), 0)
        try:
            ours = stub.call("pidfd_getfd", handle, self.fd, 0)
        finally:
            stub.call("close", handle)
        try:
            for segment in segments:
                for data_start, data_end in self._data_in(segment.start, segment.end):
                    space.note_written(data_start, data_end)
                    for start, end in outside(data_start, data_end, skip or []):
                        self._write_run(space, segment, ours, start, end)
                        written += end - start
                    if lend:
                        size = data_end - data_start
                        stub.call("fallocate", ours, PUNCH_HOLE, data_start, size)
                        self.lent.append((data_start, data_end))
        finally:
            stub.call("close", ours)
        return written

    def _write_run(
        self, space: AddressSpace, segment: rec.Segment, ours: int, start: int, end: int
    ) -> None:
        if segment.prot & rec.Prot.WRITE:
            self._read_in_stub(space, ours, start, end)
            return
        for chunk in range(start, end, APPLY_CHUNK):
            data = os.pread(self.fd, min(APPLY_CHUNK, end - chunk), chunk)
            space.write_pages(rec.Pages(address=chunk, data=data))

    def _data_in(self, start: int, end: int) -> list[tuple[int, int]]:
        """The runs of [start, end) the file holds pages of (a hole: nothing sent)."""
        runs = []
        position = start
        while position < end:
            try:
                data_at = os.lseek(self.fd, position, os.SEEK_DATA)
            except OSError:  # ENXIO: nothing more in the file
                break
            if data_at >= end:
                break
            hole_at = min(os.lseek(self.fd, data_at, os.SEEK_HOLE), end)
            runs.append((data_at, hole_at))
            position = hole_at
        return runs

    @staticmethod
    def _read_in_stub(space: AddressSpace, fd: int, start: int, end: int) -> None:
        done = start
        while done < end:
            got = space.stub.call("pread64", fd, done, end - done, done)
            if got <= 0:
                raise RestoreError(
                    f"the pages at {done:#x} of process {space.stub.pid} could not be read in"
                )
            done += got

    def close(self) -> None:
        os.close(self.fd)


class TreeRounds:
    """Every member's pages from the rounds of a tree's move, by its pid at the source."""

    def __init__(self, members: list[int], admit: Callable[[rec.Segments], None]) -> None:
        self.admit = admit  # refuses (raising) a layout this node must not build
        self.members: dict[int, MemberPages] = {}
        try:
            for pid in members:
                self.members[pid] = MemberPages(pid)
        except BaseException:
            self.close()
            raise

    def receive_round(self, member: int, stream: BinaryIO) -> int:
        """Keep member `member`'s round read from `stream`; the pages it held."""
        pages = self.members.get(member)
        if pages is None:
            raise ImageError(f"a pre-copy round of process {member}, not a member of the tree")
        records = read_round(stream)
        opening = next(records)
        segments = next(records)
        assert isinstance(opening, rec.Round) and isinstance(segments, rec.Segments)
        if opening.pid != member or opening.number != pages.rounds:
            raise ImageError(
                f"pre-copy round {opening.number} of process {opening.pid} came where round"
                f" {pages.rounds} of process {member} was due"
            )
        if opening.number == 0:
            self.admit(segments)
            pages.layout = segments.segments
        count = 0
        for record in records:
            if isinstance(record, rec.Pages):
                pages.write(record)
                count += len(record.data) // rec.PAGE_SIZE
        pages.rounds += 1
        return count

    def refer(self, member: int, references: list[list[int]]) -> None:
        """Round 0's pages of `member` that another member sent: [start, end, pid, source]."""
        for start, end, pid, source in references:
            if pid not in self.members or pid == member or member not in self.members:
                raise ImageError(f"a reference of process {member} to process {pid}")
            if start % rec.PAGE_SIZE or end % rec.PAGE_SIZE or source % rec.PAGE_SIZE:
                raise ImageError(f"a reference at {start:#x} is not page-aligned")
            self.members[member].copy_from(self.members[pid], start, end, source)

    def inherited(self, member: int, parent: int) -> frozenset[int]:
        """The pages of `member` that are its parent's as the parent's stub holds them: round 0
        copied them from the same address of the parent's (or of the member the parent's
        were copied from) and no round sent them again since, to either."""
        pages, parents = self.members.get(member), self.members.get(parent)
        if pages is None or parents is None:
            return frozenset()
        found = set()
        for page, owner in pages.referred.items():
            if page in parents.rewritten:
                continue
            if owner == parent:
                found.add(page)
                continue
            first = self.members.get(owner)
            if parents.referred.get(page) == owner and first and page not in first.rewritten:
                found.add(page)
        return frozenset(found)

    def pages_of(self, member: int) -> MemberPages | None:
        return self.members.get(member)

    def close(self) -> None:
        for pages in self.members.values():
            pages.close()
        self.members = {}


def refuse_without(segments: tuple[rec.Segment, ...], pid: int) -> None:
    """A PRECOPIED segment in the image of a member that had no rounds: refused."""
    for segment in segments:
        if segment.contents is rec.ContentsKind.PRECOPIED:
            raise RestoreError(
                f"segment {segment.start:#x} of process {pid} is PRECOPIED, but no pre-copy"
                " round of it came"
            )


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted page addresses as runs [start, end)."""
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and runs[-1][1] == page:
            runs[-1] = (runs[-1][0], page + rec.PAGE_SIZE)
        else:
            runs.append((page, page + rec.PAGE_SIZE))
    return runs
