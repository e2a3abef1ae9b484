"""A migrant's UDP datagrams between its home shadow and its node, inside TLS.

Relayed plain (`--plain-relays`, or a node of the home's own), the shadow's
peer relays (hijack.shadow.datagram) send each datagram to the process's UDP
socket across the network, and the process answers them there. Encrypted
(the default between different hosts), no datagram crosses in clear: each
goes, its boundaries and the relay it belongs to kept, as a frame of the
stream's *datagram link*, a TLS connection the node's forwarder opens to the
shadow (hijack.shadow.relay_link, header kind "datagrams"). At the node the
forwarder stands for each of the shadow's relays with a UDP socket of its own
on the node's address (a *stand-in*): the shadow's datagrams reach the
process's socket from the stand-in of their relay, and what the process sends
to a stand-in goes back framed, to leave through the original.

    frame    ::= KIND:u8 LENGTH:u32 PAYLOAD      (hijack.node.terminal's frames)
    DATAGRAM ::= 5, RELAY_PORT:u16 DATAGRAM      either way
    STAND_IN ::= 6, RELAY_PORT:u16 "ip:port"     node -> shadow: where it stands for it
    GONE     ::= 7, RELAY_PORT:u16               shadow -> node: the relay expired (its
                                                 stand-in goes too: as many as relays)

So the process sees its peers at stand-in addresses of its node, not at the
relays' of the home node; the shadow learns each stand-in (STAND_IN): the
unread datagrams a later move hands it (from a stand-in) and a socket the
process connected to a stand-in go back to the relays they stand for (its
status lists them as `aliases`).

A link holds at most LIMIT bytes not yet taken by TLS; past that a datagram
is dropped, as a full UDP socket would.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from hijack.node.terminal import FrameReader
from hijack.node.terminal import frame as make_frame
from hijack.shadow.datagram import DATAGRAM_MAX, Address, unmapped, widen_receive_buffer
from hijack.shadow.relay_link import TlsLink

DATAGRAM, STAND_IN, GONE = 5, 6, 7
PORT = struct.Struct("<H")
LIMIT = 4 * 1024 * 1024  # bytes of frames held before datagrams are dropped
BATCH = 64  # datagrams taken from one socket per readiness event


class Frame(NamedTuple):
    port: int  # the shadow's relay it belongs to
    payload: bytes  # a datagram, whole
    stand_in: str  # a STAND_IN frame's "ip:port" (its payload empty); "" for a datagram
    gone: bool = False  # a GONE frame


class DatagramLink:
    """Frames of datagrams over a TlsLink (non-blocking), either side."""

    def __init__(self, link: TlsLink) -> None:
        self.link = link
        self.reader = FrameReader((DATAGRAM, STAND_IN, GONE), "datagram link")
        self.out = bytearray()  # frames not yet handed to TLS
        self.dropped = 0

    @property
    def sock(self) -> socket.socket:
        return self.link.sock

    @property
    def eof(self) -> bool:
        return self.link.eof

    def send_datagram(self, port: int, payload: bytes) -> bool:
        return self.put(DATAGRAM, port, payload)

    def send_gone(self, port: int) -> None:
        self.put(GONE, port, b"")

    def put(self, kind: int, port: int, payload: bytes) -> bool:
        """Queue one frame and send what may go; False (dropped) if too much waits."""
        if len(self.out) + len(self.link.pending) > LIMIT:
            self.dropped += 1
            return False
        self.out += make_frame(kind, PORT.pack(port) + payload)
        self.flush()
        return True

    def flush(self) -> None:
        self.link.send_from(self.out)

    def receive(self) -> list[Frame]:
        """The frames that have come; HijackError or ValueError if the peer is broken."""
        try:
            data = self.link.recv()
        except BlockingIOError:
            return []
        frames = []
        for kind, payload in self.reader.feed(data):
            if len(payload) < PORT.size:
                raise ValueError("a datagram link frame without its relay's port")
            (port,) = PORT.unpack_from(payload)
            rest = payload[PORT.size :]
            if kind == STAND_IN:
                frames.append(Frame(port, b"", rest.decode(errors="replace")))
            elif kind == GONE:
                frames.append(Frame(port, b"", "", gone=True))
            else:
                frames.append(Frame(port, rest, ""))
        return frames

    def events(self) -> int:
        events = 0 if self.link.eof else selectors.EVENT_READ
        if self.out or self.link.pending:
            events |= selectors.EVENT_WRITE
        return events

    def close(self) -> None:
        self.link.sock.close()


def endpoint_text(address: Address) -> str:
    return f"{address[0]}:{address[1]}"


@dataclass(eq=False)
class StandIns:
    """The node's end of a datagram link: the process's UDP socket's peers, stood for."""

    link: DatagramLink
    here: str  # the node's address: where the stand-ins are bound
    process: Address  # the process's socket (unmapped)
    by_port: dict[int, socket.socket] = field(default_factory=dict)  # relay port -> stand-in
    closed: bool = False

    def stand_in(self, port: int) -> socket.socket:
        """The stand-in of the shadow's relay `port` (made, and told to the shadow, once)."""
        sock = self.by_port.get(port)
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            try:
                sock.bind((self.here, 0))
                sock.setblocking(False)
                widen_receive_buffer(sock)
            except OSError:
                sock.close()
                raise
            self.by_port[port] = sock
            where = endpoint_text(sock.getsockname())
            self.link.put(STAND_IN, port, where.encode())
        return sock

    def from_shadow(self) -> list[socket.socket]:
        """Datagrams the shadow sent, on to the process; the stand-ins it closed (GONE)."""
        gone = []
        for port, payload, stand_in, closed in self.link.receive():
            if stand_in:
                continue  # STAND_IN goes the other way only
            if closed:
                sock = self.by_port.pop(port, None)
                if sock is not None:
                    gone.append(sock)
                continue
            sock = self.stand_in(port)
            with contextlib.suppress(OSError):  # a full socket: dropped, as UDP may
                sock.sendto(payload, self.process)
        return gone

    def from_process(self, port: int) -> None:
        """What the process sent to the stand-in of relay `port`, on to the shadow."""
        sock = self.by_port[port]
        for _ in range(BATCH):
            try:
                payload, sender = sock.recvfrom(DATAGRAM_MAX)
            except BlockingIOError:
                return
            except OSError:  # an ICMP error: a process socket gone
                continue
            if (unmapped(sender[0]), sender[1]) == self.process:
                self.link.send_datagram(port, payload)
            # else: another process of this node: only the migrant speaks through it

    def close(self) -> None:
        for sock in self.by_port.values():
            sock.close()
        self.link.close()
        self.closed = True
