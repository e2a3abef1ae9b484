"""System V IPC objects the process uses: shared memory segments, semaphore sets, message queues.

They are no descriptors: the image holds them as object records that no
FileDescriptor refers to (docs/crf.md, "How SysV objects are held"). Which the
process uses:
- a segment it has attached (a mapping of "/SYSV<key>", whose inode is the
  segment's id), removed (IPC_RMID) or not;
- a semaphore set in which it was the last to change a semaphore (sempid);
- a message queue it was the last to send to or receive from (lspid, lrpid).

A segment's contents are the pages of its mappings (segments of the image);
a set's values and a queue's messages (with their types, in order, read with
MSG_COPY: nothing is taken) are in its record.

At restore, before the stub exists (`prepare`): an object still there under
its id, with its key (a restore on the same node: SysV objects outlive their
processes) is the process's own and is used as it is, its contents live;
otherwise it is made again under the same id (/proc/sys/kernel/*_next_id),
with its key, owner and permissions, values and messages; an id taken by
another object is refused. The stub attaches each segment at its address
(hijack.restore.address_space); a segment that had been removed is removed
again once attached.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field

from hijack.errors import HijackError, RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import DumpContext
from hijack.sys import procfs, sysv

SysvRecord = rec.SysvSharedMemory | rec.SysvSemaphores | rec.SysvMessageQueue


def _owned(owner: sysv.Owner) -> rec.SysvOwner:
    return rec.SysvOwner(key=owner.key & 0xFFFFFFFF, mode=owner.mode, uid=owner.uid, gid=owner.gid)


def dump_held(dump: DumpContext) -> None:
    """Add a record for every SysV object the stopped process uses."""
    pid = dump.pid
    attached = {
        m.inode
        # The caller's read of the layout (a dump's, since the stop), else read here.
        for m in dump.maps or procfs.read_maps(pid)
        if sysv.is_segment_mapping(m.path, m.shared, m.dev_major)
    }
    segments = sysv.shared_memory()
    for shmid in sorted(attached):
        if shmid in segments:  # not: another IPC namespace's, which the restore refuses
            dump.add_object(("shm", shmid), _segment_record(segments[shmid]))
    for semaphores in sysv.semaphore_sets().values():
        if pid in sysv.semaphore_pids(semaphores.id, semaphores.nsems):
            dump.add_object(("sem", semaphores.id), _semaphores_record(semaphores))
    for queue in sysv.message_queues().values():
        if pid in (queue.lspid, queue.lrpid):
            dump.add_object(("msg", queue.id), _queue_record(queue))


def _segment_record(found: sysv.SharedMemory) -> Callable[[int], rec.ObjectRecord]:
    return lambda object_id: rec.SysvSharedMemory(
        id=object_id, shmid=found.id, size=found.size, owner=_owned(found.owner)
    )


def _semaphores_record(found: sysv.SemaphoreSet) -> Callable[[int], rec.ObjectRecord]:
    values = sysv.semaphore_values(found.id, found.nsems)
    return lambda object_id: rec.SysvSemaphores(
        id=object_id, semid=found.id, values=values, owner=_owned(found.owner)
    )


def _queue_record(found: sysv.MessageQueue) -> Callable[[int], rec.ObjectRecord]:
    messages = tuple(
        rec.SysvMessage(mtype=mtype, text=text)
        for mtype, text in sysv.copy_messages(found.id, found.qnum, max(found.cbytes, 1))
    )
    qbytes = sysv.message_queue_bytes(found.id)
    return lambda object_id: rec.SysvMessageQueue(
        id=object_id, msqid=found.id, qbytes=qbytes, messages=messages, owner=_owned(found.owner)
    )


def segment_refusals(segments: tuple[rec.Segment, ...], image: ImageFiles) -> list[str]:
    """The System V segments mapped whose segment the image does not hold (the dumper
    did not find it: another IPC namespace's)."""
    held_ids = {s.shmid for s in held(image) if isinstance(s, rec.SysvSharedMemory)}
    return [
        f"System V segment {segment.inode} mapped at {segment.start:#x}, which the image"
        " does not hold"
        for segment in segments
        if sysv.is_segment_mapping(segment.path, segment.shared, segment.dev_major)
        and segment.inode not in held_ids
    ]


def held(image: ImageFiles) -> list[SysvRecord]:
    return [
        found
        for found in image.objects.values()
        if isinstance(found, rec.SysvSharedMemory | rec.SysvSemaphores | rec.SysvMessageQueue)
    ]


def _signed(key: int) -> int:
    return key - (1 << 32) if key >= 1 << 31 else key


@dataclass
class Prepared:
    """The SysV objects a restore has ready for its stub."""

    segments: dict[int, int] = field(default_factory=dict)  # shmid -> size, to attach
    kept: set[int] = field(default_factory=set)  # segments found live: their pages are not written
    to_remove: list[int] = field(default_factory=list)  # segments to remove once attached
    made: list[tuple[str, int]] = field(default_factory=list)  # (kind, id) made here

    def after_attach(self) -> None:
        """Remove again the segments that had been removed (they live on while attached)."""
        for shmid in self.to_remove:
            sysv.remove("shm", shmid)
        self.to_remove.clear()

    def undo(self) -> None:
        """A restore that failed: remove what it made (ours alone: nothing else knew them)."""
        for kind, object_id in reversed(self.made):
            try:
                sysv.remove(kind, object_id)
            except HijackError:
                continue  # gone already
        self.made.clear()


def prepare(image: ImageFiles, segments: tuple[rec.Segment, ...]) -> Prepared:
    """Find or make every SysV object of the image, before the stub exists."""
    prepared = Prepared()
    # A segment's mapping is named after the key it was made with, which a removed
    # segment no longer has: it is made again under that key, then removed.
    made_with = {
        s.inode: int(s.path.removeprefix("/SYSV"), 16)
        for s in segments
        if sysv.is_segment_mapping(s.path, s.shared, s.dev_major)
    }
    try:
        for found in held(image):
            if isinstance(found, rec.SysvSharedMemory):
                _prepare_segment(found, made_with.get(found.shmid, 0), prepared)
            elif isinstance(found, rec.SysvSemaphores):
                _prepare_semaphores(found, prepared)
            else:
                _prepare_queue(found, prepared)
    except BaseException:
        prepared.undo()
        raise
    return prepared


def _set_owner(kind: str, made: int, owner: rec.SysvOwner, qbytes: int | None = None) -> None:
    sysv.set_owner(kind, made, uid=owner.uid, gid=owner.gid, mode=owner.mode, qbytes=qbytes)


def _taken(kind: str, object_id: int) -> RestoreError:
    return RestoreError(
        f"SysV {kind} id {object_id} is taken by another object: cannot make the process's"
        " own again (remove that one with ipcrm, or restore where it is free)"
    )


def _prepare_segment(found: rec.SysvSharedMemory, made_with: int, prepared: Prepared) -> None:
    removed = bool(found.owner.mode & sysv.SHM_DEST)
    prepared.segments[found.shmid] = found.size
    live = sysv.shared_memory().get(found.shmid)
    if live is not None:
        same = (live.size, live.owner.key & 0xFFFFFFFF, live.removed) == (
            found.size, found.owner.key, removed,
        )  # fmt: skip
        if not same:
            raise _taken("shm", found.shmid)
        prepared.kept.add(found.shmid)
        return
    key = _signed(made_with) if removed else _signed(found.owner.key)
    try:
        made = sysv.create_with_id("shm", found.shmid, key, found.owner.mode, found.size)
    except HijackError as taken:
        if not removed or taken.errno != errno.EEXIST:
            raise
        # Its old key names another segment now: a removed one needs none.
        made = sysv.create_with_id(
            "shm", found.shmid, sysv.IPC_PRIVATE, found.owner.mode, found.size
        )
    prepared.made.append(("shm", made))
    _set_owner("shm", made, found.owner)
    if removed:
        prepared.to_remove.append(made)


def _prepare_semaphores(found: rec.SysvSemaphores, prepared: Prepared) -> None:
    live = sysv.semaphore_sets().get(found.semid)
    if live is not None:
        if (live.nsems, live.owner.key & 0xFFFFFFFF) != (len(found.values), found.owner.key):
            raise _taken("semaphore set", found.semid)
        return
    made = sysv.create_with_id(
        "sem", found.semid, _signed(found.owner.key), found.owner.mode, len(found.values)
    )
    prepared.made.append(("sem", made))
    sysv.set_semaphore_values(made, found.values)
    _set_owner("sem", made, found.owner)


def _prepare_queue(found: rec.SysvMessageQueue, prepared: Prepared) -> None:
    live = sysv.message_queues().get(found.msqid)
    if live is not None:
        if live.owner.key & 0xFFFFFFFF != found.owner.key:
            raise _taken("message queue", found.msqid)
        return
    made = sysv.create_with_id("msg", found.msqid, _signed(found.owner.key), found.owner.mode)
    prepared.made.append(("msg", made))
    # Above kernel.msgmnb only CAP_SYS_RESOURCE may raise a queue's size, and root
    # has it not here (KERNEL-NOTES): such a queue gets what this kernel allows.
    qbytes = min(found.qbytes, sysv.queue_size_limit())
    _set_owner("msg", made, found.owner, qbytes)
    for message in found.messages:
        sysv.send_message(made, message.mtype, message.text)


def describe_held(image: ImageFiles) -> list[str]:
    """One line per SysV object of the image, for `hijack show`."""
    lines = []
    for found in held(image):
        key = f"key {found.owner.key:#010x}" if found.owner.key else "private"
        if isinstance(found, rec.SysvSharedMemory):
            removed = ", removed" if found.owner.mode & sysv.SHM_DEST else ""
            lines.append(f"shm {found.shmid}: {key}, {found.size} bytes{removed}")
        elif isinstance(found, rec.SysvSemaphores):
            values = " ".join(str(value) for value in found.values)
            lines.append(f"sem {found.semid}: {key}, values {values}")
        else:
            lines.append(f"msg {found.msqid}: {key}, {len(found.messages)} messages")
    return lines
