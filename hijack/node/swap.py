"""`hijack swap`: join two managed ends of a relayed TCP connection directly.

docs/protocol.md, "Socket swap", is the design; in short, run on the home
node of the relayed end(s): find the pairs (a stream one shadow here relays
whose other end is a process this node manages: attached here, or moved away
with its own shadow here), freeze both ends where they run (the node daemon's
`swap_end`, or this command for an end that runs here), let what each wrote
reach the other side, take what is owed to each from its shadow, make the
direct connection in repair mode at both nodes with the bytes in flight
already in its receive queues, put it under each end's descriptor, and then
let both run and have the shadows retire the stream. Any failure before the
commit puts everything back: both ends have their old sockets, the shadows
relay on, nothing was lost.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hijack import testpoint
from hijack.errors import HijackError
from hijack.mutator.tracee import signals_deferred
from hijack.node import pki, swap_end
from hijack.node.channel import Channel, ChannelError
from hijack.node.daemon import DEFAULT_PORT, log, parse_address
from hijack.node.swap_end import split_endpoint
from hijack.process.tree import read_tree
from hijack.registry import ProcessRecord, Registry, node_name
from hijack.shadow import control
from hijack.shadow.relay import RELAYS_CHANGING
from hijack.sys import procfs

SWAP_WAIT = 10.0  # seconds each draining step may take before the swap is given up
# A drain that goes on making progress may take longer: an encrypted relay holds more on
# the way (the forwarder's buffers and TLS), and the ends are frozen meanwhile.
DRAIN_LIMIT = 30.0
OWED_PIECE = 4 << 20  # owed bytes sent to a remote end in one message
READ_TRIES = 3
SHADOW_TIMEOUT = 15.0  # a shadow's answer to one swap step (it waits SWAP_WAIT at most)
# A home node's answer to a swap asked from away: one pair's swap (its drains DRAIN_LIMIT
# each, the ends' helpers started, what is owed sent).
HOME_ANSWER_TIMEOUT = 180.0


@dataclass(frozen=True)
class Shadowed:
    """A relayed end's stream at its home shadow (here)."""

    control: str  # the shadow's control socket
    stream: str  # the stream's id there


@dataclass(frozen=True)
class End:
    """One end of a connection a swap joins: a process and its socket where it runs."""

    pid: int  # where it runs
    node: str  # the node it runs on
    program: str
    local: str  # its socket's address there ("ip:port")...
    peer: str  # ... and its peer's: how the swap finds the socket
    port: int  # the port the process keeps as its own (its original connection's)
    shadow: Shadowed | None = None  # relayed: the stream at its home shadow
    # Its node's address as its relay comes from there: that node's daemon's host, on the
    # default port, when the registry does not know the node (moved there from away).
    host: str = ""

    def describe(self) -> str:
        via = f", relayed as {self.shadow.stream}" if self.shadow else ""
        return f"{self.program} {self.pid} on {self.node}{via}"


@dataclass(frozen=True)
class Pair:
    first: End
    second: End

    def describe(self) -> str:
        return f"{self.first.describe()} <-> {self.second.describe()}"


@dataclass
class Joined:
    pair: Pair
    addresses: tuple[str, str] = ("", "")  # where each end's new socket is


def _port(endpoint: str) -> int:
    return split_endpoint(endpoint)[1]


def _shadow_status(record: ProcessRecord) -> dict[str, Any] | None:
    if not record.shadow_control:
        return None
    with contextlib.suppress(HijackError):  # ended meanwhile: nothing to swap
        return control.request(record.shadow_control, {"op": "status"}, timeout=SHADOW_TIMEOUT)
    return None


def _relayed_ends(registry: Registry) -> Iterator[tuple[End, list[str]]]:
    """Every stream a shadow here relays to a process moved away: (its end, [original's
    own address, its peer's])."""
    here = node_name()
    for record in registry.processes():
        if record.state != "moved" or record.home_node != here:
            continue
        status = _shadow_status(record)
        if status is None or not status.get("location_pid"):
            continue
        for row in status.get("streams", []):
            original = row.get("original") or []
            if row.get("kind") != "stream" or len(original) != 2 or not row.get("relay"):
                continue
            shadow = Shadowed(record.shadow_control or "", str(row["id"]))
            end = End(
                pid=int(status["location_pid"]),
                node=str(status["location"]),
                program=record.program,
                local=str(row["relay"]),
                peer=str(row["shadow_end"]),
                port=_port(original[0]),
                shadow=shadow,
                host=str(row.get("node_host", "")),
            )
            yield end, [str(original[0]), str(original[1])]


