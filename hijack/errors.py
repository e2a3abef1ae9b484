"""The one exception hierarchy of hijack.

Every failure a user can act on is a HijackError: the CLI prints its message as
one line and exits 1. Kernel errors are converted to these in one place
(`hijack.sys.errors.raise_for_errno`), so callers never compare `.errno`.
"""

from __future__ import annotations


class HijackError(Exception):
    """Root of all errors hijack reports to its user."""

    def __init__(
        self,
        message: str,
        *,
        pid: int | None = None,
        errno: int | None = None,
        syscall: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.pid = pid
        self.errno = errno
        self.syscall = syscall

    def __str__(self) -> str:
        return self.message


class ProcessGone(HijackError):
    """The process (or thread) does not exist, or exited while we worked on it."""


class AccessDenied(HijackError):
    """The kernel refused: not root, or a process we may not trace."""


class AlreadyTraced(HijackError):
    """Another tracer (a debugger, strace, another hijack) holds the process."""


class NotAttachable(HijackError):
    """A process hijack cannot work on: a kernel thread, hijack itself, a zombie."""


class InjectionFailed(HijackError):
    """A system call injected into the target failed or the target misbehaved."""


class ImageError(HijackError):
    """A CRF image is malformed, truncated, corrupted or not a CRF image at all."""


class RestoreError(HijackError):
    """A process could not be rebuilt from an image."""


class Unsupported(HijackError):
    """The process holds something hijack cannot save or move (named in the message)."""


class RegistryError(HijackError):
    """The state registry (SQLite) is unusable or holds no such record."""


class ShadowError(HijackError):
    """The shadow of a process could not be started, reached or ended."""
