"""A move's relays by packets (`hijack move --packet-relays`; docs/protocol.md, "Relays
by packets").

The TCP connections of a process moving from its home node to a peer this node does
not manage leave with it: within the freeze each is held at home (the peer's packets
kept in a queue: hijack.sys.packet_route, hijack.sys.nfqueue), its state read in
repair mode from the process's own socket, which is left live, and it becomes a plan
entry of kind `direct` that the destination makes in repair mode on its own address,
the same port, with a policy rule sending its packets back through the home node
(`via`). The home node then rewrites the peer's packets to the destination and the
destination's back to its own address: the peer still talks to home:P, and nothing
at home wakes for a byte. At the commit the old socket is silenced (repair mode: it
vanishes with the original without a segment), then the holds are lifted: what they
kept goes on to the destination, in order. An abort removes the rewrites and lifts
the holds: the connection goes on where it was, nothing lost.

A later move takes such a connection along the same way, the home node asked over the
node channel (op `route`, serve_route()) to hold it and to rewrite towards the next
node (what the node it leaves sends still rewritten back until the commit); a move
home makes it again under its original addresses and the home node stops rewriting.
The node a connection runs on keeps it in its registry (`routed`), and its daemon
removes its rule and has the home node drop its rewrites once the connection has
ended (sweep()).

Not every connection can: IPv6 ones, those on loopback or to a peer on the home node
(no packet of theirs crosses a link) stay relayed by the shadow, as without the option.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hijack.errors import HijackError
from hijack.node import pki
from hijack.node.channel import Channel, ChannelError
from hijack.node.swap_end import read_state, split_endpoint, state_fields
from hijack.registry import Registry, RoutedConnection
from hijack.sys import nfqueue, packet_route, pidfd, procfs, tcp_repair
from hijack.timing import Laps

if TYPE_CHECKING:
    from hijack.node.move import Proxy

Endpoint = tuple[str, int]
QUEUE_BASE, QUEUE_SPREAD = 0x6800, 0x800  # packet queue numbers: one picked at random
ENDED_STATES = ("06", "07")  # TCP_TIME_WAIT, TCP_CLOSE as /proc/net/tcp shows them


class Holds:
    """The holds one mover (or one home node's `route` channel) puts on connections: their
    packets wait in one packet queue (hijack.sys.nfqueue) and go on, in order, when the
    hold is lifted; where no queue can be had they are dropped instead (the peers send
    them again on their retransmission timers: 200 ms or more after the freeze)."""

    def __init__(self) -> None:
        self.queue: nfqueue.PacketQueue | None = None
        self._no_queue = False

    def hold(self, origin: Endpoint, peer: Endpoint) -> None:
        if self.queue is None and not self._no_queue:
            try:
                self.queue = nfqueue.bind_free(QUEUE_BASE + secrets.randbelow(QUEUE_SPREAD))
            except HijackError:
                self._no_queue = True
        if self.queue is not None:
            try:
                packet_route.hold(origin, peer, self.queue.number)
                return
            except HijackError:  # no NFQUEUE target in this kernel: dropped
                packet_route.remove_hold(origin, peer)
        packet_route.hold(origin, peer)

    def release(self, origin: Endpoint, peer: Endpoint) -> None:
        """The connection's packets go on: those held first, in order."""
        self._accept()
        packet_route.release(origin, peer)
        self._accept()  # any queued while the rule went

    def remove(self, origin: Endpoint, peer: Endpoint) -> None:
        """The hold's table gone (released or not: what it held goes on)."""
        packet_route.remove_hold(origin, peer)
        self._accept()

    def _accept(self) -> None:
        if self.queue is not None:
            self.queue.accept_all()

    def close(self) -> None:
        """Unbind the queue: what it still holds is dropped, never let through (a hold
        not lifted stays, dropping: its mover went away mid-move)."""
        if self.queue is not None:
            self.queue.close()
            self.queue = None


@dataclass(frozen=True)
class Taken:
    """A connection a move takes along, from the freeze to the commit."""

    fd: int  # the process's descriptor
    origin: Endpoint  # its address at the home node, which its peer knows
    peer: Endpoint
    copy: int  # our descriptor of its socket here (live until the commit silences it)
    local: str = ""  # away from home: its address here ("ip:port"), as the registry has it
    back_to: str = ""  # away from home: this node's address, the home node's rewrites' now


@dataclass
class PacketRelays:
    """The connections relayed by packets a move takes along (see the module docstring)."""

    destination: str  # the destination node's address, as this node reaches it
    gateway: str  # this node's address, as the destination reaches it (a move from home)
    identity: pki.NodeIdentity
    take_streams: bool = False  # --packet-relays: a move from home takes its streams so
    homing: bool = False  # the destination is the home node
    taken: list[Taken] = field(default_factory=list)
    home: Channel | None = None  # away from home: to the home node's daemon
    holds: Holds = field(default_factory=Holds)  # a move from home: our own

    def prepare(
        self,
        pid: int,
        plan: list[Proxy],
        sockets: dict[int, procfs.SocketInfo],
        queues: dict[tuple[int, int], bytes],
        laps: Laps | None = None,
        *,
        member: int = 0,
        suffix: str = "",
        shared: frozenset[int] = frozenset(),
    ) -> list[Proxy]:
        """Within the freeze: each connection of `plan` (process `pid`'s) that goes by
        packets (a `routed` entry; at home with take_streams, each stream that can) held,
        read and rewritten towards the destination; returns the plan with those as
        `direct` entries (their queues, send queue first, put in `queues` by (member, fd):
        sent after the move message). `sockets`: its namespace's socket table. A tree's
        move calls it for each member: `member` its pid (0 for a single process), `suffix`
        what its `direct` stream ids end with ("@PID" but for the root), `shared` the
        inodes of sockets more than one member holds: those stay the shadow's."""
        by_fd = {
            entry.fd: (entry.ino, sockets.get(entry.ino))
            for entry in procfs.list_fds(pid)
            if entry.kind is procfs.FdKind.SOCKET
        }
        changed: dict[int, Proxy] = {}
        handle = pidfd.pidfd_open(pid)
        try:
            for proxy in plan:
                inode, found = by_fd.get(proxy.fd, (0, None))
                if found is None:
                    continue
                if proxy.kind == "routed":
                    entry = self._take_on(handle, pid, proxy, found)
                elif (
                    proxy.kind == "stream"
                    and self.take_streams
                    and inode not in shared
                    and routable(found)
                ):
                    entry = self._take_from_home(handle, pid, proxy, found)
                else:
                    continue
                queues[(member, proxy.fd)] = entry[1]
                stream = f"direct:{proxy.fd}{suffix}"
                changed[proxy.fd] = dataclasses.replace(entry[0], stream=stream)
        finally:
            os.close(handle)
        if laps is not None and changed:
            laps.lap("packet relays")
        return [changed.get(p.fd, p) for p in plan]

    def _take_from_home(
        self, handle: int, pid: int, proxy: Proxy, found: procfs.SocketInfo
    ) -> tuple[Proxy, bytes]:
        """A move from home: the rewrites are this node's own. The socket is read in
        repair mode and left live (the peer held, it takes nothing; a segment it sends
        goes to the peer as before): were the mover killed now, the process would run on
        with it as it was. The commit silences it."""
        origin, peer = split_endpoint(found.local), split_endpoint(found.remote)
        self.holds.hold(origin, peer)
        copy = -1
        try:
            copy = pidfd.pidfd_getfd(handle, proxy.fd, pid)
            state = read_state(copy)
            packet_route.forward(origin, peer, self.destination, [self.destination])
        except BaseException:
            if copy >= 0:
                os.close(copy)
            with contextlib.suppress(HijackError):
                packet_route.unforward(origin, peer)
            with contextlib.suppress(HijackError):
                self.holds.remove(origin, peer)
            raise
        self.taken.append(Taken(proxy.fd, origin, peer, copy))
        return self._entry(proxy, found, state, origin, self.gateway)

    def _take_on(
        self, handle: int, pid: int, proxy: Proxy, found: procfs.SocketInfo
    ) -> tuple[Proxy, bytes]:
        """A later move: the home node holds the connection and rewrites it towards the
        destination (a move home: no more), what this node's socket sends still rewritten
        back until the commit silences it; the socket read in repair mode and left live."""
        origin, peer = split_endpoint(proxy.origin), split_endpoint(found.remote)
        here = split_endpoint(found.local)[0]
        copy = pidfd.pidfd_getfd(handle, proxy.fd, pid)
        asked = False
        try:
            to = "" if self.homing else self.destination
            asked = True
            via = self._ask_home(
                {"origin": proxy.origin, "peer": found.remote, "hold": True, "to": to,
                 "from": here}
            )  # fmt: skip
            state = read_state(copy)
        except BaseException:
            if asked:
                with contextlib.suppress(HijackError):
                    self._ask_home(
                        {"origin": proxy.origin, "peer": found.remote, "to": here, "hold": False}
                    )
            os.close(copy)
            raise
        self.taken.append(Taken(proxy.fd, origin, peer, copy, found.local, here))
        return self._entry(proxy, found, state, origin, "" if self.homing else via)

    def _entry(
        self,
        proxy: Proxy,
        found: procfs.SocketInfo,
        state: tcp_repair.TcpState,
        origin: Endpoint,
        via: str,
    ) -> tuple[Proxy, bytes]:
        """The plan entry of a connection taken along, and its queues."""
        queued = state.send_queue + state.received
        local = f"{origin[0]}:{origin[1]}" if self.homing else f"{self.destination}:{origin[1]}"
        entry = dataclasses.replace(
            proxy,
            stream=f"direct:{proxy.fd}",
            kind="direct",
            local=local,
            peer=found.remote,
            tcp=state_fields(state),
            queue_bytes=len(queued),
            via=via,
            origin=f"{origin[0]}:{origin[1]}",
        )
        return entry, queued

    def _ask_home(self, change: dict[str, Any]) -> str:
        """One `route` request to the home node's daemon; its `via`."""
        if self.home is None:
            raise HijackError("a connection relayed by packets, but no home node to ask")
        self.home.send({"op": "route", **change})
        return str(self.home.expect("via")["via"])

    def commit(self) -> int:
        """The copy runs at the destination: the old sockets are silenced (repair mode:
        closed with the original, they send nothing), then the holds lifted: the peers'
        packets go to the destination, those held first. Returns how many connections
        went by packets; forget_left() then, once the freeze is over."""
        count = len(self.taken)
        for taken in self.taken:
            # Silenced before anything: killed with the original, it must send nothing
            # (a FIN would reach the peer as the connection's).
            with contextlib.suppress(HijackError, OSError):
                tcp_repair.set_repair(taken.copy, True)
            with contextlib.suppress(HijackError, OSError):  # committed: nothing may fail
                if not taken.local:
                    self.holds.release(taken.origin, taken.peer)
                else:
                    peer = f"{taken.peer[0]}:{taken.peer[1]}"
                    origin = f"{taken.origin[0]}:{taken.origin[1]}"
                    self._ask_home({"origin": origin, "peer": peer, "hold": False})
            os.close(taken.copy)
        return count

    def forget_left(self) -> None:
        """After the commit, the freeze over: the holds' empty tables go (a move from
        home); the connections that left this node lose their rule and record here."""
        for taken in self.taken:
            if not taken.local:
                with contextlib.suppress(HijackError):
                    self.holds.remove(taken.origin, taken.peer)
                with contextlib.suppress(HijackError):  # an earlier table's rules, if any
                    packet_route.tidy(taken.origin, taken.peer)
        self.holds.close()
        left = [taken for taken in self.taken if taken.local]
        self.taken = []
        if not left:
            return
        with contextlib.suppress(HijackError), Registry() as registry:
            for taken in left:
                peer = f"{taken.peer[0]}:{taken.peer[1]}"
                with contextlib.suppress(HijackError):
                    if self.homing:  # what rewrote this node's packets back goes too
                        origin = f"{taken.origin[0]}:{taken.origin[1]}"
                        self._ask_home({"origin": origin, "peer": peer, "to": ""})
                    forget_here(registry, taken.local, peer)
        self.close()

    def abort(self) -> None:
        """The connections go on here as before (their sockets were left live): the
        rewrites as they were, then the holds lifted, what they kept let go."""
        for taken in reversed(self.taken):
            os.close(taken.copy)
            with contextlib.suppress(HijackError):
                if not taken.local:
                    packet_route.unforward(taken.origin, taken.peer)
                    self.holds.remove(taken.origin, taken.peer)
                else:
                    origin = f"{taken.origin[0]}:{taken.origin[1]}"
                    peer = f"{taken.peer[0]}:{taken.peer[1]}"
                    change = {"to": taken.back_to, "from": "", "hold": False}
                    self._ask_home({"origin": origin, "peer": peer, **change})
        self.taken = []
        self.holds.close()
        self.close()

    def close(self) -> None:
        """The channel to the home node (its holds lifted or not: the home node's
        daemon lets go of its queue as the channel ends, what it held dropped)."""
        if self.home is not None:
            self.home.close()
            self.home = None


def connect_home(
    registry: Registry, routed: list[RoutedConnection], identity: pki.NodeIdentity
) -> Channel | None:
    """A channel to the home node's daemon of `routed` (a process's connections relayed
    by packets, one home), made before a move's freeze; None if there are none."""
    if not routed:
        return None
    homes = {(r.home_node, r.gateway) for r in routed}
    if len(homes) > 1:
        raise HijackError(f"connections relayed by packets through {len(homes)} home nodes")
    # Not at the top: hijack.node.daemon builds on this module.
    from hijack.node.daemon import DEFAULT_PORT, parse_address

    (name, gateway) = homes.pop()
    known = {node: address for node, address, _ in registry.nodes()}
    address = parse_address(known[name]) if name in known else (gateway, DEFAULT_PORT)
    return Channel.connect(address, identity, expect=name)


def held_routed(pids: list[int], registry: Registry) -> list[RoutedConnection]:
    """The connections relayed by packets (this node's registry) that `pids` hold now."""
    routed = registry.routed_connections()
    if not routed or not pids:
        return []
    table = procfs.read_socket_table(pids[0])
    held = []
    for pid in pids:
        with contextlib.suppress(OSError, HijackError):  # a member gone meanwhile
            for entry in procfs.list_fds(pid):
                found = table.get(entry.ino) if entry.kind is procfs.FdKind.SOCKET else None
                if found is not None and (found.local, found.remote) in routed:
                    held.append(routed[(found.local, found.remote)])
    return held


def settle(pid: int, committed: bool, at_home: bool, registry: Registry) -> list[int]:
    """`hijack recover` of a move of `pid` whose mover went away within its freeze: the
    connections it was taking along by packets, found by their tables (at home: the
    holds and rewrites named for its sockets' ends) or by this node's registry (away).
    `committed`: the copy runs at the destination: the old sockets silenced, the holds
    lifted (the rewrites go there already). Else the rewrites put back as they were and
    the holds lifted: the connections go on here. Returns the descriptors settled as
    gone (committed), which the shadow must not relay."""
    table = procfs.read_socket_table(pid)
    held = {
        entry.fd: table[entry.ino]
        for entry in procfs.list_fds(pid)
        if entry.kind is procfs.FdKind.SOCKET and entry.ino in table
    }
    if at_home:
        tables = {packet_route.ends_of(name) for name in packet_route.tables()}
        settled = []
        for fd, found in held.items():
            if found.family != socket.AF_INET or not found.remote:
                continue
            origin, peer = split_endpoint(found.local), split_endpoint(found.remote)
            if ("hold", origin, peer) not in tables and ("route", origin, peer) not in tables:
                continue
            if committed:
                tcp_repair.silence(pid, fd)
                settled.append(fd)
            else:
                packet_route.unforward(origin, peer)
            packet_route.release(origin, peer)
            packet_route.remove_hold(origin, peer)
        return settled
    routed = registry.routed_connections()
    taken = {
        fd: routed[(f.local, f.remote)] for fd, f in held.items() if (f.local, f.remote) in routed
    }
    home = connect_home(registry, list(taken.values()), pki.load_identity())
    if home is None:
        return []
    try:
        for fd, connection in taken.items():
            ends = {"origin": connection.origin, "peer": connection.remote}
            if committed:
                tcp_repair.silence(pid, fd)
                home.send({"op": "route", **ends, "hold": False})
            else:
                here = split_endpoint(connection.local)[0]
                home.send({"op": "route", **ends, "to": here, "from": "", "hold": False})
            home.expect("via")
            if committed:
                forget_here(registry, connection.local, connection.remote)
    finally:
        home.close()
    return list(taken) if committed else []


def forget_here(registry: Registry, local: str, peer: str) -> None:
    """A connection that left this node (moved on, or ended): its rule and its record go."""
    known = registry.routed_connections().get((local, peer))
    if known is None:
        return
    packet_route.stop_sending_through(split_endpoint(local), split_endpoint(peer), known.gateway)
    registry.forget_routed(local, peer)


def serve_route(channel: Channel, request: dict[str, Any]) -> None:
    """The home node's side (op `route`): requests on one channel, each answered `via`
    (this node's address towards `to`, or "") or `error`, until the mover closes it.

    `{"op": "route", "origin": "ip:port", "peer": "ip:port", "hold": bool, "to": ADDR}`:
    hold true holds the connection first; `to` an address rewrites it towards that node
    ("" stops rewriting it: it runs here again); hold false lifts the hold last. A field
    left out leaves that part as it is. The holds' packets wait in one queue of this
    channel's (Holds): a channel that ends drops what they still hold."""
    holds = Holds()
    try:
        while True:
            try:
                via = _route(request, holds)
            except (HijackError, KeyError, TypeError, ValueError, OSError) as exc:
                channel.send({"error": f"route: {exc}"})
            else:
                channel.send({"via": via})
                if request.get("hold") is False:  # answered first: the peer goes on meanwhile
                    _after_freeze(request, holds)
            try:
                request = channel.receive()
            except ChannelError:
                return  # the mover is done
            if request.get("op") != "route":
                channel.send({"error": f"unknown op {request.get('op')!r:.40}"})
                return
    finally:
        holds.close()


def _after_freeze(request: dict[str, Any], holds: Holds) -> None:
    """What waits for a connection's freeze to end: its hold's table and its superseded
    rewrites removed (each deletion waits out a grace period: 6-20 ms here)."""
    origin, peer = split_endpoint(str(request["origin"])), split_endpoint(str(request["peer"]))
    with contextlib.suppress(HijackError):
        holds.remove(origin, peer)
    with contextlib.suppress(HijackError):
        packet_route.tidy(origin, peer)


def _route(request: dict[str, Any], holds: Holds) -> str:
    origin, peer = split_endpoint(str(request["origin"])), split_endpoint(str(request["peer"]))
    hold, to, leaving = request.get("hold"), request.get("to"), request.get("from", "")
    if not isinstance(hold, bool | None) or not isinstance(to, str | None):
        raise TypeError("hold must be true or false, to an address")
    if not isinstance(leaving, str):
        raise TypeError("from must be an address")
    for address in (to, leaving):
        if address:
            socket.inet_aton(address)  # OSError if it is none
    if not is_ours(origin[0]):
        raise HijackError(f"{origin[0]} is not an address of this node")
    # Only a connection a move from here made a relay by packets (its rewrites are here):
    # another node never gets a connection of this node's redirected.
    if packet_route.route_name(origin, peer) not in packet_route.tables():
        if to == "" and not hold and not leaving:
            return ""  # stopped already
        raise HijackError(f"{origin[0]}:{origin[1]} <-> {peer[0]}:{peer[1]} is not relayed here")
    if hold:
        holds.hold(origin, peer)
    via = ""
    if to:
        packet_route.forward(origin, peer, to, [to, leaving] if leaving else [to])
        via = source_towards(to)
    elif to == "" and leaving:
        packet_route.forward(origin, peer, None, [leaving])
    elif to == "":
        packet_route.unforward(origin, peer)
    if hold is False:
        holds.release(origin, peer)
    return via


def sweep(identity: pki.NodeIdentity, told: set[tuple[str, str]]) -> list[str]:
    """The connections relayed by packets this node holds that have ended (no socket of
    this node has their addresses any more but in TIME_WAIT): each one's rule removed,
    its home node told to stop rewriting it, its record gone. A line each. A home node
    that cannot be reached is asked again at the next sweep (said once: `told` keeps the
    connections already said)."""
    with Registry() as registry:
        routed = registry.routed_connections()
        if not routed:
            return []
        present = _all_tcp()
        lines = []
        for key, connection in routed.items():
            if key in present:
                continue
            ends = f"{connection.local} <-> {connection.remote}"
            try:
                packet_route.stop_sending_through(
                    split_endpoint(connection.local),
                    split_endpoint(connection.remote),
                    connection.gateway,
                )
                home = connect_home(registry, [connection], identity)
                assert home is not None
                try:
                    home.send({"op": "route", "origin": connection.origin,
                               "peer": connection.remote, "to": ""})  # fmt: skip
                    home.expect("via")
                finally:
                    home.close()
            except (HijackError, OSError) as exc:
                if key not in told:
                    told.add(key)
                    lines.append(f"{ends} ended; its home node still rewrites it: {exc}")
                continue
            registry.forget_routed(connection.local, connection.remote)
            told.discard(key)
            lines.append(f"{ends} ended: its rules removed")
        return lines


def _all_tcp() -> set[tuple[str, str]]:
    """(local, remote) of every IPv4 TCP socket of this network namespace but those in
    TIME_WAIT or CLOSE: those have ended (a FIN the peer sends again then reaches the home
    node, which answers it with a reset: the peer closes all the same)."""
    found = set()
    with contextlib.suppress(OSError), open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] not in ENDED_STATES:
                found.add((_hex_endpoint(fields[1]), _hex_endpoint(fields[2])))
    return found


def _hex_endpoint(text: str) -> str:
    address, port = text.split(":")
    packed = int(address, 16).to_bytes(4, "little")
    return f"{socket.inet_ntoa(packed)}:{int(port, 16)}"


def source_towards(address: str) -> str:
    """This node's address on its route to `address` (a connected UDP socket's: no packet
    is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((address, 9))
        return str(probe.getsockname()[0])


def routable(found: procfs.SocketInfo) -> bool:
    """Whether a connection's packets cross a link this node can forward: an established
    IPv4 TCP connection to a peer on another machine."""
    if found.family != socket.AF_INET or found.type != socket.SOCK_STREAM:
        return False
    if found.state != "ESTABLISHED" or not found.remote:
        return False
    peer = split_endpoint(found.remote)[0]
    return not peer.startswith("127.") and not is_ours(peer)


def is_ours(address: str) -> bool:
    """Whether `address` is one of this node's (a bind to it is allowed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                return False
            raise HijackError(f"cannot tell whether {address} is this node's: {exc}") from None
    return True
