"""`hijack status --watch`: the live full-screen view, redrawn about once a second.

The terminal is in cbreak mode while it runs (keys arrive one by one, not
echoed; Ctrl-C still raises SIGINT) and on the alternate screen; both are
given back however the view ends: `q`, Ctrl-C, SIGTERM or an error.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator
from typing import TextIO

from rich.console import Console
from rich.live import Live

from hijack.registry import Registry
from hijack.status import view
from hijack.status.model import QUERY_TIMEOUT, Snapshot, gather, throughput

REFRESH_INTERVAL = 1.0  # seconds between frames
QUIT_KEYS = b"qQ"


def watch(
    console: Console,
    registry: Registry,
    keys: TextIO | None = None,
    interval: float = REFRESH_INTERVAL,
) -> None:
    """Show the live view until `q` is pressed on `keys` (stdin by default)."""
    source = keys or sys.stdin
    previous: Snapshot | None = None
    with _cbreak(source) as key_fd, Live(console=console, screen=True, auto_refresh=False) as live:
        while True:
            started = time.monotonic()
            snapshot = gather(registry, QUERY_TIMEOUT)
            rates = throughput(previous, snapshot) if previous is not None else None
            live.update(view.live_frame(snapshot, rates, console), refresh=True)
            previous = snapshot
            if _quit_pressed(key_fd, started + interval):
                return


@contextlib.contextmanager
def _cbreak(source: TextIO) -> Iterator[int | None]:
    """Keys one at a time from a terminal; the fd to read them from, None for no terminal."""
    try:
        fd = source.fileno()
    except (AttributeError, OSError, ValueError):  # no real file (a captured stream)
        yield None
        return
    if not os.isatty(fd):
        yield fd  # a pipe still carries keys; it just needs no terminal mode
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed(fd: int | None, until: float) -> bool:
    """Wait until `until` (monotonic) for a quit key on `fd`."""
    while (remaining := until - time.monotonic()) > 0:
        if fd is None:
            time.sleep(remaining)
            return False
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            return False
        pressed = os.read(fd, 64)
        if not pressed:
            fd = None  # end of input: nothing more will come; refresh on time only
        elif any(key in QUIT_KEYS for key in pressed):
            return True
    return False
