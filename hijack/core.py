"""ELF core files from CRF images, for gdb: `hijack core IMAGE -o FILE`.

Pure code: it reads an image's records (hijack.image.read_image) and writes
a core file as the kernel would have dumped the process at that instant:

    CORE  ::= ELF-HEADER  DATA  NOTES  PROGRAM-HEADERS
    DATA  ::= the memory of the PT_LOAD segments, page-aligned, zeros as holes
    NOTES ::= { NT_PRSTATUS NT_PRFPREG NT_X86_XSTATE }   one triple per thread,
              NT_PRPSINFO NT_AUXV NT_FILE                 the main thread first

One PT_LOAD per segment of the image, in address order. A STORED segment's
data is its pages, those the image left out as holes (zeros; the file is
sparse). A FILE segment (`dump --no-binary` / `--no-shared-libs`) is read
from its file, refused as a restore refuses it if the file changed since the
dump, with the pages the process changed laid over it: gdb could read such a
segment from the file NT_FILE names (every file-backed segment is listed
there), but not the ELF header page of the executable, which is in none of
its sections, and without it gdb 13 cannot place a PIE binary (it reloads
the threads over and over and loses the libraries). Segments whose bytes are
the kernel's or a shared file's (NONE: vvar, vdso, MAP_SHARED files) and
PROT_NONE ones holding no page have p_filesz 0: gdb reads shared files from
NT_FILE, and calls the rest unreadable. A segment sharing the pages of a
memory object of the image (a memfd, a deleted file, shared anonymous
memory: NONE too) gets the object's bytes (its OBJECT_DATA), holes as
zeros. The vDSO is not in images, so gdb says "Failed to read a valid
object file image from memory" and does without its symbols. Data is
written as it comes, so converting a large image takes as little memory as
reading it; the program headers, which depend on where the data went, come
last.

A snapshot's file made of pre-copy rounds (docs/crf.md §7a, "In a file") is
read twice: its IMAGE first, PRECOPIED segments placed as STORED ones, then
its rounds, whose pages go where the IMAGE stored none (a later round's over
an earlier one's).

What lief (1.0) makes and what is packed here with struct, and why:
- lief makes the notes: NT_PRSTATUS through CorePrStatus (pid, signals and
  registers set by name) and NT_PRPSINFO through CorePrPsInfo; NT_PRFPREG,
  NT_X86_XSTATE, NT_AUXV and NT_FILE are lief Notes around their descriptions.
- The ELF header, the program headers and each note's frame (namesz, descsz,
  type, padding) are packed with struct: lief cannot make an ELF file from
  nothing (lief.ELF.Binary has no constructor), its builder refuses to add a
  segment to an ET_CORE file ("Adding segment not implemented for CORE"), so
  it can neither add the PT_LOADs nor grow a PT_NOTE, and it rebuilds the
  whole file in memory, where a core is as large as the process's memory.
- The NT_AUXV and NT_FILE descriptions are packed with struct too: lief's
  CoreAuxv.set only takes the AT_* types of its own enum (it has no
  AT_MINSIGSTKSZ, AT_RSEQ_FEATURE_SIZE, ...: entries would be lost), and its
  CoreFile.entry_t has no constructor in Python.
- NT_X86_XSTATE is the xstate as PTRACE_GETREGSET gave it, as the kernel
  writes it in its own cores. gdb 13 expects Intel's offsets for AVX-512
  (2688 bytes) and warns "Section `.reg-xstate/TID' in core file too small"
  on an AMD machine (2432 bytes here); it shows all else.
- lief's x86-64 register list ends at es: the fs and gs selectors are written
  as 0, which they are in a 64-bit thread unless it loaded one itself (its
  TLS pointer, fs_base, is written).
"""

from __future__ import annotations

import bisect
import contextlib
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import lief

from hijack.errors import HijackError, ImageError
from hijack.image.identity import check_identity
from hijack.image.records import (
    PAGE_SIZE,
    ContentsKind,
    Credentials,
    End,
    GhostFile,
    ImageHeader,
    MemfdObject,
    MemoryStructure,
    ObjectData,
    Pages,
    Prot,
    Record,
    Segment,
    Segments,
    SharedAnonymous,
    Thread,
)

