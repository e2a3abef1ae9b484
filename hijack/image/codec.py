"""Writing and reading CRF images as a stream of checksummed sections.

    IMAGE     ::= SIGNATURE HEADER CREDENTIALS { THREAD_CREDENTIALS } RLIMITS MM SEGMENTS
                  FILES { OBJECT } { PAGES } THREAD { THREAD } SIGNALS CWD SETTINGS TIMERS END
    OBJECT    ::= an object record or OBJECT_DATA (as many as FILES counts)
    PAGES may be PAGE_REFERENCE sections too, in a tree stream's images, and
    SPLICED_PAGES, whose CRC covers TAG LENGTH and the address, not the data
    ROUND     ::= SIGNATURE ROUND SEGMENTS { PAGES } END     (a move's pre-copy round)
    SIGNATURE ::= "CRF\\0" VERSION:u32
    section   ::= TAG:4 LENGTH:u32 PAYLOAD:LENGTH CRC:u32
                  CRC = crc32(TAG LENGTH PAYLOAD)

Each section holds one record (hijack.image.records); docs/crf.md is the
byte-level spec. The stream is written and read strictly front to back, so it
works through pipes and sockets; the reader yields one record at a time and
holds at most one section (PAGES ≤ 8 MiB of data, others ≤ 16 MiB) in memory.

Public API:
    ImageWriter(stream)                   writes the signature at once
        .write(record)                    any record, in grammar order
        .write_pages(address, data)       stores the non-zero 4 KiB pages of data
        .write_spliced_pages(address, length, put)
                                          stores pages whose data `put` splices
                                          into the stream's descriptor itself
        .close(*, pages_untouched=0, pages_file=0) -> End
                                          writes END with the totals; flushes,
                                          does not close the stream
        .bytes_written                    bytes written so far
    read_image(stream, *, require_eof=True) -> Iterator[Record]
    read_round(stream) -> Iterator[Record]
                                          a pre-copy round (docs/crf.md, "Pre-copy
                                          rounds"), embedded in a move's stream;
                                          ImageWriter writes one when its first
                                          record is a Round
    recode(source, destination) -> End    decode then re-encode: same bytes
Every malformed image, and every attempt to write one, raises ImageError.
A writer that failed once (a refused record, a broken stream) refuses every
later call: what it already wrote is not a valid image.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol, cast

from zlib_ng.zlib_ng import crc32

from hijack.errors import ImageError
from hijack.image.fields import Cursor, StructCodec, struct_codec
from hijack.image.records import (
    BYTES_HERE,
    MAX_OBJECT_DATA,
    MAX_PAGES_DATA,
    MAX_SCATTERED_RUNS,
    PAGE_SIZE,
    ContentsKind,
    Credentials,
    Cwd,
    End,
    EpollObject,
    EventfdObject,
    FanotifyObject,
    FifoObject,
    FileLocks,
    Files,
    GhostFile,
    ImageHeader,
    InetSocket,
    InotifyObject,
    MemfdObject,
    MemoryObject,
    MemoryStructure,
    NetlinkSocket,
    ObjectData,
    PacketSocket,
    PageReference,
    Pages,
    PidfdObject,
    PingSocket,
    PipeObject,
    PosixMessageQueue,
    ProcessSettings,
    PtyPair,
    RawSocket,
    Record,
    Rlimits,
    Round,
    ScatteredPages,
    Segments,
    SharedAnonymous,
    SignalfdObject,
    SignalState,
    SocketOptions,
    SplicedPages,
    SysvMessageQueue,
    SysvSemaphores,
    SysvSharedMemory,
    TcpConnection,
    TerminalObject,
    Thread,
    ThreadCredentials,
    TimerfdObject,
    Timers,
    Tree,
    UdpSocket,
    UnixSocket,
)

MAGIC = b"CRF\0"
FORMAT_VERSION = 10
# Version 7 added SCATTERED_PAGES and nothing else, version 8 THREAD_CREDENTIALS and nothing
# else: a version 6 or 7 image is a version 8 one. Version 9 added TcpConnection.unsent_bytes,
# at its end: an older image's connections are read without it (_BEFORE_9). Version 10 added
# `bytes_in` at the end of GhostFile, MemfdObject and SharedAnonymous (_BEFORE_10).
READABLE_VERSIONS = (6, 7, 8, 9, 10)
MAX_METADATA = 16 * 1024 * 1024  # payload limit of every section but PAGES

BytesLike = bytes | bytearray | memoryview

_SIGNATURE = struct.Struct("<4sI")
_SECTION_HEAD = struct.Struct("<4sI")
_CRC = struct.Struct("<I")
_ADDRESS = struct.Struct("<Q")
_ID_OFFSET = struct.Struct("<QQ")
_RUN_COUNT = struct.Struct("<II")  # a SCATTERED_PAGES section's runs, and padding
_RUN = struct.Struct("<QQ")  # a run: address, length
_ZERO_PAGE = bytes(PAGE_SIZE)
# Zero detection scans a copy of this many bytes at a time: bytearray.startswith
# is a memcmp, while comparing memoryviews goes element by element (5x slower).
_SCAN_WINDOW = 1024 * 1024


class SectionKind(enum.Enum):
    """Section tags: four ASCII bytes, readable in a hex dump."""

    HEADER = b"HEAD"
    ROUND = b"RND_"
    TREE = b"TREE"
    CREDENTIALS = b"CRED"
    THREAD_CREDENTIALS = b"TCRD"
    RLIMITS = b"RLIM"
    MM = b"MMST"
    SEGMENTS = b"SEGS"
    PAGES = b"PAGE"
    PAGE_REFERENCE = b"PREF"
    SPLICED_PAGES = b"SPLC"
    SCATTERED_PAGES = b"SCAT"
    THREAD = b"THRD"
    SIGNALS = b"SIGS"
    FILES = b"FDS_"
    TERMINAL_OBJECT = b"TTYO"
    EPOLL_OBJECT = b"EPOL"
    EVENTFD_OBJECT = b"EVFD"
    TIMERFD_OBJECT = b"TMFD"
    SIGNALFD_OBJECT = b"SGFD"
    INOTIFY_OBJECT = b"INFY"
    PIDFD_OBJECT = b"PIDF"
    INET_SOCKET = b"INET"
    TCP_CONNECTION = b"TCPC"
    UDP_SOCKET = b"UDPS"
    SOCKET_OPTIONS = b"SOPT"
    NETLINK_SOCKET = b"NLNK"
    RAW_SOCKET = b"RAWS"
    PING_SOCKET = b"PING"
    PACKET_SOCKET = b"PCKT"
    FANOTIFY_OBJECT = b"FANO"
    FILE_LOCKS = b"LOCK"
    PTY_PAIR = b"PTYP"
    PIPE_OBJECT = b"PIPE"
    FIFO_OBJECT = b"FIFO"
    SYSV_SHARED_MEMORY = b"SHM_"
    SYSV_SEMAPHORES = b"SEM_"
    SYSV_MESSAGE_QUEUE = b"MSQ_"
    POSIX_MESSAGE_QUEUE = b"MQUE"
    UNIX_SOCKET = b"UNIX"
    GHOST_FILE = b"GHST"
    MEMFD = b"MEMF"
    SHARED_ANONYMOUS = b"SHMA"
    OBJECT_DATA = b"ODAT"
    CWD = b"CWD_"
    SETTINGS = b"PSET"
    TIMERS = b"TIMR"
    END = b"END_"


class _SectionCodec(Protocol):
    record_type: type[Any]
    max_payload: int
    is_object: bool  # one of the object sections after FILES
    covers_data: bool  # whether the CRC covers the raw data after the fields

    def head_length(self, length: int) -> int:
        """How many of a payload's `length` bytes are fields; the rest is raw data."""

    def encode(self, record: Any) -> list[BytesLike]: ...

    def decode(self, head: bytes, tail: bytes) -> Record: ...


