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

A process that held a pty master at home (tmux, screen, expect: the programs
on its slave stay at home) gets a pty master here instead; the daemon keeps
an open slave of it, raw, and pumps that, framed the other way round (pump's
`master_held`).
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
WINDOW_INTERVAL = 0.2  # seconds between looks at the size a process holding a master set


def frame(kind: int, payload: bytes) -> bytes:
    return FRAME.pack(kind, len(payload)) + payload


class FrameReader:
    """Cuts the shadow's stream into (kind, payload) frames (of `kinds`)."""

    def __init__(self, kinds: tuple[int, ...] = (DATA, WINDOW), what: str = "terminal") -> None:
        self.buffer = bytearray()
        self.kinds = kinds
        self.what = what

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buffer += data
        frames = []
        while len(self.buffer) >= FRAME.size:
            kind, length = FRAME.unpack_from(self.buffer)
            if kind not in self.kinds or length > MAX_FRAME:
                raise HijackError(f"bad {self.what} frame (kind {kind})")
            if len(self.buffer) < FRAME.size + length:
                break
            frames.append((kind, bytes(self.buffer[FRAME.size : FRAME.size + length])))
            del self.buffer[: FRAME.size + length]
        return frames


def pump(
    local: int, relay: socket.socket, log: Callable[[str], None], *, master_held: bool = False
) -> None:
    """Pump until one side ends (see the module docstring); closes both.

    `local` is the pty's master; with `master_held` (the process holds the
    master: it held a pty master at home) it is our raw slave instead, and
    the framing is the other way round: what the process writes to its
    master goes to the shadow in DATA frames, with a WINDOW frame when it
    sets another size (looked at every WINDOW_INTERVAL), and what the shadow
    sends is written to the slave as it is.
    """
    relay.setblocking(False)
    frames = FrameReader()
    to_local = bytearray()
    to_relay = bytearray()
    process_open = True  # the process's end is open (a slave; with master_held, its master)
    home_open = True  # the relay has not ended
    window = terminal.get_window_size(local) if master_held else None
    selector = selectors.DefaultSelector()
    try:
        while home_open and (process_open or to_relay):
            _watch(selector, local, _events(process_open, to_local, to_relay))
            _watch(selector, relay, _events(home_open, to_relay, to_local))
            for key, events in selector.select(WINDOW_INTERVAL if master_held else None):
                if key.fileobj == local:
                    if events & selectors.EVENT_READ:
                        try:
                            data = os.read(local, CHUNK)
                        except BlockingIOError:
                            data = None
                        except OSError:  # EIO: the process's end is closed
                            data = b""
                        if data == b"":
                            process_open = False
                        elif data:
                            to_relay += frame(DATA, data) if master_held else data
                    if events & selectors.EVENT_WRITE and to_local:
                        try:
                            del to_local[: os.write(local, to_local[:CHUNK])]
                        except BlockingIOError:
                            pass
                        except OSError:  # EIO: the process is gone, its input with it
                            to_local.clear()
                            process_open = False
                else:
                    if events & selectors.EVENT_READ:
                        data = _receive(relay)
                        if data == b"":
                            home_open = False
                        if master_held:
                            to_local += data or b""
                        else:
                            _apply(frames.feed(data or b""), local, to_local)
                    if events & selectors.EVENT_WRITE and to_relay:
                        with contextlib.suppress(BlockingIOError):
                            del to_relay[: relay.send(to_relay[:CHUNK])]
            if window is not None and process_open:
                size = terminal.get_window_size(local)
                if size != window:
                    window = size
                    to_relay += frame(WINDOW, size.pack())
        if home_open:
            relay.shutdown(socket.SHUT_WR)
            _linger(relay)
    except (OSError, HijackError) as exc:
        log(f"terminal relay: {exc}")
    finally:
        selector.close()
        relay.close()
        os.close(local)  # the home side ended: the process's terminal hangs up


def _apply(frames: list[tuple[int, bytes]], master: int, to_master: bytearray) -> None:
    """The shadow's frames: DATA for the master, WINDOW set on it (SIGWINCH there)."""
    for kind, payload in frames:
        if kind == DATA:
            to_master += payload
        elif len(payload) == terminal.WINSIZE.size:
            terminal.set_window_size(master, terminal.WindowSize.unpack(payload))


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
