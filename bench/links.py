"""Relays on real links: the home shadow's relay between network-namespace nodes, on
veth links as they are and shaped to 1 Gbit/s and 10 Gbit/s with 0.2 ms of delay.

Three nodes of the test suite's clusters (tests/support/nodes.py: one veth per
node to a bridge). Three copies of a sink server start on node a; two are moved
to node b (one as by default, its relays encrypted; one with --plain-relays),
so a client on node c reaches them through their home shadows on a (c -> a ->
b), while it reaches the third one directly (c -> a): one hop each way, the
same nodes, the same client. Printed beside each other on each link:

- stream throughput through the relay (encrypted, then plain) and direct
  (issue #17: ratio >= 0.95), the median of STREAMS streams each, in turns;
- on the unshaped link, the round trip of a small request through the relay
  (encrypted, then plain) minus the direct one, at the 50th and 99th
  percentile (p50 <= 30 us);
- the home shadow's CPU time (user + sys, /proc/PID/stat) per GB it relayed.

Shaping is done on each node's end of its veth (egress), over netlink with
pyroute2 (already a dependency, for the network locks): a `tbf` qdisc holds
the rate; `netem` adds the delay under it. A kernel built without netem (this
machine's: CONFIG_NET_SCH_NETEM is not set) refuses it: the rate is shaped all
the same, and the lines say the delay is missing rather than pretend it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.freezes import percentile
from bench.moves import SINK
from bench.testnodes import Node, relay_nodes, shaped
from hijack.shadow import control

THROUGHPUT_TARGET = 0.95
ADDED_RTT_P50_TARGET_US = 30.0
DELAY_US = 200
RATES = (("1 Gbit/s", 1_000_000_000), ("10 Gbit/s", 10_000_000_000))
CLIENT_TIMEOUT = 300.0

# Run inside node c: `stream HOST PORT BYTES` prints the seconds to send BYTES and
# have the sink confirm them; `ping HOST PORT COUNT` prints every round trip (s).
CLIENT = """
import json, os, socket, sys, time
mode, host, port, amount = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with socket.create_connection((host, port)) as sock:
    if mode == "stream":
        chunk = os.urandom(1 << 20)
        started = time.perf_counter()
        for _ in range(amount >> 20):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        answer = sock.recv(64)
        elapsed = time.perf_counter() - started
        if int(answer) != amount:
            sys.exit(f"the sink got {answer!r} bytes of {amount}")
        print(json.dumps(elapsed))
    else:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        for _ in range(amount):
            started = time.perf_counter()
            sock.sendall(b"ping\\n")
            if sock.recv(16) != b"pong\\n":
                sys.exit("the sink did not answer pong")
            times.append(time.perf_counter() - started)
        print(json.dumps(times))
"""


@dataclass(frozen=True)
class Sink:
    pid: int
    port: int


def start_sink(node: Node) -> Sink:
    process = node.spawn([sys.executable, "-c", SINK, "0.0.0.0"], stdout=-1, text=True)
    assert process.stdout is not None
    return Sink(process.pid, int(process.stdout.readline()))


def client(node: Node, *args: str | int) -> Any:
    """What CLIENT run with `args` inside `node` printed (JSON)."""
    result = node.run_python(CLIENT, *args, timeout=CLIENT_TIMEOUT)
    if result.returncode != 0:
        raise SystemExit(f"bench: client in node {node.name}: {result.stderr.strip()}")
    return json.loads(result.stdout)


def cpu_seconds(pid: int) -> float:
    """User + system time of process `pid` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Streams:
    direct: list[float]
    relayed: list[float]
    plain: list[float]  # through a relay moved with --plain-relays
    shadow_cpu: float  # seconds, over the relayed streams

    def lines(self, label: str, size: int, note: str = "") -> list[str]:
        direct = statistics.median(self.direct)
        relayed = statistics.median(self.relayed)
        plain = statistics.median(self.plain)
        ratio = direct / relayed
        met = "met" if ratio >= THROUGHPUT_TARGET else "NOT met"
        return [
            f"{'relay throughput, ' + label:<34} {size / relayed / 1e6:8.0f} MB/s |"
            f" {'direct TCP, same nodes':<38} {size / direct / 1e6:8.0f} MB/s |"
            f" ratio {ratio:5.2f}  target >= {THROUGHPUT_TARGET:.2f}: {met}{note}; encrypted",
            f"{'  the same relay, --plain-relays':<34} {size / plain / 1e6:8.0f} MB/s |"
            f" {'encrypted (the line above)':<38} {size / relayed / 1e6:8.0f} MB/s |"
            f" ratio to direct {direct / plain:5.2f}; encrypted/plain {plain / relayed:5.2f}",
        ]


