"""A socket's classic BPF filter (SO_ATTACH_FILTER), read back and attached again.

SO_GET_FILTER counts in instructions, not bytes (its length is struct
sock_filter units both ways), which Python's socket.getsockopt cannot express:
hence ctypes here.
"""

from __future__ import annotations

import ctypes
import os
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


# struct sock_filter codes (linux/filter.h) and the ancillary offset of skb->mark.
_LD_W_ABS, _JEQ_K, _RET_K = 0x20, 0x15, 0x06
SKF_AD_MARK = 0xFFFFF000 + 20  # SKF_AD_OFF + SKF_AD_MARK
SO_MARK = 36


def only_marked(mark: int) -> bytes:
    """A filter that lets in only packets carrying `mark` (SO_MARK of their sender, which
    only CAP_NET_ADMIN may set): on a TCP listener, the SYNs of anyone else are dropped."""
    return b"".join(
        struct.pack("<HBBI", code, jt, jf, k)
        for code, jt, jf, k in (
            (_LD_W_ABS, 0, 0, SKF_AD_MARK),
            (_JEQ_K, 0, 1, mark),
            (_RET_K, 0, 0, 0xFFFFFFFF),
            (_RET_K, 0, 0, 0),
        )
    )


def listen_backlog(fd: int) -> int:
    """The backlog a TCP listener was given (after the kernel's somaxconn cap).

    TCP_INFO of a listener holds it in tcpi_sacked (sk_max_ack_backlog), the
    figure `ss -l` shows as Send-Q and inet_diag as idiag_wqueue.
    """
    with socket.socket(fileno=os.dup(fd)) as sock:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("<I", info, 28)[0])
