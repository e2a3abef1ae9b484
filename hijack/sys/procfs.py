"""Typed parsers for /proc: what a process is, maps, holds and talks to, read from outside.

Every reader takes the pid (and, for per-thread files, the tid) of a live process
and returns frozen records whose fields carry the kernel's names. Errors are
converted in one place, `_proc_access`: a process that does not exist (or exits
while we read) raises `ProcessGone`; an entry missing under a live process (a
closed fd, the exe link of a zombie or a kernel thread) raises a plain
`HijackError`; a refusal raises `AccessDenied`.

/proc shows a moving process: records are snapshots, consistent only while the
process is stopped.
"""

from __future__ import annotations

import enum
import errno as errno_codes
import ipaddress
import itertools
import mmap
import os
import re
import socket
import stat
from array import array
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import NoReturn

from hijack.errors import HijackError, ProcessGone
from hijack.sys.errors import kernel_call, raise_for_errno

PAGE_SIZE = mmap.PAGESIZE
RLIM_INFINITY = 2**64 - 1
PF_KTHREAD = 0x00200000  # task flag (stat field 9) of kernel threads

# Bits of a /proc/PID/pagemap entry (Documentation/admin-guide/mm/pagemap.rst).
PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55  # always 0 here: this kernel lacks CONFIG_MEM_SOFT_DIRTY
PM_MMAP_EXCLUSIVE = 1 << 56
PM_FILE = 1 << 61  # file page or shared anonymous page
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63


# ---------------------------------------------------------------- access


def _task_dir(pid: int, tid: int | None) -> str:
    return f"/proc/{pid}" if tid is None else f"/proc/{pid}/task/{tid}"


@contextmanager
def _proc_access(syscall: str, pid: int, entry: str, tid: int | None = None) -> Iterator[str]:
    """Yield the path of /proc/PID[/task/TID]/ENTRY; convert errors raised while using it.

    The kernel answers ENOENT both when the process is gone and when only the
    entry is; only the first is ProcessGone.
    """
    owner = _task_dir(pid, tid)
    path = f"{owner}/{entry}"
    with kernel_call(syscall, pid, what=f"process {pid} ({path})"):
        try:
            yield path
        except FileNotFoundError:
            if not os.path.isdir(owner):
                raise
            raise_for_errno(errno_codes.ENOENT, syscall, what=path)


def _read_bytes(pid: int, entry: str, tid: int | None = None) -> bytes:
    with _proc_access("read", pid, entry, tid) as path, open(path, "rb") as file:
        return file.read()


def _read_text(pid: int, entry: str, tid: int | None = None) -> str:
    # surrogateescape: file names and comm are bytes; they must survive a round trip
    return os.fsdecode(_read_bytes(pid, entry, tid))


def _readlink(pid: int, entry: str) -> str:
    with _proc_access("readlink", pid, entry) as path:
        return os.readlink(path)


def _malformed(pid: int, entry: str, line: str) -> NoReturn:
    raise HijackError(f"cannot parse /proc/{pid}/{entry}: {line!r}", pid=pid)


# ---------------------------------------------------------------- maps and smaps


@dataclass(frozen=True, slots=True)
class MapEntry:
    """One line of /proc/PID/maps.

    `path` is clean: a file's path without the kernel's " (deleted)" suffix
    (then `deleted` is set), a pseudo name such as "[heap]", "[stack]",
    "[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]", "[anon:NAME]", or "" for
    an anonymous mapping. A newline in a file name shows as the four characters
    "\\012" (the kernel's escape); /proc/PID/map_files has the exact name.
    """

    start: int
    end: int
    perms: str  # "rw-p": read, write, execute, then s(hared) or p(rivate)
    offset: int
    dev_major: int
    dev_minor: int
    inode: int
    path: str
    deleted: bool

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def writable(self) -> bool:
        return self.perms[1] == "w"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def shared(self) -> bool:
        return self.perms[3] == "s"


_MAPS_PREFIX = re.compile(
    r"([0-9a-f]+)-([0-9a-f]+) ([-r][-w][-x][sp]) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+) "
)
# show_map_vma() pads the line to this column, then writes one space, then the
# name: knowing it keeps the leading spaces of a file name.
_MAPS_NAME_COLUMN = 25 + 8 * 6 - 1
_DELETED = " (deleted)"


def _parse_maps_line(pid: int, line: str) -> MapEntry:
    prefix = _MAPS_PREFIX.match(line)
    if prefix is None:
        _malformed(pid, "maps", line)
    start, end, perms, offset, major, minor, inode = prefix.groups()
    rest = line[prefix.end() :]
    padding = max(_MAPS_NAME_COLUMN - prefix.end(), 0) + 1
    path = rest[padding:] if rest[:padding].isspace() else rest.lstrip(" ")
    entry = MapEntry(
        int(start, 16), int(end, 16), perms, int(offset, 16),
        int(major, 16), int(minor, 16), int(inode), path, False,
    )  # fmt: skip
    if path.endswith(_DELETED) and not _still_linked(pid, entry):
        unlinked = replace(entry, path=path[: -len(_DELETED)], deleted=True)
        other = _other_link(pid, unlinked)
        return unlinked if other is None else replace(unlinked, path=other, deleted=False)
    return entry


