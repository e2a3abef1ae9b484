"""`hijack node serve`: the node daemon (restart daemon) that receives moves.

Connections come in through the gate (hijack.node.gate): TLS 1.3, each peer
presenting a certificate of the cluster's CA that is in date and not revoked
(hijack.node.pki), within bounds on how many connect and how long they take;
one that does not is refused and logged. Each authenticated peer is served
by a thread of its own. A move
(docs/protocol.md, "Moving") is restored straight from the stream, no
temporary file: the daemon first opens the relays to the migrant's home
shadow (and a listener here for each of its listening sockets), then
restores with those as the process's descriptors, holds it stopped and
answers `prepared`; only on `commit` does the process run (`running`).
Anything else — the mover gone, a broken stream, `abort` — kills the stub:
nothing half-built ever runs. A move with pre-copy (`precopy`) first sends
rounds of memory while the process still runs: the stub is built from them
(hijack.restore.precopy) and the move's final image is restored into it.

Each move's outcome here (`running` or `aborted`) is decided once, under a
lock, and written to the registry before it is acted on or told: a mover
that lost the answer to its `commit` asks again on a new connection
(`outcome`), and that question itself settles a move still waiting for its
commit as `aborted` (docs/protocol.md, "Settling a move").
"""

from __future__ import annotations

import contextlib
import encodings.idna  # noqa: F401  # now: a first getaddrinfo() would, in a freeze (~50 ms)
import json
import os
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, NamedTuple, cast

from hijack.errors import HijackError, ShadowError
from hijack.image import records as rec
from hijack.image.codec import read_stream
from hijack.mutator.postcopy import decode_runs, page_timeout
from hijack.mutator.precopy import Run, lazy_in
from hijack.node import gate, mounts, packet_relay, pki, policy, swap_end
from hijack.node import terminal as terminal_pump
from hijack.node.channel import Channel, ChannelError, DataReader
from hijack.node.forwarder import ForwarderProcess, closed_listener, side_by_side
from hijack.node.load import node_load
from hijack.process.tree import read_stopped_tree
from hijack.registry import MemberRecord, Registry, RoutedConnection, node_name
from hijack.restore.postcopy import LazyPages, serve_members
from hijack.restore.precopy import Prebuilt
from hijack.restore.restorer import RestoreResult, clone_ahead, restore
from hijack.restore.tree import PrebuiltTree, TreeMove, prebuild_tree, restore_tree
from hijack.restore.tree_rounds import TreeRounds
from hijack.shadow import control, relay_link
from hijack.shadow.datagram import widen_receive_buffer
from hijack.shadow.relay import endpoint
from hijack.sys import packet_route, pidfd, procfs, tcp_repair, terminal
from hijack.testpoint import reached
from hijack.timing import Laps

DEFAULT_PORT = 7450
MAX_PORT = 65535
COMMIT_TIMEOUT = 60.0  # seconds a prepared process waits for the mover's decision
LISTEN_BACKLOG = 128  # a listener's, when an older mover does not say the process's own
RELEASE_TIMEOUT = 5.0  # seconds to tell a home shadow its migrant ended
STOPPING_RELEASE_TIMEOUT = 3.0  # the same, as the daemon stops (a TLS handshake, then the answer)
SWEEP_INTERVAL = 5.0  # seconds between two looks for ended connections relayed by packets
# How long a daemon waits for the mover's `frozen` once the moved process runs: the mover sends
# it at once (its shadow switch done); a lost one only leaves the received row without it.
FROZEN_WAIT = 10.0


# Proxies whose descriptor a pre-copied move makes as its `move` message arrives: a relay
# (through the forwarder or plain) and an original handed back. Listeners, datagram
# sockets and terminals wait for the image's admission.
EARLY_KINDS = ("stream", "original")


class Proxy(NamedTuple):
    """A descriptor of the moving process that its home shadow proxies."""

    fd: int  # the process's descriptor number
    stream: str  # the shadow's stream id
    # "stream", "listener", "datagram", "terminal", "master", or "original": a move home,
    # the home shadow's original itself
    kind: str
    family: socket.AddressFamily  # a datagram socket's (AF_UNSPEC for the others)
    peer: str  # the shadow relay "ip:port" a connected datagram socket is connected to, or ""
    file: int = -1  # a terminal's: descriptors with one `file` share one open slave
    shut: bool = False  # a stream the process shut down for writing: its relay is too
    backlog: int = 0  # a listener's: the backlog the process gave it
    member: int = 0  # a tree's move: the member whose descriptor it is (its pid at the source)
    # "direct" (a swapped connection, hijack.node.repoint): made here in repair mode from
    # `local` to `peer`, live at the commit
    local: str = ""
    tcp: dict[str, Any] | None = None  # its state (swap_end.state_fields)
    queues: bytes | int = 0  # its queues once received (`unread` messages), their size before
    # A "direct" connection relayed by packets (hijack.node.packet_relay): its home node's
    # address, which its packets go through (a policy rule made with it; "" for others
    # and for one back at its home node), and its address there ("ip:port")
    via: str = ""
    origin: str = ""


def log(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} node {node_name()}: {text}", file=sys.stderr, flush=True)


