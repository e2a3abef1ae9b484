"""Relays on real links: the home shadow's relay between network-namespace nodes, on
veth links as they are and shaped to 1 Gbit/s and 10 Gbit/s with 0.2 ms of delay.

Three nodes of the test suite's clusters (tests/support/nodes.py: one veth per
node to a bridge). Three copies of a sink server start on node a, and a client
on node c connects to each (one connection each, kept). Two sinks are then
moved to node b (one as by default, its relays encrypted; one with
--plain-relays), so the client's connections to them go through their home
shadows on a (c -> a -> b), while the third stays: one hop each way, the same
nodes, the same client. A fourth connection is made after the moves, to the
encrypted sink: a client the home shadow accepts, which b's forwarder connects
to the process through an encrypted relay whatever the move's mode
(docs/protocol.md, "Listeners"). Printed beside each other on each link:

- stream throughput through each relay and direct (issue #17: ratio >= 0.95),
  the median of STREAMS streams each, in turns;
- on the unshaped link, the round trip of a small request through each relay
  minus the direct one, at the 50th and 99th percentile (p50 <= 30 us); and
  its p50 again with every process of the bench kept on one CPU (on_one_cpu):
  the relays' own cost. On this 2-vCPU virtual machine a wakeup of the other,
  idle, vCPU costs tens of us (cpuidle-haltpoll), and a relayed round trip
  wakes more processes than a direct one: most of what the relays add here;
- each home shadow's CPU time (user + sys, /proc/PID/stat; the plain one's
  native relay pump included) per GB it relayed.

A fourth sink moves with --packet-relays (node a forwarding IPv4): its
connection goes on through a's IP layer, no process in its path
(hijack.node.packet_relay); its throughput and added round trip are printed
beside the others, with their own target.

A relay in its steady state is pumped by the shadow's native pump
(hijack/native/relay_pump.c); an encrypted one's records are sealed and opened
there (AES-GCM, libcrypto) and, at b, in the forwarder's own native pump (by
default: HIJACK_OWN_RECORDS=0 or HIJACK_PUMP_ENCRYPTED=0 leave them to Python's
ssl in the shadow, HIJACK_FORWARDER_PUMP=0 to Python in b's forwarder); b's
forwarder's CPU counts its pump's.

Shaping is done on each node's end of its veth (egress), over netlink with
pyroute2 (already a dependency, for the network locks): a `tbf` qdisc holds
the rate; `netem` adds the delay under it. A kernel built without netem (this
machine's: CONFIG_NET_SCH_NETEM is not set) refuses it: the rate is shaped all
the same, and the lines say the delay is missing rather than pretend it.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.freezes import percentile
from bench.moves import SINK
from bench.testnodes import Node, relay_nodes, shaped
from hijack.shadow import control

THROUGHPUT_TARGET = 0.95
PAUSE_LEAD = 0.3  # seconds of round trips before the move starts
ADDED_RTT_P50_TARGET_US = 30.0
DELAY_US = 200
RATES = (("1 Gbit/s", 1_000_000_000), ("10 Gbit/s", 10_000_000_000))
CLIENT_TIMEOUT = 300.0

# Run inside node c: one connection to HOST PORT, kept; on stdin `up BYTES` sends BYTES
# and prints the seconds until the sink confirmed them, `ping COUNT` prints every round
# trip of a small request (s); both as one JSON line.
CLIENT = """
import json, os, socket, sys, time
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
def line():
    got = b""
    while not got.endswith(b"\\n"):
        more = sock.recv(64)
        if not more:
            sys.exit("the sink closed the connection")
        got += more
    return got
sock.sendall(b"ping\\n")  # the sink's line mode (bench.moves.SINK)
if line() != b"pong\\n":
    sys.exit("the sink did not answer pong")
print("ready", flush=True)
chunk = os.urandom(1 << 20)
for command in sys.stdin:
    word, amount = command.split()
    if word == "up":
        started = time.perf_counter()
        sock.sendall(b"up %d\\n" % int(amount))
        for _ in range(int(amount) >> 20):
            sock.sendall(chunk)
        if line() != b"ok\\n":
            sys.exit("the sink did not confirm the bytes")
        print(json.dumps(time.perf_counter() - started), flush=True)
    else:
        times = []
        for _ in range(int(amount)):
            started = time.perf_counter()
            sock.sendall(b"ping\\n")
            if line() != b"pong\\n":
                sys.exit("the sink did not answer pong")
            times.append(time.perf_counter() - started)
        print(json.dumps(times), flush=True)