def _other_link(pid: int, entry: MapEntry) -> str | None:
    """The name a mapped file whose name was unlinked still has beside it, if any.

    glibc's sem_open makes a semaphore under a temporary name, links it under
    its own and unlinks the first: the mapping shows "sem.XXXXXX (deleted)"
    while the file lives on as "sem.NAME" in the same directory (Python's
    multiprocessing semaphores under forkserver and spawn). A file with no link
    left, or linked only elsewhere, is None.
    """
    try:
        mapped = os.stat(f"/proc/{pid}/map_files/{entry.start:x}-{entry.end:x}")
    except OSError:
        return None
    if mapped.st_nlink == 0:
        return None
    directory = os.path.dirname(entry.path)
    try:
        with os.scandir(f"/proc/{pid}/root{directory}") as names:
            for name in names:
                if name.inode() == mapped.st_ino and name.stat(follow_symlinks=False).st_dev == (
                    mapped.st_dev
                ):
                    return os.path.join(directory, name.name)
    except OSError:
        return None
    return None


def _still_linked(pid: int, entry: MapEntry) -> bool:
    """Whether a file literally named "... (deleted)" is what is mapped.

    The path is looked up under the process's own root, so a chroot does not fool us.
    """
    try:
        found = os.stat(f"/proc/{pid}/root{entry.path}")
    except OSError:
        return False
    return (found.st_ino, os.major(found.st_dev), os.minor(found.st_dev)) == (
        entry.inode, entry.dev_major, entry.dev_minor,
    )  # fmt: skip


def read_maps(pid: int) -> list[MapEntry]:
    """The mappings of process `pid`, in address order (empty for kernel threads and zombies)."""
    return [_parse_maps_line(pid, line) for line in _read_text(pid, "maps").splitlines()]


@dataclass(frozen=True, slots=True)
class SmapsEntry:
    """Per-mapping figures of /proc/PID/smaps (sizes in bytes)."""

    start: int
    rss: int
    anonymous: int
    swap: int
    vm_flags: tuple[str, ...]  # two-letter codes: "rd", "wr", "sh", "gd", "dd", ...


def read_smaps(pid: int) -> dict[int, SmapsEntry]:
    """Rss, Anonymous, Swap and VmFlags of every mapping, by mapping start."""
    entries: dict[int, SmapsEntry] = {}
    start = -1
    sizes: dict[str, int] = {}
    for line in _read_text(pid, "smaps").splitlines():
        header = _MAPS_PREFIX.match(line)
        if header:
            start = int(header[1], 16)
            sizes = {}
            continue
        key, _, value = line.partition(":")
        if key == "VmFlags":  # the last line of each mapping's block
            entries[start] = SmapsEntry(
                start,
                sizes.get("Rss", 0),
                sizes.get("Anonymous", 0),
                sizes.get("Swap", 0),
                tuple(value.split()),
            )
        elif value.endswith(" kB"):
            sizes[key] = int(value[: -len(" kB")]) * 1024
    return entries


def resident_bytes(pid: int) -> int:
    """The process's memory in RAM or swap: about what an image of it stores."""
    return sum(entry.rss + entry.swap for entry in read_smaps(pid).values())


# Each block of smaps ends with its VmFlags line: the text split at those lines is one
# piece per mapping, its range on the piece's first line (after the flags line of the one
# before). A move may read smaps while frozen, in a thread beside the rest: a line-by-line
# parse held the GIL for milliseconds a thousand mappings, and even the regex engine's
# two passes took ~3 ms for 300 (each one C call, holding the GIL throughout while the
# freeze's own thread waited for it); this split takes ~0.2 ms.
_SMAPS_FLAGS_LINE = b"\nVmFlags:"
_SMAPS_RANGE = re.compile(rb"([0-9a-f]+)-[0-9a-f]+ ")


def read_smaps_flags(pid: int) -> dict[int, tuple[str, ...]]:
    """VmFlags of every mapping, by mapping start."""
    pieces = _read_bytes(pid, "smaps").split(_SMAPS_FLAGS_LINE)
    flags: dict[int, tuple[str, ...]] = {}
    for number, (block, after) in enumerate(itertools.pairwise(pieces)):
        # `block` holds a mapping's lines but its flags, after the flags line of the one
        # before (none before the first); `after` starts with its flags.
        header = _SMAPS_RANGE.match(block, block.find(b"\n") + 1 if number else 0)
        if header is None:  # not as expected: the whole parse
            return {start: entry.vm_flags for start, entry in read_smaps(pid).items()}
        line_end = after.find(b"\n")
        found = after if line_end < 0 else after[:line_end]
        flags[int(header[1], 16)] = tuple(os.fsdecode(found).split())
    return flags


def read_smaps_layout(pid: int) -> dict[MapEntry, tuple[str, ...]]:
    """VmFlags of every mapping, by the mapping as maps shows it: each smaps block's own
    first line (the maps line). The kernel writes a block whole for one state of its
    mapping, so each range goes with its own flags even where the layout changes while
    the file is read (by start alone, a flag could be another mapping's that began there
    meanwhile; with maps read before and after, any change during the read voids all)."""
    pieces = _read_bytes(pid, "smaps").split(_SMAPS_FLAGS_LINE)
    flags: dict[MapEntry, tuple[str, ...]] = {}
    for number, (block, after) in enumerate(itertools.pairwise(pieces)):
        start = block.find(b"\n") + 1 if number else 0
        entry = _parse_maps_line(pid, os.fsdecode(block[start:].partition(b"\n")[0]))
        flags_end = after.find(b"\n")
        found = after if flags_end < 0 else after[:flags_end]
        flags[entry] = tuple(os.fsdecode(found).split())
    return flags