class NodeDaemon:
    def __init__(
        self,
        address: tuple[str, int],
        identity: pki.NodeIdentity,
        limits: gate.Limits,
        *,
        allow_root: bool = False,
    ) -> None:
        self.address = address
        self.identity = identity
        self.stopping = threading.Event()
        self.limits = limits
        self.allow_root = allow_root  # restore processes with root's powers (hijack.node.policy)
        self.name = node_name()
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.listener.bind(address)
        except OSError as exc:
            raise HijackError(
                f"cannot listen on {address[0]}:{address[1]}: {exc.strerror}"
            ) from None
        self.listener.listen(gate.LISTEN_BACKLOG)
        self.gate = gate.Gate(self.listener, identity, limits, self._serve_peer, log)
        self.forwarder = ForwarderProcess(log)  # the node's ends of encrypted relays
        # Settling: one decision per move. The sockets of moves held for their
        # commit, so that an `outcome` question that aborts one wakes its thread.
        self.decisions = threading.Lock()
        self.waiting: dict[str, Channel] = {}

    def serve(self) -> None:
        self.forwarder.start()
        # Loaded now, not by a move home's first request to the home shadow while its
        # process is frozen (plain relays, originals handed back).
        with contextlib.suppress(HijackError, OSError):
            relay_link.node_context()
        # pyroute2 too (~70 ms to import), for a move relaying connections by packets.
        packet_route.preload()
        sweeping = threading.Thread(target=self._sweep_routed, name="routed", daemon=True)
        sweeping.start()
        host, port = self.listener.getsockname()[:2]
        print(f"hijack node {self.name} listening on {host}:{port}", flush=True)
        try:
            self.gate.run()
        finally:
            self.stopping.set()
            self.listener.close()
            self.forwarder.stop()

    def _sweep_routed(self) -> None:
        """The rules of connections relayed by packets that ended here go, every
        SWEEP_INTERVAL s (hijack.node.packet_relay.sweep)."""
        told: set[tuple[str, str]] = set()
        failed = ""  # said once, until it changes
        while not self.stopping.wait(SWEEP_INTERVAL):
            try:
                lines = packet_relay.sweep(self.identity, told)
                failed = ""
            except (HijackError, OSError) as exc:
                lines = [] if str(exc) == failed else [f"cannot look at them: {exc}"]
                failed = str(exc)
            for line in lines:
                log(f"relayed by packets: {line}")

    def stop(self) -> None:
        self.gate.stop()

    def _serve_peer(self, connection: ssl.SSLSocket, peer: tuple[str, int]) -> None:
        """One authenticated peer (the gate ran its handshake), on a thread of its own."""
        where = f"{peer[0]}:{peer[1]}"
        try:
            connection.settimeout(COMMIT_TIMEOUT)
            channel = Channel.accept(connection)
            request = channel.receive()
            op = request.get("op")
            if op == "ping":
                channel.send({"node": self.name, "pong": True})
            elif op == "load":
                channel.send(node_load(self.name))
            elif op == "move":
                self._receive_move(channel, request, where)
            elif op == "outcome":
                channel.send(self._outcome_of(str(request.get("move"))))
            elif op == "precopy":
                self._receive_precopy(channel, request, where)
            elif op == "swap_end":
                swap_end.relay_to_helper(channel, request)
            elif op == "route":
                packet_relay.serve_route(channel, request)
            elif op == "swap":
                # Not at the top: hijack.node.swap builds on this module.
                from hijack.node import swap as swapping

                swapping.serve_swap(channel, request)
            else:
                log(f"refused a request from {channel.peer} ({where}): unknown op {op!r:.40}")
                channel.send({"error": f"unknown op {op!r:.40}"})
        except HijackError as exc:
            log(f"{where}: {exc}")
        finally:
            connection.close()

    def _receive_precopy(self, channel: Channel, request: dict[str, Any], where: str) -> None:
        """Rounds of memory (each answered `precopied`), then the move itself into their stub."""
        move, program, pid = request.get("move"), request.get("program"), request.get("pid")
        try:
            if not isinstance(move, str) or not isinstance(pid, int):
                raise TypeError
            credentials = _credentials(request["credentials"])
        except (KeyError, TypeError, ValueError, HijackError):
            log(f"refused a pre-copy from {channel.peer} ({where}): malformed request")
            channel.send({"error": f"malformed pre-copy request: {json.dumps(request)[:120]}"})
            return
        log(f"move {move:.40} of {program!s:.80} from {channel.peer} ({where}): pre-copy")
        try:
            # The policy before anything is made (the final image is checked again).
            who = f"{program!s:.80} (pid {pid})"
            policy.check_powers(who, credentials, allow_root=self.allow_root)
            mount_namespace = mounts.open_namespace(request.get("mount_namespace"), who)
        except HijackError as exc:
            log(f"move {move:.40} failed: {exc}")
            channel.send({"error": str(exc)})
            return
        # "links": it proves links to the home shadow ahead of a freeze (the `links` message).
        channel.send({"phase": "precopying", "links": True})
        if request.get("tree") is True:
            self._receive_tree_rounds(channel, request, where, mount_namespace)
            return
        # Round 0 builds the stub: the policy's file checks apply to its layout
        # first; its root check to the final image, before the process can run.
        prebuilt = Prebuilt(
            lambda segments: policy.check_layout(f"{program!s:.80} (pid {pid})", segments),
            mount_namespace,
        )
        try:
            # Opened now rather than while the process is frozen: it takes a while.
            with Registry() as registry:
                while True:
                    message = channel.receive()
                    if message.get("op") == "move":
                        self._receive_move(channel, message, where, prebuilt, registry)
                        return
                    if message.get("op") == "links":  # the freeze comes: no answer
                        self._links_ahead(message)
                        continue
                    if message.get("op") == "drop":  # post-copy comes: stale pages go
                        prebuilt.drop(decode_runs(message.get("lazy")))
                        channel.send({"phase": "dropped"})
                        continue
                    if message.get("op") != "round":
                        raise HijackError(f"move {move} aborted by the mover during pre-copy")
                    reader = DataReader(channel)
                    received = prebuilt.receive_round(cast(BinaryIO, reader))
                    if reader.read(1):
                        raise ChannelError(f"{channel.peer} sent data after pre-copy round")
                    exe = request.get("exe")
                    if received.number == 0 and isinstance(exe, str) and exe:
                        prebuilt.set_exe(exe)  # its program mapped now, the stub's not
                    channel.send(
                        {"phase": "precopied", "round": received.number, "pages": received.pages}
                    )
        except HijackError as exc:
            log(f"move {move} failed: {exc}")
            channel.refuse(str(exc))  # the mover may be sending a round: it reads this after
        finally:
            prebuilt.discard()
            if mount_namespace is not None:
                os.close(mount_namespace)

    def _links_ahead(self, message: dict[str, Any]) -> None:
        """Prove `count` links to the migrant's home shadow now, for the relays its move
        makes once frozen (control.LinksAhead): in the forwarder, or here for plain ones.
        Best effort: a relay without one connects as before (and says what is wrong)."""
        try:
            home = message["home"]
            plain = bool(home.get("plain_relays", False)) or home["node"] == self.name
            shadow = control.HomeEndpoint(
                str(home["relay"]),
                bytes.fromhex(str(home["token"])),
                str(home.get("relay_cert", "")),
                plain,
            )
            count = int(message["count"])
            if plain:
                control.LINKS_AHEAD.prove(shadow, count)
            else:
                self.forwarder.prove(shadow, count)
        except (HijackError, KeyError, ValueError, TypeError, AttributeError) as exc:
            log(f"links ahead not proved: {exc}")

    def _receive_tree_rounds(
        self,
        channel: Channel,
        request: dict[str, Any],
        where: str,
        mount_namespace: int | None,
    ) -> None:
        """A tree's rounds, member by member (each answered `precopied`), kept until the
        tree's move restores each member (hijack.restore.tree_rounds)."""
        move, program = request.get("move"), request.get("program")
        members = request.get("members")
        rounds: TreeRounds | None = None
        prebuilt: PrebuiltTree | None = None
        try:
            if not isinstance(members, list) or not all(isinstance(m, int) for m in members):
                raise HijackError(f"move {move}: a tree's pre-copy without its members")
            rounds = TreeRounds(
                members, lambda segments: policy.check_layout(f"{program!s:.80}", segments)
            )
            with Registry() as registry:
                while True:
                    message = channel.receive()
                    if message.get("op") == "move":
                        if mount_namespace is not None:
                            os.close(mount_namespace)
                            mount_namespace = None  # the move opens its own
                        self._receive_move(
                            channel, message, where, None, registry, rounds, prebuilt
                        )
                        return
                    if message.get("op") == "prebuild" and prebuilt is None:
                        prebuilt = _prebuild(message, rounds, mount_namespace, move)
                        pids = prebuilt.made.pids if prebuilt is not None else {}
                        channel.send(
                            {
                                "phase": "prebuilt",
                                "built": prebuilt is not None,
                                "pids": {str(old): now for old, now in pids.items()},
                            }
                        )
                        continue
                    if message.get("op") != "round" or not isinstance(message.get("member"), int):
                        raise HijackError(f"move {move} aborted by the mover during pre-copy")
                    reader = DataReader(channel)
                    member = int(message["member"])
                    pages = rounds.receive_round(member, cast(BinaryIO, reader))
                    if reader.read(1):
                        raise ChannelError(f"{channel.peer} sent data after pre-copy round")
                    refer = channel.expect("references")
                    rounds.refer(member, list(refer.get("references", [])))
                    channel.send(
                        {"phase": "precopied", "round": message.get("round"), "pages": pages}
                    )
        except (HijackError, OSError, ValueError, TypeError) as exc:
            log(f"move {move} failed: {exc}")
            with contextlib.suppress(ChannelError):
                channel.refuse(str(exc))
        finally:
            if prebuilt is not None:
                prebuilt.discard()
            if rounds is not None:
                rounds.close()
            if mount_namespace is not None:
                os.close(mount_namespace)

    def _receive_move(
        self,
        channel: Channel,
        request: dict[str, Any],
        where: str,
        prebuilt: Prebuilt | None = None,
        registry: Registry | None = None,
        tree_rounds: TreeRounds | None = None,
        tree_prebuilt: PrebuiltTree | None = None,
    ) -> None:
        try:
            move, home, shadow, proxies = _parse_move(request)
            controlling, foreground = _parse_controlling(request, proxies)
        except HijackError as exc:
            log(f"refused a move from {channel.peer} ({where}): {exc}")
            channel.send({"error": str(exc)})
            return
        try:
            proxies = _receive_unread(channel, proxies)
        except (HijackError, ChannelError) as exc:
            log(f"refused a move from {channel.peer} ({where}): {exc}")
            with contextlib.suppress(ChannelError):
                channel.send({"error": str(exc)})
            return
        # The process is frozen from here until `running`: where the time goes,
        # told to the mover (hijack.timing).
        laps = Laps()
        log(f"move {move:.40} of {request.get('program')!s:.80} from {channel.peer} ({where})")
        started_at = time.time()
        here = channel.sock.getsockname()[0]
        opened: list[socket.socket] = []
        provided: dict[int, int] = {}
        listeners: dict[str, str] = {}
        datagrams: dict[str, str] = {}  # stream -> the process's UDP socket, "ip:port"
        image = DataReader(channel)
        committed: list[int] = []  # the pid, once the move is decided `running`
        # Plain relays back home (nothing crosses between hosts) or when asked;
        # else encrypted, through this node's forwarder.
        plain = shadow.plain or home["node"] == self.name

        def relay(stream: str, terminal: str = "") -> socket.socket:
            if plain:
                return control.open_plain_relay(shadow, stream, move, terminal=terminal)
            return self.forwarder.relay(shadow, stream, move, terminal)

        # Streams' relays made ahead, side by side (premake), each taken once by proxy_end.
        made: dict[str, socket.socket] = {}

        def premake(wanted: list[Proxy]) -> None:
            """The relays of `wanted`'s streams made at once: each is a TLS handshake with the
            shadow and its answer, round trips that overlap (one after the other, they were
            most of the destination's freeze before the image came, ~5 ms each idle)."""
            streams = list(dict.fromkeys(p.stream for p in wanted if p.kind == "stream"))
            if len(streams) < 2:
                return  # one is made as before, by proxy_end
            if plain:
                socks = side_by_side(
                    lambda stream: control.open_plain_relay(shadow, stream, move), streams
                )
            else:
                socks = self.forwarder.relays(shadow, streams, move)
            opened.extend(socks)  # closed if the move fails; else once the process has them
            made.update(zip(streams, socks, strict=True))

        def datagram(proxy: Proxy) -> socket.socket:
            if plain:
                return datagram_socket(proxy, here)
            # Its datagrams inside TLS: the forwarder stands for the shadow's relays here.
            peer = parse_address(proxy.peer)[1] if proxy.peer else 0
            return self.forwarder.datagrams(shadow, proxy.stream, move, proxy.family, here, peer)

        terminals = _Terminals(relay)
        direct: list[socket.socket] = []  # in repair mode until the commit
        # By (member, fd): the states whose send queues go_live() gives.
        owed: dict[tuple[int, int], tcp_repair.TcpState] = {}
        direct_proxies: list[Proxy] = []
        # The policy rules of connections relayed by packets: removed if the move fails.
        routes: list[tuple[tuple[str, int], tuple[str, int], str]] = []

        def direct_end(proxy: Proxy) -> socket.socket:
            local, peer = swap_end.split_endpoint(proxy.local), swap_end.split_endpoint(proxy.peer)
            family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
            try:
                state = swap_end.state_from(proxy.tcp or {}, cast(bytes, proxy.queues))
                key = (proxy.member, proxy.fd)
                made, owed[key] = swap_end.make_quiet(family, local, peer, state)
            except (HijackError, OSError) as exc:
                raise HijackError(f"cannot make fd {proxy.fd}'s direct connection: {exc}") from None
            sock = socket.socket(fileno=made)
            if proxy.via:
                try:
                    packet_route.send_through(local, peer, proxy.via)
                except HijackError:
                    sock.close()  # in repair mode: silent
                    raise
                routes.append((local, peer, proxy.via))
            return sock

        def unroute() -> None:
            for local, peer, via in routes:
                with contextlib.suppress(HijackError):
                    packet_route.stop_sending_through(local, peer, via)
            routes.clear()

        originals = _Originals(shadow, move)
        # A move home whose every descriptor is its original again (hijack.node.move).
        home_again = request.get("home_again") is True and home["node"] == self.name
        links: list[socket.socket] = []  # listener links, shut if the move fails
        mount_namespace: int | None = None
        lazy: list[LazyPages] = []  # a post-copy move's pages still on the source

        taken: list[bool] = []
        admitted: list[bool] = []  # once admit() has made the process's descriptors
        # A tree's move (docs/protocol.md, "Moving a tree"): its members' descriptors the
        # relays stand for, and each member's pid here once forked.
        tree = request.get("tree") is True
        tree_given: dict[tuple[int, int], int] = {}
        new_pids: dict[int, int] = {}

        def take_lazy() -> LazyPages | None:
            # Sent after the final image: the pages it left out (docs/protocol.md).
            message = channel.expect("lazy")
            taken.append(True)
            runs = decode_runs(message["lazy"])
            if not runs:
                return None
            lazy.append(LazyPages(runs))
            return lazy[0]

        postcopy = request.get("postcopy") is True
        if postcopy and prebuilt is None and tree_rounds is None:
            log(f"refused a move from {channel.peer} ({where}): post-copy without pre-copy")
            channel.send({"error": "a post-copy move must start with pre-copy rounds"})
            return
        # A tree's post-copy: each member's lazy candidates, told before its image
        # (docs/protocol.md, "Post-copy of a tree"); its own are those inside its image's
        # PRECOPIED segments that may be lazy, as the mover decides them (lazy_in).
        planned: dict[int, list[Run]] = {}
        if tree and postcopy:
            try:
                raw = request.get("lazy")
                if not isinstance(raw, dict):
                    raise HijackError("malformed lazy runs")
                planned = {int(member): decode_runs(runs) for member, runs in raw.items()}
            except (HijackError, ValueError) as exc:
                log(f"refused a move from {channel.peer} ({where}): {exc}")
                channel.send({"error": f"a tree's post-copy move with {exc}"})
                return

        def lazy_member(
            member: int, segments: tuple[rec.Segment, ...], pids: list[int]
        ) -> LazyPages | None:
            runs = lazy_in(segments, planned.get(member, []))
            if not runs:
                return None
            pages = LazyPages(runs, member=member)
            pages.companions = pids
            lazy.append(pages)
            return pages

        try:
            if prebuilt is None:  # else the pre-copy's stub is in it already
                who = f"{request.get('program')!s:.80} (pid {request.get('pid')})"
                mount_namespace = mounts.open_namespace(request.get("mount_namespace"), who)

            def proxy_end(proxy: Proxy) -> int:
                """The descriptor of ours the process gets for `proxy`."""
                if proxy.kind == "original":
                    if home["node"] != self.name:
                        raise HijackError(
                            f"fd {proxy.fd}: its original is at {home['node']}, not here"
                        )
                    return originals.take(proxy.stream)
                if proxy.kind == "terminal":
                    return terminals.slave(proxy.stream, proxy.file)
                if proxy.kind == "master":
                    return terminals.master(proxy.stream)
                if proxy.kind == "listener":
                    # Only the shadow's clients, through our forwarder, get in.
                    try:
                        sock = closed_listener(proxy.backlog)
                    except OSError as exc:
                        raise HijackError(f"cannot listen for fd {proxy.fd}: {exc}") from None
                    opened.append(sock)
                    listeners[proxy.stream] = endpoint(sock.getsockname())
                    links.append(
                        self.forwarder.listen(shadow, proxy.stream, move, listeners[proxy.stream])
                    )
                elif proxy.kind == "direct":
                    sock = direct_end(proxy)
                    opened.append(sock)  # closed in repair mode if the move fails: silent
                    direct.append(sock)
                    direct_proxies.append(proxy)
                elif proxy.kind == "datagram":
                    sock = datagram(proxy)
                    opened.append(sock)
                    datagrams[proxy.stream] = f"{here}:{sock.getsockname()[1]}"
                else:
                    premade = made.pop(proxy.stream, None)
                    sock = premade if premade is not None else relay(proxy.stream)
                    if premade is None:
                        opened.append(sock)
                    if proxy.shut:
                        # Its writing side stays shut: its writes fail as before,
                        # and the shadow sees the end it sent (again).
                        sock.shutdown(socket.SHUT_WR)
                return sock.fileno()

            if prebuilt is not None:
                # Pre-copied, its powers were admitted when the rounds began: its
                # relays and originals are made, and handed to the stub, while the
                # mover still reads the frozen process (they do not depend on its
                # image; a refused image closes them, the stub dies with them).
                premake([p for p in proxies if not p.member])
                early = {
                    proxy.fd: proxy_end(proxy)
                    for proxy in proxies
                    if proxy.kind in EARLY_KINDS and not proxy.member
                }
                provided.update(early)
                laps.lap("early relays")
                prebuilt.hand_over_early(early)
                laps.lap("early relays and descriptors in")
                # Its threads too, as the message names them: the clones' wake-ups
                # overlap the mover's reading of the frozen process (the final restore
                # checks they are the image's, and gives each what it would inherit).
                if not tree:
                    clone_ahead(prebuilt, _threads_of(request))
                    laps.lap("threads cloned ahead")

            def admit(
                header: rec.ImageHeader,
                credentials: tuple[rec.Credentials, ...],
                segments: rec.Segments,
            ) -> None:
                # The policy first: a refused image gets no relay, no listener (but the
                # early ones above, made for a process admitted before its rounds).
                policy.check_image(header, credentials, segments, allow_root=self.allow_root)
                laps.lap("image head")
                if tree_given or admitted:
                    return  # a tree's: made at its first member's admission
                admitted.append(True)
                # Filled in place: restore reads `provided` only after this.
                premake([p for p in proxies if tree or p.fd not in provided])
                # A tree's members share a stream's one end (a terminal's: one per open file).
                ends: dict[tuple[str, int], int] = {}
                for proxy in proxies:
                    if not tree and proxy.fd in provided:
                        continue  # made early
                    key = (proxy.stream, proxy.file if proxy.kind == "terminal" else -1)
                    if key not in ends or not tree:
                        ends[key] = proxy_end(proxy)
                    if tree:
                        tree_given[(proxy.member, proxy.fd)] = ends[key]
                    else:
                        provided[proxy.fd] = ends[key]
                laps.lap("relays")

            def hold_tree_until_commit(pids: dict[int, int]) -> None:
                new_pids.update(pids)
                hold_until_commit(pids[int(request["pid"])])

            def hold_until_commit(pid: int) -> None:
                # A tree home again is an attached tree: its members as they are now.
                members = _members_now(pid) if tree and home_again else ()
                # The restore gave each pty the settings of the home one; a pty
                # whose master the process holds passes bytes through as they
                # are (the home pty edits and echoes), so its slave is raw again.
                terminals.make_slaves_raw()
                # Recorded before it may run: a node that cannot record its
                # migrant refuses it while the original can still go on, and
                # nothing can fail here once it runs (the mover would resume
                # the original: two of it).
                with contextlib.nullcontext(registry) if registry else Registry() as records:
                    records.record_migrant(
                        pid,
                        procfs.read_stat(pid).starttime,
                        str(request.get("program")),
                        str(home["node"]),
                        int(home["pid"]),
                        str(home["relay"]),
                        str(home["token"]),
                        shadow.fingerprint,
                        shadow.plain,
                    )
                    addresses = {"listeners": listeners, "datagrams": datagrams}
                    records.record_arrival(move, pid, "prepared", addresses)
                with self.decisions:
                    self.waiting[move] = channel
                laps.lap("record arrival")
                try:
                    channel.send(
                        {
                            "phase": "prepared",
                            "pid": pid,
                            "pids": {str(old): now for old, now in new_pids.items()},
                            "listeners": listeners,
                            "datagrams": datagrams,
                            "laps": laps.rounded(),
                            "injected": laps.injected,
                        }
                    )
                    decision = channel.receive()
                    laps.lap("wait for commit")
                    if decision.get("op") != "commit":
                        raise HijackError(f"move {move} aborted by the mover")
                    # (In the move's registry: opening one costs ~2 ms, frozen.)
                    if self._decide(move, pid, "running", registry=registry) != "running":
                        raise HijackError(f"move {move} was settled as aborted before its commit")
                    committed.append(pid)
                    for proxy, sock in zip(direct_proxies, direct, strict=True):
                        swap_end.go_live(sock.fileno(), owed[(proxy.member, proxy.fd)])
                    for proxy in proxies:
                        if proxy.kind != "direct":
                            continue
                        # A later move takes it along again.
                        with contextlib.suppress(HijackError), Registry() as records:
                            if proxy.via:
                                records.record_routed(
                                    RoutedConnection(
                                        proxy.local, proxy.peer, proxy.origin, proxy.via,
                                        str(home["node"]),
                                    )
                                )  # fmt: skip
                            elif not proxy.origin:  # (back home: an ordinary connection)
                                records.record_direct(proxy.local, proxy.peer)
                    with contextlib.nullcontext(registry) if registry else Registry() as records:
                        # Back home: its home row is this one now (attached again, if its
                        # shadow handed every original back).
                        records.settle_arrival(pid, home_again=home_again, members=members)
                    laps.lap("decide")
                except BaseException:
                    self._decide(move, pid, "aborted")
                    with contextlib.suppress(HijackError), Registry() as forgetting:
                        forgetting.forget(pid, f"move {move} did not complete")
                    raise
                finally:
                    with self.decisions:
                        self.waiting.pop(move, None)

            if tree:
                result: RestoreResult = self._restore_tree(
                    cast(BinaryIO, image),
                    TreeMove(
                        tree_given,
                        admit,
                        hold_tree_until_commit,
                        mount_namespace,
                        tree_rounds,
                        # Its pty made now: the root takes it before its children are forked.
                        terminals.reserve(controlling) if controlling else "",
                        foreground,
                        tree_prebuilt,
                        laps,
                        lazy_member if postcopy else None,
                    ),
                )
            else:
                result = restore(
                    cast(BinaryIO, image),
                    provided=provided,
                    before_start=hold_until_commit,
                    admit=admit,
                    prebuilt=prebuilt,
                    mount_namespace=mount_namespace,
                    take_locks=False,
                    laps=laps,
                    lazy=take_lazy if postcopy else None,
                )
        except HijackError as exc:
            log(f"move {move} failed: {exc}")
            unroute()
            for pages in lazy:
                pages.close()
            terminals.close()
            for link in links:  # the forwarder lets go of them
                with contextlib.suppress(OSError):
                    link.shutdown(socket.SHUT_RDWR)
            if committed:
                # Decided `running`, yet it never started (the restorer killed
                # it): the record must not tell a mover to end its original.
                self._decide(move, committed[0], "aborted", force=True)
            with contextlib.suppress(ChannelError):
                channel.send({"error": str(exc)})
                # The mover reads our answer once it has sent the whole image:
                # closing on it now would reset the connection, losing the reason.
                image.drain()
                if postcopy and not taken and not tree:
                    channel.receive()  # and the `lazy` message after it
            return
        finally:
            if sys.exc_info()[1] is not None:
                unroute()
                for pages in lazy:
                    pages.close()
            for sock in opened:
                sock.close()  # the process has its own copies
            originals.close()
            terminals.close_slaves()
            if mount_namespace is not None:
                os.close(mount_namespace)
        terminals.start_pumps()
        if tree_prebuilt is not None and not tree_prebuilt.used:
            log(
                f"move {move}: the tree changed between the build of its stubs and its freeze:"
                " rebuilt during the freeze"
            )
        laps.lap("our copies closed")
        reached("daemon-committed")
        try:
            channel.send(
                {
                    "phase": "running",
                    "pid": result.pid,
                    "pids": {str(old): now for old, now in new_pids.items()},
                    "laps": laps.rounded(),
                }
            )
        finally:
            # Watched once the mover has its answer (a thread's start and a log line,
            # ~0.5-1 ms of the freeze otherwise): our child, it waits for our waitpid
            # however soon it ends.
            _watch_migrant(result.pid, child=True)
            log(f"move {move}: {result.program} runs here as {result.pid}")
            # It runs: nothing may fail. Its history row, written once the mover has
            # its answer (the mover's freeze lasts until then: issue #17); what decides
            # the move (its arrival `running`) was written before it ran. (The
            # pre-copy's registry, open already.)
            source_pid = request.get("pid")
            with (
                contextlib.suppress(HijackError),
                contextlib.nullcontext(registry) if registry else Registry() as records,
            ):
                records.record_received_move(
                    move,
                    source_pid if isinstance(source_pid, int) else 0,
                    result.program,
                    channel.peer,
                    result.pid,
                    image.received,
                    started_at,
                )
        if lazy:
            self._postcopy(channel, move, result.pid, lazy, tree)
        else:
            self._take_freeze(channel, move)

    @staticmethod
    def _take_freeze(channel: Channel, move: str) -> None:
        """The mover's `frozen` (how long the move froze the process, which only it knows,
        sent once the freeze is over) into the row of the move received here."""
        try:
            channel.sock.settimeout(FROZEN_WAIT)
            message = channel.receive()
        except (ChannelError, OSError):
            return  # an older mover's close, or its answer lost: the row goes without it
        freeze_ms = message.get("freeze_ms")
        if message.get("op") == "frozen" and isinstance(freeze_ms, (int, float)):
            with contextlib.suppress(HijackError), Registry() as records:
                records.update_move(move, freeze_ms=float(freeze_ms))

    @staticmethod
    def _restore_tree(image: BinaryIO, moved: TreeMove) -> RestoreResult:
        """A tree's image restored, under its pids where they are free: its root's result."""
        records = read_stream(image, scattered=True)
        first = next(records)
        if not isinstance(first, rec.Tree) or not isinstance(next(records), rec.End):
            raise HijackError("a tree's move whose image is not a tree stream")
        return restore_tree(first, records, new_pids=None, moved=moved).root

    def _postcopy(
        self, channel: Channel, move: str, pid: int, lazy: list[LazyPages], tree: bool
    ) -> None:
        """Serve the moved process's missing pages (a tree's: every member's, on this one
        channel) from its source until it has them all.

        A source that goes away or silent first: the process (a tree: every member, its
        memory whole or not) is stopped, never left running on half its memory, and
        each userfaultfd kept open (by its keeper, hijack.restore.postcopy), so that
        even one resumed by hand waits on a missing page rather than read it as zeros.
        So too if this daemon ends.
        """
        total = sum(pages.total_bytes for pages in lazy)
        what = f"{len(lazy)} members of the tree" if tree else "the process"
        log(f"move {move}: post-copy of {total >> 10} KiB of {what} from {channel.peer}")
        started = time.monotonic()
        try:
            serve_members(channel, {pages.pid: pages for pages in lazy}, page_timeout())
        except HijackError as exc:
            stopped = sorted(
                {pid, *(p.pid for p in lazy), *(c for p in lazy for c in p.companions)}
            )
            for member in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(member, signal.SIGSTOP)
            for pages in lazy:
                pages.abandon()  # its keeper holds it stopped, its userfaultfd open
            with contextlib.suppress(HijackError), Registry() as records:
                records.set_state(pid, "held")
            left = sum(pages.left for pages in lazy)
            held = (
                f"the tree of process {pid} is stopped here (every member:"
                f" {' '.join(map(str, stopped))})"
                if tree
                else f"process {pid} is stopped here"
            )
            log(
                f"move {move}: post-copy broke off ({exc}): {held}, {left} of its pages"
                f" still on {channel.peer}; it cannot run without them"
            )
            return
        log(
            f"move {move}: post-copy complete in {time.monotonic() - started:.2f} s:"
            f" {sum(p.arrived for p in lazy)} pages, {sum(p.faults for p in lazy)} faults,"
            f" {sum(p.forks for p in lazy)} forks followed"
        )

    def _decide(
        self,
        move: str,
        pid: int,
        outcome: str,
        *,
        force: bool = False,
        registry: Registry | None = None,
    ) -> str:
        """Settle `move` as `outcome` unless it is settled already; return its outcome.

        Written to the registry before anyone acts on it. If the registry
        cannot be written, `running` is not decided (the process never
        starts); `aborted` is still the outcome in force. `registry`: the
        calling thread's, open already (else one is opened).
        """
        with (
            self.decisions,
            contextlib.nullcontext(registry) if registry else Registry() as registry,
        ):
            found = registry.arrival(move)
            if found is not None and found[1] != "prepared" and not force:
                return found[1]
            addresses = found[2] if found is not None else {}
            try:
                registry.record_arrival(move, pid, outcome, addresses)
            except HijackError:
                if outcome == "running":
                    raise
                log(f"move {move}: could not record it {outcome}")
            return outcome

    def _outcome_of(self, move: str) -> dict[str, Any]:
        """What became of `move` here, settling it as `aborted` if still undecided.

        Asked by a mover that sent `commit` and lost the answer: if the commit
        has not arrived, it never will be acted on now, and the process held
        for it is killed (its thread is woken by shutting its connection).
        """
        with self.decisions, Registry() as registry:
            found = registry.arrival(move)
            if found is None:
                return {"move": move, "outcome": "unknown"}
            pid, outcome, addresses = found
            if outcome == "prepared":
                # Held for a commit that has not come (or a daemon restarted
                # since, whose held stub died with it): it never runs now.
                outcome = "aborted"
                registry.record_arrival(move, pid, outcome, addresses)
                waiting = self.waiting.pop(move, None)
                if waiting is not None:
                    waiting.wake()
                log(f"move {move}: settled as aborted, asked before its commit arrived")
        return {"move": move, "outcome": outcome, "pid": pid, **addresses}


