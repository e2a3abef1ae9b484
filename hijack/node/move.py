"""`hijack move PID --to HOST[:PORT]`: a live process moves to another node.

On the node the process runs on now:
1. check that every descriptor can go: reopened by path there, made again from
   the image (epoll, eventfd, unix socketpairs with what is queued in them, ...),
   or proxied through the home shadow (sockets, pipes, terminals); refuse naming
   the rest;
2. connect to the destination daemon (TLS, each side's certificate checked) — nothing has
   been touched yet, so a refusal changes nothing;
2a. with pre-copy (on by default for processes holding PRECOPY_MIN_BYTES of
   private memory): send memory in rounds while the process runs, each round
   the pages written since the one before (hijack.mutator.precopy), then
   check the descriptors again;
3. freeze the process (all threads stopped) — the freeze time starts;
4. tell the home shadow `migrating` (at home: first hand it the descriptors);
   away from home, copy the process's unread relay bytes (MSG_PEEK);
5. stream the image (after pre-copy: only what changed since the last round);
   the daemon restores it with relays to the shadow and answers `prepared`;
6. queue a SIGSTOP for the original (so it never runs on its own again, even
   if this command dies), then `commit`: the daemon lets it run and answers
   `running`;
7. away from home, take the datagrams the frozen process had not read from
   its UDP sockets; tell the shadow `migrated` (the new relays take over, those
   datagrams sent again): the freeze time ends; mark the process moved and
   kill the original.
If anything fails before the commit, the daemon kills what it built, the
shadow is told `aborted`, and the original resumes untouched (detached again
if the move attached it; the dirty-page tracking of pre-copy ends with the
move, either way). If the answer to the commit is lost, the daemon is asked
again what it decided; if it cannot tell, the original stays held stopped
for `hijack recover` (docs/protocol.md, "Settling a move").
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fcntl
import functools
import os
import secrets
import signal
import socket
import struct
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from hijack.errors import HijackError, ShadowError, Unsupported
from hijack.image import records as rec
from hijack.mutator import attach as attaching
from hijack.mutator.dump import (
    describe_segments,
    kill_stopped,
    read_brk,
    read_credentials,
    write_image,
)
from hijack.mutator.handover import hand_descriptors_to_shadow
from hijack.mutator.parasite import Area, map_area, unmap_area
from hijack.mutator.postcopy import (
    POSTCOPY_MIN_BYTES,
    PageServer,
    encode_runs,
    lazy_bytes,
    page_timeout,
    pinned_pages,
)
from hijack.mutator.precopy import RESEIZES, SHRINK, Precopy, RoundSent, worth_precopying
from hijack.mutator.tracee import Tracee
from hijack.node import mounts, packet_relay, pki
from hijack.node.channel import Channel, ChannelError, DataWriter
from hijack.node.daemon import parse_address
from hijack.node.packet_relay import PacketRelays, connect_home, held_routed
from hijack.node.repoint import Repointed
from hijack.objects import pipe, unix
from hijack.objects.memfd import holds_object
from hijack.process.tree import memory_sharers, read_tree
from hijack.registry import MoveRecord, ProcessRecord, Registry, RoutedConnection, node_name
from hijack.restore.plan import mapping_problems
from hijack.shadow import control, relay_link
from hijack.shadow.datagram import DATAGRAM_MAX, unmapped
from hijack.shadow.datagram import parse_address as parse_datagram_address
from hijack.shadow.door import HANDSHAKE_TIMEOUT
from hijack.shadow.relay import ACK_WAIT
from hijack.sys import kcmp, packet_route, pidfd, procfs, sysv, tcp_repair, terminal
from hijack.sys.socket_filter import listen_backlog
from hijack.testpoint import reached
from hijack.timing import Laps

# Reopened by path on the destination (nodes share a file system), or made
# anew there from the image (epoll with its interest list, eventfd, timerfd,
# signalfd, inotify with its watches, a memfd, a deleted file, directory or
# FIFO with what it holds).
REBUILT = {
    procfs.FdKind.REGULAR,
    procfs.FdKind.DIRECTORY,
    procfs.FdKind.FIFO,
    procfs.FdKind.CHARDEV,
    procfs.FdKind.BLOCKDEV,
    procfs.FdKind.EPOLL,
    procfs.FdKind.EVENTFD,
    procfs.FdKind.MEMFD,
    procfs.FdKind.TIMERFD,
    procfs.FdKind.SIGNALFD,
    procfs.FdKind.INOTIFY,
}
# Proxied through the home shadow as a byte stream.
STREAMED = {procfs.FdKind.PIPE, procfs.FdKind.TTY}


@dataclass(frozen=True)
class MoveResult:
    move_id: str
    pid: int
    new_pid: int
    destination: str
    freeze_ms: float
    bytes_sent: int  # pre-copy rounds included
    rounds: int = 0  # pre-copy rounds before the freeze
    frozen_bytes: int = 0  # sent while frozen: the final image, direct connections' queues
    tracking_pause_ms: float = 0.0  # the process stopped once more, to start pre-copy
    layout_stops: int = 0  # and stopped and let go at once, its layout changed (RESEIZES)
    # A move to its home node: "" if it holds its own descriptors again, else why its
    # shadow relays them still. None for a move elsewhere.
    relayed_at_home: str | None = None
    postcopy_bytes: int = 0  # pages left out of the final image, served after the start
    postcopy_ms: float = 0.0  # from the start there until the last of them arrived
    total_ms: float = 0.0  # the whole move, from the first round to the last page
    timing: FreezeTiming | None = None  # where the freeze went (hijack move --timing)
    members: tuple[MemberMoved, ...] = ()  # a tree's, root first (hijack.node.tree_move)
    packet_relays: int = 0  # its connections relayed by packets (hijack.node.packet_relay)


@dataclass(frozen=True)
class MemberMoved:
    """One member of a tree moved: its pids, and its part of the image and of the freeze."""

    pid: int
    new_pid: int
    program: str
    image_bytes: int
    image_ms: float  # the time its image took to read and send, while the tree was frozen


@dataclass(frozen=True)
class FreezeTiming:
    """Where a move's freeze went (hijack.timing), each node's steps in milliseconds."""

    here: dict[str, float]
    injected_here: int  # system calls injected into the frozen original
    there: dict[str, float]  # as the destination reported them (`prepared`, `running`)
    injected_there: int  # system calls injected into the copy being finished there


class PostcopyBroken(HijackError):
    """A post-copy cut short: the copy is stopped on its node, the original held here."""


@dataclass(frozen=True)
class Proxy:
    fd: int
    stream: str  # the home shadow's stream id
    # "stream", "listener", "datagram" (UDP, hijack.shadow.datagram), "terminal" or "master"
    kind: str
    family: int = 0  # a datagram's address family
    peer: str = ""  # a datagram socket connected to this relay ("ip:port"), or ""
    file: int = -1  # a terminal's or master's: the lowest descriptor sharing its open file
    shut: bool = False  # a TCP stream whose writing side the process shut down
    backlog: int = 0  # a listener's listen() backlog, which its listener at the node gets
    # A "direct" connection (a swapped one, hijack.node.repoint): `peer` is its peer's
    # address, `local` its own (here, then at the destination), `tcp` its state but its
    # queues (swap_end.state_fields), whose bytes follow the move message (`unread`).
    local: str = ""
    tcp: dict[str, Any] = dataclasses.field(default_factory=dict)
    queue_bytes: int = 0
    # A connection relayed by packets (hijack.node.packet_relay), kind "routed" in a plan
    # away from home and "direct" in the move message: `origin` its address at the home
    # node ("ip:port"), `via` the home node's address the destination sends its packets
    # through ("" for a move home, where it is the home node's own again).
    via: str = ""
    origin: str = ""


class HomeShadow:
    """The migrant's shadow: over its unix socket at home, over TCP elsewhere."""

    def __init__(self, record: ProcessRecord, token: str) -> None:
        self.record = record
        self.token = token
        self.local = record.home_node == node_name() and bool(record.shadow_control)
        self._pid: int | None = None
        # Connections to a remote shadow made (TLS and proof) before the freeze, each
        # taken by one request during it, with when each was made.
        self._proved: list[tuple[relay_link.TlsLink, float]] = []

    def request(self, message: dict[str, Any], timeout: float = 15.0) -> dict[str, Any]:
        if self.local:
            assert self.record.shadow_control is not None
            return control.request(self.record.shadow_control, message, timeout=timeout)
        proved = None
        while self._proved and proved is None:
            link, made_at = self._proved.pop(0)
            if time.monotonic() - made_at < PROVED_FRESH:
                proved = link
            else:
                link.sock.close()  # the shadow may have dropped it: a new one
        endpoint = self.record.home_endpoint()
        return control.remote_request(endpoint, message, timeout=timeout, proved=proved)

    def prove_links(self, count: int) -> None:
        """Before a freeze: `count` connections to a remote shadow made, for the next
        requests (a TLS handshake each, 3-10 ms of a freeze under load). Best effort: a
        request finding none fresh connects as before."""
        if self.local:
            return
        endpoint = self.record.home_endpoint()
        for _ in range(count):
            try:
                self._proved.append((control.prove_link(endpoint), time.monotonic()))
            except ShadowError:
                return

    def close(self) -> None:
        """Close the connections prove_links made that no request took."""
        for link, _ in self._proved:
            link.sock.close()
        self._proved.clear()

    def pid(self) -> int:
        """The shadow's pid (on this machine: nodes share one kernel in tests)."""
        if self.record.shadow_pid:
            return self.record.shadow_pid
        if self._pid is None:
            self._pid = int(self.request({"op": "status"})["shadow_pid"])
        return self._pid

    def migrating(self, message: dict[str, Any]) -> dict[str, Any]:
        """`migrating`: answered once the process's node has acknowledged all it was sent."""
        wait = ack_wait()
        # brief: of the answer only `streams` is read (docs/protocol.md).
        return self.request(
            {**message, "op": "migrating", "ack_wait": wait, "brief": True}, timeout=wait + 15.0
        )


# Seconds a proved connection (HomeShadow.prove_links) is used for: the shadow drops one
# whose header has not come within its HANDSHAKE_TIMEOUT (hijack.shadow.door).
PROVED_FRESH = HANDSHAKE_TIMEOUT / 2
SETTLE_TIMEOUT = 30.0  # seconds a mover keeps asking what became of a commit whose answer it lost
SETTLE_RETRY = 0.5  # seconds between two tries to reach the destination again


class MoveInDoubt(HijackError):
    """A commit whose outcome is unknown: the original is held stopped, never resumed blindly."""


