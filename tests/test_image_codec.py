"""The CRF codec on real bytes: round trips, zero pages, corruption, streams, summary."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import io
import json
import os
import random
import re
import struct
import sys
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, is_dataclass, replace
from pathlib import Path
from typing import BinaryIO, TypeVar, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hijack.errors import ImageError
from hijack.image import (
    END_SECTION_SIZE,
    FORMAT_VERSION,
    MAX_PAGES_DATA,
    PAGE_SIZE,
    READABLE_VERSIONS,
    RLIM_INFINITY,
    SIGNAL_COUNT,
    AioRing,
    AuxvEntry,
    CloneFlags,
    ContentsKind,
    Credentials,
    Cwd,
    DumpOptions,
    End,
    EpollObject,
    EpollTarget,
    EventfdObject,
    FanotifyMark,
    FanotifyObject,
    FdKind,
    FifoObject,
    FileDescriptor,
    FileIdentity,
    FileLock,
    FileLocks,
    Files,
    GhostFile,
    ImageHeader,
    ImageWriter,
    InetSocket,
    InotifyObject,
    InotifyWatch,
    Itimer,
    LockKind,
    MemberState,
    MemfdObject,
    MemoryStructure,
    NetlinkSocket,
    ObjectData,
    PacketMembership,
    PacketRingMapping,
    PacketSocket,
    PageRange,
    PageReference,
    Pages,
    PidfdObject,
    PingSocket,
    PipeObject,
    PosixMessage,
    PosixMessageQueue,
    PosixTimer,
    ProcessSettings,
    Prot,
    PtyPair,
    QueuedDatagram,
    RawSocket,
    Record,
    Rlimit,
    Rlimits,
    RobustList,
    Round,
    RseqConfiguration,
    SeccompFilter,
    SectionKind,
    Segment,
    Segments,
    SharedAnonymous,
    SharedContext,
    SigAction,
    SigAltStack,
    SignalfdObject,
    SignalState,
    SocketOption,
    SocketOptions,
    SplicedPages,
    SysvMessage,
    SysvMessageQueue,
    SysvOwner,
    SysvSemaphores,
    SysvSharedMemory,
    TcpConnection,
    TerminalObject,
    TerminalState,
    Thread,
    ThreadCredentials,
    ThreadScheduling,
    ThreadSeccomp,
    TimerfdObject,
    Timers,
    Tree,
    TreeMember,
    UdpSocket,
    UnixCredentials,
    UnixMessage,
    UnixSocket,
    UserRegsStruct,
    read_image,
    read_round,
    read_stream,
    recode,
    summarize,
    summary_to_json,
)
from hijack.image import codec as codec_module
from hijack.image import records as records_module
from hijack.image.codec import next_is_round, round_pages, skip_rounds
from hijack.image.fields import Cursor, struct_codec
from hijack.image.summary import TreeSummary, summarize_rounds, summarize_stream

OBJECT_TAGS = {
    b"TTYO", b"EPOL", b"EVFD", b"TMFD", b"SGFD", b"INFY", b"PIDF", b"INET", b"TCPC", b"LOCK",
    b"PTYP", b"PIPE", b"FIFO", b"SHM_", b"SEM_", b"MSQ_", b"MQUE", b"UNIX", b"UDPS", b"SOPT",
    b"NLNK", b"RAWS", b"GHST", b"MEMF", b"SHMA", b"ODAT",
    b"PING", b"PCKT", b"FANO",
}  # fmt: skip
SECTION_NAMES = {
    b"HEAD": "HEADER",
    b"CRED": "CREDENTIALS",
    b"TCRD": "THREAD_CREDENTIALS",
    b"RLIM": "RLIMITS",
    b"MMST": "MM",
    b"SEGS": "SEGMENTS",
    b"PAGE": "PAGES",
    b"PREF": "PAGE_REFERENCE",
    b"SPLC": "SPLICED_PAGES",
    b"SCAT": "SCATTERED_PAGES",
    b"THRD": "THREAD",
    b"SIGS": "SIGNALS",
    b"FDS_": "FILES",
    b"TTYO": "TERMINAL_OBJECT",
    b"EPOL": "EPOLL_OBJECT",
    b"EVFD": "EVENTFD_OBJECT",
    b"TMFD": "TIMERFD_OBJECT",
    b"SGFD": "SIGNALFD_OBJECT",
    b"INFY": "INOTIFY_OBJECT",
    b"PIDF": "PIDFD_OBJECT",
    b"TCPC": "TCP_CONNECTION",
    b"INET": "INET_SOCKET",
    b"UNIX": "UNIX_SOCKET",
    b"UDPS": "UDP_SOCKET",
    b"SOPT": "SOCKET_OPTIONS",
    b"NLNK": "NETLINK_SOCKET",
    b"RAWS": "RAW_SOCKET",
    b"PING": "PING_SOCKET",
    b"PCKT": "PACKET_SOCKET",
    b"FANO": "FANOTIFY_OBJECT",
    b"GHST": "GHOST_FILE",
    b"MEMF": "MEMFD",
    b"SHMA": "SHARED_ANONYMOUS",
    b"LOCK": "FILE_LOCKS",
    b"PTYP": "PTY_PAIR",
    b"PIPE": "PIPE_OBJECT",
    b"FIFO": "FIFO_OBJECT",
    b"SHM_": "SYSV_SHARED_MEMORY",
    b"SEM_": "SYSV_SEMAPHORES",
    b"MSQ_": "SYSV_MESSAGE_QUEUE",
    b"MQUE": "POSIX_MESSAGE_QUEUE",
    b"ODAT": "OBJECT_DATA",
    b"CWD_": "CWD",
    b"PSET": "SETTINGS",
    b"TIMR": "TIMERS",
    b"END_": "END",
}


# --- an independent reading of the framing in docs/crf.md ---------------------------


@dataclass(frozen=True)
class Section:
    offset: int
    tag: bytes
    payload: bytes

    @property
    def size(self) -> int:
        return 8 + len(self.payload) + 4

    @property
    def name(self) -> str:
        return SECTION_NAMES[self.tag]


def sections(image: bytes) -> list[Section]:
    found = []
    offset = 8
    while offset < len(image):
        tag, length = struct.unpack_from("<4sI", image, offset)
        found.append(Section(offset, tag, image[offset + 8 : offset + 8 + length]))
        offset += 8 + length + 4
    return found


def frame(tag: bytes, payload: bytes) -> bytes:
    head = struct.pack("<4sI", tag, len(payload))
    return head + payload + struct.pack("<I", zlib.crc32(head + payload))


def replace_section(image: bytes, section: Section, replacement: bytes) -> bytes:
    return image[: section.offset] + replacement + image[section.offset + section.size :]


def read_all(image: bytes, **options: bool) -> list[Record]:
    return list(read_image(io.BytesIO(image), **options))


# --- a realistic process -------------------------------------------------------------

MIB = 1024 * 1024


def segment(
    start: int,
    size: int,
    prot: Prot,
    path: str,
    contents: ContentsKind,
    *,
    shared: bool = False,
    file: FileIdentity | None = None,
) -> Segment:
    return Segment(
        start=start,
        end=start + size,
        prot=prot,
        shared=shared,
        offset=0,
        dev_major=8 if file else 0,
        dev_minor=1 if file else 0,
        inode=1234 if file else 0,
        path=path,
        vm_flags=("rd", "mr", "mw", "me", "ac") + (("wr",) if prot & Prot.WRITE else ()),
        contents=contents,
        file=file,
    )


def memory_with_holes(rng: random.Random, pages: int) -> bytes:
    """Random pages with about a third of them all zero, plus a page with one byte set."""
    chunks = []
    for index in range(pages):
        if index == 1:
            chunks.append(bytes(PAGE_SIZE - 1) + b"\x01")  # last byte only: still stored
        elif rng.random() < 0.35:
            chunks.append(bytes(PAGE_SIZE))
        else:
            chunks.append(rng.randbytes(PAGE_SIZE))
    return b"".join(chunks)


PROCESS_CREDENTIALS = Credentials(
    uid=1000,
    euid=1000,
    suid=1000,
    fsuid=1000,
    gid=100,
    egid=100,
    sgid=100,
    fsgid=100,
    cap_inheritable=0,
    cap_permitted=0,
    cap_effective=0,
    cap_bounding=2**41 - 1,
    cap_ambient=0,
    umask=0o22,
    no_new_privs=False,
    groups=(4, 24, 100),
)
NOBODY_THREAD = replace(
    PROCESS_CREDENTIALS,
    **dict.fromkeys(("uid", "euid", "suid", "fsuid"), 65534),
    cap_bounding=2**40 - 1,
    no_new_privs=True,
    groups=(),
)


def thread(rng: random.Random, tid: int, name: str) -> Thread:
    field_names = UserRegsStruct.__dataclass_fields__
    regs = UserRegsStruct(**{name: rng.getrandbits(64) for name in field_names})
    return Thread(
        tid=tid,
        comm=name,
        regs=regs,
        xstate=rng.randbytes(2696),
        sigmask=1 << 12,
        pending=(rng.randbytes(128),) if tid % 2 else (),
        rseq=RseqConfiguration(
            rseq_abi_pointer=0x7F00_0000_1000 + tid * 32,
            rseq_abi_size=32,
            signature=0x53053053,
            flags=0,
        ),
        robust_list=RobustList(head=0x7F00_0000_2000 + tid * 64, len=24),
        clear_child_tid=0x7F00_0000_3000 + tid,
        sigaltstack=SigAltStack(ss_sp=0, ss_flags=2, ss_size=0),
    )


@dataclass(frozen=True)
class Built:
    image: bytes
    before_pages: list[Record]  # HEADER to SEGMENTS
    after_pages: list[Record]  # the threads to CWD
    end: End
    memory: dict[int, bytes]  # STORED segment start -> its full contents
    reference: PageReference  # among the pages: 2 pages another member's image holds

    @property
    def records(self) -> list[Record]:
        """Every record but Pages, in order."""
        return [*self.before_pages, self.reference, *self.after_pages, self.end]


# A terminal in canonical mode with echo, 33 rows of 97 columns, the controlling one.
TERMINAL = TerminalState(
    c_iflag=0o2400,
    c_oflag=0o5,
    c_cflag=0o277,
    c_lflag=0o105073,
    c_line=0,
    c_cc=bytes([3, 28, 8, 21, 4, 0, 1, 0, 17, 19, 26, 0, 18, 15, 23, 22, 0, 0, 0]),
    ws_row=33,
    ws_col=97,
    ws_xpixel=0,
    ws_ypixel=0,
    controlling=True,
)


REFERRED = 0x7F0000300000  # a segment whose pages the image refers to (PAGE_REFERENCE)
SPLICED = 0x7FFC00104000  # a segment whose pages the writer never held (SPLICED_PAGES)
SCATTERED = 0x7FFC00000000  # a segment whose runs of pages are one section (SCATTERED_PAGES)


def page_runs(start: int, data: bytes) -> list[tuple[int, int]]:
    """The (address, length) runs of the non-zero pages of `data` at `start`."""
    runs: list[tuple[int, int]] = []
    for offset in range(0, len(data), PAGE_SIZE):
        if data[offset : offset + PAGE_SIZE] == bytes(PAGE_SIZE):
            continue
        if runs and sum(runs[-1]) == start + offset:
            runs[-1] = (runs[-1][0], runs[-1][1] + PAGE_SIZE)
        else:
            runs.append((start + offset, PAGE_SIZE))
    return runs


def runs_data(start: int, data: bytes, runs: list[tuple[int, int]]) -> bytes:
    return b"".join(data[address - start : address - start + length] for address, length in runs)


def build_image(seed: int = 7, heap_pages: int = 768) -> Built:
    rng = random.Random(seed)
    libc = FileIdentity(
        path="/usr/lib/libc.so.6",
        size=2_000_000,
        mtime_ns=1_700_000_000_123_456_789,
        build_id=b"\xab" * 20,
    )
    exe = FileIdentity(path="/usr/bin/server", size=80_000, mtime_ns=-5, build_id=b"")
    layout = [
        segment(
            0x400000, 0x2000, Prot.READ | Prot.EXEC, "/usr/bin/server", ContentsKind.FILE, file=exe
        ),
        segment(0x602000, 0x10000, Prot.READ | Prot.WRITE, "/usr/bin/server", ContentsKind.STORED),
        segment(
            0x1000000, heap_pages * PAGE_SIZE, Prot.READ | Prot.WRITE, "[heap]", ContentsKind.STORED
        ),
        segment(0x7F0000000000, 0x1000, Prot.READ, "/dev/shm/x", ContentsKind.STORED, shared=True),
        segment(
            0x7F0000001000,
            0x20000,
            Prot.READ | Prot.EXEC,
            "/usr/lib/libc.so.6",
            ContentsKind.FILE,
            file=libc,
        ),
        segment(0x7F0000100000, 0x100000, Prot(0), "", ContentsKind.NONE),
        segment(REFERRED, 0x4000, Prot.READ | Prot.WRITE, "", ContentsKind.STORED),
        segment(0x7FFC00000000, 0x21000, Prot.READ | Prot.WRITE, "[stack]", ContentsKind.STORED),
        segment(0x7FFC00100000, 0x4000, Prot.READ, "[vvar]", ContentsKind.NONE),
        segment(0x7FFC00104000, 0x2000, Prot.READ | Prot.EXEC, "[vdso]", ContentsKind.STORED),
    ]
    memory = {
        s.start: memory_with_holes(rng, s.size // PAGE_SIZE)
        for s in layout
        if s.contents is ContentsKind.STORED
    }
    # Its pages are another member's (a tree's image read alone): zero here.
    memory[REFERRED] = bytes(0x4000)
    reference = PageReference(address=REFERRED + PAGE_SIZE, pages=2, pid=4000, source=REFERRED)
    objects = (
        TerminalObject(id=1, state=TERMINAL),
        InetSocket(
            id=2,
            family=2,
            type=1,
            protocol=6,
            state=1,
            local_address="127.0.0.1:6379",
            remote_address="127.0.0.1:51000",
        ),
        EpollObject(
            id=3,
            targets=(
                EpollTarget(tfd=3, events=0x80000001, data=3),
                EpollTarget(tfd=9, events=1, data=2**64 - 1),
            ),
        ),
        EventfdObject(id=4, count=7, semaphore=True),
        ObjectData(id=4, offset=0, data=rng.randbytes(100)),  # data of no real eventfd: a test
        ObjectData(id=4, offset=4096, data=b"after a hole"),
        TimerfdObject(
            id=5,
            clock_id=1,
            settime_flags=1,
            ticks=3,
            value_ns=1_500_000,
            interval_ns=20_000_000,
        ),
        SignalfdObject(id=6, sigmask=(1 << 9) | (1 << 63)),
        InotifyObject(
            id=7,
            watches=(
                InotifyWatch(wd=1, mask=0x100, path="/srv/data"),
                InotifyWatch(wd=4, mask=0x80000302, path="/etc/caf\u00e9 conf"),
            ),
        ),
        PidfdObject(id=8, pid=4242, starttime=123456, own=True),
        FileLocks(
            id=9,
            description_id=3,
            signal=35,
            locks=(
                FileLock(kind=LockKind.FLOCK, type=1, start=0, length=0),
                FileLock(kind=LockKind.POSIX, type=1, start=10, length=10),
                FileLock(kind=LockKind.OFD, type=0, start=100, length=0),
                FileLock(kind=LockKind.LEASE, type=0, start=0, length=0),
            ),
        ),
        PtyPair(
            id=10,
            index=4,
            packet_mode=True,
            locked=False,
            state=TERMINAL,
            master_path="/dev/ptmx",
            input=b"queued\n",
            output=b"\x00out\r\n",
        ),
        TcpConnection(
            id=11,
            family=10,
            send_seq=2**32 - 5,
            recv_seq=77,
            mss=65483,
            options=7,
            snd_wscale=10,
            rcv_wscale=7,
            timestamp=123456789,
            snd_wl1=1,
            snd_wnd=2,
            max_window=3,
            rcv_wnd=4,
            rcv_wup=5,
            send_queue_bytes=3,
            recv_queue_bytes=2,
            state=9,
            read_shut=True,
            local_address="[::1]:6379",
            remote_address="[::1]:51000",
            unsent_bytes=2,
        ),
        ObjectData(id=11, offset=0, data=b"abcde"),
        PipeObject(id=12, pipe_size=1 << 20, packets=(), outside_pid=0),
        ObjectData(id=12, offset=0, data=b"queued in a self-pipe"),
        FifoObject(id=13, pipe_size=65536, packets=(10, 4000), held_outside=False),
        ObjectData(id=13, offset=0, data=rng.randbytes(4010)),
        SysvSharedMemory(
            id=14,
            shmid=32769,
            owner=SysvOwner(key=0x0021C0BD, mode=0o1600, uid=0, gid=0),
            size=12288,
        ),
        SysvSemaphores(
            id=15,
            semid=2,
            owner=SysvOwner(key=0xFFFFFFFF, mode=0o600, uid=1000, gid=1000),
            values=(1, 0, 65535),
        ),
        SysvMessageQueue(
            id=16,
            msqid=3,
            owner=SysvOwner(key=0, mode=0o644, uid=0, gid=0),
            qbytes=16384,
            messages=(SysvMessage(mtype=2, text=b"first\0"), SysvMessage(mtype=2**63, text=b"")),
        ),
        PosixMessageQueue(
            id=17,
            name="/jobs",
            unlinked=True,
            mode=0o600,
            maxmsg=10,
            msgsize=8192,
            messages=(PosixMessage(priority=9, data=b"urgent"), PosixMessage(priority=0, data=b"")),
        ),
        UnixSocket(
            id=18,
            inode=7790,
            type=1,
            state=1,
            shutdown=2,
            passcred=True,
            peek_off=-1,
            sndbuf=131072,
            rcvbuf=212992,
            backlog=0,
            peer=7791,
            file_mode=0,
            file_uid=0,
            file_gid=0,
            name=b"\0abstract \xff",
            peer_name=b"",
            queue=(),
            messages=(
                UnixMessage(data=b"queued", source=b"", credentials=None, rights=()),
                UnixMessage(
                    data=b"!",
                    source=b"/run/sender.sock",
                    credentials=UnixCredentials(pid=4242, uid=0, gid=1000),
                    rights=(
                        FileDescriptor(
                            fd=0,
                            kind=FdKind.REGULAR,
                            flags=0o2,
                            pos=8,
                            cloexec=False,
                            mode=0o100600,
                            dev=0x801,
                            ino=99,
                            path="/srv/carried",
                            description_id=9,
                            object_id=0,
                        ),
                    ),
                ),
            ),
            refusal="",
            bound_in="/srv/app",
        ),
        GhostFile(
            id=19, dev=2049, ino=77, mode=0o100640, uid=1000, gid=100, size=9000, path="/tmp/x"
        ),
        ObjectData(id=19, offset=8192, data=b"the tail after a hole"),
        MemfdObject(
            id=20, dev=1, ino=1032, size=4096, seals=0xA, mode=0o100777, uid=0, gid=0, name="m"
        ),
        ObjectData(id=20, offset=0, data=rng.randbytes(4096)),
        SharedAnonymous(id=21, dev=1, ino=1035, size=16384),
        UdpSocket(
            id=22,
            family=10,
            protocol=136,
            local_address="[::]:5353",
            remote_address="",
            queue=(
                QueuedDatagram(length=3, source="[::ffff:127.0.0.1]:40000"),
                QueuedDatagram(length=0, source="[::1]:40001"),
            ),
        ),
        ObjectData(id=22, offset=0, data=b"abc"),
        SocketOptions(
            id=23,
            socket_id=22,
            filter_locked=True,
            options=(
                SocketOption(level=1, name=2, value=b"\x01\0\0\0"),
                SocketOption(level=6, name=13, value=b"reno".ljust(16, b"\0")),
            ),
            filter=bytes.fromhex("0600000000000100"),
        ),
        NetlinkSocket(id=24, type=3, protocol=0, port_id=4242, groups=(1, 5)),
        RawSocket(id=25, family=2, protocol=1, local_address="127.0.0.1", remote_address=""),
        PingSocket(
            id=61,
            family=2,
            local_address="127.0.0.1:4321",
            remote_address="127.0.0.1",
            queue=(QueuedDatagram(length=16, source="127.0.0.1:0"),),
        ),
        PacketSocket(
            id=62,
            type=3,
            protocol=3,
            ifindex=2,
            fanout=77,
            memberships=(PacketMembership(ifindex=2, count=1, type=0, address=b"\x01\0^\0\0\1"),),
            rx_ring=(65536, 4, 2048, 128, 60, 0, 0),
            tx_ring=(),
            version=1,
            rx_head=5,
            tx_head=0,
            ring_mappings=(PacketRingMapping(start=0x7F0000000000, size=262144, offset=0, prot=3),),
        ),
        FanotifyObject(
            id=63,
            flags=0x2,
            event_flags=0x8000,
            marks=(
                FanotifyMark(kind=0, mflags=0, mask=0xA, ignored_mask=0, path="/srv/data/a"),
                FanotifyMark(kind=1, mflags=0x40, mask=0, ignored_mask=0x20, path="/srv"),
            ),
        ),
    )
    files = Files(
        objects=len(objects),
        descriptors=tuple(
            FileDescriptor(
                fd=fd,
                kind=kind,
                flags=flags,
                pos=pos,
                cloexec=fd > 2,
                mode=mode,
                dev=0x801,
                ino=1000 + fd,
                path=path,
                description_id=description,
                object_id=object_id,
            )
            for fd, kind, path, flags, pos, mode, description, object_id in [
                (0, FdKind.TTY, "/dev/pts/3", 0o2, 0, 0o20620, 1, 1),
                (1, FdKind.PIPE, "pipe:[4021]", 0o1, 0, 0o10600, 2, 0),
                (2, FdKind.REGULAR, "/var/log/server.log", 0o102001, 123456, 0o100644, 3, 0),
                (3, FdKind.SOCKET, "socket:[7781]", 0o2, 0, 0o140777, 4, 2),
                (4, FdKind.EPOLL, "anon_inode:[eventpoll]", 0o2000002, 0, 0o600, 5, 3),
                (5, FdKind.DIRECTORY, "/srv/data \udcff", 0o200000, 0, 0o40755, 6, 0),
                (6, FdKind.REGULAR, "/var/log/server.log", 0o102001, 123456, 0o100644, 3, 0),
                (9, FdKind.EVENTFD, "anon_inode:[eventfd]", 0o2, 0, 0o600, 7, 4),
                (10, FdKind.TTY, "/dev/ptmx", 0o2, 0, 0o20666, 8, 10),
                (11, FdKind.TTY, "/dev/pts/4", 0o2, 0, 0o20620, 9, 10),
                (12, FdKind.SOCKET, "socket:[7790]", 0o2, 0, 0o140777, 10, 18),
            ]
        ),
    )
    before_pages: list[Record] = [
        ImageHeader(
            pid=4242,
            ppid=1,
            pgid=4242,
            sid=4200,
            comm="server",
            argv=("/usr/bin/server", "--port", "6379", "caf\u00e9", "bad-\udcff-byte"),
            exe="/usr/bin/server",
            node="node-a",
            created_ns=1_700_000_000_000_000_000,
            options=DumpOptions.NO_SHARED_LIBS,
        ),
        PROCESS_CREDENTIALS,
        # A thread that dropped to another user by a raw setresuid, under no_new_privs.
        ThreadCredentials(tid=4243, credentials=NOBODY_THREAD),
        Rlimits(
            limits=(
                Rlimit(resource=3, rlim_cur=8 * MIB, rlim_max=RLIM_INFINITY),
                Rlimit(resource=7, rlim_cur=1024, rlim_max=524288),
                Rlimit(resource=9, rlim_cur=RLIM_INFINITY, rlim_max=RLIM_INFINITY),
            )
        ),
        MemoryStructure(
            start_code=0x400000,
            end_code=0x401FFF,
            start_data=0x602000,
            end_data=0x612000,
            start_brk=0x1000000,
            brk=0x1000000 + heap_pages * PAGE_SIZE,
            start_stack=0x7FFC00020000,
            arg_start=0x7FFC00020100,
            arg_end=0x7FFC00020180,
            env_start=0x7FFC00020180,
            env_end=0x7FFC00020400,
            personality=0,
            auxv=(
                AuxvEntry(a_type=6, a_val=4096),
                AuxvEntry(a_type=25, a_val=0x7FFC00020500),
                AuxvEntry(a_type=0, a_val=0),
            ),
            exe_file="/usr/bin/server",
        ),
        Segments(segments=tuple(layout)),
        files,
        *objects,
    ]
    after_pages: list[Record] = [
        thread(rng, 4242, "server"),
        thread(rng, 4243, "worker-1"),
        thread(rng, 4244, "worker-2"),
        SignalState(
            actions=tuple(
                SigAction(
                    sa_handler=0x401234 if signal in (2, 15) else 0,
                    sa_flags=0x04000000,  # SA_RESTORER
                    sa_restorer=0x401000,
                    sa_mask=0,
                )
                for signal in range(1, SIGNAL_COUNT + 1)
            ),
            shared_pending=(rng.randbytes(128),),
        ),
        Cwd(cwd="/srv/data", root="/"),
        ProcessSettings(
            dumpable=2,
            thp_disable=True,
            child_subreaper=False,
            pdeath_signal=15,
            timer_slack_ns=50_000,
            oom_score_adj=-17,
            loginuid=1000,
            membarrier=0x10,
            mlockall=6,
            threads=(
                ThreadScheduling(tid=4242, policy=3, priority=0, nice=-5, affinity=(0, 2, 3)),
                ThreadScheduling(tid=4243, policy=1, priority=42, nice=0, affinity=(1,)),
            ),
            seccomp=(
                ThreadSeccomp(
                    tid=4243,
                    mode=2,
                    filters=(
                        SeccompFilter(flags=0, program=rng.randbytes(8 * 5)),
                        SeccompFilter(flags=2, program=rng.randbytes(8)),
                    ),
                ),
                ThreadSeccomp(tid=4244, mode=1, filters=()),
            ),
            guard_pages=(PageRange(start=0x7F0000100000, end=0x7F0000102000),),
            aio_rings=(
                AioRing(
                    address=0x7F0000200000,
                    size=0x3000,
                    nr=383,
                    head=382,
                    tail=1,
                    events=bytes(range(64)),
                ),
            ),
        ),
        Timers(
            itimers=(Itimer(which=0, interval_ns=20_000_000, value_ns=7_000_000),),
            posix=(
                PosixTimer(
                    timer_id=0,
                    clock_id=1,
                    notify=0,
                    signal=10,
                    value=0xFEED,
                    thread=0,
                    interval_ns=0,
                    value_ns=0,
                    overrun=0,
                ),
                PosixTimer(
                    timer_id=3,
                    clock_id=-6,
                    notify=4,
                    signal=34,
                    value=2**64 - 1,
                    thread=4243,
                    interval_ns=1_000_000,
                    value_ns=999_999_999_999,
                    overrun=2**31 - 1,
                ),
            ),
        ),
    ]
    out = io.BytesIO()
    writer = ImageWriter(out)
    for record in before_pages:
        writer.write(record)
    for start, data in memory.items():
        if start == REFERRED:
            writer.write(reference)
        elif start == SPLICED:
            # What a dump's splice(2) does: the data goes into the stream behind the writer.
            put = functools.partial(lambda data, length: out.write(data), data)
            writer.write_spliced_pages(start, len(data), put)
        elif start == SCATTERED:
            runs = page_runs(start, data)
            writer.write_scattered_pages(runs, runs_data(start, data, runs))
        else:
            writer.write_pages(start, data)
    for record in after_pages:
        writer.write(record)
    end = writer.close(pages_untouched=77, pages_file=0x22)
    return Built(out.getvalue(), before_pages, after_pages, end, memory, reference)


BUILT = build_image()
R = TypeVar("R")


def the(kind: type[R]) -> R:
    """The record of `kind` in BUILT."""
    return next(record for record in BUILT.records if isinstance(record, kind))


def restored_memory(records: list[Record], segments: Segments) -> dict[int, bytes]:
    """What a restorer would put in each STORED segment: zero-filled, then the pages."""
    memory = {
        s.start: bytearray(s.size) for s in segments.segments if s.contents is ContentsKind.STORED
    }
    for record in records:
        if isinstance(record, Pages):
            start = max(base for base in memory if base <= record.address)
            offset = record.address - start
            memory[start][offset : offset + len(record.data)] = record.data
    return {start: bytes(data) for start, data in memory.items()}


# --- round trip ----------------------------------------------------------------------


def test_round_trip_gives_equal_records_and_memory() -> None:
    records = read_all(BUILT.image)
    assert [r for r in records if not isinstance(r, Pages)] == BUILT.records
    assert restored_memory(records, the(Segments)) == BUILT.memory


def test_recode_is_byte_identical() -> None:
    out = io.BytesIO()
    end = recode(io.BytesIO(BUILT.image), out)
    assert out.getvalue() == BUILT.image
    assert end == BUILT.end


def test_end_totals_describe_the_image() -> None:
    end = BUILT.end
    all_sections = sections(BUILT.image)
    stored_pages = sum(
        (len(s.payload) - 8) // PAGE_SIZE for s in all_sections if s.tag in (b"PAGE", b"SPLC")
    )
    scattered = next(s for s in all_sections if s.tag == b"SCAT")
    (count,) = struct.unpack_from("<I", scattered.payload)
    stored_pages += (len(scattered.payload) - 8 - 16 * count) // PAGE_SIZE
    assert end.records == len(all_sections) - 1
    assert end.image_bytes == all_sections[-1].offset
    assert end.image_bytes + END_SECTION_SIZE == len(BUILT.image)
    assert end.pages_stored == stored_pages
    total_pages = sum(len(data) for data in BUILT.memory.values()) // PAGE_SIZE
    # Given to write_pages: not the referred pages, nor the scattered segment's zero pages.
    written = total_pages - len(BUILT.memory[REFERRED]) // PAGE_SIZE
    scattered_memory = BUILT.memory[SCATTERED]
    written -= sum(
        scattered_memory[at : at + PAGE_SIZE] == bytes(PAGE_SIZE)
        for at in range(0, len(scattered_memory), PAGE_SIZE)
    )
    assert end.pages_zero == written - stored_pages
    assert (end.pages_untouched, end.pages_file) == (77, 0x22)


# --- zero pages ----------------------------------------------------------------------


def minimal_writer(out: io.BytesIO, segments: tuple[Segment, ...]) -> ImageWriter:
    writer = ImageWriter(out)
    at = BUILT.before_pages.index(the(Segments))
    for record in BUILT.before_pages[:at]:
        writer.write(record)
    writer.write(Segments(segments=segments))
    for record in BUILT.before_pages[at + 1 :]:
        writer.write(record)  # FILES and its objects
    return writer


def finish(writer: ImageWriter) -> End:
    for record in BUILT.after_pages:
        writer.write(record)
    return writer.close()


def test_zero_pages_are_not_stored() -> None:
    pages = 256
    rng = random.Random(1)
    data = bytearray(pages * PAGE_SIZE)
    nonzero = sorted(rng.sample(range(pages), 40))
    for page in nonzero:
        data[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = rng.randbytes(PAGE_SIZE)
    base = segment(0x10000000, pages * PAGE_SIZE, Prot.READ | Prot.WRITE, "", ContentsKind.STORED)

    empty, full = io.BytesIO(), io.BytesIO()
    finish(minimal_writer(empty, (base,)))
    writer = minimal_writer(full, (base,))
    writer.write_pages(base.start, memoryview(data))
    end = finish(writer)

    runs = len(
        [p for i, p in enumerate(nonzero) if i == 0 or nonzero[i - 1] != p - 1]
    )  # each run of consecutive pages is one section of 8 + 12 bytes overhead
    assert len(full.getvalue()) == len(empty.getvalue()) + 40 * PAGE_SIZE + runs * 20
    assert (end.pages_stored, end.pages_zero) == (40, pages - 40)
    stored = {p.address for p in read_all(full.getvalue()) if isinstance(p, Pages)}
    assert min(stored) == base.start + nonzero[0] * PAGE_SIZE


def test_all_zero_input_yields_no_pages_record() -> None:
    base = segment(0x10000000, 64 * PAGE_SIZE, Prot.READ | Prot.WRITE, "", ContentsKind.STORED)
    out = io.BytesIO()
    writer = minimal_writer(out, (base,))
    writer.write_pages(base.start, bytes(64 * PAGE_SIZE))
    end = finish(writer)
    assert not [r for r in read_all(out.getvalue()) if isinstance(r, Pages)]
    assert (end.pages_stored, end.pages_zero) == (0, 64)


def test_long_runs_are_split_into_records_of_at_most_8_mib() -> None:
    size = MAX_PAGES_DATA + 3 * PAGE_SIZE
    base = segment(0x10000000, size, Prot.READ | Prot.WRITE, "", ContentsKind.STORED)
    data = b"\x5a" * size
    out = io.BytesIO()
    writer = minimal_writer(out, (base,))
    writer.write_pages(base.start, data)
    finish(writer)
    pages = [r for r in read_all(out.getvalue()) if isinstance(r, Pages)]
    assert [len(p.data) for p in pages] == [MAX_PAGES_DATA, 3 * PAGE_SIZE]
    assert b"".join(p.data for p in pages) == data


# --- damaged and foreign input -------------------------------------------------------


def cut_points(image: bytes) -> list[int]:
    rng = random.Random(3)
    points = set(range(0, 40))  # inside the signature and the HEADER
    for section in sections(image):
        for delta in (-1, 0, 1, 4, 7, 8, 9, 12):  # around and inside each section head
            points.add(section.offset + delta)
        points.add(section.offset + section.size - 2)  # inside the CRC
        points.add(section.offset + 8 + len(section.payload) // 2)  # mid-payload
    points.update(rng.randrange(len(image)) for _ in range(150))
    return sorted(p for p in points if 0 <= p < len(image))


def test_every_truncation_is_an_image_error() -> None:
    points = cut_points(BUILT.image)
    assert len(points) > 300
    boundary_before_end = sections(BUILT.image)[-1].offset
    assert boundary_before_end in points
    for point in points:
        with pytest.raises(ImageError, match=r"truncated|not a CRF image"):
            read_all(BUILT.image[:point])
    with pytest.raises(ImageError, match=f"truncated at byte {boundary_before_end}, expected END"):
        read_all(BUILT.image[:boundary_before_end])


def test_a_flipped_bit_in_any_section_names_that_section() -> None:
    for section in sections(BUILT.image):
        # tag, length (low and high bits), first payload byte, last payload byte, crc
        positions = [0, 4, 7, 8, section.size - 5, section.size - 1]
        for position in positions:
            damaged = bytearray(BUILT.image)
            damaged[section.offset + position] ^= 0x10
            if section.tag == b"SPLC" and 16 <= position < section.size - 4:
                continue  # its data: not covered (test_spliced_pages_checksum_their_address)
            with pytest.raises(ImageError) as caught:
                read_all(bytes(damaged))
            # A damaged object section's tag is no tag: the message says an OBJECT was due.
            named = "OBJECT" if section.tag in OBJECT_TAGS and position == 0 else section.name
            assert named in str(caught.value), (section.name, position, caught.value)


def test_spliced_pages_checksum_their_address_not_their_data() -> None:
    spliced = next(s for s in sections(BUILT.image) if s.tag == b"SPLC")
    assert struct.unpack_from("<Q", spliced.payload)[0] == SPLICED
    assert spliced.payload[8:] == BUILT.memory[SPLICED]  # zero pages too: never seen
    at = spliced.offset + 8  # the address
    head_crc = zlib.crc32(BUILT.image[spliced.offset : at + 8])
    assert BUILT.image[spliced.offset + spliced.size - 4 :][:4] == struct.pack("<I", head_crc)
    damaged = bytearray(BUILT.image)
    damaged[at + 8 + 100] ^= 0x10  # a data byte: read as it is, unnoticed
    records = read_all(bytes(damaged))
    pages = next(r for r in records if isinstance(r, SplicedPages))
    assert pages.address == SPLICED and pages.data[100] != BUILT.memory[SPLICED][100]
    damaged = bytearray(BUILT.image)
    damaged[at + 1] ^= 0x10  # the address is
    with pytest.raises(ImageError, match="checksum mismatch in section SPLICED_PAGES"):
        read_all(bytes(damaged))


def test_a_splice_that_puts_the_wrong_length_fails_the_writer() -> None:
    out = io.BytesIO()
    writer = minimal_writer(out, the(Segments).segments)
    with pytest.raises(ImageError, match="spliced 4096 of 8192 bytes"):
        writer.write_spliced_pages(SPLICED, 2 * PAGE_SIZE, lambda length: out.write(bytes(4096)))
    with pytest.raises(ImageError, match="an earlier write failed"):
        writer.write(the(Thread))


def test_sections_out_of_order_are_refused() -> None:
    found = sections(BUILT.image)
    credentials, rlimits = found[1], found[3]  # (THREAD_CREDENTIALS between them)
    swapped = (
        BUILT.image[: credentials.offset]
        + BUILT.image[rlimits.offset : rlimits.offset + rlimits.size]
        + BUILT.image[credentials.offset : rlimits.offset]
        + BUILT.image[rlimits.offset + rlimits.size :]
    )
    message = f"section RLIMITS at byte {credentials.offset}: out of place, expected CREDENTIALS"
    with pytest.raises(ImageError, match=message):
        read_all(swapped)


def test_foreign_files_are_refused() -> None:
    with open(sys.executable, "rb") as elf:
        elf_head = elf.read(4096)
    assert elf_head.startswith(b"\x7fELF")
    for foreign in (elf_head, os.urandom(5000), b"", b"hello world\n", b"CRX\0\1\0\0\0"):
        with pytest.raises(ImageError, match="not a CRF image"):
            read_all(foreign)
    for other in (min(READABLE_VERSIONS) - 1, FORMAT_VERSION + 1):
        with pytest.raises(ImageError, match=f"unsupported CRF version {other}"):
            read_all(b"CRF\0" + struct.pack("<I", other) + BUILT.image[8:])


def test_trailing_data_is_refused_unless_the_image_is_embedded() -> None:
    with pytest.raises(ImageError, match="unexpected data after END"):
        read_all(BUILT.image + b"x")
    stream = io.BytesIO(BUILT.image + b"next message")
    assert isinstance(list(read_image(stream, require_eof=False))[-1], End)
    assert stream.read() == b"next message"


def test_absurd_lengths_are_refused_without_allocating_them() -> None:
    header = sections(BUILT.image)[0]
    payload = header.payload
    # HEADER: pid ppid pgid sid created_ns options (28 bytes), comm's length, comm, argv count.
    huge_string = payload[:28] + struct.pack("<I", 0xFFFFFFF0) + payload[32:]
    comm_length = struct.unpack_from("<I", payload, 28)[0]
    argv_count_at = 32 + comm_length
    huge_list = payload[:argv_count_at] + b"\xff\xff\xff\x7f" + payload[argv_count_at + 4 :]
    first_pages = next(s.offset for s in sections(BUILT.image) if s.tag == b"PAGE")
    cases = {
        "section length": BUILT.image[:8] + b"HEAD\xff\xff\xff\xff",
        "pages length": BUILT.image[:first_pages] + b"PAGE\xff\xff\xff\x00",
        "string length": replace_section(BUILT.image, header, frame(b"HEAD", huge_string)),
        "list count": replace_section(BUILT.image, header, frame(b"HEAD", huge_list)),
    }
    for case, image in cases.items():
        tracemalloc.start()
        with pytest.raises(ImageError, match=r"exceeds the limit|overruns") as caught:
            read_all(image)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 4 * MIB, (case, peak, caught.value)


def test_non_canonical_bytes_are_refused() -> None:
    files = next(s for s in sections(BUILT.image) if s.tag == b"FDS_")
    # FILES counting its objects, one descriptor: fd kind flags pos | cloexec |
    # mode dev ino description_id object_id path.
    before = struct.pack("<IIIBIq", the(Files).objects, 1, 7, FdKind.PIPE, 0, 0)
    after = struct.pack("<IQQQQI", 0, 0, 0, 1, 0, 1) + b"p"
    for cloexec, problem in ((b"\x02", "boolean byte is 2"), (b"\x01", None)):
        payload = before + cloexec + after
        image = replace_section(BUILT.image, files, frame(b"FDS_", payload))
        if problem is None:  # the same bytes with a valid bool read fine (END totals aside)
            with pytest.raises(ImageError, match="END says image_bytes"):
                read_all(image)
        else:
            with pytest.raises(ImageError, match=f"malformed section FILES.*{problem}"):
                read_all(image)
    extra = replace_section(BUILT.image, files, frame(b"FDS_", files.payload + b"\0"))
    with pytest.raises(ImageError, match="1 bytes left over"):
        read_all(extra)


def writer_at_pages() -> ImageWriter:
    """A writer of BUILT that has written everything up to the pages."""
    return minimal_writer(io.BytesIO(), the(Segments).segments)


def test_pages_outside_stored_segments_or_backwards_are_refused() -> None:
    with pytest.raises(ImageError, match="not inside one segment that holds"):
        writer_at_pages().write_pages(0x7F0000100000, b"\1" * PAGE_SIZE)  # a NONE segment
    writer = writer_at_pages()
    writer.write_pages(0x1001000, b"\1" * PAGE_SIZE)
    with pytest.raises(ImageError, match="overlap or precede"):
        writer.write_pages(0x1000000, b"\1" * PAGE_SIZE)
    with pytest.raises(ImageError, match="not whole pages"):
        writer_at_pages().write_pages(0x1002000, b"\1" * 100)

    first_pages = next(s for s in sections(BUILT.image) if s.tag == b"PAGE")
    moved = struct.pack("<Q", 0x7F0000100000) + first_pages.payload[8:]
    image = replace_section(BUILT.image, first_pages, frame(b"PAGE", moved))
    with pytest.raises(ImageError, match=r"malformed section PAGES.*not inside one segment"):
        read_all(image)


def test_writer_refuses_wrong_order_and_wrong_totals() -> None:
    with pytest.raises(
        ImageError, match="cannot write section CREDENTIALS: out of place, expected HEADER"
    ):
        ImageWriter(io.BytesIO()).write(the(Credentials))
    with pytest.raises(
        ImageError,
        match="expected PAGES or PAGE_REFERENCE or SPLICED_PAGES or SCATTERED_PAGES or THREAD",
    ):
        writer_at_pages().write(the(Files))
    writer = writer_at_pages()
    writer.write(the(Thread))
    with pytest.raises(ImageError, match="thread 4242 appears twice"):
        writer.write(the(Thread))
    writer = writer_at_pages()
    for record in BUILT.after_pages:
        writer.write(record)
    with pytest.raises(ImageError, match="END says records is 99"):
        writer.write(replace(BUILT.end, records=99))


def test_a_writer_that_failed_refuses_to_go_on() -> None:
    """Whatever it wrote before is not an image; going on would only hide that."""
    writer = writer_at_pages()
    with pytest.raises(ImageError, match="not inside one segment that holds"):
        writer.write_pages(0x7F0000100000, b"\1" * PAGE_SIZE)
    with pytest.raises(ImageError, match=r"an earlier write failed \(cannot write section PAGES"):
        writer.write(the(Thread))

    class Broken(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: object) -> int:
            raise BrokenPipeError("reader went away")

    with pytest.raises(BrokenPipeError):
        ImageWriter(Broken())  # the signature cannot go out


INVALID_RECORDS: dict[str, Callable[[], object]] = {
    "unaligned segment": lambda: segment(0x1001, 0x1000, Prot.READ, "", ContentsKind.NONE),
    "empty segment": lambda: segment(0x2000, 0, Prot.READ, "", ContentsKind.NONE),
    "FILE without identity": lambda: segment(0x1000, 0x1000, Prot.READ, "/x", ContentsKind.FILE),
    "partial page": lambda: Pages(address=0x1000, data=b"\1" * 100),
    "no pages": lambda: Pages(address=0x1000, data=b""),
    "63 signal actions": lambda: replace(the(SignalState), actions=the(SignalState).actions[:63]),
    "duplicate fd": lambda: Files(descriptors=the(Files).descriptors[:1] * 2),
    "no description": lambda: replace(the(Files).descriptors[0], description_id=0),
    "object id 0": lambda: TerminalObject(id=0, state=TERMINAL),
    "empty object data": lambda: ObjectData(id=1, offset=0, data=b""),
    "ghost of a socket": lambda: GhostFile(
        id=1, dev=1, ino=1, mode=0o140777, uid=0, gid=0, size=0, path="/s"
    ),
    "lock type": lambda: FileLock(kind=LockKind.POSIX, type=2, start=0, length=0),
    "flock on a range": lambda: FileLock(kind=LockKind.FLOCK, type=1, start=10, length=1),
    "locks of no description": lambda: FileLocks(id=1, description_id=0, signal=0, locks=()),
    "overlapping segments": lambda: Segments(segments=the(Segments).segments[:1] * 2),
    "umask": lambda: replace(the(Credentials), umask=0o1777),
}


@pytest.mark.parametrize("build", INVALID_RECORDS.values(), ids=INVALID_RECORDS.keys())
def test_invalid_records_cannot_be_built(build: Callable[[], object]) -> None:
    with pytest.raises(ImageError):
        build()


def test_unencodable_values_are_image_errors() -> None:
    header = the(ImageHeader)
    with pytest.raises(ImageError, match=r"ImageHeader.pid: .* does not fit in u32"):
        ImageWriter(io.BytesIO()).write(replace(header, pid=2**32))
    with pytest.raises(ImageError, match=r"ImageHeader.comm: string .* cannot be stored"):
        ImageWriter(io.BytesIO()).write(replace(header, comm="\ud800"))


SMALL = build_image(seed=11, heap_pages=8).image


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000) | st.binary(max_size=2000).map(lambda tail: SMALL[:8] + tail))
def test_arbitrary_bytes_raise_only_image_error(data: bytes) -> None:
    with pytest.raises(ImageError):
        read_all(data)


def read_or_refuse(image: bytes) -> None:
    """Reading `image` either raises ImageError or succeeds, and then it recodes to itself."""
    try:
        read_all(image)
    except ImageError:
        return
    out = io.BytesIO()
    recode(io.BytesIO(image), out)
    assert out.getvalue() == image


FLIPS = st.lists(st.tuples(st.integers(0, 2**32), st.integers(1, 255)), min_size=1, max_size=4)


def flip(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    damaged = bytearray(data)
    for position, mask in flips:
        if damaged:
            damaged[position % len(damaged)] ^= mask
    return bytes(damaged)


@settings(max_examples=200, deadline=None)
@given(FLIPS, st.none() | st.integers(0, len(SMALL)))
def test_mutated_images_raise_only_image_error(
    flips: list[tuple[int, int]], cut: int | None
) -> None:
    read_or_refuse(flip(SMALL, flips)[:cut])


SMALL_SECTIONS = sections(SMALL)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(SMALL_SECTIONS),
    FLIPS,
    st.none() | st.integers(0, 300),
    st.binary(max_size=8),
)
def test_rechecksummed_mutations_raise_only_image_error(
    section: Section, flips: list[tuple[int, int]], cut: int | None, extra: bytes
) -> None:
    """Damage behind a valid checksum: the field decoders themselves must hold."""
    payload = flip(section.payload, flips)[:cut] + extra
    read_or_refuse(replace_section(SMALL, section, frame(section.tag, payload)))


# --- streams -------------------------------------------------------------------------


def test_writing_and_reading_through_a_pipe() -> None:
    """Unbuffered pipe ends: short reads and writes, and no seeking possible."""
    read_end, write_end = os.pipe()
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            with os.fdopen(write_end, "wb", buffering=0) as sink:
                recode(io.BytesIO(BUILT.image), sink)
        except BaseException as error:  # handed to the main thread
            errors.append(error)

    producer = threading.Thread(target=produce)
    producer.start()
    with os.fdopen(read_end, "rb", buffering=0) as source:
        assert not source.seekable()
        records = list(read_image(source))
    producer.join()
    assert not errors
    assert [r for r in records if not isinstance(r, Pages)] == BUILT.records


def test_reader_yields_records_before_the_stream_ends() -> None:
    """A restorer acts on each record as it arrives: nothing waits for END."""

    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._data = data
            self.position = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: memoryview) -> int:
            size = min(len(buffer), 1000, len(self._data) - self.position)
            buffer[:size] = self._data[self.position : self.position + size]
            self.position += size
            return size

    stream = Trickle(BUILT.image)
    records = read_image(stream)
    header = next(records)
    assert header == the(ImageHeader)
    assert stream.position < 2000
    iterator: Iterator[Record] = records
    # A SCATTERED_PAGES section comes as one Pages record per run.
    scattered = next(s for s in sections(BUILT.image) if s.tag == b"SCAT")
    (runs,) = struct.unpack_from("<I", scattered.payload)
    assert sum(1 for _ in iterator) == len(sections(BUILT.image)) - 1 + runs - 1


# --- summary -------------------------------------------------------------------------


def test_summary_and_its_json() -> None:
    summary = summarize(read_image(io.BytesIO(BUILT.image)))
    document = summary_to_json(summary)
    assert json.loads(json.dumps(document)) == document
    assert set(document) == {
        "summary_version",
        "format_version",
        "image_bytes",
        "process",
        "threads",
        "memory",
        "descriptors",
        "objects",
        "settings",
        "timers",
        "pages",
        "rounds",
    }
    assert document["image_bytes"] == len(BUILT.image)
    assert document["rounds"] == []
    settings = document["settings"]
    assert isinstance(settings, dict) and settings["oom_score_adj"] == -17
    assert settings["threads"] == [
        {"tid": 4242, "policy": 3, "priority": 0, "nice": -5, "affinity": [0, 2, 3]},
        {"tid": 4243, "policy": 1, "priority": 42, "nice": 0, "affinity": [1]},
    ]
    process = document["process"]
    assert isinstance(process, dict)
    assert process["options"] == ["NO_SHARED_LIBS"]
    assert (process["pid"], process["comm"]) == (4242, "server")
    assert (process["uid"], process["cwd"], process["root"]) == (1000, "/srv/data", "/")
    assert [t.tid for t in summary.threads] == [4242, 4243, 4244]
    end = BUILT.end
    totals = {"stored": end.pages_stored, "zero": end.pages_zero, "untouched": 77, "file": 0x22}
    totals["referenced"] = BUILT.reference.pages
    assert document["pages"] == totals
    assert sum(row.stored_bytes for row in summary.memory) == end.pages_stored * PAGE_SIZE
    memory = document["memory"]
    assert isinstance(memory, list)
    assert memory[0] == {
        "start": "0x400000",
        "end": "0x402000",
        "size": 0x2000,
        "perms": "r-xp",
        "path": "/usr/bin/server",
        "contents": "FILE",
        "stored_bytes": 0,
    }
    descriptors = document["descriptors"]
    assert isinstance(descriptors, list)
    socket = next(d for d in descriptors if isinstance(d, dict) and d["kind"] == "SOCKET")
    assert isinstance(socket, dict)
    assert (socket["description_id"], socket["object_id"], socket["details"]) == (4, 2, "")
    objects = document["objects"]
    assert isinstance(objects, list)
    assert objects[1] == {
        "record": "InetSocket",
        "id": 2,
        "family": 2,
        "type": 1,
        "protocol": 6,
        "state": 1,
        "local_address": "127.0.0.1:6379",
        "remote_address": "127.0.0.1:51000",
        "data_bytes": 0,
    }
    assert objects[0]["state"]["c_cc"] == TERMINAL.c_cc.hex()  # type: ignore[index]
    assert objects[3] == {
        "record": "EventfdObject",
        "id": 4,
        "count": 7,
        "semaphore": True,
        "data_bytes": 100 + len("after a hole"),
    }
    assert objects[8]["locks"][1] == {  # type: ignore[index]
        "kind": "POSIX",
        "type": 1,
        "start": 10,
        "length": 10,
    }
    assert objects[9]["output"] == b"\x00out\r\n".hex()  # type: ignore[index]
    assert objects[11] == {
        "record": "PipeObject",
        "id": 12,
        "pipe_size": 1 << 20,
        "packets": [],
        "outside_pid": 0,
        "data_bytes": len("queued in a self-pipe"),
    }
    assert objects[15]["messages"] == [  # type: ignore[index]
        {"mtype": 2, "text": b"first\0".hex()},
        {"mtype": 2**63, "text": ""},
    ]
    [ghost] = [o for o in objects if isinstance(o, dict) and o["record"] == "GhostFile"]
    assert ghost["data_bytes"] == len("the tail after a hole")
    # Every object record once, ObjectData counted in its object's data_bytes.
    records = [r for r in BUILT.records if isinstance(r, records_module.ObjectRecord)]
    assert len(objects) == len([r for r in records if not isinstance(r, ObjectData)])


def test_summary_of_an_incomplete_stream_is_an_image_error() -> None:
    with pytest.raises(ImageError, match="incomplete image"):
        summarize(BUILT.before_pages)


# --- docs/crf.md is the spec: its tables must say what the code does -----------------

SPEC = (Path(__file__).parent.parent / "docs" / "crf.md").read_text()


def spec_tables() -> dict[str, list[list[str]]]:
    """Every table of the spec that follows a '#### `Name`' heading, as rows of cells."""
    tables: dict[str, list[list[str]]] = {}
    for match in re.finditer(r"^#### `(\w+)`\n(.*?)(?=^#|\Z)", SPEC, re.M | re.S):
        rows = [
            [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
            for line in match.group(2).splitlines()
            if line.startswith("|") and not line.startswith("|---")
        ]
        tables[match.group(1)] = rows
    return tables


def test_spec_tables_match_the_records() -> None:
    tables = spec_tables()
    documented = set()
    for name, rows in tables.items():
        cls = getattr(records_module, name)
        header, *body = rows
        if header == ["offset", "field", "type", "meaning"]:
            codec = struct_codec(cls)
            offset: int | None = 0
            expected = []
            for field, field_codec in codec.fields:
                expected.append(
                    [str(offset) if offset is not None else "…", field, field_codec.spec_type]
                )
                fixed = offset is not None and field_codec.fixed
                offset = offset + field_codec.min_size if fixed else None
            assert [row[:3] for row in body] == expected, name
        else:
            assert header == ["value", "name", "meaning"], name
            assert [row[:2] for row in body] == [[str(m.value), m.name] for m in cls], name
        documented.add(name)
    declared = {
        name
        for name, value in vars(records_module).items()
        if isinstance(value, type)
        and value.__module__ == records_module.__name__
        and (is_dataclass(value) or issubclass(value, enum.Enum))
    }
    # PAGES and OBJECT_DATA have their own tables: their data is unframed.
    assert declared - documented == {"Pages", "SplicedPages", "ScatteredPages", "ObjectData"}


def test_spec_section_table_matches_the_codec() -> None:
    rows = re.findall(r"^\| ([A-Z_]+) \| `(.{4})` \|", SPEC, re.M)
    assert rows == [(kind.name, kind.value.decode()) for kind in SectionKind]


def test_spec_json_example_has_the_keys_of_summary_to_json() -> None:
    example = json.loads(re.search(r"```json\n(.*?)```", SPEC, re.S).group(1))
    actual = summary_to_json(summarize(read_image(io.BytesIO(BUILT.image))))

    def shape(value: object) -> object:
        if isinstance(value, dict):
            return {key: shape(item) for key, item in value.items()}
        if isinstance(value, list):
            return [shape(value[0])] if value else []
        return type(value).__name__

    actual["descriptors"] = [d for d in actual["descriptors"] if d["kind"] == "SOCKET"]
    actual["objects"] = [o for o in actual["objects"] if o["record"] == "InetSocket"]
    assert shape(example) == shape(actual)


# --- pre-copy rounds (docs/crf.md §7a) ------------------------------------------------


def write_round(number: int, segments: tuple[Segment, ...], pages: bytes) -> bytes:
    out = io.BytesIO()
    writer = ImageWriter(out)
    writer.write(Round(pid=4242, number=number))
    writer.write(Segments(segments=segments))
    writer.write_pages(segments[0].start, pages, keep_zero_pages=True)
    writer.close()
    return out.getvalue()


def test_a_precopy_round_round_trips_and_stops_at_its_end() -> None:
    base = segment(0x10000000, 4 * PAGE_SIZE, Prot.READ | Prot.WRITE, "", ContentsKind.STORED)
    pages = bytes(PAGE_SIZE) + b"\1" * PAGE_SIZE  # a zero page kept: it may overwrite data
    data = write_round(3, (base,), pages)
    stream = io.BytesIO(data + b"what follows in the move's stream")
    records = list(read_round(stream))
    assert [type(r) for r in records] == [Round, Segments, Pages, End]
    assert records[0] == Round(pid=4242, number=3)
    assert records[2] == Pages(address=base.start, data=pages)
    end = records[3]
    assert isinstance(end, End) and (end.pages_stored, end.records) == (2, 3)
    assert stream.read() == b"what follows in the move's stream"


def test_a_round_and_an_image_keep_to_their_own_grammars() -> None:
    base = segment(0x10000000, PAGE_SIZE, Prot.READ | Prot.WRITE, "", ContentsKind.STORED)
    round_bytes = write_round(0, (base,), b"\1" * PAGE_SIZE)
    with pytest.raises(ImageError, match="out of place, expected HEADER"):
        read_all(round_bytes)
    with pytest.raises(ImageError, match="out of place, expected ROUND"):
        list(read_round(io.BytesIO(BUILT.image)))
    writer = ImageWriter(io.BytesIO())
    writer.write(Round(pid=1, number=0))
    with pytest.raises(ImageError, match="out of place, expected SEGMENTS"):
        writer.write(BUILT.before_pages[0])
    cut = round_bytes[:-END_SECTION_SIZE]
    with pytest.raises(ImageError, match="expected PAGES or END"):
        list(read_round(io.BytesIO(cut)))


def test_a_final_image_holds_pages_of_precopied_segments_but_not_of_none() -> None:
    precopied = segment(
        0x10000000, 8 * PAGE_SIZE, Prot.READ | Prot.WRITE, "", ContentsKind.PRECOPIED
    )
    empty = segment(0x20000000, PAGE_SIZE, Prot.READ, "", ContentsKind.NONE)
    out = io.BytesIO()
    writer = minimal_writer(out, (precopied, empty))
    writer.write_pages(precopied.start + 2 * PAGE_SIZE, bytes(PAGE_SIZE), keep_zero_pages=True)
    with pytest.raises(ImageError, match="not inside one segment that holds pages"):
        writer.write_pages(empty.start, b"\1" * PAGE_SIZE)
    writer = minimal_writer(out := io.BytesIO(), (precopied, empty))
    writer.write_pages(precopied.start + 2 * PAGE_SIZE, bytes(PAGE_SIZE), keep_zero_pages=True)
    end = finish(writer)
    records = read_all(out.getvalue())
    (segments,) = [r for r in records if isinstance(r, Segments)]
    assert segments.segments[0].contents is ContentsKind.PRECOPIED
    assert [r for r in records if isinstance(r, Pages)] == [
        Pages(address=precopied.start + 2 * PAGE_SIZE, data=bytes(PAGE_SIZE))
    ]
    assert end.pages_stored == 1
    recoded = io.BytesIO()
    recode(io.BytesIO(out.getvalue()), recoded)
    assert recoded.getvalue() == out.getvalue()


class Dribble:
    """A stream that gives at most 3 bytes a read, as a pipe may."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def read(self, size: int = -1) -> bytes:
        size = 3 if size < 0 else min(size, 3)
        taken, self.data = self.data[:size], self.data[size:]
        return taken