MAX_THREADS = 1 << 16  # a move message's `threads`, at most (the kernel's tids fit 22 bits)


def _threads_of(request: dict[str, Any]) -> list[int]:
    """The move message's `threads` (the process's tids but its leader's; none from an
    older mover), checked: a flaw refuses the move."""
    threads = request.get("threads", [])
    if (
        not isinstance(threads, list)
        or len(threads) > MAX_THREADS
        or not all(isinstance(tid, int) and 0 < tid < 1 << 22 for tid in threads)
    ):
        raise HijackError("malformed threads in the move message")
    return threads


def datagram_socket(proxy: Proxy, here: str) -> socket.socket:
    """The process's UDP socket on this node: its home shadow relays its datagrams.

    Of the original's family (an IPv6 one speaks IPv4 through a mapped
    address); connected to the shadow's relay if the original was connected.
    """
    mapped = "::ffff:" if proxy.family == socket.AF_INET6 else ""
    sock = socket.socket(proxy.family, socket.SOCK_DGRAM)
    try:
        widen_receive_buffer(sock)
        sock.bind((mapped + here, 0))
        if proxy.peer:
            host, port = parse_address(proxy.peer)
            sock.connect((mapped + host, port))
    except OSError as exc:
        sock.close()
        raise HijackError(f"cannot make a UDP socket for fd {proxy.fd}: {exc}") from None
    return sock


