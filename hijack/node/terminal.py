"""A moved process's terminal: a pty on its node, pumped to the home shadow's relay.

The daemon that receives a process whose terminal stayed at home opens a
pseudo-terminal for it (hijack.restore gives the slave the settings and
window size of the home terminal, and makes it the controlling terminal if
that one was); the master stays with the daemon, which pumps it to the relay
of the shadow, which reads and writes the home terminal.

On the relay (docs/protocol.md, "Terminals"), node -> shadow is the raw
output of the master; shadow -> node is framed, because it carries two
things: FRAME(kind u8, length u32) then `length` bytes, kind DATA (what was
typed at home) or WINDOW (a struct winsize: the home terminal was resized;
set on the master, the kernel sends SIGWINCH to the process's group).

The pump ends when the process's side ends (no slave open any more: EIO on
the master; its output is passed on, then the relay is shut) or the home side
does (the relay ends: the master is closed, which hangs the terminal up).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable

from hijack.errors import HijackError
from hijack.sys import terminal

DATA, WINDOW = 1, 2
FRAME = struct.Struct("<BI")
MAX_FRAME = 1 << 20
CHUNK = 64 * 1024
BUFFER_LIMIT = 1 << 20  # bytes held per direction before we stop reading
LINGER = 2.0  # seconds to wait for the shadow to close the relay after our end


def frame(kind: int, payload: bytes) -> bytes:
    return FRAME.pack(kind, len(payload)) + payload


class FrameReader:
    """Cuts the shadow's stream into (kind, payload) frames."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buffer += data
        frames = []
        while len(self.buffer) >= FRAME.size:
            kind, length = FRAME.unpack_from(self.buffer)
            if kind not in (DATA, WINDOW) or length > MAX_FRAME:
                raise HijackError(f"bad terminal frame from the shadow (kind {kind})")
            if len(self.buffer) < FRAME.size + length:
                break
            frames.append((kind, bytes(self.buffer[FRAME.size : FRAME.size + length])))
            del self.buffer[: FRAME.size + length]
        return frames


def pump(master: int, relay: socket.socket, log: Callable[[str], None]) -> None:
    """Pump until one side ends (see the module docstring); closes both."""
    relay.setblocking(False)
    frames = FrameReader()
    to_master = bytearray()
    to_relay = bytearray()
    process_open = True  # a slave is open: the process is there
    home_open = True  # the relay has not ended
    selector = selectors.DefaultSelector()
    try:
        while home_open and (process_open or to_relay):
            _watch(selector, master, _events(process_open, to_master, to_relay))
            _watch(selector, relay, _events(home_open, to_relay, to_master))
            for key, events in selector.select():
                if key.fileobj == master:
                    if events & selectors.EVENT_READ:
                        try:
                            to_relay += os.read(master, CHUNK)
                        except BlockingIOError:
                            pass
                        except OSError:  # EIO: every slave is closed
                            process_open = False
                    if events & selectors.EVENT_WRITE and to_master:
                        try:
                            del to_master[: os.write(master, to_master[:CHUNK])]
                        except BlockingIOError:
                            pass
                        except OSError:  # EIO: the process is gone, its input with it
                            to_master.clear()
                            process_open = False
                else:
                    if events & selectors.EVENT_READ:
                        data = _receive(relay)
                        if data == b"":
                            home_open = False
                        for kind, payload in frames.feed(data or b""):
                            if kind == DATA:
                                to_master += payload
                            elif len(payload) == terminal.WINSIZE.size:
                                size = terminal.WindowSize.unpack(payload)
                                terminal.set_window_size(master, size)
                    if events & selectors.EVENT_WRITE and to_relay:
                        with contextlib.suppress(BlockingIOError):
                            del to_relay[: relay.send(to_relay[:CHUNK])]
        if home_open:
            relay.shutdown(socket.SHUT_WR)
            _linger(relay)
    except (OSError, HijackError) as exc:
        log(f"terminal relay: {exc}")
    finally:
        selector.close()
        relay.close()
        os.close(master)  # the home side ended: the process's terminal hangs up


def _events(open_: bool, outgoing: bytearray, incoming: bytearray) -> int:
    events = 0
    if open_ and len(incoming) < BUFFER_LIMIT:
        events |= selectors.EVENT_READ
    if outgoing:
        events |= selectors.EVENT_WRITE
    return events


def _watch(selector: selectors.BaseSelector, target: int | socket.socket, events: int) -> None:
    try:
        selector.get_key(target)
    except KeyError:
        if events:
            selector.register(target, events)
        return
    if events:
        selector.modify(target, events)
    else:
        selector.unregister(target)


def _receive(relay: socket.socket) -> bytes | None:
    try:
        return relay.recv(CHUNK)
    except BlockingIOError:
        return None


def _linger(relay: socket.socket) -> None:
    """Read (and drop) until the shadow closes too: a close with unread bytes would reset
    the relay and throw away the process's last output still on its way."""
    deadline = time.monotonic() + LINGER
    relay.settimeout(LINGER)
    with contextlib.suppress(OSError):
        while time.monotonic() < deadline and relay.recv(CHUNK):
            pass
