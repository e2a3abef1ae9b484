"""System V IPC: shared memory segments, semaphore sets and message queues.

What exists is listed by /proc/sysvipc/{shm,sem,msg} (one line per object of
this IPC namespace). Semaphore values are read with semctl(GETALL), messages
with msgrcv(MSG_COPY), which copies the message at an index without taking it
off the queue (the kernel's CONFIG_CHECKPOINT_RESTORE, present here).

An object is made again under the id it had by writing that id to
/proc/sys/kernel/{shm,sem,msg}_next_id just before the get call: the kernel
takes it for the next object it makes, or fails with ENOSPC when the id is in
use (and forgets it either way).
"""

from __future__ import annotations

import ctypes
import errno as errno_codes
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from hijack.errors import HijackError
from hijack.sys.errors import kernel_call
from hijack.sys.libc import raw_syscall

IPC_PRIVATE = 0
IPC_CREAT, IPC_EXCL, IPC_NOWAIT = 0o1000, 0o2000, 0o4000
IPC_RMID, IPC_SET, IPC_STAT = 0, 1, 2
GETPID, GETALL, SETALL = 11, 13, 17
MSG_COPY = 0o40000
SHM_DEST = 0o1000  # in a segment's mode: removed (IPC_RMID), alive while attached
SHM_RDONLY, SHM_EXEC = 0o10000, 0o100000
PERMISSIONS = 0o777
# struct ipc64_perm (x86_64): key, uid, gid, cuid, cgid, mode, seq, pad, 2 unused longs.
IPC_PERM = struct.Struct("<i5IH2x4x2Q")
MSQID_QBYTES = struct.Struct("<Q")  # struct msqid64_ds: msg_qbytes
MSQID_QBYTES_OFFSET = IPC_PERM.size + 5 * 8  # after stime, rtime, ctime, cbytes, qnum
DS_SIZE = 256  # more than any of shmid64_ds (112), semid64_ds (104), msqid64_ds (120)
MESSAGE_TYPE = struct.Struct("<q")  # struct msgbuf's mtype, before mtext
SYSVIPC = Path("/proc/sysvipc")
# How /proc/PID/maps names a segment's mapping ("(deleted)" taken off); its inode is the id.
SEGMENT_PATH = re.compile(r"/SYSV[0-9a-f]{8}")
KERNEL_SETTINGS = Path("/proc/sys/kernel")


@dataclass(frozen=True)
class Owner:
    """Who owns an object and its permissions (struct ipc_perm's settable part)."""

    key: int
    uid: int
    gid: int
    mode: int  # permission bits, plus SHM_DEST for a removed segment


@dataclass(frozen=True)
class SharedMemory:
    id: int
    owner: Owner
    size: int
    cpid: int
    nattch: int

    @property
    def removed(self) -> bool:
        return bool(self.owner.mode & SHM_DEST)


@dataclass(frozen=True)
class SemaphoreSet:
    id: int
    owner: Owner
    nsems: int


@dataclass(frozen=True)
class MessageQueue:
    id: int
    owner: Owner
    cbytes: int  # bytes queued
    qnum: int  # messages queued
    lspid: int  # last to send
    lrpid: int  # last to receive


def is_segment_mapping(path: str, shared: bool, dev_major: int) -> bool:
    """Whether a mapping is a System V shared memory segment attached (shmat)."""
    return shared and dev_major == 0 and SEGMENT_PATH.fullmatch(path) is not None


def _table(name: str) -> list[dict[str, int]]:
    """/proc/sysvipc/NAME as one dict per object, keyed by its header's column names."""
    lines = (SYSVIPC / name).read_text().splitlines()
    columns = lines[0].split()
    return [
        {
            column: int(value, 8 if column == "perms" else 10)
            for column, value in zip(columns, line.split(), strict=True)
        }
        for line in lines[1:]
    ]


def _owner(row: dict[str, int]) -> Owner:
    return Owner(
        key=row["key"],
        uid=row["uid"],
        gid=row["gid"],
        mode=row["perms"],
    )


def shared_memory() -> dict[int, SharedMemory]:
    """Every segment of this IPC namespace, by id."""
    return {
        row["shmid"]: SharedMemory(
            id=row["shmid"],
            owner=_owner(row),
            size=row["size"],
            cpid=row["cpid"],
            nattch=row["nattch"],
        )
        for row in _table("shm")
    }


def semaphore_sets() -> dict[int, SemaphoreSet]:
    return {
        row["semid"]: SemaphoreSet(id=row["semid"], owner=_owner(row), nsems=row["nsems"])
        for row in _table("sem")
    }


def message_queues() -> dict[int, MessageQueue]:
    return {
        row["msqid"]: MessageQueue(
            id=row["msqid"],
            owner=_owner(row),
            cbytes=row["cbytes"],
            qnum=row["qnum"],
            lspid=row["lspid"],
            lrpid=row["lrpid"],
        )
        for row in _table("msg")
    }


# -- semaphores ---------------------------------------------------------------------


def semaphore_values(semid: int, nsems: int) -> tuple[int, ...]:
    values = (ctypes.c_ushort * nsems)()
    raw_syscall("semctl", semid, 0, GETALL, ctypes.addressof(values), what=f"semaphore set {semid}")
    return tuple(values)


