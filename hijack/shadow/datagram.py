"""The shadow's datagram relays: a migrant's UDP socket, kept at home like a NAT.

The original UDP socket (bound to the address its peers know) stays in the
shadow. The process, wherever it runs, holds at the same descriptor number a
UDP socket of its own made by that node's daemon (its *process socket*).
For each remote peer P that sends to the original, the shadow opens a *peer
relay*: a UDP socket of its own, on an ephemeral port of the home node. P's
datagrams go from that relay to the process socket; what the process sends
back to the relay goes out through the original to P. So P sees the original
address, and each datagram stays one datagram (boundaries kept). A connected
original has one peer: its relay is made at once and kept, and the process
socket is connect()ed to it.

Only datagrams from the process socket (or, during a move, from the one it
had before) are accepted on a relay. Relays are a bounded table: one idle
for PEER_IDLE seconds is closed, and past PEER_LIMIT (or out of descriptors)
the least recently used one makes room, so a flood of peers cannot exhaust
the shadow's descriptors. docs/protocol.md, "UDP through the shadow".

Between different hosts, with relays encrypted, no datagram goes to the
process's socket across the network: it travels in a TLS *datagram link*
from the process's node (hijack.shadow.datagram_link), where the node's
forwarder stands for each relay.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import selectors
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hijack.errors import HijackError

if TYPE_CHECKING:
    from hijack.shadow.datagram_link import DatagramLink

DATAGRAM_MAX = 65536  # above the largest UDP payload (65507 on IPv4, 65527 on IPv6)
PEER_LIMIT = 256  # peer relays per socket
PEER_IDLE = 180.0  # seconds without a datagram either way before a peer relay is closed
BATCH = 64  # datagrams passed on per readiness event: no socket starves the others
PAST_ADDRESSES = 4  # earlier process sockets whose last datagrams are still accepted
HELD_BACK_LIMIT = 256  # datagrams of an unknown sender kept during a move (the new process's?)
# Between nodes a large datagram travels as IP fragments, and a reassembled one
# takes about twice its size of a socket's receive buffer: with the default
# (208 KiB) two of 64 KiB arriving together would not fit and one be dropped.
RELAY_RECEIVE_BUFFER = 4 * 1024 * 1024
SO_RCVBUFFORCE = 33  # asm-generic/socket.h: SO_RCVBUF past rmem_max (CAP_NET_ADMIN)

Address = tuple[str, int]


def parse_address(text: str) -> Address:
    """ "ip:port" or "[ip6]:port" -> (ip, port); an IPv4-mapped IPv6 address as IPv4."""
    host, _, port = text.rpartition(":")
    return unmapped(host.strip("[]")), int(port)


def unmapped_endpoint(text: str) -> str:
    """ "ip:port" as parse_address reads it (an IPv4-mapped address as IPv4)."""
    host, port = parse_address(text)
    return f"{host}:{port}"


def widen_receive_buffer(sock: socket.socket) -> None:
    """Room for bursts of fragmented datagrams (above rmem_max where we may)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RELAY_RECEIVE_BUFFER)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RELAY_RECEIVE_BUFFER)


def unmapped(host: str) -> str:
    """The IPv4 address inside an IPv4-mapped IPv6 one ("::ffff:10.0.0.1" -> "10.0.0.1")."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return host


@dataclass
class PeerRelay:
    """The shadow's socket standing for one remote peer towards the process."""

    peer: Any  # the peer's address as the original socket sees it
    sock: socket.socket
    used_at: float
    # never expired: a connected original's, or one a process socket is connected to
    pinned: bool = False

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])


