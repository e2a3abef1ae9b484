"""What `hijack status` shows, gathered from the registry, the shadows and the node daemons.

The registry says what hijack did; the shadows say what holds now (the home
shadow is the authority on where its migrant runs and on what its relays
carry); the node daemons say whether they can be reached. Every question
asked of another process is bounded (QUERY_TIMEOUT) and asked in parallel,
so a dead shadow, a vanished process or an unreachable node is shown as
such and never holds the answer up. `snapshot_to_json` is the `--json`
output, documented in docs/status.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, astuple, dataclass
from pathlib import Path
from typing import Any, TypeVar

from hijack import lockbook
from hijack.errors import HijackError
from hijack.node import pki
from hijack.node import swap as swapping
from hijack.node.channel import Channel
from hijack.node.daemon import parse_address
from hijack.node.move import mover_gone
from hijack.process.tree import read_tree
from hijack.registry import (
    EventRecord,
    MemberRecord,
    MoveRecord,
    ProcessRecord,
    Registry,
    node_name,
)
from hijack.shadow import control
from hijack.shadow.program import ended_path
from hijack.sys import packet_route, procfs

SCHEMA_VERSION = 1
QUERY_TIMEOUT = 0.5  # seconds for each shadow or daemon to answer
MAX_WORKERS = 32
ACTIVE_PHASES = frozenset(
    {"connecting", "precopying", "streaming", "restoring", "switching", "post-copy"}
)
RECENT_MOVES = 20
RECENT_EVENTS = 30
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class State(enum.Enum):
    """Where a process is in its life, as `hijack status` tells it."""

    ATTACHED = "attached"  # runs on this node, its shadow beside it
    RUNNING = "running"  # moved here from another node; its home shadow relays its streams
    MOVED = "moved"  # moved away: runs on another node, its shadow here relays
    MOVING = "moving"  # a move of it is in progress
    RESTORED = "restored"  # rebuilt here from an image, no shadow
    CHECKPOINTED = "checkpointed"  # dumped and killed; its shadow holds its descriptors
    # Stopped after a move whose outcome is unknown (`hijack recover` settles it), or
    # whose post-copy broke off (here the original or there the copy: by hand).
    HELD = "held"
    GONE = "gone"  # it no longer runs (ended, killed, or its pid belongs to another process)
    UNKNOWN = "unknown"  # a registry state this hijack does not know


class Health(enum.Enum):
    OK = "ok"  # it answered
    DEAD = "dead"  # its process is gone
    UNREACHABLE = "unreachable"  # no answer in time, or its socket refused us (error says which)


@dataclass(frozen=True)
class HeldFd:
    """A descriptor of the process the shadow keeps a copy of."""

    fd: int  # the process's number
    kind: str  # as hijack.sys.procfs.FdKind
    target: str


@dataclass(frozen=True)
class MemberHeld:
    """What the shadow of a tree holds of one member (not the root): by its word."""

    pid: int
    held: tuple[HeldFd, ...]


@dataclass(frozen=True)
class MemberView:
    """A descendant of an attached process: attached with it, or born since."""

    pid: int
    parent: int  # its parent now (when it runs), else when it was attached
    program: str
    attached: bool  # attached with its root: the shadow holds its descriptors
    alive: bool  # it runs (with its recorded start time, when attached)


@dataclass(frozen=True)
class StreamView:
    """A descriptor proxied through the home shadow while the process runs elsewhere."""

    id: str  # the shadow's stream id: "fd:N", or "acc:K" for a client it accepted
    fd: int | None  # N of "fd:N"
    kind: str  # "stream" or "listener"
    relay: str  # the node end of its relay connection, "" when none
    bytes_to_process: int  # read from the original, sent on to the process
    bytes_from_process: int  # from the process, written to the original
    buffered_to_process: int  # held by the shadow, not yet sent to the process
    buffered_from_process: int  # held by the shadow, not yet written to the original
    # The original TCP connection's two addresses ([its own, its peer's]; () for others),
    # and whether its other end is a process this node manages: `hijack swap` can join
    # the two directly (docs/protocol.md, "Socket swap").
    original: tuple[str, ...] = ()
    swappable: bool = False


@dataclass(frozen=True)
class SwappedView:
    """A stream a socket swap took off its relay (docs/protocol.md, "Socket swap"): the
    shadow's counts of it when it retired it, which never change after."""

    id: str
    original: tuple[str, ...]  # the connection's two addresses, [its own, its peer's]
    bytes_to_process: int
    bytes_from_process: int