ELF = lief.ELF
X86_64 = (ELF.ARCH.X86_64, ELF.Header.CLASS.ELF64)
EHDR_SIZE, PHDR_SIZE = 64, 56
PRSTATUS_SIZE, PRPSINFO_SIZE = 336, 136  # x86-64 struct elf_prstatus, elf_prpsinfo
FXSAVE_SIZE = 512  # NT_PRFPREG: the legacy area that opens every xstate
COPY_CHUNK = 1 << 20
PN_XNUM = 0xFFFF  # e_phnum from here on means "see section 0": not written here
PERMISSIONS = ((Prot.READ, ELF.Segment.FLAGS.R), (Prot.WRITE, ELF.Segment.FLAGS.W),
               (Prot.EXEC, ELF.Segment.FLAGS.X))  # fmt: skip


@dataclass(frozen=True)
class CoreResult:
    pid: int
    threads: int
    loads: int  # PT_LOAD program headers
    mapped_files: int  # NT_FILE entries
    core_bytes: int  # the file's size, holes included


@dataclass(frozen=True)
class _Load:
    vaddr: int
    memsz: int
    flags: int
    offset: int = 0
    filesz: int = 0


@dataclass
class _Memory:
    """Where each segment's data goes in the core: a STORED one's when its
    first page comes (or, holding none, at the end), a FILE one's at once."""

    out: BinaryIO
    segments: tuple[Segment, ...]
    tail: int = PAGE_SIZE  # the end of the data so far
    offsets: dict[int, int] = field(default_factory=dict)  # segment index -> its data
    mapping: dict[int, list[int]] = field(default_factory=dict)  # object id -> segment indexes
    rounds: bool = False  # the image's PRECOPIED segments get their pages from its rounds
    written: set[int] = field(default_factory=set)  # with rounds: pages the image stored

    def __post_init__(self) -> None:
        self.starts = [segment.start for segment in self.segments]
        for index, segment in enumerate(self.segments):
            if segment.contents is ContentsKind.PRECOPIED and not self.rounds:
                raise ImageError(
                    f"segment {segment.start:#x} is PRECOPIED: only a move's stream holds its pages"
                )
            if segment.file is not None:
                # The pages the process changed come later and are laid over these.
                check_identity(segment.file)
                self._copy_file(segment.file.path, segment, self._reserve(index))

    def write(self, address: int, data: bytes) -> None:
        # read_image has checked that the pages lie inside one STORED or FILE segment.
        index = bisect.bisect_right(self.starts, address) - 1
        self.put(self._reserve(index) + address - self.segments[index].start, data)
        if self.rounds:
            self.written.update(range(address, address + len(data), PAGE_SIZE))

    def write_round(self, address: int, data: bytes) -> None:
        """A round's pages: those inside a PRECOPIED segment the image did not store."""
        view = memoryview(data)
        for offset in range(0, len(data), PAGE_SIZE):
            page = address + offset
            index = bisect.bisect_right(self.starts, page) - 1
            if index < 0 or page in self.written:
                continue
            segment = self.segments[index]
            if segment.contents is ContentsKind.PRECOPIED and page < segment.end:
                place = self._reserve(index) + page - segment.start
                self.put(place, view[offset : offset + PAGE_SIZE])

    def object_mapped(self, found: GhostFile | MemfdObject | SharedAnonymous) -> None:
        """The segments sharing the pages of memory object `found` (the same device and
        inode) hold its bytes: zeros until its OBJECT_DATA come."""
        self.mapping[found.id] = [
            index
            for index, segment in enumerate(self.segments)
            if segment.shared
            and (os.makedev(segment.dev_major, segment.dev_minor), segment.inode)
            == (found.dev, found.ino)
        ]
        for index in self.mapping[found.id]:
            self._reserve(index)

    def object_data(self, chunk: ObjectData) -> None:
        """Bytes of a memory object, into every segment that maps them."""
        for index in self.mapping.get(chunk.id, ()):
            segment = self.segments[index]
            start = max(chunk.offset, segment.offset)
            end = min(chunk.offset + len(chunk.data), segment.offset + segment.size)
            if start < end:
                part = chunk.data[start - chunk.offset : end - chunk.offset]
                self.put(self.offsets[index] + start - segment.offset, part)

    def _reserve(self, index: int) -> int:
        if index not in self.offsets:
            self.offsets[index] = self.tail
            self.tail += self.segments[index].size
        return self.offsets[index]

    def put(self, offset: int, data: bytes | memoryview) -> None:
        self.out.seek(offset)
        self.out.write(data)

    def _copy_file(self, path: str, segment: Segment, offset: int) -> None:
        """The file's bytes under the segment; past the file's end, holes."""
        try:
            with open(path, "rb") as source:
                source.seek(segment.offset)
                for position in range(0, segment.size, COPY_CHUNK):
                    chunk = source.read(min(COPY_CHUNK, segment.size - position))
                    if not chunk:
                        break
                    self.put(offset + position, chunk)
        except OSError as exc:
            raise ImageError(f"cannot read {path}, mapped by the image: {exc.strerror}") from None

    def loads(self) -> list[_Load]:
        loads = []
        for index, segment in enumerate(self.segments):
            flags = sum(int(flag.value) for prot, flag in PERMISSIONS if prot & segment.prot)
            stored = segment.contents in (ContentsKind.STORED, ContentsKind.PRECOPIED)
            if index in self.offsets or (stored and segment.prot != Prot(0)):
                # Pages never stored are zeros, and read as such.
                loads.append(
                    _Load(segment.start, segment.size, flags, self._reserve(index), segment.size)
                )
            else:
                loads.append(_Load(segment.start, segment.size, flags))
        return loads


