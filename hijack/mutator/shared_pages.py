"""Private pages a tree's members still share copy-on-write since a fork, stored once.

After a fork, parent and child map the very same physical pages until one of
them writes; a tree of a parent and N children holding 64 MiB each holds far
less than N + 1 copies. While the tree is frozen, /proc/PID/pagemap gives each
page's frame number (PFN; root reads them). The first member whose image
stores a frame writes its bytes; a later member mapping the same frame writes a
PAGE_REFERENCE to (that member, that address) instead (docs/crf.md §7b).
The pages are read through /proc/PID/mem, not process_vm_readv: that pins
what it reads, and the kernel unshares a shared anonymous page it pins (the
process gets a copy of its own): the tree would double its memory, and
pagemap tell the copies' frames.

A present page of a private file mapping that is still the file's (pagemap's
PM_FILE: the page cache's, not a private copy) is known by its file's page, as
one not in memory is: a library's code one member ran and another did not
touch since the fork is the same bytes, stored once.
Every present page's frame is remembered, not only those pagemap calls shared:
its PM_MMAP_EXCLUSIVE bit is not to be trusted for a transparent huge page
split by a write after the fork (the parent's pages read "exclusive" while
the children map them). The frame is the proof, the bytes the check: before a
reference is written, the bytes it names are read from the member holding
them and compared with the page's own; a run that differs (the kernel may
migrate a page and give its frame to another between two members' readings,
though frozen processes write none) is stored as bytes. A run all zero is
stored as PAGES too, where zero pages cost nothing (the kernel's zero page is
one frame every process maps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hijack.errors import HijackError
from hijack.image import records as rec
from hijack.image.codec import ImageWriter
from hijack.sys import memory, procfs

PAGE_SIZE = rec.PAGE_SIZE
_ZEROS = bytes(rec.MAX_PAGES_DATA)


@dataclass
class SharedPages:
    """The frames stored so far in a tree's images (by PFN, or a file's page by its device,
    inode and offset): where, (member, address)."""

    frames: dict[int | tuple[int, int, int, int], tuple[int, int]] = field(default_factory=dict)
    referenced: int = 0  # pages written as references, not bytes
    written: list[int] = field(default_factory=list)  # the members whose images are written
    # A snapshot's (hijack.mutator.snapshot): the members' pages are read from their forked
    # copies, by member pid the copy's; an image names the member, its bytes are the copy's.
    copies: dict[int, int] = field(default_factory=dict)
    # Where the bytes a reference names are read to be compared: reused, as a fresh buffer's
    # pages fault in one by one.
    _buffer: bytearray = field(default_factory=lambda: bytearray(rec.MAX_PAGES_DATA))

    @property
    def referable(self) -> frozenset[int]:
        """The members a page of the image written next may refer to."""
        return frozenset(self.written)

    def write(
        self,
        writer: ImageWriter,
        pid: int,
        address: int,
        view: memoryview,
        entries: Sequence[int],
        *,
        keep_zero_pages: bool,
        file: tuple[int, int, int, int] | None = None,
    ) -> None:
        """Write the pages of `pid` at `address` (their bytes in `view`, read while the tree
        is frozen, or from its copy; their pagemap `entries`, read before them): as PAGES, but as
        PAGE_REFERENCEs where a member before stored their frame. `file`: the (major, minor,
        inode, offset of `address`) of a private file mapping's pages, whose pages not in
        memory are the file's (the same file's page in another member is their frame)."""
        pid = self._member_of(pid)
        own_start = 0  # where the run of pages stored as bytes began (in view)
        run: list[int] = []  # [start in view, pages, member, source] of the run referred to
        for index, entry in enumerate(entries):
            offset = index * PAGE_SIZE
            key: int | tuple[int, int, int, int] = entry & procfs.PM_PFN_MASK
            if not entry & procfs.PM_PRESENT:
                in_file = file is not None and not entry & procfs.PM_SWAP
                key = (*file[:3], file[3] + offset) if file is not None and in_file else 0
            elif file is not None and entry & procfs.PM_FILE:
                # The file's own page (the page cache's, not a private copy): one key with
                # the same page not in memory in another member, which maps the same bytes.
                key = (*file[:3], file[3] + offset)
            source = self._source(pid, address + offset, key)
            if (
                source is not None
                and run
                and run[2:] == [source[0], source[1] - run[1] * PAGE_SIZE]
            ):
                run[1] += 1
                if run[1] < rec.MAX_REFERENCED_PAGES:
                    continue
                source = None  # a full run: written, this page with it
            if run:
                self._refer(writer, pid, address, view, run, keep_zero_pages)
                own_start = run[0] + run[1] * PAGE_SIZE
                run = []
            if source is None:
                continue
            if own_start < offset:
                own = view[own_start:offset]
                writer.write_pages(address + own_start, own, keep_zero_pages=keep_zero_pages)
            run = [offset, 1, *source]
        if run:
            self._refer(writer, pid, address, view, run, keep_zero_pages)
            own_start = run[0] + run[1] * PAGE_SIZE
        if own_start < len(view):
            own = view[own_start:]
            writer.write_pages(address + own_start, own, keep_zero_pages=keep_zero_pages)

    def _member_of(self, pid: int) -> int:
        """The member whose image pages read from process `pid` (it, or its copy) are."""
        return next((member for member, copy in self.copies.items() if copy == pid), pid)

    def _source(
        self, pid: int, address: int, frame: int | tuple[int, int, int, int]
    ) -> tuple[int, int] | None:
        """Where a member before this one stored `frame` (a page frame number, or a page of
        a file not in memory), or None: the page is stored as bytes (and its frame
        remembered, if it is the first)."""
        if not frame:
            return None  # swapped out, or PFNs hidden (not root): nothing to go by
        found = self.frames.setdefault(frame, (pid, address))
        return None if found[0] == pid else found

    def _refer(
        self,
        writer: ImageWriter,
        pid: int,
        address: int,
        view: memoryview,
        run: list[int],
        keep_zero_pages: bool,
    ) -> None:
        """Write the pages of `run` as a reference if the member named holds those very
        bytes, else as bytes."""
        start, pages, member, source = run
        ours = view[start : start + pages * PAGE_SIZE]
        theirs = memoryview(self._buffer)[: len(ours)]
        try:
            with memory.MemoryFile(self.copies.get(member, member)) as mem:
                mem.read_into(source, theirs)
            same = self._buffer.startswith(ours)  # a memcmp (memoryviews compare by element)
        except HijackError:
            same = False  # not there to compare: stored as bytes
        if not same or _ZEROS.startswith(ours):
            writer.write_pages(address + start, ours, keep_zero_pages=keep_zero_pages)
            return
        writer.write(
            rec.PageReference(address=address + start, pages=pages, pid=member, source=source)
        )
        self.referenced += pages
