"""A move's relays by packets (`hijack move --packet-relays`; docs/protocol.md, "Relays
by packets").

The TCP connections of a process moving from its home node to a peer this node does
not manage leave with it: within the freeze each is held at home (the peer's packets
dropped: hijack.sys.packet_route), its state read in repair mode from the process's
own socket, and it becomes a plan entry of kind `direct` that the destination makes
in repair mode on its own address, the same port, with a policy rule sending its
packets back through this node (`via`). This node then rewrites the peer's packets to
the destination and the destination's back to its own address: the peer still talks
to home:P, and nothing at home wakes for a byte. At the commit the holds are lifted
(the peer retransmits what was dropped) and the home socket, left in repair mode,
vanishes with the original and the shadow's copy without a segment. An abort lifts
all of it: the socket leaves repair mode and the connection goes on at home, nothing
lost.

Not every connection can: IPv6 ones, those on loopback or to a peer on this node
(no packet of theirs crosses a link) stay relayed by the shadow, as without the option.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hijack.errors import HijackError
from hijack.node.swap_end import split_endpoint, state_fields
from hijack.sys import packet_route, pidfd, procfs, tcp_repair
from hijack.timing import Laps

if TYPE_CHECKING:
    from hijack.node.move import Proxy

Endpoint = tuple[str, int]


@dataclass(frozen=True)
class Routed:
    """A connection this node forwards now: its ends at home, our copy of its socket."""

    fd: int  # the process's descriptor
    home: Endpoint
    peer: Endpoint
    copy: int  # our descriptor of its socket here, in repair mode


@dataclass
class PacketRelays:
    """The connections a move from home takes along, from its freeze to its end."""

    destination: str  # the destination node's address, as this node reaches it
    gateway: str  # this node's address, as the destination reaches it
    routed: list[Routed] = field(default_factory=list)

    def prepare(
        self,
        pid: int,
        plan: list[Proxy],
        sockets: dict[int, procfs.SocketInfo],
        queues: dict[tuple[int, int], bytes],
        laps: Laps | None = None,
    ) -> list[Proxy]:
        """Within the freeze: each stream of `plan` that can go by packets held, read and
        forwarded to the destination; returns the plan with those as `direct` entries (their
        queues, send queue first, put in `queues` by (0, fd): sent after the move message).
        `sockets`: sockets_of(pid)."""
        by_fd = {
            entry.fd: sockets.get(entry.ino)
            for entry in procfs.list_fds(pid)
            if entry.kind is procfs.FdKind.SOCKET
        }
        changed: dict[int, Proxy] = {}
        handle = pidfd.pidfd_open(pid)
        try:
            for proxy in plan:
                found = by_fd.get(proxy.fd) if proxy.kind == "stream" else None
                if found is None or not routable(found):
                    continue
                home, peer = split_endpoint(found.local), split_endpoint(found.remote)
                packet_route.hold(home, peer)
                copy = -1
                try:
                    copy = pidfd.pidfd_getfd(handle, proxy.fd, pid)
                    tcp_repair.set_repair(copy, True)
                    state = tcp_repair.read_state(copy)
                    there = (self.destination, home[1])
                    packet_route.forward(home, peer, there)
                except BaseException:
                    if copy >= 0:
                        with contextlib.suppress(OSError, HijackError):
                            tcp_repair.set_repair(copy, False)
                        os.close(copy)
                    with contextlib.suppress(HijackError):
                        packet_route.release(home, peer)
                    raise
                self.routed.append(Routed(proxy.fd, home, peer, copy))
                queues[(0, proxy.fd)] = state.send_queue + state.received
                changed[proxy.fd] = dataclasses.replace(
                    proxy,
                    stream=f"direct:{proxy.fd}",
                    kind="direct",
                    local=f"{self.destination}:{home[1]}",
                    peer=found.remote,
                    tcp=state_fields(state),
                    queue_bytes=len(queues[(0, proxy.fd)]),
                    via=self.gateway,
                )
        finally:
            os.close(handle)
        if laps is not None and changed:
            laps.lap("packet relays")
        return [changed.get(p.fd, p) if p.kind == "stream" else p for p in plan]

    def commit(self) -> int:
        """The copy runs at the destination: the peers' packets go there now. The home
        sockets stay in repair mode: closed with the original, they send nothing. Returns
        how many connections go by packets."""
        count = len(self.routed)
        for routed in self.routed:
            with contextlib.suppress(HijackError):  # committed: nothing may fail
                packet_route.release(routed.home, routed.peer)
            os.close(routed.copy)
        self.routed = []
        return count

    def abort(self) -> None:
        """The connections go on here as before: rewrites removed, sockets live again,
        holds lifted (the peers retransmit what was dropped)."""
        for routed in reversed(self.routed):
            with contextlib.suppress(HijackError):
                packet_route.unforward(routed.home, routed.peer)
            with contextlib.suppress(OSError, HijackError):
                tcp_repair.set_repair(routed.copy, False)
            os.close(routed.copy)
            with contextlib.suppress(HijackError):
                packet_route.release(routed.home, routed.peer)
        self.routed = []

    def described(self) -> list[str]:
        return [f"{r.home[0]}:{r.home[1]} <-> {r.peer[0]}:{r.peer[1]}" for r in self.routed]


def routable(found: procfs.SocketInfo) -> bool:
    """Whether a connection's packets cross a link this node can forward: an established
    IPv4 TCP connection to a peer on another machine."""
    if found.family != socket.AF_INET or found.type != socket.SOCK_STREAM:
        return False
    if found.state != "ESTABLISHED" or not found.remote:
        return False
    peer = split_endpoint(found.remote)[0]
    return not peer.startswith("127.") and not _is_ours(peer)


def _is_ours(address: str) -> bool:
    """Whether `address` is one of this node's (a bind to it is allowed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return False
            raise HijackError(f"cannot tell whether {address} is this node's: {exc}") from None
    return True