def holds_connection(record: ProcessRecord, local: str, peer: str) -> bool:
    """Whether the attached process of `record` holds the TCP connection `local` -> `peer`."""
    return _attached_socket(record, local, peer) is not None


def _attached_socket(record: ProcessRecord, local: str, peer: str) -> End | None:
    """The attached process's end of the connection `local` -> `peer`, if it (or a member
    of its tree) holds it."""
    for _ in range(READ_TRIES):  # /proc tables change while read: a failed read is retried
        try:
            holders = read_tree(record.pid).pids
            table = procfs.read_socket_table(record.pid)
            entries = [(pid, entry) for pid in holders for entry in procfs.list_fds(pid)]
        except (HijackError, OSError):
            continue
        for pid, entry in entries:
            found = table.get(entry.ino) if entry.kind is procfs.FdKind.SOCKET else None
            if found is not None and (found.local, found.remote) == (local, peer):
                return End(pid, node_name(), record.program, local, peer, _port(local))
        return None
    return None


def find_pairs(registry: Registry) -> list[Pair]:
    """The relayed connections whose two ends this node manages, each once."""
    here = node_name()
    relayed = list(_relayed_ends(registry))
    attached = [r for r in registry.processes() if r.state == "attached" and r.home_node == here]
    pairs: list[Pair] = []
    seen: set[tuple[str, str]] = set()
    for end, (own, theirs) in relayed:
        if (own, theirs) in seen:
            continue
        other: End | None = None
        for candidate, (their_own, their_peer) in relayed:
            if (their_own, their_peer) == (theirs, own) and candidate is not end:
                other = candidate
        for record in attached:
            other = other or _attached_socket(record, theirs, own)
        if other is not None:
            seen.update({(own, theirs), (theirs, own)})
            pairs.append(Pair(end, other))
    return pairs


# -- one end, where it runs ----------------------------------------------------------


class EndSession:
    """One end of a swap, frozen where it runs by a helper (hijack.node.swap_end): the
    messages of `swap_end`, one answer each. The helper aborts (the process gets its old
    socket back) if it loses us before `commit`, whatever killed us."""

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def open(self, end: End, standby: bool = False) -> None:
        """Have the helper freeze `end`'s process and find its socket; `standby`: find it,
        and freeze it only at freeze() (a later move starts its helper before its own
        freeze: hijack.node.repoint)."""
        request = {"op": "swap_end", "pid": end.pid, "local": end.local, "peer": end.peer}
        try:
            self.ask({**request, "standby": True} if standby else request)
        except BaseException:
            self.close()
            raise

    def freeze(self) -> None:
        """A helper opened in standby: freeze the process now."""
        self.ask({"op": "freeze"})

    def sent(self, wait: float) -> tuple[int, int | None]:
        """(bytes its socket has still to send after at most `wait` s, what the process
        wrote to it in all: None where its kernel does not tell)."""
        answer = self.ask({"op": "sent", "wait": wait})
        written = answer.get("written")
        return int(answer["queued"]), None if written is None else int(written)

    def join(self, local: str, remote: str, send_seq: int, recv_next: int, owed: bytes) -> None:
        # What is owed goes first, a piece a message (a node frame is at most 16 MiB).
        for start in range(0, len(owed), OWED_PIECE):
            self.ask(
                {"op": "owed", "data": base64.b64encode(owed[start : start + OWED_PIECE]).decode()}
            )
        self.ask(
            {"op": "join", "local": local, "remote": remote, "send_seq": send_seq,
             "recv_next": recv_next}
        )  # fmt: skip

    def repoint(self, remote: str) -> None:
        """The same connection, made again towards `remote` (docs/protocol.md, "Later
        moves"): in repair mode, under the process's descriptor, until commit."""
        self.ask({"op": "repoint", "remote": remote})

    def commit(self) -> None:
        try:
            self.ask({"op": "commit"})
        finally:
            self.close()

    def abort(self) -> None:
        try:
            with contextlib.suppress(HijackError, OSError, ValueError):
                self.ask({"op": "abort"})
        finally:
            self.close()