class DatagramStream:
    """One original UDP socket and its peer relays, pumped by the shadow's event loop."""

    def __init__(
        self, stream_id: str, original_fd: int, selector: selectors.BaseSelector, log: Any
    ) -> None:
        self.id = stream_id
        self.selector = selector
        self.log = log
        # Our own descriptor on the original's description. The process may
        # still use that description (a move can abort): never change its
        # flags, use MSG_DONTWAIT instead.
        self.original = socket.socket(fileno=os.dup(original_fd))
        self.connected_peer: Any = None
        with contextlib.suppress(OSError):
            self.connected_peer = self.original.getpeername()
        self.process: Address | None = None  # the process socket now
        self.past: list[Address] = []  # the ones before it, newest first
        self.peers: dict[Any, PeerRelay] = {}
        # During a move, from senders not known yet: the new process may write
        # between its start and our hearing where it is.
        self.held_back: list[tuple[PeerRelay, Any, bytes]] = []
        # Encrypted: the datagram link of the node the process runs on, and those of
        # moves under way (hijack.shadow.datagram_link); None: datagrams go as they are.
        self.link: DatagramLink | None = None
        self.pending_links: dict[str, DatagramLink] = {}
        self.aliases: dict[str, PeerRelay] = {}  # a stand-in's "ip:port" -> its relay
        self.pumping = False
        self.closed = False
        self.datagrams_out = self.datagrams_in = 0
        self.bytes_out = self.bytes_in = 0
        self.dropped = 0
        if self.connected_peer is not None:
            self._open_relay(self.connected_peer).pinned = True

    @property
    def connected_relay_port(self) -> int:
        """The port of a connected original's relay (the process socket connects to it), or 0."""
        if self.connected_peer is None:
            return 0
        return self.peers[self.connected_peer].port

    # -- moves ----------------------------------------------------------------------

    def migrating(self) -> None:
        """Stop passing datagrams to the process: they wait in the original's queue."""
        self.pumping = False
        self._watch_original()

    def migrated(
        self, process: str, connected_to: str, unread: list[tuple[str, bytes]], move: str = ""
    ) -> None:
        """The process socket is at `process` now (connected to `connected_to`, or "").

        `unread`: (source, datagram) the process had not read from its previous
        socket; each goes again from the relay it came from. Move `move`'s
        datagram link, if its node opened one, carries them from now on.
        """
        if self.link is not None:
            self._close_link(self.link)
        self.link = self.pending_links.pop(move, None)
        if self.process is not None:
            self.past = [self.process, *self.past][:PAST_ADDRESSES]
        else:
            # The move is committed: the original is ours alone now, and one hop
            # further from the process it needs room for bursts as its relays do.
            widen_receive_buffer(self.original)
        self.process = parse_address(process)
        by_port = {relay.port: relay for relay in self.peers.values()}
        if connected_to:
            relay = by_port.get(parse_address(connected_to)[1])
            if relay is not None:
                relay.pinned = True
        if unread:
            self.log(f"{self.id}: {len(unread)} datagrams the process had not read go again")
        for source, datagram in unread:
            relay = self.aliases.get(source) or by_port.get(parse_address(source)[1])
            if relay is None:
                self.dropped += 1  # not from a relay of ours: there is no sender to resend it
                continue
            self._to_process(relay, datagram)
        held_back, self.held_back = self.held_back, []
        for relay, sender, datagram in held_back:
            if sender in (self.process, ("link", move)) and self.peers.get(relay.peer) is relay:
                self._to_peer(relay, datagram)
            else:
                self.dropped += 1
        self.pumping = True
        self._watch_original()

    def aborted(self) -> None:
        self.dropped += len(self.held_back)
        self.held_back.clear()
        for link in list(self.pending_links.values()):
            self._close_link(link)
        self.pending_links.clear()
        self.pumping = self.process is not None
        self._watch_original()

    def close(self) -> None:
        for link in [*self.pending_links.values(), *([self.link] if self.link else [])]:
            self._close_link(link)
        self.pending_links.clear()
        self.link = None
        for relay in list(self.peers.values()):
            self._close_relay(relay)
        self._forget(self.original)
        self.original.close()
        self.closed = True

    def expire(self, now: float) -> None:
        for relay in list(self.peers.values()):
            if not relay.pinned and now - relay.used_at > PEER_IDLE:
                self._close_relay(relay)

    # -- the event loop's side --------------------------------------------------------

    def _watch_original(self) -> None:
        if self.closed:
            return
        self._forget(self.original)
        if self.pumping and self.process is not None:
            self.selector.register(self.original, selectors.EVENT_READ, self._on_original)

    def _on_original(self, _: Any, __: int) -> None:
        """Datagrams from peers to the original: on to the process, each from its peer's relay."""
        for _ in range(BATCH):
            try:
                datagram, sender = self.original.recvfrom(DATAGRAM_MAX, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:  # an ICMP error queued on a connected original
                self.log(f"{self.id}: {exc}")
                continue
            if self.connected_peer is not None:
                sender = self.connected_peer
            relay = self.peers.get(sender) or self._relay_for_new_peer(sender)
            if relay is None:
                self.dropped += 1
                continue
            self._to_process(relay, datagram)

    def _relay_for_new_peer(self, peer: Any) -> PeerRelay | None:
        """A relay for `peer`; out of descriptors, the least recently used one makes room."""
        try:
            return self._open_relay(peer)
        except OSError as exc:
            unpinned = [relay for relay in self.peers.values() if not relay.pinned]
            if not unpinned:
                self.log(f"{self.id}: no relay for a new peer: {exc}")
                return None
            self._close_relay(min(unpinned, key=lambda relay: relay.used_at))
        try:
            return self._open_relay(peer)
        except OSError as exc:
            self.log(f"{self.id}: no relay for a new peer: {exc}")
            return None

    def _to_process(self, relay: PeerRelay, datagram: bytes) -> None:
        assert self.process is not None
        relay.used_at = time.monotonic()
        if self.link is not None:
            sent = self.link.send_datagram(relay.port, datagram)
            self._watch_link(self.link)
            if not sent:
                self.dropped += 1
                return
        else:
            try:
                relay.sock.sendto(datagram, self.process)
            except OSError:  # a full send buffer, too long for IPv4: dropped, as UDP may
                self.dropped += 1
                return
        self.datagrams_out += 1
        self.bytes_out += len(datagram)

    def _on_relay(self, relay: PeerRelay, _: Any, __: int) -> None:
        """Datagrams from the process to a peer: out through the original, to that peer."""
        for _ in range(BATCH):
            try:
                datagram, source = relay.sock.recvfrom(DATAGRAM_MAX)
            except BlockingIOError:
                return
            except OSError:  # an ICMP error: a process socket that is gone
                continue
            sender = (unmapped(source[0]), source[1])
            if sender == self.process or sender in self.past:
                self._to_peer(relay, datagram)
            elif not self.pumping and len(self.held_back) < HELD_BACK_LIMIT:
                self.held_back.append((relay, sender, datagram))
            else:
                self.dropped += 1  # a stranger: only the process speaks through a relay

    def _to_peer(self, relay: PeerRelay, datagram: bytes) -> None:
        relay.used_at = time.monotonic()
        try:
            if self.connected_peer is not None:
                self.original.send(datagram, socket.MSG_DONTWAIT)
            else:
                self.original.sendto(datagram, socket.MSG_DONTWAIT, relay.peer)
        except OSError:
            self.dropped += 1
            return
        self.datagrams_in += 1
        self.bytes_in += len(datagram)

    def _open_relay(self, peer: Any) -> PeerRelay:
        unpinned = [relay for relay in self.peers.values() if not relay.pinned]
        if len(unpinned) >= PEER_LIMIT:
            self._close_relay(min(unpinned, key=lambda relay: relay.used_at))
        # IPv4 whatever the original's family: nodes reach each other over IPv4,
        # and an IPv6 process socket talks to it through an IPv4-mapped address.
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(("0.0.0.0", 0))
            sock.setblocking(False)
            widen_receive_buffer(sock)
        except OSError:
            sock.close()
            raise
        relay = PeerRelay(peer, sock, time.monotonic())
        self.peers[peer] = relay
        self.selector.register(sock, selectors.EVENT_READ, functools.partial(self._on_relay, relay))
        return relay

    def _close_relay(self, relay: PeerRelay) -> None:
        port = relay.port  # not to be read once closed
        self._forget(relay.sock)
        relay.sock.close()
        del self.peers[relay.peer]
        for alias in [alias for alias, found in self.aliases.items() if found is relay]:
            del self.aliases[alias]
        if self.link is not None:  # its stand-in at the node goes too
            self.link.send_gone(port)
            self._watch_link(self.link)

    # -- datagram links (encrypted) ---------------------------------------------------

    def attach_link(self, move: str, link: DatagramLink) -> None:
        """The datagram link the process's next node opened for `move`."""
        old = self.pending_links.pop(move, None)
        if old is not None:
            self._close_link(old)
        self.pending_links[move] = link
        self._watch_link(link)

    def _watch_link(self, link: DatagramLink) -> None:
        events = link.events()
        self._forget(link.sock)
        if events:
            self.selector.register(link.sock, events, functools.partial(self._on_link, link))

    def _on_link(self, link: DatagramLink, _: Any, events: int) -> None:
        """Datagrams the process sent to a stand-in at its node: out through the original."""
        try:
            if events & selectors.EVENT_WRITE:
                link.flush()
            if events & selectors.EVENT_READ:
                self._from_link(link)
        except (OSError, HijackError, ValueError) as exc:
            self.log(f"{self.id}: datagram link: {exc}; closing it")
            self._close_link(link)
            return
        if link.eof:
            self._close_link(link)
        else:
            self._watch_link(link)

    def _from_link(self, link: DatagramLink) -> None:
        by_port = {relay.port: relay for relay in self.peers.values()}
        for port, payload, stand_in, _ in link.receive():
            relay = by_port.get(port)
            if relay is None:
                self.dropped += 0 if stand_in else 1  # its relay expired meanwhile
            elif stand_in:  # where the node stands for this relay
                self.aliases[unmapped_endpoint(stand_in)] = relay
            elif link is self.link:
                self._to_peer(relay, payload)
            elif not self.pumping and len(self.held_back) < HELD_BACK_LIMIT:
                move = next((m for m, found in self.pending_links.items() if found is link), "")
                self.held_back.append((relay, ("link", move), payload))
            else:
                self.dropped += 1

    def _close_link(self, link: DatagramLink) -> None:
        self._forget(link.sock)
        link.close()
        if self.link is link:
            self.link = None
        for move in [m for m, found in self.pending_links.items() if found is link]:
            del self.pending_links[move]

    def _forget(self, target: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(target)

    # -- reporting --------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        process = f"{self.process[0]}:{self.process[1]}" if self.process else ""
        return {
            "id": self.id,
            "kind": "datagram",
            "relay": process,
            "shadow_end": "",
            "listener": "",
            "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in,
            "buffered_out": 0,
            "buffered_in": 0,
            "datagrams_out": self.datagrams_out,
            "datagrams_in": self.datagrams_in,
            "dropped": self.dropped,
            "peers": len(self.peers),
            "connected_relay_port": self.connected_relay_port,
            "encrypted": self.link is not None,
            "aliases": {alias: relay.port for alias, relay in self.aliases.items()},
        }