@dataclass(frozen=True)
class ShadowView:
    pid: int | None
    where: str  # "local": its control socket here; "remote": the home shadow, over TCP
    health: Health
    error: str | None
    mode: str | None  # home, holding or away, by its own word
    location: str | None  # where the process runs by its word; "" while not relaying
    held: tuple[HeldFd, ...]
    streams: tuple[StreamView, ...]
    members: tuple[MemberHeld, ...] = ()  # the other members of its tree
    swapped: tuple[SwappedView, ...] = ()  # its streams that went direct


@dataclass(frozen=True)
class MoveView(MoveRecord):
    """A move as the registry has it, and whether it is still going on."""

    in_progress: bool  # an unfinished phase and the frozen process still there
    expected_bytes: int | None  # while in progress: the resident memory of the frozen process


@dataclass(frozen=True)
class ProcessView:
    pid: int
    program: str
    home_node: str
    current_node: str  # by the home shadow's word when it answered, else the registry's
    state: State
    registry_state: str
    alive: bool | None  # does `pid` run on this node; None when it runs elsewhere
    home_pid: int | None  # for a process that moved here: its pid at home
    shadow: ShadowView | None
    last_move: MoveView | None
    note: str | None = None  # what status could not check, or why the row is what it is
    members: tuple[MemberView, ...] = ()  # its descendants, parents before children


@dataclass(frozen=True)
class NodeView:
    name: str
    address: str | None  # its daemon, "ip:port"; None when known by name only
    last_seen: float | None  # when a move last reached it
    reachable: bool | None  # None: not checked (no address)
    check: str | None  # "ping" (over the node channel's TLS) or "connect" (TCP only)
    latency_ms: float | None
    error: str | None


@dataclass(frozen=True)
class NetworkLockView:
    """A network lock a `dump --kill` took and no restore has lifted yet (hijack.lockbook)."""

    table: str
    pid: int
    connection: str  # what it locks, for people
    image: str  # the image whose restore lifts it, or "-" (it went to stdout)
    taken_at: float
    standing: str  # lockbook.Standing's words
    stale: bool  # nothing but `hijack recover` would lift it


@dataclass(frozen=True)
class RoutedView:
    """A connection relayed by packets that runs on this node (hijack.node.packet_relay)."""

    local: str
    remote: str
    origin: str
    gateway: str
    home_node: str


@dataclass(frozen=True)
class Snapshot:
    schema_version: int
    node: str
    state_dir: str
    taken_at: float
    processes: tuple[ProcessView, ...]
    moves: tuple[MoveView, ...]
    nodes: tuple[NodeView, ...]
    events: tuple[EventRecord, ...]
    network_locks: tuple[NetworkLockView, ...]
    routed: tuple[RoutedView, ...] = ()
    packet_tables: tuple[str, ...] = ()  # this node's rewrite and hold tables (their home)

    @property
    def moves_in_progress(self) -> list[MoveView]:
        return [move for move in self.moves if move.in_progress]


# -- gathering -----------------------------------------------------------------------


