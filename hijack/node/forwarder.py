"""The node's end of an encrypted relay: TLS to the home shadow, a plain socket to the process.

The process is not modified: the descriptor it holds for a relayed stream
must be a plain TCP socket. Between nodes the relay is encrypted, so the
daemon gives it one end of a loopback TCP connection whose other end a
*forwarder* here holds, and the forwarder carries the bytes between that
socket and the TLS connection to the shadow (hijack.shadow.relay_link).

What a move needs of a relay (hijack.shadow.relay, `migrating`) is that the
shadow knows when every byte it sent is in the process's socket, so that a
mover copies them from there: over a plain relay TCP's acknowledgements say
so. Here TCP's say only that the forwarder's kernel has them, so the node ->
shadow direction is framed and carries the forwarder's own acknowledgements:

    frame ::= KIND:u8 LENGTH:u32 PAYLOAD
    KIND  ::= 1 DATA (the process's bytes) | 3 ACK (u64: bytes now in the
              process's socket, in all; u32: the room left there) | 4 END (the
              process finished writing)

An ACK is sent once the bytes written to the loopback socket are
acknowledged there (SIOCOUTQ 0: they are in the process's receive queue),
and once as the relay starts (0 bytes). Its room (the window the process's
socket advertises then, less what waits here for it; 0 where the kernel
does not tell) is what the shadow may send more that the process's socket
surely takes, reading or not: a move home sends only that much (hijack.shadow.relay).
Only the latest count matters: an ACK goes ahead of the DATA frames waiting
here (between two frames), so a move waits for no more than that. The
process's answer to what it was sent usually brings TCP's acknowledgement of
it: the ACK then leaves with the answer's DATA, in one write to the shadow.
shadow -> node stays raw (inside TLS); its end is the TLS connection's end.

A listener of the process is relayed the same way round (the node connects,
the shadow never does): the process gets a listener on 127.0.0.1 that drops
every packet without this node's mark (SO_MARK, which only CAP_NET_ADMIN may
set: socket_filter.only_marked), and a *listener link* to the shadow. For
each client the shadow accepts, it sends {"accept": "acc:K"} on the link; the
forwarder connects to the process's listener (marked) and opens an encrypted
relay for acc:K. Nobody else can reach that listener: not from the network
(loopback) and not from this node (unmarked).

A UDP socket of the process is forwarded as a *datagram link*
(hijack.shadow.datagram_link): the forwarder makes the process's UDP socket,
opens the link, and stands for each of the shadow's peer relays with a UDP
socket of its own here, so no datagram crosses between hosts in clear.

Past its opening exchange a relay's records are the forwarder's own (TlsLink.own_records:
the secrets from OpenSSL's key log) and the relay goes to the native pump
(hijack/native/relay_pump.c, OP_ADD_FORWARD), which frames, seals, opens and
acknowledges as this loop does, in C; at an end, a failure or a record it does
not carry (an alert, a KeyUpdate) it gives the relay back with everything it
held, and this loop carries it on. HIJACK_FORWARDER_PUMP=0 keeps every relay here.

The forwarder is a process of its own (`python -m hijack.node.forwarder`),
started by the daemon at its first encrypted relay and asked over a unix
socketpair for each relay or listener link (the process's end comes back as
SCM_RIGHTS; a move's streams in one `relays` request, made side by side, every
end in one answer; `prove` has it connect to a home shadow ahead of a freeze,
control.LinksAhead): a migrant's relays outlive a daemon that dies or restarts, as
plain relays do. Once the daemon is gone it ends with the last relay it
carries; a daemon started again starts a forwarder of its own.
"""

from __future__ import annotations

import contextlib
import encodings.idna  # noqa: F401  # now: a first getaddrinfo() would, in a freeze (~50 ms)
import fcntl
import json
import os
import selectors
import signal
import socket
import ssl
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from hijack.errors import HijackError
from hijack.node.terminal import DATA, FRAME, FrameReader
from hijack.node.terminal import frame as make_frame
from hijack.shadow import control
from hijack.shadow import pump as native
from hijack.shadow.datagram import widen_receive_buffer
from hijack.shadow.datagram_link import DatagramLink, StandIns
from hijack.shadow.pump import SplicePipe, take_all
from hijack.shadow.relay_link import (
    ENCRYPTED,
    RELAY_HEAP,
    TlsLink,
    keep_node_secrets,
    node_context,
)
from hijack.shadow.tls_records import KeyLog
from hijack.sys import libc
from hijack.sys.socket_filter import SO_MARK, attach_filter, only_marked

