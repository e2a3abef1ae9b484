"""Rebuilding the address space: empty the stub, place the kernel's mappings, map the image's.

Order matters:
1. unmap everything the stub program brought, except [vvar], [vvar_vclock]
   and [vdso], which the kernel made and which hold our syscall instruction;
2. move those three, each whole, to where the image had them: first all into
   a temporary hole (so no move overlaps its own source), then to their place;
   the vdso finds its data at a fixed offset, so their relative layout is the
   kernel's and must be kept;
3. attach the System V shared memory segments (shmat) at their addresses,
   cut to the parts the process had mapped, with their protections;
4. map a scratch area in a hole of the image's layout;
5. map every other segment at its address with its protections, from its file
   or anonymous; pages then stream in (process_vm_writev into writable
   segments, /proc/PID/mem, which ignores protections, into the others).

A move with pre-copy builds from its round 0 and later turns that layout
into its final image's (`adopt_final`): PRECOPIED segments keep what the
rounds wrote, everything else is unmapped and mapped anew.

A tree's member forked from its parent's stub once the parent's memory is built
(hijack.restore.tree, as CRIU forks children from a parent whose private memory
is premapped) inherits it copy-on-write: each of its private segments that the
parent's covers with the same backing is kept in place (`Inherited`), not
unmapped in step 1 nor mapped in step 5. Its image's pages are written over it
(each write unshares that page alone), a PAGE_REFERENCE to the very page the
parent holds there is skipped (the page is inherited), and what the image says
nothing of is dropped (MADV_DONTNEED: zero, or the file's page, as a fresh
mapping holds) once its pages are in (`forget_unwritten`).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass

from hijack.errors import HijackError, RestoreError
from hijack.image import records as rec
from hijack.restore.remote import SCRATCH_PROT, SCRATCH_SIZE, Stub
from hijack.sys import memory, procfs, sysv

MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_GROWSDOWN = 0x100
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE = 1
MREMAP_FIXED = 2
MADV_DONTNEED = 4
PROT_READ_WRITE = 0x1 | 0x2
O_RDONLY = 0
O_RDWR = 2
O_CLOEXEC = 0o2000000
AT_FDCWD = -100

KERNEL_MAPPINGS = ("[vvar]", "[vvar_vclock]", "[vdso]")
PAGE_SIZE = rec.PAGE_SIZE
LOWEST_HOLE = 0x10000000  # above where small non-PIE programs and mmap_min_addr live
USER_SPACE_END = 0x7FFFFFFFF000

# smaps VmFlags that an madvise() gives back (the rest follow from mmap flags).
MADVISE_FOR_FLAG = {
    "dd": 16,  # MADV_DONTDUMP
    "hg": 14,  # MADV_HUGEPAGE
    "nh": 15,  # MADV_NOHUGEPAGE
    "dc": 10,  # MADV_DONTFORK
    "wf": 18,  # MADV_WIPEONFORK
    "mg": 12,  # MADV_MERGEABLE
}


def is_shared_memory(segment: rec.Segment) -> bool:
    """A System V shared memory segment's mapping: its inode is the segment's id."""
    return sysv.is_segment_mapping(segment.path, segment.shared, segment.dev_major)


def has_backing_file(segment: rec.Segment) -> bool:
    # A System V segment's "/SYSV..." path opens nothing: the stub attaches it.
    return segment.path.startswith("/") and segment.inode != 0 and not is_shared_memory(segment)


def needs_backing_file(segment: rec.Segment) -> bool:
    """Whether a restore cannot do without the segment's file: its pages are not all in the
    image (FILE, NONE for a shared file mapping), or the mapping is shared with it."""
    return has_backing_file(segment) and (
        segment.shared or segment.contents is not rec.ContentsKind.STORED
    )


def may_write(segment: rec.Segment) -> bool:
    """Whether a shared mapping is or may be made writable (VM_MAYWRITE, smaps "mw"): it was
    mapped from a descriptor opened for writing, and must be again, or a later
    mprotect(PROT_WRITE) fails."""
    return segment.shared and bool(segment.prot & rec.Prot.WRITE or "mw" in segment.vm_flags)


def backing_file_mode(segment: rec.Segment) -> int:
    return (O_RDWR if may_write(segment) else O_RDONLY) | O_CLOEXEC


def unmappable(segment: rec.Segment) -> str:
    return f"cannot open {segment.path}, which the process had mapped"


def find_hole(occupied: list[tuple[int, int]], size: int) -> int:
    """The lowest address >= LOWEST_HOLE where `size` bytes touch no occupied range."""
    candidate = LOWEST_HOLE
    for start, end in sorted(occupied):
        if end <= candidate:
            continue
        if start >= candidate + size:
            return candidate
        candidate = max(candidate, end)
    if candidate + size > USER_SPACE_END:
        raise RestoreError("no room left in the address space for the restorer's scratch area")
    return candidate


@dataclass(frozen=True)
class Inherited:
    """What a member's stub inherits of its parent's, forked once the parent's memory was
    built: the parent's private segments (pages all written), and which of the parent's
    pages are themselves another member's inherited page (address -> that member)."""

    parent: int  # the parent's pid in the image
    segments: tuple[rec.Segment, ...]
    owners: Mapping[int, int]


