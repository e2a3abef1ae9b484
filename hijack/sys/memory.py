"""Reading and writing another process's memory.

process_vm_readv/writev are the fast path (KERNEL-NOTES: ~5.7 GB/s with large
iovecs into pre-faulted buffers). They obey page protections, so writes into
read-only pages (code, relro) go through /proc/PID/mem, which does not.
"""

from __future__ import annotations

import ctypes
import errno
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


def _bytes_address(data: bytes) -> int:
    """Address of a bytes object's own buffer (c_char_p points into it: no copy); the
    object must outlive its use."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0


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


IOV_MAX = 1024

_memcmp = ctypes.CDLL(None).memcmp
_memcmp.restype = ctypes.c_int
_memcmp.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


def same(first: bytearray, first_at: int, second: bytearray, second_at: int, size: int) -> bool:
    """Whether `size` bytes of `first` at `first_at` equal those of `second` at `second_at`
    (memcmp: comparing slices copies them, ~10 times slower for a few MiB)."""
    if first_at + size > len(first) or second_at + size > len(second):
        raise ValueError("same: a range outside its buffer")
    first_address = _writable_address(first) + first_at
    return int(_memcmp(first_address, _writable_address(second) + second_at, size)) == 0


def read_gathered(pid: int, ranges: list[tuple[int, int]], buffer: bytearray) -> int:
    """Read [start, end) `ranges` of `pid` back to back into `buffer`, in one call.

    At most IOV_MAX ranges, fitting in `buffer`. Returns the bytes read: fewer
    than asked when a range is no longer mapped or readable (the rest were not
    read).
    """
    count = len(ranges)
    remote = (Iovec * count)(*(Iovec(start, end - start) for start, end in ranges))
    local = Iovec(_writable_address(buffer), sum(end - start for start, end in ranges))
    done = int(_process_vm_readv(pid, ctypes.byref(local), 1, remote, count, 0))
    if done < 0:
        err = ctypes.get_errno()
        if err == errno.EFAULT:
            return 0
        raise_for_errno(err, "process_vm_readv", pid)
    return done


def write_scattered(pid: int, ranges: list[tuple[int, int]], data: bytes) -> None:
    """Write `data` over the (address, length) `ranges` of `pid`, back to back, in one
    process_vm_writev (at most IOV_MAX ranges); a short write is an error."""
    count = len(ranges)
    remote = (Iovec * count)(*(Iovec(address, length) for address, length in ranges))
    local = Iovec(_bytes_address(data), len(data))
    done = int(_process_vm_writev(pid, ctypes.byref(local), 1, remote, count, 0))
    if done < 0:
        raise_for_errno(ctypes.get_errno(), "process_vm_writev", pid)
    if done != len(data):
        raise HijackError(
            f"process_vm_writev of process {pid} memory moved {done} of {len(data)} bytes"
            f" over {count} ranges",
            pid=pid,
            syscall="process_vm_writev",
        )


def read(pid: int, address: int, length: int) -> bytes:
    buffer = bytearray(length)
    read_into(pid, address, buffer)
    return bytes(buffer)


def write(pid: int, address: int, data: bytes | bytearray | memoryview) -> None:
    """Write `data` at `address` in `pid`, honouring page protections."""
    if isinstance(data, memoryview) and data.readonly:
        data = bytes(data)
    local = _bytes_address(data) if isinstance(data, bytes) else _writable_address(data)
    _transfer(_process_vm_writev, "process_vm_writev", pid, address, local, len(data))


class MemoryFile:
    """/proc/PID/mem, for the pages process_vm_readv/writev refuse.

    Those honour page protections; /proc/PID/mem reaches PROT_NONE and
    read-only pages too, as a debugger does. Opened on first use.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = -1

    def __enter__(self) -> MemoryFile:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _descriptor(self) -> int:
        if self._fd < 0:
            with kernel_call("open(/proc/PID/mem)", self.pid):
                self._fd = os.open(f"/proc/{self.pid}/mem", os.O_RDWR | os.O_CLOEXEC)
        return self._fd

    def read_into(self, address: int, buffer: bytearray | memoryview) -> None:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view):
            with kernel_call("read(/proc/PID/mem)", self.pid):
                got = os.preadv(self._descriptor(), [view[done:]], address + done)
            if not got:
                raise HijackError(
                    f"cannot read memory of process {self.pid} at {address + done:#x}",
                    pid=self.pid,
                )
            done += got

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            with kernel_call("write(/proc/PID/mem)", self.pid):
                put = os.pwrite(self._descriptor(), view[done:], address + done)
            if not put:
                raise HijackError(
                    f"cannot write memory of process {self.pid} at {address + done:#x}",
                    pid=self.pid,
                )
            done += put

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
