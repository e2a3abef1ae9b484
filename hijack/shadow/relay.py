"""The shadow's relays: the migrant's descriptors, pumped to wherever it runs now.

Every descriptor the process had at home that cannot move (a socket, a pipe,
a terminal) is a *stream*: its original kernel object stays here, in the
shadow, and one relay connection at a time carries its bytes to the node the
process runs on, where the process holds the other end at the same
descriptor number. A listening socket stays here too: the shadow accepts its
clients and connects each to the listener the process has on its node; each
such client is a stream of its own. A UDP socket is relayed datagram by
datagram instead (hijack.shadow.datagram).

A move (docs/protocol.md, "Moving"):
- `migrating`: the shadow stops reading the originals and stops writing to
  the old relays, and waits until all it wrote there is acknowledged, so the
  frozen process's unread bytes are exactly what its sockets hold (the mover
  copies them with MSG_PEEK, consuming nothing); meanwhile it goes on reading
  the relays, so the process, never blocked writing, goes on reading;
- `migrated`: the new node's relays (connected during the restore) become
  the active ones, with those unread bytes in front of what is still to be
  sent; the old relays keep being read until their end (the old process's
  last writes), before anything from the new ones is passed on;
- `aborted`: nothing changed: the old relays go on.

Each direction of a stream can splice its bytes (splice(2)) from its source
socket into a kernel pipe and from the pipe into its sink, so only
descriptors and counts pass through Python; what must be seen or put in
front of the pipe's bytes (a move's unread bytes, an accepted client's bytes
kept for replay, a terminal, which cannot splice) goes through a bytearray
*head*, always sent before the pipe's contents (SPLICE, below, switches the
pipes off: every byte then goes through the heads).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import json
import os
import selectors
import socket
import ssl
import stat
import struct
import termios
import time
from dataclasses import dataclass, field
from typing import Any

from hijack.errors import HijackError
from hijack.node import forwarder
from hijack.node.terminal import DATA, FRAME, WINDOW, FrameReader
from hijack.node.terminal import frame as terminal_frame
from hijack.shadow import pump as native
from hijack.shadow.datagram import DatagramStream
from hijack.shadow.datagram_link import DatagramLink
from hijack.shadow.pump import SplicePipe, take_all
from hijack.shadow.relay_link import TlsLink
from hijack.sys import terminal as terminal_sys
from hijack.sys.process import close_keeping_standard

CHUNK = 256 * 1024
BUFFER_LIMIT = 4 * 1024 * 1024  # bytes held per direction before we stop reading
ACK_WAIT = 5.0  # seconds to wait for the old node to acknowledge what we sent
# A swap's `write` refused so while an old relay is read to its end (a move from one node
# to another just done): the coordinator asks again (hijack.node.swap).
RELAYS_CHANGING = "its relays are changing"
SIOCOUTQ = termios.TIOCOUTQ
REPLAY_LIMIT = 1024 * 1024
# On. (It was off for a while: `make soak` saw echoed streams with a hole
# after a move. The cause was `migrating` not reading the relays while it
# waited for acknowledgements: see RelayHub.migrating. The splice pumps only
# made it likely, by putting more unacknowledged bytes on the wire.)
SPLICE = True
PUMP_ROUNDS = 16  # splices per direction and event, so one wakeup moves what is there
# Seconds a move home's flush goes on with nothing the process's node would take.
FLUSH_PATIENCE = 0.5


def window_room(sock: socket.socket) -> int:
    """Bytes the peer's kernel would take on `sock` now: its advertised receive window
    (TCP_INFO's tcpi_snd_wnd, Linux 6.2 on) less what is queued and unacknowledged.
    0 where the kernel does not tell."""
    return forwarder.window(sock) - unacknowledged(sock)


def unacknowledged(sock: socket.socket) -> int:
    """Bytes sent on `sock` its peer's kernel has not acknowledged yet (SIOCOUTQ)."""
    value = fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", value)[0])


def endpoint(address: tuple[Any, ...]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


@dataclass
class Relay:
    """One connection to the process's node, standing for one stream there."""

    sock: socket.socket
    move: str
    eof: bool = False  # the process's side has finished writing
    terminal: str = ""  # a terminal's relay: the pty that stands for it at the node
    frames: FrameReader | None = None  # a pty master's relay: what the node sends, framed
    # An encrypted relay (hijack.node.forwarder): TLS, the node's side framed.
    link: TlsLink | None = None
    forwarded: FrameReader | None = None
    acked: int = 0  # bytes the node's forwarder has put in the process's socket
    room: int = 0  # what that socket surely took more, at the last ACK (0: not known)
    received: int = 0  # the process's bytes that came on it (DATA; an encrypted relay)
    # The ends of the process's socket at the node ("ip:port" each) when they are
    # not this connection's (a forwarder stands between).
    ends: tuple[str, str] | None = None
    # Read once: a connection that was reset has no peer name any more, and
    # the shadow must still describe it (the status a mover plans with).
    shadow_end: str = field(init=False, default="")
    node_end: str = field(init=False, default="")
    # The node's address this connection comes from ("" if unknown): its daemon's host
    # for a swap whose registry does not know that node (an encrypted relay's ends are
    # loopback ones there).
    node_host: str = field(init=False, default="")

    def __post_init__(self) -> None:
        with contextlib.suppress(OSError):
            self.node_host = str(self.sock.getpeername()[0])
        if self.ends is not None:
            self.node_end, self.shadow_end = self.ends
            return
        with contextlib.suppress(OSError):
            self.shadow_end = endpoint(self.sock.getsockname())
            self.node_end = endpoint(self.sock.getpeername())

    def readable(self) -> bool:
        """Whether the node may still send on it (an encrypted one: acknowledgements
        after the process's end, too)."""
        return not self.link.eof if self.link is not None else not self.eof

    def unacknowledged(self) -> int:
        """Bytes sent that are not yet in the process's socket at the node."""
        if self.link is not None:
            return self.link.plain_sent - self.acked
        return unacknowledged(self.sock)


def can_splice(fd: int) -> bool:
    """Whether splice(2) works on `fd`: sockets and pipes (a terminal does not)."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISSOCK(mode) or stat.S_ISFIFO(mode)


@dataclass
class Stream:
    """An original descriptor (or an accepted client) and its relays."""

    id: str  # "fd:N" for the process's descriptor N, "acc:K" for an accepted client
    original: int  # our own descriptor of the original object
    kind: str  # "stream" or "listener"
    original_flags: int = 0  # file status flags to give back when we stop pumping
    relay: Relay | None = None  # the active relay
    retiring: list[Relay] = field(default_factory=list)  # old relays, read to their end
    pending: dict[str, Relay] = field(default_factory=dict)  # move id -> relay of that move
    to_relay: bytearray = field(default_factory=bytearray)
    to_original: bytearray = field(default_factory=bytearray)
    original_eof: bool = False
    shut_relay: bool = False  # we sent the relay our end (the original ended)
    shut_original: bool = False
    bytes_out: int = 0  # original -> process
    bytes_in: int = 0  # process -> original
    replay: bytearray | None = None  # an accepted client's bytes until the process answers
    replay_lost: bool = False  # more than REPLAY_LIMIT went unanswered: no replay possible
    # A terminal: what it was set to before we made it raw, and its last window size.
    terminal: terminal_sys.Settings | None = None
    window: terminal_sys.WindowSize | None = None
    closed: bool = False
    # A pty master the process held (tmux, screen): the process gets a pty master
    # at its node; what it writes there comes framed (DATA, WINDOW: a size it set).
    master: bool = False
    # Kernel pipes behind the heads to_relay / to_original, made at the first
    # byte; None while the original cannot splice (then the heads carry all).
    out_pipe: SplicePipe | None = None
    in_pipe: SplicePipe | None = None
    splices: bool | None = None  # whether the original can splice; None: not asked yet
    # The move that is handing the original back to the process at home (RelayHub.hand_back):
    # no longer pumped; "" for a stream relayed as usual.
    handed: str = ""
    # The socket swap that is taking this stream off its relay (RelayHub.swap_write): what
    # the process wrote still goes to the original, what the original sends is kept here
    # (to_relay) for the direct connection; "" for a stream relayed as usual.
    swapping: str = ""
    # Its relay failed while swapping (the process's old socket is reset at the swap's
    # commit, maybe before the coordinator's `retire` comes): why; not watched any more.
    relay_lost: str = ""
    # Its number at the native pump while the pump splices it (hijack.shadow.pump), else 0.
    native: int = 0
    native_over: bool = False  # given back by the pump at an end or failure: never again

    @property
    def out_held(self) -> int:
        """Bytes read from the original, not yet sent to the relay."""
        return len(self.to_relay) + (self.out_pipe.held if self.out_pipe else 0)

    @property
    def in_held(self) -> int:
        """Bytes read from the relays, not yet written to the original."""
        return len(self.to_original) + (self.in_pipe.held if self.in_pipe else 0)

    def out_room(self) -> bool:
        if len(self.to_relay) >= BUFFER_LIMIT:
            return False
        return self.out_pipe is None or not (
            self.out_pipe.full or self.out_pipe.held >= self.out_pipe.size
        )

    def in_room(self) -> bool:
        if len(self.to_original) >= BUFFER_LIMIT:
            return False
        return self.in_pipe is None or not (
            self.in_pipe.full or self.in_pipe.held >= self.in_pipe.size
        )

    def splicing(self) -> bool:
        if self.splices is None:
            self.splices = SPLICE and self.original >= 0 and can_splice(self.original)
        return self.splices

    def outward_pipe(self) -> SplicePipe | None:
        """The pipe for original -> relay, or None while bytes must be seen (replay).

        An accepted client's bytes are kept for a replay up to REPLAY_LIMIT;
        past it they are not kept anyway, and splice. Bytes already in the
        pipe keep the next ones there too: the head goes out first. An
        encrypted relay's bytes go through TLS (in our memory) anyway: read
        straight into the head, not spliced and read back out of the pipe.
        """
        if self.replay is not None and len(self.replay) >= REPLAY_LIMIT:
            # Past it the bytes splice unseen: a replay would have a hole.
            self.replay, self.replay_lost = None, True
        seen = self.replay is not None or (self.relay is not None and self.relay.link is not None)
        if not self.splicing() or (seen and not (self.out_pipe and self.out_pipe.held)):
            return None
        if self.out_pipe is None:
            self.out_pipe = SplicePipe()
        return self.out_pipe

    def inward_pipe(self) -> SplicePipe | None:
        """The pipe for relay -> original, or None if the original cannot splice."""
        if not self.splicing():
            return None
        if self.in_pipe is None:
            self.in_pipe = SplicePipe()
        return self.in_pipe

    def close_pipes(self) -> None:
        for pipe in (self.out_pipe, self.in_pipe):
            if pipe is not None:
                pipe.close()
        self.out_pipe = self.in_pipe = None


class RelayHub:
    """All streams of one migrant, pumped by the shadow's event loop."""

    def __init__(self, selector: selectors.BaseSelector, log: Any) -> None:
        self.selector = selector
        self.log = log
        self.streams: dict[str, Stream] = {}
        self.listeners: dict[str, str] = {}  # listener stream id -> "ip:port" at the node
        # The streams a socket swap took off their relays: their counts then, for good
        # (status `swapped`: what shows that no byte of them was relayed since).
        self.swapped: list[dict[str, Any]] = []
        self.datagrams: dict[str, DatagramStream] = {}  # UDP sockets (hijack.shadow.datagram)
        self.location = ""  # node the process runs on now; "" while not relaying
        # listener stream id -> the node's link for its clients (hijack.node.forwarder)
        self.listener_links: dict[str, TlsLink] = {}
        self.pending_listener_links: dict[str, dict[str, TlsLink]] = {}  # move -> id -> link
        self.pumping = False
        self.flushing = False  # a move home: what we hold for the process still goes to it
        self._accepted = 0
        self._callbacks: dict[tuple[str, str], Any] = {}
        self.pump: native.NativePump | None = None  # started at the first stream it can take
        self.pump_failed = not native.available()
        self._native: dict[int, Stream] = {}  # the pump's number -> stream
        self._native_count = 0
        # The last read of an original or a relay got less than it asked for: its
        # source had no more (a stream socket's short read empties its queue), so
        # another round of the pump would only find nothing. The selector is level
        # triggered: what comes later is an event of its own.
        self._read_short = False

    # -- setting up -------------------------------------------------------------

    def adopt(self, number: int, own_fd: int, is_listener: bool, stream_id: str = "") -> None:
        """`stream_id`: a tree member's stream (docs/protocol.md, "Moving a tree"), else
        the root's descriptor `number`'s."""
        stream_id = stream_id or f"fd:{number}"
        if stream_id in self.streams:
            return  # a description members share: one stream
        self.streams[stream_id] = Stream(stream_id, own_fd, "listener" if is_listener else "stream")

    def adopt_datagram(self, number: int, own_fd: int, stream_id: str = "") -> None:
        stream_id = stream_id or f"fd:{number}"
        if stream_id not in self.datagrams:
            self.datagrams[stream_id] = DatagramStream(stream_id, own_fd, self.selector, self.log)

    def adopt_terminal(self, number: int, own_fd: int, stream_id: str = "") -> None:
        """The terminal at the target's descriptor `number`: pumped through a pty at the node.

        Read and written through an open file of our own (O_NONBLOCK there must
        not reach the shell that shares the terminal's open file). `stream_id`: a
        tree's (one for every member on that terminal), else the root's "tty:N".
        """
        stream_id = stream_id or f"tty:{number}"
        if stream_id in self.streams:
            return
        flags = os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(f"/proc/self/fd/{own_fd}", flags)
        self.streams[stream_id] = Stream(stream_id, fd, "stream", terminal=None)
        self.streams[stream_id].window = terminal_sys.get_window_size(fd)

    def adopt_master(self, number: int, own_fd: int) -> None:
        """The pty master at the target's descriptor `number`: the process gets a pty master
        at its node, whose slave the daemon there pumps to its relay (its own open file:
        opening ptmx again would make another pty)."""
        stream_id = f"ptm:{number}"
        if stream_id not in self.streams:
            self.streams[stream_id] = Stream(stream_id, own_fd, "stream", master=True)

    def attach_relay(
        self,
        stream_id: str,
        move: str,
        connection: socket.socket | TlsLink,
        pty: str = "",
        ends: tuple[str, str] | None = None,
    ) -> None:
        """A relay for `stream_id` the node opened for `move` (plain, or a TlsLink);
        an accepted client's (move `accepted`) is its relay at once."""
        link = connection if isinstance(connection, TlsLink) else None
        sock = connection.sock if isinstance(connection, TlsLink) else connection
        stream = self.streams.get(stream_id)
        if stream is None or stream.kind != "stream" or stream.closed:
            sock.close()
            raise HijackError(f"no stream {stream_id} to relay")
        sock.setblocking(False)
        relay = Relay(sock, move, terminal=pty, link=link, ends=ends)
        if link is not None:
            relay.forwarded = forwarder.frames()
        if move == forwarder.ACCEPTED:
            if stream.relay is not None:
                sock.close()
                raise HijackError(f"{stream_id} has a relay already")
            stream.relay = relay
            self._refresh_interest()
            return
        old = stream.pending.pop(move, None)
        if old is not None:
            old.sock.close()
        stream.pending[move] = relay

    def attach_datagram_link(self, stream_id: str, move: str, link: TlsLink) -> None:
        """The node's datagram link for UDP stream `stream_id` once `move` is done."""
        datagram = self.datagrams.get(stream_id)
        if datagram is None:
            link.sock.close()
            raise HijackError(f"no UDP stream {stream_id} to relay")
        link.sock.setblocking(False)
        datagram.attach_link(move, DatagramLink(link))

    def attach_listener_link(self, stream_id: str, move: str, link: TlsLink) -> None:
        """The node's link for the clients of listener `stream_id` once `move` is done."""
        old = self.pending_listener_links.setdefault(move, {}).pop(stream_id, None)
        if old is not None:
            old.sock.close()
        self.pending_listener_links[move][stream_id] = link

    # -- moves --------------------------------------------------------------------

    def migrating(self, move: str, ack_wait: float = ACK_WAIT, *, flush: bool = False) -> None:
        """Stop the flow towards the process; return once its node has all we sent.

        Bytes its node has not acknowledged after `ack_wait` seconds (a
        process that stopped reading) are in no socket a mover can copy: the
        flow goes on as before and HijackError says the move cannot be made.
        With `flush` (a move to the process's home), what we read from the
        originals and hold for the process is still sent to it, as far as its
        receive window takes it (more would stay unacknowledged if it stopped
        reading, and fail a move that could have carried those bytes), for at
        most half of `ack_wait` and while it goes on taking some: the
        originals can go back to it only with nothing of theirs in between
        (hand_back). What is left is carried by the move as usual.
        """
        self.pumping = False
        self.flushing = flush
        self._reclaim()  # what the native pump carried: Python stops and counts it from here
        self._refresh_interest()
        for datagram in self.datagrams.values():
            datagram.migrating()
        deadline = time.monotonic() + ack_wait
        flush_until = time.monotonic() + ack_wait / 2
        flushed_at = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if self.flushing and (now >= flush_until or now - flushed_at > FLUSH_PATIENCE):
                    self.flushing = False  # the rest is carried by the move, as usual
                if self.flushing and self._flush_towards_process():
                    flushed_at = now
                counts = {
                    stream.id: stream.relay.unacknowledged()
                    for stream in self.streams.values()
                    if stream.relay is not None
                }
                waiting = {stream_id: count for stream_id, count in counts.items() if count}
                if not waiting and not (self.flushing and self._holding_for_process()):
                    return
                if not waiting and time.monotonic() >= deadline:
                    return  # acknowledged, though not all flushed: no move home (hand_back)
                if time.monotonic() >= deadline:
                    break
                self._read_while_waiting()
        finally:
            self.flushing = False
        self.aborted(move)
        unread = ", ".join(f"{stream} {count} bytes" for stream, count in sorted(waiting.items()))
        # Where they wait, for the log: the node's kernel, its forwarder or the process
        # ("unsent": encrypted here, not taken by our kernel yet).
        unsent = ", ".join(
            f"{stream.id} {len(stream.relay.link.pending)} unsent"
            for stream in self.streams.values()
            if stream.id in waiting
            and stream.relay
            and stream.relay.link
            and stream.relay.link.pending
        )
        where = f"; {unsent}" if unsent else ""
        self.log(
            f"move {move}: not acknowledged after {ack_wait:g} s ({unread}{where}); relaying on"
        )
        raise HijackError(
            f"the process did not take what its home shadow sent it within {ack_wait:g} s"
            f" ({unread} unacknowledged): moved now, those bytes would be lost"
        )

    def _read_while_waiting(self) -> None:
        """While `migrating` waits for acknowledgements.

        The process must go on reading what we sent: it does only while its
        own writes get through, so we keep reading its relays (and passing
        that on) meanwhile. Else it blocks on a full send queue, stops
        reading, closes its window on our last bytes, and past ACK_WAIT those
        bytes are neither in what the mover peeks nor anywhere else: a hole in
        the stream.
        """
        for stream in list(self.streams.values()):
            self._read_while_migrating(stream)
        time.sleep(0.001)

    def _read_while_migrating(self, stream: Stream) -> None:
        relay = stream.relay
        if stream.closed or relay is None:
            return
        if relay.link is not None:
            # What TLS made of the bytes sent before (counted in plain_sent, so waited
            # for) goes out still: nothing else would send it until the move is over.
            with contextlib.suppress(OSError):
                relay.link.flush()
        if not relay.readable():
            return
        with contextlib.suppress(OSError):  # the event loop meets it again and handles it
            if self._relay_room(stream, relay):
                self._read_relay(stream, relay)
            self._flush_original(stream)

    def migrated(
        self,
        move: str,
        location: str,
        unread: dict[str, bytes],
        listeners: dict[str, str],
        present: set[str],
    ) -> None:
        """The process runs at `location` now, with the relays made for `move`."""
        old_links = self.listener_links
        self.listener_links = self.pending_listener_links.pop(move, {})
        for stream in list(self.streams.values()):
            new = stream.pending.pop(move, None)
            if stream.relay is not None and stream.relay.eof:
                # All the old process wrote is read already (it had shut its side):
                # nothing to wait for there (a forwarded relay may never end by itself).
                self._forget(stream.relay.sock)
                stream.relay.sock.close()
            elif stream.relay is not None:
                stream.retiring.append(stream.relay)
            stream.relay = None
            if new is not None:
                stream.relay = new
                pending = unread.get(stream.id, b"")
                if pending and self._is_terminal(stream):  # what was typed, not yet read
                    pending = terminal_frame(DATA, pending)
                stream.to_relay[:0] = pending
                if stream.window is not None:  # the new pty gets the home terminal's size
                    stream.to_relay[:0] = terminal_frame(WINDOW, stream.window.pack())
                # An end we passed to the old relay may not have been read
                # there: the new one gets it too, after the unread bytes.
                stream.shut_relay = False
            elif (
                stream.kind == "stream"
                and stream.id.startswith("acc:")
                and (stream.id not in present)
                and not stream.closed  # a client that came and went: nothing to carry on
            ):
                # Accepted by us but not yet by the process: connect it again at
                # the new node, replaying what the client had sent.
                if stream.replay_lost:  # a reset, rather than a stream with a hole
                    self.log(f"{stream.id}: too much unanswered to replay; resetting it")
                    self._close(stream, reset=True)
                    continue
                try:
                    self._connect_accepted(stream)
                except OSError as exc:
                    self.log(f"{stream.id}: cannot connect it at {location}: {exc}; resetting it")
                    self._close(stream, reset=True)
            for relay in stream.pending.values():
                relay.sock.close()
            stream.pending.clear()
        for link in old_links.values():
            link.sock.close()  # the old node's forwarder lets go of that listener
        self._close_listener_links()
        self.listeners = dict(listeners)
        self.location = location
        self.pumping = True
        self._set_originals_nonblocking()
        self._make_terminals_raw()
        self._refresh_interest()

    def abandon(self) -> None:
        """Forget every stream (a first move failed: the process is at home again).

        The originals are the shadow's held descriptors, kept; a terminal's is our own.
        """
        self._reclaim()
        for stream in self.streams.values():
            if self._is_terminal(stream) and stream.original >= 0:
                os.close(stream.original)
        self.streams.clear()

    def _close_listener_links(self) -> None:
        """Those of moves that did not happen."""
        for links in self.pending_listener_links.values():
            for link in links.values():
                link.sock.close()
        self.pending_listener_links.clear()

    def aborted(self, move: str) -> None:
        for stream in self.streams.values():
            relay = stream.pending.pop(move, None)
            if relay is not None:
                relay.sock.close()
            if stream.handed == move:
                # Relayed on. The copy built at home set the original's status flags
                # (they are its open file's): we pump it non-blocking again.
                stream.handed = ""
                with contextlib.suppress(OSError):
                    os.set_blocking(stream.original, False)
        for link in self.pending_listener_links.pop(move, {}).values():
            link.sock.close()
        self.pumping = bool(self.location)
        self._refresh_interest()
        for datagram in list(self.datagrams.values()):
            datagram.aborted()
            if not self.location:  # a first move that failed: the process keeps its own
                datagram.close()
                del self.datagrams[datagram.id]

    def datagrams_migrated(
        self,
        placed: dict[str, dict[str, str]],
        unread: dict[str, list[tuple[str, bytes]]],
        move: str = "",
    ) -> None:
        """Where each UDP socket of the process is now (`process`, `connected_to`), after
        `move`."""
        for stream_id, where in placed.items():
            datagram = self.datagrams.get(stream_id)
            if datagram is not None and where.get("process"):
                datagram.migrated(
                    where["process"],
                    where.get("connected_to", ""),
                    unread.get(stream_id, []),
                    move,
                )

    def expire(self) -> None:
        now = time.monotonic()
        for datagram in self.datagrams.values():
            datagram.expire(now)

    def _set_originals_nonblocking(self) -> None:
        for stream in self.streams.values():
            if stream.closed or stream.original < 0:
                continue
            flags = fcntl.fcntl(stream.original, fcntl.F_GETFL)
            if not flags & os.O_NONBLOCK:
                stream.original_flags = flags
                fcntl.fcntl(stream.original, fcntl.F_SETFL, flags | os.O_NONBLOCK)

    # -- terminals ------------------------------------------------------------------

    def _is_terminal(self, stream: Stream) -> bool:
        """A terminal the process had (pumped through a pty at the node); not a pty master."""
        return stream.window is not None

    def _make_terminals_raw(self) -> None:
        """The home terminal passes every byte on: the pty at the node does the line editing,
        echo and signals, as the process's terminal did here."""
        for stream in self.streams.values():
            if self._is_terminal(stream) and stream.terminal is None and stream.original >= 0:
                with contextlib.suppress(HijackError):  # hung up: nothing to set
                    settings = terminal_sys.get_settings(stream.original)
                    terminal_sys.set_settings(stream.original, settings.raw())
                    stream.terminal = settings

    def _restore_terminal(self, stream: Stream) -> None:
        if stream.terminal is not None and stream.original >= 0:
            with contextlib.suppress(HijackError):  # hung up: nothing to give back
                terminal_sys.set_settings(stream.original, stream.terminal)
            stream.terminal = None

    def release_terminals(self) -> None:
        """Give the home terminals back their settings (the shadow ends)."""
        for stream in self.streams.values():
            self._restore_terminal(stream)

    def has_terminals(self) -> bool:
        return any(self._is_terminal(stream) for stream in self.streams.values())

    def check_window_sizes(self) -> None:
        """Pass a home terminal's new size on (the node's pty then signals SIGWINCH)."""
        changed = False
        for stream in self.streams.values():
            if not self._is_terminal(stream) or stream.original < 0 or not self.pumping:
                continue
            try:
                size = terminal_sys.get_window_size(stream.original)
            except HijackError:
                continue
            if size != stream.window:
                stream.window = size
                stream.to_relay += terminal_frame(WINDOW, size.pack())
                changed = True
        if changed:
            self._refresh_interest()

    # -- the native pump (hijack.shadow.pump) ----------------------------------------

    def _nativizable(self, stream: Stream) -> bool:
        """Whether `stream` is in the steady state the pump carries: a socket and a plain
        relay, both open, nothing in front of the pipes, pumping, no move under way."""
        relay = stream.relay
        return (
            self.pumping
            and not self.flushing
            and not self.pump_failed
            and stream.kind == "stream"
            and not (stream.closed or stream.handed or stream.native or stream.native_over)
            and stream.original >= 0
            and relay is not None
            and (relay.link is None or self._records_ready(stream, relay))
            and relay.frames is None
            and not relay.eof
            and not stream.retiring
            and not stream.swapping
            and stream.replay is None
            and not (stream.to_relay or stream.to_original)
            and not (stream.original_eof or stream.shut_relay or stream.shut_original)
            and not (stream.master or self._is_terminal(stream))
            and stat.S_ISSOCK(os.fstat(stream.original).st_mode)
        )

    @staticmethod
    def _records_ready(stream: Stream, relay: Relay) -> bool:
        """Whether the pump can carry encrypted `relay` (unless HIJACK_PUMP_ENCRYPTED=0): its
        records are ours (tls_records), at a boundary both ways (nothing sealed waits to be sent,
        nothing read waits to be opened), no frame of the node's under way, and the out pipe
        empty (the pump's holds ciphertext, Python's would hold plaintext)."""
        link = relay.link
        records = link.records if link is not None else None
        return (
            native.ENCRYPTED
            and link is not None
            and records is not None
            and not (records.partial or records.replies or records.closed)
            and not (link.pending or link.eof)
            and relay.forwarded is not None
            and not relay.forwarded.buffer
            and not (stream.out_pipe is not None and stream.out_pipe.held)
        )

    def _offer_native(self, stream: Stream) -> bool:
        """Hand `stream` to the pump if it can take it: whether it did."""
        if not self._nativizable(stream):
            return False
        relay = stream.relay
        link = relay.link if relay is not None else None
        if link is not None and stream.out_pipe is None:  # (Python's TLS reads into the head)
            stream.out_pipe = SplicePipe()
        out_pipe = stream.out_pipe if link is not None else stream.outward_pipe()
        in_pipe = stream.inward_pipe()
        if out_pipe is None or in_pipe is None or relay is None:
            return False
        try:
            if self.pump is None:
                self.pump = native.NativePump(self.log)
                self.selector.register(self.pump, selectors.EVENT_READ, self._on_pump)
            self._native_count += 1
            number = self._native_count
            fds = [stream.original, relay.sock.fileno(), out_pipe.read_end, out_pipe.write_end]
            fds += [in_pipe.read_end, in_pipe.write_end]
            if link is not None and link.records is not None:
                writing, reading = link.records.writing, link.records.reading
                keys = native.TlsKeys(
                    writing.key,
                    writing.iv,
                    writing.sequence,
                    reading.key,
                    reading.iv,
                    reading.sequence,
                )
                self.pump.add_tls(number, fds, out_pipe.held, in_pipe.held, keys)
            else:
                self.pump.add(number, fds, out_pipe.held, in_pipe.held)
        except (OSError, HijackError) as exc:
            self._pump_lost(f"cannot use the native relay pump: {exc}")
            return False
        self._forget(stream.original)
        self._forget(relay.sock)
        stream.native = number
        self._native[number] = stream
        return True

    def _on_pump(self, _: Any, __: int) -> None:
        """The pump gave streams back by itself: a side ended or failed."""
        assert self.pump is not None
        try:
            reports = self.pump.reports()
        except HijackError as exc:
            self._pump_lost(str(exc))
            return
        self._deliver(reports)
        self._refresh_interest()

    def _deliver(self, reports: list[native.Report]) -> None:
        for report in reports:
            stream = self._native.get(report.id)
            if stream is not None:
                self._take_back(stream, report)
                self._finish_if_done(stream)

    def _deliver_deferred(self) -> None:
        """Streams the pump gave back by itself while we waited for an answer: their
        reports are no longer on its socket, so no event brings them."""
        if self.pump is not None and self.pump.deferred:
            reports, self.pump.deferred = self.pump.deferred, []
            self._deliver(reports)
            self._refresh_interest()  # their descriptors are watched here again

    def _reclaim(self, streams: list[Stream] | None = None) -> None:
        """Take streams back from the pump (all of them by default): Python pumps them now."""
        chosen = [
            s for s in (streams if streams is not None else self._native.values()) if s.native
        ]
        if not chosen or self.pump is None:
            return
        try:
            reports = self.pump.stop([stream.native for stream in chosen])
        except HijackError as exc:
            self._pump_lost(str(exc))
            return
        for stream in chosen:
            self._take_back(stream, reports[stream.native])
        self._deliver_deferred()

    def _take_back(self, stream: Stream, report: native.Report) -> None:
        """The pump let go of `stream`: what it moved, what the pipes hold, why it stopped."""
        self._native.pop(stream.native, None)
        stream.native = 0
        stream.bytes_out += report.bytes_out
        stream.bytes_in += report.bytes_in
        for pipe, held in ((stream.out_pipe, report.out_held), (stream.in_pipe, report.in_held)):
            if pipe is not None:
                pipe.held, pipe.full = held, False
        if report.tls is not None and stream.relay is not None:
            try:
                self._take_back_records(stream, stream.relay, report, report.tls)
            except (OSError, HijackError) as exc:  # a record that does not open: a failure
                self.log(f"{stream.id}: {exc}; closing it")
                stream.native_over = True
                self._close(stream, reset=True)
                return
        if report.reason == native.STOPPED:
            return
        stream.native_over = True  # an end or a failure: the rest of its life is Python's
        failure = OSError(report.err, os.strerror(report.err))
        if report.reason == native.ORIGINAL_ERROR:
            self._original_failed(stream, failure)
        elif report.reason == native.RELAY_ERROR:
            self.log(f"{stream.id}: {failure}; closing it")
            self._close(stream, reset=True)
        # An end: read again by the event loop, which passes it on as ever.

    def _take_back_records(
        self, stream: Stream, relay: Relay, report: native.Report, returned: native.TlsReturned
    ) -> None:
        """The rest of an encrypted stream the pump gave back: the record numbers each way,
        the ciphertext it sealed and did not send (the out pipe's: sent before any record
        sealed here after it), what it read and did not open or parse (opened and parsed
        here now: no event of the socket brings it again), the node's last ACK."""
        link = relay.link
        assert link is not None and link.records is not None
        link.records.writing.sequence = returned.out_sequence
        link.records.reading.sequence = returned.in_sequence
        link.plain_sent += report.bytes_out
        relay.received += report.bytes_in  # the DATA it passed on
        if returned.acks and returned.acked >= relay.acked:
            relay.acked, relay.room = returned.acked, returned.room
        out_pipe = stream.out_pipe
        if out_pipe is not None and out_pipe.held:
            link.pending += take_all(out_pipe)
        head = FRAME.pack(DATA, returned.data_left) if returned.data_left else b""
        plain = head + returned.frames + link.reopen(returned.ciphertext)
        if plain:
            # Behind what the in pipe holds for the original (it came first): the head
            # is written before the pipe's bytes.
            stream.to_original += take_all(stream.in_pipe)
            self._take_plaintext(stream, relay, plain)
        if relay.eof:
            # The node's END came to the pump: no event of the relay will say it again (the
            # connection stays open for ACKs), so the end goes on to the original from here
            # (once what is held for it is written: its writability brings the rest).
            self._flush_original(stream)

    def _pump_lost(self, why: str) -> None:
        """The pump failed: every stream it held is Python's again, its pipes as the kernel
        says they are (the counts of what it moved are lost: statistics only)."""
        self.log(f"{why}; relaying in Python")
        self.pump_failed = True
        for stream in list(self._native.values()):
            if stream.relay is not None and stream.relay.link is not None:
                # Its record numbers went with the pump: TLS cannot go on.
                self._native.pop(stream.native, None)
                stream.native, stream.native_over = 0, True
                self.log(f"{stream.id}: an encrypted stream of the pump; resetting it")
                self._close(stream, reset=True)
                continue
            held = [
                native.pipe_held(p.read_end) if p else 0 for p in (stream.out_pipe, stream.in_pipe)
            ]
            self._take_back(
                stream,
                native.Report(native.EV_RETURNED, stream.native, 0, 0, 0, 0, held[0], held[1]),
            )
        self.close_pump()
        self._refresh_interest()  # their descriptors are watched here again

    def close_pump(self) -> None:
        """Stop the pump (the shadow ends): it lets go of the copies it holds."""
        self._reclaim()
        if self.pump is not None:
            self._forget(self.pump)
            self.pump.close()
            self.pump = None

    def _native_counts(self, stream: Stream) -> tuple[int, int, int, int]:
        """bytes_out, bytes_in, out_held, in_held of `stream`, the pump's part included."""
        counts = (stream.bytes_out, stream.bytes_in, stream.out_held, stream.in_held)
        if not stream.native or self.pump is None:
            return counts
        try:
            report = self.pump.query(stream.native)
        except HijackError as exc:
            self._pump_lost(str(exc))
            return (stream.bytes_out, stream.bytes_in, stream.out_held, stream.in_held)
        if report is None:  # given back meanwhile: its report waits for the event loop
            return counts
        held = (report.out_held, report.in_held)
        return stream.bytes_out + report.bytes_out, stream.bytes_in + report.bytes_in, *held

    # -- the event loop's side ----------------------------------------------------

    def _refresh_interest(self) -> None:
        """Register each descriptor for what it should be watched for now (or hand a stream
        in its steady state to the native pump)."""
        for stream in list(self.streams.values()):
            self._refresh_stream(stream)

    def _refresh_stream(self, stream: Stream) -> None:
        """_refresh_interest for one stream (an event touches only its own)."""
        if not (stream.closed or stream.handed or stream.native or self._offer_native(stream)):
            if stream.original >= 0:  # -1: a pipe we closed to pass its end on
                self._watch(stream.original, self._original_events(stream), stream, "original")
            if stream.relay is not None and not stream.relay_lost:
                self._watch(stream.relay.sock, self._relay_events(stream), stream, "relay")
            for relay in stream.retiring:
                events = selectors.EVENT_READ if stream.in_room() else 0
                self._watch(relay.sock, events, stream, "retiring")

    def _original_events(self, stream: Stream) -> int:
        if stream.kind == "listener":
            return selectors.EVENT_READ if self.pumping else 0
        if stream.swapping:  # read all the peer sends, whatever we hold: it is owed
            events = 0 if stream.original_eof else selectors.EVENT_READ
            return events | (selectors.EVENT_WRITE if stream.in_held else 0)
        events = 0
        # Not pumping (a move under way), the flow towards the process stops; what
        # it wrote still goes to the originals (a frozen process's last bytes too).
        if self.pumping and not stream.original_eof and stream.out_room():
            events |= selectors.EVENT_READ
        if stream.in_held and not stream.shut_original:
            events |= selectors.EVENT_WRITE
        return events

    def _relay_events(self, stream: Stream) -> int:
        relay = stream.relay
        if relay is None:
            return 0
        events = 0
        readable = relay.readable() and not stream.retiring
        if readable and self._relay_room(stream, relay):
            events |= selectors.EVENT_READ
        if stream.swapping:
            # Nothing more for the process; but what TLS made of what it was sent before
            # goes out (counted as sent: `unacknowledged` waits for it).
            if relay.link is not None and relay.link.pending:
                events |= selectors.EVENT_WRITE
            return events
        if self.pumping and (stream.out_held or (stream.original_eof and not stream.shut_relay)):
            events |= selectors.EVENT_WRITE
        if self.pumping and relay.link is not None and relay.link.pending:
            events |= selectors.EVENT_WRITE
        return events

    def _watch(self, target: Any, events: int, stream: Stream, role: str) -> None:
        try:
            key = self.selector.get_key(target)
        except KeyError:
            key = None
        if events == 0:
            if key is not None:
                self.selector.unregister(target)
            return
        data = self._callbacks.get((stream.id, role))
        if data is None:
            data = self._callbacks[(stream.id, role)] = functools.partial(
                self._on_event, stream, role
            )
        if key is None:
            self.selector.register(target, events, data)
        elif key.events != events or key.data != data:
            self.selector.modify(target, events, data)

    def _on_event(self, stream: Stream, role: str, target: Any, events: int) -> None:
        if not self._still_watched(stream, role, target):
            return  # an event of the same select() batch, for what an earlier one closed
        try:
            if role == "original":
                if stream.kind == "listener":
                    if self.pumping:  # (as above: no client is taken once a move began)
                        self._accept_client(stream)
                else:
                    self._pump_original(stream, events)
            elif role == "relay":
                self._pump_relay(stream, events)
            else:
                self._drain_retiring(stream, target)
        except OSError as exc:
            if stream.swapping and role == "relay" and stream.relay is not None:
                # Retired by the swap once committed; ended by swap_resume if not.
                stream.relay_lost = str(exc) or type(exc).__name__
                self._forget(stream.relay.sock)
                return
            self.log(f"{stream.id}: {exc}; closing it")
            self._close(stream, reset=True)
        self._finish_if_done(stream)
        if stream.kind == "listener":
            self._refresh_interest()  # a client accepted: a stream of its own to watch
        elif not stream.closed:
            self._refresh_stream(stream)

    @staticmethod
    def _still_watched(stream: Stream, role: str, target: Any) -> bool:
        # `native`: an earlier event of the same batch handed the stream to the pump. Its
        # sockets and pipes are the pump's now: a read or a splice here would go behind
        # the pump's back (bytes in a pipe it does not count: sent out of order later).
        if stream.closed or stream.native:
            return False
        if role == "original":
            return stream.original >= 0
        if role == "relay":
            return stream.relay is not None and stream.relay.sock is target
        return any(relay.sock is target for relay in stream.retiring)

    def _pump_original(self, stream: Stream, events: int) -> None:
        for _ in range(PUMP_ROUNDS):
            moved = 0
            self._read_short = False
            # Pumping checked again: an event of the select() batch that held a
            # `migrating` request may come after it, and must read nothing more.
            reading = events & selectors.EVENT_READ and (self.pumping or stream.swapping)
            room = stream.out_room() or stream.swapping
            if reading and not stream.original_eof and room:
                moved += self._read_original(stream)
            moved += self._flush_relay(stream)
            if events & selectors.EVENT_WRITE:
                moved += self._flush_original(stream)
            if not moved or stream.original < 0 or self._read_short:
                break

    def _read_original(self, stream: Stream) -> int:
        pipe = stream.outward_pipe()
        got: int | None
        try:
            if pipe is not None:
                got = pipe.fill(stream.original)
                self._read_short = pipe.drained
            else:
                data = os.read(stream.original, CHUNK)
                # A terminal's bytes go in DATA frames (hijack.node.terminal).
                framed = data and self._is_terminal(stream)
                stream.to_relay += terminal_frame(DATA, data) if framed else data
                got = len(data)
                self._read_short = 0 < got < CHUNK
        except BlockingIOError:
            return 0
        except OSError as exc:
            self._original_failed(stream, exc)
            return 0
        if got == 0:
            stream.original_eof = True
        stream.bytes_out += got or 0
        return got or 0

    def _pump_relay(self, stream: Stream, events: int) -> None:
        relay = stream.relay
        assert relay is not None
        for _ in range(PUMP_ROUNDS):
            moved = 0
            self._read_short = False
            reading = events & selectors.EVENT_READ and relay.readable()
            if reading and self._relay_room(stream, relay):
                moved += self._read_relay(stream, relay)
            if events & selectors.EVENT_WRITE:
                moved += self._flush_relay(stream)
            moved += self._flush_original(stream)
            if not moved or stream.original < 0 or self._read_short:
                break

    def _relay_room(self, stream: Stream, relay: Relay) -> bool:
        """Whether to read `relay` now: while there is room for what it brings here; an
        encrypted one also past that while a move or a swap waits for its node's
        acknowledgements (the flow towards the process stopped, `unacknowledged`). Its
        forwarder's ACKs come in its TLS stream, behind the process's data: left unread,
        they would wait until the original's peer had read all before them (a slow peer:
        seconds, and the move or the swap gave up). Once all is acknowledged the bound
        holds again, so that the process, running on until it is frozen, is held back
        by TCP: what it wrote must reach the peer before a swap's join (a swap reading
        it all while the end was being frozen held 160 MB: 30 s to drain at 5 MB/s)."""
        if stream.in_room():
            return True
        waiting = bool(stream.swapping) or not self.pumping
        return relay.link is not None and waiting and relay.unacknowledged() > 0

    def _read_relay(self, stream: Stream, relay: Relay) -> int:
        if relay.link is not None:
            return self._read_link(stream, relay)
        pipe = stream.inward_pipe()
        got: int | None
        if pipe is not None:
            got = pipe.fill(relay.sock.fileno())
            self._read_short = pipe.drained
        else:
            try:
                data = relay.sock.recv(CHUNK)
            except BlockingIOError:
                return 0
            stream.to_original += self._from_master(stream, relay, data) if stream.master else data
            got = len(data)
            self._read_short = 0 < got < CHUNK
        if got is None:
            return 0
        if got:
            stream.bytes_in += got
            stream.replay = None  # the process answered: it has accepted this client
            stream.replay_lost = False
        else:
            relay.eof = True
        return got

    def _read_link(self, stream: Stream, relay: Relay) -> int:
        """Read an encrypted relay: its DATA for the original, its ACKs, its END."""
        assert relay.link is not None and relay.forwarded is not None
        # Bytes spliced from an earlier relay go first: they join the head.
        stream.to_original += take_all(stream.in_pipe)
        try:
            data = relay.link.recv()
        except BlockingIOError:
            return 0
        except ssl.SSLError as exc:
            raise ConnectionResetError(f"{stream.id}: {exc.reason or exc}") from None
        if not data:  # the connection's end, with or without END: the node is gone
            relay.eof = True
            return 0
        self._read_short = relay.link.drained
        self._take_plaintext(stream, relay, data)
        return len(data)

    def _take_plaintext(self, stream: Stream, relay: Relay, data: bytes) -> None:
        """An encrypted relay's plaintext: the node's frames (DATA, ACK, END)."""
        assert relay.forwarded is not None
        payload = bytearray()
        for kind, body in _frames(relay.forwarded, data, stream):
            if kind == DATA:
                payload += body
            elif kind == forwarder.ACK and len(body) >= forwarder.ACK_FORMAT.size:
                acked = forwarder.ACK_FORMAT.unpack_from(body)[0]
                if acked >= relay.acked:
                    relay.acked = acked
                    room = body[forwarder.ACK_FORMAT.size :]
                    fits = len(room) == forwarder.ROOM_FORMAT.size
                    relay.room = forwarder.ROOM_FORMAT.unpack(room)[0] if fits else 0
            elif kind == forwarder.END:
                relay.eof = True
        relay.received += len(payload)
        if payload:
            stream.to_original += (
                self._from_master(stream, relay, bytes(payload)) if stream.master else payload
            )
            stream.bytes_in += len(payload)
            stream.replay = None  # the process answered: it has accepted this client
            stream.replay_lost = False

    def _from_master(self, stream: Stream, relay: Relay, data: bytes) -> bytes:
        """The bytes of the DATA frames in `data` from a pty master's relay; a WINDOW
        frame's size is set on the home master (its slave's group gets SIGWINCH)."""
        if relay.frames is None:
            relay.frames = FrameReader()
        written = bytearray()
        for kind, payload in _frames(relay.frames, data, stream):
            if kind == DATA:
                written += payload
            elif len(payload) == terminal_sys.WINSIZE.size and stream.original >= 0:
                with contextlib.suppress(HijackError):  # hung up: no size to set
                    size = terminal_sys.WindowSize.unpack(payload)
                    terminal_sys.set_window_size(stream.original, size)
        return bytes(written)

    def _drain_retiring(self, stream: Stream, sock: socket.socket) -> None:
        relay = next(r for r in stream.retiring if r.sock is sock)
        try:
            self._read_relay(stream, relay)
        except ConnectionResetError:
            # The old process was killed with bytes unread in its end (copied
            # to the new relay by the move), or before it accepted this client
            # (connected again at the new node): this relay has ended, the
            # stream goes on.
            relay.eof = True
        if relay.eof:
            stream.retiring.remove(relay)
            self.selector.unregister(relay.sock)
            relay.sock.close()
        self._flush_original(stream)

    def _flush_relay(self, stream: Stream) -> int:
        """Send the relay what we hold for it, head first: the byte count sent."""
        relay = stream.relay
        if relay is not None and relay.link is not None and stream.swapping:
            relay.link.flush()  # (see _relay_events)
        if relay is None or not self.pumping or stream.handed or stream.swapping:
            return 0
        sent = 0
        if relay.link is not None:
            relay.link.flush()
            if not stream.to_relay:  # what was spliced for a plain relay goes through TLS
                stream.to_relay += take_all(stream.out_pipe)
        if stream.to_relay:
            try:
                if relay.link is not None:
                    sent = relay.link.send(stream.to_relay)
                else:
                    sent = relay.sock.send(stream.to_relay[:CHUNK])
            except BlockingIOError:
                sent = 0
            self._took(stream, sent)
        if relay.link is None and not stream.to_relay and stream.out_pipe is not None:
            sent += stream.out_pipe.drain(relay.sock.fileno())
        if stream.original_eof and not stream.out_held and not stream.shut_relay:
            if relay.link is None:
                relay.sock.shutdown(socket.SHUT_WR)
                stream.shut_relay = True
            else:
                stream.shut_relay = relay.link.shut_write()
        return sent

    def _original_failed(self, stream: Stream, exc: OSError) -> None:
        """Reading or writing the original failed (its peer reset it or stopped reading, a
        terminal hung up): the stream ends there. The process gets what was read before
        and then the end, as from a peer that closed it, and its stream stays known (a
        move takes it along, ended); its next write to it fails (_flush_original), as
        it would have there."""
        self.log(f"{stream.id}: {exc}; passing its end on to the process")
        self._close_original(stream, reset=True)
        stream.original_eof = stream.shut_original = True
        stream.splices = False  # what the process writes now lands in to_original
        if stream.in_pipe is not None:
            stream.in_pipe.close()
            stream.in_pipe = None
        stream.to_original.clear()

    def _flush_original(self, stream: Stream) -> int:
        """Write the original what we hold for it, head first: the byte count written."""
        if stream.original < 0 and stream.to_original:
            raise ConnectionResetError(f"{stream.id}: the process wrote to a stream that ended")
        written = 0
        try:
            if stream.to_original and not stream.shut_original:
                try:
                    written = os.write(stream.original, stream.to_original[:CHUNK])
                except BlockingIOError:
                    written = 0
                del stream.to_original[:written]
            if not stream.to_original and stream.in_pipe is not None and not stream.shut_original:
                written += stream.in_pipe.drain(stream.original)
        except OSError as exc:  # its peer is gone: what it was sent is lost, as over TCP
            self._original_failed(stream, exc)
            return written
        relay = stream.relay
        ended = relay is not None and relay.eof and not stream.retiring
        if ended and not stream.in_held and not stream.shut_original:
            self._end_original(stream)
        return written

    def _end_original(self, stream: Stream) -> None:
        """The process finished writing: pass the end on to the original's peer."""
        stream.shut_original = True
        self._restore_terminal(stream)
        sock = _socket_copy(stream.original)
        if sock is None:
            self._forget(stream.original)
            # A pipe: closing is how its reader sees the end (/dev/null at 0-2: dup2 closes).
            close_keeping_standard(stream.original)
            stream.original = -1
            return
        with sock, contextlib.suppress(OSError):  # reset meanwhile: nobody to tell
            sock.shutdown(socket.SHUT_WR)

    def _finish_if_done(self, stream: Stream) -> None:
        if stream.closed or stream.kind != "stream":
            return
        relay_done = stream.relay is None or stream.relay.eof
        if stream.original_eof and stream.shut_relay and relay_done and stream.shut_original:
            self._close(stream, reset=False)

    def _close(self, stream: Stream, *, reset: bool) -> None:
        self._reclaim([stream])  # the pump's copies first: closing ours must end the sockets
        for relay in [r for r in (stream.relay, *stream.retiring) if r is not None]:
            self._forget(relay.sock)
            relay.sock.close()
        self._close_original(stream, reset=reset)
        stream.relay = None
        stream.retiring.clear()
        stream.close_pipes()
        stream.closed = True
        # Forgotten: a server's clients come and go, the shadow lives on.
        self.streams.pop(stream.id, None)
        for role in ("original", "relay", "retiring"):
            self._callbacks.pop((stream.id, role), None)

    def _close_original(self, stream: Stream, *, reset: bool) -> None:
        if stream.original < 0:
            return
        self._forget(stream.original)
        self._restore_terminal(stream)
        sock = _socket_copy(stream.original) if reset else None
        if sock is not None:
            with sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        close_keeping_standard(stream.original)
        stream.original = -1

    def _forget(self, target: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(target)

    # -- listeners ----------------------------------------------------------------

    def _accept_client(self, listener: Stream) -> None:
        with socket.socket(fileno=os.dup(listener.original)) as sock:
            sock.setblocking(False)
            try:
                client, _ = sock.accept()
            except BlockingIOError:
                return
        self._accepted += 1
        stream = Stream(f"acc:{self._accepted}", client.detach(), "stream", replay=bytearray())
        self.streams[stream.id] = stream
        os.set_blocking(stream.original, False)
        try:
            self._connect_accepted(stream, listener.id)
        except OSError as exc:  # this client's failure, not the listener's
            self.log(f"{stream.id}: cannot connect it to the process: {exc}; resetting it")
            self._close(stream, reset=True)

    def _connect_accepted(self, stream: Stream, listener_id: str | None = None) -> None:
        """Ask the process's node to connect the client `stream` to the process's listener:
        its forwarder opens the client's relay (hijack.node.forwarder), nobody else can."""
        link = self.listener_links.get(listener_id or "") or next(
            iter(self.listener_links.values()), None
        )
        if link is None:
            where = self.location or "the node"
            self.log(f"{stream.id}: no listener at {where}; dropping the client")
            self._close(stream, reset=True)
            return
        if stream.replay:
            stream.to_relay[:0] = stream.replay
            stream.replay = bytearray()
        link.write_all(json.dumps({"accept": stream.id}).encode() + b"\n")

    def stop_serving(self) -> list[int]:
        """Take no more clients or datagrams (the process they were for has ended).

        Returns the process's descriptor numbers of its listening and UDP
        sockets: their originals are the caller's to close, which frees their
        ports at once, while the streams drain.
        """
        numbers = []
        for stream in [s for s in self.streams.values() if s.kind == "listener"]:
            self._forget(stream.original)
            stream.original = -1  # the caller's descriptor, closed by the caller
            self._close(stream, reset=False)
            numbers.append(int(stream.id.partition(":")[2]))
        for datagram in self.datagrams.values():
            datagram.close()  # its own copy; the original is the caller's too
            numbers.append(int(datagram.id.partition(":")[2]))
        self.datagrams.clear()
        return numbers

    def drained(self) -> bool:
        """Whether everything the process wrote has been passed on to the originals."""
        return all(
            stream.closed
            or stream.kind != "stream"
            or (
                (stream.relay is None or stream.relay.eof)
                and not stream.retiring
                and (not stream.in_held or stream.original < 0)
            )
            for stream in self.streams.values()
        )

    # -- home again -----------------------------------------------------------------

    def _flush_towards_process(self) -> int:
        """Send each relay what we hold for the process, as far as its window allows:
        bytes its node's kernel does not take now would be neither acknowledged nor in
        any socket the mover could copy (`migrating` would fail). The byte count sent."""
        sent = 0
        for stream in list(self.streams.values()):
            relay = stream.relay
            if stream.closed or relay is None:
                continue
            with contextlib.suppress(OSError):  # the event loop meets it again
                if relay.link is not None:
                    sent += self._flush_through_forwarder(stream, relay)
                    continue
                room = window_room(relay.sock)
                if room > 0 and stream.to_relay:
                    moved = relay.sock.send(stream.to_relay[: min(CHUNK, room)])
                    self._took(stream, moved)
                    sent, room = sent + moved, room - moved
                if room > 0 and not stream.to_relay and stream.out_pipe is not None:
                    sent += stream.out_pipe.drain(relay.sock.fileno(), room)
        return sent

    def _flush_through_forwarder(self, stream: Stream, relay: Relay) -> int:
        """An encrypted relay's share of _flush_towards_process: what its node's forwarder
        would hold if the process stopped reading is in no socket either, so only the room
        its last ACK told of, and only once all sent before is acknowledged (that ACK
        counted it all: the room is what the process's socket takes beyond it)."""
        link = relay.link
        assert link is not None
        if relay.unacknowledged() or link.pending:
            return 0
        if not stream.to_relay:
            stream.to_relay += take_all(stream.out_pipe)
        sent = 0
        while relay.room > 0 and stream.to_relay:
            moved = link.send(stream.to_relay[: relay.room])  # (CHUNK at most a call)
            if not moved:
                break  # the rest of the room once our kernel took what TLS made
            self._took(stream, moved)
            relay.room -= moved  # until the ACK for them tells again
            sent += moved
        return sent

    @staticmethod
    def _took(stream: Stream, moved: int) -> None:
        """The relay took `moved` bytes of the head: an accepted client's are kept for a
        replay (up to REPLAY_LIMIT; past it no replay is possible)."""
        if stream.replay is not None:
            if len(stream.replay) + moved <= REPLAY_LIMIT:
                stream.replay += stream.to_relay[:moved]
            else:
                stream.replay, stream.replay_lost = None, True
        del stream.to_relay[:moved]

    def _holding_for_process(self) -> bool:
        return any(s.out_held for s in self.streams.values() if s.relay and not s.closed)

    def hand_back(
        self, move: str, stream_ids: list[str], wait: float, written: dict[str, int] | None = None
    ) -> dict[str, int]:
        """Stop relaying `stream_ids`: the process, frozen at its node, gets their originals
        at home (move `move`); returns each one's original (our descriptor).

        What it wrote goes to the originals first: the caller saw the send
        queues of its relays empty, so a plain relay's bytes are all in our
        receive queues (read until nothing is left), and an encrypted one's
        are on their way through its node's forwarder: `written` says how many
        the process wrote to each (stream id -> bytes), read until they all
        came. All of it is written through within `wait` seconds. Refused,
        nothing changed, if a stream holds bytes for the process (it must have
        read all we sent, no byte of the original may wait in between), cannot
        be written through, or is no stream or listener.
        """
        counts = written or {}
        self._reclaim()
        streams = [self.streams.get(stream_id) for stream_id in stream_ids]
        for stream_id, found in zip(stream_ids, streams, strict=True):
            problem = self._cannot_hand_back(found, counts)
            if problem:
                raise HijackError(f"{stream_id} cannot go back: {problem}")
        chosen = [s for s in streams if s is not None]
        deadline = time.monotonic() + wait
        while True:
            busy = [s.id for s in chosen if s.kind == "stream" and self._write_through(s, counts)]
            if not busy:
                break
            if time.monotonic() >= deadline:
                raise HijackError(f"{', '.join(busy)}: not written through within {wait:g} s")
            time.sleep(0.001)
        for stream in chosen:
            problem = self._cannot_hand_back(stream, counts)
            if problem:  # the original failed meanwhile: it ended where it was
                raise HijackError(f"{stream.id} cannot go back: {problem}")
        for stream in chosen:
            stream.handed = move
            self._forget(stream.original)
            for relay in [r for r in (stream.relay, *stream.retiring) if r is not None]:
                self._forget(relay.sock)
        return {stream.id: stream.original for stream in chosen}

    def _cannot_hand_back(self, stream: Stream | None, written: dict[str, int]) -> str:
        if stream is None or stream.closed:
            return "no such stream"
        if stream.original < 0:
            return "its original has ended"
        if stream.master or self._is_terminal(stream) or stream.kind not in ("stream", "listener"):
            return "a terminal"
        if stream.handed:
            return f"handed back by move {stream.handed} already"
        if stream.kind == "listener":
            return ""
        if stream.relay is None or stream.retiring:
            return RELAYS_CHANGING
        if stream.relay.link is not None and stream.id not in written:
            # Its bytes pass through its node's forwarder: only a count tells they all came.
            return "its relay is encrypted, and the mover did not say what the process wrote"
        unsent, unacknowledged_bytes = stream.out_held, stream.relay.unacknowledged()
        if unsent or unacknowledged_bytes:
            return (
                f"bytes for the process are on their way ({unsent} held here,"
                f" {unacknowledged_bytes} not acknowledged)"
            )
        return ""

    def _write_through(self, stream: Stream, written: dict[str, int]) -> bool:
        """Read the relay, write the original: whether anything of the process is left
        (for an encrypted relay, until the `written` bytes of the process came)."""
        relay = stream.relay
        assert relay is not None
        with contextlib.suppress(BlockingIOError):
            if not relay.eof and stream.in_room():
                self._read_relay(stream, relay)
        try:
            self._flush_original(stream)
        except OSError as exc:
            raise HijackError(f"{stream.id}: {exc}") from None
        if relay.link is not None:
            behind = not relay.eof and relay.received < written.get(stream.id, 0)
        else:
            behind = not relay.eof and _readable(relay.sock) > 0
        return bool(stream.in_held) or behind

    def forget_handed(self, move: str) -> dict[str, int]:
        """The process runs at home with the originals `move` handed back: their relays are
        closed, the originals kept (ours to hold, as for any process attached here);
        returns stream id -> original."""
        handed: dict[str, int] = {}
        self._reclaim()
        for stream in [s for s in self.streams.values() if s.handed == move]:
            handed[stream.id] = stream.original
            stream.original = -1  # not ours to close here
            self._close(stream, reset=False)
            for relay in stream.pending.values():
                relay.sock.close()
            stream.pending.clear()
            self.listeners.pop(stream.id, None)
        return handed

    # -- socket swap (docs/protocol.md, "Socket swap") -------------------------------

    def swap_write(self, stream_id: str, swap: str) -> None:
        """Swap `swap` takes stream `stream_id` off its relay: from now on nothing more
        goes to the process; what it wrote still goes to the original, and what the
        original sends is kept for the direct connection (swap_collect). Refused,
        nothing changed, if it is no plain connected stream."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.native:
            self._reclaim([stream])  # the pump lets go first: the swap counts in Python
        problem = self._cannot_swap(stream)
        if problem or stream is None:
            raise HijackError(f"{stream_id} cannot be swapped: {problem}")
        stream.swapping = swap
        # Both kernel pipes are emptied into their heads: what is kept is counted in
        # to_relay alone, and what the process sent goes on in order — from now on the
        # relay is read into to_original, which is written out before any pipe (with
        # bytes left in the inward pipe, the newer ones would overtake them).
        heads = ((stream.out_pipe, stream.to_relay), (stream.in_pipe, stream.to_original))
        for pipe, head in heads:
            head += take_all(pipe)
            if pipe is not None:
                pipe.close()
        stream.out_pipe = stream.in_pipe = None
        stream.splices = False
        self._log_swap(stream, swap, "taken off its relay")
        self._refresh_interest()

    def _log_swap(self, stream: Stream, swap: str, what: str) -> None:
        """One line per swap step: what it moved each way and holds (an undone swap's
        bytes must go on in order from exactly there)."""
        self.log(
            f"{stream.id}: swap {swap} {what}: {stream.bytes_out} bytes out,"
            f" {stream.bytes_in} in; holds {len(stream.to_relay)} for the process,"
            f" {len(stream.to_original)} for the original"
        )

    def swap_state(self, stream_id: str, swap: str, written: int | None = None) -> dict[str, int]:
        """How far stream `stream_id` is drained: the process's bytes still on their way
        to the original's peer (`towards_peer`), ours to the process not yet in its
        socket (`unacknowledged`), and what we keep for it (`owed`).

        Through an encrypted relay the process's bytes on their way are in its node's
        forwarder and in TLS, in no queue we see: `written`, what the frozen process
        wrote to its socket in all, says how many must have come (as for hand_back).
        Without it such a stream counts 1 byte on its way: it cannot be told drained."""
        stream = self._swapped(stream_id, swap)
        relay = stream.relay
        assert relay is not None
        if relay.link is not None:
            on_the_way = 1 if written is None else max(0, written - relay.received)
        else:
            on_the_way = _readable(relay.sock)
        in_original = unacknowledged_fd(stream.original)
        return {
            "towards_peer": stream.in_held + on_the_way + in_original,
            # Its parts, for a swap that gives up to say where they were.
            "held": stream.in_held,
            "coming": on_the_way,
            "in_original": in_original,
            "unacknowledged": relay.unacknowledged(),
            "owed": len(stream.to_relay),
        }

    def swap_collect(self, stream_id: str, swap: str, *, read: bool = True) -> bytearray:
        """What the process is owed on `stream_id`: what we held for it, then (`read`) the
        original read to its end (the caller saw its peer's send queue empty). Kept
        until swap_retire: swap_resume sends it on."""
        stream = self._swapped(stream_id, swap)
        while read:
            try:
                data = os.read(stream.original, CHUNK)
            except BlockingIOError:
                break
            except OSError as exc:
                raise HijackError(f"{stream_id}: {exc}") from None
            if not data:
                raise HijackError(f"{stream_id}: its peer ended it meanwhile")
            stream.to_relay += data
            stream.bytes_out += len(data)
        return stream.to_relay  # not copied: read in pieces

    def swap_resume(self, stream_id: str, swap: str) -> None:
        """The swap failed: relay the stream on as before (what we kept goes first)."""
        stream = self.streams.get(stream_id)
        if stream is not None and stream.swapping == swap:
            self._log_swap(stream, swap, "undone, relayed on")
            stream.swapping = ""
            stream.splices = None
            if stream.relay_lost:  # its process's socket is gone: the stream ends
                self.log(f"{stream.id}: {stream.relay_lost}; closing it")
                self._close(stream, reset=True)
            self._refresh_interest()

    def swap_retire(self, stream_id: str, swap: str) -> int:
        """Both ends hold the direct connection: close the stream's relay and original.
        Returns the original (our descriptor, closed now)."""
        # Its original may have ended meanwhile: the other end's shadow retired (reset)
        # its own first, once both ends were live on the direct connection.
        stream = self._swapped(stream_id, swap, ended=True)
        self._log_swap(stream, swap, "done, retired")
        original = stream.original
        ends = _original_ends(stream)
        self._close(stream, reset=True)
        self.swapped.append(
            {"id": stream.id, "original": ends, "bytes_out": stream.bytes_out,
             "bytes_in": stream.bytes_in, "swap": swap}
        )  # fmt: skip
        return original

    def _swapped(self, stream_id: str, swap: str, *, ended: bool = False) -> Stream:
        stream = self.streams.get(stream_id)
        if stream is None or stream.closed or stream.swapping != swap or stream.relay is None:
            raise HijackError(f"{stream_id} is not being swapped by {swap}")
        if stream.original < 0 and not ended:
            raise HijackError(f"{stream_id}: its original has ended")
        return stream

    def _cannot_swap(self, stream: Stream | None) -> str:
        if stream is None or stream.closed:
            return "no such stream"
        if stream.kind != "stream" or stream.master or self._is_terminal(stream):
            return "not a connection"
        if stream.handed or stream.swapping:
            return f"taken by {stream.handed or stream.swapping} already"
        if stream.original < 0 or stream.original_eof or stream.shut_original:
            return "its original has ended"
        if stream.relay is None or stream.retiring or stream.relay.eof:
            return RELAYS_CHANGING
        if _socket_copy(stream.original) is None:
            return "not a socket"
        return ""

    # -- reporting ------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        rows = []
        for stream in self.streams.values():
            if stream.closed:
                continue
            relay = stream.relay
            bytes_out, bytes_in, out_held, in_held = self._native_counts(stream)
            rows.append(
                {
                    "id": stream.id,
                    "kind": stream.kind,
                    "relay": relay.node_end if relay else "",
                    "shadow_end": relay.shadow_end if relay else "",
                    "node_host": relay.node_host if relay else "",
                    "listener": self.listeners.get(stream.id, ""),
                    "terminal": relay.terminal if relay else "",
                    "bytes_out": bytes_out,
                    "bytes_in": bytes_in,
                    "buffered_out": out_held,
                    "buffered_in": in_held,
                    "original": _original_ends(stream),
                }
            )
        rows.extend(datagram.describe() for datagram in self.datagrams.values())
        self._deliver_deferred()
        return rows


def _frames(reader: FrameReader, data: bytes, stream: Stream) -> list[tuple[int, bytes]]:
    """The frames `data` completes; a broken peer ends this stream (_on_event)."""
    try:
        return reader.feed(data)
    except HijackError as exc:
        raise ConnectionError(f"{stream.id}: {exc}") from None


def _original_ends(stream: Stream) -> list[str]:
    """[ours, its peer] ("ip:port") of a stream's original connection, or [] (a pipe, a
    listener, ended): what a socket swap matches the other end of the connection by."""
    if stream.kind != "stream" or stream.original < 0:
        return []
    sock = _socket_copy(stream.original)
    if sock is None:
        return []
    with sock, contextlib.suppress(OSError):
        if sock.type == socket.SOCK_STREAM and sock.family != socket.AF_UNIX:
            return [endpoint(sock.getsockname()), endpoint(sock.getpeername())]
    return []


def unacknowledged_fd(fd: int) -> int:
    """Bytes in the send queue of socket `fd`."""
    value: int = struct.unpack("<i", fcntl.ioctl(fd, SIOCOUTQ, b"\0" * 4))[0]
    return value


def _socket_copy(fd: int) -> socket.socket | None:
    """A socket object on a duplicate of `fd`, or None if `fd` is no socket (a pipe)."""
    duplicate = os.dup(fd)
    try:
        return socket.socket(fileno=duplicate)
    except OSError:
        os.close(duplicate)  # socket() does not close what it refused: the pipe stays open
        return None


def _readable(sock: socket.socket) -> int:
    """Bytes waiting in `sock`'s receive queue (FIONREAD)."""
    value = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", value)[0])


def decode_unread(encoded: dict[str, str]) -> dict[str, bytes]:
    return {stream: base64.b64decode(data) for stream, data in encoded.items()}


def decode_unread_datagrams(
    encoded: dict[str, list[list[str]]],
) -> dict[str, list[tuple[str, bytes]]]:
    return {
        stream: [(source, base64.b64decode(data)) for source, data in datagrams]
        for stream, datagrams in encoded.items()
    }