def streams(
    c: Node, host: str, sinks: tuple[Sink, Sink, Sink], shadow: int, size: int, count: int
) -> Streams:
    """`count` streams of `size` from node c to each of the sinks (direct, relayed encrypted,
    relayed plain) at `host`."""
    direct, relayed, plain = sinks
    taken = Streams([], [], [], 0.0)
    for _ in range(count):  # in turns: a change of load hits all alike
        taken.direct.append(float(client(c, "stream", host, direct.port, size)))
        before = cpu_seconds(shadow)
        taken.relayed.append(float(client(c, "stream", host, relayed.port, size)))
        taken.shadow_cpu += cpu_seconds(shadow) - before
        taken.plain.append(float(client(c, "stream", host, plain.port, size)))
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


def measure_links(stream_size: int, streams_each: int, pings: int) -> list[str]:
    lines = []
    with relay_nodes("hijack-bench-links-") as (_, cluster):
        a, b, c = cluster.nodes
        direct, moving, plain = start_sink(a), start_sink(a), start_sink(a)
        shadow = move_sink(a, b, moving)
        move_sink(a, b, plain, "--plain-relays")
        relayed_bytes, shadow_cpu = 0, 0.0

        # Round trips first, on the links as they are.
        direct_rtt: list[float] = client(c, "ping", a.address, direct.port, pings)
        relayed_rtt: list[float] = client(c, "ping", a.address, moving.port, pings)
        plain_rtt: list[float] = client(c, "ping", a.address, plain.port, pings)
        sinks = (direct, moving, plain)
        taken = streams(c, a.address, sinks, shadow, stream_size, streams_each)
        lines += taken.lines("veth", stream_size, "; unshaped")
        relayed_bytes += stream_size * streams_each
        shadow_cpu += taken.shadow_cpu
        for label, rate in RATES:
            with shaped(cluster.nodes, rate, DELAY_US) as delayed:
                taken = streams(c, a.address, sinks, shadow, stream_size, streams_each)
            delay = f"{DELAY_US / 1000:.1f} ms delay" if delayed else "NO delay (no netem)"
            lines += taken.lines(label, stream_size, f"; shaped (tbf), {delay}")
            relayed_bytes += stream_size * streams_each
            shadow_cpu += taken.shadow_cpu

    for share, name in ((0.5, "p50"), (0.99, "p99")):
        direct_us = percentile(direct_rtt, share) * 1e6
        added_us = percentile(relayed_rtt, share) * 1e6 - direct_us
        target = (
            f"target <= {ADDED_RTT_P50_TARGET_US:.0f} us:"
            f" {'met' if added_us <= ADDED_RTT_P50_TARGET_US else 'NOT met'}"
            if share == 0.5
            else f"{pings} round trips each"
        )
        plain_us = percentile(plain_rtt, share) * 1e6 - direct_us
        lines.append(
            f"{'added round trip ' + name + ', veth':<34} {added_us:8.0f} us   |"
            f" {'direct round trip ' + name:<38} {direct_us:8.0f} us   | {target}; encrypted"
        )
        lines.append(
            f"{'  the same, --plain-relays':<34} {plain_us:8.0f} us   |"
            f" {'added by encryption':<38} {added_us - plain_us:8.0f} us   |"
            " the relay's TLS and the node's forwarder"
        )
    lines.append(
        f"{'shadow CPU per GB relayed':<34} {shadow_cpu / (relayed_bytes / 1e9):8.2f} s    |"
        f" {'user+sys of the home shadow, over':<38} {relayed_bytes / 1e9:8.2f} GB   |"
        " every link above"
    )
    return lines