# ---------------------------------------------------------------- status and stat


@dataclass(frozen=True, slots=True)
class ProcStatus:
    """The fields hijack uses from /proc/PID/status (masks and caps as ints)."""

    name: str  # as status shows it: with the kernel's escapes (read_comm has the raw bytes)
    umask: int | None  # None when the task has no fs_struct (a zombie)
    state: str  # one letter: R, S, D, T, t, Z, X, I
    tgid: int
    pid: int
    ppid: int
    tracer_pid: int
    uid: tuple[int, int, int, int]  # real, effective, saved, filesystem
    gid: tuple[int, int, int, int]
    groups: tuple[int, ...]
    nspid: tuple[int, ...]  # from the namespace of this /proc down to the task's own
    threads: int
    sig_pnd: int  # pending for this thread
    shd_pnd: int  # pending for the whole process
    sig_blk: int
    sig_ign: int
    sig_cgt: int
    cap_inh: int
    cap_prm: int
    cap_eff: int
    cap_bnd: int
    cap_amb: int
    no_new_privs: bool
    seccomp: int  # 0 off, 1 strict, 2 filter
    seccomp_filters: int  # filters in the chain of this task
    kthread: bool | None  # None on kernels without the "Kthread:" line
    locked_bytes: int  # VmLck: memory in VM_LOCKED mappings (0 for a process with no mm)


def _ids(value: str) -> tuple[int, int, int, int]:
    real, effective, saved, fs = (int(part) for part in value.split())
    return real, effective, saved, fs


def read_status(pid: int, tid: int | None = None) -> ProcStatus:
    """/proc/PID/status, or the status of thread `tid` of process `pid`."""
    fields: dict[str, str] = {}
    for line in _read_text(pid, "status", tid).splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    umask = fields.get("Umask")
    kthread = fields.get("Kthread")
    return ProcStatus(
        name=fields["Name"],
        umask=None if umask is None else int(umask, 8),
        state=fields["State"][:1],
        tgid=int(fields["Tgid"]),
        pid=int(fields["Pid"]),
        ppid=int(fields["PPid"]),
        tracer_pid=int(fields["TracerPid"]),
        uid=_ids(fields["Uid"]),
        gid=_ids(fields["Gid"]),
        groups=tuple(int(group) for group in fields["Groups"].split()),
        nspid=tuple(int(each) for each in fields["NSpid"].split()),
        threads=int(fields["Threads"]),
        sig_pnd=int(fields["SigPnd"], 16),
        shd_pnd=int(fields["ShdPnd"], 16),
        sig_blk=int(fields["SigBlk"], 16),
        sig_ign=int(fields["SigIgn"], 16),
        sig_cgt=int(fields["SigCgt"], 16),
        cap_inh=int(fields["CapInh"], 16),
        cap_prm=int(fields["CapPrm"], 16),
        cap_eff=int(fields["CapEff"], 16),
        cap_bnd=int(fields["CapBnd"], 16),
        cap_amb=int(fields["CapAmb"], 16),
        no_new_privs=fields["NoNewPrivs"] == "1",
        seccomp=int(fields["Seccomp"]),
        seccomp_filters=int(fields.get("Seccomp_filters", "0")),
        kthread=None if kthread is None else kthread == "1",
        locked_bytes=int(fields.get("VmLck", "0 kB").removesuffix(" kB")) * 1024,
    )


@dataclass(frozen=True, slots=True)
class ProcStat:
    """/proc/PID/stat (or task/TID/stat); field names of proc_pid_stat(5), mm ones as in mm_struct.

    The mm fields read 0 for kernel threads and zombies.
    """

    pid: int
    comm: str
    state: str
    ppid: int
    pgrp: int
    session: int
    tty_nr: int
    tpgid: int
    flags: int
    utime: int
    stime: int
    priority: int
    nice: int
    num_threads: int
    starttime: int  # clock ticks after boot
    vsize: int
    rss: int  # pages
    start_code: int
    end_code: int
    start_stack: int
    exit_signal: int
    processor: int
    rt_priority: int
    policy: int
    start_data: int
    end_data: int
    start_brk: int
    arg_start: int
    arg_end: int
    env_start: int
    env_end: int
    exit_code: int  # as waitpid(2) reports it


def _parse_stat(data: bytes) -> ProcStat:
    # comm may hold spaces and parentheses; it ends at the last ')'
    head, _, tail = data.rpartition(b")")
    pid, _, comm = head.partition(b" (")
    rest = tail.split()

    def field(number: int) -> int:  # numbered from 1 as in proc_pid_stat(5)
        return int(rest[number - 3])

    return ProcStat(
        pid=int(pid), comm=os.fsdecode(comm), state=rest[0].decode(),
        ppid=field(4), pgrp=field(5), session=field(6), tty_nr=field(7), tpgid=field(8),
        flags=field(9), utime=field(14), stime=field(15), priority=field(18),
        nice=field(19), num_threads=field(20), starttime=field(22), vsize=field(23),
        rss=field(24), start_code=field(26), end_code=field(27), start_stack=field(28),
        exit_signal=field(38), processor=field(39), rt_priority=field(40),
        policy=field(41), start_data=field(45), end_data=field(46), start_brk=field(47),
        arg_start=field(48), arg_end=field(49), env_start=field(50), env_end=field(51),
        exit_code=field(52),
    )  # fmt: skip


def read_stat(pid: int) -> ProcStat:
    return _parse_stat(_read_bytes(pid, "stat"))