def move(
    pid: int,
    destination: str,
    registry: Registry,
    progress: Callable[[str, int], None] | None = None,
    precopy: bool | None = None,
    plain_relays: bool | None = None,
    postcopy: bool | None = None,
    leave_parent: bool = False,
    packet_relays: bool = False,
) -> MoveResult:
    """Move `pid` to the node daemon at `destination`; see the module docstring.

    With descendants, they move with it (hijack.node.tree_move). A fork of its
    parent is refused (its parent would see it exit) unless `leave_parent`.

    `precopy`: True or False forces pre-copy on or off; None decides by size.
    `plain_relays`: whether its relays leave TLS between nodes (recorded, and
    kept by later moves); None keeps what its last move chose (else encrypted).
    `postcopy`: True ends pre-copy after its first round with post-copy
    (hijack.mutator.postcopy); False never does; None does when the rounds do
    not converge (and `precopy` is None).
    `packet_relays`: its TCP connections to peers on other machines go on through this
    node's IP layer rather than its shadow (hijack.node.packet_relay); a move from home
    only (later moves take such connections along by themselves).
    A move that fails leaves the process as it found it: attached only if it
    was attached before. One whose outcome is unknown raises MoveInDoubt.
    """
    report = progress or (lambda phase, sent: None)
    address = parse_address(destination)
    record = registry.find(pid)
    if record is not None and record.state == "held":
        raise HijackError(
            f"process {pid} is held stopped: an earlier move of it has no known outcome;"
            " run `hijack recover` once its destination answers",
            pid=pid,
        )
    if record is not None and record.state == "attached" and record.home_node != node_name():
        raise HijackError(
            f"process {pid} was attached on node {record.home_node!r}, and this node is named"
            f" {node_name()!r} now: move it under its old name (HIJACK_NODE={record.home_node})",
            pid=pid,
        )
    from hijack.node import tree_move  # not at the top: it builds on this module

    if not leave_parent:
        tree_move.refuse_leaving_parent(pid, destination)
    identity = pki.load_identity()  # this node's certificates, before anything is touched
    members = living_members(pid)
    for member in members:
        refuse_unmappable(member)
    sharers = memory_sharers(read_tree(pid))
    if sharers and (precopy or postcopy):
        raise Unsupported(
            f"cannot move the tree of process {pid} with pre-copy or post-copy:"
            f" {'; '.join(sharers)}, and its rounds would copy that memory for each; move it"
            " without --precopy/--postcopy (frozen whole); nothing was changed",
            pid=pid,
        )
    segments = {shmid: at for member in members for shmid, at in sysv_segments(member).items()}
    if segments and (precopy or postcopy):
        attached = "; ".join(f"System V shared memory at {at:#x}" for at in segments.values())
        raise Unsupported(
            f"cannot move process {pid} with pre-copy or post-copy: {attached}"
            " (a move's pre-copy cannot attach it; move it without --precopy/--postcopy:"
            " frozen whole, as dump and restore do); nothing was changed",
            pid=pid,
        )
    left_here = (  # (the IPC table not read for a process attaching none: most moves)
        {shmid: found for shmid, found in sysv.shared_memory().items() if shmid in segments}
        if segments
        else {}
    )
    if sharers or segments:
        # Frozen whole: shared memory in one image, once; a System V segment attached by
        # the restore of a whole image (a stub built from rounds cannot attach one).
        precopy, postcopy = False, False
    if packet_relays:
        refuse_packet_relays(pid, record)
    attached_by_move = record is None or record.state not in ("attached", "running")
    if attached_by_move:
        # Refused before the attach: nothing changes.
        tree_move.plan_tree(members, pid, None, True, frozen=False)
        attaching.attach(pid, registry)
    try:
        reached("move-attached")
        moved = _move_attached(
            pid,
            address,
            identity,
            registry,
            registry.get(pid),
            report,
            precopy,
            plain_relays,
            postcopy,
            packet_relays,
        )
    except (MoveInDoubt, PostcopyBroken):
        raise  # the process is held as it is (for `hijack recover`, or by hand)
    except BaseException:
        if attached_by_move:
            # As before the command: not attached. (Its shadow was told `aborted`.)
            with contextlib.suppress(HijackError):
                attaching.detach(pid, registry)
        raise
    remove_left_behind(left_here)
    return moved


def _move_attached(
    pid: int,
    address: tuple[str, int],
    identity: pki.NodeIdentity,
    registry: Registry,
    record: ProcessRecord,
    report: Callable[[str, int], None],
    precopy: bool | None,
    plain_relays: bool | None,
    postcopy: bool | None = None,
    packet_relays: bool = False,
) -> MoveResult:
    from hijack.node import tree_move  # not at the top: it builds on this module

    at_home = record.state == "attached"
    plain = bool(record.plain_relays) if plain_relays is None else plain_relays
    token = record.relay_token or secrets.token_hex(32)
    shadow = HomeShadow(record, token)
    tree = _has_children(pid)  # zombies too: the move takes them
    members = living_members(pid)
    # Refused before anything is touched.
    tree_move.plan_tree(members, pid, shadow, at_home, frozen=False)

    report("connecting", 0)
    channel = Channel.connect(address, identity)
    if channel.peer == node_name():
        channel.close()
        raise HijackError(
            f"the daemon at {address[0]}:{address[1]} is named {channel.peer!r}, as this node is:"
            " give each node a name of its own (`hijack node serve --name`, $HIJACK_NODE)",
            pid=pid,
        )
    move_id = secrets.token_hex(8)
    lock = MoverLock(registry.directory, move_id)
    try:
        reached("move-connected")
        if at_home:
            # Who may open relays: the cluster's nodes, as its CA and revocation list say now.
            from hijack.node.pki import pki_dir  # not at the top: it loads `cryptography`

            trust = relay_link.cluster_trust(pki_dir())
            endpoint = shadow.request({"op": "relay_listen", "token": token, "trust": trust})
            relay_address = f"{channel.sock.getsockname()[0]}:{int(endpoint['port'])}"
            fingerprint = str(endpoint["certificate"])
        else:
            relay_address = record.relay_address or ""
            fingerprint = record.relay_cert or ""
        registry.set_relay(pid, relay_address, token, fingerprint, plain)
        home = control.HomeEndpoint(relay_address, bytes.fromhex(token), fingerprint, plain)
        registry.record_node(channel.peer, f"{address[0]}:{address[1]}")
        registry.start_move(move_id, pid, record.program, channel.peer)
        report = _Published(registry, move_id, report)

        def mark_moved() -> None:
            # Before the original dies: whoever collects it must know it moved on.
            registry.moved_on(pid, channel.peer)

        precopied: Precopy | None = None
        tree_precopied: dict[int, Precopy] = {}
        started_at = time.perf_counter()
        try:
            if tree:
                if postcopy or precopy or (precopy is None and worth_precopying(*members)):
                    if postcopy is None and precopy is not None:
                        postcopy = False  # pre-copy asked for as such: no post-copy
                    tree_precopied = tree_move.precopy_tree(
                        pid, members, channel, move_id, record.program, report, shadow, postcopy
                    )
                    # It ran on meanwhile: refused now if it holds what cannot go.
                    now = living_members(pid)
                    tree_move.plan_tree(now, pid, shadow, at_home, frozen=False)
            elif postcopy or precopy or (precopy is None and worth_precopying(pid)):
                if postcopy is None and precopy is not None:
                    postcopy = False  # pre-copy asked for as such: no post-copy
                precopied = _precopy(
                    pid, channel, move_id, record.program, report, shadow, postcopy
                )
                # It ran on meanwhile: refused now if it holds what cannot go.
                running_plan, _ = plan_proxies(pid, shadow, at_home, frozen=False)
                if precopied.links_ahead:
                    links_ahead(
                        channel,
                        running_plan,
                        home_fields(record, relay_address, token, home),
                        home_again=channel.peer == record.home_node,
                    )
            shadow.pid()  # asked now: the move's message names it while the process is frozen
            frozen_args = (
                pid,
                channel,
                shadow,
                at_home,
                move_id,
                record,
                relay_address,
                report,
                mark_moved,
                (address, identity),
            )
            packets = PacketRelays(
                channel.sock.getpeername()[0],
                channel.sock.getsockname()[0],
                identity,
                take_streams=packet_relays,
                homing=channel.peer == record.home_node,
            )
            # Away from home, its home node rewrites them: asked within the freeze.
            routed = held_routed(living_members(pid), registry)
            packets.home = connect_home(registry, routed, identity)
            if packets.home is not None:
                packet_route.preload()  # not within the freeze
            try:
                if tree:
                    context = tree_move.TreeMoveContext(*frozen_args, home, packets)
                    result = tree_move.move_tree_frozen(context, tree_precopied)
                else:
                    result = _move_frozen(*frozen_args, precopied, home, packets)
            finally:
                packets.close()
        except MoveInDoubt as exc:
            registry.update_move(move_id, phase="in-doubt", error=str(exc))
            registry.set_state(pid, "held")
            lock.keep()  # `hijack recover` settles it
            raise
        except PostcopyBroken as exc:
            # Not for `hijack recover`: it would end the original, the only whole copy.
            registry.update_move(move_id, phase="failed", finished_at=time.time(), error=str(exc))
            registry.set_state(pid, "held")
            raise
        except BaseException as exc:
            registry.update_move(move_id, phase="failed", finished_at=time.time(), error=str(exc))
            raise
        finally:
            shadow.close()
            if precopied is not None:
                precopied.close()
            for member_precopy in tree_precopied.values():
                member_precopy.close()
    finally:
        channel.close()
        lock.release()
    registry.update_move(
        move_id,
        phase="done",
        finished_at=time.time(),
        bytes_sent=result.bytes_sent,
        freeze_ms=result.freeze_ms,
        new_pid=result.new_pid,
    )
    return dataclasses.replace(result, total_ms=(time.perf_counter() - started_at) * 1000)


