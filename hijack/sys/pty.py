"""Pseudo-terminal pairs: their modes, the bytes queued inside them, and new pairs.

A pair is a master (/dev/ptmx, or devpts's own ptmx) and its slave
/dev/pts/N; the master's fdinfo names N ("tty-index:"). Bytes written into
the master wait in the slave's line discipline until the slave reads them
(already processed by its input modes: ICRNL, ...); bytes written into the
slave wait in the master's until the master reads them (already processed by
the slave's output modes: OPOST, ONLCR). Nothing can peek at either queue: they
are read out and written back in again, with the processing switched off so
nothing is processed twice or echoed (`take_input` / `put_input`, `take_output` /
`put_output`). Every function here works on our own copies of the descriptors:
the descriptions (and their O_NONBLOCK) stay as the process has them.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import termios
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from hijack.errors import HijackError
from hijack.sys.errors import kernel_call
from hijack.sys.procfs import read_status
from hijack.sys.terminal import TIOCSPTLCK, Settings, get_settings, set_settings

TIOCGPTN = 0x80045430
TIOCPKT, TIOCGPKT = 0x5420, 0x80045438
TIOCGPTLCK = 0x80045439
TIOCGPTPEER = 0x5441
TIOCSTI = 0x5412
CAP_SYS_ADMIN = 21
INT = struct.Struct("i")
# A pty's queue holds at most the line discipline's buffer plus the port's
# flip buffers (64 KiB): reading more than this means someone keeps writing.
MAX_QUEUED = 1024 * 1024
READ_SIZE = 64 * 1024
# How many masters a restore opens looking for the old index (the kernel
# hands out the lowest free one) before it takes any.
INDEX_SEARCH_LIMIT = 256
O_NOCTTY, O_CLOEXEC = os.O_NOCTTY, os.O_CLOEXEC


def _get_int(fd: int, request: int, name: str) -> int:
    with kernel_call(name):
        return int(INT.unpack(fcntl.ioctl(fd, request, bytes(INT.size)))[0])


def _set_int(fd: int, request: int, value: int, name: str) -> None:
    with kernel_call(name):
        fcntl.ioctl(fd, request, INT.pack(value))


def index_of(master: int) -> int:
    """N of the slave /dev/pts/N of a master."""
    return _get_int(master, TIOCGPTN, "TIOCGPTN")


def packet_mode(master: int) -> bool:
    """TIOCPKT: each read of the master starts with a status byte."""
    return bool(_get_int(master, TIOCGPKT, "TIOCGPKT"))


def set_packet_mode(master: int, on: bool) -> None:
    _set_int(master, TIOCPKT, int(on), "TIOCPKT")


def locked(master: int) -> bool:
    """TIOCGPTLCK: the slave cannot be opened (a new master's state until unlockpt)."""
    return bool(_get_int(master, TIOCGPTLCK, "TIOCGPTLCK"))


def set_locked(master: int, lock: bool) -> None:
    _set_int(master, TIOCSPTLCK, int(lock), "TIOCSPTLCK")


def open_pair(master_path: str, index: int) -> tuple[int, int]:
    """A new unlocked pair (master, slave), both ours, close-on-exec, blocking.

    The kernel gives each new master the lowest free index: masters are
    opened until one has `index` (free again once its old owner is gone),
    so the process finds its terminal under its old name; past it, or after
    INDEX_SEARCH_LIMIT tries, the first one opened is taken.
    """
    opened: list[int] = []
    try:
        with kernel_call("open", what=master_path):
            while len(opened) < INDEX_SEARCH_LIMIT:
                opened.append(os.open(master_path, os.O_RDWR | O_NOCTTY | O_CLOEXEC))
                found = index_of(opened[-1])
                if found >= index:
                    break
        master = opened.pop() if index_of(opened[-1]) == index else opened.pop(0)
    finally:
        for extra in opened:
            os.close(extra)
    try:
        set_locked(master, False)  # unlockpt; grantpt has nothing to do on devpts
        slave = open_peer(master, os.O_RDWR)
    except BaseException:
        os.close(master)
        raise
    return master, slave


def open_peer(master: int, flags: int) -> int:
    """A new open file of the slave of `master` (TIOCGPTPEER: no path lookup, so the
    right devpts whatever the mounts), ours, with `flags` plus O_NOCTTY and O_CLOEXEC."""
    with kernel_call("TIOCGPTPEER"):
        return int(fcntl.ioctl(master, TIOCGPTPEER, flags | O_NOCTTY | O_CLOEXEC))


def _quiet(settings: Settings) -> Settings:
    """`settings` with no input processing, echo, signal characters or output processing:
    bytes put back into a queue are taken as they are. ICANON stays (lines stay lines),
    so does IXON (a packet-mode master would be told of a flow control change)."""
    iflag = settings.c_iflag & ~(
        termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
        | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IUCLC
    )  # fmt: skip
    lflag = settings.c_lflag & ~(
        termios.ECHO | termios.ECHOE | termios.ECHOK | termios.ECHONL | termios.ISIG
        | termios.IEXTEN
    )  # fmt: skip
    return replace(
        settings, c_iflag=iflag, c_lflag=lflag, c_oflag=settings.c_oflag & ~termios.OPOST
    )


def _drain(fd: int, what: str) -> bytes:
    """Every byte `fd` has to read now (it never blocks: poll first, then one read each)."""
    chunks: list[bytes] = []
    total = 0
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    with kernel_call("read", what=what):
        while any(events & select.POLLIN for _, events in poller.poll(0)):
            chunk = os.read(fd, READ_SIZE)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > MAX_QUEUED:
                raise HijackError(f"{what} keeps growing while the process is stopped")
    return b"".join(chunks)


def take_input(slave: int) -> bytes:
    """The bytes waiting to be read from `slave`, taken out (`put_input` puts them back).

    In canonical mode the last line may not be complete: it is read too, by
    switching the line discipline to non-canonical for the time of the read.
    """
    settings = get_settings(slave)
    cc = bytearray(settings.c_cc)
    cc[termios.VMIN], cc[termios.VTIME] = 0, 0
    reading = replace(
        settings, c_lflag=settings.c_lflag & ~(termios.ICANON | termios.ECHO), c_cc=bytes(cc)
    )
    set_settings(slave, reading)
    try:
        return _drain(slave, "the pty's input queue")
    finally:
        set_settings(slave, settings)


@contextmanager
def _quietly(slave: int) -> Iterator[None]:
    """The slave's processing and echo off (`_quiet`) for the time of the block."""
    settings = get_settings(slave)
    set_settings(slave, _quiet(settings))
    try:
        yield
    finally:
        set_settings(slave, settings)


def can_put_input() -> bool:
    """Whether `put_input` may work here: TIOCSTI on a terminal that is not one's own
    controlling terminal needs CAP_SYS_ADMIN (whatever dev.tty.legacy_tiocsti says)."""
    return bool(read_status(os.getpid()).cap_eff & (1 << CAP_SYS_ADMIN))


def put_input(slave: int, data: bytes) -> None:
    """Queue `data` to be read from `slave`, as if the master had written it (TIOCSTI:
    one byte at a time, taken in at once, unlike a write into the master)."""
    if not data:
        return  # the settings untouched
    with _quietly(slave), kernel_call("TIOCSTI", what="the pty's input queue"):
        for byte in data:
            fcntl.ioctl(slave, TIOCSTI, bytes((byte,)))


def take_output(master: int) -> bytes:
    """The bytes the slave wrote that wait to be read from `master`, taken out.

    Packet mode is switched off for the time of the read, so no status byte
    comes with the data (a status change not yet read is dropped).
    """
    packets = packet_mode(master)
    if packets:
        set_packet_mode(master, False)
    try:
        return _drain(master, "the pty's output queue")
    finally:
        if packets:
            set_packet_mode(master, True)


def put_output(slave: int, data: bytes) -> None:
    """Queue `data` to be read from the master of `slave`, not processed again (OPOST off)."""
    if not data:
        return
    with _quietly(slave), kernel_call("write", what="the pty's output queue"):
        written = 0
        while written < len(data):
            written += os.write(slave, data[written:])
