"""POSIX message queues (mq_open): their attributes and messages, through descriptors.

A queue descriptor is a file of the kernel's internal mqueue file system
(fstatfs says MQUEUE_MAGIC); its /proc/PID/fd link is the queue's name ("/q",
"/q (deleted)" once mq_unlink'ed). POSIX gives no way to look at a message
without taking it: the queue is read by taking every message and sending each
back at once, in the order taken, with its priority, which gives the queue's
order back (highest priority first, first in first out within one).
"""

from __future__ import annotations

import ctypes
import errno as errno_codes
import os
import struct
from dataclasses import dataclass

from hijack.errors import HijackError
from hijack.sys.libc import libc, raw_syscall

MQUEUE_MAGIC = 0x19800202
STATFS_SIZE = 120  # struct statfs on x86_64; f_type comes first
MQ_ATTR = struct.Struct("<4q32x")  # mq_flags, mq_maxmsg, mq_msgsize, mq_curmsgs, reserved
# An absolute CLOCK_REALTIME time long past: a call on a queue that would block times
# out at once, whatever O_NONBLOCK the shared open file description has.
PAST = struct.pack("<2q", 0, 0)
O_CREAT, O_EXCL, O_RDWR = 0o100, 0o200, 0o2


@dataclass(frozen=True)
class Attributes:
    maxmsg: int
    msgsize: int
    curmsgs: int


def is_queue(fd: int) -> bool:
    buffer = ctypes.create_string_buffer(STATFS_SIZE)
    if libc.fstatfs(fd, buffer) != 0:
        return False
    (f_type,) = struct.unpack_from("<q", buffer.raw)
    return int(f_type) == MQUEUE_MAGIC


def attributes(fd: int) -> Attributes:
    old = ctypes.create_string_buffer(MQ_ATTR.size)
    raw_syscall("mq_getsetattr", fd, 0, ctypes.addressof(old), what="a message queue")
    _, maxmsg, msgsize, curmsgs = MQ_ATTR.unpack(old.raw)
    return Attributes(maxmsg, msgsize, curmsgs)


def take_and_put_back(fd: int, attrs: Attributes) -> list[tuple[int, bytes]]:
    """(priority, message) of every message queued, in the queue's order; the queue holds
    them again when this returns."""
    buffer = ctypes.create_string_buffer(attrs.msgsize)
    priority = ctypes.c_uint(0)
    past = ctypes.create_string_buffer(PAST, len(PAST))
    messages = []
    try:
        while True:
            try:
                length = raw_syscall(
                    "mq_timedreceive",
                    fd,
                    ctypes.addressof(buffer),
                    attrs.msgsize,
                    ctypes.addressof(priority),
                    ctypes.addressof(past),
                    what="a message queue",
                )
            except HijackError as empty:
                if empty.errno in (errno_codes.ETIMEDOUT, errno_codes.EAGAIN):
                    break
                raise
            messages.append((priority.value, buffer.raw[:length]))
    finally:
        send(fd, messages)
    return messages


def send(fd: int, messages: list[tuple[int, bytes]]) -> None:
    past = ctypes.create_string_buffer(PAST, len(PAST))
    for priority, message in messages:
        data = ctypes.create_string_buffer(message, len(message))
        raw_syscall(
            "mq_timedsend",
            fd,
            ctypes.addressof(data),
            len(message),
            priority,
            ctypes.addressof(past),
            what="a message queue",
        )


def open_queue(name: str, create: Attributes | None, mode: int = 0o600) -> int:
    """mq_open(name, O_RDWR[, O_CREAT|O_EXCL with `create`'s sizes]): a descriptor of ours."""
    raw_name = ctypes.create_string_buffer(os.fsencode(name.removeprefix("/")))
    flags, attr_address = O_RDWR | os.O_CLOEXEC, 0
    attr = ctypes.create_string_buffer(MQ_ATTR.size)
    if create is not None:
        flags |= O_CREAT | O_EXCL
        MQ_ATTR.pack_into(attr, 0, 0, create.maxmsg, create.msgsize, 0)
        attr_address = ctypes.addressof(attr)
    return raw_syscall(
        "mq_open", ctypes.addressof(raw_name), flags, mode, attr_address, what=f"queue {name}"
    )


def unlink(name: str) -> None:
    raw_name = ctypes.create_string_buffer(os.fsencode(name.removeprefix("/")))
    raw_syscall("mq_unlink", ctypes.addressof(raw_name), what=f"queue {name}")