def read_task_stat(pid: int, tid: int) -> ProcStat:
    """The stat of thread `tid` of process `pid` (a thread gone raises ProcessGone)."""
    return _parse_stat(_read_bytes(pid, "stat", tid))


def is_kernel_thread(pid: int) -> bool:
    return bool(read_stat(pid).flags & PF_KTHREAD)


def waiting_for_vfork(pid: int) -> int | None:
    """A thread of process `pid` that waits for its vfork child to exec or exit, or None.

    Such a thread sleeps uninterruptibly inside clone (state D, wchan kernel_clone,
    where the kernel waits for the child's vfork_done) and no ptrace stop reaches
    it until the child lets go: a freeze would wait as long as the child runs."""
    for tid in list_threads(pid):
        try:
            if read_task_stat(pid, tid).state != "D":
                continue
            wchan = _read_text(pid, "wchan", tid)
        except HijackError:
            continue  # a thread gone meanwhile
        if wchan == "kernel_clone":
            return tid
    return None


# ---------------------------------------------------------------- threads and children


def list_threads(pid: int) -> list[int]:
    """Thread ids of process `pid`, ascending (the leader first)."""
    with _proc_access("readdir", pid, "task") as path:
        return sorted(int(name) for name in os.listdir(path))


def children(pid: int) -> list[int]:
    """Pids of the processes whose parent is `pid`, ascending.

    Found by scanning every process's stat: a kernel built without
    CONFIG_PROC_CHILDREN has no /proc/PID/task/TID/children (listed_children).
    """
    read_stat(pid)  # a parent that does not exist is ProcessGone, not "no children"
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if read_stat(int(name)).ppid == pid:
                found.append(int(name))
        except ProcessGone:
            continue  # exited during the scan
    return sorted(found)


def listed_children(pid: int) -> list[int] | None:
    """Pids of the children of process `pid` (each thread's: its forks), ascending, from
    /proc/PID/task/TID/children; None where the kernel has no such files (built without
    CONFIG_PROC_CHILDREN). Exact only while `pid` is stopped (it forks or reaps none
    meanwhile): each file is read in one go (the kernel's docs call it unreliable for a
    process that changes its children during the reads)."""
    found: list[int] = []
    for tid in list_threads(pid):
        try:
            with open(f"{_task_dir(pid, tid)}/children", "rb") as file:
                text = file.read()
        except (FileNotFoundError, ProcessLookupError):
            if os.path.isdir(_task_dir(pid, tid)):
                return None  # no such file: the kernel lists no children
            continue  # the thread ended: its children are the process's others' now
        found += (int(child) for child in text.split())
    return sorted(set(found))


def list_pids() -> list[int]:
    """Every process id in /proc now, ascending."""
    return sorted(int(name) for name in os.listdir("/proc") if name.isdigit())


# ---------------------------------------------------------------- identity


def read_cmdline(pid: int) -> list[str]:
    """argv as the process shows it now (empty for kernel threads and zombies)."""
    data = _read_bytes(pid, "cmdline")
    return [os.fsdecode(arg) for arg in data.removesuffix(b"\0").split(b"\0")] if data else []


def read_comm(pid: int) -> str:
    return _read_text(pid, "comm").removesuffix("\n")


def read_task_comm(pid: int, tid: int) -> str:
    """A thread's own name (PR_SET_NAME), as /proc/PID/task/TID/comm shows it."""
    return _read_text(pid, "comm", tid).removesuffix("\n")


def read_task_syscall(pid: int, tid: int) -> int | None:
    """The system call a thread blocks in (/proc/PID/task/TID/syscall); None while it runs."""
    first = _read_text(pid, "syscall", tid).split(maxsplit=1)[:1]
    return int(first[0]) if first and first[0].lstrip("-").isdigit() else None


def read_task_kernel_stack(pid: int, tid: int) -> list[str]:
    """The functions on a blocked thread's kernel stack, innermost first (root only).

    /proc/PID/task/TID/stack lines read `[<0>] function+0xOFF/0xLEN`.
    """
    functions = []
    for line in _read_text(pid, "stack", tid).splitlines():
        words = line.split()
        if len(words) == 2:
            functions.append(words[1].split("+", 1)[0])
    return functions


def read_exe(pid: int) -> str:
    """Path of the executable (may end in " (deleted)"); a kernel thread or zombie has none."""
    return _readlink(pid, "exe")


def read_cwd(pid: int) -> str:
    return _readlink(pid, "cwd")


def read_personality(pid: int) -> int:
    """The execution domain flags of personality(2), from /proc/PID/personality (hex)."""
    return int(_read_text(pid, "personality").strip(), 16)


def read_root(pid: int) -> str:
    return _readlink(pid, "root")


def read_oom_score_adj(pid: int) -> int:
    return int(_read_text(pid, "oom_score_adj"))


def read_loginuid(pid: int) -> int:
    """The audit login uid; 4294967295 ((uid_t)-1) when never set."""
    return int(_read_text(pid, "loginuid"))


def read_timer_slack_ns(pid: int) -> int:
    return int(_read_text(pid, "timerslack_ns"))


@dataclass(frozen=True)
class PosixTimerEntry:
    """One timer of /proc/PID/timers."""

    timer_id: int
    signal: int  # sigev_signo
    value: int  # sigev_value
    notify: str  # "signal", "thread" or "none"
    notify_tid: int  # the pid or tid after "pid." / "tid."
    clock_id: int


_TIMER_NOTIFY = re.compile(r"(\w+)/(?:pid|tid)\.(\d+)")


