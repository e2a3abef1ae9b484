"""Pipes and FIFOs: their size, what they buffer (read without consuming it), and new ones.

A pipe's buffer is read through tee(2): the source's buffers are linked into a
pipe of ours as big as the source, and ours is read, so the process the pipe
belongs to finds every byte still there. Reads of a pipe in packet mode
(O_DIRECT on the writer) return one packet each, so the packets' boundaries
come out of the same reads.
"""

from __future__ import annotations

import array
import fcntl
import os
import termios
from collections.abc import Iterable

from hijack.errors import HijackError
from hijack.sys.errors import kernel_call
from hijack.sys.libc import raw_syscall

SPLICE_F_NONBLOCK = 2
O_DIRECT = 0o40000
# Far more than any pipe holds: tee takes what there is.
TEE_ALL = 1 << 30


def pipe_size(fd: int) -> int:
    """F_GETPIPE_SZ: the capacity of the pipe behind `fd`, in bytes."""
    with kernel_call("fcntl(F_GETPIPE_SZ)"):
        return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


def set_pipe_size(fd: int, size: int) -> None:
    with kernel_call("fcntl(F_SETPIPE_SZ)", what=f"a pipe of {size} bytes"):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)


def buffered(fd: int) -> int:
    """FIONREAD: the bytes waiting in the pipe behind `fd` (either end)."""
    count = array.array("i", [0])
    with kernel_call("ioctl(FIONREAD)"):
        fcntl.ioctl(fd, termios.FIONREAD, count)
    return count[0]


def make_pipe(flags: int = 0) -> tuple[int, int]:
    """pipe2(flags): (read end, write end), close-on-exec."""
    with kernel_call("pipe2"):
        return os.pipe2(flags | os.O_CLOEXEC)


def peek(read_fd: int) -> list[bytes]:
    """Every byte buffered in the pipe `read_fd` reads from, left in it; one item per read
    (a pipe in packet mode gives one per packet, any other all of it in one)."""
    waiting = buffered(read_fd)
    if not waiting:
        return []
    size = pipe_size(read_fd)
    ours_read, ours_write = make_pipe(os.O_NONBLOCK)
    try:
        set_pipe_size(ours_write, size)
        linked = raw_syscall("tee", read_fd, ours_write, TEE_ALL, SPLICE_F_NONBLOCK)
        if linked != waiting:
            raise HijackError(f"tee took {linked} of the {waiting} bytes waiting in a pipe")
        chunks = []
        while linked > 0:
            with kernel_call("read", what="our copy of a pipe's buffer"):
                chunk = os.read(ours_read, size)
            chunks.append(chunk)
            linked -= len(chunk)
        return chunks
    finally:
        os.close(ours_read)
        os.close(ours_write)


def fill(write_fd: int, chunks: Iterable[bytes], packets: bool) -> None:
    """Write `chunks` into a new, empty pipe big enough for them; with `packets`, each as
    one packet (the write end in packet mode while it writes)."""
    flags = fcntl.fcntl(write_fd, fcntl.F_GETFL)
    if packets:
        with kernel_call("fcntl(F_SETFL)", what="packet mode"):
            fcntl.fcntl(write_fd, fcntl.F_SETFL, flags | O_DIRECT)
    try:
        for chunk in chunks:
            with kernel_call("write", what="a pipe being rebuilt"):
                written = os.write(write_fd, chunk)
            if written != len(chunk):
                raise HijackError(f"a rebuilt pipe took {written} of {len(chunk)} bytes")
    finally:
        if packets:
            fcntl.fcntl(write_fd, fcntl.F_SETFL, flags)


def open_end(fd: int, writable: bool) -> int:
    """A new read or write end (never blocking, close-on-exec) of the pipe or FIFO behind
    our descriptor `fd`, whichever end `fd` is: /proc/self/fd/N opens the pipe itself."""
    mode = os.O_WRONLY if writable else os.O_RDONLY
    with kernel_call("open", what="another end of a pipe"):
        return os.open(f"/proc/self/fd/{fd}", mode | os.O_NONBLOCK | os.O_CLOEXEC)


def open_fifo(path: str) -> int:
    """Both ends of the named FIFO at `path` in one descriptor of ours (O_RDWR: Linux opens
    it without waiting for a peer), non-blocking and close-on-exec."""
    with kernel_call("open", what=path):
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


SPLICE_F_MOVE = 1
SPLICE_F_MORE = 4


def splice_out(read_fd: int, out_fd: int, length: int) -> int:
    """Move `length` bytes waiting in the pipe `read_fd` reads from to `out_fd` (splice(2):
    a file copies them into its page cache, a pipe or a socket takes the pages themselves);
    return `length`."""
    left = length
    while left:
        with kernel_call("splice", what="pages into the image"):
            moved = os.splice(read_fd, out_fd, left, flags=SPLICE_F_MOVE | SPLICE_F_MORE)
        if not moved:
            raise HijackError(f"splice moved nothing: {left} bytes of pages left in the pipe")
        left -= moved
    return length
