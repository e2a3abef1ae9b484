"""A socket's classic BPF filter (SO_ATTACH_FILTER), read back and attached again.

SO_GET_FILTER counts in instructions, not bytes (its length is struct
sock_filter units both ways), which Python's socket.getsockopt cannot express:
hence ctypes here.
"""

from __future__ import annotations

import ctypes
import socket
import struct

from hijack.sys.errors import raise_for_errno
from hijack.sys.libc import libc

SO_ATTACH_FILTER = 26
SO_GET_FILTER = SO_ATTACH_FILTER
SO_LOCK_FILTER = 44
INSTRUCTION = 8  # sizeof(struct sock_filter): code u16, jt u8, jf u8, k u32


class SockFprog(ctypes.Structure):
    """struct sock_fprog."""

    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def get_filter(fd: int) -> bytes:
    """The instructions of the filter attached to socket `fd` (b"" when none)."""
    count = ctypes.c_uint(0)
    if libc.getsockopt(fd, socket.SOL_SOCKET, SO_GET_FILTER, None, ctypes.byref(count)) != 0:
        raise_for_errno(ctypes.get_errno(), "getsockopt", what="SO_GET_FILTER")
    if count.value == 0:
        return b""
    buffer = ctypes.create_string_buffer(count.value * INSTRUCTION)
    if libc.getsockopt(fd, socket.SOL_SOCKET, SO_GET_FILTER, buffer, ctypes.byref(count)) != 0:
        raise_for_errno(ctypes.get_errno(), "getsockopt", what="SO_GET_FILTER")
    return buffer.raw[: count.value * INSTRUCTION]


def attach_filter(fd: int, code: bytes) -> None:
    """Attach the classic BPF program `code` (struct sock_filter array) to socket `fd`."""
    buffer = ctypes.create_string_buffer(code, len(code))
    program = SockFprog(len(code) // INSTRUCTION, ctypes.cast(buffer, ctypes.c_void_p))
    if (
        libc.setsockopt(
            fd, socket.SOL_SOCKET, SO_ATTACH_FILTER, ctypes.byref(program), ctypes.sizeof(program)
        )
        != 0
    ):
        raise_for_errno(ctypes.get_errno(), "setsockopt", what="SO_ATTACH_FILTER")


def filter_program(code: bytes, address: int) -> bytes:
    """struct sock_fprog for `code` placed at `address` (another process's memory)."""
    return struct.pack("<H6xQ", len(code) // INSTRUCTION, address)