def read_posix_timers(pid: int) -> list[PosixTimerEntry]:
    """The timers of timer_create(2), from /proc/PID/timers (blocks of four lines)."""
    timers = []
    fields: dict[str, str] = {}
    for line in _read_text(pid, "timers").splitlines():
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
        if name.strip() != "ClockID":
            continue
        signo, _, sigval = fields["signal"].partition("/")
        notify = _TIMER_NOTIFY.fullmatch(fields["notify"])
        if notify is None:
            _malformed(pid, "timers", fields["notify"])
        timers.append(
            PosixTimerEntry(
                timer_id=int(fields["ID"]),
                signal=int(signo),
                value=int(sigval, 16),
                notify=notify[1],
                notify_tid=int(notify[2]),
                clock_id=int(fields["ClockID"]),
            )
        )
        fields = {}
    return timers


def read_auxv(pid: int) -> list[tuple[int, int]]:
    """(a_type, a_val) pairs of the ELF auxiliary vector, up to AT_NULL (excluded)."""
    words = array("Q", _read_bytes(pid, "auxv"))
    pairs = []
    for index in range(0, len(words) - 1, 2):
        if words[index] == 0:  # AT_NULL
            break
        pairs.append((words[index], words[index + 1]))
    return pairs


@dataclass(frozen=True, slots=True)
class Rlimit:
    resource: int  # RLIMIT_* number
    name: str  # as /proc/PID/limits labels it: "Max open files"
    soft: int  # rlim_cur; RLIM_INFINITY for "unlimited"
    hard: int  # rlim_max


_LIMITS_LABEL_WIDTH = 25  # proc_pid_limits() prints "%-25s %-20s %-20s %-10s"


def read_limits(pid: int) -> list[Rlimit]:
    """Resource limits, read here because prlimit() on another uid needs CAP_SYS_RESOURCE."""

    def value(text: str) -> int:
        return RLIM_INFINITY if text == "unlimited" else int(text)

    limits = []
    # the kernel prints one line per resource in RLIMIT_* order, after a header
    for resource, line in enumerate(_read_text(pid, "limits").splitlines()[1:]):
        soft, hard = line[_LIMITS_LABEL_WIDTH:].split()[:2]
        limits.append(
            Rlimit(resource, line[:_LIMITS_LABEL_WIDTH].rstrip(), value(soft), value(hard))
        )
    return limits


# ---------------------------------------------------------------- file descriptors


class FdKind(enum.Enum):
    """What an open file descriptor refers to."""

    REGULAR = "regular"
    DIRECTORY = "directory"
    PIPE = "pipe"  # anonymous: "pipe:[ino]"
    FIFO = "fifo"  # named pipe
    SOCKET = "socket"
    TTY = "tty"  # /dev/pts/*, /dev/tty*, /dev/console, /dev/ptmx (a pty master)
    CHARDEV = "chardev"
    BLOCKDEV = "blockdev"
    EVENTFD = "eventfd"
    EPOLL = "epoll"
    SIGNALFD = "signalfd"
    TIMERFD = "timerfd"
    INOTIFY = "inotify"
    FANOTIFY = "fanotify"
    USERFAULTFD = "userfaultfd"
    PIDFD = "pidfd"
    MEMFD = "memfd"
    ANON_INODE = "anon_inode"  # any other anonymous inode (io_uring, perf_event, bpf, ...)
    UNKNOWN = "unknown"


_ANON_INODE_KINDS = {
    "[eventfd]": FdKind.EVENTFD,
    "[eventpoll]": FdKind.EPOLL,
    "[signalfd]": FdKind.SIGNALFD,
    "[timerfd]": FdKind.TIMERFD,
    "inotify": FdKind.INOTIFY,  # the kernel names it without brackets
    "[fanotify]": FdKind.FANOTIFY,
    "[userfaultfd]": FdKind.USERFAULTFD,
    "[pidfd]": FdKind.PIDFD,
}
_TTY_PATH = re.compile(r"/dev/(pts/\d+|tty\w*|console|ptmx|pts/ptmx)")


def classify_fd(target: str, mode: int) -> FdKind:
    """The kind of a descriptor from its /proc/PID/fd link `target` and the st_mode it points to."""
    if target.startswith("pipe:["):
        return FdKind.PIPE
    if target.startswith("socket:[") or stat.S_ISSOCK(mode):
        return FdKind.SOCKET
    if target.startswith("anon_inode:"):
        return _ANON_INODE_KINDS.get(target.removeprefix("anon_inode:"), FdKind.ANON_INODE)
    if target.startswith("/memfd:"):
        return FdKind.MEMFD
    if stat.S_ISREG(mode):
        return FdKind.REGULAR
    if stat.S_ISDIR(mode):
        return FdKind.DIRECTORY
    if stat.S_ISFIFO(mode):
        return FdKind.FIFO
    if stat.S_ISCHR(mode):
        return FdKind.TTY if _TTY_PATH.fullmatch(target) else FdKind.CHARDEV
    if stat.S_ISBLK(mode):
        return FdKind.BLOCKDEV
    return FdKind.UNKNOWN


@dataclass(frozen=True, slots=True)
class FdEntry:
    fd: int
    target: str  # the /proc/PID/fd/N link: a path, "pipe:[ino]", "anon_inode:[eventfd]", ...
    kind: FdKind
    mode: int  # st_mode of what the fd refers to (anonymous inodes have no file type bits)
    dev: int  # st_dev and st_ino: equal for two fds sharing one inode
    ino: int  # for pipes and sockets, the number in "pipe:[ino]" / "socket:[ino]"