def test_a_snapshot_file_of_rounds_recodes_is_told_from_an_image_and_summarized() -> None:
    """docs/crf.md §7a "In a file": `{ ROUND } IMAGE`, read as it comes (no seeking)."""
    precopied = segment(
        0x10000000, 4 * PAGE_SIZE, Prot.READ | Prot.WRITE, "", ContentsKind.PRECOPIED
    )
    base = replace(precopied, contents=ContentsKind.STORED)
    rounds = write_round(0, (base,), b"\1" * 4 * PAGE_SIZE) + write_round(
        1, (base,), b"\2" * PAGE_SIZE
    )
    out = io.BytesIO()
    writer = minimal_writer(out, (precopied,))
    writer.write_pages(precopied.start + PAGE_SIZE, bytes(PAGE_SIZE), keep_zero_pages=True)
    finish(writer)
    whole = rounds + out.getvalue()
    stream, is_round = next_is_round(cast(BinaryIO, Dribble(whole)))
    assert is_round
    stream, count = skip_rounds(stream)
    assert count == 2
    assert sum(isinstance(r, Pages) for r in read_image(stream)) == 1
    assert not next_is_round(io.BytesIO(BUILT.image))[1]
    assert [p.data[:1] for p in round_pages(io.BytesIO(whole))] == [b"\1", b"\2"]
    recoded = io.BytesIO()
    recode(io.BytesIO(whole), recoded)
    assert recoded.getvalue() == whole
    stream, _ = next_is_round(io.BytesIO(whole))
    totals = [summarize_rounds(read_round(stream)) for _ in range(2)]
    summary = summarize(read_image(stream), rounds=totals)
    assert [r.pages for r in summary.rounds] == [4, 1]
    assert summary.image_bytes == len(whole)
    # Round 0's four pages and the image's one inside them: four distinct pages.
    assert summary.memory[0].stored_bytes == 4 * PAGE_SIZE