class LocalEnd(EndSession):
    """An end that runs on this node: its helper is our child."""

    def __init__(self, end: End, standby: bool = False) -> None:
        self.helper = swap_end.Helper()
        self.open(end, standby)

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        answer = self.helper.ask(message)
        if "error" in answer:
            raise HijackError(str(answer["error"]))
        return answer

    def close(self) -> None:
        self.helper.close()


class RemoteEnd(EndSession):
    """An end that runs on another node: its daemon's helper (`swap_end`)."""

    def __init__(self, end: End, channel: Channel, standby: bool = False) -> None:
        self.channel = channel
        self.open(end, standby)

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        self.channel.send(message)
        return self.channel.answer(self.channel.receive())

    def close(self) -> None:
        self.channel.close()


# -- the swap -------------------------------------------------------------------------


@dataclass
class Swap:
    """One pair's swap, step by step; undo() puts back whatever was done."""

    registry: Registry
    pair: Pair
    identity: pki.NodeIdentity
    id: str = field(default_factory=lambda: f"swap-{secrets.token_hex(6)}")
    sessions: list[EndSession] = field(default_factory=list)
    paused: list[Shadowed] = field(default_factory=list)
    channels: dict[str, Channel] = field(default_factory=dict)
    leases: list[socket.socket] = field(default_factory=list)  # see control.hold
    # A relayed end's stream -> what its frozen process wrote in all: an encrypted
    # relay's shadow waits until that much came through the forwarder (swap_state).
    written: dict[Shadowed, int] = field(default_factory=dict)
    report: Callable[[str], None] = lambda _: None

    def run(self) -> tuple[str, str]:
        """Swap the pair; returns each end's new address ("ip:port")."""
        ends = [self.pair.first, self.pair.second]
        relayed = [end for end in ends if end.shadow is not None]
        direct = [end for end in ends if end.shadow is None]
        sessions: dict[int, EndSession] = {}
        try:
            addresses = self._addresses()
            # 1. The shadows of the relayed ends send them nothing more; what they wrote
            # goes on to the other end, whose answers are kept for the direct connection.
            for end in relayed:
                assert end.shadow is not None
                self.leases.append(self._hold(end.shadow))
                self.paused.append(end.shadow)
            # 2. Running on, each relayed end takes in all its shadow had sent it; then it
            # stops, and all it wrote reaches the other end (which runs on and reads it if
            # it is not relayed).
            self._wait_drained("unacknowledged")
            for end in relayed:
                sessions[id(end)] = self._freeze(end)
                self.sessions.append(sessions[id(end)])
            for end in relayed:
                assert end.shadow is not None
                written = self._check_sent(end, sessions[id(end)])
                if written is not None:
                    self.written[end.shadow] = written
            self._wait_drained("unacknowledged", "towards_peer")
            # 3. An end that is not relayed stops now; what it wrote reaches the shadow.
            for end in direct:
                sessions[id(end)] = self._freeze(end)
                self.sessions.append(sessions[id(end)])
                self._check_sent(end, sessions[id(end)])
            testpoint.reached("swap-frozen")
            # 4. The direct connection, with what each end is owed in its receive queue.
            owed = [self._owed(end) for end in ends]
            seqs = [secrets.randbits(32), secrets.randbits(32)]
            local = [f"{addresses[0]}:{ends[0].port}", f"{addresses[1]}:{ends[1].port}"]
            sessions[id(ends[0])].join(local[0], local[1], seqs[0], seqs[1], owed[0])
            sessions[id(ends[1])].join(local[1], local[0], seqs[1], seqs[0], owed[1])
            testpoint.reached("swap-joined")
        except BaseException:
            self.undo()
            raise
        # The switch: both ends leave repair mode and run on the direct connection; the
        # relay retires. Once begun it is finished: a signal waits until it is over.
        # A remote end goes first: if its node does not answer, the local one is
        # still undone (the one window: a commit done there whose answer was lost).
        with signals_deferred():
            ordered = sorted(self.sessions, key=lambda session: isinstance(session, LocalEnd))
            try:
                ordered[0].commit()
            except BaseException:
                self.sessions.remove(ordered[0])
                self.undo()
                raise
            for session in ordered[1:]:
                session.commit()
            self.sessions = []
            self._end_shadows("retire")
        return local[0], local[1]

    def _hold(self, shadowed: Shadowed) -> socket.socket:
        """`write`, on a connection the shadow watches until the swap is over. A stream
        whose process just moved on from a node is refused until its old relay is read to
        its end (the process's last bytes there, at the pace the original's peer reads
        them): asked again meanwhile, up to DRAIN_LIMIT."""
        deadline = time.monotonic() + DRAIN_LIMIT
        while True:
            try:
                lease, _ = control.hold(
                    shadowed.control,
                    {"op": "swap", "swap": self.id, "stream": shadowed.stream, "step": "write"},
                    timeout=SHADOW_TIMEOUT,
                )
            except HijackError as exc:
                if RELAYS_CHANGING not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
                continue
            return lease

    def _close(self) -> None:
        for lease in self.leases:
            lease.close()
        self.leases = []
        for channel in self.channels.values():
            channel.close()
        self.channels = {}

    def _wait_drained(self, *counts: str) -> None:
        """Until every paused shadow's `counts` are 0: `unacknowledged`, bytes it sent its
        process not yet in the process's socket; `towards_peer`, what the process wrote
        not yet in the other end's socket."""
        start = time.monotonic()
        deadline, least = start + SWAP_WAIT, -1
        while True:
            states = {s.stream: self._shadow(s, "state") for s in self.paused}
            busy = {
                stream: state
                for stream, state in states.items()
                if any(state[count] for count in counts)
            }
            if not busy:
                return
            left = sum(state[count] for state in busy.values() for count in counts)
            now = time.monotonic()
            if least < 0 or left < least:  # progress: SWAP_WAIT more, up to DRAIN_LIMIT
                deadline, least = min(now + SWAP_WAIT, start + DRAIN_LIMIT), left
            if now > deadline:
                stream, state = next(iter(busy.items()))
                waited = now - start
                raise HijackError(
                    f"{stream} did not drain within {waited:.0f} s ({state['towards_peer']}"
                    f" bytes on their way to its peer: {state.get('coming', '?')} coming to"
                    f" its shadow, {state.get('held', '?')} held there,"
                    f" {state.get('in_original', '?')} in the original's send queue;"
                    f" {state['unacknowledged']} to the process)"
                )
            time.sleep(0.002)

    def undo(self) -> None:
        for session in reversed(self.sessions):
            with contextlib.suppress(Exception):
                session.abort()
        self.sessions = []
        self._end_shadows("resume")

    def _end_shadows(self, step: str) -> None:
        """`retire` (swapped) or `resume` (not) at every paused shadow; then let go of
        their leases and our channels."""
        for shadowed in self.paused:
            with contextlib.suppress(HijackError):
                self._shadow(shadowed, step)
        self.paused = []
        self._close()

    def _addresses(self) -> tuple[str, str]:
        """Where each end's new socket is: its node's address, as the other reaches it."""
        here = node_name()
        first, second = self.pair.first, self.pair.second
        if first.node == second.node == here:
            raise HijackError(f"{self.pair.describe()}: both ends run here; nothing is relayed")
        found = []
        for end, other in ((first, second), (second, first)):
            if end.node != here:
                found.append(self._daemon(end.node)[0])
            else:  # this node as the other end's node reaches it: our side of its channel
                found.append(self._channel(other.node).sock.getsockname()[0])
        return found[0], found[1]

    def _daemon(self, node: str) -> tuple[str, int]:
        address = self.registry.node_address(node)
        if address is not None:
            return parse_address(address)
        # Moved there by a move run away from here: its relay comes from that node's
        # address, where its daemon listens on the default port (its name is checked).
        hosts = [end.host for end in (self.pair.first, self.pair.second) if end.node == node]
        if hosts and hosts[0]:
            return hosts[0], DEFAULT_PORT
        raise HijackError(f"node {node}: this node does not know its address")

    def _channel(self, node: str) -> Channel:
        channel = self.channels.get(node)
        if channel is None:
            channel = Channel.connect(self._daemon(node), self.identity, expect=node)
            self.channels[node] = channel
        return channel

    def _freeze(self, end: End) -> EndSession:
        if end.node == node_name():
            return LocalEnd(end)
        channel = self.channels.pop(end.node, None)
        if channel is None:
            channel = Channel.connect(self._daemon(end.node), self.identity, expect=end.node)
        return RemoteEnd(end, channel)

    @staticmethod
    def _check_sent(end: End, session: EndSession) -> int | None:
        """Until all `end` wrote left its socket; what it wrote there in all."""
        left, written = session.sent(SWAP_WAIT)
        if left:
            raise HijackError(f"{end.describe()}: {left} bytes it wrote did not leave its node")
        return written

    def _shadow(self, shadowed: Shadowed, step: str) -> dict[str, Any]:
        message: dict[str, Any] = {
            "op": "swap",
            "swap": self.id,
            "stream": shadowed.stream,
            "step": step,
        }
        if step == "state" and shadowed in self.written:
            message["written"] = self.written[shadowed]

        return control.request(shadowed.control, message, timeout=SHADOW_TIMEOUT)

    def _owed(self, end: End) -> bytes:
        """What `end` is owed: what its shadow kept (the other end's last writes)."""
        if end.shadow is None:
            return b""
        owed = bytearray()
        while True:
            answer = control.request(
                end.shadow.control,
                {"op": "swap", "swap": self.id, "stream": end.shadow.stream, "step": "collect",
                 "offset": len(owed)},
                timeout=SHADOW_TIMEOUT,
            )  # fmt: skip
            owed += base64.b64decode(str(answer["owed"]))
            if len(owed) >= int(answer["total"]) or not answer["owed"]:
                return bytes(owed)


