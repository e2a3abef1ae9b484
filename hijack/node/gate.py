"""The node daemon's front door: accepting, limiting and TLS handshakes, in one thread.

A connection is accepted and its TLS handshake run here, non-blocking, in a
selector loop: a peer that has not proved a certificate of the cluster holds
no worker thread, only a descriptor and a few KiB, and for HANDSHAKE_TIMEOUT
seconds at most. Only an authenticated peer is handed to a thread of its own
(`serve`).

Limits (docs/security.md, "The node daemon under load"):
- at most `per_address` connections from one peer address, handshaking or
  served; more from it are closed at once;
- at most `handshakes` handshakes at a time: a new connection past that
  evicts the oldest handshake of the address with the most under way (a
  flood from many connections keeps evicting itself, so a real node, one
  handshake from its address, gets through);
- at most `connections` authenticated connections served at a time: past
  that, a newly authenticated peer is told `busy` and closed.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hijack.errors import HijackError
from hijack.node import pki
from hijack.node.channel import HEAD, Kind
from hijack.shadow.door import RefusalLog, accept_waiting, oldest_of_most_crowded

HANDSHAKE_TIMEOUT = 5.0  # seconds a connecting peer has to complete the TLS handshake
MAX_HANDSHAKES = 64
MAX_CONNECTIONS = 64
MAX_PER_ADDRESS = 16
LISTEN_BACKLOG = 512  # connections the kernel queues before the loop takes them


_BUSY = json.dumps({"error": "this node serves as many connections as it may; try again"})
BUSY = HEAD.pack(Kind.MESSAGE, len(_BUSY)) + _BUSY.encode()


@dataclass(frozen=True)
class Limits:
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    handshakes: int = MAX_HANDSHAKES
    connections: int = MAX_CONNECTIONS
    per_address: int = MAX_PER_ADDRESS


@dataclass
class _Pending:
    tls: ssl.SSLSocket
    peer: tuple[str, int]
    deadline: float


Serve = Callable[[ssl.SSLSocket, tuple[str, int]], None]


class Gate:
    def __init__(
        self,
        listener: socket.socket,
        identity: pki.NodeIdentity,
        limits: Limits,
        serve: Serve,
        log: Callable[[str], None],
    ) -> None:
        self.listener = listener
        self.identity = identity
        self.limits = limits
        self.serve = serve
        self.log = log
        self.selector = selectors.DefaultSelector()
        # Insertion order is age: the first is the oldest handshake.
        self.pending: collections.OrderedDict[int, _Pending] = collections.OrderedDict()
        self.counts = threading.Lock()
        self.per_address: collections.Counter[str] = collections.Counter()
        self.served = 0
        self._log_refusal = RefusalLog(log, 4 * limits.handshakes)
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.running = True

    # -- the loop -------------------------------------------------------------------

    def run(self) -> None:
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ, None)
        self.selector.register(self._wake_read, selectors.EVENT_READ, None)
        try:
            while self.running:
                timeout = None
                if self.pending:
                    oldest = next(iter(self.pending.values())).deadline  # all wait as long
                    timeout = max(oldest - time.monotonic(), 0.0)
                for key, _events in self.selector.select(timeout):
                    if key.fileobj is self.listener:
                        self._accept_all()
                    elif key.fileobj == self._wake_read:
                        with contextlib.suppress(BlockingIOError):
                            os.read(self._wake_read, 64)
                    else:
                        self._step(key.fd)
                self._expire()
        finally:
            for fd in list(self.pending):
                self._drop(fd)
            self.selector.close()
            # The wake pipe stays open: stop() may still be called (a second
            # SIGTERM), and must never write into a descriptor reused since.

    def stop(self) -> None:
        """End run() (from a signal handler or another thread)."""
        self.running = False
        with contextlib.suppress(BlockingIOError):  # full: it is woken already
            os.write(self._wake_write, b"x")

    # -- accepting ------------------------------------------------------------------

    def _accept_all(self) -> None:
        accept_waiting(self.listener, self._admit, self._log_refusal)

    def _admit(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        address = peer[0]
        with self.counts:
            crowded = self.per_address[address] >= self.limits.per_address
            if not crowded:
                self.per_address[address] += 1
        if crowded:
            sock.close()
            self._log_refusal(
                address, f"more than {self.limits.per_address} connections from this address"
            )
            return
        if len(self.pending) >= self.limits.handshakes:
            evicted = self._most_crowded()
            self._log_refusal(
                self.pending[evicted].peer[0],
                f"dropped a handshake: {self.limits.handshakes} under way",
            )
            self._drop(evicted)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.identity.server_context().wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        except (OSError, HijackError) as exc:
            # A revocation list that does not load refuses every peer (fail closed),
            # once a while in the log.
            sock.close()
            self._release(address)
            self._log_refusal(address, str(exc))
            return
        fd = tls.fileno()
        self.pending[fd] = _Pending(tls, peer, time.monotonic() + self.limits.handshake_timeout)
        self.selector.register(fd, selectors.EVENT_READ, None)
        self._step(fd)  # the ClientHello may be there already

    def _most_crowded(self) -> int:
        """The oldest handshake of the address with the most under way."""
        return oldest_of_most_crowded({fd: entry.peer[0] for fd, entry in self.pending.items()})

    def _step(self, fd: int) -> None:
        entry = self.pending.get(fd)
        if entry is None:
            return
        try:
            entry.tls.do_handshake()
        except ssl.SSLWantReadError:
            self.selector.modify(fd, selectors.EVENT_READ, None)
            return
        except ssl.SSLWantWriteError:
            self.selector.modify(fd, selectors.EVENT_WRITE, None)
            return
        except OSError as exc:
            where = f"{entry.peer[0]}:{entry.peer[1]}"
            _discard_unread(entry.tls)  # so the close is a FIN: the peer reads our alert
            self._drop(fd)
            self.log(f"refused {where}: TLS handshake: {pki.describe_tls_error(exc)}")
            return
        self.selector.unregister(fd)
        del self.pending[fd]
        self._hand_over(entry)

    def _hand_over(self, entry: _Pending) -> None:
        with self.counts:
            busy = self.served >= self.limits.connections
            if not busy:
                self.served += 1
        if busy:
            self._log_refusal(entry.peer[0], f"{self.limits.connections} connections served")
            # Told why if the socket takes it at once; never waited on.
            with contextlib.suppress(OSError):
                entry.tls.send(BUSY)
            self._close(entry.tls, entry.peer[0])
            return
        entry.tls.setblocking(True)
        threading.Thread(target=self._serve, args=(entry,), daemon=True).start()

    def _serve(self, entry: _Pending) -> None:
        try:
            self.serve(entry.tls, entry.peer)
        finally:
            with self.counts:
                self.served -= 1
            self._close(entry.tls, entry.peer[0])

    # -- ending ---------------------------------------------------------------------

    def _expire(self) -> None:
        now = time.monotonic()
        for fd, entry in list(self.pending.items()):
            if entry.deadline <= now:
                self._log_refusal(
                    entry.peer[0],
                    f"no TLS handshake within {self.limits.handshake_timeout:g} s",
                )
                self._drop(fd)

    def _drop(self, fd: int) -> None:
        entry = self.pending.pop(fd)
        self.selector.unregister(fd)
        self._close(entry.tls, entry.peer[0])

    def _close(self, tls: ssl.SSLSocket, address: str) -> None:
        try:
            tls.close()
        finally:
            self._release(address)

    def _release(self, address: str) -> None:
        with self.counts:
            self.per_address[address] -= 1
            if self.per_address[address] <= 0:
                del self.per_address[address]


UNREAD_DISCARDED = 1 << 18  # bytes at most read and dropped from a refused peer


def _discard_unread(tls: ssl.SSLSocket) -> None:
    """Drop what the peer sent that was not read (the plain socket's bytes, under TLS).

    Closed with unread bytes, a socket answers with a reset, and the peer may
    lose the alert that says why it was refused (`certificate revoked`).
    """
    dropped = 0
    with contextlib.suppress(OSError):
        while dropped < UNREAD_DISCARDED:
            chunk = socket.socket.recv(tls, 65536, socket.MSG_DONTWAIT)
            if not chunk:
                return
            dropped += len(chunk)