# --- terminals ------------------------------------------------------------------------


def test_a_terminal_object_round_trips_in_its_documented_layout() -> None:
    terminal = TerminalObject(id=7, state=TERMINAL)
    out = bytearray()
    struct_codec(TerminalObject).encode(terminal, out)
    # id, then the TerminalState: 4 u32, u8, 19 bytes, 4 u16, bool.
    assert bytes(out) == struct.pack(
        "<Q4IB19s4H?", 7, 0o2400, 0o5, 0o277, 0o105073, 0, TERMINAL.c_cc, 33, 97, 0, 0, True
    )
    assert struct_codec(TerminalObject).decode(Cursor(bytes(out))) == terminal
    with pytest.raises(ImageError):
        struct_codec(TerminalState).encode(replace(TERMINAL, c_cc=b"short"), bytearray())


def test_object_data_is_laid_out_like_pages() -> None:
    found = [s for s in sections(BUILT.image) if s.tag == b"ODAT"]
    assert [s.payload[:16] for s in found] == [
        struct.pack("<QQ", 4, 0),
        struct.pack("<QQ", 4, 4096),
        struct.pack("<QQ", 11, 0),
        struct.pack("<QQ", 12, 0),
        struct.pack("<QQ", 13, 0),
        struct.pack("<QQ", 19, 8192),
        struct.pack("<QQ", 20, 0),
        struct.pack("<QQ", 22, 0),
    ]
    assert found[1].payload[16:] == b"after a hole"