class _StructSection:
    """A section whose whole payload is one record's fields."""

    max_payload = MAX_METADATA
    covers_data = True

    def __init__(
        self, record_type: type[Any], *, is_object: bool = False, without: str = ""
    ) -> None:
        self.record_type = record_type
        self.is_object = is_object
        self._codec = struct_codec(record_type)
        if without:  # a field an older version had not (at the end, with a default)
            kept = [(name, codec) for name, codec in self._codec.fields if name != without]
            self._codec = StructCodec(record_type, kept)

    def head_length(self, length: int) -> int:
        return length

    def encode(self, record: Any) -> list[BytesLike]:
        out = bytearray()
        self._codec.encode(record, out)
        return [out]

    def decode(self, head: bytes, tail: bytes) -> Record:
        cursor = Cursor(head)
        record: Record = self._codec.decode(cursor)
        if cursor.remaining:
            raise ImageError(f"{cursor.remaining} bytes left over after the record")
        return record


class _PagesSection:
    """address:u64 then page data to the end of the payload (no copy either way)."""

    record_type: type[Pages] = Pages
    max_payload = _ADDRESS.size + MAX_PAGES_DATA
    is_object = False
    covers_data = True

    def head_length(self, length: int) -> int:
        return min(length, _ADDRESS.size)

    def encode(self, record: Pages) -> list[BytesLike]:
        return self.parts(record.address, record.data)

    def parts(self, address: int, data: BytesLike) -> list[BytesLike]:
        return [_ADDRESS.pack(address), data]

    def decode(self, head: bytes, tail: bytes) -> Record:
        if len(head) < _ADDRESS.size:
            raise ImageError("too short to hold an address")
        (address,) = _ADDRESS.unpack(head)
        return self.record_type(address=address, data=tail)


class _SplicedPagesSection(_PagesSection):
    """PAGES whose data the writer never held (put into its stream by splice(2)): the CRC
    covers the head and the address only."""

    record_type = SplicedPages
    covers_data = False


class _ScatteredPagesSection:
    """count:u32 pad:u32, `count` runs (address:u64 length:u64), then the runs' data back
    to back. The table's size is in the payload itself: the whole payload is read as fields."""

    record_type = ScatteredPages
    max_payload = _RUN_COUNT.size + MAX_SCATTERED_RUNS * _RUN.size + MAX_PAGES_DATA
    is_object = False
    covers_data = True

    def head_length(self, length: int) -> int:
        return length

    def encode(self, record: ScatteredPages) -> list[BytesLike]:
        return self.parts(record.runs, record.data)

    def parts(self, runs: Sequence[tuple[int, int]], data: BytesLike) -> list[BytesLike]:
        table = bytearray(_RUN_COUNT.pack(len(runs), 0))
        for address, length in runs:
            table += _RUN.pack(address, length)
        return [table, data]

    def decode(self, head: bytes, tail: bytes) -> Record:
        if len(head) < _RUN_COUNT.size:
            raise ImageError("too short to hold a count of runs")
        count, _ = _RUN_COUNT.unpack_from(head)
        data_at = _RUN_COUNT.size + count * _RUN.size
        if len(head) < data_at:
            raise ImageError(f"too short to hold {count} runs")
        runs = tuple(_RUN.iter_unpack(head[_RUN_COUNT.size : data_at]))
        return ScatteredPages(runs=runs, data=head[data_at:] + tail)


