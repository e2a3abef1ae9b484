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

import base64
import contextlib
import dataclasses
import fcntl
import os
import secrets
import socket
import struct
import termios
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hijack.errors import HijackError
from hijack.node import pki
from hijack.node.channel import Channel
from hijack.node.daemon import DEFAULT_PORT, parse_address
from hijack.node.swap import SWAP_WAIT, End, EndSession, LocalEnd, RemoteEnd
from hijack.node.swap_end import split_endpoint
from hijack.registry import Registry
from hijack.sys import pidfd, tcp_repair

UNREAD_PIECE = 4 << 20  # bytes of a direct connection's receive queue in one message

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
    unread: dict[int, bytes] = field(default_factory=dict)  # by fd: what it has yet to read

    def prepare(self, pid: int, plan: list[Proxy], destination: str) -> list[Proxy]:
        """Freeze each direct connection's peer and join it towards `destination` (the
        address of the destination node): the plan with each `direct` entry's fields."""
        direct = [p for p in plan if p.kind == "direct"]
        if not direct:
            return plan
        handle = pidfd.pidfd_open(pid)
        try:
            copies = {
                p.fd: socket.socket(fileno=pidfd.pidfd_getfd(handle, p.fd, pid)) for p in direct
            }
        finally:
            os.close(handle)
        try:
            with Registry() as registry:
                for proxy in direct:
                    self.sessions.append(self._freeze_peer(proxy, registry))
            for proxy in direct:  # all it wrote reaches its peer (frozen: nothing comes back)
                _wait_sent(copies[proxy.fd], proxy)
            for session in self.sessions:
                left = session.queued(SWAP_WAIT)
                if left:
                    raise HijackError(f"{left} bytes its peer wrote did not leave its node")
            joined = {}
            for proxy, session in zip(direct, self.sessions, strict=True):
                ours, theirs = secrets.randbits(32), secrets.randbits(32)
                local = f"{destination}:{split_endpoint(proxy.local)[1]}"
                session.join(proxy.peer, local, theirs, ours, b"")
                joined[proxy.fd] = dataclasses.replace(
                    proxy,
                    local=local,
                    send_seq=ours,
                    recv_next=theirs,
                )
                self.unread[proxy.fd] = _unread(copies[proxy.fd])
                joined[proxy.fd] = dataclasses.replace(
                    joined[proxy.fd], unread_bytes=len(self.unread[proxy.fd])
                )
        finally:
            for copy in copies.values():
                copy.close()
        return [joined.get(p.fd, p) if p.kind == "direct" else p for p in plan]

    def send_unread(self, channel: Channel) -> None:
        """After the move message, before the image: what the process has yet to read
        from each direct connection (`unread`, in pieces: a frame is at most 16 MiB)."""
        for fd, data in self.unread.items():
            for start in range(0, len(data), UNREAD_PIECE):
                piece = base64.b64encode(data[start : start + UNREAD_PIECE]).decode()
                channel.send({"op": "unread", "fd": fd, "data": piece})

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


def _wait_sent(sock: socket.socket, proxy: Proxy) -> None:
    deadline = time.monotonic() + SWAP_WAIT
    while _queued(sock, tcp_repair.SIOCOUTQ):
        if time.monotonic() > deadline:
            raise HijackError(
                f"fd {proxy.fd}: what the process wrote to {proxy.peer} did not leave"
                f" within {SWAP_WAIT:g} s"
            )
        time.sleep(0.001)


def _queued(sock: socket.socket, request: int) -> int:
    value: int = struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0" * 4))[0]
    return value


def _unread(sock: socket.socket) -> bytes:
    waiting = _queued(sock, termios.FIONREAD)
    return sock.recv(waiting, socket.MSG_PEEK | socket.MSG_DONTWAIT) if waiting else b""