def image_with_objects(objects: list[Record], count: int | None = None) -> bytes:
    """BUILT up to FILES (counting `count` object sections), `objects`, then a THREAD."""
    files = replace(the(Files), objects=len(objects) if count is None else count)
    out = io.BytesIO()
    writer = ImageWriter(out)
    head = BUILT.before_pages[: BUILT.before_pages.index(the(Files))]
    for record in (*head, files, *objects, the(Thread)):
        writer.write(record)
    return out.getvalue()


def test_object_sections_are_checked_against_files() -> None:
    every = [r for r in BUILT.before_pages if isinstance(r, records_module.ObjectRecord)]
    terminal, inet = every[0], every[1]
    eventfd = EventfdObject(id=4, count=0, semaphore=False)
    cases: dict[str, list[Record]] = {
        "more object sections than the 1 FILES counts": [terminal, inet],
        "object 1 appears twice": [terminal, terminal],
        "data of object 4, which no object record before it has": [
            ObjectData(id=4, offset=0, data=b"x")
        ],
        "FILES counts 3 object sections, 2 follow": [terminal, inet],
        "descriptors refer to object 3, which is not in the image": [terminal, inet, eventfd],
        "data of object 4 at offset 12 overlaps or precedes the data before it": [
            eventfd,
            ObjectData(id=4, offset=10, data=b"abc"),
            ObjectData(id=4, offset=12, data=b"abc"),
        ],
    }
    counts = {"more object": 1, "FILES counts 3": 3}
    for message, objects in cases.items():
        count = next((n for start, n in counts.items() if message.startswith(start)), None)
        with pytest.raises(ImageError, match=message):
            image_with_objects(objects, count)
    assert image_with_objects(every)  # the objects FILES counts, each once: accepted


