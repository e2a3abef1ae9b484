"""Conversion of kernel errors into hijack's exceptions, in one place."""

from __future__ import annotations

import errno as errno_codes
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

from hijack.errors import AccessDenied, HijackError, ProcessGone


def raise_for_errno(err: int, syscall: str, pid: int | None = None, what: str = "") -> NoReturn:
    """Raise the HijackError subclass that fits errno `err` from `syscall`."""
    subject = what or (f"process {pid}" if pid is not None else "")
    reason = os.strerror(err)
    if err == errno_codes.ESRCH or (err == errno_codes.ENOENT and pid is not None):
        raise ProcessGone(
            f"{subject or 'process'} does not exist (or exited)",
            pid=pid,
            errno=err,
            syscall=syscall,
        )
    if err in (errno_codes.EPERM, errno_codes.EACCES):
        raise AccessDenied(
            f"{syscall} on {subject or 'the target'} was refused: {reason}",
            pid=pid,
            errno=err,
            syscall=syscall,
        )
    raise HijackError(
        f"{syscall}{' on ' + subject if subject else ''} failed: {reason}",
        pid=pid,
        errno=err,
        syscall=syscall,
    )


@contextmanager
def kernel_call(syscall: str, pid: int | None = None, what: str = "") -> Iterator[None]:
    """Turn an OSError raised inside the block into the matching HijackError."""
    try:
        yield
    except OSError as exc:
        if exc.errno is None:
            raise
        raise_for_errno(exc.errno, syscall, pid, what)