def write_core_file(
    records: Iterable[Record], path: Path, rounds: Callable[[], Iterable[Pages]] | None = None
) -> CoreResult:
    """Write the core of the image `records` to `path`, whole or not at all. `rounds()`:
    the pages of the pre-copy rounds before the image, if it has any, in their order."""
    directory = path.parent
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    except OSError as exc:
        raise HijackError(f"cannot write {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w+b") as out:
            result = write_core(records, out, rounds)
        os.chmod(temporary, 0o600)  # a core holds all the process's secrets
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return result


def write_core(
    records: Iterable[Record],
    out: BinaryIO,
    rounds: Callable[[], Iterable[Pages]] | None = None,
) -> CoreResult:
    """Write the core of a complete image's records to the seekable `out` (`rounds`: as
    write_core_file's)."""
    header: ImageHeader | None = None
    credentials: Credentials | None = None
    mm: MemoryStructure | None = None
    memory: _Memory | None = None
    threads: list[Thread] = []
    for record in records:
        if isinstance(record, ImageHeader):
            header = record
        elif isinstance(record, Credentials):
            credentials = record
        elif isinstance(record, MemoryStructure):
            mm = record
        elif isinstance(record, Segments):
            memory = _Memory(out, record.segments, rounds=rounds is not None)
        elif isinstance(record, Pages):
            assert memory is not None  # read_image: SEGMENTS comes before any PAGES
            memory.write(record.address, record.data)
        elif isinstance(record, GhostFile | MemfdObject | SharedAnonymous):
            assert memory is not None  # read_image: SEGMENTS comes before the objects
            memory.object_mapped(record)
        elif isinstance(record, ObjectData):
            assert memory is not None
            memory.object_data(record)
        elif isinstance(record, Thread):
            threads.append(record)
        elif isinstance(record, End):
            break
    if header is None or credentials is None or mm is None or memory is None or not threads:
        raise ImageError(
            "incomplete image: a HEADER, CREDENTIALS, MM, SEGMENTS or THREAD is missing"
        )
    # gdb takes the first thread for the one that dumped: the main thread.
    threads.sort(key=lambda thread: thread.tid != header.pid)
    if rounds is not None:
        for pages in rounds():
            memory.write_round(pages.address, pages.data)
    loads = memory.loads()
    if len(loads) + 1 >= PN_XNUM:
        raise ImageError(
            f"{len(loads)} memory segments: more than an ELF core without sections holds"
        )
    mapped = [segment for segment in memory.segments if _is_file_backed(segment)]
    notes = b"".join(
        _framed(note)
        for note in (
            *(note for thread in threads for note in _thread_notes(thread, header)),
            _prpsinfo(header, credentials),
            _note("CORE", ELF.Note.TYPE.CORE_AUXV, _auxv(mm)),
            _note("CORE", ELF.Note.TYPE.CORE_FILE, _mapped_files(mapped)),
        )
    )
    notes_offset = memory.tail
    phoff = _align(notes_offset + len(notes), 8)
    memory.put(notes_offset, notes)
    program_headers = [
        _program_header(ELF.Segment.TYPE.NOTE, 0, notes_offset, 0, len(notes), 0, 4),
        *(
            _program_header(
                ELF.Segment.TYPE.LOAD, load.flags, load.offset, load.vaddr, load.filesz,
                load.memsz, PAGE_SIZE,
            )
            for load in loads
        ),
    ]  # fmt: skip
    memory.put(phoff, b"".join(program_headers))
    memory.put(0, _elf_header(phoff, len(program_headers)))
    return CoreResult(
        pid=header.pid,
        threads=len(threads),
        loads=len(loads),
        mapped_files=len(mapped),
        core_bytes=phoff + len(program_headers) * PHDR_SIZE,
    )


