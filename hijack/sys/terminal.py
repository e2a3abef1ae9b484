"""Terminals: their settings, window sizes and pseudo-terminal pairs, read and set.

The settings are the kernel's `struct termios` as TCGETS/TCSETS take it (no
speeds beyond the CBAUD bits of c_cflag: a pseudo-terminal has none), the
window size its `struct winsize` (TIOCGWINSZ/TIOCSWINSZ).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import select
import struct
import termios
from dataclasses import dataclass

from hijack.sys.errors import kernel_call

TCGETS, TCSETS = 0x5401, 0x5402
TIOCSCTTY = 0x540E
TIOCGPTN, TIOCSPTLCK = 0x80045430, 0x40045431
NCCS = 19  # the kernel's struct termios (glibc's has 32, with speeds after)
TERMIOS = struct.Struct(f"<4IB{NCCS}s")  # c_iflag c_oflag c_cflag c_lflag c_line c_cc
WINSIZE = struct.Struct("<4H")  # ws_row ws_col ws_xpixel ws_ypixel


@dataclass(frozen=True)
class Settings:
    """struct termios, in the kernel's layout."""

    c_iflag: int
    c_oflag: int
    c_cflag: int
    c_lflag: int
    c_line: int
    c_cc: bytes

    def pack(self) -> bytes:
        return TERMIOS.pack(
            self.c_iflag, self.c_oflag, self.c_cflag, self.c_lflag, self.c_line, self.c_cc
        )

    def raw(self) -> Settings:
        """These settings with every byte passed through as it is (cfmakeraw)."""
        iflag = self.c_iflag & ~(
            termios.IGNBRK
            | termios.BRKINT
            | termios.PARMRK
            | termios.ISTRIP
            | termios.INLCR
            | termios.IGNCR
            | termios.ICRNL
            | termios.IXON
        )
        lflag = self.c_lflag & ~(
            termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN
        )
        cflag = (self.c_cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
        cc = bytearray(self.c_cc)
        cc[termios.VMIN], cc[termios.VTIME] = 1, 0
        oflag = self.c_oflag & ~termios.OPOST
        return Settings(iflag, oflag, cflag, lflag, self.c_line, bytes(cc))


@dataclass(frozen=True)
class WindowSize:
    ws_row: int
    ws_col: int
    ws_xpixel: int = 0
    ws_ypixel: int = 0

    def pack(self) -> bytes:
        return WINSIZE.pack(self.ws_row, self.ws_col, self.ws_xpixel, self.ws_ypixel)

    @classmethod
    def unpack(cls, data: bytes) -> WindowSize:
        return cls(*WINSIZE.unpack(data))


def get_settings(fd: int) -> Settings:
    with kernel_call("TCGETS"):
        data = fcntl.ioctl(fd, TCGETS, bytes(TERMIOS.size))
    iflag, oflag, cflag, lflag, line, cc = TERMIOS.unpack(data)
    return Settings(iflag, oflag, cflag, lflag, line, cc)


def set_settings(fd: int, settings: Settings) -> None:
    with kernel_call("TCSETS"):
        fcntl.ioctl(fd, TCSETS, settings.pack())


def take_pending_input(fd: int) -> bytes:
    """What was typed at terminal `fd` and not read yet, a partial line included: taken.

    A canonical read would wait for the end of the line: switched to
    non-canonical with VMIN = VTIME = 0, the line discipline gives all it
    holds at once. This changes the terminal's settings: for one that goes.
    """
    settings = get_settings(fd)
    cc = bytearray(settings.c_cc)
    cc[termios.VMIN], cc[termios.VTIME] = 0, 0
    lflag = settings.c_lflag & ~termios.ICANON
    set_settings(fd, dataclasses.replace(settings, c_lflag=lflag, c_cc=bytes(cc)))
    return read_available(fd)


def read_available(fd: int) -> bytes:
    """What terminal `fd` gives to a read now, taken without blocking (its open file may
    be a blocking one: poll first)."""
    pending = bytearray()
    while select.select([fd], [], [], 0)[0]:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # hung up
            break
        if not chunk:
            break
        pending += chunk
    return bytes(pending)


def get_window_size(fd: int) -> WindowSize:
    with kernel_call("TIOCGWINSZ"):
        return WindowSize.unpack(fcntl.ioctl(fd, termios.TIOCGWINSZ, bytes(WINSIZE.size)))


def set_window_size(fd: int, size: WindowSize) -> None:
    """On a pty master: the kernel sends SIGWINCH to the slave's foreground group if it changed."""
    with kernel_call("TIOCSWINSZ"):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, size.pack())


def controlling_terminal_of(tty_nr: int, fd: int) -> bool:
    """Whether `fd` is the terminal /proc/PID/stat's tty_nr names (the controlling terminal)."""
    if tty_nr == 0:
        return False
    major = (tty_nr >> 8) & 0xFFF
    minor = (tty_nr & 0xFF) | ((tty_nr >> 12) & 0xFFF00)
    device = os.fstat(fd).st_rdev
    return (os.major(device), os.minor(device)) == (major, minor)


def open_pseudo_terminal() -> tuple[int, str]:
    """A new pty: its master (ours, non-blocking, close-on-exec) and its slave's path."""
    with kernel_call("openpty"):
        master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            # unlockpt; grantpt has nothing to do on devpts.
            fcntl.ioctl(master, TIOCSPTLCK, struct.pack("i", 0))
            path = slave_path(master)
        except BaseException:
            os.close(master)
            raise
    return master, path


def slave_path(master: int) -> str:
    """The path of the slave of pty master `master` (TIOCGPTN)."""
    with kernel_call("TIOCGPTN"):
        return f"/dev/pts/{struct.unpack('I', fcntl.ioctl(master, TIOCGPTN, bytes(4)))[0]}"


def open_slave(path: str) -> int:
    """Our own open slave of the pty at `path`, raw (every byte as it is), non-blocking."""
    flags = os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK
    with kernel_call("open", what=path):
        slave = os.open(path, flags)
    try:
        set_settings(slave, get_settings(slave).raw())
    except BaseException:
        os.close(slave)
        raise
    return slave
