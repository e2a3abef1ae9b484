"""What /proc shows of a process, as comparable sets (CRIU zdtm's before/after check).

A dump and a restore must give back the same process: the same mappings at
the same addresses with the same protections, the same descriptors at the
same numbers with the same targets, offsets and flags. Both views are read
from /proc directly, not through hijack's own parsers, so a parser bug in
hijack cannot hide itself. A difference is reported as "lost: ... /
appeared: ...", naming every entry on each side. Besides mappings and
descriptors: the locks and leases held through each descriptor, and an
identity view: argv, environment, auxv, ids, capabilities, signal
dispositions and mask, limits, cwd, root, process group and session.

Also here: where a process sits (/proc/PID/syscall), polled with a bound,
for tests that must dump a process while it is really inside a system call.
"""

from __future__ import annotations

import os
import re
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

# Not part of the process's own address space: the kernel maps it into every
# process at the same place, and hijack never puts it in an image.
IGNORED_MAPPINGS = frozenset({"[vsyscall]"})
POLL_INTERVAL = 0.002  # seconds between two looks at /proc while polling
POLL_TIMEOUT = 10.0


@dataclass(frozen=True, order=True)
class MapView:
    """One /proc/PID/maps line, without what a faithful restore may change.

    Device and inode are left out: a MAP_SHARED|MAP_ANONYMOUS mapping is
    backed by a shmem object ("/dev/zero (deleted)") that a restore must create
    anew, so its inode differs however faithful the restore is. Offsets are
    left out too: for file mappings they follow from the path and the address
    the process mapped, and a wrong one shows as wrong contents, which the
    fixtures check themselves. A socket's ring ("socket:[INODE]", a packet socket's) is
    a new socket's, its inode in the path left out for the same reason.
    """

    start: int
    end: int
    perms: str
    path: str

    def __str__(self) -> str:
        return f"{self.start:x}-{self.end:x} {self.perms} {self.path or '(anonymous)'}"


@dataclass(frozen=True, order=True)
class FdView:
    """One descriptor: its number, what it refers to, its offset and open flags."""

    fd: int
    target: str
    pos: int
    flags: int

    def __str__(self) -> str:
        return f"fd {self.fd} -> {self.target} (pos {self.pos}, flags {self.flags:#o})"


def maps_view(pid: int) -> frozenset[MapView]:
    entries = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        # address perms offset dev inode [path]; the path may hold spaces.
        fields = line.split(maxsplit=5)
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        path = fields[5].strip() if len(fields) > 5 else ""
        if path.startswith("socket:["):
            path = "socket:[]"
        if path not in IGNORED_MAPPINGS:
            entries.add(MapView(start, end, fields[1], path))
    return frozenset(entries)


O_TMPFILE_BIT = 0o20000000  # __O_TMPFILE
O_TMPFILE = O_TMPFILE_BIT | os.O_DIRECTORY


def fds_view(pid: int) -> frozenset[FdView]:
    entries = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        fd = int(name)
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
        info = dict(
            line.split(":", 1)
            for line in Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
            if ":" in line
        )
        flags = int(info["flags"], 8)
        if flags & O_TMPFILE_BIT:
            # A file made by O_TMPFILE comes back reopened, without those open-time
            # flags (hijack.objects.regular.reopen_flags: documented).
            flags &= ~O_TMPFILE
        entries.add(FdView(fd, target, int(info["pos"]), flags))
    return frozenset(entries)


def pipes_named_alike(view: frozenset[FdView]) -> frozenset[FdView]:
    """The descriptors with each pipe named by its lowest descriptor number instead of its
    inode (a pipe rebuilt from an image is a new inode): which descriptors share a pipe,
    and which end each is (the flags), still show."""
    first: dict[str, int] = {}
    renamed = set()
    for entry in sorted(view):
        target = entry.target
        if re.fullmatch(r"pipe:\[\d+\]", target):
            target = f"pipe of fd {first.setdefault(target, entry.fd)}"
        renamed.add(FdView(entry.fd, target, entry.pos, entry.flags))
    return frozenset(renamed)


@dataclass(frozen=True, order=True)
class LockView:
    """A lock or lease held through a descriptor: an fdinfo "lock:" line, its number left out
    ("POSIX  ADVISORY  WRITE 1234 fe:00:5678 10 19": class, state, type, pid, file, range)."""

    fd: int
    lock: str

    def __str__(self) -> str:
        return f"fd {self.fd} holds {self.lock}"


def locks_view(pid: int) -> frozenset[LockView]:
    entries = set()
    for name in os.listdir(f"/proc/{pid}/fdinfo"):
        for line in Path(f"/proc/{pid}/fdinfo/{name}").read_text().splitlines():
            if line.startswith("lock:"):
                entries.add(LockView(int(name), " ".join(line.split()[2:])))
    return frozenset(entries)