def _prebuild(
    message: dict[str, Any], rounds: TreeRounds, mount_namespace: int | None, move: object
) -> PrebuiltTree | None:
    """A moving tree's stubs built from its rounds before its freeze (`prebuild`,
    docs/protocol.md "Moving a tree"); None if they cannot be: the final image then
    builds them during the freeze, as without (logged)."""
    try:
        members = tuple(
            rec.TreeMember(
                pid=int(pid),
                ppid=int(ppid),
                pgid=int(pgid),
                sid=int(sid),
                exit_signal=int(exit_signal),
                exit_code=int(exit_code),
                state=rec.MemberState(int(state)),
                comm=str(comm),
            )
            for pid, ppid, pgid, sid, exit_signal, exit_code, state, comm in message["members"]
        )
        contexts = tuple(
            rec.SharedContext(pid=int(pid), flags=rec.CloneFlags(int(flags)))
            for pid, flags in message.get("contexts", [])
        )
        tree = rec.Tree(members=members, contexts=contexts)
        exe = {int(pid): str(path) for pid, path in message.get("exe", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError, HijackError) as exc:
        log(f"move {move!s:.40}: malformed prebuild ({type(exc).__name__}: {exc}); not built")
        return None
    try:
        return prebuild_tree(tree, rounds, mount_namespace, exe)
    except (HijackError, OSError) as exc:
        log(f"move {move!s:.40}: the tree's stubs not built before its freeze: {exc}")
        return None


def _credentials(fields: Any) -> rec.Credentials:
    """The Credentials record a pre-copy request carries (its fields as JSON)."""
    if not isinstance(fields, dict):
        raise TypeError
    values = dict(fields)
    values["groups"] = tuple(values.get("groups", ()))
    for name, value in values.items():
        items = value if name == "groups" else (value,)
        if not all(isinstance(item, int) and 0 <= item < 1 << 64 for item in items):
            raise ValueError
    return rec.Credentials(**values)


def _parse_move(
    request: dict[str, Any],
) -> tuple[str, dict[str, Any], control.HomeEndpoint, list[Proxy]]:
    """The fields of a `move` request (docs/protocol.md, "Moving"), checked: any flaw refuses it."""
    try:
        move, home = request["move"], request["home"]
        if not isinstance(move, str) or not isinstance(home, dict):
            raise TypeError
        for name in ("node", "relay", "token"):
            if not isinstance(home[name], str):
                raise TypeError
        int(home["pid"])
        token = bytes.fromhex(home["token"])
        fingerprint, plain = home.get("relay_cert", ""), home.get("plain_relays", False)
        if not isinstance(fingerprint, str) or not isinstance(plain, bool):
            raise TypeError
        shadow = control.HomeEndpoint(home["relay"], token, fingerprint, plain)
        proxies = []
        for proxy in request.get("proxies", []):
            number, stream, kind = proxy["fd"], proxy["stream"], proxy.get("kind", "stream")
            family, peer = proxy.get("family", socket.AF_INET), proxy.get("peer", "")
            open_file = proxy.get("file", number)  # a terminal's: see hijack.node.move.Proxy
            shut = proxy.get("shut", False)
            backlog = proxy.get("backlog", LISTEN_BACKLOG)
            member = proxy.get("member", 0)
            if not isinstance(member, int) or not 0 <= member < 1 << 22:
                raise ValueError
            if not isinstance(backlog, int) or not 0 <= backlog < 1 << 31:
                raise ValueError
            if not isinstance(number, int) or not 0 <= number < 1 << 20:
                raise ValueError
            if not isinstance(open_file, int) or not -1 <= open_file < 1 << 20:
                raise ValueError
            if not isinstance(stream, str) or not isinstance(kind, str):
                raise TypeError
            if not isinstance(family, int) or not isinstance(peer, str):
                raise TypeError
            if not isinstance(shut, bool):
                raise TypeError
            if kind == "datagram" and family not in (socket.AF_INET, socket.AF_INET6):
                raise ValueError
            local, tcp = proxy.get("local", ""), proxy.get("tcp", {})
            if not isinstance(local, str) or not isinstance(tcp, dict):
                raise TypeError
            for address in (local, peer) if kind == "direct" else ():
                swap_end.split_endpoint(address)  # ValueError if it is not "ip:port"
            via, origin = proxy.get("via", ""), proxy.get("origin", "")
            if not isinstance(via, str) or not isinstance(origin, str):
                raise TypeError
            if ((via or origin) and kind != "direct") or (via and not origin):
                raise ValueError
            if via:
                socket.inet_aton(via)  # OSError if it is no IPv4 address
                swap_end.split_endpoint(origin)
            queues = proxy.get("queue_bytes", 0)
            if not isinstance(queues, int) or not 0 <= queues < 1 << 31:
                raise ValueError
            proxies.append(
                Proxy(
                    number,
                    stream,
                    kind,
                    socket.AddressFamily(family),
                    peer,
                    file=open_file,
                    shut=shut,
                    backlog=backlog,
                    member=member,
                    local=local,
                    tcp=tcp,
                    queues=queues,
                    via=via,
                    origin=origin,
                )
            )
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, OSError):
        raise HijackError(f"malformed move request: {json.dumps(request)[:120]}") from None
    return move, home, shadow, proxies


