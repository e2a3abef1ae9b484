"""The shadow's TCP door: connections to its relay port admitted without ever blocking.

Every connection to the shadow's TCP endpoint must pass an exchange first
(hijack.shadow.relay_link.Admission: TLS with a cluster certificate, then the
migrant's token proved). The shadow's one thread also pumps every relayed
stream, so that exchange is driven by the same event loop, a step each time
the peer's bytes come, never waited on: a stranger who connects and says
nothing, or says it one byte a second, costs a descriptor and a few KiB, not
a moment of anyone's stream.

Limits (docs/security.md, "The home shadow's relay port"):
- a peer has HANDSHAKE_TIMEOUT seconds from its connection to prove the token,
  however it trickles its bytes; once it has, it has HANDSHAKE_TIMEOUT seconds
  between two steps to send its header (a `migrated` request carries the
  unread bytes of every stream: it may be long);
- at most MAX_PENDING exchanges at a time: a new connection past that evicts
  the oldest exchange of a peer that has not proved the token, from the
  address with the most under way (a flood keeps evicting itself, a real
  node gets through).
"""

from __future__ import annotations

import collections
import contextlib
import selectors
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hijack.errors import HijackError
from hijack.shadow.relay_link import Admission, PeerClosed, ShadowIdentity, TlsLink

HANDSHAKE_TIMEOUT = 5.0
MAX_PENDING = 32
LOG_EVERY = 10.0  # seconds between two log lines about one address's refusals

Admitted = Callable[[dict[str, Any], TlsLink, tuple[str, int]], None]


@dataclass(eq=False)
class _Pending:
    admission: Admission
    peer: tuple[str, int]
    deadline: float


class Door:
    """The pending exchanges of the shadow's endpoint, in its selector."""

    def __init__(
        self,
        listener: socket.socket,
        selector: selectors.BaseSelector,
        admitted: Admitted,
        log: Callable[[str], None],
    ) -> None:
        self.listener = listener
        self.selector = selector
        self.admitted = admitted
        self.log = log
        self.identity: ShadowIdentity | None = None
        self.token = b""
        # Insertion order is age: the first is the oldest exchange.
        self.pending: collections.OrderedDict[int, _Pending] = collections.OrderedDict()
        self._log_refusal = RefusalLog(log, 4 * MAX_PENDING, "refused a connection from")
        listener.setblocking(False)
        selector.register(listener, selectors.EVENT_READ, self._accept_all)

    def close(self) -> None:
        for fd in list(self.pending):
            self._drop(fd)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.listener)
        self.listener.close()

    def next_deadline(self) -> float | None:
        """When the loop must look again (expire), or None with nothing pending."""
        return min((entry.deadline for entry in self.pending.values()), default=None)

    # -- accepting -------------------------------------------------------------------

    def _accept_all(self, _: Any, __: int) -> None:
        accept_waiting(self.listener, self._admit, self._log_refusal)

    def _admit(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        if self.identity is None:
            sock.close()
            return
        if len(self.pending) >= MAX_PENDING:
            evicted = self._most_crowded()
            if evicted is None:  # every one under way has proved the token: the newcomer waits
                sock.close()
                self._log_refusal(peer[0], f"{MAX_PENDING} connections under way")
                return
            self._log_refusal(
                self.pending[evicted].peer[0], f"dropped an exchange: {MAX_PENDING} under way"
            )
            self._drop(evicted)
        try:
            admission = Admission(sock, self.identity, self.token)
        except (OSError, HijackError) as exc:
            sock.close()
            self._log_refusal(peer[0], str(exc))
            return
        fd = sock.fileno()
        self.pending[fd] = _Pending(admission, peer, time.monotonic() + HANDSHAKE_TIMEOUT)
        self.selector.register(fd, selectors.EVENT_READ, self._on_event)
        self._step(fd)  # the ClientHello may be there already

    def _most_crowded(self) -> int | None:
        """The oldest exchange, not yet proved, of the address with the most under way."""
        strangers = {fd: e.peer[0] for fd, e in self.pending.items() if not e.admission.proved}
        return oldest_of_most_crowded(strangers) if strangers else None

    # -- stepping --------------------------------------------------------------------

    def _on_event(self, fileobj: Any, _: int) -> None:
        self._step(fileobj if isinstance(fileobj, int) else fileobj.fileno())

    def _step(self, fd: int) -> None:
        entry = self.pending.get(fd)
        if entry is None:
            return
        admission = entry.admission
        try:
            admission.step()
        except (OSError, HijackError) as exc:
            self._drop(fd)
            if not (admission.proved and isinstance(exc, PeerClosed)):  # else: not needed
                self.log(f"refused a connection from {entry.peer}: {exc}")
            return
        if admission.header is None:
            if admission.proved:  # a node of ours: time between its steps, not in all
                entry.deadline = time.monotonic() + HANDSHAKE_TIMEOUT
            events = selectors.EVENT_READ
            if admission.wants_write():
                events |= selectors.EVENT_WRITE
            self.selector.modify(fd, events, self._on_event)
            return
        self.selector.unregister(fd)
        del self.pending[fd]
        self.admitted(admission.header, admission.link, entry.peer)

    # -- ending ----------------------------------------------------------------------

    def expire(self) -> None:
        now = time.monotonic()
        for fd, entry in list(self.pending.items()):
            if entry.deadline <= now:
                stage = "its header" if entry.admission.proved else "a TLS handshake and proof"
                self._log_refusal(entry.peer[0], f"no {stage} within {HANDSHAKE_TIMEOUT:g} s")
                self._drop(fd)

    def _drop(self, fd: int) -> None:
        entry = self.pending.pop(fd)
        self.selector.unregister(fd)
        entry.admission.link.sock.close()


# -- what the node daemon's gate (hijack.node.gate) does alike ---------------------------


def accept_waiting(
    listener: socket.socket,
    admit: Callable[[socket.socket, tuple[str, int]], None],
    refuse: Callable[[str, str], None],
) -> None:
    """Accept every connection waiting on non-blocking `listener`: admit(sock, peer)."""
    while True:
        try:
            sock, peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # EMFILE and the like: a moment later it may pass
            refuse("*", f"cannot accept: {exc.strerror}")
            return
        admit(sock, (str(peer[0]), int(peer[1])))


def oldest_of_most_crowded(addresses: dict[int, str]) -> int:
    """Of `addresses` (a connection -> its peer's address, oldest first), the oldest of the
    address with the most: the one a flood gives up first."""
    under_way = collections.Counter(addresses.values())
    crowded = max(under_way.values())
    return next(fd for fd, address in addresses.items() if under_way[address] == crowded)


class RefusalLog:
    """Logs refusals one line per address at most every LOG_EVERY seconds: a flood does not
    fill the log; it remembers at most `bound` addresses."""

    def __init__(self, log: Callable[[str], None], bound: int, what: str = "refused") -> None:
        self.log = log
        self.bound = bound
        self.what = what
        self._logged: dict[str, float] = {}

    def __call__(self, address: str, why: str) -> None:
        now = time.monotonic()
        if now - self._logged.get(address, -LOG_EVERY) >= LOG_EVERY:
            self._logged[address] = now
            if len(self._logged) > self.bound:
                self._logged = {address: now}  # forget old addresses: bounded memory
            more = "more such refusals from it unlogged for a while"
            self.log(f"{self.what} {address}: {why} ({more})")