"""


@dataclass(frozen=True)
class Sink:
    pid: int
    port: int


def start_sink(node: Node) -> Sink:
    process = node.spawn([sys.executable, "-c", SINK, "0.0.0.0"], stdout=-1, text=True)
    assert process.stdout is not None
    return Sink(process.pid, int(process.stdout.readline()))


class Connection:
    """CLIENT in node c: one connection to a sink, kept, asked `up` or `ping`."""

    def __init__(self, node: Node, host: str, sink: Sink) -> None:
        # A session of its own, as a client on another machine (bench.redis: why it matters).
        self.process = node.spawn(
            [sys.executable, "-c", CLIENT, host, str(sink.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.node = node
        if self._line() != "ready":
            raise SystemExit(f"bench: the client in node {node.name} did not connect")

    def _line(self) -> str:
        assert self.process.stdout is not None
        answer = self.process.stdout.readline().strip()
        if not answer:
            raise SystemExit(f"bench: the client in node {self.node.name} failed")
        return answer

    def ask(self, word: str, amount: int) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{word} {amount}\n")
        self.process.stdin.flush()
        return json.loads(self._line())

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(CLIENT_TIMEOUT)


def with_children(pid: int) -> list[int]:
    """`pid` and its children running now (the shadow's native relay pump)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += (task / "children").read_text().split()
    return [pid, *map(int, children)]


def descendants(pid: int) -> list[int]:
    """`pid` and every process under it, however deep (/proc/*/task/*/children)."""
    found, index = [pid], 0
    while index < len(found):
        with contextlib.suppress(OSError):  # gone meanwhile
            found += [
                int(child)
                for task in Path(f"/proc/{found[index]}/task").iterdir()
                for child in (task / "children").read_text().split()
            ]
        index += 1
    return found


@contextlib.contextmanager
def on_one_cpu() -> Iterator[None]:
    """This process and every one under it (the nodes' daemons, shadows, pumps, forwarders,
    the sinks and the client: all of the bench's), every thread, kept on one CPU meanwhile:
    what a relay's own work costs a round trip, without waking another, idle, CPU."""
    everywhere = os.sched_getaffinity(0)
    tasks = []
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):  # gone meanwhile
            tasks += [int(task.name) for task in Path(f"/proc/{pid}/task").iterdir()]
    pin(tasks, {min(everywhere)})
    try:
        yield
    finally:
        pin(tasks, everywhere)


def pin(tasks: list[int], cpus: set[int]) -> None:
    for task in tasks:
        with contextlib.suppress(OSError):  # a thread that ended
            os.sched_setaffinity(task, cpus)


def process_cpu_seconds(pid: int) -> float:
    """User + system time of process `pid` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system time of `pid` and of its children running now, all threads."""
    return sum(process_cpu_seconds(each) for each in with_children(pid))