def _thread_notes(thread: Thread, header: ImageHeader) -> Iterator[lief.ELF.Note]:
    status = _note("CORE", ELF.Note.TYPE.CORE_PRSTATUS, bytes(PRSTATUS_SIZE))
    assert isinstance(status, ELF.CorePrStatus)  # lief parses what it makes
    values = status.status
    values.pid, values.ppid, values.pgrp, values.sid = (
        thread.tid, header.ppid, header.pgid, header.sid,
    )  # fmt: skip
    values.sighold = thread.sigmask
    values.sigpend = _signal_bits(thread.pending)
    status.status = values
    for register in ELF.CorePrStatus.Registers.X86_64:
        status.set(register, getattr(thread.regs, register.name.lower()))
    yield status
    yield _note("CORE", ELF.Note.TYPE.CORE_FPREGSET, thread.xstate[:FXSAVE_SIZE])
    yield _note("LINUX", ELF.Note.TYPE.CORE_X86_XSTATE, thread.xstate)


def _prpsinfo(header: ImageHeader, credentials: Credentials) -> lief.ELF.Note:
    note = _note("CORE", ELF.Note.TYPE.CORE_PRPSINFO, bytes(PRPSINFO_SIZE))
    assert isinstance(note, ELF.CorePrPsInfo)
    info = note.info
    assert info is not None  # lief reads the zeros it was given
    # A dump reads a process stopped in its tracks: the kernel calls a dumping task R.
    info.sname = "R"
    info.uid, info.gid = credentials.uid, credentials.gid
    info.pid, info.ppid, info.pgrp, info.sid = header.pid, header.ppid, header.pgid, header.sid
    info.filename = header.comm.encode(errors="surrogateescape")[:15].decode(errors="replace")
    args = " ".join(header.argv).encode(errors="surrogateescape")[:79]
    info.args = args.decode(errors="replace")
    note.info = info
    return note


def _auxv(mm: MemoryStructure) -> bytes:
    return b"".join(struct.pack("<QQ", entry.a_type, entry.a_val) for entry in mm.auxv)


def _mapped_files(segments: list[Segment]) -> bytes:
    """NT_FILE: count, page size, (start, end, offset in pages) each, then the paths."""
    ranges = b"".join(
        struct.pack("<QQQ", segment.start, segment.end, segment.offset // PAGE_SIZE)
        for segment in segments
    )
    paths = b"".join(os.fsencode(segment.path) + b"\0" for segment in segments)
    return struct.pack("<QQ", len(segments), PAGE_SIZE) + ranges + paths


def _is_file_backed(segment: Segment) -> bool:
    return segment.inode != 0 and segment.path.startswith("/")


def _signal_bits(pending: tuple[bytes, ...]) -> int:
    bits = 0
    for siginfo in pending:
        (signo,) = struct.unpack_from("<i", siginfo)
        if 0 < signo <= 64:
            bits |= 1 << (signo - 1)
    return bits


def _note(name: str, kind: lief.ELF.Note.TYPE, description: bytes) -> lief.ELF.Note:
    note = ELF.Note.create(name, kind, list(description), "", *X86_64)
    if note is None:
        raise ImageError(f"lief could not make a {kind.name} note")
    return note


def _framed(note: lief.ELF.Note) -> bytes:
    name = note.name.encode() + b"\0"
    description = bytes(note.description)
    return (
        struct.pack("<III", len(name), len(description), note.original_type)
        + _padded(name)
        + _padded(description)
    )


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def _program_header(
    kind: lief.ELF.Segment.TYPE,
    flags: int,
    offset: int,
    vaddr: int,
    filesz: int,
    memsz: int,
    alignment: int,
) -> bytes:
    return struct.pack(
        "<IIQQQQQQ", int(kind.value), flags, offset, vaddr, 0, filesz, memsz, alignment
    )


def _elf_header(phoff: int, phnum: int) -> bytes:
    ident = b"\x7fELF" + bytes((2, 1, 1)) + bytes(9)  # ELFCLASS64, little endian, EV_CURRENT
    return ident + struct.pack(
        "<HHIQQQIHHHHHH",
        int(ELF.Header.FILE_TYPE.CORE.value),
        int(ELF.ARCH.X86_64.value),
        1,  # e_version
        0,  # e_entry
        phoff,
        0,  # e_shoff: no sections
        0,  # e_flags
        EHDR_SIZE,
        PHDR_SIZE,
        phnum,
        0,  # e_shentsize
        0,  # e_shnum
        0,  # e_shstrndx
    )