def _receive_unread(channel: Channel, proxies: list[Proxy]) -> list[Proxy]:
    """After a move message naming direct connections: their queues (send queue first),
    one after the other in the order of its proxies, as one data stream (docs/protocol.md,
    "Later moves")."""
    if not any(proxy.kind == "direct" for proxy in proxies):
        return proxies
    reader = DataReader(channel)
    received = []
    for proxy in proxies:
        if proxy.kind == "direct":
            data = reader.read(int(proxy.queues))
            if len(data) != int(proxy.queues):
                raise HijackError(f"the queues of fd {proxy.fd} ended short: {len(data)} bytes")
            proxy = proxy._replace(queues=data)
        received.append(proxy)
    if reader.read(1):
        raise HijackError("more queued bytes than the direct connections' sizes")
    return received


def _members_now(root: int) -> tuple[MemberRecord, ...]:
    """The members under `root` (rebuilt, not started yet), for its registry row. Stopped:
    read from their children lists, not by a scan of every process (within the freeze)."""
    with contextlib.suppress(HijackError, OSError):  # read again by `hijack status`
        return tuple(
            MemberRecord(m.pid, root, m.ppid, procfs.read_stat(m.pid).starttime, m.comm)
            for m in read_stopped_tree(root).members[1:]
        )
    return ()