def forwarder_pid(node: Node) -> int:
    """The pid of node's relay forwarder (hijack.node.forwarder), 0 if none runs."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            words = cmdline.read_bytes().split(b"\0")
            if b"hijack.node.forwarder" not in words:
                continue
            environment = Path(cmdline.parent, "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        # Every test cluster names its nodes a, b, c: its state directory is its own.
        if f"HIJACK_STATE_DIR={node.state_dir}".encode() in environment:
            return int(cmdline.parent.name)
    return 0


# The connections measured, in the order taken: (key, what the lines call it).
KINDS = (
    ("direct", "direct"),
    ("encrypted", "encrypted (default), connected before the move"),
    ("plain", "--plain-relays, connected before the move"),
    ("accepted", "a client accepted after the move"),
    ("packet", "--packet-relays, connected before the move"),
)
SHADOWLESS = ("direct", "packet")  # no shadow's CPU to count: a's IP layer forwards packets


@dataclass
class Taken:
    """Seconds per stream of each connection, and each shadow's CPU over them."""

    seconds: dict[str, list[float]]
    shadow_cpu: dict[str, float]  # "encrypted" (accepted included), "plain": seconds
    forwarder_cpu: float  # b's forwarder over the encrypted and accepted streams

    def rate(self, kind: str, size: int) -> float:
        return size / statistics.median(self.seconds[kind]) / 1e6

    def lines(self, label: str, size: int, note: str = "") -> list[str]:
        direct = self.rate("direct", size)
        lines = []
        for kind, name in KINDS[1:]:
            ratio = self.rate(kind, size) / direct
            if kind == "encrypted":
                met = "met" if ratio >= THROUGHPUT_TARGET else "NOT met"
                lines.append(
                    f"{'relay throughput, ' + label:<34} {self.rate(kind, size):8.0f} MB/s |"
                    f" {'direct TCP, same nodes':<38} {direct:8.0f} MB/s |"
                    f" ratio {ratio:5.2f}  target >= {THROUGHPUT_TARGET:.2f}: {met}{note};"
                    f" {name}"
                )
            else:
                first = {
                    "plain": "  the same relay, --plain-relays",
                    "accepted": "  a client accepted",
                    "packet": "  relayed by packets",
                }[kind]
                met = ""
                if kind == "packet":
                    met = f"; target >= {THROUGHPUT_TARGET:.2f}: "
                    met += "met" if ratio >= THROUGHPUT_TARGET else "NOT met"
                lines.append(
                    f"{first:<34} {self.rate(kind, size):8.0f} MB/s |"
                    f" {'ratio to direct':<38} {ratio:8.2f}      | {name}{met}"
                )
        return lines


def streams(
    connections: dict[str, Connection],
    shadows: dict[str, int],
    forwarder: int,
    size: int,
    count: int,
) -> Taken:
    """`count` streams of `size` on each connection, in turns (a change of load hits all
    alike); each shadow's CPU time over its streams, and the forwarder's (`forwarder`: its
    pid on b) over the encrypted ones."""
    taken = Taken({kind: [] for kind, _ in KINDS}, {"encrypted": 0.0, "plain": 0.0}, 0.0)
    for _ in range(count):
        for kind, _ in KINDS:
            relay = "plain" if kind == "plain" else "encrypted"
            before = cpu_seconds(shadows[relay]), cpu_seconds(forwarder) if forwarder else 0.0
            taken.seconds[kind].append(float(connections[kind].ask("up", size)))
            if kind not in SHADOWLESS:
                taken.shadow_cpu[relay] += cpu_seconds(shadows[relay]) - before[0]
            if relay == "encrypted" and kind not in SHADOWLESS:
                taken.forwarder_cpu += (cpu_seconds(forwarder) if forwarder else 0.0) - before[1]
    return taken


def move_sink(a: Node, b: Node, sink: Sink, *options: str) -> int:
    """Move `sink` from node a to node b; the pid of its home shadow."""
    assert b.daemon_endpoint is not None
    moved = a.hijack("move", sink.pid, "--to", b.daemon_endpoint, *options, timeout=CLIENT_TIMEOUT)
    if moved.returncode != 0:
        raise SystemExit(f"bench: {moved.describe()}")
    status = control.request(
        str(a.state_dir / "shadows" / str(sink.pid) / "control.sock"), {"op": "status"}
    )
    return int(status["shadow_pid"])


BUSY_POLL_US = 100  # what the busy-polling line sets HIJACK_BUSY_POLL_US to


def moved_sinks(nodes: list[Node]) -> tuple[dict[str, Connection], dict[str, int], Sink]:
    """Three sinks on node a, a connection from node c to each, two of the sinks then moved
    to node b (its relays encrypted, --plain-relays): the connections by kind (direct,
    encrypted, plain), the two home shadows' pids by kind, and the encrypted sink."""
    a, b, c = nodes
    direct, encrypted, plain, packet = (start_sink(a) for _ in range(4))
    connections = {
        "direct": Connection(c, a.address, direct),
        "encrypted": Connection(c, a.address, encrypted),
        "plain": Connection(c, a.address, plain),
        "packet": Connection(c, a.address, packet),
    }
    shadows = {
        "encrypted": move_sink(a, b, encrypted),
        "plain": move_sink(a, b, plain, "--plain-relays"),
    }
    forward_packets(a)
    move_sink(a, b, packet, "--packet-relays")
    return connections, shadows, encrypted


