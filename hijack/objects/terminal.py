"""Terminals: reopened by path; their settings and window size are kept in a
TerminalObject, given to the terminal a move makes for the process."""

from __future__ import annotations

import signal

from hijack.errors import HijackError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.objects.base import DumpContext, Kind, RestoreContext
from hijack.objects.regular import open_by_path, path_refusal, reopen_flags
from hijack.restore.remote import Stub
from hijack.sys import procfs, terminal
from hijack.sys import ptrace as pt

O_NOCTTY = 0o400
TCSETS, TIOCSWINSZ = 0x5402, 0x5414


def read_terminal(copy: int, tty_nr: int) -> rec.TerminalState | None:
    """The settings and window size of our copy of a terminal descriptor.

    None if it answers neither (a pty master whose slave is gone, a hung-up line).
    """
    try:
        settings = terminal.get_settings(copy)
        size = terminal.get_window_size(copy)
        controlling = terminal.controlling_terminal_of(tty_nr, copy)
    except HijackError:
        return None
    return rec.TerminalState(
        c_iflag=settings.c_iflag,
        c_oflag=settings.c_oflag,
        c_cflag=settings.c_cflag,
        c_lflag=settings.c_lflag,
        c_line=settings.c_line,
        c_cc=settings.c_cc,
        ws_row=size.ws_row,
        ws_col=size.ws_col,
        ws_xpixel=size.ws_xpixel,
        ws_ypixel=size.ws_ypixel,
        controlling=controlling,
    )


class Terminal(Kind):
    name = "terminal"
    record_types = (rec.TerminalObject,)
    fd_kinds = (rec.FdKind.TTY,)  # one that answered no TCGETS has no object

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return entry.kind is procfs.FdKind.TTY

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        state = read_terminal(dump.copy_fd(entry.fd), procfs.read_stat(dump.pid).tty_nr)
        if state is None:
            return 0
        return dump.add_object(
            ("tty", entry.dev, entry.ino), lambda id: rec.TerminalObject(id=id, state=state)
        )

    def refusal(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str | None:
        return path_refusal(descriptor)

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        # Never acquire a controlling terminal by restoring.
        flags = reopen_flags(descriptor) | O_NOCTTY
        restore.place(open_by_path(restore, descriptor, flags), descriptor)

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        if not descriptor.object_id:
            return f"{descriptor.path} (no settings)"
        state = image.object_of(descriptor, rec.TerminalObject).state
        controlling = ", controlling" if state.controlling else ""
        return f"{descriptor.path} {state.ws_col}x{state.ws_row}{controlling}"


def set_up_terminals(stub: Stub, image: ImageFiles, fresh: frozenset[int]) -> int | None:
    """Give each terminal made for the process (`fresh`: a move's ptys) the settings and
    window size its terminal had; return the number of the one that was its controlling
    terminal, if any."""
    controlling = None
    # A tree's member outside the foreground group of the terminal it inherited as its
    # controlling one (hijack.restore.tree) would get SIGTTOU for TCSETS: blocked, allowed.
    mask = pt.get_signal_mask(stub.pid)
    pt.set_signal_mask(stub.pid, mask | 1 << (signal.SIGTTOU - 1))
    try:
        for descriptor in image.descriptors:
            found = image.objects.get(descriptor.object_id)
            if descriptor.fd not in fresh or not isinstance(
                found, rec.TerminalObject | rec.PtyPair
            ):
                continue  # a relay of another kind, or a terminal that did not answer at the dump
            state = found.state
            stub.reset_scratch()
            settings = terminal.Settings(
                state.c_iflag, state.c_oflag, state.c_cflag, state.c_lflag, state.c_line, state.c_cc
            )
            stub.call("ioctl", descriptor.fd, TCSETS, stub.put(settings.pack()))
            size = terminal.WindowSize(state.ws_row, state.ws_col, state.ws_xpixel, state.ws_ypixel)
            stub.call("ioctl", descriptor.fd, TIOCSWINSZ, stub.put(size.pack()))
            if state.controlling:
                controlling = descriptor.fd
    finally:
        pt.set_signal_mask(stub.pid, mask)
    return controlling