class _Originals:
    """A move home: the originals its home shadow hands back, copied out of the shadow
    (pidfd_getfd; it runs on this node). The shadow is asked through its endpoint, with
    the migrant's token: it names only what it handed back for this move."""

    def __init__(self, home: control.HomeEndpoint, move: str) -> None:
        self.home = home
        self.move = move
        self.shadow_pid = 0
        self.own: dict[str, int] = {}  # stream -> the shadow's descriptor
        self.taken: list[int] = []

    def take(self, stream: str) -> int:
        if not self.shadow_pid:
            request = {"op": "originals", "move": self.move}
            # On a link proved before the freeze (the mover's `links`), if there is one:
            # a TLS handshake less, ~5 ms of CPU here and in the shadow, in the freeze.
            # The request only reads: asked again on a link of its own if that one fails.
            proved = control.LINKS_AHEAD.take(self.home)
            try:
                answer = control.remote_request(self.home, request, proved=proved)
            except ShadowError:
                if proved is None:
                    raise
                answer = control.remote_request(self.home, request)
            shadow_pid = int(answer["shadow_pid"])
            _check_endpoint_owner(shadow_pid, self.home.address)
            self.shadow_pid = shadow_pid
            self.own = {str(k): int(v) for k, v in dict(answer["originals"]).items()}
        if stream not in self.own:
            raise HijackError(f"the home shadow hands no original of {stream} back")
        self.taken.append(pidfd.copy_fd(self.shadow_pid, self.own[stream]))
        return self.taken[-1]

    def close(self) -> None:
        for fd in self.taken:
            os.close(fd)
        self.taken.clear()