def member_image(
    pid: int,
    pages: Callable[[ImageWriter, Segment], None],
    referable: frozenset[int] | None = None,
) -> bytes:
    """A small image of process `pid`: one STORED segment, what `pages` writes in it."""
    stored = segment(0x10000000, 4 * PAGE_SIZE, Prot.READ | Prot.WRITE, "", ContentsKind.STORED)
    out = io.BytesIO()
    writer = ImageWriter(out, referable=referable)
    writer.write(replace(the(ImageHeader), pid=pid))
    at = BUILT.before_pages.index(the(Segments))
    for record in BUILT.before_pages[1:at]:
        writer.write(record)
    writer.write(Segments(segments=(stored,)))
    for record in BUILT.before_pages[at + 1 :]:
        writer.write(record)
    pages(writer, stored)
    finish(writer)
    return out.getvalue()


def tree_of(*pids: int) -> bytes:
    """A tree stream's head: `pids` the root and its children."""
    out = io.BytesIO()
    writer = ImageWriter(out)
    writer.write(
        Tree(
            members=tuple(
                TreeMember(
                    pid=pid,
                    ppid=pids[0] if index else 1,
                    pgid=pids[0],
                    sid=pids[0],
                    exit_signal=17,
                    exit_code=0,
                    state=MemberState.RUNNING,
                    comm="member",
                )
                for index, pid in enumerate(pids)
            )
        )
    )
    writer.close()
    return out.getvalue()