def _move_frozen(
    pid: int,
    channel: Channel,
    shadow: HomeShadow,
    at_home: bool,
    move_id: str,
    record: ProcessRecord,
    relay_address: str,
    report: Callable[[str, int], None],
    mark_moved: Callable[[], None],
    destination: tuple[tuple[str, int], pki.NodeIdentity],
    precopied: Precopy | None = None,
    home: control.HomeEndpoint | None = None,
    packets: PacketRelays | None = None,
) -> MoveResult:
    before = precopied.bytes_sent if precopied is not None else 0
    postcopy = precopied is not None and precopied.postcopy
    # Back to its home node, with nothing but streams and listeners relayed: the
    # shadow may hand it back its originals (docs/protocol.md, "Home again").
    homing = not at_home and channel.peer == record.home_node
    # Why its shadow relays its descriptors still, for a move home.
    relayed = None if not homing else ""
    repointed = Repointed(destination[1])
    try:
        if homing:
            relayed = unhomeable(plan_proxies(pid, shadow, at_home, frozen=False)[0])
            homing = not relayed
        if not at_home:
            quiet_shadow(shadow, move_id, f"process {pid} runs", pid, flush=homing)
        if homing:
            relayed = unsettled_for_home(pid, shadow)
            homing = not relayed
        # Who else holds its pipes, while it runs: the freeze checks only what changed.
        holders_before = pipe.scan_holders_before(pid)
        # The peers' helpers of its direct connections, started while it runs.
        repointed.standby(pid)
        # Away, the freeze asks the home shadow its streams, a move home its originals,
        # and every move has it relay to the copy: each over TLS, connected now.
        shadow.prove_links(0 if at_home else 3 if homing else 2)
        if precopied is not None:
            # The layout read late (the freeze reads smaps again only if it changed since),
            # each read followed by one more round: what the process wrote during all of
            # the above (tens of ms: ~0.5-1 MiB at 10 MB/s) goes now, while it runs, not in
            # the freeze; the layout is checked after it, and again once stopped. (Not
            # after post-copy's last: its pages written since are left to post-copy.)
            catch_up = (
                None
                if precopied.postcopy
                else functools.partial(_catch_up, channel, precopied, report)
            )
            precopied.prepare_freeze(catch_up)
            tracee = seize_on_its_layout(pid, precopied, catch_up)
            postcopy = precopied.postcopy  # a catch-up round may have left it to post-copy
        else:
            tracee = Tracee.seize(pid)
    except BaseException:
        repointed.abort()
        if not at_home:
            _abort(channel, shadow, move_id)
        raise
    parasite: Area | None = None  # for the image's batched calls (hijack.mutator.parasite)
    brk: int | None = None
    with tracee:
        # The freeze began with the first interrupt: stopping every thread is part of it.
        laps = Laps(tracee.stopped_at or None)
        laps.lap("stop")
        try:
            reached("move-frozen")
            if precopied is not None:
                precopied.freeze(read_flags=False)
                # Mapped before smaps is read again (an mmap waits for that read's
                # hold on the memory map: tens of ms a GiB under load).
                parasite = map_area(tracee)
                brk = read_brk(tracee, parasite)  # brk(0) too takes the map's write lock
                precopied.read_flags()
                precopied.scan_guards()
                if precopied.postcopy:
                    precopied.pinned = pinned_pages(tracee)
                laps.lap("dirty scan")
            # Planned now that it is frozen: its descriptors no longer change
            # (the first look, before the freeze, only refuses what never can go).
            # Read once for the plan and the image (~8 ms a read here, see sockets_of).
            sockets = sockets_of(pid)
            laps.lap("plan: socket tables")
            # The shadow's streams asked again, now: a client it accepted before going
            # quiet reaches the process through the node's forwarder, whose connection
            # (the relay the plan matches) may be made after `migrating` answered.
            # Asked once for the plan and a move home's hand-back: the shadow, quiet
            # since `migrating`, takes no client meanwhile (hijack.shadow.relay).
            streams = None if at_home else shadow_streams(shadow)
            plan, present = plan_proxies(pid, shadow, at_home, sockets=sockets, streams=streams)
            laps.lap("plan")
            # Its direct connections (swapped): their peers frozen and joined towards the
            # destination, live at the commit (hijack.node.repoint).
            if any(p.kind == "direct" for p in plan):
                plan = repointed.prepare(pid, plan, channel.sock.getpeername()[0], laps=laps)
                laps.lap("direct peers")
            if packets is not None:
                plan = packets.prepare(pid, plan, sockets, repointed.queues, laps)
                # Their queues follow the move message in the order of its proxies.
                repointed.queues = {
                    (0, p.fd): repointed.queues[(0, p.fd)] for p in plan if p.kind == "direct"
                }
            if at_home:
                hand_descriptors_to_shadow(pid, record.shadow_control or "")
                proxy = [
                    {
                        "fd": p.fd,
                        "listener": p.kind == "listener",
                        "datagram": p.kind == "datagram",
                        "terminal": p.kind == "terminal",
                        "master": p.kind == "master",
                    }
                    for p in plan
                    # one per terminal, one per pty master; not a direct connection
                    if p.kind not in ("terminal", "master", "direct")
                    or p.stream in (f"tty:{p.fd}", f"ptm:{p.fd}")
                ]
                laps.lap("shadow hand-over: descriptors")
                answer = shadow.migrating({"move": move_id, "proxy": proxy})
                plan = connect_datagrams(plan, answer, relay_address)
                unread: dict[str, bytes] = {}
            else:
                unread = peek_unread(pid, plan)
                laps.lap("shadow hand-over: unread")
                if homing:
                    relayed = hand_back({pid: plan}, shadow, move_id, unread, present, streams)
                    homing = not relayed
                if homing:
                    plan = [dataclasses.replace(p, kind="original") for p in plan]
            laps.lap("shadow hand-over")
            channel.send(
                {
                    "op": "move",
                    "move": move_id,
                    "home_again": homing,
                    "pid": pid,
                    "program": record.program,
                    "mount_namespace": mounts.describe(pid, shadow.pid()),
                    "home": home_fields(record, relay_address, shadow.token, home),
                    "proxies": [p.__dict__ for p in plan],
                    "postcopy": postcopy,
                    # Pre-copied, its stub there clones them before the image comes.
                    "threads": sorted(t for t in tracee.threads if t != pid) if precopied else [],
                }
            )
            # (Sent while frozen, as the image: counted with it.)
            before += (queued := repointed.send_unread(channel))
            laps.lap("move message")
            report("streaming", before)
            writer = DataWriter(channel)
            progress_writer = _Progress(writer, report, before=before)
            write_image(
                tracee,
                cast(BinaryIO, progress_writer),
                precopied=precopied,
                laps=laps,
                holders_before=holders_before,
                sockets=sockets,
                parasite=parasite,
                brk=brk,
                # Read by the freeze, before the area was mapped: not read again.
                maps=precopied.maps_at_freeze if precopied is not None else None,
                # Its head sent before its pages: the destination makes the layout and
                # the descriptors meanwhile (~2-4 ms of its work no longer after them).
                head_first=True,
            )
            writer.close()
            lazy = precopied.lazy if precopied is not None and postcopy else []
            if postcopy:
                channel.send({"op": "lazy", "lazy": encode_runs(lazy)})
            # Unmapped once the image is out: the destination restores it meanwhile
            # (an injected call, 0.2 ms idle, ms under load). Its failure aborts the move.
            if parasite is not None:
                unmap_area(tracee, parasite)
                tracee.put_back()  # nothing more is injected
            laps.lap("image: pages")
            report("restoring", before + writer.sent)
            prepared = channel.expect("phase")
            laps.lap("destination")
            reached("move-prepared")
            # A post-copy's original must outlive the commit until its last page
            # is out: `hijack recover` tells that move by this phase.
            report("post-copy" if lazy else "switching", before + writer.sent)
        except BaseException:
            if parasite is not None:
                with contextlib.suppress(HijackError):
                    unmap_area(tracee, parasite)  # it runs on: as it was
            repointed.abort()
            if packets is not None:
                packets.abort()
            _abort(channel, shadow, move_id)
            raise
        # From the commit on, the answer alone decides: SIGINT and SIGTERM wait
        # until the switch is over, and a pending SIGSTOP keeps the original
        # from ever running again on its own, should this command die (SIGKILL:
        # the kernel lets a tracer's tracees go). docs/faults.md.
        with signals_held():
            os.kill(pid, signal.SIGSTOP)
            try:
                outcome, answer, reason = _commit(channel, move_id, *destination)
            except Exception as exc:  # a malformed answer: what happened there is not known
                outcome, answer, reason = "unknown", {}, f"{type(exc).__name__}: {exc}"
            if outcome != "running":
                repointed.abort()  # in doubt too: its peer keeps its old connection
            if outcome == "aborted":
                if packets is not None:
                    packets.abort()
                _abort(channel, shadow, move_id)
                # SIGCONT takes the pending SIGSTOP back: it resumes untouched.
                os.kill(pid, signal.SIGCONT)
                raise HijackError(
                    f"{channel.peer} did not run the process: {reason}; it runs on here as before",
                    pid=pid,
                )
            if outcome == "unknown" and lazy:
                # `hijack recover` would end the original if the copy runs: the
                # only whole one, as the copy cannot get its pages any more.
                raise PostcopyBroken(
                    f"move {move_id}: {reason}, and {channel.peer} could not be asked what"
                    f" became of the commit. Process {pid} is held stopped here: if a copy of"
                    f" it runs on {channel.peer} it is stopped there, without its last pages;"
                    f" kill that copy, then `kill -CONT {pid}`",
                    pid=pid,
                )
            if outcome == "unknown":
                raise MoveInDoubt(
                    f"move {move_id}: {reason}, and {channel.peer} could not be asked what"
                    f" became of the commit within {settle_timeout():.0f} s. Process {pid} is"
                    " held stopped here so that it never runs twice: run `hijack recover` once"
                    f" {channel.peer} answers (it ends {pid} if the copy runs there, else"
                    f" resumes it), or decide yourself: `kill -CONT {pid}` only if nothing of"
                    f" it runs on {channel.peer}",
                    pid=pid,
                )
            laps.lap("commit")
            unjoined = repointed.commit()
            routed = packets.commit() if packets is not None else 0
            if routed:
                laps.lap("packet relays: let go")
            # The frozen original will not run again, so what waits in its
            # relay-made UDP sockets and its terminals can be taken (the
            # shadow sends it again).
            unread_datagrams = {} if at_home else drain_datagrams(pid, plan)
            if not at_home:
                unread.update(drain_terminals(pid, plan))
            try:
                _switch_shadow(
                    shadow,
                    move_id,
                    channel.peer,
                    plan,
                    prepared,
                    unread,
                    unread_datagrams,
                    present,
                    home_again=homing,
                    direct={0: direct_numbers(plan)} if at_home else None,
                )
                unswitched = None
            except HijackError as exc:
                unswitched = exc  # the copy runs all the same: it is the process now
            # It runs there and its streams reach it: the freeze is over. What
            # follows is bookkeeping, and the end of the stopped original
            # (freeing a big one's memory takes a while).
            laps.lap("shadow switch")
            freeze_ms = laps.total_ms()
            if not lazy:  # (a post-copy's channel carries its pages from here on)
                tell_frozen(channel, freeze_ms)
            if packets is not None:
                packets.forget_left()
            mark_moved()
            if not at_home:
                with contextlib.suppress(HijackError, OSError):  # committed: nothing may fail
                    consume_unread(pid, plan)
            broken, postcopy_ms = None, 0.0
            if lazy:
                reached("move-postcopy")  # the copy runs there, without its lazy pages yet
                report("post-copy", before + writer.sent)
                broken, postcopy_ms = serve_lazy(channel, answer, {pid: lazy})
            if broken is None:
                kill_stopped(tracee)
    if broken is not None:
        # The pending SIGSTOP holds the original once we let it go.
        raise PostcopyBroken(
            f"move {move_id}: post-copy to {channel.peer} broke off ({broken}) with"
            f" {lazy_bytes(lazy) >> 20} MiB of pages not all delivered: the copy there (pid"
            f" {answer.get('pid', '?')}) is stopped, and process {pid} is held stopped here"
            f" as the only whole one. To go on here: kill the copy on {channel.peer}, then"
            f" `kill -CONT {pid}`",
            pid=pid,
        )
    if unjoined:
        raise HijackError(
            f"process {pid} runs on {channel.peer} as {answer['pid']}, but {'; '.join(unjoined)}",
            pid=pid,
        )
    if unswitched is not None:
        raise HijackError(
            f"process {pid} runs on {channel.peer} as {answer['pid']}, but its home shadow"
            f" could not be told to relay to it ({unswitched}): its connections do not reach it",
            pid=pid,
        )
    rounds = precopied.rounds if precopied is not None else 0
    sent = before + writer.sent
    pause = precopied.pause_ms if precopied is not None else 0.0
    return MoveResult(
        move_id,
        pid,
        int(answer["pid"]),
        channel.peer,
        freeze_ms,
        sent,
        rounds,
        queued + writer.sent,
        pause,
        precopied.layout_stops if precopied is not None else 0,
        relayed,
        postcopy_bytes=lazy_bytes(lazy),
        postcopy_ms=postcopy_ms,
        packet_relays=routed,
        timing=FreezeTiming(
            laps.rounded(),
            tracee.injected,
            _laps_of(prepared) | _laps_of(answer),
            int(prepared.get("injected", 0)) + int(answer.get("injected", 0)),
        ),
    )