def list_fds(pid: int) -> list[FdEntry]:
    """Open descriptors of `pid`, ascending; one closed while we look is left out."""
    entries = []
    with _proc_access("readlink", pid, "fd") as fd_dir:
        for name in os.listdir(fd_dir):
            try:
                entries.append(_fd_entry(fd_dir, int(name)))
            except FileNotFoundError:
                if os.path.isdir(fd_dir):
                    continue
                raise
    return sorted(entries, key=lambda entry: entry.fd)


def fd_entry(pid: int, fd: int) -> FdEntry:
    """Descriptor `fd` of `pid`."""
    with _proc_access("readlink", pid, f"fd/{fd}"):
        return _fd_entry(f"/proc/{pid}/fd", fd)


def _fd_entry(fd_dir: str, fd: int) -> FdEntry:
    link = f"{fd_dir}/{fd}"
    target = os.readlink(link)
    points_to = os.stat(link)
    kind = classify_fd(target, points_to.st_mode)
    return FdEntry(fd, target, kind, points_to.st_mode, points_to.st_dev, points_to.st_ino)


def holders(
    targets: frozenset[str], *, besides: frozenset[int], among: Iterable[int] | None = None
) -> dict[str, set[int]]:
    """Which processes, `besides` left out, hold a descriptor whose /proc/PID/fd link is
    one of `targets` ("pipe:[123]", a FIFO's path, ...).

    The descriptors of the processes `among`, by default every process, are looked at:
    for every process, a few milliseconds on a quiet host, 15 on a busy one.
    Processes that end or hide their descriptors from us during the scan are passed.
    """
    found: dict[str, set[int]] = {target: set() for target in targets}
    for pid in list_pids() if among is None else among:
        if pid in besides:
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            try:
                target = os.readlink(f"{fd_dir}/{name}")
            except OSError:
                continue
            if target in found:
                found[target].add(pid)
    return found


@dataclass(frozen=True, slots=True)
class HolderScan:
    """holders() of some links, with the processes there were when the scan began."""

    pids: frozenset[int]
    found: dict[str, set[int]]


def scan_holders(targets: frozenset[str], *, besides: frozenset[int]) -> HolderScan:
    pids = frozenset(list_pids())  # before the scan: one born during it counts as new
    return HolderScan(pids, holders(targets, besides=besides))


@dataclass(frozen=True, slots=True)
class FdInfo:
    """/proc/PID/fdinfo/N: the common fields, then every other line by key.

    `extra` keeps each kind's own lines, in order, all values of a repeated key:
    "eventfd-count", "tfd" (one per epoll target: "5 events: 19 data: ..."),
    "sigmask", "clockid", "settime flags", "it_value", "inotify" ("wd:1 ino:..."),
    "fanotify", "tty-index", "lock", "Pid", ...
    """

    pos: int
    flags: int  # open flags, O_CLOEXEC included when set
    mnt_id: int
    ino: int
    extra: Mapping[str, tuple[str, ...]]

    @property
    def epoll_targets(self) -> list[tuple[int, int, int]]:
        """An epoll's interest list: (tfd, events, data) for each "tfd:" line."""
        targets = []
        for line in self.extra.get("tfd", ()):
            fields = line.split()
            # "5 events: 19 data: 5 pos:0 ino:... sdev:..." (events and data in hex)
            targets.append((int(fields[0]), int(fields[2], 16), int(fields[4], 16)))
        return targets

    @property
    def eventfd_count(self) -> int:
        """An eventfd's counter (fdinfo prints it in hex)."""
        values = self.extra.get("eventfd-count", ())
        return int(values[0], 16) if values else 0


# "key:<whitespace>value"; lines such as "inotify wd:1 ino:..." have no such colon
# and are keyed by their first word instead
_FDINFO_LINE = re.compile(r"([^:]+):\s+(.*)")


def read_fdinfo(pid: int, fd: int) -> FdInfo:
    common: dict[str, str] = {}
    extra: dict[str, tuple[str, ...]] = {}
    for line in _read_text(pid, f"fdinfo/{fd}").splitlines():
        keyed = _FDINFO_LINE.fullmatch(line)
        if keyed:
            key, value = keyed[1], keyed[2]
        else:
            key, _, value = line.partition(" ")
        if key in ("pos", "flags", "mnt_id", "ino"):
            common[key] = value
        else:
            extra[key] = (*extra.get(key, ()), value.strip())
    return FdInfo(
        int(common["pos"]),
        int(common["flags"], 8),
        int(common["mnt_id"]),
        int(common["ino"]),
        extra,
    )


# ---------------------------------------------------------------- sockets


