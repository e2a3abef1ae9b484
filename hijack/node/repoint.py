"""A later move of a swapped process: its direct connections follow it (docs/protocol.md,
"Later moves").

A TCP connection that `hijack swap` joined directly is an ordinary connection between
the nodes the two processes run on; no shadow relays it. When one of them moves on,
the mover, within the move's freeze: has the peer's node freeze the peer (its
`swap_end` helper, found by the connection's two addresses), waits until what each
wrote is in the other's receive queue (nothing crosses after that: both are frozen),
copies what the moving process has not read, and joins them anew as a swap does: the
peer's helper makes its end in repair mode towards the destination and puts it under
the peer's descriptor; the destination makes the moving process's end (a plan entry of
kind `direct`) in repair mode too. Both go live only once the move is committed; an
abort closes both repair-mode sockets (they send nothing) and gives the peer its old
socket back: the connection is as it was, nothing lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hijack.errors import HijackError
from hijack.node import pki
from hijack.node.channel import Channel, DataWriter
from hijack.node.daemon import DEFAULT_PORT, parse_address
from hijack.node.swap import End, EndSession, LocalEnd, RemoteEnd
from hijack.node.swap_end import read_state, split_endpoint, state_fields
from hijack.process.tree import read_tree
from hijack.registry import Registry
from hijack.sys import pidfd, procfs, tcp_repair
from hijack.timing import Laps

if TYPE_CHECKING:
    from hijack.node.move import Proxy


def peer_daemon(registry: Registry, host: str) -> tuple[str, tuple[str, int]] | None:
    """(name, address) of the node daemon at `host`, as this node's registry knows it; else
    None and the cluster's default port (the daemon is asked who it is)."""
    for name, address, _ in registry.nodes():
        if parse_address(address)[0] == host:
            return name, parse_address(address)
    return None


