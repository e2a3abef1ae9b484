"""The records of a CRF image: one frozen dataclass per section (docs/crf.md).

Field names are the kernel's (user_regs_struct, /proc/PID/maps, fdinfo,
struct sigaction, struct rlimit, prctl_mm_map). Each field's annotation is also
its on-disk layout (see hijack.image.fields): `U64` is a little-endian u64,
`tuple[X, ...]` a u32 count then the items, and so on, in declaration order.
Fixed-size fields come first, so most of them sit at fixed offsets. Records are
keyword-only because field order is layout. Constructors check what a single
record can check (alignment, ordering, counts) and raise ImageError, so an
invalid record can neither be written nor read.
"""

from __future__ import annotations

import enum
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Annotated

from hijack.errors import ImageError
from hijack.image.fields import Fixed, SInt, UInt

U8 = Annotated[int, UInt(1)]
U16 = Annotated[int, UInt(2)]
U32 = Annotated[int, UInt(4)]
U64 = Annotated[int, UInt(8)]
I64 = Annotated[int, SInt(8)]
I32 = Annotated[int, SInt(4)]
# A raw kernel siginfo_t (always 128 bytes on Linux), kept opaque: restore hands
# it back to rt_sigqueueinfo / PTRACE_SETSIGINFO unchanged.
SIGINFO_SIZE = 128
Siginfo = Annotated[bytes, Fixed(SIGINFO_SIZE)]

PAGE_SIZE = 4096
MAX_PAGES_DATA = 8 * 1024 * 1024  # bytes of page data in one Pages record
RLIM_INFINITY = 2**64 - 1
SIGNAL_COUNT = 64  # signals 1..64 (_NSIG - 1)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ImageError(message)


def _page_aligned(address: int) -> bool:
    return address % PAGE_SIZE == 0


class DumpOptions(enum.IntFlag):
    """What the dumper was asked to leave out (`hijack dump --no-binary ...`)."""

    NO_BINARY = 1  # the executable's pages are mapped from the file at restore
    NO_SHARED_LIBS = 2  # so are the shared libraries'


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageHeader:
    pid: U32
    ppid: U32
    pgid: U32
    sid: U32
    created_ns: U64  # CLOCK_REALTIME when the dump started
    options: Annotated[DumpOptions, UInt(4)]
    comm: str
    argv: tuple[str, ...]
    exe: str  # /proc/PID/exe target
    node: str  # uname nodename of the machine that dumped


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    uid: U32
    euid: U32
    suid: U32
    fsuid: U32
    gid: U32
    egid: U32
    sgid: U32
    fsgid: U32
    cap_inheritable: U64
    cap_permitted: U64
    cap_effective: U64
    cap_bounding: U64
    cap_ambient: U64
    umask: U32
    no_new_privs: bool
    groups: tuple[U32, ...]  # supplementary groups

    def __post_init__(self) -> None:
        _require(self.umask <= 0o777, f"Credentials: umask {self.umask:#o} is not a mode")


@dataclass(frozen=True, slots=True, kw_only=True)
class ThreadCredentials:
    """The credentials of a thread whose own differ from its process's (CREDENTIALS, the
    leader's): the kernel keeps ids, capabilities and no_new_privs per thread, and a thread
    may change its own (a raw setresuid(2), capset(2), prctl(2))."""

    tid: U32
    credentials: Credentials


@dataclass(frozen=True, slots=True, kw_only=True)
class Rlimit:
    resource: U32  # RLIMIT_* number
    rlim_cur: U64  # soft limit; RLIM_INFINITY for none
    rlim_max: U64  # hard limit