def semaphore_pids(semid: int, nsems: int) -> tuple[int, ...]:
    """Each semaphore's sempid: the last process that changed it (semop, SETVAL, SETALL)."""
    return tuple(
        raw_syscall("semctl", semid, number, GETPID, 0, what=f"semaphore set {semid}")
        for number in range(nsems)
    )


def set_semaphore_values(semid: int, values: tuple[int, ...]) -> None:
    array = (ctypes.c_ushort * len(values))(*values)
    raw_syscall("semctl", semid, 0, SETALL, ctypes.addressof(array), what=f"semaphore set {semid}")


# -- messages -----------------------------------------------------------------------


def message_queue_bytes(msqid: int) -> int:
    """msg_qbytes: how many bytes the queue may hold."""
    ds = ctypes.create_string_buffer(DS_SIZE)
    raw_syscall("msgctl", msqid, IPC_STAT, ctypes.addressof(ds), what=f"message queue {msqid}")
    (qbytes,) = MSQID_QBYTES.unpack_from(ds.raw, MSQID_QBYTES_OFFSET)
    return int(qbytes)


def copy_messages(msqid: int, count: int, largest: int) -> list[tuple[int, bytes]]:
    """(type, text) of the first `count` messages of the queue, in order, left on it."""
    buffer = ctypes.create_string_buffer(MESSAGE_TYPE.size + largest)
    messages = []
    for index in range(count):
        length = raw_syscall(
            "msgrcv",
            msqid,
            ctypes.addressof(buffer),
            largest,
            index,
            IPC_NOWAIT | MSG_COPY,
            what=f"message {index} of queue {msqid}",
        )
        (message_type,) = MESSAGE_TYPE.unpack_from(buffer.raw)
        messages.append((message_type, buffer.raw[MESSAGE_TYPE.size : MESSAGE_TYPE.size + length]))
    return messages


def send_message(msqid: int, message_type: int, text: bytes) -> None:
    message = MESSAGE_TYPE.pack(message_type) + text
    buffer = ctypes.create_string_buffer(message, len(message))
    raw_syscall(
        "msgsnd",
        msqid,
        ctypes.addressof(buffer),
        len(text),
        IPC_NOWAIT,
        what=f"message queue {msqid}",
    )


# -- making objects again -------------------------------------------------------------


def create_with_id(kind: str, wanted_id: int, key: int, mode: int, size: int | None = None) -> int:
    """shmget / semget / msgget (`kind` "shm", "sem", "msg") of a new object with id
    `wanted_id`; `size` is a segment's bytes or a set's semaphores."""
    next_id = KERNEL_SETTINGS / f"{kind}_next_id"
    sizes = () if size is None else (size,)
    with kernel_call("write", what=str(next_id)):
        next_id.write_text(f"{wanted_id}\n")
    try:
        made = raw_syscall(
            f"{kind}get",
            key,
            *sizes,
            IPC_CREAT | IPC_EXCL | (mode & PERMISSIONS),
            what=f"a {kind} object with id {wanted_id}",
        )
    except HijackError as failure:
        with kernel_call("write", what=str(next_id)):
            next_id.write_text("-1\n")
        if failure.errno == errno_codes.ENOSPC:
            raise HijackError(
                f"SysV {kind} id {wanted_id} is taken by another object", errno=failure.errno
            ) from None
        raise
    if made != wanted_id:
        # Another process made an object between our write and our get, and took the id.
        remove(kind, made)
        raise HijackError(f"SysV {kind} id {wanted_id} was taken by an object made meanwhile")
    return made


def set_owner(
    kind: str, object_id: int, *, uid: int, gid: int, mode: int, qbytes: int | None = None
) -> None:
    """IPC_SET of the owner's uid, gid and permission bits (and a message queue's
    msg_qbytes); the rest of the object is kept."""
    ds = ctypes.create_string_buffer(DS_SIZE)
    call = f"{kind}ctl"
    # semctl takes the buffer as its fourth argument, after a semaphore number.
    before = (0,) if kind == "sem" else ()
    what = f"{kind} {object_id}"
    raw_syscall(call, object_id, *before, IPC_STAT, ctypes.addressof(ds), what=what)
    perm = list(IPC_PERM.unpack_from(ds.raw))
    perm[1], perm[2], perm[5] = uid, gid, mode & PERMISSIONS
    IPC_PERM.pack_into(ds, 0, *perm)
    if qbytes is not None:
        MSQID_QBYTES.pack_into(ds, MSQID_QBYTES_OFFSET, qbytes)
    raw_syscall(call, object_id, *before, IPC_SET, ctypes.addressof(ds), what=what)


def queue_size_limit() -> int:
    """kernel.msgmnb: the most bytes a queue may hold unless CAP_SYS_RESOURCE raised it."""
    return int((KERNEL_SETTINGS / "msgmnb").read_text())


def remove(kind: str, object_id: int) -> None:
    """IPC_RMID: a segment goes once no process has it attached, the others at once."""
    before = (0,) if kind == "sem" else ()
    raw_syscall(f"{kind}ctl", object_id, *before, IPC_RMID, 0, what=f"{kind} {object_id}")