def gather(registry: Registry, timeout: float = QUERY_TIMEOUT) -> Snapshot:
    """Everything hijack knows on this node, now; back within about 2 * `timeout`."""
    here = node_name()
    records = {record.pid: record for record in registry.processes()}
    moves = tuple(_move_view(record, registry.directory) for record in registry.moves(RECENT_MOVES))
    known_nodes = {name: (address, last_seen) for name, address, last_seen in registry.nodes()}
    events = tuple(registry.recent_events(RECENT_EVENTS))
    identity = _identity()

    shadow_wheres = {
        pid: where for pid, record in records.items() if (where := _shadow_where(record, here))
    }
    shadow_questions = {
        pid: functools.partial(
            _ask_local_shadow if where == "local" else _ask_remote_shadow, records[pid], timeout
        )
        for pid, where in shadow_wheres.items()
    }
    node_questions = {
        name: functools.partial(_ask_node, name, address, last_seen, identity, timeout)
        for name, (address, last_seen) in known_nodes.items()
    }
    with _Questions(len(shadow_questions) + len(node_questions)) as questions:
        shadow_answers = questions.ask(shadow_questions)
        node_answers = questions.ask(node_questions)
        questions.wait(2 * timeout)
    shadows = _collect(
        shadow_answers,
        lambda pid, why: _unreachable_shadow(records[pid], shadow_wheres[pid], why),
    )
    nodes = _collect(
        node_answers,
        lambda name, why: NodeView(
            name, known_nodes[name][0], known_nodes[name][1], False, None, None, why
        ),
    )
    mentioned = {record.home_node for record in records.values()}
    mentioned |= {record.current_node for record in records.values()}
    mentioned |= {move.destination for move in moves} | {move.source for move in moves}
    for name in mentioned - set(nodes) - {here}:
        nodes[name] = NodeView(name, None, None, None, None, None, None)

    shadows = _mark_swappable(shadows, [r for r in records.values() if r.state == "attached"])
    return Snapshot(
        schema_version=SCHEMA_VERSION,
        node=here,
        state_dir=str(registry.directory),
        taken_at=time.time(),
        processes=tuple(
            _process_view(record, shadows.get(pid), moves, here, nodes, registry.members(pid))
            for pid, record in records.items()
        ),
        moves=moves,
        nodes=tuple(nodes[name] for name in sorted(nodes)),
        events=events,
        network_locks=_network_locks(),
        routed=tuple(RoutedView(*astuple(r)) for r in registry.routed_connections().values()),
        packet_tables=_packet_tables(),
    )


def _packet_tables() -> tuple[str, ...]:
    """This node's rewrite and hold tables: only on a node forwarding IPv4, the home node
    of such connections (not asked elsewhere: nftables' first use costs ~70 ms)."""
    if not packet_route.forwarding():
        return ()
    try:
        return tuple(sorted(packet_route.tables()))
    except HijackError:
        return ()  # nftables unreadable here: status shows the rest


def _network_locks() -> tuple[NetworkLockView, ...]:
    """The locks written down in this node's state directory that are still there."""
    try:
        standing = lockbook.standing()
    except (OSError, HijackError):
        return ()  # nftables unreadable here: status shows the rest
    return tuple(
        NetworkLockView(
            table=lock.record.table,
            pid=lock.record.pid,
            connection=lock.record.what,
            image=lock.record.image,
            taken_at=lock.record.taken_at,
            standing=lock.standing.value,
            stale=lock.standing.stale,
        )
        for lock in standing
    )


def _process_view(
    record: ProcessRecord,
    shadow: ShadowView | None,
    moves: tuple[MoveView, ...],
    here: str,
    nodes: Mapping[str, NodeView],
    members: Iterable[MemberRecord] = (),
) -> ProcessView:
    # Its moves since it was recorded: an older move of the same pid was another process.
    last_move = next(
        (
            move
            for move in moves
            if move.pid == record.pid and move.started_at >= record.attached_at
        ),
        None,
    )
    elsewhere = record.state == "moved" or record.current_node != here
    alive = None if elsewhere else _runs(record.pid, record.start_time)
    current_node = record.current_node
    if shadow is not None and shadow.mode == "away" and shadow.location:
        current_node = shadow.location  # the home shadow knows where it is now
    state = _state(record.state, alive, last_move, shadow)
    return ProcessView(
        pid=record.pid,
        program=record.program,
        home_node=record.home_node,
        current_node=current_node,
        state=state,
        registry_state=record.state,
        alive=alive,
        home_pid=record.home_pid,
        shadow=shadow,
        last_move=last_move,
        note=_note(record, state, here, current_node, nodes.get(current_node)),
        members=_member_views(record, state, members),
    )