ACK, END = 3, 4
FORWARDED_KINDS = (DATA, ACK, END)
ACK_FORMAT = struct.Struct("<Q")  # bytes in the process's socket, in all
ROOM_FORMAT = struct.Struct("<I")  # after it: room left there (older forwarders send none)
TCPI_SND_WND = 228  # offset of tcpi_snd_wnd in struct tcp_info (<linux/tcp.h>, Linux 6.2)
CHUNK = 256 * 1024 - FRAME.size  # a DATA frame fits what TlsLink.send takes at once
LIMIT = 4 * 1024 * 1024  # bytes held per direction before we stop reading
ACK_POLL = 0.005  # seconds between looks at a process socket that has not taken all yet
# Seconds an ACK waits after a write to the process for its answer, which brings TCP's
# acknowledgement and takes our ACK along (one write, one segment, one wakeup of the
# shadow for both); a move waits that much longer for the last one, at most.
ACK_DELAY = 0.002
# Relays one request makes side by side (a move's streams, made while it is frozen): their
# round trips with the shadow overlap (their handshakes, if not proved ahead, are CPU).
RELAYS_AT_ONCE = 8
# Relays one answer hands back (control.MAX_FDS, less room to spare); more take more requests.
RELAYS_PER_REQUEST = 200
# Relays go through the native pump once their records are ours, unless HIJACK_FORWARDER_PUMP=0.
PUMPED = os.environ.get("HIJACK_FORWARDER_PUMP", "1") != "0"
LISTENER_MARK = 0x484A4B52  # "HJKR": the mark of the forwarder's connections to a listener
ACCEPTED = "accepted"  # the move id of an accepted client's relay


def frames() -> FrameReader:
    """A reader for the node -> shadow direction of a forwarded relay."""
    return FrameReader(FORWARDED_KINDS, "forwarded relay")


def endpoint(address: tuple[object, ...]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def loopback_pair() -> tuple[socket.socket, socket.socket]:
    """(the process's end, the forwarder's end) of a new loopback TCP connection."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        process_end = socket.create_connection(listener.getsockname()[:2])
        forwarder_end, _ = listener.accept()
    for sock in (process_end, forwarder_end):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return process_end, forwarder_end


def unacknowledged(sock: socket.socket) -> int:
    value = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", value)[0])


def window(sock: socket.socket) -> int:
    """The receive window the peer of `sock` advertises (0 where the kernel does not tell)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCPI_SND_WND + 4)
    if len(info) < TCPI_SND_WND + 4:
        return 0
    return int(struct.unpack_from("<I", info, TCPI_SND_WND)[0])