class _ObjectDataSection:
    """id:u64 offset:u64 then the data to the end of the payload, as PAGES."""

    record_type = ObjectData
    max_payload = _ID_OFFSET.size + MAX_OBJECT_DATA
    is_object = True
    covers_data = True

    def head_length(self, length: int) -> int:
        return min(length, _ID_OFFSET.size)

    def encode(self, record: ObjectData) -> list[BytesLike]:
        return [_ID_OFFSET.pack(record.id, record.offset), record.data]

    def decode(self, head: bytes, tail: bytes) -> Record:
        if len(head) < _ID_OFFSET.size:
            raise ImageError("too short to hold an id and an offset")
        object_id, offset = _ID_OFFSET.unpack(head)
        return ObjectData(id=object_id, offset=offset, data=tail)


_PAGES = _PagesSection()
_SPLICED_PAGES = _SplicedPagesSection()
_SCATTERED_PAGES = _ScatteredPagesSection()
_SECTIONS: dict[SectionKind, _SectionCodec] = {
    SectionKind.HEADER: _StructSection(ImageHeader),
    SectionKind.ROUND: _StructSection(Round),
    SectionKind.TREE: _StructSection(Tree),
    SectionKind.CREDENTIALS: _StructSection(Credentials),
    SectionKind.THREAD_CREDENTIALS: _StructSection(ThreadCredentials),
    SectionKind.RLIMITS: _StructSection(Rlimits),
    SectionKind.MM: _StructSection(MemoryStructure),
    SectionKind.SEGMENTS: _StructSection(Segments),
    SectionKind.PAGES: _PAGES,
    SectionKind.PAGE_REFERENCE: _StructSection(PageReference),
    SectionKind.SPLICED_PAGES: _SPLICED_PAGES,
    SectionKind.SCATTERED_PAGES: _SCATTERED_PAGES,
    SectionKind.THREAD: _StructSection(Thread),
    SectionKind.SIGNALS: _StructSection(SignalState),
    SectionKind.FILES: _StructSection(Files),
    SectionKind.TERMINAL_OBJECT: _StructSection(TerminalObject, is_object=True),
    SectionKind.EPOLL_OBJECT: _StructSection(EpollObject, is_object=True),
    SectionKind.EVENTFD_OBJECT: _StructSection(EventfdObject, is_object=True),
    SectionKind.TIMERFD_OBJECT: _StructSection(TimerfdObject, is_object=True),
    SectionKind.SIGNALFD_OBJECT: _StructSection(SignalfdObject, is_object=True),
    SectionKind.INOTIFY_OBJECT: _StructSection(InotifyObject, is_object=True),
    SectionKind.PIDFD_OBJECT: _StructSection(PidfdObject, is_object=True),
    SectionKind.INET_SOCKET: _StructSection(InetSocket, is_object=True),
    SectionKind.TCP_CONNECTION: _StructSection(TcpConnection, is_object=True),
    SectionKind.UDP_SOCKET: _StructSection(UdpSocket, is_object=True),
    SectionKind.SOCKET_OPTIONS: _StructSection(SocketOptions, is_object=True),
    SectionKind.NETLINK_SOCKET: _StructSection(NetlinkSocket, is_object=True),
    SectionKind.RAW_SOCKET: _StructSection(RawSocket, is_object=True),
    SectionKind.PING_SOCKET: _StructSection(PingSocket, is_object=True),
    SectionKind.PACKET_SOCKET: _StructSection(PacketSocket, is_object=True),
    SectionKind.FANOTIFY_OBJECT: _StructSection(FanotifyObject, is_object=True),
    SectionKind.FILE_LOCKS: _StructSection(FileLocks, is_object=True),
    SectionKind.PTY_PAIR: _StructSection(PtyPair, is_object=True),
    SectionKind.PIPE_OBJECT: _StructSection(PipeObject, is_object=True),
    SectionKind.FIFO_OBJECT: _StructSection(FifoObject, is_object=True),
    SectionKind.SYSV_SHARED_MEMORY: _StructSection(SysvSharedMemory, is_object=True),
    SectionKind.SYSV_SEMAPHORES: _StructSection(SysvSemaphores, is_object=True),
    SectionKind.SYSV_MESSAGE_QUEUE: _StructSection(SysvMessageQueue, is_object=True),
    SectionKind.POSIX_MESSAGE_QUEUE: _StructSection(PosixMessageQueue, is_object=True),
    SectionKind.UNIX_SOCKET: _StructSection(UnixSocket, is_object=True),
    SectionKind.GHOST_FILE: _StructSection(GhostFile, is_object=True),
    SectionKind.MEMFD: _StructSection(MemfdObject, is_object=True),
    SectionKind.SHARED_ANONYMOUS: _StructSection(SharedAnonymous, is_object=True),
    SectionKind.OBJECT_DATA: _ObjectDataSection(),
    SectionKind.CWD: _StructSection(Cwd),
    SectionKind.SETTINGS: _StructSection(ProcessSettings),
    SectionKind.TIMERS: _StructSection(Timers),
    SectionKind.END: _StructSection(End),
}
# How an image older than version 9 lays out what changed since.
_BEFORE_9: dict[SectionKind, _SectionCodec] = {
    SectionKind.TCP_CONNECTION: _StructSection(
        TcpConnection, is_object=True, without="unsent_bytes"
    ),
}
# How an image older than version 10 lays out what changed since.
_BEFORE_10: dict[SectionKind, _SectionCodec] = {
    kind: _StructSection(record_type, is_object=True, without="bytes_in")
    for kind, record_type in (
        (SectionKind.GHOST_FILE, GhostFile),
        (SectionKind.MEMFD, MemfdObject),
        (SectionKind.SHARED_ANONYMOUS, SharedAnonymous),
    )
}
_KIND_OF: dict[type[Any], SectionKind] = {
    codec.record_type: kind for kind, codec in _SECTIONS.items()
}
_KIND_OF_TAG: dict[bytes, SectionKind] = {kind.value: kind for kind in SectionKind}
OBJECT_SECTIONS = frozenset(kind for kind, codec in _SECTIONS.items() if codec.is_object)
_OBJECT_RECORDS: tuple[type[Any], ...] = tuple(
    _SECTIONS[kind].record_type for kind in OBJECT_SECTIONS if kind is not SectionKind.OBJECT_DATA
)
# END has fixed-size fields, so its section always takes this many bytes.
END_SECTION_SIZE = _SECTION_HEAD.size + struct_codec(End).min_size + _CRC.size