def _member_views(
    record: ProcessRecord, state: State, members: Iterable[MemberRecord]
) -> tuple[MemberView, ...]:
    """The tree of `record` as it is now: its members attached (or restored) with it
    (alive or not), and, while it runs here attached, the tree re-read from /proc (a
    descendant born since is shown, not attached: its shadow does not hold its
    descriptors). A tree moved here (RUNNING) is read from /proc too: it moved as one,
    its members' streams relayed by its home shadow (hijack.node.tree_move)."""
    recorded = {member.pid: member for member in members}
    views: list[MemberView] = []
    if state in (State.ATTACHED, State.RUNNING):
        with contextlib.suppress(HijackError):
            for member in read_tree(record.pid).members[1:]:
                known = recorded.pop(member.pid, None)
                attached = state is State.RUNNING or (
                    known is not None and _runs(member.pid, known.start_time)
                )
                alive = member.state not in ("Z", "X")
                views.append(MemberView(member.pid, member.ppid, member.comm, attached, alive))
    # A restored tree's members were rebuilt with it: no shadow holds their descriptors.
    attached = record.state != "restored"
    for known in recorded.values():  # ended, or no longer below the root
        alive = _runs(known.pid, known.start_time)
        views.append(MemberView(known.pid, known.parent, known.program, attached, alive))
    return tuple(views)


def _note(
    record: ProcessRecord, state: State, here: str, current_node: str, node: NodeView | None
) -> str | None:
    """What a row cannot vouch for (a process away on a node that does not answer may have
    ended there unseen: its node releases the shadow when it sees it end), or what to do."""
    if state is State.MOVED and node is not None and node.reachable is False:
        return (
            f"node {current_node} does not answer: whether the process still runs there is"
            f" unknown (`hijack forget {record.pid}` ends this record and its shadow)"
        )
    if state is State.GONE and record.home_node != here and record.state == "running":
        return "ended unseen: this node's daemon releases its home shadow (it looks at start)"
    if state is State.GONE:
        return "`hijack recover` clears this record"
    return None


def _state(
    registry_state: str, alive: bool | None, last_move: MoveView | None, shadow: ShadowView | None
) -> State:
    if last_move is not None and last_move.in_progress:
        return State.MOVING
    if registry_state == "moved":
        # The home shadow lives as long as its migrant does (the node running
        # it releases the shadow when it ends): no shadow, no process.
        if shadow is not None and shadow.health is Health.DEAD:
            return State.GONE
        return State.MOVED
    if registry_state == "checkpointed":
        return State.CHECKPOINTED  # killed on purpose: its image and its shadow are the process
    if registry_state in ("exited", "gone") or not alive:
        return State.GONE
    known = {
        "attached": State.ATTACHED,
        "running": State.RUNNING,
        "restored": State.RESTORED,
        "held": State.HELD,
    }
    return known.get(registry_state, State.UNKNOWN)


def _move_view(record: MoveRecord, state_directory: Path) -> MoveView:
    in_progress, expected = False, None
    if (
        record.phase in ACTIVE_PHASES
        and record.finished_at is None
        and not mover_gone(state_directory, record.id)
    ):
        # The mover holds its lock until the move ends: if it is free, the
        # mover died before it could write the end.
        stat = _stat(record.pid)
        if stat is not None:
            in_progress, expected = True, max(stat.rss * PAGE_SIZE, record.bytes_sent)
    return MoveView(**asdict(record), in_progress=in_progress, expected_bytes=expected)


def _stat(pid: int, start_time: int = 0) -> procfs.ProcStat | None:
    """/proc/PID/stat of a running process (`start_time` checked when given), else None."""
    try:
        stat = procfs.read_stat(pid)
    except HijackError:
        return None
    if stat.state in ("Z", "X") or (start_time and stat.starttime != start_time):
        return None
    return stat


def _runs(pid: int, start_time: int = 0) -> bool:
    return _stat(pid, start_time) is not None


# -- asking the shadows ---------------------------------------------------------------


def _shadow_where(record: ProcessRecord, here: str) -> str | None:
    """Where the shadow of `record` is: "local" (this node), "remote" (a migrant's home), or
    None (it has none: restored from an image)."""
    if record.home_node == here and record.shadow_control:
        return "local"
    if record.relay_address and record.relay_token:
        return "remote"
    return None


def _ask_local_shadow(record: ProcessRecord, timeout: float) -> ShadowView:
    assert record.shadow_control is not None
    if record.shadow_pid is not None and not _runs(record.shadow_pid):
        return _dead_shadow(record)
    try:
        answer = control.request(record.shadow_control, {"op": "status"}, timeout=timeout)
    except HijackError as exc:
        if record.shadow_pid is not None and not _runs(record.shadow_pid):
            return _dead_shadow(record)  # it died while we asked
        return _unreachable_shadow(record, "local", str(exc))
    return _answered_shadow(answer, "local")