def forward_packets(node: Node) -> None:
    """`node` forwards IPv4 (for --packet-relays), and tells no peer to go round it (the
    nodes share one link: its ICMP redirects would send c to b itself)."""
    for setting in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0"):
        if node.run(["sysctl", "-qw", setting], timeout=10).returncode != 0:
            raise SystemExit(f"bench: cannot set {setting} on node {node.name}")


def measure_busy_poll(pings: int) -> list[str]:
    """Round trips as measure_links' first ones, every relay pump with HIJACK_BUSY_POLL_US set
    (in the daemons' and the moves' environment: the forwarder's pump and the shadows'),
    and the relays' CPU per round trip (the home shadows and b's forwarder with their
    pumps): what the knob buys and what it costs."""
    os.environ["HIJACK_BUSY_POLL_US"] = str(BUSY_POLL_US)
    try:
        with relay_nodes("hijack-bench-busy-") as (_, cluster):
            connections, shadows, _ = moved_sinks(cluster.nodes)
            forwarder = forwarder_pid(cluster.nodes[1])
            rtt, cpu = {}, {}
            for kind in connections:
                before = sum(cpu_seconds(pid) for pid in (*shadows.values(), forwarder))
                rtt[kind] = connections[kind].ask("ping", pings)
                after = sum(cpu_seconds(pid) for pid in (*shadows.values(), forwarder))
                cpu[kind] = (after - before) / pings * 1e6
            for connection in connections.values():
                connection.close()
    finally:
        del os.environ["HIJACK_BUSY_POLL_US"]
    direct_us = percentile(rtt["direct"], 0.5) * 1e6
    added = {kind: percentile(rtt[kind], 0.5) * 1e6 - direct_us for kind in ("encrypted", "plain")}
    return [
        f"{'added round trip p50, busy polling':<34} {added['encrypted']:8.0f} us   |"
        f" {'--plain-relays':<38} {added['plain']:8.0f} us   |"
        f" HIJACK_BUSY_POLL_US={BUSY_POLL_US}; the relays' CPU per round trip (home shadows,"
        f" b's forwarder, their pumps): encrypted"
        f" {cpu['encrypted']:.0f} us, plain {cpu['plain']:.0f} us"
    ]


PAUSE_PINGS = 150_000  # round trips taken across a move: ~2-3 s of them, the move inside


def measure_peer_pause(moves: int) -> list[str]:
    """What the peer of a moved process sees of the move: its longest round trip while
    the process moves (c pinging a sink that moves from a to b), through the shadow's
    relay (the default) and by packets. A hold that dropped the peer's packets (as
    before the packet queue) showed as one retransmission timeout: ~210 ms."""
    longest: dict[str, list[float]] = {"shadow": [], "packet": []}
    for _ in range(moves):
        for kind, options in (("shadow", ()), ("packet", ("--packet-relays",))):
            with relay_nodes("hijack-bench-pause-") as (_, cluster):
                a, b, c = cluster.nodes
                forward_packets(a)
                sink = start_sink(a)
                connection = Connection(c, a.address, sink)
                assert connection.process.stdin is not None
                connection.process.stdin.write(f"ping {PAUSE_PINGS}\n")
                connection.process.stdin.flush()
                time.sleep(PAUSE_LEAD)  # pinging before the move begins
                move_sink(a, b, sink, *options)
                longest[kind].append(max(json.loads(connection._line())) * 1000)
                connection.close()
    shadow, packet = (statistics.median(longest[kind]) for kind in ("shadow", "packet"))
    return [
        f"{'peer pause across a move, shadow':<34} {shadow:8.1f} ms   |"
        f" {'relayed by packets':<38} {packet:8.1f} ms   | the peer's longest round trip while"
        f" the process moves (median of {moves}), its held packets let go in order at the"
        " commit (hijack.sys.nfqueue)"
    ]