@dataclass(frozen=True)
class _Step:
    kind: SectionKind | None  # None: any of the OBJECT_SECTIONS
    least: int  # how many times it must occur
    many: bool  # whether it may repeat
    also: tuple[SectionKind, ...] = ()  # other kinds the step takes, in any mix with `kind`

    def admits(self, kind: SectionKind) -> bool:
        return (
            kind is self.kind
            or kind in self.also
            or (self.kind is None and kind in OBJECT_SECTIONS)
        )

    @property
    def name(self) -> str:
        name = "OBJECT" if self.kind is None else self.kind.name
        return " or ".join([name, *(kind.name for kind in self.also)])


_IMAGE_GRAMMAR = (
    _Step(SectionKind.HEADER, 1, False),
    _Step(SectionKind.CREDENTIALS, 1, False),
    _Step(SectionKind.THREAD_CREDENTIALS, 0, True),
    _Step(SectionKind.RLIMITS, 1, False),
    _Step(SectionKind.MM, 1, False),
    _Step(SectionKind.SEGMENTS, 1, False),
    _Step(SectionKind.FILES, 1, False),
    _Step(None, 0, True),
    _Step(
        SectionKind.PAGES,
        0,
        True,
        also=(
            SectionKind.PAGE_REFERENCE,
            SectionKind.SPLICED_PAGES,
            SectionKind.SCATTERED_PAGES,
        ),
    ),
    _Step(SectionKind.THREAD, 1, True),
    _Step(SectionKind.SIGNALS, 1, False),
    _Step(SectionKind.CWD, 1, False),
    _Step(SectionKind.SETTINGS, 1, False),
    _Step(SectionKind.TIMERS, 1, False),
    _Step(SectionKind.END, 1, False),
)
_ROUND_GRAMMAR = (
    _Step(SectionKind.ROUND, 1, False),
    _Step(SectionKind.SEGMENTS, 1, False),
    _Step(SectionKind.PAGES, 0, True),
    _Step(SectionKind.END, 1, False),
)
_TREE_GRAMMAR = (
    _Step(SectionKind.TREE, 1, False),
    _Step(SectionKind.END, 1, False),
)
_OPENING_GRAMMARS = {SectionKind.ROUND: _ROUND_GRAMMAR, SectionKind.TREE: _TREE_GRAMMAR}


