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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hijack.errors import HijackError
from hijack.node import pki
from hijack.node.channel import Channel, DataWriter
from hijack.node.daemon import DEFAULT_PORT, parse_address
from hijack.node.swap import End, EndSession, LocalEnd, RemoteEnd
from hijack.node.swap_end import read_state, split_endpoint, state_fields
from hijack.registry import Registry
from hijack.sys import pidfd

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

    def prepare(
        self, pid: int, plan: list[Proxy], destination: str, member: int = 0
    ) -> list[Proxy]:
        """Freeze each direct connection's peer and make its end again towards
        `destination` (the destination node's address): the plan of process `pid` with
        each `direct` entry's state (its queues in `queues`, sent after the move message).
        A tree's move calls it for each member holding one (`member`: its pid in the move
        message, 0 for the root).

        The connection keeps its sequence numbers: each end is made again from its own
        state, and what one end acknowledged must be in the other's receive queue: what
        the process has sent is read first, then the peer's whole state, then what the
        process received (the old sockets run on meanwhile; bytes sent twice are
        dropped by TCP as duplicates, none is lost)."""
        direct = [p for p in plan if p.kind == "direct"]
        handle = pidfd.pidfd_open(pid)
        try:
            copies = {
                p.fd: socket.socket(fileno=pidfd.pidfd_getfd(handle, p.fd, pid)) for p in direct
            }
        finally:
            os.close(handle)
        try:
            sent = {fd: read_state(copy.fileno()) for fd, copy in copies.items()}
            with Registry() as registry:
                for proxy in direct:
                    self.sessions.append(self._freeze_peer(proxy, registry))
            joined = {}
            for proxy, session in zip(direct, self.sessions, strict=True):
                local = f"{destination}:{split_endpoint(proxy.local)[1]}"
                session.repoint(local)
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

    def send_unread(self, channel: Channel) -> None:
        """After the move message, before the image, if it names a direct connection: the
        queues of each, one after the other in the order of the message's proxies, as one
        data stream (binary, as the image: DATA frames, then DATA_END)."""
        if not self.queues:
            return
        writer = DataWriter(channel)
        for data in self.queues.values():
            writer.write(data)
        writer.close()

    def _freeze_peer(self, proxy: Proxy, registry: Registry) -> EndSession:
        host = split_endpoint(proxy.peer)[0]
        end = End(0, "", "", proxy.peer, proxy.local, 0)
        if host == split_endpoint(proxy.local)[0]:  # the peer runs on this node
            return LocalEnd(end)
        known = peer_daemon(registry, host)
        name, address = known if known else (None, (host, DEFAULT_PORT))
        return RemoteEnd(end, Channel.connect(address, self.identity, expect=name))

    def commit(self) -> list[str]:
        """The move is committed: each peer leaves repair mode and runs on. What went wrong:
        a peer whose node does not answer now has its connection broken (the one window,
        as a swap's)."""
        problems = []
        for session in self.sessions:
            try:
                session.commit()
            except (HijackError, OSError) as exc:
                problems.append(f"the peer of a direct connection did not go live: {exc}")
        self.sessions = []
        return problems

    def abort(self) -> None:
        for session in reversed(self.sessions):
            with contextlib.suppress(Exception):
                session.abort()
        self.sessions = []