@dataclass(frozen=True, slots=True)
class SocketInfo:
    """One socket of a network namespace's /proc/net tables.

    Inet addresses are "ip:port" ("[ip6]:port" for IPv6); a unix socket's
    `local` is its bound path ("@name" for an abstract one, "" if unbound) and
    its `remote` is "" (the peer is not in /proc/net/unix).
    """

    inode: int
    family: socket.AddressFamily
    type: socket.SocketKind
    protocol: int
    state: str  # "LISTEN", "ESTABLISHED", "CLOSE", ...; unix: "LISTEN", "CONNECTED", ...
    local: str
    remote: str

    @property
    def state_number(self) -> int:
        """The kernel's number for `state`: TCP_* for inet sockets, SS_* for unix ones."""
        table = _UNIX_STATES if self.family == socket.AF_UNIX else _TCP_STATES
        return table.index(self.state) if self.state in table else 0

    def describe(self) -> str:
        """One line for people: "tcp 127.0.0.1:8000 LISTEN", "udp ... -> ..."."""
        kind = {socket.SOCK_STREAM: "tcp", socket.SOCK_DGRAM: "udp"}.get(self.type, "socket")
        if self.family == socket.AF_UNIX:
            kind = "unix"
        elif self.family == socket.AF_INET6:
            kind += "6"
        peer = f" -> {self.remote}" if self.remote and not self.remote.endswith(":0") else ""
        return f"{kind} {self.local or '(unbound)'}{peer} {self.state}"


_INET_TABLES = {
    "tcp": (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP),
    "udp": (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP),
    "tcp6": (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP),
    "udp6": (socket.AF_INET6, socket.SOCK_DGRAM, socket.IPPROTO_UDP),
}
# include/net/tcp_states.h; UDP reuses ESTABLISHED (connected) and CLOSE (not)
_TCP_STATES = (
    "", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT",
    "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV", "BOUND_INACTIVE",
)  # fmt: skip
_UNIX_STATES = ("FREE", "UNCONNECTED", "CONNECTING", "CONNECTED", "DISCONNECTING")
_SO_ACCEPTCON = 0x10000  # the unix Flags bit of a listening socket
_UNIX_LINE = re.compile(
    r"[0-9a-f]+: [0-9A-F]+ [0-9A-F]+ ([0-9A-F]+) ([0-9A-F]+) ([0-9A-F]+) +(\d+)(?: (.*))?"
)


def _state_name(names: tuple[str, ...], number: int) -> str:
    return names[number] if 0 < number < len(names) else f"UNKNOWN({number})"


def tcp_state_name(number: int) -> str:
    """The name of the kernel's TCP_* state `number`, as /proc/net/tcp's state column."""
    return _state_name(_TCP_STATES, number)


def _inet_address(text: str) -> str:
    host_hex, _, port_hex = text.partition(":")
    raw = bytes.fromhex(host_hex)
    # each 32-bit word of the network-order address is printed as a native
    # (little-endian) integer, so every word's bytes come reversed
    host = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4)))
    port = int(port_hex, 16)
    return f"[{host}]:{port}" if host.version == 6 else f"{host}:{port}"


def _read_inet_table(
    pid: int,
    name: str,
    family: socket.AddressFamily,
    kind: socket.SocketKind,
    protocol: int,
    table: dict[int, SocketInfo],
) -> None:
    """Add the sockets of /proc/PID/net/`name` (tcp, udp6, icmp, ...) to `table`."""
    # no IPv6 tables when IPv6 is disabled; tcp, udp, icmp and unix always exist
    if family == socket.AF_INET6 and not os.path.exists(f"/proc/{pid}/net/{name}"):
        return
    for line in _read_text(pid, f"net/{name}").splitlines()[1:]:
        fields = line.split()
        inode = int(fields[9])
        if inode:
            state = _state_name(_TCP_STATES, int(fields[3], 16))
            local, remote = _inet_address(fields[1]), _inet_address(fields[2])
            table[inode] = SocketInfo(inode, family, kind, protocol, state, local, remote)


def read_ping_sockets(pid: int) -> dict[int, SocketInfo]:
    """The ICMP ping sockets (SOCK_DGRAM) of the network namespace of `pid`, by inode:
    /proc/PID/net/icmp and icmp6, whose "port" is the socket's echo identifier; a
    connected one is ESTABLISHED, with its peer (getpeername does not tell it)."""
    table: dict[int, SocketInfo] = {}
    _read_inet_table(pid, "icmp", socket.AF_INET, socket.SOCK_DGRAM, 1, table)
    _read_inet_table(pid, "icmp6", socket.AF_INET6, socket.SOCK_DGRAM, 58, table)
    return table


def read_socket_table(
    pid: int, wanted: Collection[int] | None = None, *, inet: bool = True
) -> dict[int, SocketInfo]:
    """TCP, UDP (v4 and v6) and unix sockets of the network namespace of `pid`, by inode.

    Sockets in no table (an unbound TCP socket, netlink, packet, raw) are absent;
    so are TIME_WAIT entries, which have no inode.
    With `wanted` (inodes), the tables are read in turn only until each of those is
    in: asked for one of them, the answer is the same, and each table read walks
    the kernel's whole hash of its kind (milliseconds, in a move's freeze).
    Without `inet`, only the unix table (the caller knows none wanted is TCP or UDP).
    """
    table: dict[int, SocketInfo] = {}
    missing = set(wanted) if wanted is not None else None
    for name, (family, kind, protocol) in _INET_TABLES.items() if inet else ():
        if missing is not None and not missing.difference(table):
            return table
        _read_inet_table(pid, name, family, kind, protocol, table)
    if missing is not None and not missing.difference(table):
        return table
    for line in _read_text(pid, "net/unix").splitlines()[1:]:
        parsed = _UNIX_LINE.fullmatch(line)
        if parsed is None:
            _malformed(pid, "net/unix", line)
        flags, kind_number, state_number, inode_text, path = parsed.groups()
        listening = int(flags, 16) & _SO_ACCEPTCON
        state = "LISTEN" if listening else _state_name(_UNIX_STATES, int(state_number, 16))
        kind = socket.SocketKind(int(kind_number, 16))
        inode = int(inode_text)
        table[inode] = SocketInfo(inode, socket.AF_UNIX, kind, 0, state, path or "", "")
    return table


