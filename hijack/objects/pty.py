"""Pseudo-terminal pairs held inside the process: master and slave both open in it.

Claimed before the terminal kind (which reopens terminals by path: a pty
whose master is outside the dump stays its business). One PtyPair record per
pair, referred to by the master's descriptors and the slave's: the slave's
settings and window size, the master's packet mode and lock, whether the
slave is the process's controlling terminal, and the bytes queued each way.

Restored as a new pair, at the old index when it is free (the process finds
/dev/pts/N under its old name): opened in the restorer, given its settings
and its queued bytes, then given to the process — the master as is, each open
file of the slave as a new open of the master's peer. Locked again last
(a locked slave cannot be opened); made the controlling terminal by the
restorer, after the process leads its session again.
"""

from __future__ import annotations

import os
import re
import struct
import weakref
from dataclasses import dataclass

from hijack.errors import HijackError
from hijack.image import records as rec
from hijack.image.files import ImageFiles
from hijack.mutator.tracee import signals_deferred
from hijack.objects.base import DumpContext, Kind, RestoreContext, describe_fd
from hijack.objects.terminal import read_terminal
from hijack.sys import procfs, pty, terminal

O_ACCMODE = 0o3
# What an open() by a 64-bit process always has, and a TIOCGPTPEER does not add.
O_LARGEFILE = 0o100000
_SLAVE_PATH = re.compile(r".*/pts/(\d+)")


@dataclass(frozen=True)
class _Ends:
    """Both ends of a pair, as descriptors of the dumped process."""

    index: int
    master_fd: int
    master_path: str
    slave_fd: int


# Per dump: the pairs with both ends in the process, by each end's descriptor number.
_PAIRS: weakref.WeakKeyDictionary[DumpContext, dict[int, _Ends]] = weakref.WeakKeyDictionary()


def _pairs(dump: DumpContext) -> dict[int, _Ends]:
    found = _PAIRS.get(dump)
    if found is None:
        found = _PAIRS[dump] = _find_pairs(dump.pid, dump.entries)
    return found


def _find_pairs(pid: int, entries: list[procfs.FdEntry]) -> dict[int, _Ends]:
    masters: dict[int, tuple[int, str]] = {}  # index -> (fd, path)
    slaves: dict[int, int] = {}  # index -> fd
    for entry in entries:
        if entry.kind is not procfs.FdKind.TTY:
            continue
        if is_master_path(entry.target):
            found_index = procfs.read_fdinfo(pid, entry.fd).extra.get("tty-index", ())
            if found_index:
                masters.setdefault(int(found_index[0]), (entry.fd, entry.target))
        elif found := _SLAVE_PATH.fullmatch(entry.target):
            slaves.setdefault(int(found[1]), entry.fd)
    pairs: dict[int, _Ends] = {}
    for index, (master_fd, master_path) in masters.items():
        if index in slaves:
            ends = _Ends(index, master_fd, master_path, slaves[index])
            pairs[master_fd] = pairs[slaves[index]] = ends
    return pairs


def is_master_path(path: str) -> bool:
    """/dev/ptmx, or devpts's own ptmx."""
    return os.path.basename(path) == "ptmx"


def _read_pair(object_id: int, ends: _Ends, dump: DumpContext) -> rec.PtyPair:
    master = dump.copy_fd(ends.master_fd)
    slave = dump.copy_fd(ends.slave_fd)
    state = read_terminal(slave, procfs.read_stat(dump.pid).tty_nr)
    if state is None:
        raise HijackError(
            f"the pty pair /dev/pts/{ends.index} of process {dump.pid} answers no TCGETS"
        )
    queued_in = queued_out = b""
    if dump.frozen:
        # Read out, and put back at once: the process may run on after the dump.
        # Input is left where it is (and out of the image) if it could not go back.
        # SIGINT and SIGTERM wait: the bytes in our hands would be lost.
        with signals_deferred():
            if pty.can_put_input():
                queued_in = pty.take_input(slave)
                pty.put_input(slave, queued_in)
            queued_out = pty.take_output(master)
            pty.put_output(slave, queued_out)
    return rec.PtyPair(
        id=object_id,
        index=ends.index,
        packet_mode=pty.packet_mode(master),
        locked=pty.locked(master),
        state=state,
        master_path=ends.master_path,
        input=queued_in,
        output=queued_out,
    )