def refuse_packet_relays(pid: int, record: ProcessRecord | None) -> None:
    """--packet-relays is for a move from home, on a node that forwards packets; refused
    before anything is touched."""
    if record is not None and record.state == "running":
        raise Unsupported(
            f"cannot move process {pid} with --packet-relays: it is away from its home node"
            f" {record.home_node!r}, and only a move from home takes its connections by packets;"
            " nothing was changed",
            pid=pid,
        )
    if not packet_route.forwarding():
        raise Unsupported(
            f"cannot move process {pid} with --packet-relays: this node does not forward IPv4"
            " packets (sysctl net.ipv4.ip_forward=1); nothing was changed",
            pid=pid,
        )
    packet_route.preload()  # not within the freeze


def seize_on_its_layout(
    pid: int, precopied: Precopy, catch_up: Callable[[], object] | None
) -> Tracee:
    """The process stopped for its freeze, its layout the one whose flags prepare_freeze
    read. A mapping changed between prepare_freeze's last look and the stop (a process
    that remaps every ~15 ms) would have the freeze read smaps again
    (10-40 ms a GiB, frozen): the process is let go at once instead (a stop of ~0.3 ms,
    added to the pause before the freeze), its layout read again and the stop made
    again, up to RESEIZES times."""
    for attempt in range(RESEIZES + 1):
        tracee = Tracee.seize(pid)
        try:
            # layout_held() first, at every stop: it reads the layout the freeze then
            # uses (freeze's maps_at_freeze), which must be this stop's, never one read
            # at a stop let go before (the process ran on and changed it meanwhile).
            if precopied.layout_held() or attempt == RESEIZES:
                return tracee
        except BaseException:
            tracee.release()
            raise
        tracee.release()
        precopied.pause_ms += tracee.pause_ms
        precopied.layout_stops += 1
        precopied.prepare_freeze(catch_up)
    raise AssertionError("unreachable")


def quiet_shadow(shadow: HomeShadow, move_id: str, what: str, pid: int, *, flush: bool) -> None:
    """Away, the shadow goes quiet before the freeze (`migrating`): a client it accepted
    and connected to this node once the process was frozen would push up to a socket
    buffer into a connection the process never accepts. `what`: "process P runs"."""
    try:
        shadow.migrating({"move": move_id, "flush": flush})
    except ShadowError as exc:
        raise HijackError(f"move aborted: {exc}; {what} on here as before", pid=pid) from None


def links_ahead(
    channel: Channel, plan: list[Proxy], home: dict[str, Any], *, home_again: bool = False
) -> None:
    """Tell the destination the freeze comes, and how many links to the home shadow its
    relays will take (as the process's descriptors are now): it proves them meanwhile
    (a TLS handshake each, no longer in the freeze; control.LinksAhead). No answer.
    `home_again`: the destination is its home node, which asks the shadow for the
    originals it hands back, once (relays there are made only if that is refused)."""
    if home_again and not unhomeable(plan):
        count = 1
    else:
        plain = home["plain_relays"] or home_again  # at home, relays are plain
        kinds = ("stream",) if plain else ("stream", "listener", "datagram")
        count = sum(1 for proxy in plan if proxy.kind in kinds)
    if count:
        channel.send({"op": "links", "home": home, "count": count})


def home_fields(
    record: ProcessRecord, relay_address: str, token: str, home: control.HomeEndpoint | None
) -> dict[str, Any]:
    """The `home` of a `move` message (docs/protocol.md, "Moving")."""
    return {
        "node": record.home_node,
        "pid": record.home_pid or record.pid,
        "relay": relay_address,
        "token": token,
        "relay_cert": home.fingerprint if home else "",
        "plain_relays": home.plain if home else False,
    }


def _laps_of(answer: dict[str, Any]) -> dict[str, float]:
    """The destination's laps in an answer (absent from a daemon that does not time)."""
    laps = answer.get("laps")
    if not isinstance(laps, dict):
        return {}
    return {str(name): float(ms) for name, ms in laps.items() if isinstance(ms, int | float)}


def serve_lazy(
    channel: Channel,
    answer: dict[str, Any],
    lazy: dict[int, list[tuple[int, int]]],
    tree: bool = False,
) -> tuple[str | None, float]:
    """Serve the copy's missing pages from the frozen original (`lazy`: {pid: its lazy
    runs}; a tree's, every member's): (why it broke off, or None; how long it took)."""
    started = time.perf_counter()
    if "phase" not in answer:
        # The commit's answer came on another connection: this one, which the
        # destination serves the pages on, is broken.
        return "the move's connection broke at the commit", 0.0
    try:
        PageServer(lazy, channel, tree).serve(page_timeout())
    except HijackError as exc:
        return str(exc), (time.perf_counter() - started) * 1000
    return None, (time.perf_counter() - started) * 1000


HOMEABLE = ("stream", "listener")  # what a shadow can hand back (docs/protocol.md, "Home again")
# Seconds a process going home may go without reading its relays or accepting a client
# before its descriptors are relayed from home instead.
HOME_PATIENCE = 1.0
# Seconds a frozen plan waits for the shadow to list a relay in the making (plan_proxies),
# and between two looks.
RELAY_MAKING_WAIT = 2.0
RELAY_MAKING_INTERVAL = 0.005
HOME_SETTLE_INTERVAL = 0.01  # seconds between looks at a process catching up before going home


def unhomeable(plan: list[Proxy]) -> str:
    """Why not every relayed descriptor of the plan is one the shadow can hand back, or ""."""
    # A direct connection (a swapped one) is made again wherever the process goes, home
    # too: it is not what stays relayed, only what keeps the rest from being handed back.
    # So is a connection relayed by packets, made again at home under its own addresses.
    direct = [f"fd {p.fd}" for p in plan if p.kind == "direct"]
    routed = [f"fd {p.fd}" for p in plan if p.kind == "routed"]
    made_again = (*HOMEABLE, "direct", "routed")
    others = [f"fd {p.fd} ({p.kind})" for p in plan if p.kind not in made_again]
    reasons = [f"{', '.join(others)} cannot be handed back"] if others else []
    if direct:
        reasons.append(f"{', '.join(direct)} direct (kept direct)")
    if routed:
        reasons.append(f"{', '.join(routed)} relayed by packets (its own again)")
    return "; ".join(reasons)


def unsettled_for_home(
    pid: int,
    shadow: HomeShadow,
    planner: Callable[[], tuple[dict[int, list[Proxy]], list[str]]] | None = None,
) -> str:
    """Before the freeze of a move home: "" once the process, running on, has read all its
    relays hold and accepted every client the shadow passed to its listeners (within
    ack_wait()), else why not. The shadow sends nothing more meanwhile (`migrating`), so
    once true it stays true; else its descriptors are relayed from home as before.
    `planner`: a tree's members' plans and streams (hijack.node.tree_move), read anew."""

    def single() -> tuple[dict[int, list[Proxy]], list[str]]:
        plan, present = plan_proxies(pid, shadow, False, frozen=False)
        return {pid: plan}, present

    deadline = time.monotonic() + ack_wait()
    least, progressed_at = -1, time.monotonic()
    while True:
        plans, present = (planner or single)()
        why = unhomeable([p for plan in plans.values() for p in plan])
        if why:
            return why
        pending = _pending_clients(shadow, present)
        unread = {
            stream: count
            for member, plan in plans.items()
            for stream, count in _queued(member, plan, "in").items()
            if count
        }
        if not pending and not unread:
            return ""
        now, left = time.monotonic(), sum(unread.values()) + len(pending)
        if least < 0 or left < least:
            least, progressed_at = left, now
        if now >= deadline or now - progressed_at > HOME_PATIENCE:
            waiting = [*(f"{s} {n} bytes unread" for s, n in unread.items()), *pending]
            return f"it did not catch up ({', '.join(waiting)})"
        time.sleep(HOME_SETTLE_INTERVAL)


def _pending_clients(
    shadow: HomeShadow, present: list[str], streams: dict[str, dict[str, Any]] | None = None
) -> list[str]:
    """Clients the shadow accepted that the process has not accepted (yet); `streams`: its
    status's, if asked already."""
    streams = shadow_streams(shadow) if streams is None else streams
    return [id for id in streams if id.startswith("acc:") and id not in present]


def shadow_streams(shadow: HomeShadow) -> dict[str, dict[str, Any]]:
    """The streams the home shadow relays (its `status`), by id. Brief: its answer leaves
    out what takes the shadow milliseconds of socket tables (a move asks this frozen)."""
    return {s["id"]: s for s in shadow.request({"op": "status", "brief": True})["streams"]}


def _queued(pid: int, plan: list[Proxy], way: str) -> dict[str, int]:
    """Bytes in the process's relays: "in", not read by it yet (FIONREAD); "out", sent by
    it and not acknowledged by the shadow yet (SIOCOUTQ)."""
    request = termios.FIONREAD if way == "in" else termios.TIOCOUTQ
    queued: dict[str, int] = {}
    for proxy in plan:
        if proxy.kind != "stream":
            continue
        try:
            copy = pidfd.copy_fd(pid, proxy.fd)
        except HijackError:
            continue  # closed meanwhile (not frozen): the next look tells
        try:
            value = fcntl.ioctl(copy, request, b"\0" * 4)
            queued[proxy.stream] = int(struct.unpack("i", value)[0])
        except OSError:
            pass
        finally:
            os.close(copy)
    return queued