# /proc/PID/status lines a restore must give back as they were.
STATUS_FIELDS = (
    "Umask",
    "Uid",
    "Gid",
    "Groups",
    "SigBlk",
    "SigIgn",
    "SigCgt",
    "CapInh",
    "CapPrm",
    "CapEff",
    "CapBnd",
    "CapAmb",
    "NoNewPrivs",
)
SAME_LINKS = ("exe", "cwd", "root")


def identity_view(pid: int) -> frozenset[tuple[str, str]]:
    """Who the process is, as (what, value) pairs: argv, environment, auxv, ids, limits, ...

    Left out, because they differ by design: the pid and the parent (a
    restored process is the child of whoever restored it), times and counters,
    and the kernel's own task flags in /proc/PID/stat (PF_SUPERPRIV records
    that the restorer used a capability on the process's behalf).
    """
    proc = Path(f"/proc/{pid}")
    # One entry per argument, variable, auxv pair and limit: a difference names it.
    argv = (proc / "cmdline").read_bytes().split(b"\0")
    entries = {(f"argv[{index}]", repr(arg)) for index, arg in enumerate(argv)}
    entries |= {("environ", repr(var)) for var in (proc / "environ").read_bytes().split(b"\0")}
    auxv = struct.iter_unpack("<QQ", (proc / "auxv").read_bytes())
    entries |= {("auxv", f"{key} {value:#x}") for key, value in auxv}
    limits = (proc / "limits").read_text().splitlines()
    entries |= {("limit", " ".join(line.split())) for line in limits}
    entries |= {(name, (proc / name).read_text().strip()) for name in ("comm", "personality")}
    entries |= {(name, os.readlink(proc / name)) for name in SAME_LINKS}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_FIELDS:
            entries.add((key, " ".join(value.split())))
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    entries |= {("pgrp", fields[2]), ("session", fields[3]), ("tty_nr", fields[4])}
    return frozenset(entries)


def difference(before: Iterable[object], after: Iterable[object]) -> str:
    """'' when equal as sets, else every entry lost and every entry that appeared."""
    old, new = set(before), set(after)
    if old == new:
        return ""
    lost = "\n".join(f"  {entry}" for entry in sorted(old - new, key=str)) or "  (none)"
    appeared = "\n".join(f"  {entry}" for entry in sorted(new - old, key=str)) or "  (none)"
    return f"lost:\n{lost}\nappeared:\n{appeared}"


def current_syscall(pid: int) -> tuple[int, ...] | None:
    """(number, arg1, ..., arg6) of the call the process blocks in; None while it runs."""
    fields = Path(f"/proc/{pid}/syscall").read_text().split()
    if fields[0] == "running" or fields[0] == "-1":
        return None
    return (int(fields[0]), *(int(arg, 16) for arg in fields[1:7]))


def has_exited(pid: int) -> bool:
    """Whether `pid` is gone or a zombie (it can block in nothing any more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def wait_in_syscall(
    pid: int,
    numbers: Iterable[int],
    *,
    first_arg: int | None = None,
    timeout: float = POLL_TIMEOUT,
    describe: Callable[[], str] | None = None,
) -> tuple[int, ...]:
    """Poll until `pid` blocks in one of the system calls `numbers` (and with `first_arg`).

    A bounded poll: a process entering a blocking call tells nobody, /proc is
    the only place to see it. Fails at once if the process exits, else after
    `timeout`, with where it was last seen and `describe()` (e.g. its stderr).
    """
    wanted = frozenset(numbers)
    deadline = time.monotonic() + timeout
    seen = current_syscall(pid)
    while seen is None or seen[0] not in wanted or first_arg not in (None, seen[1]):
        exited = has_exited(pid)
        if exited or time.monotonic() > deadline:
            where = "it exited" if exited else f"last seen in {seen or 'user space'}"
            raise AssertionError(
                f"process {pid} not blocked in syscall {sorted(wanted)} (first argument"
                f" {first_arg}) within {timeout} s: {where}"
                + (f"\n{describe()}" if describe else "")
            )
        time.sleep(POLL_INTERVAL)
        seen = current_syscall(pid)
    return seen


def signal_bits(pid: int, field: str) -> int:
    """A signal mask of /proc/PID/status (SigBlk, SigCgt, SigIgn, ...) as an integer."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"/proc/{pid}/status has no {field}")


def processes_named(comm: str) -> frozenset[tuple[int, int]]:
    """(pid, start time) of every process on the machine whose comm is `comm`."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # gone between the listing and the read
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if name == comm:
            start_time = int(stat[stat.rindex(")") + 2 :].split()[19])
            found.add((int(entry), start_time))
    return frozenset(found)
