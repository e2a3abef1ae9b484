"""What an image holds, for `hijack show`: data only, rendering is the CLI's.

summarize(records) folds a record stream (as read_image yields it) into an
ImageSummary; summary_to_json(summary) turns that into plain JSON values with
the stable schema documented in docs/crf.md ("Summary JSON"). Page contents
are counted as they pass and never kept, so summarizing a large image takes
as little memory as reading it.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from hijack.errors import ImageError
from hijack.image.codec import END_SECTION_SIZE, FORMAT_VERSION
from hijack.image.files import ImageFiles
from hijack.image.records import (
    ContentsKind,
    Credentials,
    Cwd,
    DumpOptions,
    End,
    FileDescriptor,
    Files,
    ImageHeader,
    ObjectData,
    ObjectRecord,
    PageReference,
    Pages,
    ProcessSettings,
    Record,
    Segment,
    Segments,
    Thread,
    ThreadCredentials,
    Timers,
    Tree,
)

SUMMARY_VERSION = 2  # bumped when a key of summary_to_json changes meaning or goes away

JsonValue = None | bool | int | str | list["JsonValue"] | dict[str, "JsonValue"]


@dataclass(frozen=True)
class ProcessSummary:
    pid: int
    ppid: int
    pgid: int
    sid: int
    comm: str
    argv: tuple[str, ...]
    exe: str
    node: str
    created_ns: int
    options: tuple[str, ...]  # DumpOptions names, e.g. ("NO_SHARED_LIBS",)
    uid: int
    gid: int
    cwd: str
    root: str


@dataclass(frozen=True)
class ThreadSummary:
    tid: int
    comm: str
    rip: int
    rsp: int
    sigmask: int
    pending: int  # signals pending on this thread
    own_credentials: str = ""  # how its credentials differ from the process's, if they do


def differences(own: Credentials, process: Credentials) -> str:
    """What in a thread's credentials `own` differs from its process's: "uid 0/0/0/0,
    effective 0x0, no_new_privs"."""
    parts = []
    uids = (own.uid, own.euid, own.suid, own.fsuid)
    if uids != (process.uid, process.euid, process.suid, process.fsuid):
        parts.append("uid " + "/".join(map(str, uids)))
    gids = (own.gid, own.egid, own.sgid, own.fsgid)
    if gids != (process.gid, process.egid, process.sgid, process.fsgid):
        parts.append("gid " + "/".join(map(str, gids)))
    if own.groups != process.groups:
        parts.append("groups " + ",".join(map(str, own.groups)))
    for name in ("inheritable", "permitted", "effective", "bounding", "ambient"):
        value = getattr(own, f"cap_{name}")
        if value != getattr(process, f"cap_{name}"):
            parts.append(f"{name} {value:#x}")
    if own.no_new_privs != process.no_new_privs:
        parts.append("no_new_privs" if own.no_new_privs else "no no_new_privs")
    return ", ".join(parts)


@dataclass(frozen=True)
class MemoryRow:
    start: int
    end: int
    perms: str
    path: str
    contents: str  # ContentsKind name
    stored_bytes: int  # bytes of this segment held in PAGES sections

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class PageTotals:
    stored: int
    zero: int  # all-zero pages left out
    untouched: int  # never-populated pages left out
    file: int  # pages of FILE segments, mapped from their files at restore
    referenced: int = 0  # pages a member before this one in its tree stream stored (COW)


@dataclass(frozen=True)
class RoundTotals:
    pages: int  # stored by the round (zero pages included, past round 0)
    image_bytes: int  # the round, signature to END inclusive