class _ImageChecks:
    """What holds across sections; the writer and the reader apply the same checks,
    so the writer cannot produce an image the reader refuses."""

    def __init__(
        self,
        grammar: tuple[_Step, ...] | None = _IMAGE_GRAMMAR,
        referable: frozenset[int] | None = None,
    ) -> None:
        # None: an image or a round, whichever the first section opens (the writer).
        self._grammar = grammar
        # The members a PAGE_REFERENCE may name: those whose images came before it in its
        # tree stream; None: any (a member's image read alone, whose stream is not known).
        self._referable = referable
        self.pages_referenced = 0
        self._step = 0
        self._count = 0  # occurrences of the grammar's step _step so far
        self.records = 0  # sections before END
        self.pages_stored = 0
        self._stored: list[tuple[int, int]] = []  # segments that may hold pages, ascending
        self._segment = 0  # index in _stored of the segment pages reached
        self._pages_floor = 0  # pages must start at or above this address
        self._tids: set[int] = set()
        self._credited: set[int] = set()  # the threads THREAD_CREDENTIALS named
        self._objects_due: int | None = None  # object sections FILES announced
        self._objects_closed = False  # a section after them came: every check was made
        self._objects_seen = 0
        self._object_refs: set[int] = set()  # object ids the descriptors refer to
        self._data_floor: dict[int, int] = {}  # object id -> where its next ObjectData may start
        self._bytes_elsewhere: set[int] = set()  # objects whose bytes a member before holds

    def expected(self) -> str:
        """The sections that may come next, for messages: "THREAD or SIGNALS"."""
        if self._grammar is None:
            return "HEADER, ROUND or TREE"
        due = self._objects_due
        if due is not None and not self._objects_closed and self._objects_seen < due:
            return f"OBJECT ({due - self._objects_seen} more of those FILES counts)"
        kinds: list[str] = []
        step, count = self._step, self._count
        while step < len(self._grammar):
            rule = self._grammar[step]
            objects_done = (
                rule.kind is None
                and self._objects_due is not None
                and self._objects_seen >= self._objects_due
            )
            if (count == 0 or rule.many) and not objects_done:
                kinds.append(rule.name)
            if count < rule.least:
                break
            step, count = step + 1, 0
        return " or ".join(kinds) or "nothing (END was the last section)"

    def admit(self, kind: SectionKind) -> None:
        """Accept `kind` as the next section, or raise: it is out of place."""
        if self._grammar is None:
            self._grammar = _OPENING_GRAMMARS.get(kind, _IMAGE_GRAMMAR)
        objects_end = self._objects_due is not None and not self._objects_closed
        if objects_end and kind not in OBJECT_SECTIONS:
            self._close_objects()
        where = self._step, self._count
        while self._step < len(self._grammar):
            rule = self._grammar[self._step]
            if rule.admits(kind) and (self._count == 0 or rule.many):
                self._count += 1
                if kind is not SectionKind.END:
                    self.records += 1
                return
            if self._count < rule.least:
                break
            self._step, self._count = self._step + 1, 0
        self._step, self._count = where  # the message names what was due there
        raise ImageError(f"out of place, expected {self.expected()}")

    def check(self, record: Record, offset: int) -> None:
        if isinstance(record, Segments):
            self._stored = [
                (segment.start, segment.end)
                for segment in record.segments
                if segment.contents is not ContentsKind.NONE
            ]
        elif isinstance(record, Pages):
            self.check_pages(record.address, len(record.data))
        elif isinstance(record, ScatteredPages):
            for address, length in record.runs:
                self.check_pages(address, length)
        elif isinstance(record, PageReference):
            if self._referable is not None and record.pid not in self._referable:
                raise ImageError(
                    f"pages at {record.address:#x} refer to process {record.pid}, not a member"
                    " whose image came before this one in a tree stream"
                )
            self.check_pages(record.address, record.size, stored=False)
        elif isinstance(record, ThreadCredentials):
            if record.tid in self._credited:
                raise ImageError(f"credentials of thread {record.tid} appear twice")
            self._credited.add(record.tid)
        elif isinstance(record, Thread):
            if record.tid in self._tids:
                raise ImageError(f"thread {record.tid} appears twice")
            self._tids.add(record.tid)
        elif isinstance(record, Files):
            self._objects_due = record.objects
            self._object_refs = {d.object_id for d in record.descriptors if d.object_id}
        elif isinstance(record, ObjectData):
            self._count_object()
            if record.id in self._bytes_elsewhere:
                raise ImageError(
                    f"data of object {record.id}, whose record says another member holds it"
                )
            floor = self._data_floor.get(record.id)
            if floor is None:
                raise ImageError(
                    f"data of object {record.id}, which no object record before it has"
                )
            if record.offset < floor:
                raise ImageError(
                    f"data of object {record.id} at offset {record.offset} overlaps or precedes"
                    " the data before it"
                )
            self._data_floor[record.id] = record.offset + len(record.data)
        elif isinstance(record, _OBJECT_RECORDS):
            self._count_object()
            if record.id in self._data_floor:
                raise ImageError(f"object {record.id} appears twice")
            self._data_floor[record.id] = 0
            if isinstance(record, MemoryObject) and record.bytes_in != BYTES_HERE:
                if self._referable is not None and record.bytes_in not in self._referable:
                    raise ImageError(
                        f"the bytes of object {record.id} are said to be in process"
                        f" {record.bytes_in}, not a member whose image came before this one"
                        " in a tree stream"
                    )
                self._bytes_elsewhere.add(record.id)
        elif isinstance(record, End):
            if self._credited - self._tids:
                raise ImageError(
                    f"credentials of threads {sorted(self._credited - self._tids)}, which the"
                    " image does not have"
                )
            self._check_totals(record, offset)

    def _count_object(self) -> None:
        self._objects_seen += 1
        if self._objects_due is None or self._objects_seen > self._objects_due:
            raise ImageError(f"more object sections than the {self._objects_due} FILES counts")

    def _close_objects(self) -> None:
        """The object sections have ended: as many as FILES said, every reference resolved."""
        if self._objects_seen != self._objects_due:
            raise ImageError(
                f"FILES counts {self._objects_due} object sections, {self._objects_seen} follow"
            )
        missing = sorted(self._object_refs - self._data_floor.keys())
        if missing:
            raise ImageError(f"descriptors refer to object {missing[0]}, which is not in the image")
        self._objects_closed = True

    def check_pages(self, address: int, size: int, *, stored: bool = True) -> None:
        """PAGES (`stored`) or a PAGE_REFERENCE at `address`, `size` bytes."""
        if address < self._pages_floor:
            raise ImageError(f"pages at {address:#x} overlap or precede the pages before them")
        while self._segment < len(self._stored) and self._stored[self._segment][1] <= address:
            self._segment += 1
        inside = self._segment < len(self._stored) and (
            self._stored[self._segment][0] <= address
            and address + size <= self._stored[self._segment][1]
        )
        if not inside:
            raise ImageError(
                f"pages {address:#x}-{address + size:#x} are not inside one segment that holds"
                " pages (STORED, FILE or PRECOPIED)"
            )
        self._pages_floor = address + size
        if stored:
            self.pages_stored += size // PAGE_SIZE
        else:
            self.pages_referenced += size // PAGE_SIZE

    def _check_totals(self, end: End, offset: int) -> None:
        actual = {"records": self.records, "image_bytes": offset, "pages_stored": self.pages_stored}
        for name, value in actual.items():
            if getattr(end, name) != value:
                raise ImageError(
                    f"END says {name} is {getattr(end, name)}, the image holds {value}"
                )


def _whole_runs(length: int) -> Iterator[tuple[int, int]]:
    """Byte ranges [start, stop) covering `length` bytes, each ≤ MAX_PAGES_DATA."""
    for start in range(0, length, MAX_PAGES_DATA):
        yield start, min(length, start + MAX_PAGES_DATA)