def _written(pid: int, plan: list[Proxy]) -> dict[str, int]:
    """What the frozen process wrote to each relayed stream, in all (its send queues are
    empty): an encrypted relay's shadow reads until that much came through the node's
    forwarder (the bytes on their way there are in no queue the mover sees)."""
    written: dict[str, int] = {}
    for proxy in plan:
        if proxy.kind != "stream":
            continue
        with contextlib.suppress(HijackError):  # not a TCP socket: its shadow says why
            copy = pidfd.copy_fd(pid, proxy.fd)
            try:
                sent = tcp_repair.data_sent(copy)
            finally:
                os.close(copy)
            if sent is not None:
                written[proxy.stream] = sent
    return written


def hand_back(
    plans: dict[int, list[Proxy]],
    shadow: HomeShadow,
    move_id: str,
    unread: dict[str, bytes],
    present: list[str],
    streams: dict[str, dict[str, Any]] | None = None,
) -> str:
    """Frozen, before a move home: have the shadow hand back every original (`hand_back`)
    of the process, or of every member of its tree: `plans`, by pid (a stream members
    share is one description, handed back once). `streams`: the shadow's, asked since
    the freeze (shadow_streams).

    Only with nothing in flight towards the process (what it had not read
    would have to reach it before what waits in the original), no client
    waiting in its listener, and all it wrote in the shadow's hands (its
    relays' send queues empty: the shadow writes it through before it
    answers; through an encrypted relay, once all it wrote came: _written).
    Else why not, and nothing changed: the move relays its descriptors from
    home as before.
    """
    plan = [p for member_plan in plans.values() for p in member_plan]
    why = unhomeable(plan)
    unread_streams = [stream for stream, data in unread.items() if data]
    pending = _pending_clients(shadow, present, streams)
    if why or unread_streams or pending:
        return why or f"{', '.join([*unread_streams, *pending])} not caught up"
    deadline = time.monotonic() + ack_wait()
    while any(any(_queued(pid, own, "out").values()) for pid, own in plans.items()):
        if time.monotonic() >= deadline:
            return f"what it wrote was not taken by its shadow within {ack_wait():g} s"
        time.sleep(HOME_SETTLE_INTERVAL)
    request = {
        "op": "hand_back",
        "move": move_id,
        "streams": sorted({p.stream for p in plan}),
        "wait": ack_wait(),
        "written": {k: v for pid, own in plans.items() for k, v in _written(pid, own).items()},
    }
    try:
        shadow.request(request, timeout=ack_wait() + 15.0)
    except ShadowError as exc:
        if str(exc).startswith("hand_back refused"):
            return str(exc)  # its answer: nothing changed there
        # No answer: it may have stopped relaying them. Relayed on from here, they would
        # be neither pumped nor handed back: the move is aborted (the shadow is told).
        raise HijackError(f"move aborted: the home shadow did not answer ({exc})") from None
    return ""


def _precopy(
    pid: int,
    channel: Channel,
    move_id: str,
    program: str,
    report: Callable[[str, int], None],
    shadow: HomeShadow,
    postcopy: bool | None = None,
) -> Precopy:
    """Send the process's memory in rounds while it runs (docs/protocol.md, "Moving").

    With `postcopy` True, after round 0 the rest is left to post-copy; None,
    when the rounds stop without having converged (see `_converged`).
    """
    # Its credentials, for the daemon's policy before it builds anything.
    credentials = dataclasses.asdict(read_credentials(pid))
    channel.send(
        {
            "op": "precopy",
            "move": move_id,
            "pid": pid,
            "program": program,
            "credentials": credentials,
            "mount_namespace": mounts.describe(pid, shadow.pid()),
            # The stub's exe link is set to it after round 0: not in the freeze.
            "exe": procfs.read_exe(pid),
        }
    )
    # Accepted: a refusal comes before anything is touched.
    accepted = channel.expect("phase")
    precopied = Precopy.start(pid)
    precopied.links_ahead = accepted.get("links") is True
    try:
        before = None
        while True:
            last = _send_round(channel, precopied, report)
            if before is None:
                reached("move-first-round")
            if postcopy or not precopied.should_continue(last, before):
                precopied.auto_postcopy = postcopy is None
                precopied.last_round = last
                if bool(postcopy) or (postcopy is None and not _converged(last, before)):
                    _leave_to_postcopy(channel, precopied)
                return precopied  # its prepare_freeze: just before the freeze
            before = last
    except BaseException:
        precopied.close()
        raise


def _leave_to_postcopy(channel: Channel, precopied: Precopy) -> None:
    """What the process writes from here on goes by post-copy. The pages written during
    the last round are stale there: dropped now, while the process runs, not during the
    freeze."""
    precopied.postcopy = True
    dropped = precopied.written_to_drop()
    channel.send({"op": "drop", "lazy": encode_runs(dropped)})
    channel.expect("phase")


def _catch_up(channel: Channel, precopied: Precopy, report: Callable[[str, int], None]) -> None:
    """One more round just before the freeze (prepare_freeze's), unless post-copy takes the
    rest. In the automatic choice, one that did not converge either leaves the rest to
    post-copy after all: rounds that converged only because the process was short of CPU
    while they ran (a loaded node) say nothing of what it writes now, and a catch-up
    round covers tens of ms: a process that rewrites 8 MiB in that time would be frozen
    while all of it crossed the link."""
    if precopied.postcopy:
        return
    last = _send_round(channel, precopied, report)
    before, precopied.last_round = precopied.last_round, last
    if precopied.auto_postcopy and not _converged(last, before):
        _leave_to_postcopy(channel, precopied)


def _send_round(
    channel: Channel, precopied: Precopy, report: Callable[[str, int], None]
) -> RoundSent:
    """One pre-copy round, sent and applied at the destination."""
    phase = f"round {precopied.rounds}"
    report(phase, precopied.bytes_sent)
    channel.send({"op": "round", "round": precopied.rounds})
    writer = DataWriter(channel)
    progress = _Progress(writer, report, phase, precopied.bytes_sent)
    sent = precopied.send_round(cast(BinaryIO, progress))
    writer.close()
    precopied.bytes_sent += writer.sent
    channel.expect("phase")  # applied there: the next round starts from a caught-up peer
    return sent


def _converged(last: RoundSent, before: RoundSent | None) -> bool:
    """Whether the rounds left little enough for the freeze: the last was small, or
    shrank well from the one before (it stopped on MAX_ROUNDS)."""
    return converged(last, before)


def converged(last: RoundSent, before: RoundSent | None) -> bool:
    """Whether the rounds (a process's, or a whole tree's) left little enough for the
    freeze: the last was small, or shrank well from the one before."""
    if last.pages * rec.PAGE_SIZE < POSTCOPY_MIN_BYTES:
        return True
    return before is not None and before.number > 0 and last.pages <= before.pages * SHRINK


def _switch_shadow(
    shadow: HomeShadow,
    move_id: str,
    location: str,
    plan: list[Proxy],
    prepared: dict[str, Any],
    unread: dict[str, bytes],
    unread_datagrams: dict[str, list[tuple[str, bytes]]],
    present: list[str],
    *,
    home_again: bool = False,
    members: dict[int, dict[int, str]] | None = None,
    direct: dict[int, list[int]] | None = None,
) -> None:
    """`migrated` to the shadow: the process runs at `location` with what `prepared` said.

    `home_again`: at home, with every original the shadow handed back; a tree's
    `members` (but its root, whose are `plan`'s): each one's numbers of each stream, by
    its pid at home now. `direct` (a move from home): the numbers of its direct
    connections, by member (0: the root), made again at `location`: the shadow lets go
    of the copies the hand-over gave it.
    """
    shadow.request(
        {
            "op": "migrated",
            "brief": True,  # its answer is not read
            "move": move_id,
            "location": location,
            "home_again": home_again,
            # Its numbers of each stream: those of the originals handed back (the same
            # wherever it runs) are what the shadow holds for it at home again.
            "numbers": {str(p.fd): p.stream for p in plan if p.kind != "direct"},
            "members": {
                str(member): {str(fd): stream for fd, stream in numbers.items()}
                for member, numbers in (members or {}).items()
            },
            "pid": int(prepared.get("pid", 0)),  # its pid there
            "direct": {str(member): fds for member, fds in (direct or {}).items() if fds},
            "unread": {k: base64.b64encode(v).decode() for k, v in unread.items()},
            "listeners": prepared.get("listeners", {}),
            "present": present,
            "datagrams": {
                p.stream: {
                    "process": prepared.get("datagrams", {}).get(p.stream, ""),
                    "connected_to": p.peer,
                }
                for p in plan
                if p.kind == "datagram"
            },
            "unread_datagrams": {
                stream: [[source, base64.b64encode(data).decode()] for source, data in queued]
                for stream, queued in unread_datagrams.items()
            },
        }
    )


def direct_numbers(plan: list[Proxy]) -> list[int]:
    """The descriptors of `plan` that are direct connections (swapped)."""
    return [p.fd for p in plan if p.kind == "direct"]


def tell_frozen(channel: Channel, freeze_ms: float) -> None:
    """Tell the destination how long the move froze the process (only the mover knows):
    its row of the move it received shows it (`hijack status` there). Lost, the row
    goes without it."""
    with contextlib.suppress(ChannelError, OSError):
        channel.send({"op": "frozen", "freeze_ms": round(freeze_ms, 1)})


def _commit(
    channel: Channel, move_id: str, address: tuple[str, int], identity: pki.NodeIdentity
) -> tuple[str, dict[str, Any], str]:
    """Send `commit`: ("running", answer, ""), ("aborted", {}, why) or ("unknown", {}, why).

    An answer lost (the connection broken, the daemon silent) is asked for
    again on new connections until SETTLE_TIMEOUT; the daemon's answer to
    that settles the move if its commit has not arrived.
    """
    try:
        channel.send({"op": "commit"})
        reached("move-committed")
        return "running", channel.expect("phase"), ""
    except ChannelError as exc:
        lost = f"the answer to the commit was lost ({exc})"
    except HijackError as exc:
        return "aborted", {}, str(exc)  # the daemon's own answer: it killed what it built
    answer = ask_outcome(address, identity, move_id, settle_timeout(), channel.peer)
    if answer is None:
        return "unknown", {}, lost
    if answer["outcome"] == "running":
        return "running", answer, ""
    if answer["outcome"] == "aborted":
        return "aborted", {}, f"{lost}; it settled the move as aborted"
    return "unknown", {}, f"{lost}; it has no record of the move"