@dataclass(frozen=True)
class ImageSummary:
    version: int  # CRF format version
    image_bytes: int  # the whole image, signature to END inclusive
    process: ProcessSummary
    threads: tuple[ThreadSummary, ...]
    memory: tuple[MemoryRow, ...]
    files: ImageFiles  # the descriptors and object records (ObjectData left out)
    object_data: dict[int, int]  # bytes of ObjectData by object id
    details: tuple[str, ...]  # one line per descriptor, by its kind ("" if not asked)
    pages: PageTotals
    settings: ProcessSettings
    timers: Timers
    # A snapshot's file made of pre-copy rounds (docs/crf.md §7a, "In a file"): each
    # round's stored pages and bytes, in order; image_bytes counts them, and a PRECOPIED
    # segment's stored_bytes are the distinct pages the rounds and the image hold there.
    rounds: tuple[RoundTotals, ...] = ()

    @property
    def descriptors(self) -> tuple[FileDescriptor, ...]:
        return self.files.descriptors


def summarize_rounds(records: Iterable[Record]) -> tuple[RoundTotals, list[tuple[int, int]]]:
    """One pre-copy round's records (hijack.image.read_round): its totals, and the runs of
    the pages it stored."""
    runs: list[tuple[int, int]] = []
    for record in records:
        if isinstance(record, Pages):
            runs.append((record.address, record.address + len(record.data)))
        elif isinstance(record, End):
            return RoundTotals(record.pages_stored, record.image_bytes + END_SECTION_SIZE), runs
    raise ImageError("incomplete pre-copy round: no END")


def summarize(
    records: Iterable[Record],
    describe: Callable[[FileDescriptor, ImageFiles], str] | None = None,
    rounds: Iterable[tuple[RoundTotals, list[tuple[int, int]]]] = (),
) -> ImageSummary:
    """Fold a complete record stream into a summary; ImageError if a section is missing.

    `describe` gives each descriptor's line of details (hijack.objects.describe).
    `rounds`: summarize_rounds() of the pre-copy rounds before the image, if any.
    """
    round_totals: list[RoundTotals] = []
    precopied: list[tuple[int, int]] = []  # every page the rounds hold
    for totals, runs in rounds:
        round_totals.append(totals)
        precopied += runs
    held: dict[int, list[tuple[int, int]]] = {}  # a PRECOPIED segment's index -> its runs
    header: ImageHeader | None = None
    credentials: Credentials | None = None
    cwd: Cwd | None = None
    files: Files | None = None
    end: End | None = None
    settings: ProcessSettings | None = None
    timers: Timers | None = None
    segments: tuple[Segment, ...] = ()
    starts: list[int] = []
    stored_bytes: list[int] = []
    threads: list[ThreadSummary] = []
    own: dict[int, str] = {}  # the threads with credentials of their own: how they differ
    objects: list[ObjectRecord] = []
    object_data: dict[int, int] = {}
    referenced = 0
    for record in records:
        if isinstance(record, ImageHeader):
            header = record
        elif isinstance(record, Credentials):
            credentials = record
        elif isinstance(record, ThreadCredentials):
            assert credentials is not None  # read_image: CREDENTIALS came first
            own[record.tid] = differences(record.credentials, credentials)
        elif isinstance(record, Segments):
            segments = record.segments
            starts = [segment.start for segment in record.segments]
            stored_bytes = [0] * len(record.segments)
        elif isinstance(record, Pages):
            # read_image has checked that pages lie inside one segment.
            index = bisect.bisect_right(starts, record.address) - 1
            if segments[index].contents is ContentsKind.PRECOPIED:
                held.setdefault(index, []).append(
                    (record.address, record.address + len(record.data))
                )
            else:
                stored_bytes[index] += len(record.data)
        elif isinstance(record, PageReference):
            referenced += record.pages
        elif isinstance(record, Thread):
            threads.append(
                ThreadSummary(
                    tid=record.tid,
                    comm=record.comm,
                    rip=record.regs.rip,
                    rsp=record.regs.rsp,
                    sigmask=record.sigmask,
                    pending=len(record.pending),
                    own_credentials=own.get(record.tid, ""),
                )
            )
        elif isinstance(record, Files):
            files = record
        elif isinstance(record, ObjectData):
            object_data[record.id] = object_data.get(record.id, 0) + len(record.data)
        elif isinstance(record, ObjectRecord):
            objects.append(record)
        elif isinstance(record, Cwd):
            cwd = record
        elif isinstance(record, ProcessSettings):
            settings = record
        elif isinstance(record, Timers):
            timers = record
        elif isinstance(record, End):
            end = record
    if (
        header is None
        or credentials is None
        or cwd is None
        or files is None
        or settings is None
        or timers is None
        or end is None
    ):
        raise ImageError(
            "incomplete image: a HEADER, CREDENTIALS, FILES, CWD, SETTINGS, TIMERS or END"
            " is missing"
        )
    image_files = ImageFiles(files, tuple(objects))
    for index, segment in enumerate(segments):
        if segment.contents is ContentsKind.PRECOPIED:
            inside = [
                (max(start, segment.start), min(end, segment.end))
                for start, end in precopied + held.get(index, [])
                if start < segment.end and end > segment.start
            ]
            stored_bytes[index] = _covered(inside)
    return ImageSummary(
        version=FORMAT_VERSION,
        image_bytes=end.image_bytes + END_SECTION_SIZE + sum(r.image_bytes for r in round_totals),
        rounds=tuple(round_totals),
        process=ProcessSummary(
            pid=header.pid,
            ppid=header.ppid,
            pgid=header.pgid,
            sid=header.sid,
            comm=header.comm,
            argv=header.argv,
            exe=header.exe,
            node=header.node,
            created_ns=header.created_ns,
            options=tuple(str(flag.name) for flag in DumpOptions if flag in header.options),
            uid=credentials.uid,
            gid=credentials.gid,
            cwd=cwd.cwd,
            root=cwd.root,
        ),
        threads=tuple(threads),
        memory=tuple(
            MemoryRow(
                start=segment.start,
                end=segment.end,
                perms=segment.perms,
                path=segment.path,
                contents=segment.contents.name,
                stored_bytes=stored,
            )
            for segment, stored in zip(segments, stored_bytes, strict=True)
        ),
        files=image_files,
        object_data=object_data,
        details=tuple(
            describe(descriptor, image_files) if describe is not None else ""
            for descriptor in files.descriptors
        ),
        pages=PageTotals(
            stored=end.pages_stored,
            zero=end.pages_zero,
            untouched=end.pages_untouched,
            file=end.pages_file,
            referenced=referenced,
        ),
        settings=settings,
        timers=timers,
    )