def _nonzero_runs(view: memoryview) -> Iterator[tuple[int, int]]:
    """Byte ranges [start, stop) of the non-zero pages of `view`, each ≤ MAX_PAGES_DATA."""
    run_start = -1
    # One window reused: a fresh bytes object per window is a fresh mapping,
    # whose pages fault in one by one (that cost more than the scan itself).
    window = bytearray(min(_SCAN_WINDOW, len(view)))
    for window_start in range(0, len(view), _SCAN_WINDOW):
        length = min(_SCAN_WINDOW, len(view) - window_start)
        window[:length] = view[window_start : window_start + length]
        window_end = window_start + length
        if window.find(_ZERO_PAGE, 0, length) < 0:
            # No zero page anywhere in it (find skips a page at each non-zero
            # byte: a quarter of the page-by-page scan's time): all one run.
            run_start = window_start if run_start < 0 else run_start
            while run_start + MAX_PAGES_DATA < window_end:
                yield run_start, run_start + MAX_PAGES_DATA
                run_start += MAX_PAGES_DATA
            continue
        for page in range(0, length, PAGE_SIZE):
            offset = window_start + page
            if window.startswith(_ZERO_PAGE, page):
                if run_start >= 0:
                    yield run_start, offset
                    run_start = -1
            elif run_start < 0:
                run_start = offset
            elif offset - run_start == MAX_PAGES_DATA:
                yield run_start, offset
                run_start = offset
    if run_start >= 0:
        yield run_start, len(view)


class ImageWriter:
    """Writes a CRF image to `stream` front to back; see the module docstring."""

    def __init__(self, stream: BinaryIO, *, referable: frozenset[int] | None = None) -> None:
        """`referable`: the members a PageReference may name (a tree stream's images
        written before this one); None: any."""
        self._stream = stream
        self.bytes_written = 0
        self._checks = _ImageChecks(grammar=None, referable=referable)
        self._pages_zero = 0
        self._failure: str | None = None
        with self._failing_for_good():
            self._put(_SIGNATURE.pack(MAGIC, FORMAT_VERSION))

    def write(self, record: Record) -> None:
        """Write one record as the next section; END via close() unless recoding."""
        with self._failing_for_good():
            kind = _KIND_OF[type(record)]
            check = functools.partial(self._checks.check, record, self.bytes_written)
            self._send(kind, _SECTIONS[kind].encode(record), check)

    def write_pages(self, address: int, data: BytesLike, *, keep_zero_pages: bool = False) -> None:
        """Store the pages of [address, address + len(data)) that are not all zero.

        `data` is any page-multiple length; runs of non-zero pages become PAGES
        sections of at most 8 MiB, written straight from `data` without copies.
        Each run must lie inside one STORED, FILE or PRECOPIED segment, above any pages
        written before: in practice, one call per segment (or part of one).
        With `keep_zero_pages`, zero pages are stored too: a file-backed
        segment is restored from its file, where a page left out is not zero.
        """
        with self._failing_for_good():
            view = memoryview(data).cast("B")
            if address % PAGE_SIZE or len(view) % PAGE_SIZE:
                raise ImageError(
                    f"cannot store pages at {address:#x} ({len(view)} bytes): not whole pages"
                )
            stored = 0
            runs = _whole_runs(len(view)) if keep_zero_pages else _nonzero_runs(view)
            for start, stop in runs:
                run = _PAGES.parts(address + start, view[start:stop])
                check = functools.partial(self._checks.check_pages, address + start, stop - start)
                self._send(SectionKind.PAGES, run, check)
                stored += stop - start
            self._pages_zero += (len(view) - stored) // PAGE_SIZE

    def write_spliced_pages(self, address: int, length: int, put: Callable[[int], int]) -> None:
        """Store the `length` bytes of pages at `address` (at most 8 MiB, inside one
        segment, like write_pages') as one SPLICED_PAGES section whose data `put(length)`
        writes into the stream's descriptor itself, after the writer flushed the stream
        (splice(2) from a pipe the process put its pages in: the writer never sees the
        bytes, so zero pages are stored too and the CRC does not cover the data).
        `put` returns how many bytes it wrote; any other count than `length` fails."""
        with self._failing_for_good():
            if address % PAGE_SIZE or length % PAGE_SIZE:
                raise ImageError(
                    f"cannot store pages at {address:#x} ({length} bytes): not whole pages"
                )
            fields = _ADDRESS.pack(address)
            check = functools.partial(self._checks.check_pages, address, length)
            head = self._admit(SectionKind.SPLICED_PAGES, len(fields) + length, check)
            self._put(head)
            self._put(fields)
            self._stream.flush()
            moved = put(length)
            self.bytes_written += moved
            if moved != length:
                raise ImageError(
                    f"cannot write section SPLICED_PAGES: spliced {moved} of {length} bytes"
                )
            self._put(_CRC.pack(crc32(fields, crc32(head))))

    def write_scattered_pages(self, runs: Sequence[tuple[int, int]], data: BytesLike) -> None:
        """Store the pages of `runs` ((address, length), ascending, apart, each inside a
        segment that holds pages, above any pages written before), their bytes `data`
        back to back, as one SCATTERED_PAGES section; zero pages too. At most
        MAX_SCATTERED_RUNS runs and MAX_PAGES_DATA bytes."""
        with self._failing_for_good():
            view = memoryview(data).cast("B")

            def check() -> None:
                ScatteredPages.check_runs(runs, len(view))
                for address, length in runs:
                    self._checks.check_pages(address, length)

            self._send(SectionKind.SCATTERED_PAGES, _SCATTERED_PAGES.parts(runs, view), check)

    def close(self, *, pages_untouched: int = 0, pages_file: int = 0) -> End:
        """Write END with the totals (the two counts come from the dumper) and flush."""
        end = End(
            records=self._checks.records,
            image_bytes=self.bytes_written,
            pages_stored=self._checks.pages_stored,
            pages_zero=self._pages_zero,
            pages_untouched=pages_untouched,
            pages_file=pages_file,
        )
        self.write(end)
        with self._failing_for_good():
            self._stream.flush()
        return end

    @contextlib.contextmanager
    def _failing_for_good(self) -> Iterator[None]:
        """Refuse to go on after a failure: the bytes already out may be a partial
        section, and the cross-section checks may have counted what was refused."""
        if self._failure is not None:
            raise ImageError(f"cannot write: an earlier write failed ({self._failure})")
        try:
            yield
        except BaseException as error:
            self._failure = str(error) or type(error).__name__
            raise

    def _send(
        self, kind: SectionKind, parts: Sequence[BytesLike], check: Callable[[], None]
    ) -> None:
        """Check a section (`check` applies the cross-section rules), then write it."""
        head = self._admit(kind, sum(len(part) for part in parts), check)
        crc = crc32(head)
        # Fields, then data: a section that does not cover its data has one part of each.
        for part in parts if _SECTIONS[kind].covers_data else parts[:1]:
            crc = crc32(part, crc)
        for piece in (head, *parts, _CRC.pack(crc)):
            self._put(piece)

    def _admit(self, kind: SectionKind, length: int, check: Callable[[], None]) -> bytes:
        """Check a section of `length` bytes of payload; return its head."""
        if length > _SECTIONS[kind].max_payload:
            raise ImageError(
                f"cannot write section {kind.name}: {length} bytes exceed the limit of "
                f"{_SECTIONS[kind].max_payload}"
            )
        try:
            self._checks.admit(kind)
            check()
        except ImageError as error:
            raise ImageError(f"cannot write section {kind.name}: {error.message}") from None
        return _SECTION_HEAD.pack(kind.value, length)

    def _put(self, data: BytesLike) -> None:
        view = memoryview(data)
        while view:
            # A raw (unbuffered) stream may take part of the data, like write(2).
            written = self._stream.write(view)
            if not written:
                raise ImageError("cannot write the image: the output stream accepted no bytes")
            view = view[written:]
        self.bytes_written += len(data)