def settle_timeout() -> float:
    """SETTLE_TIMEOUT, or $HIJACK_SETTLE_TIMEOUT (tests shorten it)."""
    return _seconds("HIJACK_SETTLE_TIMEOUT", SETTLE_TIMEOUT)


def ack_wait() -> float:
    """ACK_WAIT, or $HIJACK_ACK_WAIT: how long the shadow waits for the old node's
    acknowledgements before the move is aborted (tests shorten it)."""
    return _seconds("HIJACK_ACK_WAIT", ACK_WAIT)


def _seconds(variable: str, default: float) -> float:
    try:
        value = float(os.environ.get(variable) or default)
    except ValueError:
        return default
    return value if value >= 0 else default


def ask_outcome(
    address: tuple[str, int],
    identity: pki.NodeIdentity,
    move_id: str,
    timeout: float,
    node: str,
) -> dict[str, Any] | None:
    """The `outcome` answer of destination NODE for `move_id`, retried until `timeout`.

    None if the destination could not be reached in that time.
    """
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        try:
            channel = Channel.connect(address, identity, timeout=max(remaining, 0.1), expect=node)
            try:
                channel.send({"op": "outcome", "move": move_id})
                return channel.expect("outcome")
            finally:
                channel.close()
        except HijackError:
            if deadline - time.monotonic() <= SETTLE_RETRY:
                return None
            time.sleep(SETTLE_RETRY)  # a node being unreachable gives nothing to wait on


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM held back, then dropped: a switch, once begun, is finished.

    The CLI starts its other threads (the progress bar's) with both blocked,
    so blocking them here blocks them for the whole process.
    """
    wanted = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    try:
        yield
    finally:
        while signal.sigpending() & wanted:
            signal.sigtimedwait(wanted, 0)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class MoverLock:
    """A lock file held by the mover for the life of its move: `hijack recover` tells a move
    whose mover is gone (killed) by taking it."""

    def __init__(self, state_directory: Path, move_id: str) -> None:
        self.path = lock_path(state_directory, move_id)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Locked the file that has the name (not one a `recover` just removed)?
            with contextlib.suppress(FileNotFoundError):
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            os.close(fd)
        self.fd: int | None = fd
        self.kept = False

    def keep(self) -> None:
        """Leave the file (unlocked) for `hijack recover`."""
        self.kept = True

    def release(self) -> None:
        if self.fd is None:
            return
        if not self.kept:
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None


def lock_path(state_directory: Path, move_id: str) -> Path:
    return state_directory / "moves" / f"{move_id}.lock"


def _remove_if_free(path: Path) -> None:
    """Remove a lock file no mover holds (removed while we hold it: no one takes it meanwhile)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path.unlink(missing_ok=True)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)