def _check_endpoint_owner(pid: int, relay_address: str) -> None:
    """Copy nothing out of a process that does not listen on the endpoint we asked: whoever
    answered there names only its own descriptors, never another process's."""
    port = relay_address.rpartition(":")[2]

    def listening(info: procfs.SocketInfo | None) -> bool:
        return info is not None and info.state == "LISTEN" and info.local.endswith(f":{port}")

    try:
        entries = procfs.list_fds(pid)
        held = {entry.fd: entry.ino for entry in entries if entry.kind is procfs.FdKind.SOCKET}
        # Its sockets asked one by one (its endpoint: TCP over IPv4) rather than the TCP
        # tables read, which walk the kernel's whole hash: a move home waits for this.
        if any(map(listening, tcp_repair.listed_tcp_of(pid, held).values())):
            return
        table = procfs.read_tcp_table(pid)
    except (HijackError, OSError):
        held, table = {}, {}
    if not any(listening(info) and inode in held.values() for inode, info in table.items()):
        raise HijackError(f"process {pid} is not the home shadow listening at {relay_address}")


def _parse_controlling(request: dict[str, Any], proxies: list[Proxy]) -> tuple[str, int]:
    """A tree's `controlling` (the stream of its root's controlling terminal) and
    `foreground` (the group in the foreground there, 0 if none of the tree's) fields,
    checked: the stream is one of its terminals."""
    controlling, foreground = request.get("controlling", ""), request.get("foreground", 0)
    if not isinstance(controlling, str) or not isinstance(foreground, int):
        raise HijackError(f"malformed move request: {json.dumps(request)[:120]}")
    if not 0 <= foreground < 1 << 22:
        raise HijackError(f"malformed move request: foreground group {foreground}")
    terminals = {p.stream for p in proxies if p.kind == "terminal"}
    if controlling and (request.get("tree") is not True or controlling not in terminals):
        raise HijackError(f"malformed move request: controlling terminal {controlling!r:.40}")
    return controlling, foreground


class _Pty:
    """A pty made for a migrant: the end the daemon pumps to the relay, and the slave's path."""

    def __init__(self, kept: int, path: str, relay: socket.socket, *, master_held: bool) -> None:
        self.kept = kept  # the master (for a terminal of the process), or our open slave
        self.path = path
        self.relay = relay
        self.master_held = master_held  # the process holds the master (a pty master at home)