def _ask_remote_shadow(record: ProcessRecord, timeout: float) -> ShadowView:
    try:
        answer = control.remote_request(record.home_endpoint(), {"op": "status"}, timeout=timeout)
    except HijackError as exc:
        return _unreachable_shadow(record, "remote", str(exc))
    return _answered_shadow(answer, "remote")


def _answered_shadow(answer: Mapping[str, Any], where: str) -> ShadowView:
    try:
        held = _held(answer["fds"])
        streams = tuple(_stream_view(stream) for stream in answer.get("streams", []))
        members = tuple(
            MemberHeld(int(member["pid"]), _held(member["fds"]))
            for member in answer.get("members", [])
        )
        return ShadowView(
            pid=int(answer["shadow_pid"]),
            where=where,
            health=Health.OK,
            error=None,
            mode=str(answer["mode"]),
            location=str(answer.get("location", "")),
            held=held,
            streams=streams,
            members=members,
            swapped=tuple(
                SwappedView(
                    id=str(row["id"]),
                    original=tuple(str(end) for end in row.get("original", [])),
                    bytes_to_process=int(row["bytes_out"]),
                    bytes_from_process=int(row["bytes_in"]),
                )
                for row in answer.get("swapped", [])
            ),
        )
    except (KeyError, TypeError, ValueError) as exc:
        return ShadowView(
            None, where, Health.UNREACHABLE, f"malformed status answer: {exc!r}", None, None, (), ()
        )


def _mark_swappable(
    shadows: dict[int, ShadowView], attached: list[ProcessRecord]
) -> dict[int, ShadowView]:
    """The shadows, each stream marked `swappable` when its other end is managed here: a
    stream of another shadow here with the addresses reversed, or an attached process."""
    originals = {
        stream.original
        for shadow in shadows.values()
        if shadow.where == "local"
        for stream in shadow.streams
        if len(stream.original) == 2
    }

    def swappable(stream: StreamView) -> bool:
        if len(stream.original) != 2:
            return False
        own, peer = stream.original
        return (peer, own) in originals or any(
            swapping.holds_connection(record, peer, own) for record in attached
        )

    return {
        pid: dataclasses.replace(
            shadow,
            streams=tuple(
                dataclasses.replace(stream, swappable=swappable(stream))
                for stream in shadow.streams
            ),
        )
        if shadow.where == "local"
        else shadow
        for pid, shadow in shadows.items()
    }


def _held(fds: Iterable[Mapping[str, Any]]) -> tuple[HeldFd, ...]:
    return tuple(HeldFd(int(fd["fd"]), str(fd["kind"]), str(fd["target"])) for fd in fds)


def _stream_view(stream: Mapping[str, Any]) -> StreamView:
    stream_id = str(stream["id"])
    kind, _, number = stream_id.partition(":")
    return StreamView(
        id=stream_id,
        fd=int(number) if kind == "fd" else None,
        kind=str(stream["kind"]),
        relay=str(stream.get("relay", "")),
        # The shadow counts from the original's side: "out" leaves it for the process.
        bytes_to_process=int(stream["bytes_out"]),
        bytes_from_process=int(stream["bytes_in"]),
        buffered_to_process=int(stream["buffered_out"]),
        buffered_from_process=int(stream["buffered_in"]),
        original=tuple(str(end) for end in stream.get("original", [])),
    )


def _dead_shadow(record: ProcessRecord) -> ShadowView:
    assert record.shadow_control is not None
    try:  # a shadow that ended by itself said why
        reason = ended_path(record.shadow_control).read_text().strip()
    except OSError:
        reason = ""
    error = f"ended: {reason}" if reason else f"process {record.shadow_pid} is gone"
    return ShadowView(record.shadow_pid, "local", Health.DEAD, error, None, None, (), ())


def _unreachable_shadow(record: ProcessRecord, where: str, why: str) -> ShadowView:
    pid = record.shadow_pid if where == "local" else None
    return ShadowView(pid, where, Health.UNREACHABLE, why, None, None, (), ())


# -- asking the node daemons ----------------------------------------------------------


def _identity() -> pki.NodeIdentity | None:
    try:
        return pki.load_identity()
    except HijackError:
        return None  # no certificate here: the daemons can only be seen listening, not asked