def read_image(
    stream: BinaryIO, *, require_eof: bool = True, scattered: bool = False
) -> Iterator[Record]:
    """Yield the records of the CRF image on `stream`, checking everything on the way.

    The image may be a tree's member's, read alone: its PageReferences, if any, name
    members read_image cannot check (read_stream does).

    Records come one at a time, as their sections arrive, so a restorer can act
    on each before the next is read. With `require_eof` (the default) the image
    must be the whole stream; pass False when it is embedded in a longer one
    (a move connection): reading then stops at the last byte of END.
    A SCATTERED_PAGES section comes as one Pages record per run; as it is (a
    ScatteredPages) with `scattered` (recode: the same sections again).
    """
    return _read_records(stream, _IMAGE_GRAMMAR, require_eof=require_eof, scattered=scattered)


def read_round(stream: BinaryIO) -> Iterator[Record]:
    """Yield the records of the pre-copy round on `stream` (ROUND, SEGMENTS, PAGES..., END),
    checked as read_image checks an image; reading stops right after END."""
    return _read_records(stream, _ROUND_GRAMMAR, require_eof=False)


class Lookahead:
    """A stream whose first bytes were looked at (next_is_round) and are read again:
    read() alone, as the readers here use it."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.ahead = b""

    def read(self, size: int = -1) -> bytes:
        if not self.ahead:
            return self.stream.read(size)
        if size < 0:
            data, self.ahead = self.ahead + self.stream.read(), b""
            return data
        data, self.ahead = self.ahead[:size], self.ahead[size:]
        return data


def next_is_round(stream: BinaryIO) -> tuple[BinaryIO, bool]:
    """Whether the next opening on `stream` is a ROUND (a pre-copy round, docs/crf.md §7a,
    as a snapshot dump's file holds before its IMAGE), and the stream to read it from
    (the bytes looked at come again). At the end of the stream: False."""
    ahead = stream if isinstance(stream, Lookahead) else Lookahead(stream)
    wanted = _SIGNATURE.size + 4
    head = ahead.ahead
    while len(head) < wanted:
        chunk = ahead.stream.read(wanted - len(head))
        if not chunk:
            break
        head += chunk
    ahead.ahead = head
    looks = (
        head[: len(MAGIC)] == MAGIC and head[_SIGNATURE.size : wanted] == SectionKind.ROUND.value
    )
    return cast(BinaryIO, ahead), looks


def skip_rounds(stream: BinaryIO) -> tuple[BinaryIO, int]:
    """Read (checking them) the pre-copy rounds at the head of `stream`, if any: the stream
    to read the IMAGE after them from, and how many there were."""
    stream, is_round = next_is_round(stream)
    count = 0
    while is_round:
        for _ in read_round(stream):
            pass
        count += 1
        stream, is_round = next_is_round(stream)
    return stream, count


def round_pages(stream: BinaryIO) -> Iterator[Pages]:
    """The PAGES of the pre-copy rounds at the head of `stream`, round after round (a later
    page overrides an earlier one); stops before the IMAGE."""
    stream, is_round = next_is_round(stream)
    while is_round:
        for record in read_round(stream):
            if isinstance(record, Pages):
                yield record
        stream, is_round = next_is_round(stream)


def read_stream(stream: BinaryIO, *, scattered: bool = False) -> Iterator[Record]:
    """Yield the records of the image or the tree stream on `stream` (docs/crf.md §7b).

    A tree stream yields its TREE and END, then the records of each member's
    IMAGE (each ending with its END), which must end the stream. `scattered`: as
    read_image's.
    """
    # A plain image refers to no other: PAGE_REFERENCE only in a tree's images.
    records = _read_records(
        stream, None, require_eof=False, referable=frozenset(), scattered=scattered
    )
    first = next(records)
    yield first
    if not isinstance(first, Tree):
        yield from records
        if stream.read(1):
            raise ImageError("unexpected data after END")
        return
    yield from records
    imaged = first.imaged
    for index, member in enumerate(imaged):
        last = index == len(imaged) - 1
        missing = f"the tree stream ends after {index} of its {len(imaged)} images"
        before = frozenset(m.pid for m in imaged[:index])
        images = _read_records(
            stream,
            _IMAGE_GRAMMAR,
            require_eof=last,
            missing=missing,
            referable=before,
            scattered=scattered,
        )
        for record in images:
            if isinstance(record, ImageHeader) and record.pid != member.pid:
                raise ImageError(
                    f"the tree's image {index + 1} is of process {record.pid},"
                    f" the TREE says {member.pid}"
                )
            yield record


def _read_records(
    stream: BinaryIO,
    grammar: tuple[_Step, ...] | None,
    *,
    require_eof: bool,
    missing: str = "not a CRF image (empty)",
    referable: frozenset[int] | None = None,
    scattered: bool = False,
) -> Iterator[Record]:
    source = _Source(stream)
    version = source.read_signature(missing)
    sections = _SECTIONS
    if version < 10:
        sections = {**sections, **_BEFORE_10}
    if version < 9:
        sections = {**sections, **_BEFORE_9}
    checks = _ImageChecks(grammar, referable)
    while True:
        offset = source.offset
        head = source.read(_SECTION_HEAD.size)
        if len(head) < _SECTION_HEAD.size:
            where = "at" if not head else "inside a section header at"
            raise ImageError(
                f"image truncated {where} byte {source.offset}, expected {checks.expected()}"
            )
        tag, length = _SECTION_HEAD.unpack(head)
        kind = _KIND_OF_TAG.get(tag)
        if kind is None:
            raise ImageError(
                f"unknown section tag {tag!r} at byte {offset}, expected {checks.expected()}"
            )
        record = _read_section(source, checks, sections[kind], kind, head, length, offset)
        if isinstance(record, ScatteredPages) and not scattered:
            yield from record.pieces()  # each run a Pages record, as if written so
            continue
        yield record
        if isinstance(record, End):
            break
    if require_eof:
        source.require_eof()


def _read_section(
    source: _Source,
    checks: _ImageChecks,
    codec: _SectionCodec,
    kind: SectionKind,
    head: bytes,
    length: int,
    offset: int,
) -> Record:
    where = f"section {kind.name} at byte {offset}"
    try:
        checks.admit(kind)
    except ImageError as error:
        raise ImageError(f"{where}: {error.message}") from None
    if length > codec.max_payload:
        raise ImageError(f"{where}: length {length} exceeds the limit of {codec.max_payload}")
    fields_length = codec.head_length(length)
    fields = source.read_exactly(fields_length, kind)
    data = source.read_exactly(length - fields_length, kind)
    (crc,) = _CRC.unpack(source.read_exactly(_CRC.size, kind))
    covered = crc32(fields, crc32(head))
    if (crc32(data, covered) if codec.covers_data else covered) != crc:
        raise ImageError(f"checksum mismatch in {where}")
    try:
        record = codec.decode(fields, data)
        checks.check(record, offset)
    except ImageError as error:
        raise ImageError(f"malformed {where}: {error.message}") from None
    return record


class _Source:
    """The input stream and how far into it we are (for messages; never seeks)."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self.offset = 0

    def read(self, size: int) -> bytes:
        """Up to `size` bytes: fewer only at the end of the stream."""
        parts: list[bytes] = []
        missing = size
        while missing:
            # Pipes and sockets return what has arrived; keep reading until EOF.
            chunk = self._stream.read(missing)
            if not chunk:
                break
            parts.append(chunk)
            missing -= len(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.offset += len(data)
        return data

    def require_eof(self) -> None:
        if self.read(1):
            raise ImageError(f"unexpected data after END at byte {self.offset - 1}")

    def read_exactly(self, size: int, kind: SectionKind) -> bytes:
        data = self.read(size)
        if len(data) < size:
            raise ImageError(f"image truncated in section {kind.name} at byte {self.offset}")
        return data

    def read_signature(self, missing: str) -> int:
        """The image's version. `missing`: the message for a stream that ends before the
        signature."""
        signature = self.read(_SIGNATURE.size)
        if not signature:
            raise ImageError(missing)
        if not MAGIC.startswith(signature[: len(MAGIC)]):
            raise ImageError("not a CRF image (bad signature)")
        if len(signature) < _SIGNATURE.size:
            raise ImageError(f"image truncated in the signature at byte {self.offset}")
        _, version = _SIGNATURE.unpack(signature)
        if version not in READABLE_VERSIONS:
            raise ImageError(
                f"unsupported CRF version {version} (this reader knows"
                f" {', '.join(map(str, READABLE_VERSIONS))})"
            )
        return int(version)


def recode(source: BinaryIO, destination: BinaryIO) -> End:
    """Decode the image on `source` and re-encode its records to `destination`.

    The format is canonical, so the output is byte-identical to the input;
    nothing is written until the source's first section has been read and checked.
    """
    writer: ImageWriter | None = None
    record: Record | None = None
    # A snapshot's file (docs/crf.md §7a, "In a file"): its rounds, then its image.
    source, is_round = next_is_round(source)
    while is_round:
        round_writer: ImageWriter | None = None
        for record in read_round(source):
            if round_writer is None:
                round_writer = ImageWriter(destination)
            round_writer.write(record)
        source, is_round = next_is_round(source)
    for record in read_image(source, scattered=True):
        if writer is None:
            writer = ImageWriter(destination)
        writer.write(record)
    destination.flush()
    assert isinstance(record, End)  # read_image ends with END or raises
    return record