class _Terminals:
    """The ptys made for a migrant whose terminals, or pty masters, stayed at home
    (hijack.node.terminal)."""

    def __init__(self, relay: Callable[[str, str], socket.socket]) -> None:
        self.relay = relay  # (stream, the pty standing for it) -> its relay here
        self.ptys: dict[str, _Pty] = {}  # stream -> its pty
        self.reserved: dict[str, tuple[int, str]] = {}  # stream -> (master, path), no relay yet
        # What the process gets: (stream, open file) -> a slave, or stream -> the master.
        self.handed: dict[tuple[str, int] | str, int] = {}

    def _pty(self, stream: str, *, master_held: bool) -> tuple[int, str]:
        """A new pty for `stream` (or the one reserved) with its relay: (its master, its
        slave's path)."""
        reserved = self.reserved.pop(stream, None)
        master, path = reserved or terminal.open_pseudo_terminal()
        kept = -1
        try:
            kept = terminal.open_slave(path) if master_held else master
            relay = self.relay(stream, path)
        except BaseException:
            os.close(master)
            if kept not in (-1, master):
                os.close(kept)
            raise
        self.ptys[stream] = _Pty(kept, path, relay, master_held=master_held)
        return master, path

    def reserve(self, stream: str) -> str:
        """A pty for terminal `stream` made before its relay (a tree's controlling terminal,
        taken by its root before the tree is forked): its slave's path."""
        self.reserved[stream] = terminal.open_pseudo_terminal()
        return self.reserved[stream][1]

    def slave(self, stream: str, open_file: int) -> int:
        """The slave for descriptors of `stream` that shared open file `open_file` at home:
        one open slave per open file, as there."""
        if stream not in self.ptys:
            self._pty(stream, master_held=False)
        key = (stream, open_file)
        if key not in self.handed:
            path = self.ptys[stream].path
            self.handed[key] = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        return self.handed[key]

    def master(self, stream: str) -> int:
        """The master for the descriptors of pty master `stream` (one open file: each open
        of ptmx is a pty of its own); the daemon pumps its slave, raw, to the relay."""
        if stream not in self.handed:
            self.handed[stream], _path = self._pty(stream, master_held=True)
        return self.handed[stream]

    def make_slaves_raw(self) -> None:
        for pty in self.ptys.values():
            if pty.master_held:
                terminal.set_settings(pty.kept, terminal.get_settings(pty.kept).raw())

    def close_slaves(self) -> None:
        """Close what the process was handed: it has its own copies (and a pty reserved
        that no relay came for: the restore failed before)."""
        for fd in self.handed.values():
            os.close(fd)
        self.handed.clear()
        for master, _path in self.reserved.values():
            os.close(master)
        self.reserved.clear()

    def close(self) -> None:
        self.close_slaves()
        for pty in self.ptys.values():
            os.close(pty.kept)
            pty.relay.close()
        self.ptys.clear()

    def start_pumps(self) -> None:
        for pty in self.ptys.values():
            threading.Thread(
                target=terminal_pump.pump,
                args=(pty.kept, pty.relay, log),
                kwargs={"master_held": pty.master_held},
                name=pty.path,
                daemon=True,
            ).start()
        self.ptys.clear()


def _watch_migrant(pid: int, *, child: bool) -> None:
    """Release the home shadow of migrant `pid` once it ends (a thread waits for that).

    A process we restored is our child, collected here; one restored by an
    earlier run of the daemon is not, and is watched through a pidfd.
    """

    def wait() -> None:
        if child:
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                return
            log(f"process {pid} ended ({os.waitstatus_to_exitcode(status)})")
        else:
            with contextlib.suppress(HijackError):  # gone already
                handle = pidfd.pidfd_open(pid)
                try:
                    pidfd.wait_exit(handle, -1)  # no time-out
                finally:
                    os.close(handle)
            log(f"process {pid} ended")
        _migrant_ended(pid)

    threading.Thread(target=wait, name=f"migrant-{pid}", daemon=True).start()


def reconcile_migrants(*, watch: bool) -> None:
    """The migrants that ended unseen release their home shadow; with `watch`, those that
    run are watched again.

    At start, for those that ended while no daemon ran here; at the end, for
    those that ended as it stopped (the threads that wait for them stop with it).
    """
    with Registry() as registry:
        migrants = registry.running_migrants()
    for record in migrants:
        try:
            stat = procfs.read_stat(record.pid)
            gone = stat.state in ("Z", "X") or (
                record.start_time and stat.starttime != record.start_time
            )
        except HijackError:
            gone = True  # no such process
        if gone:
            log(f"process {record.pid} ended while no daemon watched it")
            # Stopping, a home shadow out of reach must not hold the daemon's end up.
            _migrant_ended(record.pid, RELEASE_TIMEOUT if watch else STOPPING_RELEASE_TIMEOUT)
        elif watch:
            _watch_migrant(record.pid, child=False)


class _Releases:
    """The releases of home shadows under way, so that a stopping daemon lets them finish.

    A thread that waits for a migrant marks it `exited` before it tells the home
    shadow; the daemon stopping then leaves it out of its own last look
    (reconcile_migrants), so it must wait for that thread, or the process's
    end kills it mid-request and the shadow is never released.
    """

    def __init__(self) -> None:
        self.done = threading.Condition()
        self.under_way = 0

    @contextlib.contextmanager
    def one(self) -> Iterator[None]:
        # Counted before the record is marked: whoever sees it marked sees it counted.
        with self.done:
            self.under_way += 1
        try:
            yield
        finally:
            with self.done:
                self.under_way -= 1
                self.done.notify_all()

    def wait(self, timeout: float) -> None:
        with self.done:
            self.done.wait_for(lambda: self.under_way == 0, timeout)


_releases = _Releases()


def _migrant_ended(pid: int, timeout: float = RELEASE_TIMEOUT) -> None:
    """If `pid` ended here (not moved on: a mover marks it before killing it), its home
    shadow has nothing left to relay for and is released."""
    with _releases.one():
        _release_home_shadow(pid, timeout)


def _release_home_shadow(pid: int, timeout: float) -> None:
    with Registry() as registry:
        record = registry.find(pid)
        if record is None or record.state != "running":
            return
        registry.set_state(pid, "exited")
    if record.relay_address and record.relay_token:
        try:
            reason = f"process {pid} ended on {node_name()}"
            release = {"op": "release", "reason": reason}
            control.remote_request(record.home_endpoint(), release, timeout=timeout)
        except HijackError as exc:
            log(f"could not release the home shadow of {pid}: {exc}")


def parse_address(
    text: str, default_host: str = "127.0.0.1", *, listening: bool = False
) -> tuple[str, int]:
    """HOST[:PORT] (or PORT alone) as (host, port); `listening`: port 0 is any free port."""
    host, _, port = text.rpartition(":")
    if not host:
        host, port = (text, str(DEFAULT_PORT)) if not text.isdigit() else (default_host, text)
    try:
        number = int(port)
    except ValueError:
        raise HijackError(f"not an address: {text!r} (HOST[:PORT])") from None
    lowest = 0 if listening else 1
    if not lowest <= number <= MAX_PORT:
        raise HijackError(f"port {number} of {text!r} is not in {lowest}-{MAX_PORT}")
    return host.strip("[]"), number


def serve(
    address: tuple[str, int],
    identity: pki.NodeIdentity,
    limits: gate.Limits | None = None,
    *,
    allow_root: bool = False,
) -> None:
    daemon = NodeDaemon(address, identity, limits or gate.Limits(), allow_root=allow_root)
    try:
        reconcile_migrants(watch=True)
    except HijackError as exc:  # a registry it cannot use refuses moves later, by their mover
        log(f"cannot look at the migrants of an earlier run: {exc}")
    signal.signal(signal.SIGTERM, lambda *_: daemon.stop())
    try:
        daemon.serve()
    except KeyboardInterrupt:
        daemon.stop()
    # Releases its migrant threads began are left out of this last look (marked
    # exited): they are waited for, as long as one release of its own may take.
    deadline = time.monotonic() + STOPPING_RELEASE_TIMEOUT
    with contextlib.suppress(HijackError):
        reconcile_migrants(watch=False)
    _releases.wait(max(deadline - time.monotonic(), 0.0))
