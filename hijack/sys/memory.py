"""Reading and writing another process's memory.

process_vm_readv/writev are the fast path (KERNEL-NOTES: ~5.7 GB/s with large
iovecs into pre-faulted buffers). They obey page protections, so writes into
read-only pages (code, relro) go through /proc/PID/mem, which does not.
"""

from __future__ import annotations

import ctypes
import errno as errno_codes
import os
from typing import Any

from hijack.errors import HijackError
from hijack.sys.errors import kernel_call, raise_for_errno
from hijack.sys.libc import Iovec, libc

_process_vm_readv = libc.process_vm_readv
_process_vm_readv.restype = ctypes.c_ssize_t
_process_vm_writev = libc.process_vm_writev
_process_vm_writev.restype = ctypes.c_ssize_t


def _writable_address(buffer: bytearray | memoryview) -> int:
    """Address of a writable Python buffer, for an iovec (no copy)."""
    return ctypes.addressof((ctypes.c_char * len(buffer)).from_buffer(buffer))


def _transfer(call: Any, name: str, pid: int, address: int, local: int, length: int) -> None:
    """One process_vm_readv/writev of `length` bytes; a short transfer is an error."""
    local_iov = Iovec(local, length)
    remote_iov = Iovec(address, length)
    done = call(pid, ctypes.byref(local_iov), 1, ctypes.byref(remote_iov), 1, 0)
    if done < 0:
        raise_for_errno(ctypes.get_errno(), name, pid)
    if done != length:
        raise HijackError(
            f"{name} of process {pid} memory at {address:#x} moved {done} of {length} bytes",
            pid=pid,
            syscall=name,
        )


def read_into(pid: int, address: int, buffer: bytearray | memoryview) -> None:
    """Fill `buffer` with the bytes at `address` in `pid`."""
    _transfer(
        _process_vm_readv, "process_vm_readv", pid, address, _writable_address(buffer), len(buffer)
    )


def read(pid: int, address: int, length: int) -> bytes:
    buffer = bytearray(length)
    read_into(pid, address, buffer)
    return bytes(buffer)


def write(pid: int, address: int, data: bytes | bytearray | memoryview) -> None:
    """Write `data` at `address` in `pid`, honouring page protections."""
    if isinstance(data, memoryview) and data.readonly:
        data = bytes(data)
    if isinstance(data, bytes):
        # A bytes object's own buffer: no copy (c_char_p points into it).
        keep = ctypes.c_char_p(data)
        local = ctypes.cast(keep, ctypes.c_void_p).value or 0
    else:
        local = _writable_address(data)
    _transfer(_process_vm_writev, "process_vm_writev", pid, address, local, len(data))


def poke(pid: int, address: int, data: bytes) -> None:
    """Write through /proc/PID/mem, which may write into read-only pages (as a debugger does)."""
    with kernel_call("write(/proc/PID/mem)", pid):
        fd = os.open(f"/proc/{pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        try:
            if os.pwrite(fd, data, address) != len(data):
                raise_for_errno(errno_codes.EIO, "write(/proc/PID/mem)", pid)
        finally:
            os.close(fd)