def measure_links(stream_size: int, streams_each: int, pings: int) -> list[str]:
    lines = []
    with relay_nodes("hijack-bench-links-") as (_, cluster):
        a, b, c = cluster.nodes
        connections, shadows, encrypted = moved_sinks(cluster.nodes)
        connections["accepted"] = Connection(c, a.address, encrypted)
        forwarder = forwarder_pid(b)
        # Round trips first, on the links as they are.
        rtt: dict[str, list[float]] = {
            kind: connections[kind].ask("ping", pings) for kind, _ in KINDS
        }
        with on_one_cpu():
            one_cpu = {kind: connections[kind].ask("ping", pings) for kind, _ in KINDS}
        runs = [streams(connections, shadows, forwarder, stream_size, streams_each)]
        lines += runs[0].lines("veth", stream_size, "; unshaped")
        for label, rate in RATES:
            with shaped(cluster.nodes, rate, DELAY_US) as delayed:
                runs.append(streams(connections, shadows, forwarder, stream_size, streams_each))
            delay = f"{DELAY_US / 1000:.1f} ms delay" if delayed else "NO delay (no netem)"
            lines += runs[-1].lines(label, stream_size, f"; shaped (tbf), {delay}")
        for connection in connections.values():
            connection.close()

    for share, name in ((0.5, "p50"), (0.99, "p99")):
        direct_us = percentile(rtt["direct"], share) * 1e6
        added = {kind: percentile(rtt[kind], share) * 1e6 - direct_us for kind, _ in KINDS[1:]}
        target = (
            f"target <= {ADDED_RTT_P50_TARGET_US:.0f} us:"
            f" {'met' if added['encrypted'] <= ADDED_RTT_P50_TARGET_US else 'NOT met'}"
            if share == 0.5
            else f"{pings} round trips each"
        )
        lines.append(
            f"{'added round trip ' + name + ', veth':<34} {added['encrypted']:8.0f} us   |"
            f" {'direct round trip ' + name:<38} {direct_us:8.0f} us   | {target}; {KINDS[1][1]}"
        )
        lines.append(
            f"{'  the same, --plain-relays':<34} {added['plain']:8.0f} us   |"
            f" {'a client accepted after the move':<38} {added['accepted']:8.0f} us   |"
            " added to the direct round trip"
        )
        target = (
            f"; target <= {ADDED_RTT_P50_TARGET_US:.0f} us:"
            f" {'met' if added['packet'] <= ADDED_RTT_P50_TARGET_US else 'NOT met'}"
            if share == 0.5
            else ""
        )
        lines.append(
            f"{'  relayed by packets':<34} {added['packet']:8.0f} us   |"
            f" {'':<38} {'':8}      | --packet-relays: a's IP layer forwards them{target}"
        )
    direct_us = percentile(one_cpu["direct"], 0.5) * 1e6
    added = {kind: percentile(one_cpu[kind], 0.5) * 1e6 - direct_us for kind, _ in KINDS[1:]}
    lines.append(
        f"{'added round trip p50, one CPU':<34} {added['encrypted']:8.0f} us   |"
        f" {'--plain-relays':<38} {added['plain']:8.0f} us   | every process of the bench"
        f" on one CPU (direct p50 {direct_us:.0f} us): the relays' own cost, no idle CPU woken"
        f" (the lines above: the machine's 2 CPUs as they come); by packets"
        f" {added['packet']:.0f} us"
    )
    # The encrypted shadow relays two connections (connected before, accepted after).
    gigabytes = {"encrypted": 2e-9 * stream_size * streams_each * len(runs)}
    gigabytes["plain"] = gigabytes["encrypted"] / 2
    per_gb = {
        kind: sum(run.shadow_cpu[kind] for run in runs) / gigabytes[kind] for kind in gigabytes
    }
    forwarder_per_gb = sum(run.forwarder_cpu for run in runs) / gigabytes["encrypted"]
    lines.append(
        f"{'shadow CPU per GB relayed':<34} {per_gb['encrypted']:8.2f} s    |"
        f" {'--plain-relays (its native pump too)':<38} {per_gb['plain']:8.2f} s    |"
        f" user+sys of the home shadows, every link above; encrypted; b's forwarder"
        f" {forwarder_per_gb:.2f} s per GB encrypted"
    )
    return lines