# VmFlags a child's copy of a mapping does not have as its parent's pages: not inherited
# (dc), zeroed in the child (wf), hugetlb (ht), device memory (io, pf).
_NOT_INHERITED_FLAGS = frozenset({"dc", "wf", "ht", "io", "pf"})


def inheritable(segment: rec.Segment) -> bool:
    """Whether a private segment's pages go to a forked child copy-on-write as they are."""
    return (
        not segment.shared
        and segment.contents is rec.ContentsKind.STORED
        and segment.path not in (*KERNEL_MAPPINGS, "[vsyscall]")
        and not is_shared_memory(segment)
        and not _NOT_INHERITED_FLAGS.intersection(segment.vm_flags)
    )


def _page_rounded(size: int) -> int:
    return (size + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


class AddressSpace:
    """`shared_memory`: the size of each System V segment (by id) the stub attaches;
    `kept`: those found live, whose pages the image does not overwrite."""

    def __init__(
        self,
        stub: Stub,
        segments: tuple[rec.Segment, ...],
        shared_memory: Mapping[int, int] | None = None,
        kept: frozenset[int] = frozenset(),
    ) -> None:
        self.stub = stub
        self.shared_memory = dict(shared_memory or {})
        self.kept = kept
        self.segments = [s for s in segments if s.path not in KERNEL_MAPPINGS]
        self.kernel_segments = {s.path: s for s in segments if s.path in KERNEL_MAPPINGS}
        self._starts = [s.start for s in self.segments]
        self._mem = memory.MemoryFile(stub.pid)
        self._sources: dict[int, memory.MemoryFile] = {}  # copy_pages': by pid
        self._later: frozenset[int] = frozenset()
        # Inherited from the parent's stub: the parent, its pages, the segments kept (by start).
        self._inherited: Inherited | None = None
        self._kept: dict[int, rec.Segment] = {}
        self._written: list[tuple[int, int]] = []  # what the image said of the kept segments
        self.owners: dict[int, int] = {}  # pages inherited unwritten: address -> whose they are
        # Segments adopt_final kept, filled before the freeze: only pages that differ are
        # written into them (the others may be shared with the parent's stub).
        self._settled: frozenset[int] = frozenset()
        self.keep_unchanged = False  # a tree's prebuilt stub: settle adopt_final's kept segments

    def build(
        self, later: frozenset[int] = frozenset(), inherited: Inherited | None = None
    ) -> None:
        """Lay the stub out as the image says; the segments starting at `later` are left
        for map_segment_from (mapped from objects the descriptors' restore makes).
        `inherited`: the stub was forked from its parent's built stub; the segments of the
        image the parent's cover are kept, copy-on-write."""
        self._later = later
        self._inherited = inherited
        held = self._inherited_segments(inherited, later) if inherited else {}
        self._kept = {start: segment for start, (segment, _) in held.items()}
        self._clear_stub(sorted((s.start, s.end) for s in self._kept.values()))
        self._place_kernel_mappings()
        self._attach_shared_memory()
        self._map_scratch()
        for segment in self.segments:
            if segment.start in held:
                if held[segment.start][1] != segment.prot:
                    self.stub.call("mprotect", segment.start, segment.size, int(segment.prot))
                self._advise(segment)
            elif not is_shared_memory(segment) and segment.start not in later:
                self._map_segment(segment)

    def _inherited_segments(
        self, inherited: Inherited, later: frozenset[int]
    ) -> dict[int, tuple[rec.Segment, rec.Prot]]:
        """The image's segments the parent's cover with the same backing: by start, each
        with the protection its inherited mapping has."""
        found = {}
        for segment in self.segments:
            if segment.start in later or not inheritable(segment):
                continue
            for base in inherited.segments:
                if _holds(base, segment):
                    found[segment.start] = (segment, base.prot)
                    break
        return found

    def inherited_by_child(self, pid: int) -> Inherited:
        """What a child forked from this stub now inherits (`pid`: ours, in the image)."""
        segments = tuple(s for s in self.segments if s.start not in self._later and inheritable(s))
        return Inherited(pid, segments, self.owners)

    # -- 1. empty the stub ------------------------------------------------------

    def _clear_stub(self, kept: list[tuple[int, int]] | None = None) -> None:
        """Unmap all but the kernel's mappings and the ranges `kept` (sorted)."""
        for mapping in procfs.read_maps(self.stub.pid):
            if mapping.path in KERNEL_MAPPINGS or mapping.path == "[vsyscall]":
                continue
            for start, end in outside(mapping.start, mapping.end, kept or []):
                self.stub.call("munmap", start, end - start)

    # -- 2. the kernel's own mappings ------------------------------------------

    def _place_kernel_mappings(self) -> None:
        current = {m.path: m for m in procfs.read_maps(self.stub.pid) if m.path in KERNEL_MAPPINGS}
        missing = sorted(set(current) ^ set(self.kernel_segments))
        if missing:
            raise RestoreError(
                f"the image's kernel mappings ({', '.join(sorted(self.kernel_segments))}) differ"
                f" from this kernel's ({', '.join(sorted(current))}): made by another kernel?"
            )
        for path, mapping in current.items():
            if mapping.end - mapping.start != self.kernel_segments[path].size:
                raise RestoreError(f"{path} has another size on this kernel than in the image")
        syscall_offset = self.stub.tracee.syscall_address - current["[vdso]"].start
        occupied = [(s.start, s.end) for s in self.kernel_segments.values()]
        occupied += [(m.start, m.end) for m in current.values()]
        occupied += [(s.start, s.end) for s in self.segments]
        hole = find_hole(occupied, sum(m.end - m.start for m in current.values()))
        staged = {}
        for path, mapping in current.items():
            staged[path] = self._move(mapping.start, mapping.end - mapping.start, hole)
            hole += mapping.end - mapping.start
            if path == "[vdso]":  # our syscall instruction moved with it
                self.stub.tracee.syscall_address = staged[path] + syscall_offset
        for path, segment in self.kernel_segments.items():
            self._move(staged[path], segment.size, segment.start)
            if path == "[vdso]":
                self.stub.tracee.syscall_address = segment.start + syscall_offset

    def _move(self, start: int, size: int, destination: int) -> int:
        # The call may move the very vdso it runs from: its return address is
        # gone, but the tracer rewrites every register before the next one.
        return self.stub.call(
            "mremap", start, size, size, MREMAP_MAYMOVE | MREMAP_FIXED, destination
        )

    # -- 3. System V shared memory ----------------------------------------------

    def _attach_shared_memory(self) -> None:
        """shmat each segment where the process had it; the parts of an attachment the
        process had unmapped are unmapped, those it had mprotect'ed get their protection."""
        attachments: dict[tuple[int, int], list[rec.Segment]] = {}
        for segment in self.segments:
            if is_shared_memory(segment):
                base = segment.start - segment.offset
                attachments.setdefault((segment.inode, base), []).append(segment)
        for (shmid, base), parts in attachments.items():
            size = self.shared_memory.get(shmid)
            if size is None:
                raise RestoreError(
                    f"the image has no System V segment {shmid} for its mapping at {base:#x}"
                )
            prot = rec.Prot.READ
            for part in parts:
                prot |= part.prot & (rec.Prot.WRITE | rec.Prot.EXEC)
            flags = (0 if prot & rec.Prot.WRITE else sysv.SHM_RDONLY) | (
                sysv.SHM_EXEC if prot & rec.Prot.EXEC else 0
            )
            self.stub.call("shmat", shmid, base, flags)
            kept = sorted((part.start, part.end) for part in parts)
            for start, end in outside(base, base + _page_rounded(size), kept):
                self.stub.call("munmap", start, end - start)
            for part in parts:
                if part.prot != prot:
                    self.stub.call("mprotect", part.start, part.size, int(part.prot))
                self._advise(part)

    # -- 4. scratch -------------------------------------------------------------

    def _map_scratch(self) -> None:
        occupied = [(s.start, s.end) for s in self.segments]
        occupied += [(s.start, s.end) for s in self.kernel_segments.values()]
        address = find_hole(occupied, SCRATCH_SIZE)
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
        self.stub.call("mmap", address, SCRATCH_SIZE, SCRATCH_PROT, flags, -1, 0)
        self.stub.use_scratch(address)

    def _relocate_scratch(self, segments: list[rec.Segment]) -> None:
        """Move the scratch area out of the way of `segments` (the final layout)."""
        old = self.stub.scratch
        if not any(s.start < old + SCRATCH_SIZE and old < s.end for s in segments):
            return
        occupied = [(s.start, s.end) for s in segments]
        occupied += [(m.start, m.end) for m in procfs.read_maps(self.stub.pid)]
        address = find_hole(occupied, SCRATCH_SIZE)
        flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
        self.stub.call("mmap", address, SCRATCH_SIZE, SCRATCH_PROT, flags, -1, 0)
        self.stub.use_scratch(address)
        self.stub.call("munmap", old, SCRATCH_SIZE)

    def unmap_scratch(self) -> None:
        self.stub.call("munmap", self.stub.scratch, SCRATCH_SIZE)

    # -- 5. the image's segments ------------------------------------------------

    def _map_segment(self, segment: rec.Segment) -> None:
        if is_shared_memory(segment):
            # Only build() attaches segments: a move's pre-copy rounds cannot.
            raise RestoreError(
                f"System V segment {segment.inode} at {segment.start:#x} can only be attached"
                " by a restore from a whole image"
            )
        fd = self._open_backing_file(segment)
        try:
            self.map_segment_from(segment, fd)
        finally:
            if fd >= 0:
                self.stub.call("close", fd)

    def map_segment_from(self, segment: rec.Segment, fd: int) -> None:
        """Map `segment` from the stub's descriptor `fd` (-1: anonymous), with its advice."""
        flags = MAP_FIXED | (MAP_SHARED if segment.shared else MAP_PRIVATE)
        if "gd" in segment.vm_flags:
            flags |= MAP_GROWSDOWN
        if fd < 0:
            flags |= MAP_ANONYMOUS
        offset = segment.offset if fd >= 0 else 0
        self.stub.call("mmap", segment.start, segment.size, int(segment.prot), flags, fd, offset)
        self._advise(segment)

    def _advise(self, segment: rec.Segment) -> None:
        for flag, advice in MADVISE_FOR_FLAG.items():
            if flag in segment.vm_flags:
                self.stub.try_call("madvise", segment.start, segment.size, advice)

    def map_shared_anonymous(
        self, size: int, chunks: list[tuple[int, bytes]], segments: list[rec.Segment]
    ) -> None:
        """One shared anonymous memory object ("/dev/zero (deleted)") of `size` bytes,
        holding `chunks` (offset, bytes), mapped at each of `segments` (its `offset` is
        where in the object the segment starts): they share its pages, as they did.

        The object is made as a mapping of its own in a hole, filled, and each segment
        made a second mapping of its pages (mremap with old size 0); then it goes."""
        occupied = [(s.start, s.end) for s in self.segments]
        occupied += [(s.start, s.end) for s in self.kernel_segments.values()]
        occupied.append((self.stub.scratch, self.stub.scratch + SCRATCH_SIZE))
        length = (size + rec.PAGE_SIZE - 1) // rec.PAGE_SIZE * rec.PAGE_SIZE
        address = find_hole(occupied, length)
        flags = MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE
        self.stub.call("mmap", address, length, PROT_READ_WRITE, flags, -1, 0)
        try:
            for offset, data in chunks:
                memory.write(self.stub.pid, address + offset, data)
            for segment in segments:
                moving = MREMAP_MAYMOVE | MREMAP_FIXED
                self.stub.call(
                    "mremap", address + segment.offset, 0, segment.size, moving, segment.start
                )
                if segment.prot != PROT_READ_WRITE:
                    self.stub.call("mprotect", segment.start, segment.size, int(segment.prot))
                self._advise(segment)
        finally:
            self.stub.call("munmap", address, length)

    def _open_backing_file(self, segment: rec.Segment) -> int:
        """A descriptor in the stub for the segment's file, or -1 to map it anonymous."""
        if not has_backing_file(segment):
            return -1
        self.stub.reset_scratch()
        path = self.stub.put_string(segment.path)
        fd = self.stub.try_call("openat", AT_FDCWD, path, backing_file_mode(segment), 0)
        if fd >= 0:
            return fd
        if not needs_backing_file(segment):
            return -1  # a deleted or moved file: its pages are in the image anyway
        raise RestoreError(unmappable(segment))

    # -- the final layout after pre-copy rounds (docs/crf.md §7a) -----------------

    def adopt_final(
        self, segments: tuple[rec.Segment, ...], later: frozenset[int] = frozenset()
    ) -> None:
        """Turn round 0's layout into the final image's, keeping what PRECOPIED segments hold;
        the segments starting at `later` are left out, as by build()."""
        final = [s for s in segments if s.path not in KERNEL_MAPPINGS]
        for segment in segments:
            placed = self.kernel_segments.get(segment.path)
            if segment.path in KERNEL_MAPPINGS and (
                placed is None or (placed.start, placed.end) != (segment.start, segment.end)
            ):
                raise RestoreError(f"{segment.path} moved during the pre-copy rounds")
        # Each kept segment, with the protection round 0 gave it.
        kept: dict[int, rec.Prot] = {}
        for segment in final:
            if segment.contents is rec.ContentsKind.PRECOPIED:
                holder = [base for base in self.segments if _holds(base, segment)]
                if not holder:
                    raise RestoreError(
                        f"segment {segment.start:#x}-{segment.end:#x} is PRECOPIED, but no"
                        " pre-copy round built it"
                    )
                kept[segment.start] = holder[0].prot
            elif _same_file_mapping(segment, self.segments):
                # The file range round 0 mapped just so: the final image stores
                # its pages whole, so overwriting them is as good as mapping anew.
                kept[segment.start] = segment.prot
        kept_ranges = [(s.start, s.end) for s in final if s.start in kept]
        self._relocate_scratch(final)
        keep = list(kept_ranges)
        keep.append((self.stub.scratch, self.stub.scratch + SCRATCH_SIZE))
        # What needs no answer (all but opening mapped files) in one batch of calls, one
        # stop (hijack.mutator.parasite): a move's freeze waits for it (issue #17).
        files = []
        with self.stub.batched():
            for mapping in procfs.read_maps(self.stub.pid):
                if mapping.path in KERNEL_MAPPINGS or mapping.path == "[vsyscall]":
                    continue
                for start, end in outside(mapping.start, mapping.end, sorted(keep)):
                    self.stub.call("munmap", start, end - start)
            for segment in final:
                if segment.start in kept:
                    if kept[segment.start] != segment.prot:
                        self.stub.call("mprotect", segment.start, segment.size, int(segment.prot))
                    self._advise(segment)
                elif segment.start in later:
                    continue
                elif has_backing_file(segment) or is_shared_memory(segment):
                    files.append(segment)  # mapped once every range is free, below
                else:
                    self.map_segment_from(segment, -1)
        for segment in files:
            self._map_segment(segment)
        self.segments = final
        self._starts = [s.start for s in final]
        self._settled = frozenset(kept) if self.keep_unchanged else frozenset()

    # -- pages --------------------------------------------------------------------

    def write_pages(self, pages: rec.Pages) -> None:
        segment = self._segment_at(pages.address)
        self.note_written(pages.address, pages.address + len(pages.data))
        if self._kept_live(segment):
            return  # a live segment: what it holds now is its truth
        if segment.start in self._settled:
            self._write_changed(segment, pages.address, pages.data)
            return
        self._put(segment, pages.address, pages.data)

    def _kept_live(self, segment: rec.Segment) -> bool:
        """A shared memory segment kept as it is (SysV): never written."""
        return is_shared_memory(segment) and segment.inode in self.kept

    def _writes_plainly(self, segment: rec.Segment) -> bool:
        """Whether write_pages writes pages of `segment` by process_vm_writev as they come:
        writable, neither settled (compared page by page) nor kept live."""
        return bool(segment.prot & rec.Prot.WRITE) and not (
            segment.start in self._settled or self._kept_live(segment)
        )

    def write_scattered_pages(self, pages: rec.ScatteredPages) -> None:
        """The runs of `pages`, those bound for plain writable memory in one vectored
        process_vm_writev (a move's final image: a page or two here and there, hundreds)."""
        plain: list[tuple[int, int]] = []  # (address, length), their data back to back
        pieces: list[memoryview] = []
        view = memoryview(pages.data)
        offset = 0
        for address, length in pages.runs:
            data = view[offset : offset + length]
            offset += length
            segment = self._segment_at(address)
            if self._writes_plainly(segment) and address + length <= segment.end:
                self.note_written(address, address + length)
                plain.append((address, length))
                pieces.append(data)
            else:
                self.write_pages(rec.Pages(address=address, data=bytes(data)))
        for at in range(0, len(plain), memory.IOV_MAX):
            chunk = pieces[at : at + memory.IOV_MAX]
            memory.write_scattered(self.stub.pid, plain[at : at + memory.IOV_MAX], b"".join(chunk))

    def _put(self, segment: rec.Segment, address: int, data: bytes | memoryview) -> None:
        if segment.prot & rec.Prot.WRITE:
            memory.write(self.stub.pid, address, bytes(data))
            return
        self._mem.write(address, bytes(data))

    def _write_changed(self, segment: rec.Segment, address: int, data: bytes) -> None:
        """Write only the pages of `data` the stub does not hold already: a page a member's
        stub shares copy-on-write with its parent's (prebuild_tree) stays shared where the
        final image stores it again unchanged (a file mapping's pages, stored whole)."""
        current = bytearray(len(data))
        try:
            self._mem.read_into(address, current)
        except HijackError:
            self._put(segment, address, data)
            return
        if current == data:  # one memcmp: the usual case (an idle member's references)
            return
        view = memoryview(data)
        run_start = -1
        for offset in range(0, len(data) + PAGE_SIZE, PAGE_SIZE):
            # Slices of bytes compare by memcmp; a memoryview's compare goes item by item
            # (9 us a page on an idle machine, 20 times a slice's).
            differs = (
                offset < len(data)
                and data[offset : offset + PAGE_SIZE] != current[offset : offset + PAGE_SIZE]
            )
            if differs and run_start < 0:
                run_start = offset
            elif not differs and run_start >= 0:
                self._put(segment, address + run_start, view[run_start:offset])
                run_start = -1

    def copy_pages(self, reference: rec.PageReference, source_pid: int) -> None:
        """Write the pages `reference` names, read from the stub `source_pid` of the member
        whose image stored them (rebuilt before this one, not started: as it was dumped);
        skipped where this stub inherited those very pages from its parent."""
        if self._inherits(reference):
            self.note_written(reference.address, reference.address + reference.size)
            for index in range(reference.pages):
                self.owners[reference.address + index * PAGE_SIZE] = reference.pid
            return
        data = bytearray(reference.size)
        source = self._sources.get(source_pid)
        if source is None:  # kept open for the image's next references (closed by close())
            source = self._sources[source_pid] = memory.MemoryFile(source_pid)
        try:
            source.read_into(reference.source, memoryview(data))
        except HijackError as error:
            raise RestoreError(
                f"cannot copy the pages at {reference.address:#x} from process"
                f" {reference.pid} ({reference.source:#x}): {error}"
            ) from None
        self.write_pages(rec.Pages(address=reference.address, data=bytes(data)))

    def _inherits(self, reference: rec.PageReference) -> bool:
        """Whether the pages `reference` names are the ones this stub inherited at the
        same address: its parent's own, or those the parent itself inherited unwritten."""
        inherited = self._inherited
        if inherited is None or reference.source != reference.address:
            return False
        segment = self._segment_at(reference.address)
        if segment.start not in self._kept or reference.address + reference.size > segment.end:
            return False
        if reference.pid == inherited.parent:
            return True
        return all(
            inherited.owners.get(reference.address + index * PAGE_SIZE) == reference.pid
            for index in range(reference.pages)
        )

    def note_written(self, start: int, end: int) -> None:
        """The pages [start, end) are the image's (written, or inherited as they are)."""
        if self._kept:
            self._written.append((start, end))

    def inherits(self, address: int) -> bool:
        """Whether the page at `address` is in a segment kept from the parent's stub."""
        index = bisect.bisect_right(self._starts, address) - 1
        if not self._kept or index < 0:
            return False
        segment = self.segments[index]
        return segment.start in self._kept and address < segment.end

    def forget_unwritten(self) -> None:
        """Drop the inherited pages the image said nothing of (once all its pages are in):
        a fresh mapping's pages there (zero, or the file's), as the image means. Later
        pages (a move's final image) are written as into any stub."""
        written = sorted(self._written)
        for segment in self._kept.values():
            for start, end in outside(segment.start, segment.end, written):
                self.stub.call("madvise", start, end - start, MADV_DONTNEED)
        self._written = []
        self._kept = {}
        self._inherited = None

    def _segment_at(self, address: int) -> rec.Segment:
        index = bisect.bisect_right(self._starts, address) - 1
        if index < 0 or not self.segments[index].start <= address < self.segments[index].end:
            raise RestoreError(f"pages at {address:#x} lie outside every segment")
        return self.segments[index]

    def close(self) -> None:
        self._mem.close()
        for source in self._sources.values():
            source.close()
        self._sources = {}


def _holds(base: rec.Segment, segment: rec.Segment) -> bool:
    """Whether round 0's `base` covers `segment` with the same backing."""
    same_file = segment.inode == 0 or segment.offset - base.offset == segment.start - base.start
    return (
        base.start <= segment.start
        and segment.end <= base.end
        and base.contents is rec.ContentsKind.STORED
        and (base.inode, base.dev_major, base.dev_minor, base.shared)
        == (segment.inode, segment.dev_major, segment.dev_minor, segment.shared)
        and same_file
    )


def _same_file_mapping(segment: rec.Segment, base: list[rec.Segment]) -> bool:
    """Whether round 0 mapped `segment`'s file range just so (a whole stored file mapping)."""
    if not (segment.path.startswith("/") and segment.inode) or segment.shared:
        return False
    if segment.contents is not rec.ContentsKind.STORED:
        return False
    twin = [
        b
        for b in base
        if (b.start, b.end, b.prot, b.offset, b.inode, b.dev_major, b.dev_minor, b.path)
        == (
            segment.start,
            segment.end,
            segment.prot,
            segment.offset,
            segment.inode,
            segment.dev_major,
            segment.dev_minor,
            segment.path,
        )
    ]
    return bool(twin) and not twin[0].shared and twin[0].contents is rec.ContentsKind.STORED


def outside(start: int, end: int, kept: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [start, end) that no range of `kept` (sorted) covers."""
    parts = []
    cursor = start
    for keep_start, keep_end in kept:
        if keep_end <= cursor or keep_start >= end:
            continue
        if keep_start > cursor:
            parts.append((cursor, keep_start))
        cursor = max(cursor, keep_end)
    if cursor < end:
        parts.append((cursor, end))
    return parts
