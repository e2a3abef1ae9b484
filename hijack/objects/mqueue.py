"""POSIX message queues (mq_open): the queue, its sizes and messages, and each descriptor.

A queue descriptor looks like a regular file named "/name" (its /proc/PID/fd
link), on the kernel's internal mqueue file system: fstatfs tells them apart.
POSIX has no way to read a message and leave it: the dumper takes every
message and sends each straight back (hijack.sys.mqueue), in the same order
and with its priority, while the process is stopped. A process on the other
end that waits in mq_receive could take one in between: such queues shared
with another process running at that instant are not made safe by this.

At restore a queue still there under its name is the process's own, used as
it is (named queues outlive processes); a queue that is gone, or was
unlinked, is made anew with its sizes and messages (and unlinked again).
"""

from __future__ import annotations

import errno
import os

from hijack.errors import HijackError, RestoreError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import DumpContext, Kind, RestoreContext
from hijack.sys import mqueue, procfs

DELETED = " (deleted)"


def _looks_like_queue(entry: procfs.FdEntry) -> bool:
    name = entry.target.removesuffix(DELETED)
    return entry.kind is procfs.FdKind.REGULAR and name.count("/") == 1 and name.startswith("/")


class MessageQueue(Kind):
    name = "mqueue"
    record_types = (rec.PosixMessageQueue,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return _looks_like_queue(entry) and mqueue.is_queue(dump.copy_fd(entry.fd))

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        def make(object_id: int) -> rec.PosixMessageQueue:
            copy = dump.copy_fd(entry.fd)
            attributes = mqueue.attributes(copy)
            messages = mqueue.take_and_put_back(copy, attributes)
            return rec.PosixMessageQueue(
                id=object_id,
                name=entry.target.removesuffix(DELETED),
                unlinked=entry.target.endswith(DELETED),
                mode=entry.mode & 0o777,
                maxmsg=attributes.maxmsg,
                msgsize=attributes.msgsize,
                messages=tuple(rec.PosixMessage(priority=p, data=d) for p, d in messages),
            )

        return dump.add_object(("mqueue", entry.dev, entry.ino), make)

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        queue = restore.image.object_of(descriptor, rec.PosixMessageQueue)
        ours = restore.built(queue.id)
        if ours is None:
            ours = _open_or_make(queue)
            restore.keep(queue.id, ours)
        restore.give(ours, descriptor)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        queue = image.object_of(descriptor, rec.PosixMessageQueue)
        gone = " (unlinked)" if queue.unlinked else ""
        return (
            f"{queue.name}{gone}, {len(queue.messages)} of {queue.maxmsg} messages"
            f" of up to {queue.msgsize} bytes"
        )


def _open_or_make(queue: rec.PosixMessageQueue) -> int:
    if not queue.unlinked:
        try:
            return mqueue.open_queue(queue.name, None)
        except HijackError as missing:
            if missing.errno != errno.ENOENT:  # a queue that is gone is made below
                raise RestoreError(f"cannot open message queue {queue.name}: {missing}") from None
    attributes = mqueue.Attributes(queue.maxmsg, queue.msgsize, 0)
    try:
        made = mqueue.open_queue(queue.name, attributes, queue.mode)
    except HijackError as failed:
        raise RestoreError(f"cannot make message queue {queue.name} again: {failed}") from None
    try:
        mqueue.send(made, [(m.priority, m.data) for m in queue.messages])
        if queue.unlinked:
            mqueue.unlink(queue.name)
    except BaseException:
        os.close(made)
        raise
    return made