def test_page_references_name_a_member_before_and_only_in_a_tree_stream() -> None:
    def own(writer: ImageWriter, stored: Segment) -> None:
        writer.write_pages(stored.start, b"\1" * 2 * PAGE_SIZE)

    def referring(writer: ImageWriter, stored: Segment) -> None:
        writer.write_pages(stored.start, b"\2" * PAGE_SIZE)
        writer.write(PageReference(address=stored.start + PAGE_SIZE, pages=2, pid=10, source=0))
        writer.write_pages(stored.start + 3 * PAGE_SIZE, b"\3" * PAGE_SIZE)

    parent, child = member_image(10, own), member_image(11, referring)
    records = list(read_stream(io.BytesIO(tree_of(10, 11) + parent + child)))
    (reference,) = [r for r in records if isinstance(r, PageReference)]
    assert (reference.pid, reference.pages) == (10, 2)
    summary = summarize_stream(read_stream(io.BytesIO(tree_of(10, 11) + parent + child)))
    assert isinstance(summary, TreeSummary) and summary.pages_referenced == 2
    with pytest.raises(ImageError, match="refer to process 10, not a member whose image came"):
        list(read_stream(io.BytesIO(tree_of(11, 10) + child + parent)))
    with pytest.raises(ImageError, match="refer to process 10, not a member"):
        list(read_stream(io.BytesIO(child)))  # a lone image refers to no other
    assert any(isinstance(r, PageReference) for r in read_all(child))  # a member's, read alone
    with pytest.raises(ImageError, match="refer to process 10"):
        member_image(11, referring, referable=frozenset({12}))

    def overlapping(writer: ImageWriter, stored: Segment) -> None:
        writer.write_pages(stored.start, b"\2" * 2 * PAGE_SIZE)
        writer.write(PageReference(address=stored.start + PAGE_SIZE, pages=1, pid=10, source=0))

    with pytest.raises(ImageError, match="overlap or precede"):
        member_image(11, overlapping)
    with pytest.raises(ImageError, match="is not 1 to 2048"):
        PageReference(address=0, pages=0, pid=1, source=0)