def swap(
    pid: int, report: Callable[[str], None] = lambda _: None, *, after_move: bool = False
) -> list[tuple[str, str]]:
    """Swap every relayed connection of `pid` whose other end this node manages too;
    returns each pair (described) and what became of it (its new addresses, or why it
    stayed). `after_move`: a move's own swap (`hijack move`, once the process runs at its
    destination): none that qualifies is no error then, only nothing to do."""
    return list(swap_each(pid, report, after_move=after_move))


def swap_each(
    pid: int, report: Callable[[str], None] = lambda _: None, *, after_move: bool = False
) -> Iterator[tuple[str, str]]:
    """As swap(), each pair's outcome as soon as it is known (the daemon's `swap` tells
    its asker each as it comes)."""
    with Registry() as registry:
        if registry.find(pid) is None:
            if after_move:  # gone meanwhile (it ended): nothing of it to swap
                return
            raise HijackError(f"process {pid} is not managed by node {node_name()}")
        pairs = [
            pair
            for pair in find_pairs(registry)
            if pid in (pair.first.pid, pair.second.pid) or _home_pid(registry, pair, pid)
        ]
        if after_move:  # not a connection inside one tree (one shadow relays both ends)
            pairs = [pair for pair in pairs if not _one_shadow(pair)]
        if not pairs and not after_move:
            raise HijackError(
                f"process {pid} has no relayed connection whose other end node {node_name()}"
                " manages"
            )
        identity = pki.load_identity()
        for pair in pairs:
            try:
                first, second = Swap(registry, pair, identity, report=report).run()
            except (HijackError, OSError) as exc:
                yield pair.describe(), f"relayed still: {exc}"
                continue
            yield pair.describe(), f"direct: {first} <-> {second}"