def mover_gone(state_directory: Path, move_id: str) -> bool:
    """Whether no command works on `move_id` any more (its lock is free or gone)."""
    try:
        fd = os.open(lock_path(state_directory, move_id), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def _abort(channel: Channel, shadow: HomeShadow, move_id: str) -> None:
    """Best effort: the daemon kills what it built, the shadow goes on as before."""
    for action in (
        lambda: channel.send({"op": "abort"}),
        lambda: shadow.request({"op": "aborted", "move": move_id}),
    ):
        with contextlib.suppress(HijackError):
            action()


PUBLISH_INTERVAL = 0.25  # seconds between the progress a move writes to the registry
REPORT_EVERY = 256 * 1024  # bytes of image between two progress reports


class _Published:
    """`report`, and the move's row in the registry kept up to date (`hijack status` reads it).

    A new phase is written at once; bytes sent at most every PUBLISH_INTERVAL.
    """

    def __init__(
        self, registry: Registry, move_id: str, report: Callable[[str, int], None]
    ) -> None:
        self.registry = registry
        self.move_id = move_id
        self.report = report
        self.phase = "connecting"
        self.written_at = 0.0

    def __call__(self, phase: str, sent: int) -> None:
        self.report(phase, sent)
        now = time.monotonic()
        if phase.startswith("round "):  # the registry knows the phase, not the round
            phase = "precopying"
        if phase != self.phase or now - self.written_at >= PUBLISH_INTERVAL:
            self.registry.update_move(self.move_id, phase=phase, bytes_sent=sent)
            self.phase, self.written_at = phase, now


class _Progress:
    """A write-only stream that reports how much has gone through it."""

    def __init__(
        self,
        writer: DataWriter,
        report: Callable[[str, int], None],
        phase: str = "streaming",
        before: int = 0,
    ) -> None:
        self.writer = writer
        self.report = report
        self.phase = phase
        self.before = before  # bytes the move sent before this stream
        self.reported = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        already = self.writer.sent
        written = self.writer.write(data)
        if self.writer.sent - self.reported >= REPORT_EVERY:  # not for every small section
            self.reported = self.writer.sent
            self.report(self.phase, self.before + self.writer.sent)
        self._first_out(already)
        return written

    def flush(self) -> None:
        already = self.writer.sent
        self.writer.flush()
        self._first_out(already)  # a final image's head goes out by a flush

    def _first_out(self, already: int) -> None:
        if self.phase == "streaming" and not already and self.writer.sent:
            reached("move-streaming")  # the first data frame of the image is out


def refuse_unmappable(pid: int) -> None:
    """Refuse, before anything is touched, a process whose copy could not map what it maps:
    the destination's restore would refuse it. What an object of the image holds (a memfd,
    a deleted file, shared anonymous memory, a System V segment) is made there."""
    maps = procfs.read_maps(pid)
    segments = describe_segments(pid, maps, rec.DumpOptions(0), flags={})
    held = frozenset(m.start for m in maps if holds_object(m))
    problems = list(mapping_problems(segments, held))
    if problems:
        raise Unsupported(f"cannot move process {pid}: {'; '.join(problems)}; nothing was changed")


def sysv_segments(pid: int) -> dict[int, int]:
    """The System V segments `pid` has attached: each id, with an address it is attached
    at. The destination's restore of the frozen image attaches each (made again under its
    id, or found live there: hijack.objects.sysv); a stub built from pre-copy rounds
    cannot (hijack.restore.address_space): such a process moves frozen whole."""
    return {
        m.inode: m.start
        for m in reversed(procfs.read_maps(pid))  # each at its lowest address
        if sysv.is_segment_mapping(m.path, m.shared, m.dev_major)
    }


def remove_left_behind(segments: dict[int, sysv.SharedMemory]) -> None:
    """Once a move is done and its originals are gone: remove here each System V segment
    they had attached that nothing attaches any more. The destination attaches its own (made
    again there, in another IPC namespace); this one, left, would be found by a move home
    again and taken as it is, as it was when the process left. One still attached (by the
    copy itself where the destination shares this IPC namespace, or by another process)
    stays, and so does one that is not the same segment any more."""
    now = sysv.shared_memory() if segments else {}
    for shmid, before in segments.items():
        found = now.get(shmid)
        if found is None or found.nattch or _segment_identity(found) != _segment_identity(before):
            continue
        with contextlib.suppress(HijackError):  # removed meanwhile: what was asked
            sysv.remove("shm", shmid)


def _segment_identity(found: sysv.SharedMemory) -> tuple[int, int, int]:
    """What tells a segment from another made since under the same id."""
    return found.owner.key, found.size, found.cpid


def plan_proxies(
    pid: int,
    shadow: HomeShadow | None,
    at_home: bool,
    *,
    frozen: bool = True,
    sockets: dict[int, procfs.SocketInfo] | None = None,
    inside: frozenset[str] = frozenset(),
    streams: dict[str, dict[str, Any]] | None = None,
) -> tuple[list[Proxy], list[str]]:
    """Which descriptors go through the home shadow, and as which stream; refuse the rest.

    Also returns the stream ids the process holds now (so the shadow knows which
    clients it accepted were not yet accepted by the process). At home the
    shadow is not asked, so the check can run before there is one. Not
    `frozen`, the process still opens and closes relays while we look, so a
    relay the shadow does not list (yet, or any more) is not refused then.
    `sockets`: sockets_of(pid), read since it was frozen. `inside`: the descriptor links
    ("pipe:[N]", "socket:[N]") joining it to other members of its tree moving with it,
    made again there from the image (hijack.node.tree_move). `streams`: the shadow's
    (shadow_streams), if asked already.

    Frozen, a connection to a relayed listener (or the shadow's endpoint) that the
    shadow does not list, while it lists a client it accepted with no relay yet, is a
    relay in the making (the node's forwarder connects such a client to the process's
    listener, then makes its relay to the shadow, neither waiting for the process): the
    shadow is asked again until it lists it, up to RELAY_MAKING_WAIT, before the
    descriptor is refused.
    """
    deadline = time.monotonic() + RELAY_MAKING_WAIT
    while True:
        plan, refused, making = _plan_proxies(
            pid, shadow, at_home, frozen, sockets, inside, streams
        )
        if not making or refused or time.monotonic() >= deadline:
            break
        time.sleep(RELAY_MAKING_INTERVAL)
        streams = None  # asked again
    if refused or making:
        raise Unsupported(
            f"cannot move process {pid}: {', '.join(refused + making)} cannot be proxied;"
            " nothing was changed"
        )
    return plan, [p.stream for p in plan if p.kind != "direct"]


def _plan_proxies(
    pid: int,
    shadow: HomeShadow | None,
    at_home: bool,
    frozen: bool,
    sockets: dict[int, procfs.SocketInfo] | None,
    inside: frozenset[str],
    streams: dict[str, dict[str, Any]] | None,
) -> tuple[list[Proxy], list[str], list[str]]:
    """plan_proxies' one look: the plan, the descriptors refused (described), and the
    relays in the making seen (frozen)."""
    entries = procfs.list_fds(pid)
    if sockets is None:
        # Read after the descriptors: a socket accepted meanwhile is in the table.
        sockets = sockets_of(pid, entries)
    held = {entry.ino for entry in entries if entry.kind is procfs.FdKind.SOCKET}
    # (A socket the TCP or UDP tables list is no unix one: no dump of the unix sockets of
    # its namespace for a process that holds none, as one with only relays.)
    maybe_unix = {
        ino for ino in held if ino not in sockets or sockets[ino].family == socket.AF_UNIX
    }
    socketpairs = unix.pairs_inside(pid, held) if maybe_unix else set()
    if at_home or shadow is None:
        streams = {}
    elif streams is None:
        streams = shadow_streams(shadow)
    by_ends = {
        (s["relay"], s["shadow_end"]): s["id"]
        for s in streams.values()
        if s["relay"] and s["kind"] != "datagram"
    }
    by_datagram = {s["relay"]: s["id"] for s in streams.values() if s["kind"] == "datagram"}
    # A UDP socket connected to a stand-in of the forwarder here (encrypted datagrams,
    # hijack.shadow.datagram_link) is connected to the shadow's relay it stands for.
    relay_host = (shadow.record.relay_address or "").rpartition(":")[0] if shadow else ""
    stood_for = {
        alias: f"{relay_host}:{port}"
        for s in streams.values()
        if s["kind"] == "datagram"
        for alias, port in s.get("aliases", {}).items()
    }
    by_listener = {s["listener"]: s["id"] for s in streams.values() if s["listener"]}
    # The shadow's endpoint (daemons' relays connect to it) and the listeners
    # at the node (the shadow connects accepted clients to them).
    relayed_ends = {shadow.record.relay_address or ""} if shadow else set()
    relayed_ends |= set(by_listener)
    # A client the shadow accepted whose relay the forwarder has not made yet: the
    # process may hold its socket already (plan_proxies waits for it, frozen).
    awaited = any(s["id"].startswith("acc:") and not s["relay"] for s in streams.values())
    by_terminal = {s["terminal"]: s["id"] for s in streams.values() if s.get("terminal")}
    terminals: dict[tuple[int, int], str] = {}  # at home: (dev, ino) -> stream id
    # The connections a swap joined directly (this node's registry), by their two ends,
    # and those relayed by packets that run here.
    direct, routed = _direct_connections() if sockets else (set(), {})
    plan: list[Proxy] = []
    refused: list[str] = []
    making: list[str] = []
    for entry in entries:
        if entry.kind in REBUILT or entry.target in inside:
            continue
        if entry.ino in socketpairs and entry.kind is procfs.FdKind.SOCKET:
            continue  # both ends in the process: made again at the destination from the image
        if entry.kind is procfs.FdKind.TTY and entry.target.endswith("ptmx"):
            master = _master_proxy(pid, entry.fd, at_home, by_terminal, plan)
            if master is not None:
                plan.append(master)
                continue
        elif entry.kind is procfs.FdKind.TTY:
            # At home, the stream of a terminal is named for its lowest descriptor;
            # away, the shadow knows the pty that stands for it on this node.
            stream_id = (
                terminals.setdefault((entry.dev, entry.ino), f"tty:{entry.fd}")
                if at_home
                else by_terminal.get(entry.target)
            )
            if stream_id is not None:
                plan.append(_terminal_proxy(pid, entry.fd, stream_id, plan))
                continue
        found = sockets.get(entry.ino) if entry.kind is procfs.FdKind.SOCKET else None
        if found is None and entry.kind is procfs.FdKind.SOCKET and at_home:
            found = _unbound_udp(pid, entry)
        if entry.kind is procfs.FdKind.SOCKET and found is None and _closed_since(pid, entry):
            continue  # a client that came and went while we looked (not frozen yet)
        listening = found is not None and found.state == "LISTEN"
        if found is not None and (found.local, found.remote) in routed:
            # Relayed by packets: it follows the process (hijack.node.packet_relay).
            origin = routed[(found.local, found.remote)].origin
            plan.append(
                Proxy(entry.fd, f"routed:{entry.fd}", "routed", peer=found.remote,
                      local=found.local, origin=origin)
            )  # fmt: skip
            continue
        if found is not None and (found.local, found.remote) in direct:
            # A swapped connection: it follows the process (hijack.node.repoint).
            plan.append(
                Proxy(entry.fd, f"direct:{entry.fd}", "direct", peer=found.remote,
                      local=found.local)
            )  # fmt: skip
            continue
        if found is not None and _is_udp(found):
            datagram = _datagram_proxy(entry.fd, found, by_datagram, stood_for, at_home)
            if datagram is not None:
                plan.append(datagram)
                continue
        elif at_home:
            streamable = entry.kind in STREAMED or (
                found is not None and found.type == socket.SOCK_STREAM
            )
            if streamable:
                kind = "listener" if listening else "stream"
                backlog = _backlog(pid, entry.fd) if listening else 0
                plan.append(
                    Proxy(entry.fd, f"fd:{entry.fd}", kind, shut=_shut(found), backlog=backlog)
                )
                continue
        elif found is not None:
            stream_id = (
                by_listener.get(found.local)
                if listening
                else by_ends.get((found.local, found.remote))
            )
            if stream_id is not None:
                kind = "listener" if listening else "stream"
                backlog = _backlog(pid, entry.fd) if listening else 0
                plan.append(Proxy(entry.fd, stream_id, kind, shut=_shut(found), backlog=backlog))
                continue
            relay_ends = {found.remote, found.local} & relayed_ends
            if relay_ends and not frozen:
                continue
            if relay_ends and awaited:
                making.append(f"fd {entry.fd} ({entry.kind.value} {found.describe()})")
                continue
        what = found.describe() if found else entry.target
        refused.append(f"fd {entry.fd} ({entry.kind.value} {what})")
    return plan, refused, making


def _direct_connections() -> tuple[set[tuple[str, str]], dict[tuple[str, str], RoutedConnection]]:
    """This node's direct connections (swapped) and those relayed by packets, by ends."""
    with Registry() as registry:
        return registry.direct_connections(), registry.routed_connections()


def sockets_of(
    pid: int, entries: list[procfs.FdEntry] | None = None
) -> dict[int, procfs.SocketInfo]:
    """The socket tables of the network namespace of `pid`, as far as they hold its sockets
    (its descriptors `entries`, listed if not given). /proc/net/tcp and tcp6 walk the
    kernel's whole connection hash, ~4 ms each here even in an empty namespace (~20 ms
    on a busy machine): its TCP sockets (relays; a JVM's, IPv6) are asked of copies of them
    instead (tcp_repair.listed_tcp), and only for the others are the tables read."""
    entries = procfs.list_fds(pid) if entries is None else entries
    held = {entry.fd: entry.ino for entry in entries if entry.kind is procfs.FdKind.SOCKET}
    if not held:
        return {}
    unix: set[int] = set()
    found = tcp_repair.listed_tcp_of(pid, held, unix)
    rest = set(held.values()).difference(found)
    if not rest:
        return found
    # Only unix sockets left (a JVM holds one): the TCP and UDP tables are not walked.
    table = procfs.read_socket_table(pid, wanted=rest, inet=bool(rest - unix))
    return {**table, **found}


def _backlog(pid: int, fd: int) -> int:
    """The backlog process `pid` gave its listener `fd` (its listener at the node gets it)."""
    try:
        handle = pidfd.pidfd_open(pid)
        try:
            copy = pidfd.pidfd_getfd(handle, fd, pid)
        finally:
            os.close(handle)
    except HijackError:
        return 0  # gone meanwhile: the frozen look decides
    try:
        return listen_backlog(copy)
    except OSError:
        return 0
    finally:
        os.close(copy)


# TCP states of a socket whose own end is sent: its process shut down its writing side.
SHUT_STATES = {"FIN_WAIT1", "FIN_WAIT2", "CLOSING", "LAST_ACK"}


def _shut(found: procfs.SocketInfo | None) -> bool:
    return found is not None and found.state in SHUT_STATES


def _is_udp(found: procfs.SocketInfo) -> bool:
    return (
        found.family in (socket.AF_INET, socket.AF_INET6)
        and found.type == socket.SOCK_DGRAM
        and found.protocol == socket.IPPROTO_UDP
    )


def _unbound_udp(pid: int, entry: procfs.FdEntry) -> procfs.SocketInfo | None:
    """A UDP socket never bound (in no /proc/net table), asked through a copy of it."""
    try:
        handle = pidfd.pidfd_open(pid)
        try:
            sock = socket.socket(fileno=pidfd.pidfd_getfd(handle, entry.fd, pid))
        finally:
            os.close(handle)
    except (OSError, HijackError):
        return None
    with sock:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return None
        unbound = "[::]:0" if sock.family == socket.AF_INET6 else "0.0.0.0:0"
        found = procfs.SocketInfo(
            entry.ino, sock.family, sock.type, sock.proto, "CLOSE", unbound, unbound
        )
    return found if _is_udp(found) else None


def _datagram_proxy(
    fd: int,
    found: procfs.SocketInfo,
    by_datagram: dict[str, str],
    stood_for: dict[str, str],
    at_home: bool,
) -> Proxy | None:
    """The proxy of a UDP socket: at home its original; away, the one the shadow relays to."""
    if at_home:
        return Proxy(fd, f"fd:{fd}", "datagram", int(found.family))
    local = _unmapped_endpoint(found.local)
    stream_id = by_datagram.get(local)
    if stream_id is None:
        return None
    # Connected on its node to one of the shadow's relays: the same at the next one.
    peer = _unmapped_endpoint(found.remote) if found.state == "ESTABLISHED" else ""
    return Proxy(fd, stream_id, "datagram", int(found.family), stood_for.get(peer, peer))


def _unmapped_endpoint(text: str) -> str:
    host, port = parse_datagram_address(text)
    return f"{host}:{port}"


def connect_datagrams(plan: list[Proxy], answer: dict[str, Any], relay_address: str) -> list[Proxy]:
    """At home: a connected UDP original's process socket connects to its relay in the shadow."""
    ports = {
        s["id"]: int(s.get("connected_relay_port", 0))
        for s in answer.get("streams", [])
        if s["kind"] == "datagram"
    }
    host = relay_address.rpartition(":")[0]
    return [
        dataclasses.replace(p, peer=f"{host}:{ports[p.stream]}")
        if p.kind == "datagram" and ports.get(p.stream)
        else p
        for p in plan
    ]


def drain_datagrams(pid: int, plan: list[Proxy]) -> dict[str, list[tuple[str, bytes]]]:
    """The datagrams a frozen process had not read from its relay-made UDP sockets, taken.

    Called once the move is committed: nothing here may fail the move, so a
    socket that cannot be read just keeps what it holds.
    """
    unread: dict[str, list[tuple[str, bytes]]] = {}
    try:
        handle = pidfd.pidfd_open(pid)
    except (OSError, HijackError):
        return unread
    try:
        for proxy in plan:
            if proxy.kind != "datagram":
                continue
            try:
                sock = socket.socket(fileno=pidfd.pidfd_getfd(handle, proxy.fd, pid))
            except (OSError, HijackError):
                continue
            with sock:
                queued = unread.setdefault(proxy.stream, [])
                while True:
                    try:
                        data, source = sock.recvfrom(DATAGRAM_MAX, socket.MSG_DONTWAIT)
                    except OSError:  # none left (or an ICMP error queued: nothing to take)
                        break
                    queued.append((f"{unmapped(source[0])}:{source[1]}", data))
    finally:
        os.close(handle)
    return unread


def drain_terminals(pid: int, plan: list[Proxy]) -> dict[str, bytes]:
    """What was typed at the frozen process's terminals (ptys of its node) and not read yet,
    and what its pty masters there were given and it did not read.

    Called once the move is committed (the original will not read again), as
    drain_datagrams: a terminal that cannot be read keeps what it holds.
    """
    unread: dict[str, bytes] = {}
    for proxy in plan:
        if proxy.kind not in ("terminal", "master") or proxy.stream in unread:
            continue
        try:
            copy = pidfd.copy_fd(pid, proxy.fd)
        except HijackError:
            continue
        try:
            # A master's input is all readable (its settings are the slave's: kept).
            taking = (
                terminal.read_available if proxy.kind == "master" else terminal.take_pending_input
            )
            unread[proxy.stream] = taking(copy)
        except HijackError:
            continue
        finally:
            os.close(copy)
    return {stream: data for stream, data in unread.items() if data}


def _terminal_proxy(pid: int, fd: int, stream: str, plan: list[Proxy]) -> Proxy:
    """Descriptor `fd` of terminal `stream`; descriptors of one open file get one slave."""
    for other in plan:
        if other.stream == stream and kcmp.same_description(pid, other.fd, fd):
            return Proxy(fd, stream, "terminal", file=other.file)
    return Proxy(fd, stream, "terminal", file=fd)


def _master_proxy(
    pid: int, fd: int, at_home: bool, by_terminal: dict[str, str], plan: list[Proxy]
) -> Proxy | None:
    """Pty master `fd` (tmux, screen, expect hold one): at home the stream `ptm:N` of its
    open file (each open of ptmx is a pty of its own), away the stream the shadow
    relays to its pty; None if the shadow relays none to it."""
    for other in plan:
        if other.kind == "master" and kcmp.same_description(pid, other.fd, fd):
            return Proxy(fd, other.stream, "master", file=other.file)
    if at_home:
        return Proxy(fd, f"ptm:{fd}", "master", file=fd)
    try:
        copy = pidfd.copy_fd(pid, fd)
    except HijackError:
        return None
    try:
        path = terminal.slave_path(copy)
    except HijackError:
        return None
    finally:
        os.close(copy)
    stream = by_terminal.get(path)
    return None if stream is None else Proxy(fd, stream, "master", file=fd)


def _closed_since(pid: int, entry: procfs.FdEntry) -> bool:
    try:
        now = os.stat(f"/proc/{pid}/fd/{entry.fd}")
    except FileNotFoundError:
        return True
    return (now.st_dev, now.st_ino) != (entry.dev, entry.ino)


def peek_unread(pid: int, plan: list[Proxy]) -> dict[str, bytes]:
    """What the frozen process has not read yet from its relays, copied, not consumed."""
    unread: dict[str, bytes] = {}
    handle = pidfd.pidfd_open(pid)
    try:
        for proxy in plan:
            if proxy.kind != "stream":
                continue
            with socket.socket(fileno=pidfd.pidfd_getfd(handle, proxy.fd, pid)) as sock:
                waiting = struct.unpack(
                    "i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4)
                )[0]
                if waiting:
                    unread[proxy.stream] = sock.recv(waiting, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    finally:
        os.close(handle)
    return unread


def recover(registry: Registry) -> tuple[list[str], list[str]]:
    """Settle the moves of this node whose mover is gone (killed, or gave up in doubt).

    Returns what was done and what is still in doubt, a line each.
    """
    settled: list[str] = []
    in_doubt: list[str] = []
    for row in registry.unfinished_moves():
        if not mover_gone(registry.directory, row.id):
            continue  # a move under way
        lock = MoverLock(registry.directory, row.id)
        try:
            line, known = _recover_move(registry, row)
            if not known:
                lock.keep()
        finally:
            lock.release()
        (settled if known else in_doubt).append(line)
    unfinished = registry.unfinished_moves()
    for path in lock_path(registry.directory, "*").parent.glob("*.lock"):
        if path.stem not in {row.id for row in unfinished}:
            _remove_if_free(path)  # the lock of a mover killed before it recorded its move
    busy = {row.pid for row in unfinished}
    for record in registry.processes():
        if record.pid not in busy and record.state == "attached":
            followed = _follow_again(record)
            if followed:
                settled.append(followed)
    settled += attaching.clear_ended(registry)
    return settled, in_doubt


def _follow_again(record: ProcessRecord) -> str | None:
    """A shadow left holding for a process that was not killed after all (a `dump --kill`
    killed between the hand-over and the kill) follows it again."""
    if not record.shadow_control:
        return None
    try:
        status = control.request(record.shadow_control, {"op": "status"})
        if status.get("mode") != "holding" or procfs.read_status(record.pid).state[0] in "ZX":
            return None
        control.request(record.shadow_control, {"op": "home", "pid": record.pid})
    except HijackError:
        return None
    return f"the shadow of process {record.pid} follows it again (it was not killed)"


# The phases of a move whose commit may have been sent.
COMMITTING_PHASES = ("switching", "in-doubt", "post-copy")


def _ask_destination(registry: Registry, row: MoveRecord) -> dict[str, Any] | None:
    """The destination's `outcome` answer for the move of `row`, or None (unreachable)."""
    address = registry.node_address(row.destination)
    if address is None:
        return None
    return ask_outcome(
        parse_address(address), pki.load_identity(), row.id, settle_timeout(), row.destination
    )


def _recover_move(registry: Registry, row: MoveRecord) -> tuple[str, bool]:
    """Settle one move whose mover is gone: (what was done, whether its outcome is known)."""
    pid = row.pid
    record = registry.find(pid)
    if record is None:
        registry.update_move(row.id, phase="failed", finished_at=time.time(), error="forgotten")
        return f"move {row.id}: process {pid} is not known here any more", True
    # The commit may have been sent: only the destination knows.
    answer = _ask_destination(registry, row) if row.phase in COMMITTING_PHASES else None
    if row.phase == "post-copy" and (answer is None or answer["outcome"] != "aborted"):
        # Its copy runs there on part of its memory (or was stopped there): the
        # original, stopped here, is the only whole one. Not for a guess.
        registry.set_state(pid, "held")
        error = "its mover was interrupted during post-copy"
        registry.update_move(row.id, phase="failed", finished_at=time.time(), error=error)
        if _has_children(pid):
            return (
                f"move {row.id}: interrupted during post-copy; the tree of process {pid} stays"
                f" held stopped here, every member, as the only whole copy (every member of"
                f" its copy on {row.destination} stops once the pages stop coming): kill that"
                " copy's members, then `kill -CONT` every member here",
                True,
            )
        return (
            f"move {row.id}: interrupted during post-copy; process {pid} stays held stopped"
            f" here as the only whole copy (its copy on {row.destination} stops once it"
            f" misses a page): kill that copy, then `kill -CONT {pid}`",
            True,
        )
    # Attached here, never away: a process back home (home_pid set) is relayed as a migrant.
    at_home = record.home_node == node_name() and record.home_pid is None
    shadow = HomeShadow(record, record.relay_token or "")
    if row.phase in COMMITTING_PHASES and _has_children(pid):
        # A tree's move (hijack.node.tree_move): its shadow's switch needs every member's
        # streams, which only the mover planned. Not guessed here.
        registry.update_move(row.id, phase="in-doubt")
        registry.set_state(pid, "held")
        outcome = answer["outcome"] if answer else "unknown"
        return (
            f"move {row.id}: the tree of process {pid} is held stopped (its destination says"
            f" {outcome!r}); `hijack recover` does not settle a tree's move yet: if it runs on"
            f" {row.destination}, kill the tree here, else `kill -CONT` its members",
            False,
        )
    if row.phase in ("switching", "in-doubt"):
        outcome = answer["outcome"] if answer else "unknown"
        if outcome == "running":
            assert answer is not None
            # Its connections relayed by packets go with the copy (before the plan: they
            # are no streams of the shadow's).
            routed = packet_relay.settle(pid, True, at_home, registry)
            plan, present = plan_proxies(pid, shadow, at_home)
            plan = [p for p in plan if p.fd not in routed]
            if at_home:  # the relay ports of its connected UDP sockets, as at `migrating`
                status = shadow.request({"op": "status"})
                plan = connect_datagrams(plan, status, record.relay_address or "")
            unread = {} if at_home else peek_unread(pid, plan) | drain_terminals(pid, plan)
            unread_datagrams = {} if at_home else drain_datagrams(pid, plan)
            _switch_shadow(
                shadow,
                row.id,
                row.destination,
                plan,
                answer,
                unread,
                unread_datagrams,
                present,
                direct={0: routed} if at_home and routed else None,
            )
            registry.moved_on(pid, row.destination)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # held stopped since the commit
            registry.update_move(
                row.id, phase="done", finished_at=time.time(), new_pid=int(answer["pid"])
            )
            return (
                f"move {row.id}: process {pid} runs on {row.destination} as {answer['pid']};"
                " the original here was ended",
                True,
            )
        if outcome != "aborted":
            registry.update_move(row.id, phase="in-doubt")
            registry.set_state(pid, "held")
            return (
                f"move {row.id}: {row.destination} cannot tell what became of the commit;"
                f" process {pid} stays held stopped",
                False,
            )
    # Never committed, or the destination settled it as aborted: the original goes on,
    # its connections relayed by packets here again.
    with contextlib.suppress(HijackError, OSError):
        packet_relay.settle(pid, False, at_home, registry)
    with contextlib.suppress(HijackError):
        shadow.request({"op": "aborted", "move": row.id})
    if row.phase in COMMITTING_PHASES:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # the SIGSTOP of the switch, undone
    registry.set_state(pid, "attached" if at_home else "running")
    error = "its mover was interrupted; the process resumed here"
    registry.update_move(row.id, phase="failed", finished_at=time.time(), error=error)
    return f"move {row.id}: not completed; process {pid} runs on here", True


def living_members(pid: int) -> list[int]:
    """The pids of `pid`'s tree but its zombies (which have no descriptors, no memory to
    plan or send: the frozen tree's record carries them)."""
    return [member.pid for member in read_tree(pid).members if not member.zombie]


def _has_children(pid: int) -> bool:
    try:
        return len(read_tree(pid).members) > 1
    except HijackError:
        return False


def consume_unread(pid: int, plan: list[Proxy]) -> None:
    """Empty the frozen process's relays of what it had not read (the new relays carry a copy).

    A socket closed with unread bytes is reset, and a reset throws away what
    the process wrote that is still in its send queue: its last bytes would be
    lost. Emptied, the kill closes each relay gracefully, after those bytes.
    """
    handle = pidfd.pidfd_open(pid)
    try:
        for proxy in plan:
            if proxy.kind != "stream":
                continue
            copy = pidfd.pidfd_getfd(handle, proxy.fd, pid)
            with socket.socket(fileno=copy) as sock, contextlib.suppress(OSError):
                while sock.recv(1 << 20, socket.MSG_DONTWAIT):  # BlockingIOError: empty
                    pass
    finally:
        os.close(handle)