def test_contexts_a_tree_member_shares_with_its_parent_round_trip() -> None:
    head = tree_of(10, 11, 12)
    (tree,) = [r for r in read_all_stream(head) if isinstance(r, Tree)]
    shared = replace(
        tree, contexts=(SharedContext(pid=12, flags=CloneFlags.FILES | CloneFlags.FS),)
    )
    out = io.BytesIO()
    writer = ImageWriter(out)
    writer.write(shared)
    writer.close()
    (again,) = [r for r in read_all_stream(out.getvalue()) if isinstance(r, Tree)]
    assert again == shared
    with pytest.raises(ImageError, match="not a member below the root"):
        replace(tree, contexts=(SharedContext(pid=10, flags=CloneFlags.FILES),))
    with pytest.raises(ImageError, match="listed twice"):
        replace(tree, contexts=(SharedContext(pid=11, flags=CloneFlags.FS),) * 2)


def read_all_stream(head: bytes) -> list[Record]:
    """The records of a tree stream's head (TREE and END), read as read_stream reads one."""
    records = read_stream(io.BytesIO(head + member_image(10, lambda w, s: None)))
    return [next(records), next(records)]


# --- scattered pages -------------------------------------------------------------------


def test_scattered_pages_keep_to_the_rules_of_pages() -> None:
    one, two = bytes(PAGE_SIZE), bytes(2 * PAGE_SIZE)
    with pytest.raises(ImageError, match="overlaps or precedes the run before it"):
        writer_at_pages().write_scattered_pages(
            [(SCATTERED + 2 * PAGE_SIZE, PAGE_SIZE), (SCATTERED, PAGE_SIZE)], two
        )
    with pytest.raises(ImageError, match="not inside one segment that holds"):
        writer_at_pages().write_scattered_pages(
            [(SCATTERED, PAGE_SIZE), (SCATTERED + 0x21000, PAGE_SIZE)], two
        )
    with pytest.raises(ImageError, match="bytes of data for runs of"):
        writer_at_pages().write_scattered_pages([(SCATTERED, PAGE_SIZE)], two)
    writer = writer_at_pages()
    writer.write_scattered_pages([(SCATTERED + PAGE_SIZE, PAGE_SIZE)], one)
    with pytest.raises(ImageError, match="overlap or precede"):
        writer.write_pages(SCATTERED, b"\1" * PAGE_SIZE)  # below the section's last run

    # Read: a run moved out of its segment (checksum made right again) is refused.
    scattered = next(s for s in sections(BUILT.image) if s.tag == b"SCAT")
    moved = bytearray(scattered.payload)
    (count,) = struct.unpack_from("<I", moved)
    struct.pack_into("<Q", moved, 8 + 16 * (count - 1), 0x7FFC00100000)  # the last, into [vvar]
    image = replace_section(BUILT.image, scattered, frame(b"SCAT", bytes(moved)))
    with pytest.raises(ImageError, match=r"malformed section SCATTERED_PAGES.*not inside one"):
        read_all(image)


