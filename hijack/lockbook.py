"""The network locks of `dump --kill`, written down in the state directory.

A lock (hijack.sys.netlock) outlives the command that took it: it holds a killed
process's peers back until a restore of its image lifts it. So each lock is
written down (STATE/netlocks/TABLE.json: the process, its start time, its network
namespace, the image) before it is taken, and crossed out once lifted. A dump
killed between the two, or an image deleted before its restore, leaves a lock
nothing would lift: `hijack recover` settles them (settle()):

- the process still runs (the dump was killed before it killed the process): its
  lock is lifted, or its peers would never reach it again;
- the process is gone and its image still exists: the lock is kept, and said so: it
  is how the peers wait for the restore;
- the process is gone and its image too: lifted (no restore can come);
- the process is gone and its image went to stdout: kept (nothing tells whether
  it still waits), and said so;
- the lock is no longer there (its namespace ended, or someone lifted it): the
  record goes.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from hijack.errors import HijackError
from hijack.registry import state_dir
from hijack.sys import netlock, pidfd, procfs, tcp_repair

STDOUT = "-"  # the image of a dump written to stdout: where it went is not known


@dataclass(frozen=True)
class LockRecord:
    table: str  # the lock's nftables table (netlock.lock_name)
    pid: int  # the process it was taken for
    fd: int  # its descriptor of the socket
    start_time: int  # that process's /proc/PID/stat starttime: tells a reused pid
    namespace: str  # its network namespace, as /proc/PID/ns/net reads: "net:[4026531840]"
    image: str  # the image's absolute path, or STDOUT
    taken_at: float
    what: str  # "the connection ('127.0.0.1', 80) -> ..." for people


def _directory() -> Path:
    return state_dir() / "netlocks"


def lock(
    pid: int,
    fd: int,
    image: str,
    local: netlock.Endpoint,
    remote: netlock.Endpoint | None,
    protocol: int = socket.IPPROTO_TCP,
) -> None:
    """netlock.lock(), written down first (a lock taken is never one nobody knows of)."""
    table = netlock.lock_name(local, remote, protocol)
    record = LockRecord(
        table=table,
        pid=pid,
        fd=fd,
        start_time=procfs.read_stat(pid).starttime,
        namespace=os.readlink(f"/proc/{pid}/ns/net"),
        image=image,
        taken_at=time.time(),
        what=netlock.describe(local, remote, protocol),
    )
    directory = _directory()
    directory.mkdir(parents=True, exist_ok=True)
    partial = directory / f".{table}.partial"
    partial.write_text(json.dumps(asdict(record)))
    partial.replace(directory / f"{table}.json")
    try:
        netlock.lock(pid, local, remote, protocol)
    except BaseException:
        forget(table)
        raise


def unlock(
    pid: int,
    local: netlock.Endpoint,
    remote: netlock.Endpoint | None,
    protocol: int = socket.IPPROTO_TCP,
) -> None:
    """netlock.unlock(), then crossed out."""
    netlock.unlock(pid, local, remote, protocol)
    forget(netlock.lock_name(local, remote, protocol))


def forget(table: str) -> None:
    (_directory() / f"{table}.json").unlink(missing_ok=True)


def records() -> list[LockRecord]:
    """Every lock written down here (a record that does not read is skipped)."""
    found = []
    for path in sorted(_directory().glob("*.json")):
        with contextlib.suppress(OSError, ValueError, TypeError):
            found.append(LockRecord(**json.loads(path.read_text())))
    return found


class Standing(enum.Enum):
    """Where a lock written down stands (module docstring)."""

    WAITS_FOR_RESTORE = "waits for its restore"  # the image exists: its restore lifts it
    WAITS_UNKNOWN = "image went to stdout"  # kept: nothing tells whether a restore comes
    PROCESS_RUNS = "stale: the process was not killed"
    IMAGE_GONE = "stale: its image is gone"

    @property
    def stale(self) -> bool:
        """Nothing but `hijack recover` would lift it."""
        return self in (Standing.PROCESS_RUNS, Standing.IMAGE_GONE)


@dataclass(frozen=True)
class StandingLock:
    record: LockRecord
    standing: Standing
    holder: int  # a process in the lock's network namespace, to enter it through


def standing() -> list[StandingLock]:
    """Every lock written down that is still there, and where it stands; changes nothing."""
    return _survey()[0]


def _survey() -> tuple[list[StandingLock], list[LockRecord]]:
    """The locks written down: those still there, where they stand; those gone."""
    found, gone = [], []
    for record in records():
        holder = _in_namespace(record.namespace, record.pid)
        if holder is None or record.table not in netlock.locks_held(holder):
            gone.append(record)
            continue
        if _still_runs(record):
            state = Standing.PROCESS_RUNS
        elif record.image == STDOUT:
            state = Standing.WAITS_UNKNOWN
        elif Path(record.image).exists():
            state = Standing.WAITS_FOR_RESTORE
        else:
            state = Standing.IMAGE_GONE
        found.append(StandingLock(record, state, holder))
    return found, gone


def settle() -> list[str]:
    """Lift the locks nothing else would lift, keep those an image waits on; a line
    for each lock written down (module docstring)."""
    still_there, gone = _survey()
    for record in gone:
        forget(record.table)  # its namespace ended, or someone lifted it
    lines = []
    for lock in still_there:
        record = lock.record
        name = f"the network lock of process {record.pid} ({record.what})"
        if lock.standing is Standing.WAITS_UNKNOWN:
            lines.append(f"{name} kept: its image went to stdout; its restore lifts it")
            continue
        if lock.standing is Standing.WAITS_FOR_RESTORE:
            lines.append(f"{name} kept: its image {record.image} waits for its restore")
            continue
        if lock.standing is Standing.PROCESS_RUNS:
            _repair_off(record)
            reason = "lifted: the process was not killed"
        else:
            reason = f"lifted: its image {record.image} is gone"
        try:
            netlock.remove_lock(lock.holder, record.table)
        except HijackError as error:
            lines.append(f"{name} could not be lifted: {error}")
            continue
        forget(record.table)
        lines.append(f"{name} {reason}")
    return lines


def _still_runs(record: LockRecord) -> bool:
    try:
        stat = procfs.read_stat(record.pid)
    except HijackError:
        return False
    return stat.starttime == record.start_time and stat.state not in "ZX"


def _repair_off(record: LockRecord) -> None:
    """The socket of a process that was not killed, back in normal mode: the dump may
    have put it in repair mode just before it was killed itself."""
    with contextlib.suppress(OSError, HijackError):
        copy = pidfd.copy_fd(record.pid, record.fd)
        try:
            if tcp_repair.state_of(copy) in tcp_repair.CONNECTED_STATES:
                tcp_repair.set_repair(copy, False)
        finally:
            os.close(copy)


def _in_namespace(namespace: str, pid: int) -> int | None:
    """A process in network namespace `namespace` (this one, the locked one, or any
    other) to enter it through; None if none is left (the namespace, with its locks,
    is gone)."""
    for candidate in (os.getpid(), pid):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{candidate}/ns/net") == namespace:
                return candidate
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry.name}/ns/net") == namespace:
                    return int(entry.name)
    return None