def _ask_node(
    name: str,
    address: str,
    last_seen: float | None,
    identity: pki.NodeIdentity | None,
    timeout: float,
) -> NodeView:
    check = "connect" if identity is None else "ping"
    started = time.perf_counter()
    error = None
    try:
        host_port = parse_address(address)
        if identity is None:
            socket.create_connection(host_port, timeout=timeout).close()
        else:
            channel = Channel.connect(host_port, identity, timeout=timeout, expect=name)
            try:
                channel.send({"op": "ping"})
                answer = channel.receive()
            finally:
                channel.close()
            if not answer.get("pong"):
                raise HijackError(f"unexpected answer to ping: {answer!r:.80}")
            if answer.get("node") != name:
                error = f"answers as node {answer.get('node')!r}"
    except (HijackError, OSError) as exc:
        return NodeView(name, address, last_seen, False, check, None, str(exc) or repr(exc))
    latency_ms = (time.perf_counter() - started) * 1000
    return NodeView(name, address, last_seen, True, check, latency_ms, error)


# -- questions in parallel, answers by one deadline -------------------------------------

K = TypeVar("K")
T = TypeVar("T")


class _Questions:
    """Questions to other processes, asked at once in threads; whatever has not
    answered by the deadline is left behind (each has its own time-out, so the
    threads end soon after) and reported as unanswered."""

    def __init__(self, count: int) -> None:
        self.pool = ThreadPoolExecutor(
            max_workers=max(1, min(MAX_WORKERS, count)), thread_name_prefix="hijack-status"
        )
        self.futures: list[Future[Any]] = []

    def ask(self, questions: Mapping[K, Callable[[], T]]) -> dict[K, Future[T]]:
        asked = {key: self.pool.submit(question) for key, question in questions.items()}
        self.futures += asked.values()
        return asked

    def wait(self, timeout: float) -> None:
        wait(self.futures, timeout=timeout)

    def __enter__(self) -> _Questions:
        return self

    def __exit__(self, *_: object) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def _collect(futures: Mapping[K, Future[T]], unanswered: Callable[[K, str], T]) -> dict[K, T]:
    answers: dict[K, T] = {}
    for key, future in futures.items():
        if not future.done() or future.cancelled():
            answers[key] = unanswered(key, "no answer in time")
        elif (exc := future.exception()) is not None:
            answers[key] = unanswered(key, f"internal error: {exc!r}")  # a bug: shown, not raised
        else:
            answers[key] = future.result()
    return answers


# -- rates between two snapshots -------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    """Bytes per second between two snapshots (the live view's rates)."""

    streams: Mapping[tuple[int, str], tuple[float, float]]  # (pid, stream id) -> (to, from) process
    moves: Mapping[str, float]  # move id -> image bytes sent per second


def throughput(before: Snapshot, after: Snapshot) -> Throughput:
    seconds = after.taken_at - before.taken_at
    if seconds <= 0:
        return Throughput({}, {})
    earlier = {
        (process.pid, stream.id): stream for process, stream in proxied_streams(before.processes)
    }
    streams = {}
    for process, stream in proxied_streams(after.processes):
        previous = earlier.get((process.pid, stream.id))
        if previous is not None:
            to_process = stream.bytes_to_process - previous.bytes_to_process
            from_process = stream.bytes_from_process - previous.bytes_from_process
            streams[process.pid, stream.id] = (
                max(0, to_process) / seconds,
                max(0, from_process) / seconds,
            )
    sent_before = {move.id: move.bytes_sent for move in before.moves}
    moves = {
        move.id: max(0, move.bytes_sent - sent_before[move.id]) / seconds
        for move in after.moves
        if move.id in sent_before
    }
    return Throughput(streams, moves)


def proxied_streams(processes: Iterable[ProcessView]) -> list[tuple[ProcessView, StreamView]]:
    """Every stream the shadows relay, with its process."""
    return [
        (process, stream)
        for process in processes
        if process.shadow is not None
        for stream in process.shadow.streams
    ]


# -- JSON -----------------------------------------------------------------------------


def snapshot_to_json(snapshot: Snapshot) -> dict[str, Any]:
    """The `hijack status --json` document (docs/status.md)."""
    return asdict(snapshot, dict_factory=_json_object)


def _json_object(fields: list[tuple[str, Any]]) -> dict[str, Any]:
    return {name: _json_value(value) for name, value in fields}


def _json_value(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value