def _build(pair: rec.PtyPair) -> int:
    """A new pair like `pair`; our master of it (the slave ends are opened from it)."""
    master, slave = pty.open_pair(pair.master_path, pair.index)
    try:
        state = pair.state
        terminal.set_settings(
            slave,
            terminal.Settings(
                state.c_iflag, state.c_oflag, state.c_cflag, state.c_lflag, state.c_line, state.c_cc
            ),
        )
        pty.put_input(slave, pair.input)
        pty.put_output(slave, pair.output)
        size = terminal.WindowSize(state.ws_row, state.ws_col, state.ws_xpixel, state.ws_ypixel)
        terminal.set_window_size(master, size)
        pty.set_packet_mode(master, pair.packet_mode)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)  # the tty keeps its settings and queues while the master is open
    return master


class PtyPairKind(Kind):
    name = "pty"
    record_types = (rec.PtyPair,)

    def claims(self, entry: procfs.FdEntry, dump: DumpContext) -> bool:
        return entry.kind is procfs.FdKind.TTY and entry.fd in _pairs(dump)

    def dump(self, entry: procfs.FdEntry, info: procfs.FdInfo, dump: DumpContext) -> int:
        ends = _pairs(dump)[entry.fd]
        return dump.add_object(("pty", ends.index), lambda id: _read_pair(id, ends, dump))

    def refusal(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str | None:
        pair = image.object_of(descriptor, rec.PtyPair)
        if not os.path.exists(pair.master_path):
            return f"{describe_fd(descriptor)}: no {pair.master_path} here to make a new pty"
        return None

    def restore(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        pair = restore.image.object_of(descriptor, rec.PtyPair)
        master = restore.built(pair.id)
        if master is None:
            master = _build(pair)
            restore.keep(pair.id, master)
        if is_master_path(descriptor.path):
            restore.give(master, descriptor)
            return
        slave = pty.open_peer(master, descriptor.flags & (O_ACCMODE | O_LARGEFILE))
        try:
            restore.give(slave, descriptor)
        finally:
            os.close(slave)

    def finish(self, descriptor: rec.FileDescriptor, restore: RestoreContext) -> None:
        pair = restore.image.object_of(descriptor, rec.PtyPair)
        if pair.locked and is_master_path(descriptor.path):
            stub = restore.stub
            stub.reset_scratch()
            stub.call("ioctl", descriptor.fd, terminal.TIOCSPTLCK, stub.put(struct.pack("i", 1)))

    def describe(self, descriptor: rec.FileDescriptor, image: ImageFiles) -> str:
        pair = image.object_of(descriptor, rec.PtyPair)
        end = "master" if is_master_path(descriptor.path) else "slave"
        state = pair.state
        details = [f"{end} of /dev/pts/{pair.index}", f"{state.ws_col}x{state.ws_row}"]
        details += [word for word, on in (
            ("packet mode", pair.packet_mode), ("locked", pair.locked),
            ("controlling", state.controlling),
        ) if on]  # fmt: skip
        details.append(f"{len(pair.input)} bytes queued in, {len(pair.output)} out")
        return ", ".join(details)


def controlling_slave(image: ImageFiles, restored: set[int]) -> int | None:
    """The restored descriptor of the slave that was the process's controlling terminal."""
    for descriptor in image.descriptors:
        if descriptor.fd not in restored or is_master_path(descriptor.path):
            continue
        found = image.objects.get(descriptor.object_id)
        if isinstance(found, rec.PtyPair) and found.state.controlling:
            return descriptor.fd
    return None