# -- run away from home: the home node's daemon swaps -------------------------------


@dataclass(frozen=True)
class Home:
    """Where a process's relayed streams are swapped: its home node (its shadow's), when
    that is not this node."""

    node: str
    pid: int  # the process's pid there (its registry's)
    address: tuple[str, int]  # that node's daemon


def home_of(registry: Registry, pid: int) -> Home | None:
    """The home of `pid` if it is another node (a migrant here); None if it is this node
    or `pid` is not managed (a move attaches it here). Read before a move: the record
    goes with the process."""
    record = registry.find(pid)
    # Attached here: its shadow is here, whatever this node is named now (a move refuses
    # a node renamed since, in its own words).
    if record is None or record.home_node == node_name() or record.state == "attached":
        return None
    known = registry.node_address(record.home_node)
    if known is not None:
        address = parse_address(known)
    elif record.relay_address:  # its shadow's relay is on that node: its daemon, default port
        address = (split_endpoint(record.relay_address)[0], DEFAULT_PORT)
    else:
        return None  # no way to reach it: nothing is swapped (a move says why it cannot go)
    return Home(record.home_node, record.home_pid or record.pid, address)


def swap_at_home(
    home: Home, identity: pki.NodeIdentity, registry: Registry, *, after_move: bool = False
) -> Iterator[tuple[str, str]]:
    """swap_each() of the process run by `home`'s daemon (its `swap`), each pair and its
    outcome as the daemon tells it. The nodes this one knows go with the request: the
    home node may not know the node the process runs on now (a move from here)."""
    try:
        channel = Channel.connect(home.address, identity, expect=home.node)
    except HijackError as exc:
        raise HijackError(f"its home node {home.node}: {exc}") from None
    with contextlib.closing(channel):
        channel.sock.settimeout(HOME_ANSWER_TIMEOUT)
        nodes = {name: address for name, address, _ in registry.nodes()}
        channel.send({"op": "swap", "pid": home.pid, "after_move": after_move, "nodes": nodes})
        while True:
            answer = channel.receive()
            if "error" in answer:
                reason = " ".join(str(answer["error"]).split())
                raise HijackError(f"its home node {home.node}: {reason}")
            if answer.get("done"):
                return
            yield str(answer["pair"]), str(answer["outcome"])


