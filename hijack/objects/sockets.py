"""Helpers of the socket kinds that read a socket from a copy of their own."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from hijack.errors import HijackError
from hijack.objects.base import DumpContext
from hijack.sys import procfs


def copy_socket(entry: procfs.FdEntry, dump: DumpContext) -> socket.socket:
    """A socket object of our own on a copy of the process's socket `entry`."""
    return socket.socket(fileno=os.dup(dump.copy_fd(entry.fd)))


def unlisted_socket_is(
    entry: procfs.FdEntry, dump: DumpContext, test: Callable[[socket.socket], bool]
) -> bool:
    """Whether `entry` is a socket of a plain dump that no /proc/net table lists (not TCP,
    UDP or unix) and whose copy passes `test`."""
    if not dump.connections or entry.kind is not procfs.FdKind.SOCKET:
        return False
    if entry.ino in dump.socket_table():
        return False
    try:
        with copy_socket(entry, dump) as sock:
            return test(sock)
    except (OSError, HijackError):
        return False