@dataclass
class Repointed:
    """The peers of a moving process's direct connections, each frozen by its node's helper
    and, once joined, holding its end towards the destination in repair mode."""

    identity: pki.NodeIdentity
    sessions: list[EndSession] = field(default_factory=list)
    # By (member, fd), in the order of the move message's proxies: send queue + received.
    queues: dict[tuple[int, int], bytes] = field(default_factory=dict)
    # By the connection's (local, peer) addresses here: the peers' helpers started before
    # the freeze (standby), each told to freeze the peer in it.
    standing: dict[tuple[str, str], EndSession] = field(default_factory=dict)
    # (pid, fd) of each old end the moving process holds here, silenced at the commit.
    old_ends: list[tuple[int, int]] = field(default_factory=list)

    def standby(self, pid: int) -> None:
        """Before the freeze, while `pid` (and its tree) runs: for each direct connection it
        holds, its peer's helper started (a channel to the peer's node, a process there
        that finds the peer's holder), the peer not frozen yet. None of that depends on
        the state the freeze reads; a connection that fails here is tried again in it."""
        try:
            held = direct_held(pid)
        except (HijackError, OSError):
            return
        if not held:
            return
        with Registry() as registry:
            for local, peer in held:
                with contextlib.suppress(HijackError, OSError):
                    self.standing[(local, peer)] = self._open_peer(local, peer, registry, True)

    def prepare(
        self,
        pid: int,
        plan: list[Proxy],
        destination: str,
        member: int = 0,
        laps: Laps | None = None,
    ) -> list[Proxy]:
        """Freeze each direct connection's peer and make its end again towards
        `destination` (the destination node's address): the plan of process `pid` with
        each `direct` entry's state (its queues in `queues`, sent after the move message).
        A tree's move calls it for each member holding one (`member`: the member's pid,
        as the move message names it; a single process's move leaves it 0).

        The connection keeps its sequence numbers: each end is made again from its own
        state, and what one end acknowledged must be in the other's receive queue: what
        the process has sent is read first, then the peer's whole state, then what the
        process received (the old sockets run on meanwhile; bytes sent twice are
        dropped by TCP as duplicates, none is lost). `laps`: its steps, as the freeze's."""
        direct = [p for p in plan if p.kind == "direct"]
        handle = pidfd.pidfd_open(pid)
        try:
            copies = {
                p.fd: socket.socket(fileno=pidfd.pidfd_getfd(handle, p.fd, pid)) for p in direct
            }
        finally:
            os.close(handle)
        lap = laps.lap if laps is not None else (lambda _: None)
        try:
            sent = {fd: read_state(copy.fileno()) for fd, copy in copies.items()}
            lap("direct peers: sent")
            mine = []
            with contextlib.ExitStack() as opened:
                registries: list[Registry] = []  # opened if a peer has no helper standing

                def registry() -> Registry:
                    if not registries:
                        registries.append(opened.enter_context(Registry()))
                    return registries[0]

                for proxy in direct:
                    mine.append(self._freeze_peer(proxy, registry))
                    self.sessions.append(mine[-1])
                    self.old_ends.append((pid, proxy.fd))
            lap("direct peers: frozen")
            joined = {}
            for proxy, session in zip(direct, mine, strict=True):
                local = f"{destination}:{split_endpoint(proxy.local)[1]}"
                session.repoint(local)
                lap("direct peers: made again")
                state = dataclasses.replace(
                    read_state(copies[proxy.fd].fileno()),
                    send_seq=sent[proxy.fd].send_seq,
                    send_queue=sent[proxy.fd].send_queue,
                )
                queues = state.send_queue + state.received
                self.queues[(member, proxy.fd)] = queues
                joined[proxy.fd] = dataclasses.replace(
                    proxy, local=local, tcp=state_fields(state), queue_bytes=len(queues)
                )
        finally:
            for copy in copies.values():
                copy.close()
        return [joined.get(p.fd, p) for p in plan]

    def send_unread(self, channel: Channel) -> int:
        """After the move message, before the image, if it names a direct connection: the
        queues of each, one after the other in the order of the message's proxies, as one
        data stream (binary, as the image: DATA frames, then DATA_END). The bytes sent:
        sent while frozen, as the image (a busy connection's are most of it)."""
        if not self.queues:
            return 0
        writer = DataWriter(channel)
        for data in self.queues.values():
            writer.write(data)
        writer.close()
        return writer.sent

    def _freeze_peer(self, proxy: Proxy, registry: Callable[[], Registry]) -> EndSession:
        standing = self.standing.pop((proxy.local, proxy.peer), None)
        if standing is not None:
            try:
                standing.freeze()
                return standing
            except (HijackError, OSError):  # its channel timed out, say: a helper anew
                standing.close()
            except BaseException:
                standing.close()
                raise
        return self._open_peer(proxy.local, proxy.peer, registry())

    def _open_peer(
        self, local: str, peer: str, registry: Registry, standby: bool = False
    ) -> EndSession:
        """A helper for the peer of the connection `local` -> `peer` on the peer's node
        (this one's own child if it runs here), the peer frozen unless `standby`."""
        host = split_endpoint(peer)[0]
        end = End(0, "", "", peer, local, 0)
        if host == split_endpoint(local)[0]:  # the peer runs on this node
            return LocalEnd(end, standby)
        known = peer_daemon(registry, host)
        name, address = known if known else (None, (host, DEFAULT_PORT))
        return RemoteEnd(end, Channel.connect(address, self.identity, expect=name), standby)

    def commit(self) -> list[str]:
        """The move is committed: each peer leaves repair mode and runs on. What went wrong:
        a peer whose node does not answer now has its connection broken (the one window,
        as a swap's)."""
        self._let_standing_go()
        problems = []
        for session in self.sessions:
            try:
                session.commit()
            except (HijackError, OSError) as exc:
                problems.append(f"the peer of a direct connection did not go live: {exc}")
        self.sessions = []
        self._silence_old_ends()
        return problems

    def _silence_old_ends(self) -> None:
        """The moving process's old ends (it never runs here again) put in repair mode:
        closed, each vanishes without a segment (no FIN to the peer, no TIME_WAIT keeping
        its addresses), so a later move home can make the connection again here."""
        for pid, fd in self.old_ends:
            with contextlib.suppress(HijackError, OSError):  # committed: nothing may fail
                tcp_repair.silence(pid, fd)
        self.old_ends = []

    def abort(self) -> None:
        self._let_standing_go()
        self.old_ends = []
        for session in reversed(self.sessions):
            with contextlib.suppress(Exception):
                session.abort()
        self.sessions = []

    def _let_standing_go(self) -> None:
        """The helpers started in standby and not used (the connection gone meanwhile)."""
        for session in self.standing.values():
            with contextlib.suppress(Exception):
                session.abort()
        self.standing = {}


def prune_direct(registry: Registry) -> list[str]:
    """Forget the direct connections `registry` records that no process this node manages
    holds any more (it ended, closed the connection, or moved on with it): a later
    connection between the same two addresses would be taken for one (a move would
    ask the peer's node to move an end it does not manage). A line each, for recover."""
    recorded = registry.direct_connections()
    if not recorded:
        return []
    held: set[tuple[str, str]] = set()
    for record in registry.processes():  # each one's network namespace, as it is now
        with contextlib.suppress(HijackError, OSError):  # not running here, or gone
            held |= {(s.local, s.remote) for s in procfs.read_socket_table(record.pid).values()}
    lines = []
    for local, remote in sorted(recorded - held):
        registry.forget_direct(local, remote)
        lines.append(f"direct connection {local} <-> {remote}: no process here holds it; forgotten")
    return lines


def direct_held(pid: int) -> list[tuple[str, str]]:
    """(local, peer) of each direct connection (this node's registry) that `pid` or a
    member of its tree holds now."""
    with Registry() as registry:
        direct = registry.direct_connections()
    if not direct:
        return []
    table = procfs.read_socket_table(pid)
    held = []
    for member in read_tree(pid).pids:
        with contextlib.suppress(HijackError, OSError):  # a member gone meanwhile
            for entry in procfs.list_fds(member):
                found = table.get(entry.ino) if entry.kind is procfs.FdKind.SOCKET else None
                if found is not None and (found.local, found.remote) in direct:
                    held.append((found.local, found.remote))
    return held