def closed_listener(backlog: int) -> socket.socket:
    """The process's listener here: on loopback, and only marked packets get in."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        attach_filter(sock.fileno(), only_marked(LISTENER_MARK))
        sock.bind(("127.0.0.1", 0))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(eq=False)
class _Pair:
    link: TlsLink
    local: socket.socket  # our end of the loopback connection
    to_local: bytearray = field(default_factory=bytearray)  # from the shadow, not yet written
    to_link: bytearray = field(default_factory=bytearray)  # frames not yet handed to TLS
    # The latest ACK, not yet handed to TLS: it goes before the next frame of to_link (a
    # count in all, so it replaces one that waited), not behind megabytes of DATA.
    ack: bytes = b""
    cut: int = 0  # bytes left of to_link's first frame, TLS having taken its start
    delivered: int = 0  # bytes written to the local socket, in all
    written_at: float = 0.0  # time.monotonic() of the last write to it
    acked: int = 0  # what our last ACK said
    local_eof: bool = False
    shut_local: bool = False
    closed: bool = False
    native: int = 0  # its number at the native pump while the pump carries it, else 0
    native_over: bool = False  # given back by the pump: carried here for the rest of its life
    pipes: tuple[SplicePipe, ...] = ()  # the pump's: out (ciphertext), in (plaintext)


@dataclass(eq=False)
class _ListenerLink:
    link: TlsLink
    listener: str  # "127.0.0.1:port" of the process's listener
    home: control.HomeEndpoint
    lines: bytearray = field(default_factory=bytearray)


def side_by_side(
    make: Callable[[str], socket.socket], streams: Sequence[str]
) -> list[socket.socket]:
    """make() of each of `streams`, RELAYS_AT_ONCE at a time, in their order. If one
    fails, those made are closed (the shadow sees them end, as when a later relay of a
    move fails) and its error raised."""
    with ThreadPoolExecutor(min(RELAYS_AT_ONCE, len(streams))) as pool:
        futures = [pool.submit(make, stream) for stream in streams]
    made = [future.result() for future in futures if future.exception() is None]
    for future in futures:
        failed = future.exception()
        if failed is not None:
            for sock in made:
                sock.close()
            raise failed
    return made


class Forwarder:
    """Every forwarded relay and listener link of this node, pumped by one thread."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.selector = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.added: list[_Pair | _ListenerLink | StandIns] = []
        self.pairs: set[_Pair] = set()
        self.links: set[_ListenerLink] = set()
        self.tunnels: set[StandIns] = set()  # datagram links (hijack.shadow.datagram_link)
        self.wake_read, self.wake_write = socket.socketpair()
        self.wake_read.setblocking(False)
        self.selector.register(self.wake_read, selectors.EVENT_READ, None)
        self.thread: threading.Thread | None = None
        # The native pump, started at the first relay it can take (hijack.shadow.pump).
        self.secrets: KeyLog | None = keep_node_secrets() if PUMPED else None
        self.pump: native.NativePump | None = None
        self.pump_failed = False
        self.native: dict[int, _Pair] = {}  # the pump's number -> relay
        self.native_count = 0

    # -- what the daemon asks ---------------------------------------------------------

    def relay(
        self, home: control.HomeEndpoint, stream: str, move: str, terminal: str = ""
    ) -> socket.socket:
        """An encrypted relay for `stream`: the plain socket the process (or a pump) holds."""
        process_end, ours = loopback_pair()
        try:
            header = {
                "kind": "relay",
                "stream": stream,
                "move": move,
                "mode": ENCRYPTED,
                "ends": [endpoint(process_end.getsockname()), endpoint(ours.getsockname())],
            }
            if terminal:
                header["terminal"] = terminal
            link = control.open_link(home, header)
        except BaseException:
            process_end.close()
            ours.close()
            raise
        self._add(_Pair(link, ours))
        return process_end

    def relays(
        self, home: control.HomeEndpoint, streams: Sequence[str], move: str
    ) -> list[socket.socket]:
        """relay() of each of `streams`, made side by side (their handshakes' round trips
        overlap: a move makes them while its process is frozen), in their order. If one
        fails, those made are closed (the shadow sees them end, as when a later relay of
        a move fails) and its error raised."""
        if len(streams) < 2:
            return [self.relay(home, stream, move) for stream in streams]
        return side_by_side(lambda stream: self.relay(home, stream, move), streams)

    def listen(
        self, home: control.HomeEndpoint, stream: str, move: str, listener: str
    ) -> socket.socket:
        """Connect the shadow's clients of listener `stream` to the process's `listener`;
        returns the link's socket (shut down: the forwarder lets go of it)."""
        header = {"kind": "listener", "stream": stream, "move": move, "listener": listener}
        link = control.open_link(home, header)
        self._add(_ListenerLink(link, listener, home))
        return link.sock

    def datagrams(
        self, home: control.HomeEndpoint, stream: str, move: str, family: int, here: str, peer: int
    ) -> socket.socket:
        """An encrypted datagram link for UDP stream `stream`: the process's UDP socket, on
        `here` (connected to the stand-in of the shadow's relay port `peer`, if not 0)."""
        mapped = "::ffff:" if family == socket.AF_INET6 else ""
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            widen_receive_buffer(sock)
            sock.bind((mapped + here, 0))
            port = int(sock.getsockname()[1])
            header = {
                "kind": "datagrams",
                "stream": stream,
                "move": move,
                "mode": ENCRYPTED,
                "process": f"{here}:{port}",
            }
            tunnel = StandIns(DatagramLink(control.open_link(home, header)), here, (here, port))
        except BaseException:
            sock.close()
            raise
        try:
            if peer:
                sock.connect((mapped + here, tunnel.stand_in(peer).getsockname()[1]))
        except BaseException:
            tunnel.close()
            sock.close()
            raise
        self._add(tunnel)
        return sock

    def _add(self, item: _Pair | _ListenerLink | StandIns) -> None:
        with self.lock:
            self.added.append(item)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="forwarder", daemon=True)
                self.thread.start()
        self.wake_write.send(b"\0")

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            # Only these may have changed: the relays an event came for, and those
            # whose process has not acknowledged all yet (a look at each per ACK_POLL).
            touched = {p for p in self.pairs if p.delivered > p.acked and not p.native}
            now = time.monotonic()
            fresh = any(now - pair.written_at < ACK_DELAY for pair in touched)
            timeout = (ACK_DELAY if fresh else ACK_POLL) if touched else None
            for key, events in self.selector.select(timeout):
                if key.data is None:
                    self._take_added()
                    continue
                if key.data == "pump":
                    touched |= self._on_pump()
                    continue
                item, role = key.data
                if isinstance(item, _Pair):
                    touched.add(item)
                try:
                    if isinstance(item, _ListenerLink):
                        self._on_listener_link(item)
                    elif isinstance(item, StandIns):
                        self._on_tunnel(item, role, events)
                    else:
                        self._on_pair(item, role, events)
                except (OSError, HijackError, ValueError, TypeError) as exc:
                    # One relay's failure (a reset, a broken peer): the others go on.
                    self.log(f"forwarded relay: {exc}; closing it")
                    self._close(item, reset=True)
            for pair in touched:
                if not pair.closed:
                    self._acknowledge(pair)
                    self._finish_if_done(pair)
                if not pair.closed:
                    self._watch(pair)

    def _take_added(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self.wake_read.recv(4096)
        with self.lock:
            added, self.added = self.added, []
        for item in added:
            item.link.sock.setblocking(False)
            if isinstance(item, _ListenerLink):
                self.links.add(item)
                self.selector.register(item.link.sock, selectors.EVENT_READ, (item, "link"))
            elif isinstance(item, StandIns):
                self.tunnels.add(item)
                for port, stand_in in item.by_port.items():
                    self.selector.register(stand_in, selectors.EVENT_READ, (item, port))
                self._watch_tunnel(item)
            else:
                item.local.setblocking(False)
                self.pairs.add(item)
                self._send_ack(item)  # the room there, before any byte
                if not item.closed and not self._offer_native(item):
                    self._watch(item)

    def _watch(self, pair: _Pair) -> None:
        link_events = 0
        if not pair.link.eof and len(pair.to_local) < LIMIT:
            link_events |= selectors.EVENT_READ
        if pair.link.pending or pair.to_link or pair.ack:
            link_events |= selectors.EVENT_WRITE
        local_events = 0
        if not pair.local_eof and len(pair.to_link) < LIMIT:
            local_events |= selectors.EVENT_READ
        if pair.to_local:
            local_events |= selectors.EVENT_WRITE
        for sock, events, role in (
            (pair.link.sock, link_events, "link"),
            (pair.local, local_events, "local"),
        ):
            try:
                key = self.selector.get_key(sock)
            except KeyError:
                key = None
            if not events:
                if key is not None:
                    self.selector.unregister(sock)
            elif key is None:
                self.selector.register(sock, events, (pair, role))
            elif key.events != events:
                self.selector.modify(sock, events, (pair, role))

    def _on_pair(self, pair: _Pair, role: str, events: int) -> None:
        if pair.closed:
            return
        if role == "link" and events & selectors.EVENT_READ:
            with contextlib.suppress(BlockingIOError):
                pair.to_local += pair.link.recv()
        if role == "local" and events & selectors.EVENT_READ:
            try:
                data = pair.local.recv(CHUNK)
            except BlockingIOError:
                data = None
            if data == b"":
                pair.local_eof = True
                pair.to_link += make_frame(END, b"")
            elif data:
                if self._acknowledged(pair):  # the answer brought TCP's ACK: ours goes with it
                    pair.ack = self._ack_frame(pair)
                pair.to_link += make_frame(DATA, data)
        self._flush(pair)

    def _flush(self, pair: _Pair) -> None:
        # A frame at a time (TLS takes one whole, or none while earlier ones wait for the
        # kernel), so that between two an ACK can go first; the records wait for one
        # flush, so an ACK and the DATA behind it leave in one write.
        while True:
            if pair.ack and not pair.cut:
                if not pair.link.send(pair.ack, flush=False):
                    break
                pair.ack = b""
            if not pair.to_link:
                break
            size = pair.cut or FRAME.size + FRAME.unpack_from(pair.to_link)[1]
            taken = pair.link.send(pair.to_link[:size], flush=False)
            if not taken:
                break
            del pair.to_link[:taken]
            pair.cut = size - taken
        pair.link.flush()
        if pair.to_local:
            try:
                written = pair.local.send(pair.to_local)
            except BlockingIOError:
                written = 0
            del pair.to_local[:written]
            pair.delivered += written
            if written:
                pair.written_at = time.monotonic()
        if pair.link.eof and not pair.to_local and not pair.shut_local:
            pair.shut_local = True  # the shadow's end: the process reads its end
            with contextlib.suppress(OSError):
                pair.local.shutdown(socket.SHUT_WR)

    def _acknowledged(self, pair: _Pair) -> bool:
        """Whether the process's socket acknowledged what it was written since our last
        ACK (then counted as acknowledged: the caller sends the ACK)."""
        if pair.delivered > pair.acked and not unacknowledged(pair.local):
            pair.acked = pair.delivered
            return True
        return False

    def _acknowledge(self, pair: _Pair) -> None:
        if time.monotonic() - pair.written_at < ACK_DELAY:
            return  # its answer may come and take the ACK along (_on_pair)
        if self._acknowledged(pair):
            self._send_ack(pair)

    def _ack_frame(self, pair: _Pair) -> bytes:
        room = max(0, window(pair.local) - unacknowledged(pair.local) - len(pair.to_local))
        body = ACK_FORMAT.pack(pair.acked) + ROOM_FORMAT.pack(min(room, 0xFFFFFFFF))
        return make_frame(ACK, body)

    def _send_ack(self, pair: _Pair) -> None:
        try:
            pair.ack = self._ack_frame(pair)
            self._flush(pair)
        except OSError as exc:
            self.log(f"forwarded relay: {exc}; closing it")
            self._close(pair, reset=True)

    def _finish_if_done(self, pair: _Pair) -> None:
        sent_all = pair.local_eof and not (pair.to_link or pair.ack or pair.link.pending)
        if sent_all and pair.link.eof and not pair.to_local:
            self._close(pair, reset=False)

    # -- the native pump (hijack.shadow.pump) ----------------------------------------------

    def _offer_native(self, pair: _Pair) -> bool:
        """Hand `pair` to the pump if it can take it (its records ours, at a boundary both
        ways, nothing held here either way): whether it did."""
        link = pair.link
        if self.secrets is None or self.pump_failed or not native.available():
            return False
        if not link.own_records(self.secrets) or link.records is None:
            return False
        records = link.records
        if records.partial or records.replies or records.closed or link.pending or link.eof:
            return False
        if pair.to_local or pair.to_link or pair.ack or pair.cut:
            return False
        if pair.local_eof or pair.shut_local or pair.closed or pair.native_over:
            return False
        pipes: list[SplicePipe] = []
        try:
            pipes.append(SplicePipe(None))  # out: as the kernel makes it
            pipes.append(SplicePipe(LIMIT))  # in: as much as we would hold
            if self.pump is None:
                self.pump = native.NativePump(self.log)
                self.selector.register(self.pump, selectors.EVENT_READ, "pump")
            self.native_count += 1
            keys = native.TlsKeys(
                records.writing.key,
                records.writing.iv,
                records.writing.sequence,
                records.reading.key,
                records.reading.iv,
                records.reading.sequence,
            )
            ends = [end for pipe in pipes for end in (pipe.read_end, pipe.write_end)]
            fds = [pair.local.fileno(), link.sock.fileno(), *ends]
            self.pump.add_forward(self.native_count, fds, keys, pair.delivered, pair.acked)
        except (OSError, HijackError) as exc:
            for pipe in pipes:
                pipe.close()
            self._pump_lost(f"cannot use the native relay pump: {exc}")
            return False
        pair.native, pair.pipes = self.native_count, tuple(pipes)
        self.native[pair.native] = pair
        return True

    def _on_pump(self) -> set[_Pair]:
        """The pump gave relays back (an end, a failure, a record it does not carry): they
        are carried here from now on; the ones to look at again."""
        assert self.pump is not None
        try:
            reports = self.pump.reports()
        except HijackError as exc:
            self._pump_lost(str(exc))
            return set()
        taken = set()
        for report in reports:
            pair = self.native.pop(report.id, None)
            if pair is not None:
                self._take_back(pair, report)
                taken.add(pair)
        if not self.native:  # it carries nothing: it ends (the next relay starts one again)
            self._stop_pump()
        return taken

    def _take_back(self, pair: _Pair, report: native.Report) -> None:
        """What the pump hands back of `pair`: the record numbers, the ciphertext it sealed
        and did not send (sent first), what it read and did not open, the bytes the
        process's socket has not taken (written to it first), the counts."""
        link, returned = pair.link, report.tls
        pair.native, pair.native_over = 0, True
        out_pipe, in_pipe = pair.pipes
        try:
            link.pending += take_all(out_pipe)
            pair.to_local += take_all(in_pipe)
        finally:
            for pipe in pair.pipes:
                pipe.close()
            pair.pipes = ()
        pair.written_at = time.monotonic()
        if returned is None or link.records is None:  # not an encrypted report: a broken pump
            self.log("forwarded relay: the native pump gave it back without its records")
            self._close(pair, reset=True)
            return
        pair.to_local += returned.frames  # what the pipe did not take, after what it holds
        pair.delivered += report.bytes_in - report.in_held - len(returned.frames)
        link.records.writing.sequence = returned.out_sequence
        link.records.reading.sequence = returned.in_sequence
        pair.acked = returned.acked
        try:
            pair.to_local += link.reopen(returned.ciphertext)
            if report.reason in (native.ORIGINAL_ERROR, native.RELAY_ERROR):
                raise OSError(report.err, os.strerror(report.err))
        except (OSError, HijackError, ssl.SSLError) as exc:
            self.log(f"forwarded relay: {exc}; closing it")
            self._close(pair, reset=True)
            return
        # An end is read again by the loop (a socket's end stays readable); what is held
        # goes on as ever.
        self._flush(pair)

    def _pump_lost(self, why: str) -> None:
        """The pump failed: its relays' record numbers went with it, TLS cannot go on: they
        are reset (the shadow sees them fail); new relays stay here."""
        self.log(f"{why}; forwarding in Python")
        self.pump_failed = True
        for pair in list(self.native.values()):
            self.log("forwarded relay: carried by the native pump; resetting it")
            for pipe in pair.pipes:
                pipe.close()
            pair.pipes, pair.native = (), 0
            self._close(pair, reset=True)
        self.native.clear()
        self._stop_pump()

    def _stop_pump(self) -> None:
        if self.pump is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(self.pump)
            self.pump.close()
            self.pump = None

    def _close(self, item: _Pair | _ListenerLink | StandIns, *, reset: bool) -> None:
        if isinstance(item, StandIns):
            self._close_tunnel(item)
            return
        socks = [item.link.sock] + ([item.local] if isinstance(item, _Pair) else [])
        for sock in socks:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(sock)
            if reset:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        if isinstance(item, _Pair):
            item.closed = True
            self.pairs.discard(item)
        else:
            self.links.discard(item)

    def idle(self) -> bool:
        """Whether it carries nothing (no relay, no listener link)."""
        with self.lock:
            return not (self.added or self.pairs or self.links or self.tunnels)

    # -- datagram links -------------------------------------------------------------------

    def _on_tunnel(self, item: StandIns, role: object, events: int) -> None:
        if item.closed:
            return
        if role == "link":
            if events & selectors.EVENT_WRITE:
                item.link.flush()
            if events & selectors.EVENT_READ:
                for gone in item.from_shadow():
                    with contextlib.suppress(KeyError, ValueError):
                        self.selector.unregister(gone)
                    gone.close()
                for port, stand_in in item.by_port.items():  # the ones just made
                    try:
                        self.selector.get_key(stand_in)
                    except KeyError:
                        self.selector.register(stand_in, selectors.EVENT_READ, (item, port))
            if item.link.eof:  # the shadow is done with it (the process moved on, or ended)
                self._close_tunnel(item)
                return
        elif isinstance(role, int):
            item.from_process(role)
        self._watch_tunnel(item)

    def _watch_tunnel(self, item: StandIns) -> None:
        events = item.link.events()
        try:
            key = self.selector.get_key(item.link.sock)
        except KeyError:
            key = None
        if not events:
            if key is not None:
                self.selector.unregister(item.link.sock)
        elif key is None:
            self.selector.register(item.link.sock, events, (item, "link"))
        elif key.events != events:
            self.selector.modify(item.link.sock, events, (item, "link"))

    def _close_tunnel(self, item: StandIns) -> None:
        for sock in [item.link.sock, *item.by_port.values()]:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(sock)
        item.close()
        self.tunnels.discard(item)

    # -- listener links -----------------------------------------------------------------

    def _on_listener_link(self, item: _ListenerLink) -> None:
        try:
            item.lines += item.link.recv()
        except BlockingIOError:
            return
        if item.link.eof:  # the shadow is done with this listener (moved on, released)
            self._close(item, reset=False)
            return
        while b"\n" in item.lines:
            line, _, rest = bytes(item.lines).partition(b"\n")
            item.lines = bytearray(rest)
            stream = dict(json.loads(line)).get("accept")
            if isinstance(stream, str):
                threading.Thread(
                    target=self._connect_client, args=(item, stream), daemon=True
                ).start()

    def _connect_client(self, item: _ListenerLink, stream: str) -> None:
        """Connect the shadow's client `stream` to the process's listener, through a relay."""
        host, _, port = item.listener.rpartition(":")
        local = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            local.setsockopt(socket.SOL_SOCKET, SO_MARK, LISTENER_MARK)
            local.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            local.settimeout(5.0)
            local.connect((host, int(port)))
            header = {
                "kind": "relay",
                "stream": stream,
                "move": ACCEPTED,
                "mode": ENCRYPTED,
                "ends": [item.listener, endpoint(local.getsockname())],
            }
            link = control.open_link(item.home, header)
        except (OSError, HijackError) as exc:
            local.close()
            self.log(f"cannot connect client {stream} to the process's listener: {exc}")
            return
        self._add(_Pair(link, local))


# -- the forwarder as a process of its own, and the daemon's handle on it ---------------

IDLE_POLL = 0.2  # seconds between looks at a forwarder whose daemon is gone
STOP_WAIT = 10.0  # seconds a stopping daemon waits for its idle forwarder to end


def _home_fields(home: control.HomeEndpoint) -> dict[str, str]:
    return {"address": home.address, "token": home.token.hex(), "certificate": home.fingerprint}


def _home_of(fields: dict[str, str]) -> control.HomeEndpoint:
    return control.HomeEndpoint(
        str(fields["address"]), bytes.fromhex(str(fields["token"])), str(fields["certificate"])
    )


class ForwarderProcess:
    """The daemon's side: the same requests as Forwarder, answered by its process."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None
        self.process: subprocess.Popen[bytes] | None = None  # the last one started

    def _start(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "hijack.node.forwarder", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.process = process
        # Reaped here while we run; once we are gone, by whoever adopts it.
        threading.Thread(target=process.wait, name="forwarder-reaper", daemon=True).start()
        self.log(f"forwarder {process.pid} started")
        return ours

    def start(self) -> None:
        """Start the process now, not during a move's freeze (Python takes a while to start)."""
        with self.lock:
            if self.sock is None:
                self.sock = self._start()

    def stop(self) -> None:
        """The daemon is stopping: a forwarder carrying nothing ends with it, now.

        One carrying relays goes on until its last one ends; one that carries
        nothing would end by itself once it sees the daemon gone, but it may
        still be starting (importing): it is asked, and waited for, so that a
        stopped daemon leaves no process behind.
        """
        with self.lock:
            sock, process, self.sock = self.sock, self.process, None
            if sock is None or process is None:
                return
            try:
                sock.settimeout(STOP_WAIT)
                sock.sendall(control.encode({"op": "bye"}))
                answer, fds = control.receive(sock)
            except (OSError, HijackError):
                return  # gone already, or stuck: it is its own process
            finally:
                sock.close()
            for fd in fds:
                os.close(fd)
            if answer.get("idle"):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(STOP_WAIT)

    def _ask(self, request: dict[str, object]) -> socket.socket:
        return self._ask_many(request, 1)[0]

    def _ask_many(self, request: dict[str, object], count: int) -> list[socket.socket]:
        """`request` answered with `count` descriptors."""
        with self.lock:
            if self.sock is None:
                self.sock = self._start()
            try:
                self.sock.sendall(control.encode(request))
                answer, fds = control.receive(self.sock)
            except (OSError, HijackError) as exc:
                self.sock.close()
                self.sock = None  # the next move starts another
                raise HijackError(f"the node's relay forwarder failed: {exc}") from None
        if not answer.get("ok") or len(fds) != count:
            for fd in fds:
                os.close(fd)
            raise HijackError(str(answer.get("error", "the node's relay forwarder refused")))
        return [socket.socket(fileno=fd) for fd in fds]

    def relay(
        self, home: control.HomeEndpoint, stream: str, move: str, terminal: str = ""
    ) -> socket.socket:
        request = {"op": "relay", "home": _home_fields(home), "stream": stream, "move": move}
        return self._ask({**request, "terminal": terminal})

    def relays(
        self, home: control.HomeEndpoint, streams: Sequence[str], move: str
    ) -> list[socket.socket]:
        """relay() of each of `streams`, in their order, made side by side by the forwarder
        (Forwarder.relays); on an error those made are closed."""
        made: list[socket.socket] = []
        try:
            for first in range(0, len(streams), RELAYS_PER_REQUEST):
                batch = list(streams[first : first + RELAYS_PER_REQUEST])
                request = {"op": "relays", "home": _home_fields(home), "move": move}
                made += self._ask_many({**request, "streams": batch}, len(batch))
        except BaseException:
            for sock in made:
                sock.close()
            raise
        return made

    def prove(self, home: control.HomeEndpoint, count: int) -> None:
        """Have the forwarder prove `count` links to `home` ahead (control.LinksAhead)."""
        self._ask_many({"op": "prove", "home": _home_fields(home), "count": count}, 0)

    def listen(
        self, home: control.HomeEndpoint, stream: str, move: str, listener: str
    ) -> socket.socket:
        request = {"op": "listen", "home": _home_fields(home), "stream": stream, "move": move}
        return self._ask({**request, "listener": listener})

    def datagrams(
        self, home: control.HomeEndpoint, stream: str, move: str, family: int, here: str, peer: int
    ) -> socket.socket:
        request = {"op": "datagrams", "home": _home_fields(home), "stream": stream, "move": move}
        return self._ask({**request, "family": family, "here": here, "peer": peer})


def serve(channel: socket.socket) -> None:
    """The forwarder process: answer the daemon until it is gone, then carry on until idle."""

    def log(text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        print(f"{stamp} forwarder {os.getpid()}: {text}", file=sys.stderr, flush=True)

    forwarder = Forwarder(log)
    # Warmed up before the first request, which comes while a process is frozen: the
    # node's TLS context (loading its certificate imports `cryptography`: ~0.1 s).
    with contextlib.suppress(HijackError, OSError):  # the first relay says what is wrong
        node_context()
    while True:
        try:
            request, fds = control.receive(channel)
        except (OSError, HijackError):
            break  # the daemon is gone
        for fd in fds:
            os.close(fd)
        if request.get("op") == "bye":  # the daemon is stopping
            with contextlib.suppress(OSError):
                channel.sendall(control.encode({"ok": True, "idle": forwarder.idle()}))
            break
        try:
            home = _home_of(dict(request["home"]))
            if request.get("op") == "prove":  # a move's freeze comes: its relays' links
                control.LINKS_AHEAD.prove(home, int(request["count"]))
                channel.sendall(control.encode({"ok": True}))
                continue
            if request.get("op") == "relays":  # a move's streams: one answer, every end
                streams = [str(each) for each in request["streams"]]
                many = forwarder.relays(home, streams, str(request["move"]))
                try:
                    socket.send_fds(
                        channel, [control.encode({"ok": True})], [s.fileno() for s in many]
                    )
                except OSError:
                    break
                finally:
                    for sock in many:
                        sock.close()
                continue
            stream, move = str(request["stream"]), str(request["move"])
            if request.get("op") == "listen":
                given = forwarder.listen(home, stream, move, str(request["listener"]))
                handed = os.dup(given.fileno())  # the daemon shuts it if its move fails
            elif request.get("op") == "datagrams":
                family, here = int(request["family"]), str(request["here"])
                given = forwarder.datagrams(home, stream, move, family, here, int(request["peer"]))
                handed = given.detach()
            else:
                given = forwarder.relay(home, stream, move, str(request.get("terminal", "")))
                handed = given.detach()
        except (HijackError, OSError, KeyError, ValueError, TypeError) as exc:
            with contextlib.suppress(OSError):
                channel.sendall(control.encode({"ok": False, "error": str(exc)}))
            continue
        try:
            socket.send_fds(channel, [control.encode({"ok": True})], [handed])
        except OSError:
            break
        finally:
            os.close(handed)
    channel.close()
    while not forwarder.idle():
        time.sleep(IDLE_POLL)


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the daemon
    libc.keep_freed_memory(RELAY_HEAP)
    serve(socket.socket(fileno=int(arguments[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