def read_tcp_table(pid: int) -> dict[int, SocketInfo]:
    """The TCP sockets (v4 and v6) of the network namespace of `pid`, by inode."""
    table: dict[int, SocketInfo] = {}
    for name in ("tcp", "tcp6"):
        _read_inet_table(pid, name, *_INET_TABLES[name], table)
    return table


def read_raw_peers(pid: int) -> dict[int, str]:
    """The address each raw IP socket of the network namespace of `pid` is connected to,
    by inode ("" for one not connected): /proc/net/raw{,6}'s rem_address (its "port"
    is the protocol, left out). getpeername() of a raw socket never answers."""
    peers: dict[int, str] = {}
    for name in ("raw", "raw6"):
        if not os.path.exists(f"/proc/{pid}/net/{name}"):
            continue  # no raw6 when IPv6 is disabled
        for line in _read_text(pid, f"net/{name}").splitlines()[1:]:
            fields = line.split()
            host = _inet_address(fields[2]).rpartition(":")[0].strip("[]")
            peers[int(fields[9])] = "" if host in ("0.0.0.0", "::") else host
    return peers


# ---------------------------------------------------------------- pagemap


def read_pagemap(pid: int, start: int, end: int) -> array[int]:
    """The pagemap entries (u64, see PM_*) of the pages in [start, end), in one read.

    Pages above the user address space (the vsyscall page) have no entry and read as 0.
    """
    with Pagemap(pid) as pagemap:
        return pagemap.read(start, end)


class Pagemap:
    """A process's pagemap, open for many readings (read_pagemap: for one)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        with _proc_access("open", pid, "pagemap") as path:
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self, start: int, end: int) -> array[int]:
        """The entries of the pages in [start, end), as read_pagemap's."""
        if start % PAGE_SIZE or end % PAGE_SIZE or end < start:
            raise ValueError(f"[{start:#x}, {end:#x}) is not a page-aligned range")
        entries = array("Q", bytes((end - start) // PAGE_SIZE * 8))
        buffer = memoryview(entries).cast("B")
        with _proc_access("pread", self.pid, "pagemap"):
            done = 0
            while done < len(buffer):
                got = os.preadv(self._fd, [buffer[done:]], start // PAGE_SIZE * 8 + done)
                if got == 0:
                    break
                done += got
        return entries

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Pagemap:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def page_present(entry: int) -> bool:
    return bool(entry & PM_PRESENT)


def page_swapped(entry: int) -> bool:
    return bool(entry & PM_SWAP)


# byte -> 1 if bit 7 (PM_PRESENT) or bit 6 (PM_SWAP) of an entry's top byte is set, and
# not bit 2 (PM_GUARD_REGION: a guard page reads as a swap entry, but holds nothing)
_TOUCHED_TOP_BYTE = bytes(int(bool(byte & 0xC0) and not byte & 0x04) for byte in range(256))
# byte -> 1 if the page is present or swapped and not a file page (bit 5, PM_FILE)
_WRITTEN_TOP_BYTE = bytes(
    int(bool(byte & 0xC0) and not byte & 0x20 and not byte & 0x04) for byte in range(256)
)


def present_runs(pid: int, start: int, end: int) -> list[tuple[int, int]]:
    """Merged [run_start, run_end) runs of the pages in [start, end) present or swapped.

    In anonymous memory these are the pages the process has touched; the rest
    read as zeros. In a file mapping a present page may also be an untouched
    page-cache page mapped by fault-around: its entry has PM_FILE set, while a
    private page the process wrote (copied on write) does not.
    """
    return _runs(pid, start, end, _TOUCHED_TOP_BYTE)


def written_runs(pid: int, start: int, end: int) -> list[tuple[int, int]]:
    """Like present_runs, but only the pages of a private file mapping the process wrote.

    A written page of a private file mapping was copied on write: it is an
    anonymous page now (no PM_FILE), present or swapped.
    """
    return _runs(pid, start, end, _WRITTEN_TOP_BYTE)


# byte -> 1 if the page is present and not a file page (bit 5, PM_FILE): in a private file
# mapping, a page copied on write and in memory
_COPIED_TOP_BYTE = bytes(int(bool(byte & 0x80) and not byte & 0x20) for byte in range(256))


def copied_runs(pid: int, start: int, end: int) -> list[tuple[int, int]]:
    """Like written_runs, but only the copied pages in memory. What written_runs takes for
    a swapped copy may be none: where a page of a mapping a userfaultfd write-protects
    was dropped (MADV_DONTNEED), the kernel leaves a marker that pagemap reports as a
    swapped page (PM_SWAP), and the page reads as the file's."""
    return _runs(pid, start, end, _COPIED_TOP_BYTE)


def _runs(pid: int, start: int, end: int, top_byte_table: bytes) -> list[tuple[int, int]]:
    entries = read_pagemap(pid, start, end)
    # Work on the top byte of each little-endian entry at C speed: a 1 GiB
    # region is 262,144 entries, too many for a Python loop per page.
    selected = memoryview(entries).cast("B")[7::8].tobytes().translate(top_byte_table)
    runs = []
    first = selected.find(1)
    while first != -1:
        after = selected.find(0, first)
        if after == -1:
            after = len(selected)
        runs.append((start + first * PAGE_SIZE, start + after * PAGE_SIZE))
        first = selected.find(1, after)
    return runs
