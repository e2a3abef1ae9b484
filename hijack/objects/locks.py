"""File locks and leases: held again, on the same byte ranges and types, after a restore.

Not a kind of descriptor but what any description may hold: read at dump
from the "lock:" lines of each description's fdinfo (hijack.sys.locks), kept
in one FileLocks object record per description that holds any (it names the
description by `description_id`; no descriptor refers to it by object_id),
and taken again once every descriptor of the restored process exists:

- flock, OFD locks and leases belong to the open file description: taken
  through it (injected in the process, so a lease's break signal, sent to
  the lease's owner, reaches the process and names its descriptor);
- POSIX (fcntl) locks belong to the process: injected too, and last, since
  the process closing any descriptor of a file drops every POSIX lock it
  holds on that file (and building the descriptors closes some).

The restore comes after the original ended (`dump --kill`), when the locks are
free again; one another process took meanwhile makes the restore fail by name.
"""

from __future__ import annotations

import errno
import os

from hijack.errors import RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import DumpContext, describe_fd
from hijack.restore.remote import Stub
from hijack.sys import locks as kernel_locks
from hijack.sys import procfs

_KINDS = {
    kernel_locks.LockClass.FLOCK: rec.LockKind.FLOCK,
    kernel_locks.LockClass.POSIX: rec.LockKind.POSIX,
    kernel_locks.LockClass.OFD: rec.LockKind.OFD,
    kernel_locks.LockClass.LEASE: rec.LockKind.LEASE,
}
# Taken in this order: what belongs to the description first, the process's own last.
_ORDER = (rec.LockKind.FLOCK, rec.LockKind.OFD, rec.LockKind.LEASE, rec.LockKind.POSIX)
_TYPE_NAMES = {kernel_locks.F_RDLCK: "read", kernel_locks.F_WRLCK: "write"}
_CONFLICT = (errno.EAGAIN, errno.EACCES)  # EWOULDBLOCK is EAGAIN


def dump_locks(fd: int, info: procfs.FdInfo, description_id: int, dump: DumpContext) -> None:
    """Record what description `description_id` (reached by `fd`, fdinfo `info`) holds."""
    held = tuple(
        rec.FileLock(
            kind=_KINDS[lock.lock_class],
            type=lock.type_number,
            start=lock.start,
            length=lock.length,
        )
        for lock in kernel_locks.parse_fdinfo_locks(info.extra.get("lock", ()))
        # A lease being broken to nothing is on its way out; DELEG and ACCESS
        # are the kernel's own.
        if lock.lock_class in _KINDS and not lock.unlocking
    )
    if not held:
        return
    # A lease's break sends the description's F_SETSIG signal: a process that
    # asked for another one than SIGIO may have no handler for SIGIO at all.
    leased = any(lock.kind is rec.LockKind.LEASE for lock in held)
    signal = kernel_locks.owner_signal(dump.copy_fd(fd)) if leased else 0
    dump.add_object(
        ("locks", description_id),
        lambda id: rec.FileLocks(id=id, description_id=description_id, signal=signal, locks=held),
    )


def restore_locks(stub: Stub, image: ImageFiles, restored: set[int]) -> None:
    """Take every lock of the image again, through the first restored descriptor of its
    description (`restored`: the numbers the process has; a description left out holds
    nothing)."""
    through: dict[int, rec.FileDescriptor] = {}
    for descriptor in image.descriptors:
        if descriptor.fd in restored:
            through.setdefault(descriptor.description_id, descriptor)
    records = [
        record
        for record in image.objects.values()
        if isinstance(record, rec.FileLocks) and record.description_id in through
    ]
    for record in records:
        if record.signal:
            fd = through[record.description_id].fd
            stub.call("fcntl", fd, kernel_locks.F_SETSIG, record.signal)
    held = [(through[record.description_id], lock) for record in records for lock in record.locks]
    for kind in _ORDER:
        for descriptor, lock in held:
            if lock.kind is kind:
                _take(stub, descriptor, lock)


def _take(stub: Stub, descriptor: rec.FileDescriptor, lock: rec.FileLock) -> None:
    fd = descriptor.fd
    if lock.kind is rec.LockKind.FLOCK:
        operation = (
            kernel_locks.LOCK_EX if lock.type == kernel_locks.F_WRLCK else kernel_locks.LOCK_SH
        )
        result = stub.try_call("flock", fd, operation | kernel_locks.LOCK_NB)
    elif lock.kind is rec.LockKind.LEASE:
        result = stub.try_call("fcntl", fd, kernel_locks.F_SETLEASE, lock.type)
    else:
        command = (
            kernel_locks.F_SETLK if lock.kind is rec.LockKind.POSIX else kernel_locks.F_OFD_SETLK
        )
        stub.reset_scratch()
        request = stub.put(kernel_locks.pack_flock(lock.type, lock.start, lock.length))
        result = stub.try_call("fcntl", fd, command, request)
    if result >= 0:
        return
    what = f"the {describe(lock)} of {describe_fd(descriptor)}"
    if -result in _CONFLICT:
        reason = (
            "the file is open elsewhere in a way the lease forbids"
            if lock.kind is rec.LockKind.LEASE
            else "another process holds a conflicting lock"
        )
        raise RestoreError(f"cannot hold {what} again: {reason}", errno=-result)
    raise RestoreError(f"cannot hold {what} again: {os.strerror(-result)}", errno=-result)


def describe(lock: rec.FileLock) -> str:
    """ "flock write", "posix read lock on bytes 100-199", "ofd write lock on bytes 50-EOF"."""
    kind = lock.kind.name.lower()
    type_name = _TYPE_NAMES.get(lock.type, f"type {lock.type}")
    if lock.kind is rec.LockKind.FLOCK:
        return f"flock {'LOCK_EX' if lock.type == kernel_locks.F_WRLCK else 'LOCK_SH'}"
    if lock.kind is rec.LockKind.LEASE:
        return f"{type_name} lease"
    end = "EOF" if lock.length == 0 else str(lock.start + lock.length - 1)
    return f"{kind} {type_name} lock on bytes {lock.start}-{end}"


def describe_held(image: ImageFiles, descriptor: rec.FileDescriptor) -> str:
    """What `descriptor`'s description holds, for `hijack show`: "" if nothing."""
    found = [
        describe(lock)
        for record in image.objects.values()
        if isinstance(record, rec.FileLocks) and record.description_id == descriptor.description_id
        for lock in record.locks
    ]
    return "; ".join(found)