def serve_swap(channel: Channel, request: dict[str, Any]) -> None:
    """The daemon's `swap` (docs/protocol.md, "Socket swap"): swap_each() of `pid` (this
    node's), asked by a node where the process ran (a move run away from home, or
    `hijack swap` there): one `{pair, outcome}` message each, then `done` (or `error`)."""
    pid, nodes = request.get("pid"), request.get("nodes", {})
    if not isinstance(pid, int) or not isinstance(nodes, dict):
        channel.send({"error": "a swap request needs a pid (and nodes: name -> address)"})
        return
    started = time.monotonic()
    log(f"swap of process {pid} asked by node {channel.peer}")
    try:
        with Registry() as registry:  # the nodes we do not know yet: where its ends run
            for name, address in nodes.items():
                if name != node_name() and registry.node_address(str(name)) is None:
                    parse_address(str(address))
                    registry.record_node(str(name), str(address))
        for described, outcome in swap_each(pid, after_move=bool(request.get("after_move"))):
            log(f"swap of process {pid}: {described}: {outcome}")
            channel.send({"pair": described, "outcome": outcome})
    except ChannelError:
        raise  # the asker is gone: the pair under way was finished or undone, no more
    except (HijackError, OSError) as exc:
        log(f"swap of process {pid}: {exc}")
        channel.send({"error": str(exc)})
        return
    log(f"swap of process {pid} done in {time.monotonic() - started:.1f} s")
    channel.send({"done": True})


def _one_shadow(pair: Pair) -> bool:
    """Whether both ends are relayed by one shadow (two members of one tree)."""
    first, second = pair.first.shadow, pair.second.shadow
    return first is not None and second is not None and first.control == second.control


def _home_pid(registry: Registry, pair: Pair, pid: int) -> bool:
    """Whether `pid` (as this node's registry knows it) is one of the pair's processes."""
    record = registry.find(pid)
    if record is None or record.shadow_control is None:
        return False
    return any(
        end.shadow is not None and end.shadow.control == record.shadow_control
        for end in (pair.first, pair.second)
    )