@dataclass(frozen=True, slots=True, kw_only=True)
class Rlimits:
    limits: tuple[Rlimit, ...]

    def __post_init__(self) -> None:
        resources = [limit.resource for limit in self.limits]
        _require(
            resources == sorted(set(resources)),
            "Rlimits: resources must be unique and in ascending order",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class AuxvEntry:
    a_type: U64  # AT_* number
    a_val: U64


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryStructure:
    """The mm's layout, as prctl(PR_SET_MM_MAP) takes it back at restore."""

    start_code: U64
    end_code: U64
    start_data: U64
    end_data: U64
    start_brk: U64
    brk: U64
    start_stack: U64
    arg_start: U64
    arg_end: U64
    env_start: U64
    env_end: U64
    personality: U32
    auxv: tuple[AuxvEntry, ...]
    exe_file: str


class Prot(enum.IntFlag):
    READ = 1  # PROT_READ
    WRITE = 2  # PROT_WRITE
    EXEC = 4  # PROT_EXEC


class ContentsKind(enum.IntEnum):
    """Where a segment's bytes come from at restore."""

    STORED = 1  # its non-zero pages follow in PAGES sections
    FILE = 2  # mapped from the backing file (checked against a FileIdentity); PAGES hold
    #           only the pages the process changed (copied on write)
    NONE = 3  # nothing to restore: zero-filled, or made by the kernel (vvar, vdso)
    PRECOPIED = 4  # only in a move's final image: the pre-copy rounds sent its pages; PAGES
    #                hold the pages changed since (zero pages included)


@dataclass(frozen=True, slots=True, kw_only=True)
class FileIdentity:
    """What a restore checks before mapping a file instead of stored pages."""

    size: U64
    mtime_ns: I64
    path: str
    build_id: bytes  # the ELF NT_GNU_BUILD_ID note, empty if none


@dataclass(frozen=True, slots=True, kw_only=True)
class Segment:
    """One VMA, a line of /proc/PID/maps plus its smaps VmFlags."""

    start: U64
    end: U64
    prot: Annotated[Prot, UInt(1)]
    shared: bool  # 's' (MAP_SHARED) rather than 'p' in the perms column
    offset: U64  # file offset of `start`, in bytes
    dev_major: U32
    dev_minor: U32
    inode: U64
    contents: Annotated[ContentsKind, UInt(1)]
    path: str  # "", a file, or a pseudo path such as "[heap]", "[stack]", "[vdso]"
    vm_flags: tuple[str, ...]  # two-letter smaps codes: "rd", "wr", "mr", "gd", ...
    file: FileIdentity | None  # present exactly when contents is FILE

    def __post_init__(self) -> None:
        where = f"Segment {self.start:#x}-{self.end:#x}"
        _require(self.start < self.end, f"{where}: start is not below end")
        _require(
            _page_aligned(self.start) and _page_aligned(self.end), f"{where}: not page-aligned"
        )
        _require(
            (self.contents is ContentsKind.FILE) == (self.file is not None),
            f"{where}: a FileIdentity is required for FILE contents and only for them",
        )

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def perms(self) -> str:
        """The perms column of /proc/PID/maps, e.g. "r-xp"."""
        return "".join(
            (
                "r" if self.prot & Prot.READ else "-",
                "w" if self.prot & Prot.WRITE else "-",
                "x" if self.prot & Prot.EXEC else "-",
                "s" if self.shared else "p",
            )
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Segments:
    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        for before, after in zip(self.segments, self.segments[1:], strict=False):
            _require(
                before.end <= after.start,
                f"Segments: {after.start:#x} overlaps or precedes the segment before it",
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class Pages:
    """Contents of consecutive pages of one STORED or FILE segment.

    Its layout is the address (u64) then the data up to the end of the section,
    with no length prefix, so the writer can stream the data without copying it.
    """

    address: int
    data: bytes

    def __post_init__(self) -> None:
        where = f"Pages at {self.address:#x}"
        _require(_page_aligned(self.address), f"{where}: address not page-aligned")
        _require(
            0 < len(self.data) <= MAX_PAGES_DATA and len(self.data) % PAGE_SIZE == 0,
            f"{where}: {len(self.data)} bytes is not 1 to {MAX_PAGES_DATA // PAGE_SIZE} pages",
        )
        _require(0 <= self.address <= 2**64 - len(self.data), f"{where}: outside 64-bit space")

    @property
    def end(self) -> int:
        return self.address + len(self.data)


@dataclass(frozen=True, slots=True, kw_only=True)
class SplicedPages(Pages):
    """Pages the dumper never held: the process spliced them into the image itself
    (vmsplice, then splice), so their section's CRC covers the address, not the data."""


MAX_SCATTERED_RUNS = 1024  # runs in one ScatteredPages (IOV_MAX: one vectored read or write)


@dataclass(frozen=True, slots=True, kw_only=True)
class ScatteredPages:
    """Runs of pages far apart, in one section: a move's final image stores the pages the
    process wrote since its last pre-copy round, a page or two here and there all over its
    memory (hundreds of runs), and a PAGES section each cost both ends more than the bytes
    did. `runs` are (address, length), ascending, apart; `data` their bytes back to back.
    A reader yields them as one Pages record per run (docs/crf.md, SCATTERED_PAGES)."""

    runs: tuple[tuple[int, int], ...]
    data: bytes

    def __post_init__(self) -> None:
        self.check_runs(self.runs, len(self.data))

    @staticmethod
    def check_runs(runs: Sequence[tuple[int, int]], data_length: int) -> None:
        """Raise ImageError unless `runs` and `data_length` bytes make a ScatteredPages."""
        _require(
            0 < len(runs) <= MAX_SCATTERED_RUNS,
            f"ScatteredPages: {len(runs)} runs is not 1 to {MAX_SCATTERED_RUNS}",
        )
        floor = 0
        for address, length in runs:
            where = f"ScatteredPages: run at {address:#x}"
            _require(_page_aligned(address), f"{where}: address not page-aligned")
            _require(length > 0 and length % PAGE_SIZE == 0, f"{where}: {length} bytes, not pages")
            _require(floor <= address, f"{where} overlaps or precedes the run before it")
            floor = address + length
        _require(floor <= 2**64, "ScatteredPages: outside 64-bit space")
        total = sum(length for _, length in runs)
        _require(
            total == data_length and total <= MAX_PAGES_DATA,
            f"ScatteredPages: {data_length} bytes of data for runs of {total}"
            f" (at most {MAX_PAGES_DATA})",
        )

    def pieces(self) -> Iterator[Pages]:
        """One Pages record per run."""
        view = memoryview(self.data)
        offset = 0
        for address, length in self.runs:
            yield Pages(address=address, data=bytes(view[offset : offset + length]))
            offset += length


MAX_REFERENCED_PAGES = MAX_PAGES_DATA // PAGE_SIZE  # pages one PageReference names at most


@dataclass(frozen=True, slots=True, kw_only=True)
class PageReference:
    """Consecutive pages of one STORED or FILE segment that were, at the dump, the very
    physical pages of a member listed before this one in its tree stream (private memory
    still shared copy-on-write since a fork): their bytes are in that member's image, at
    `source`, and are not stored again (docs/crf.md §7b)."""

    address: U64  # where the pages are in this process
    pages: U32  # how many: 1 to 2048
    pid: U32  # the member (its pid in TREE) whose image holds their bytes
    source: U64  # where they are in that member

    def __post_init__(self) -> None:
        where = f"PageReference at {self.address:#x}"
        _require(_page_aligned(self.address), f"{where}: address not page-aligned")
        _require(_page_aligned(self.source), f"{where}: source {self.source:#x} not page-aligned")
        _require(
            0 < self.pages <= MAX_REFERENCED_PAGES,
            f"{where}: {self.pages} pages is not 1 to {MAX_REFERENCED_PAGES}",
        )
        for start in (self.address, self.source):
            _require(start <= 2**64 - self.size, f"{where}: outside 64-bit space")

    @property
    def size(self) -> int:
        return self.pages * PAGE_SIZE

    @property
    def end(self) -> int:
        return self.address + self.size


@dataclass(frozen=True, slots=True, kw_only=True)
class UserRegsStruct:
    """struct user_regs_struct of x86_64 (PTRACE_GETREGS), in kernel order."""

    r15: U64
    r14: U64
    r13: U64
    r12: U64
    rbp: U64
    rbx: U64
    r11: U64
    r10: U64
    r9: U64
    r8: U64
    rax: U64
    rcx: U64
    rdx: U64
    rsi: U64
    rdi: U64
    orig_rax: U64
    rip: U64
    cs: U64
    eflags: U64
    rsp: U64
    ss: U64
    fs_base: U64
    gs_base: U64
    ds: U64
    es: U64
    fs: U64
    gs: U64


@dataclass(frozen=True, slots=True, kw_only=True)
class RseqConfiguration:
    """struct ptrace_rseq_configuration (PTRACE_GET_RSEQ_CONFIGURATION)."""

    rseq_abi_pointer: U64
    rseq_abi_size: U32
    signature: U32
    flags: U32


@dataclass(frozen=True, slots=True, kw_only=True)
class RobustList:
    """get_robust_list(2): the list head and the size of the head structure."""

    head: U64
    len: U64


@dataclass(frozen=True, slots=True, kw_only=True)
class SigAltStack:
    """stack_t of sigaltstack(2)."""

    ss_sp: U64
    ss_flags: U32  # SS_DISABLE, SS_ONSTACK, SS_AUTODISARM bits
    ss_size: U64


@dataclass(frozen=True, slots=True, kw_only=True)
class Thread:
    tid: U32
    regs: UserRegsStruct
    sigmask: U64  # blocked signals, bit n-1 for signal n
    rseq: RseqConfiguration
    robust_list: RobustList
    clear_child_tid: U64
    sigaltstack: SigAltStack
    comm: str  # the thread's own name (PR_SET_NAME)
    xstate: bytes  # the NT_X86_XSTATE regset, as PTRACE_GETREGSET returned it
    pending: tuple[Siginfo, ...]  # signals pending on this thread only


@dataclass(frozen=True, slots=True, kw_only=True)
class SigAction:
    """struct sigaction as the kernel stores it (rt_sigaction)."""

    sa_handler: U64  # SIG_DFL 0, SIG_IGN 1, or a handler address
    sa_flags: U64
    sa_restorer: U64
    sa_mask: U64


@dataclass(frozen=True, slots=True, kw_only=True)
class SignalState:
    actions: tuple[SigAction, ...]  # actions[n - 1] belongs to signal n
    shared_pending: tuple[Siginfo, ...]  # signals pending on the whole process

    def __post_init__(self) -> None:
        _require(
            len(self.actions) == SIGNAL_COUNT,
            f"SignalState: {len(self.actions)} actions, not one for each of the "
            f"{SIGNAL_COUNT} signals",
        )


class FdKind(enum.IntEnum):
    REGULAR = 1
    DIRECTORY = 2
    PIPE = 3
    FIFO = 4
    SOCKET = 5
    TTY = 6
    CHARDEV = 7
    BLOCKDEV = 8
    EVENTFD = 9
    EPOLL = 10
    SIGNALFD = 11
    TIMERFD = 12
    INOTIFY = 13
    MEMFD = 14
    ANON_INODE = 15
    UNKNOWN = 16


@dataclass(frozen=True, slots=True, kw_only=True)
class EpollTarget:
    """One entry of an epoll interest list: epoll_ctl(EPOLL_CTL_ADD, tfd, {events, data})."""

    tfd: U32  # the watched descriptor's number
    events: U32  # EPOLLIN, EPOLLET, ... as registered
    data: U64  # the user's epoll_data


TERMIOS_NCCS = 19  # c_cc of the kernel's struct termios (TCGETS)


@dataclass(frozen=True, slots=True, kw_only=True)
class TerminalState:
    """A terminal as the process had it: struct termios (TCGETS), struct winsize (TIOCGWINSZ)."""

    c_iflag: U32
    c_oflag: U32
    c_cflag: U32
    c_lflag: U32
    c_line: U8
    c_cc: Annotated[bytes, Fixed(TERMIOS_NCCS)]
    ws_row: U16
    ws_col: U16
    ws_xpixel: U16
    ws_ypixel: U16
    controlling: bool  # the process's controlling terminal (tty_nr of /proc/PID/stat)


@dataclass(frozen=True, slots=True, kw_only=True)
class FileDescriptor:
    """What every descriptor has; what its kind needs more is in the object it refers to."""

    fd: U32
    kind: Annotated[FdKind, UInt(1)]
    flags: U32  # O_* flags from fdinfo (printed in octal there)
    pos: I64  # fdinfo pos (loff_t)
    cloexec: bool
    mode: U32  # st_mode
    dev: U64  # st_dev
    ino: U64  # st_ino
    # Equal for descriptors sharing one open file description (dup'ed, inherited),
    # as kcmp(KCMP_FILE) found them: restored as one description.
    description_id: U64
    object_id: U64 = 0  # the object record (its id) this descriptor reaches; 0 for none
    path: str  # the /proc/PID/fd/N link target, e.g. "pipe:[1234]"

    def __post_init__(self) -> None:
        _require(self.description_id > 0, f"FileDescriptor {self.fd}: description_id 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class Files:
    objects: U32 = 0  # object sections (object records and OBJECT_DATA) following FILES
    descriptors: tuple[FileDescriptor, ...]

    def __post_init__(self) -> None:
        numbers = [descriptor.fd for descriptor in self.descriptors]
        _require(
            numbers == sorted(set(numbers)),
            "Files: descriptors must be unique and in ascending order",
        )


# -- object records: one per kernel object, referenced by FileDescriptor.object_id ------
# Each has `id` (u64, > 0, unique in the image) as its first field.


def _check_object_id(record: ObjectRecord) -> None:
    _require(record.id > 0, f"{type(record).__name__}: id 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class TerminalObject:
    """A terminal the process holds: its settings and window size."""

    id: U64
    state: TerminalState

    def __post_init__(self) -> None:
        _check_object_id(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class EpollObject:
    """An epoll instance and its interest list (fdinfo tfd lines)."""

    id: U64
    targets: tuple[EpollTarget, ...]

    def __post_init__(self) -> None:
        _check_object_id(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class EventfdObject:
    id: U64
    count: U64  # fdinfo eventfd-count
    semaphore: bool  # EFD_SEMAPHORE (fdinfo eventfd-semaphore)

    def __post_init__(self) -> None:
        _check_object_id(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class TimerfdObject:
    """A timerfd (fdinfo: clockid, settime flags, ticks, it_value, it_interval)."""

    id: U64
    clock_id: I32
    settime_flags: U32  # TFD_TIMER_ABSTIME 1, TFD_TIMER_CANCEL_ON_SET 2, as last set
    ticks: U64  # expirations not read yet
    value_ns: U64  # time left until the next expiry; 0 when disarmed
    interval_ns: U64

    def __post_init__(self) -> None:
        _check_object_id(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class SignalfdObject:
    id: U64
    sigmask: U64  # the signals it reads, bit n-1 for signal n (fdinfo sigmask)

    def __post_init__(self) -> None:
        _check_object_id(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class InotifyWatch:
    wd: I32  # the watch descriptor the program knows it by
    mask: U32  # the events and flags (IN_ONESHOT, IN_EXCL_UNLINK, ...) it was added with
    path: str  # the watched inode, found by its file handle at dump


@dataclass(frozen=True, slots=True, kw_only=True)
class InotifyObject:
    """An inotify instance and its watches (fdinfo "inotify" lines), ascending wd."""

    id: U64
    watches: tuple[InotifyWatch, ...]

    def __post_init__(self) -> None:
        _check_object_id(self)
        wds = [watch.wd for watch in self.watches]
        _require(
            wds == sorted(set(wds)) and all(wd > 0 for wd in wds),
            f"InotifyObject {self.id}: watch descriptors must be positive, unique, ascending",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class FanotifyMark:
    """One mark of a fanotify group, named by a path."""

    kind: U8  # on an inode 0, a mount 1 (FAN_MARK_MOUNT), a file system 2 (FAN_MARK_FILESYSTEM)
    mflags: U32  # FAN_MARK_IGNORED_SURV_MODIFY 0x40, _EVICTABLE 0x200, _IGNORE 0x400
    mask: U64  # the events it reports
    ignored_mask: U64  # the events it ignores
    path: str  # the inode's path, the mount point, a mount of the file system

    def __post_init__(self) -> None:
        _require(self.kind <= 2, f"FanotifyMark: kind {self.kind} is not 0-2")


@dataclass(frozen=True, slots=True, kw_only=True)
class FanotifyObject:
    """A fanotify group (fanotify_init): its flags and marks; events queued are lost."""

    id: U64
    flags: U32  # fanotify_init flags (FAN_CLASS_*, FAN_NONBLOCK, FAN_REPORT_*, ...)
    event_flags: U32  # fanotify_init event_f_flags (O_RDONLY, O_LARGEFILE, ...)
    marks: tuple[FanotifyMark, ...]

    def __post_init__(self) -> None:
        _check_object_id(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class PidfdObject:
    """A pidfd: the process it refers to (fdinfo Pid), told apart from a later process
    under the same pid by its start time."""

    id: U64
    pid: I32  # -1 when that process had exited and been reaped
    starttime: U64  # /proc/PID/stat starttime of that process, 0 when it was gone
    own: bool  # the dumped process itself: it refers to the restored process

    def __post_init__(self) -> None:
        _check_object_id(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class InetSocket:
    """A TCP or UDP socket as /proc/net tells of it."""

    id: U64
    family: U16  # AF_INET or AF_INET6
    type: U16  # SOCK_STREAM, SOCK_DGRAM
    protocol: U16
    state: U8  # the kernel's TCP_* state number
    local_address: str  # "127.0.0.1:8080", "[::1]:22"
    remote_address: str

    def __post_init__(self) -> None:
        _check_object_id(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpConnection:
    """A TCP connection (established or closing) as TCP_REPAIR reads it: rebuilt from this
    alone. Its OBJECT_DATA holds the send queue, then the receive queue."""

    id: U64
    family: U16  # AF_INET or AF_INET6
    send_seq: U32  # the sequence number of the first byte of the send queue
    recv_seq: U32  # the sequence number of the first byte of the receive queue
    mss: U32  # TCP_MAXSEG
    options: U8  # TCPI_OPT_TIMESTAMPS 1, TCPI_OPT_SACK 2, TCPI_OPT_WSCALE 4 (tcp_info)
    snd_wscale: U8
    rcv_wscale: U8
    timestamp: U32  # TCP_TIMESTAMP: the connection's timestamp clock at the dump
    snd_wl1: U32  # struct tcp_repair_window, field for field
    snd_wnd: U32
    max_window: U32
    rcv_wnd: U32
    rcv_wup: U32
    send_queue_bytes: U64  # written by the program, not yet acknowledged by the peer
    recv_queue_bytes: U64  # received from the peer, not yet read by the program
    state: U8  # the kernel's TCP state: ESTABLISHED 1, FIN_WAIT1 4, FIN_WAIT2 5, CLOSE_WAIT 8,
    # LAST_ACK 9, CLOSING 11
    read_shut: bool  # the program shut its reading side (shutdown SHUT_RD), no FIN received
    local_address: str  # "127.0.0.1:8080", "[::1]:22"
    remote_address: str
    # The last bytes of the send queue that never left (version 9; 0 in older images):
    # made again, they are sent as the program's writes are, not put back as sent.
    unsent_bytes: U64 = 0

    def __post_init__(self) -> None:
        _check_object_id(self)
        _require(
            self.unsent_bytes <= self.send_queue_bytes,
            f"{self.unsent_bytes} bytes never sent of a send queue of {self.send_queue_bytes}",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class QueuedDatagram:
    """One datagram of a socket's receive queue; its bytes are in the socket's OBJECT_DATA."""

    length: U32
    source: str  # the sender: "127.0.0.1:5353", "[::1]:5353"


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpSocket:
    """A UDP or UDP-Lite socket: where it is bound and connected, and the datagrams it has
    not read. Its OBJECT_DATA holds their bytes, one after the other."""

    id: U64
    family: U16  # AF_INET or AF_INET6
    protocol: U16  # IPPROTO_UDP 17 or IPPROTO_UDPLITE 136
    local_address: str  # "0.0.0.0:0" (or "[::]:0") when never bound
    remote_address: str  # "" when not connected
    queue: tuple[QueuedDatagram, ...]  # oldest first

    def __post_init__(self) -> None:
        _check_object_id(self)


class LockKind(enum.IntEnum):
    """Who owns a lock, and so how a restore takes it again."""

    FLOCK = 1  # flock(2): the open file description
    POSIX = 2  # fcntl F_SETLK: the process
    OFD = 3  # fcntl F_OFD_SETLK: the open file description
    LEASE = 4  # fcntl F_SETLEASE: the open file description; its break signals the process


LOCK_TYPES = (0, 1)  # F_RDLCK, F_WRLCK


@dataclass(frozen=True, slots=True, kw_only=True)
class FileLock:
    """One lock as an fdinfo "lock:" line shows it."""

    kind: Annotated[LockKind, UInt(1)]
    type: U8  # F_RDLCK 0 / F_WRLCK 1 (flock: LOCK_SH / LOCK_EX)
    start: U64  # first byte locked; 0 for flock and leases
    length: U64  # bytes locked, 0 for "to the end of the file" (struct flock's l_len)

    def __post_init__(self) -> None:
        _require(self.type in LOCK_TYPES, f"FileLock: type {self.type} is not F_RDLCK or F_WRLCK")
        _require(
            self.kind in (LockKind.POSIX, LockKind.OFD) or (self.start, self.length) == (0, 0),
            f"FileLock: a {self.kind.name} lock covers the whole file, not a range",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class FileLocks:
    """The locks and lease held through one open file description. No descriptor refers
    to it by object_id: it names the description."""

    id: U64
    description_id: U64  # of the FileDescriptors it is held through
    signal: U32  # F_GETSIG of the description: what a lease break sends (0: SIGIO)
    locks: tuple[FileLock, ...]

    def __post_init__(self) -> None:
        _check_object_id(self)
        _require(self.description_id > 0, f"FileLocks {self.id}: description_id 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class PtyPair:
    """A pseudo-terminal whose master and slave are both open in the process; the master's
    descriptors (path ending in "ptmx") and the slave's refer to it."""

    id: U64
    index: U32  # N of the slave /dev/pts/N
    packet_mode: bool  # TIOCPKT on the master
    locked: bool  # TIOCSPTLCK: the slave cannot be opened
    state: TerminalState  # the slave's settings and window size; controlling terminal or not
    master_path: str  # /dev/ptmx, or devpts's own ptmx
    input: bytes  # queued for the slave to read (already through its input modes)
    output: bytes  # queued for the master to read (already through the slave's output modes)

    def __post_init__(self) -> None:
        _check_object_id(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class NetlinkSocket:
    """A netlink socket: its protocol, port id and multicast groups (messages queued are lost)."""

    id: U64
    type: U16  # SOCK_RAW, SOCK_DGRAM
    protocol: U16  # NETLINK_ROUTE 0, NETLINK_GENERIC 16, ...
    port_id: U32  # getsockname's nl_pid; 0 when never bound
    groups: tuple[U32, ...]  # the groups joined (NETLINK_LIST_MEMBERSHIPS), ascending

    def __post_init__(self) -> None:
        _check_object_id(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class PipeObject:
    """An anonymous pipe. Its buffered bytes, in order, are its ObjectData."""

    id: U64
    pipe_size: U32  # F_GETPIPE_SZ, bytes
    packets: tuple[U32, ...]  # the buffered bytes' packet lengths (packet mode), else ()
    outside_pid: U32  # a process beside the dumped one holding an end of it, 0 if none

    def __post_init__(self) -> None:
        _check_object_id(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class RawSocket:
    """A raw IP socket: its protocol and addresses (IP_HDRINCL, ICMP_FILTER are SocketOptions);
    packets queued on it are lost."""

    id: U64
    family: U16  # AF_INET or AF_INET6
    protocol: U16  # IPPROTO_ICMP 1, IPPROTO_UDP 17, IPPROTO_RAW 255, ...
    local_address: str  # the address it is bound to, "" when not bound
    remote_address: str  # the address it is connect()ed to (/proc/net/raw), "" when not

    def __post_init__(self) -> None:
        _check_object_id(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class PingSocket:
    """An ICMP ping socket (SOCK_DGRAM, IPPROTO_ICMP or IPPROTO_ICMPV6): the address and
    echo identifier it is bound to, the host it is connected to, the replies queued."""

    id: U64
    family: U16  # AF_INET or AF_INET6
    local_address: str  # "127.0.0.1:IDENT", "[::1]:IDENT"; "0.0.0.0:0" / "[::]:0" never bound
    remote_address: str  # the host it is connected to ("127.0.0.1", "::1"), "" when not
    queue: tuple[QueuedDatagram, ...]  # echo replies (their ICMP messages), oldest first

    def __post_init__(self) -> None:
        _check_object_id(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class PacketMembership:
    """One PACKET_ADD_MEMBERSHIP of a packet socket (struct packet_mreq), as packet_diag's
    MCLIST tells it."""

    ifindex: U32
    count: U32  # how many times it was added (each add needs its drop)
    type: U16  # PACKET_MR_MULTICAST 0, PACKET_MR_PROMISC 1, _ALLMULTI 2, _UNICAST 3
    address: bytes  # the link-layer address (multicast, unicast); empty for the others


PACKET_HEAD_UNKNOWN = 0xFFFFFFFF  # the kernel's position in a ring could not be told


@dataclass(frozen=True, slots=True, kw_only=True)
class PacketRingMapping:
    """One mapping of a packet socket's rings in the process ("socket:[INODE]" in its
    maps): the pages are the ring's, whose bytes are the socket's ObjectData."""

    start: U64
    size: U64
    offset: U64  # where in the rings (RX ring first, then TX) the mapping starts
    prot: U32  # PROT_READ 1 | PROT_WRITE 2 | PROT_EXEC 4


@dataclass(frozen=True, slots=True, kw_only=True)
class PacketSocket:
    """An AF_PACKET socket (its PACKET_* options are SocketOptions); frames queued are lost."""

    id: U64
    type: U16  # SOCK_RAW 3 or SOCK_DGRAM 2
    protocol: U16  # the ethertype it receives, host order (ETH_P_ALL 3); 0 for none
    ifindex: U32  # the interface it is bound to; 0 for every one
    fanout: U32  # getsockopt(PACKET_FANOUT): group id | (mode | flags) << 16; 0 for none
    memberships: tuple[PacketMembership, ...]
    rx_ring: tuple[U32, ...]  # struct packet_diag_ring of PACKET_RX_RING; () for none
    tx_ring: tuple[U32, ...]  # ... of PACKET_TX_RING
    version: U32  # PACKET_VERSION: TPACKET_V1 0, V2 1, V3 2 (how to read the rings)
    rx_head: U32  # the frame the kernel fills next in the RX ring; PACKET_HEAD_UNKNOWN
    tx_head: U32  # the frame the kernel sends next from the TX ring; PACKET_HEAD_UNKNOWN
    ring_mappings: tuple[PacketRingMapping, ...]  # where the process maps the rings

    def __post_init__(self) -> None:
        _check_object_id(self)
        for ring in (self.rx_ring, self.tx_ring):
            _require(len(ring) in (0, 7), "PacketSocket: a ring is 7 numbers or none")


@dataclass(frozen=True, slots=True, kw_only=True)
class SocketOption:
    """One option as getsockopt(2) gave it, to be given back to setsockopt(2)."""

    level: U32  # SOL_SOCKET 1, IPPROTO_IP 0, IPPROTO_IPV6 41, IPPROTO_TCP 6
    name: U32  # SO_REUSEADDR 2, TCP_NODELAY 1, ...
    value: bytes  # an int (4 bytes, little-endian), struct linger, or a name


@dataclass(frozen=True, slots=True, kw_only=True)
class SocketOptions:
    """The options of a socket (the TcpConnection, UdpSocket, PingSocket, ... `socket_id`)."""

    id: U64
    socket_id: U64
    filter_locked: bool  # SO_LOCK_FILTER
    options: tuple[SocketOption, ...]
    filter: bytes  # its classic BPF filter (struct sock_filter array), b"" when none

    def __post_init__(self) -> None:
        _check_object_id(self)
        _require(len(self.filter) % 8 == 0, "SocketOptions: a filter of part of an instruction")


@dataclass(frozen=True, slots=True, kw_only=True)
class FifoObject:
    """A named FIFO (reopened by the descriptor's path). Its buffered bytes are its
    ObjectData when no other process held it open: otherwise they stayed in the kernel."""

    id: U64
    pipe_size: U32
    packets: tuple[U32, ...]
    held_outside: bool  # another process had it open: its bytes were not taken

    def __post_init__(self) -> None:
        _check_object_id(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class SysvOwner:
    """A System V object's key, owner and permissions (struct ipc_perm)."""

    key: U32  # key_t, as an unsigned 32-bit number; 0 for IPC_PRIVATE (and once removed)
    mode: U32  # permission bits; for a segment also SHM_DEST (0o1000) when removed
    uid: U32
    gid: U32


@dataclass(frozen=True, slots=True, kw_only=True)
class SysvSharedMemory:
    """A System V shared memory segment the process has attached. Its contents are the
    pages of the segments (mappings) it is attached at; `shmid` is their inode."""

    id: U64
    shmid: U32
    owner: SysvOwner
    size: U64

    def __post_init__(self) -> None:
        _check_object_id(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class SysvSemaphores:
    """A System V semaphore set the process changed last (a semaphore's sempid)."""

    id: U64
    semid: U32
    owner: SysvOwner
    values: tuple[U16, ...]  # semval of each semaphore (GETALL)

    def __post_init__(self) -> None:
        _check_object_id(self)
        _require(self.values != (), f"SysvSemaphores {self.semid}: no semaphores")


@dataclass(frozen=True, slots=True, kw_only=True)
class SysvMessage:
    mtype: U64  # > 0
    text: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class SysvMessageQueue:
    """A System V message queue the process sent to or received from last."""

    id: U64
    msqid: U32
    owner: SysvOwner
    qbytes: U64  # msg_qbytes: the bytes it may hold
    messages: tuple[SysvMessage, ...]  # in queue order (MSG_COPY)

    def __post_init__(self) -> None:
        _check_object_id(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class PosixMessage:
    priority: U32
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class PosixMessageQueue:
    """A POSIX message queue (mq_open) a descriptor reaches."""

    id: U64
    name: str  # "/name", as mq_open takes it
    unlinked: bool  # mq_unlink'ed: made anew and unlinked again at restore
    mode: U32
    maxmsg: U64
    msgsize: U64
    messages: tuple[PosixMessage, ...]  # in the order mq_receive gives them

    def __post_init__(self) -> None:
        _check_object_id(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class UnixCredentials:
    """SCM_CREDENTIALS of a queued message (struct ucred), as its receiver would read them."""

    pid: U32
    uid: U32
    gid: U32


@dataclass(frozen=True, slots=True, kw_only=True)
class UnixMessage:
    """One message queued to be read from a unix socket; a stream's bytes are cut where the
    kernel's reads stop too (before other credentials, after descriptors in flight)."""

    data: bytes
    source: bytes  # a datagram's sender address (sun_path), empty if the sender is unbound
    credentials: UnixCredentials | None  # only when the receiver has SO_PASSCRED
    rights: tuple[FileDescriptor, ...]  # descriptors in flight (SCM_RIGHTS); fd is their index


@dataclass(frozen=True, slots=True, kw_only=True)
class UnixSocket:
    """A unix domain socket: one per socket of the dump, reached by a descriptor, in flight,
    or connected to a listener and waiting in its accept queue. Peers and accept queues name
    sockets by their inode at dump time."""

    id: U64
    inode: U64
    type: U16  # SOCK_STREAM 1, SOCK_DGRAM 2, SOCK_SEQPACKET 5
    state: U8  # sock_diag's: TCP_ESTABLISHED 1 (connected), TCP_CLOSE 7, TCP_LISTEN 10
    shutdown: U8  # RCV_SHUTDOWN 1 | SEND_SHUTDOWN 2
    passcred: bool  # SO_PASSCRED
    peek_off: Annotated[int, SInt(4)]  # SO_PEEK_OFF; -1 when off
    sndbuf: U32  # SO_SNDBUF, SO_RCVBUF as getsockopt gives them
    rcvbuf: U32
    backlog: U32  # a listener's listen() backlog, else 0
    peer: U64  # the peer's inode; 0: none, closed, or not yet accepted
    file_mode: U32  # the socket file's st_mode, uid and gid (a path name), else 0
    file_uid: U32
    file_gid: U32
    name: bytes  # sun_path as bound: empty when unbound, a leading NUL for an abstract name
    peer_name: bytes  # the peer's name (a queued client: its listener's), empty if none
    queue: tuple[U64, ...]  # a listener's waiting connections: their clients' inodes, in order
    messages: tuple[UnixMessage, ...]  # its receive queue, in order
    refusal: str  # why it cannot be rebuilt, found at dump (data no peek can reach), or ""
    bound_in: str  # the directory a relative `name` was bound in (its socket file's), else ""

    def __post_init__(self) -> None:
        _check_object_id(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class GhostFile:
    """A file, directory or FIFO the process holds after its name was removed.

    A regular file's bytes follow in ObjectData sections, one per run of data
    (SEEK_DATA / SEEK_HOLE): what no section covers up to `size` is a hole.
    """

    id: U64
    dev: U64  # st_dev and st_ino of the original: its shared mappings name the same
    ino: U64
    mode: U32  # st_mode: S_IFREG, S_IFDIR or S_IFIFO and the permission bits
    uid: U32
    gid: U32
    size: U64  # st_size of a regular file; a FIFO's pipe size; 0 otherwise
    path: str  # where it was, without the kernel's " (deleted)"
    bytes_in: U32 = 0  # 0, or the member holding its bytes (BYTES_IN; version 10)

    def __post_init__(self) -> None:
        _check_object_id(self)
        _require(
            stat.S_IFMT(self.mode) in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFIFO),
            f"GhostFile {self.id}: mode {self.mode:#o} is no file, directory or FIFO",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class MemfdObject:
    """A memfd (memfd_create): its bytes follow in ObjectData sections, holes left out
    (hijack.objects.memfd); reached by descriptors and by shared mappings alike."""

    id: U64
    dev: U64  # st_dev and st_ino of the original: its shared mappings name the same
    ino: U64
    size: U64  # st_size
    seals: U32  # F_GET_SEALS: F_SEAL_SEAL 1, SHRINK 2, GROW 4, WRITE 8, FUTURE_WRITE 16, EXEC 32
    mode: U32  # st_mode
    uid: U32
    gid: U32
    name: str  # as given to memfd_create ("/memfd:NAME (deleted)" in /proc)
    bytes_in: U32 = 0  # 0, or the member holding its bytes (BYTES_IN; version 10)

    def __post_init__(self) -> None:
        _check_object_id(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class SharedAnonymous:
    """Shared anonymous memory (MAP_SHARED | MAP_ANONYMOUS, "/dev/zero (deleted)" in maps):
    reached by mappings only; its bytes follow in ObjectData sections, holes left out."""

    id: U64
    dev: U64  # st_dev and st_ino of the kernel's object: its segments name the same
    ino: U64
    size: U64  # the object's size: the length of the mmap that made it
    bytes_in: U32 = 0  # 0, or the member holding its bytes (BYTES_IN; version 10)

    def __post_init__(self) -> None:
        _check_object_id(self)


# A memory object's bytes: in ObjectData sections after its record (BYTES_HERE), or, in a
# tree stream, in the image of the member (its pid) whose record of the same object (dev
# and ino) came before: not stored again (docs/crf.md §7b).
BYTES_HERE = 0
MemoryObject = GhostFile | MemfdObject | SharedAnonymous


MAX_OBJECT_DATA = 8 * 1024 * 1024  # bytes of one ObjectData section


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectData:
    """Bulk bytes of the object `id` (a pipe's buffer, a deleted file's contents), from
    `offset` on. Laid out as id and offset (u64 each) then the data to the end of the section."""

    id: U64
    offset: U64
    data: bytes

    def __post_init__(self) -> None:
        _check_object_id(self)
        _require(
            0 < len(self.data) <= MAX_OBJECT_DATA,
            f"ObjectData of object {self.id}: {len(self.data)} bytes is not 1 to {MAX_OBJECT_DATA}",
        )


# The records an object section holds; a new kind adds its records here.
ObjectRecord = (
    TerminalObject
    | EpollObject
    | EventfdObject
    | TimerfdObject
    | SignalfdObject
    | InotifyObject
    | FanotifyObject
    | PidfdObject
    | InetSocket
    | TcpConnection
    | UdpSocket
    | SocketOptions
    | NetlinkSocket
    | RawSocket
    | PingSocket
    | PacketSocket
    | UnixSocket
    | FileLocks
    | PtyPair
    | PipeObject
    | FifoObject
    | SysvSharedMemory
    | SysvSemaphores
    | SysvMessageQueue
    | PosixMessageQueue
    | GhostFile
    | MemfdObject
    | SharedAnonymous
    | ObjectData
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Cwd:
    cwd: str
    root: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ThreadScheduling:
    """How the kernel schedules one thread: sched_getattr(2), getpriority(2),
    sched_getaffinity(2)."""

    tid: U32
    policy: U32  # SCHED_OTHER 0, FIFO 1, RR 2, BATCH 3, IDLE 5 (SCHED_RESET_ON_FORK kept)
    priority: U32  # sched_priority, for the real-time policies
    nice: I32  # -20..19
    affinity: tuple[U32, ...]  # the CPUs it may run on, ascending


@dataclass(frozen=True, slots=True, kw_only=True)
class SeccompFilter:
    """One filter of a seccomp chain (PTRACE_SECCOMP_GET_FILTER and _GET_METADATA)."""

    flags: U64  # SECCOMP_FILTER_FLAG_LOG, ... as the metadata reports them
    program: bytes  # struct sock_filter instructions, 8 bytes each

    def __post_init__(self) -> None:
        _require(
            0 < len(self.program) <= 4096 * 8 and len(self.program) % 8 == 0,
            f"SeccompFilter: {len(self.program)} bytes is not 1 to 4096 instructions",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ThreadSeccomp:
    """The seccomp state of one thread that has one."""

    tid: U32
    mode: U8  # SECCOMP_MODE_STRICT 1, SECCOMP_MODE_FILTER 2
    filters: tuple[SeccompFilter, ...]  # oldest first: the order they are installed in

    def __post_init__(self) -> None:
        _require(self.mode in (1, 2), f"ThreadSeccomp {self.tid}: mode {self.mode} is not 1 or 2")
        _require(
            (self.mode == 2) == bool(self.filters),
            f"ThreadSeccomp {self.tid}: filters belong to mode 2 and only to it",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class PageRange:
    start: U64
    end: U64

    def __post_init__(self) -> None:
        _require(
            self.start < self.end and _page_aligned(self.start) and _page_aligned(self.end),
            f"PageRange {self.start:#x}-{self.end:#x}: not whole pages",
        )


AIO_EVENT_SIZE = 32  # struct io_event: data, obj, res, res2


@dataclass(frozen=True, slots=True, kw_only=True)
class AioRing:
    """The ring of an AIO context (io_setup), mapped at `address`: the aio_context_t."""

    address: U64
    size: U64  # bytes of its mapping
    nr: U32  # the ring header's nr: io_events it holds (io_setup((nr - 2) / 2) makes as many)
    head: U32  # the ring header's head: the first event not yet reaped
    tail: U32  # ... and tail: where the kernel puts the next completed event
    events: bytes  # the io_events from head to tail (32 bytes each): completed, not reaped

    def __post_init__(self) -> None:
        _require(
            _page_aligned(self.address) and self.size > 0 and _page_aligned(self.size),
            f"AioRing {self.address:#x}+{self.size:#x}: not whole pages",
        )
        _require(
            self.head < self.nr
            and self.tail < self.nr
            and len(self.events) == (self.tail - self.head) % self.nr * AIO_EVENT_SIZE,
            f"AioRing {self.address:#x}: head {self.head}, tail {self.tail} of {self.nr} and"
            f" {len(self.events)} bytes of events do not agree",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ProcessSettings:
    """The small per-process settings programs notice when lost (docs/crf.md, SETTINGS)."""

    dumpable: U8  # prctl(PR_GET_DUMPABLE): 0, 1 or 2
    thp_disable: bool  # prctl(PR_GET_THP_DISABLE)
    child_subreaper: bool  # prctl(PR_GET_CHILD_SUBREAPER)
    pdeath_signal: U8  # prctl(PR_GET_PDEATHSIG), 0 for none
    timer_slack_ns: U64  # /proc/PID/timerslack_ns
    oom_score_adj: I32  # /proc/PID/oom_score_adj, -1000..1000
    loginuid: U32  # /proc/PID/loginuid; 4294967295 when never set
    membarrier: U32  # membarrier(MEMBARRIER_CMD_GET_REGISTRATIONS): the REGISTER_* bits
    mlockall: U8  # the mlockall(2) flags new mappings get: MCL_FUTURE 2 | MCL_ONFAULT 4
    threads: tuple[ThreadScheduling, ...]
    seccomp: tuple[ThreadSeccomp, ...]  # the threads under seccomp
    guard_pages: tuple[PageRange, ...]  # MADV_GUARD_INSTALL regions, ascending
    aio_rings: tuple[AioRing, ...]  # the AIO contexts, ascending address

    def __post_init__(self) -> None:
        _require(self.dumpable <= 2, f"ProcessSettings: dumpable {self.dumpable} is not 0-2")
        _require(
            -1000 <= self.oom_score_adj <= 1000,
            f"ProcessSettings: oom_score_adj {self.oom_score_adj} is outside -1000..1000",
        )
        _require(
            self.mlockall & ~6 == 0 and self.mlockall != 4,
            f"ProcessSettings: mlockall {self.mlockall} is not MCL_FUTURE [| MCL_ONFAULT]",
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Itimer:
    """One interval timer (getitimer(2)): ITIMER_REAL 0, ITIMER_VIRTUAL 1, ITIMER_PROF 2."""

    which: U32
    interval_ns: U64  # it_interval
    value_ns: U64  # it_value: time left until it next expires; 0 when disarmed


@dataclass(frozen=True, slots=True, kw_only=True)
class PosixTimer:
    """A timer of timer_create(2), as /proc/PID/timers and timer_gettime(2) tell it."""

    timer_id: U32
    clock_id: I32  # CLOCK_REALTIME 0, CLOCK_MONOTONIC 1, ..., or a CPU-time clock id
    notify: U32  # SIGEV_SIGNAL 0, SIGEV_NONE 1, SIGEV_THREAD_ID 4
    signal: U32  # sigev_signo
    value: U64  # sigev_value (sival_ptr), handed to the signal handler
    thread: U32  # the tid SIGEV_THREAD_ID notifies, else 0
    interval_ns: U64  # it_interval
    value_ns: U64  # it_value: time left until it next expires; 0 when disarmed
    overrun: I32  # timer_getoverrun: the expirations its last signal stood for, less one


@dataclass(frozen=True, slots=True, kw_only=True)
class Timers:
    itimers: tuple[Itimer, ...]  # the armed ones only
    posix: tuple[PosixTimer, ...]  # ascending timer_id

    def __post_init__(self) -> None:
        ids = [timer.timer_id for timer in self.posix]
        _require(ids == sorted(set(ids)), "Timers: POSIX timer ids must be unique, ascending")
        _require(all(timer.which <= 2 for timer in self.itimers), "Timers: an itimer is not 0-2")


@dataclass(frozen=True, slots=True, kw_only=True)
class Round:
    """Opens a pre-copy round of a move: memory sent while the process still runs."""

    pid: U32  # the process, as in its image's HEADER
    number: U32  # 0 for the first round, which sends every page; then the pages written since


class MemberState(enum.IntEnum):
    """What a tree member was doing when the tree was frozen."""

    RUNNING = 0  # running or sleeping: restored to run on
    STOPPED = 1  # stopped by a signal (state T): restored stopped
    ZOMBIE = 2  # exited, not yet reaped by its parent: no image, only its exit status


@dataclass(frozen=True, slots=True, kw_only=True)
class TreeMember:
    pid: U32
    ppid: U32  # the parent's pid; the root's parent is outside the tree
    pgid: U32  # process group
    sid: U32  # session
    exit_signal: U32  # the signal the parent gets at its end (SIGCHLD after a fork)
    exit_code: U32  # a zombie's wait status, as waitpid(2) reports it; 0 otherwise
    state: Annotated[MemberState, UInt(1)]
    comm: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SharedDescription:
    """A descriptor of one member that is the same open file description as a descriptor
    of a member listed before it (inherited across a fork, or passed): one offset, one set
    of status flags, one lock owner."""

    pid: U32  # the member holding it
    fd: U32  # its descriptor number there
    holder_pid: U32  # the first member (in TREE order) holding that description
    holder_fd: U32  # its descriptor number there


class CloneFlags(enum.IntFlag):
    """What a member shares with its parent, made by clone without CLONE_THREAD."""

    VM = 0x100  # CLONE_VM: one memory (its image holds no pages: they are its parent's)
    FS = 0x200  # CLONE_FS: one root, cwd and umask
    FILES = 0x400  # CLONE_FILES: one descriptor table
    SIGHAND = 0x800  # CLONE_SIGHAND: one table of signal actions (only with CLONE_VM)


@dataclass(frozen=True, slots=True, kw_only=True)
class SharedContext:
    """A member sharing kernel contexts with its parent: a change by one is seen by the other
    (clone with CLONE_VM, CLONE_FILES, CLONE_FS or CLONE_SIGHAND, not a thread)."""

    pid: U32  # the member
    flags: Annotated[CloneFlags, UInt(4)]  # what it shares with its parent


@dataclass(frozen=True, slots=True, kw_only=True)
class Tree:
    """Opens a tree stream: the members, root first, each parent before its children.

    One IMAGE follows per member that is not a ZOMBIE, in this order.
    """

    members: tuple[TreeMember, ...]
    # Open file descriptions shared among members, each descriptor after its first holder's.
    shared: tuple[SharedDescription, ...] = ()
    # Members sharing memory, signal handlers, a descriptor table or fs context with their
    # parent, each once.
    contexts: tuple[SharedContext, ...] = ()

    def __post_init__(self) -> None:
        _require(bool(self.members), "Tree: no members")
        seen: set[int] = set()
        for index, member in enumerate(self.members):
            _require(member.pid not in seen, f"Tree: process {member.pid} appears twice")
            _require(
                index == 0 or member.ppid in seen,
                f"Tree: process {member.pid} comes before its parent {member.ppid}",
            )
            seen.add(member.pid)
        _require(self.members[0].state is not MemberState.ZOMBIE, "Tree: the root is a zombie")
        order = {member.pid: index for index, member in enumerate(self.members)}
        holders: set[tuple[int, int]] = set()
        for link in self.shared:
            where = f"Tree: shared fd {link.fd} of process {link.pid}"
            _require(link.pid in order and link.holder_pid in order, f"{where}: not a member")
            _require(
                MemberState.ZOMBIE
                not in (
                    self.members[order[link.pid]].state,
                    self.members[order[link.holder_pid]].state,
                ),
                f"{where}: a zombie holds no descriptor",
            )
            _require(
                order[link.holder_pid] < order[link.pid],
                f"{where}: its holder is not a member listed before it",
            )
            _require((link.pid, link.fd) not in holders, f"{where}: listed twice")
            holders.add((link.pid, link.fd))
        sharing: set[int] = set()
        for context in self.contexts:
            where = f"Tree: the contexts process {context.pid} shares"
            at = order.get(context.pid, 0)
            _require(at > 0, f"{where}: not a member below the root")
            member = self.members[at]
            parent = self.members[order[member.ppid]]
            _require(
                MemberState.ZOMBIE not in (member.state, parent.state),
                f"{where}: a zombie shares nothing",
            )
            _require(bool(context.flags), f"{where}: none")
            _require(
                CloneFlags.SIGHAND not in context.flags or CloneFlags.VM in context.flags,
                f"{where}: signal handlers without its memory",
            )
            _require(context.pid not in sharing, f"{where}: listed twice")
            sharing.add(context.pid)

    @property
    def imaged(self) -> tuple[TreeMember, ...]:
        """The members that have an IMAGE in the stream, in stream order."""
        return tuple(m for m in self.members if m.state is not MemberState.ZOMBIE)


@dataclass(frozen=True, slots=True, kw_only=True)
class End:
    """The trailer: totals a reader checks, so a cut image never passes for whole."""

    records: U64  # sections before END
    image_bytes: U64  # bytes before END, signature included
    pages_stored: U64  # pages in PAGES sections
    pages_zero: U64  # all-zero pages the writer was given and left out
    pages_untouched: U64  # pages the dumper found never populated (reported by it)
    pages_file: U64  # pages of FILE segments, mapped from their files at restore


Record = (
    ImageHeader
    | Round
    | Tree
    | Credentials
    | ThreadCredentials
    | Rlimits
    | MemoryStructure
    | Segments
    | Pages
    | SplicedPages
    | ScatteredPages
    | PageReference
    | Thread
    | SignalState
    | Files
    | ObjectRecord
    | Cwd
    | ProcessSettings
    | Timers
    | End
)