def _covered(runs: list[tuple[int, int]]) -> int:
    """Bytes covered by `runs` (which may overlap)."""
    total, reach = 0, 0
    for start, end in sorted(runs):
        start = max(start, reach)
        if end > start:
            total += end - start
            reach = end
    return total


def _hex(value: int) -> str:
    return f"{value:#x}"


def _value_json(value: object) -> JsonValue:
    """A record's field as JSON: enums by name, bytes in hex, records as objects."""
    if isinstance(value, enum.Enum):
        return str(value.name)
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, tuple):
        return [_value_json(item) for item in value]
    assert dataclasses.is_dataclass(value) and not isinstance(value, type)
    return {f.name: _value_json(getattr(value, f.name)) for f in dataclasses.fields(value)}


def _object_json(record: ObjectRecord, data_bytes: int) -> JsonValue:
    fields = _value_json(record)
    assert isinstance(fields, dict)
    return {"record": type(record).__name__, **fields, "data_bytes": data_bytes}


def _plain(value: object) -> JsonValue:
    """A record's asdict() as JSON values: its tuples become lists, its bytes hex strings."""
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    assert value is None or isinstance(value, bool | int | str), value
    return value


def summary_to_json(summary: ImageSummary) -> dict[str, JsonValue]:
    """Plain JSON values (docs/crf.md, "Summary JSON"): addresses and masks as hex
    strings, since they exceed what a JSON double holds exactly; sizes as integers."""
    process = summary.process
    return {
        "summary_version": SUMMARY_VERSION,
        "format_version": summary.version,
        "image_bytes": summary.image_bytes,
        "rounds": [
            {"pages": totals.pages, "image_bytes": totals.image_bytes} for totals in summary.rounds
        ],
        "process": {
            "pid": process.pid,
            "ppid": process.ppid,
            "pgid": process.pgid,
            "sid": process.sid,
            "comm": process.comm,
            "argv": list(process.argv),
            "exe": process.exe,
            "node": process.node,
            "created_ns": process.created_ns,
            "options": list(process.options),
            "uid": process.uid,
            "gid": process.gid,
            "cwd": process.cwd,
            "root": process.root,
        },
        "threads": [
            {
                "tid": thread.tid,
                "comm": thread.comm,
                "rip": _hex(thread.rip),
                "rsp": _hex(thread.rsp),
                "sigmask": _hex(thread.sigmask),
                "pending": thread.pending,
                "own_credentials": thread.own_credentials or None,
            }
            for thread in summary.threads
        ],
        "memory": [
            {
                "start": _hex(row.start),
                "end": _hex(row.end),
                "size": row.size,
                "perms": row.perms,
                "path": row.path,
                "contents": row.contents,
                "stored_bytes": row.stored_bytes,
            }
            for row in summary.memory
        ],
        "descriptors": [
            {
                "fd": descriptor.fd,
                "kind": descriptor.kind.name,
                "path": descriptor.path,
                "flags": descriptor.flags,
                "pos": descriptor.pos,
                "cloexec": descriptor.cloexec,
                "description_id": descriptor.description_id,
                "object_id": descriptor.object_id,
                "details": details,
            }
            for descriptor, details in zip(summary.descriptors, summary.details, strict=True)
        ],
        "objects": [
            _object_json(record, summary.object_data.get(record.id, 0))
            for record in summary.files.sections
        ],
        "settings": _plain(dataclasses.asdict(summary.settings)),
        "timers": _plain(dataclasses.asdict(summary.timers)),
        "pages": {
            "stored": summary.pages.stored,
            "zero": summary.pages.zero,
            "untouched": summary.pages.untouched,
            "file": summary.pages.file,
            "referenced": summary.pages.referenced,
        },
    }