@contextlib.contextmanager
def written_before_10() -> Iterator[None]:
    """Images written meanwhile lay out what version 10 changed as older versions did (their
    version in the signature is for the caller to write)."""
    saved = dict(codec_module._SECTIONS)
    codec_module._SECTIONS.update(codec_module._BEFORE_10)
    try:
        yield
    finally:
        codec_module._SECTIONS.update(saved)


@contextlib.contextmanager
def written_before_9() -> Iterator[None]:
    """Images written meanwhile lay out what versions 9 and 10 changed as older versions
    did."""
    saved = dict(codec_module._SECTIONS)
    codec_module._SECTIONS.update(codec_module._BEFORE_9)
    try:
        with written_before_10():
            yield
    finally:
        codec_module._SECTIONS.update(saved)


def test_a_version_6_image_is_read() -> None:
    """Version 7 only added SCATTERED_PAGES: an image written before it reads as it did."""
    out = io.BytesIO()
    with written_before_9():
        writer = minimal_writer(out, the(Segments).segments)
        writer.write_pages(0x1001000, b"\1" * PAGE_SIZE)
        finish(writer)
    image = out.getvalue()
    older = image[:4] + struct.pack("<I", 6) + image[8:]
    pages = [record for record in read_all(older) if isinstance(record, Pages)]
    assert pages == [Pages(address=0x1001000, data=b"\1" * PAGE_SIZE)]


def test_a_version_8_image_reads_its_connections_as_all_sent() -> None:
    """Version 9 added TcpConnection.unsent_bytes, at its end: a version 8 image's
    connections, without it, read with 0 (their whole send queue put back as sent, as
    they were restored then)."""
    with written_before_9():
        image = build_image().image
    older = image[:4] + struct.pack("<I", 8) + image[8:]
    connections = [record for record in read_all(older) if isinstance(record, TcpConnection)]
    assert connections == [dataclasses.replace(the(TcpConnection), unsent_bytes=0)]
    with pytest.raises(ImageError, match="TCP_CONNECTION"):
        read_all(image)  # the shorter record, read as version 9's


def test_a_connection_never_sent_more_than_its_send_queue_is_refused() -> None:
    with pytest.raises(ImageError, match="4 bytes never sent of a send queue of 3"):
        dataclasses.replace(the(TcpConnection), unsent_bytes=4)


# --- thread credentials ----------------------------------------------------------------


def test_a_version_9_image_reads_its_memory_objects_bytes_as_its_own() -> None:
    """Version 10 added bytes_in at the end of GhostFile, MemfdObject and SharedAnonymous:
    a version 9 image's records, without it, read with 0 (their bytes in the image)."""
    kinds = (GhostFile, MemfdObject, SharedAnonymous)
    with written_before_10():
        image = build_image().image
    older = image[:4] + struct.pack("<I", 9) + image[8:]
    objects = [record for record in read_all(older) if isinstance(record, kinds)]
    assert objects == [the(kind) for kind in kinds]
    assert all(record.bytes_in == 0 for record in objects)
    with pytest.raises(ImageError, match="GHOST_FILE"):
        read_all(image)  # the shorter record, read as version 10's


def test_thread_credentials_name_threads_of_the_image_once() -> None:
    """THREAD_CREDENTIALS (version 8) come after CREDENTIALS, each naming a thread the
    image has, once; an image of version 7 (none such) reads as it did."""
    own = the(ThreadCredentials)
    at = BUILT.before_pages.index(own)
    for records, error in (
        # Twice the same thread.
        (
            [*BUILT.before_pages[: at + 1], own, *BUILT.before_pages[at + 1 :]],
            "credentials of thread 4243 appear twice",
        ),
        # A thread the image does not have.
        (
            [
                *BUILT.before_pages[:at],
                replace(own, tid=4299),
                *BUILT.before_pages[at + 1 :],
            ],
            r"credentials of threads \[4299\], which the image does not have",
        ),
    ):
        out = io.BytesIO()
        with pytest.raises(ImageError, match=error):
            writer = ImageWriter(out)
            for record in records:
                writer.write(record)
            finish(writer)
    # After RLIMITS: out of place.
    out = io.BytesIO()
    writer = ImageWriter(out)
    rlimits = BUILT.before_pages.index(the(Rlimits))
    for record in BUILT.before_pages[: rlimits + 1]:
        if record is not own:
            writer.write(record)
    with pytest.raises(ImageError, match="out of place"):
        writer.write(own)
    # Version 7, without them.
    out = io.BytesIO()
    with written_before_9():
        writer = ImageWriter(out)
        for record in BUILT.before_pages:
            if record is not own:
                writer.write(record)
        finish(writer)
    image = out.getvalue()
    older = image[:4] + struct.pack("<I", 7) + image[8:]
    assert not [r for r in read_all(older) if isinstance(r, ThreadCredentials)]