@dataclass(frozen=True)
class TreeSummary:
    """A tree stream: its members, and the summary of each member's image."""

    tree: Tree
    images: dict[int, ImageSummary]  # by pid; zombies have none

    @property
    def image_bytes(self) -> int:
        return sum(image.image_bytes for image in self.images.values())

    @property
    def pages_referenced(self) -> int:
        """Pages stored once for several members (still shared copy-on-write at the dump)."""
        return sum(image.pages.referenced for image in self.images.values())


def summarize_stream(
    records: Iterator[Record],
    describe: Callable[[FileDescriptor, ImageFiles], str] | None = None,
) -> ImageSummary | TreeSummary:
    """Summarize an image, or a tree stream member by member (hijack.image.read_stream)."""
    first = next(records)
    if not isinstance(first, Tree):
        return summarize(itertools.chain([first], records), describe)
    next(records)  # the tree's END
    images = {member.pid: summarize(_through_end(records), describe) for member in first.imaged}
    return TreeSummary(tree=first, images=images)


def _through_end(records: Iterator[Record]) -> Iterator[Record]:
    """The records of one image: up to and including its END."""
    for record in records:
        yield record
        if isinstance(record, End):
            return


def tree_summary_to_json(summary: TreeSummary) -> dict[str, JsonValue]:
    return {
        "tree": [_value_json(member) for member in summary.tree.members],
        "shared": [_value_json(link) for link in summary.tree.shared],
        "contexts": [_value_json(context) for context in summary.tree.contexts],
        "images": {str(pid): summary_to_json(image) for pid, image in summary.images.items()},
    }
