"""The floor under a relay's message rate: redis GETs through the least a relay can be.

bench/redis.py finds hijack's relays far below direct on this shared 2-CPU
machine. This asks what any relay gets on the same nodes: redis-server on
node b, redis-benchmark's GETs (bench.redis: 10 clients) from c, taken in
turns, each its median of ROUNDS windows:

- `direct`: c -> b;
- `pump`: c -> a -> b through bench/relay_floor.c in user space (one epoll
  loop, a recv and a send a message, no guarantee kept: the data path of
  hijack's relay-pump and nothing else);
- `sockmap`: c -> a -> b forwarded in the kernel by the same program's
  sockmap (an sk_skb verdict program redirects each skb to the peer's
  egress; the program itself never wakes);
- `nat`: c -> a -> b forwarded by a's IP layer, its nftables NAT rewriting
  the addresses both ways (conntrack): no socket at a, nothing that wakes.
  The path a relay by packets would take: a moved connection's socket made
  at the destination with its sequence numbers (TCP repair, as a swap makes
  it), the home node forwarding its packets there and back. What it would
  keep of the relay's guarantees is not measured here: only its rate.

Then a stream (256 MiB, 3 times) and 2000 small round trips from c to a sink
on b (bench.links' sink and client), direct and through a's NAT (the streams
in turns):
what a relay by packets would cost a connection's throughput and latency.

Its relay CPU per GET is the program's own (user + sys): the sockmap's work is
done in softirq and in the kernel's workqueue, charged to no one here.
`python -m bench.relay_floor [ROUNDS | --quick]`; not in `make bench` (it
measures no part of hijack); the suite runs it --quick.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import links, redis
from bench.freezes import percentile
from bench.testnodes import Cluster, Node

SOURCE = Path(__file__).with_name("relay_floor.c")
MODES = ("pump", "sockmap")
# Loads a's nftables NAT (over netlink, pyroute2: no nft command here): what arrives for
# a's FRONT port goes to b's redis, a's own address its source (masquerade).
NAT_RULES = """
import socket, struct, sys
from collections import OrderedDict
from pyroute2.nftables.expressions import genex, masq
from pyroute2.nftables.main import NFTables

front_ip, front_port, to_ip, to_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])


def expression(name, **arguments):
    return genex(name, OrderedDict(arguments))


def equals(data):
    return expression("cmp", sreg=1, op=0, data={"attrs": [("NFTA_DATA_VALUE", data)]})


def load(register, data):
    return expression("immediate", dreg=register, data={"attrs": [("NFTA_DATA_VALUE", data)]})


def to(address, port):  # meta l4proto tcp, ip daddr ADDRESS, tcp dport PORT
    return [
        [expression("meta", key=16, dreg=1)], [equals(bytes([socket.IPPROTO_TCP]))],
        [expression("payload", dreg=1, base=1, offset=16, len=4)],
        [equals(socket.inet_aton(address))],
        [expression("payload", dreg=1, base=2, offset=2, len=2)],
        [equals(struct.pack("!H", port))],
    ]


nft = NFTables(nfgen_family=2)  # NFPROTO_IPV4
try:
    table = f"floor_{front_port}"
    nft.table("add", name=table)
    for name, hook, priority in (("pre", "prerouting", -100), ("post", "postrouting", 100)):
        nft.chain("add", table=table, name=name, hook=hook, type="nat", priority=priority,
                  policy=1)
    dnat = expression("nat", type=1, family=2, reg_addr_min=1, reg_proto_min=2)
    to_b = [[load(1, socket.inet_aton(to_ip))], [load(2, struct.pack("!H", to_port))], [dnat]]
    nft.rule("add", table=table, chain="pre", expressions=[*to(front_ip, front_port), *to_b])
    nft.rule("add", table=table, chain="post", expressions=[*to(to_ip, to_port), masq()])
finally:
    nft.close()
"""


def forwarded(node: Node) -> int:
    """Packets `node`'s IP layer forwarded (Ip: ForwDatagrams of its /proc/net/snmp)."""
    done = node.run(["cat", "/proc/net/snmp"], timeout=10)
    names, values = [line.split() for line in done.stdout.splitlines() if line.startswith("Ip:")]
    return int(values[names.index("ForwDatagrams")])


def nat_through(a: Node, b: Node, port: int) -> int:
    """A port of a's that its IP layer forwards to b's `port` (NAT both ways)."""
    front = a.free_port()
    for done in (
        a.run(["sysctl", "-qw", "net.ipv4.ip_forward=1"], timeout=10),
        # In and out of one link: a would tell c to go to b itself (an ICMP redirect).
        a.run(["sysctl", "-qw", "net.ipv4.conf.all.send_redirects=0"], timeout=10),
        a.run(["sysctl", "-qw", "net.ipv4.conf.eth0.send_redirects=0"], timeout=10),
        a.run_python(NAT_RULES, a.address, front, b.address, port),
    ):
        if done.returncode != 0:
            raise SystemExit(f"bench: NAT on {a.name}: {done.stderr.strip()}")
    return front


def build(directory: Path) -> Path:
    program = directory / "relay-floor"
    argv = ["gcc", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(program), str(SOURCE)]
    compiled = subprocess.run(argv, capture_output=True, text=True, check=False)
    if compiled.returncode != 0:
        raise SystemExit(f"bench: cannot build {SOURCE.name}: {compiled.stderr.strip()}")
    return program


def measure_floor(rounds: int, warm: float = 1.0, window: float = 3.0) -> list[str]:
    with (
        tempfile.TemporaryDirectory(prefix="hijack-bench-floor-") as name,
        Cluster(Path(name), nodes=3) as cluster,
    ):
        directory = Path(name)
        a, b, c = cluster.nodes
        program = build(directory)
        _, port = redis.start_redis(b, directory, "b")
        loads = [redis.Load("direct", port)]
        hosts = {"direct": b.address}
        relays: dict[str, int] = {}
        for mode in MODES:
            front = a.free_port()
            argv = [str(program), str(front), b.address, str(port), mode]
            # A session of its own, as the home shadow (bench.redis: why it matters).
            relay = a.spawn(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True
            )
            assert relay.stdout is not None
            if relay.stdout.readline().strip() != b"ready":
                raise SystemExit(f"bench: relay-floor {mode} did not start")
            relays[mode] = relay.pid
            loads.append(redis.Load(mode, front, shadow=relay.pid))
            hosts[mode] = a.address
        loads.append(redis.Load("nat", nat_through(a, b, port)))
        hosts["nat"] = a.address
        forwarded_before = forwarded(a)
        try:
            for load in loads:
                redis.start_load(c, hosts[load.label], load)
            for _ in range(rounds):
                for load in loads:
                    redis.run_load(c, hosts[load.label], load, 0, warm, window)
        finally:
            for load in loads:
                if load.process is not None:
                    load.process.kill()
                    load.process.wait()
        # Each GET of the NAT load (its request and its answer) was forwarded by a.
        if forwarded(a) - forwarded_before < loads[-1].gets:
            raise SystemExit("bench: the NAT load was not forwarded by a")
    direct = statistics.median(loads[0].rates)
    lines = []
    for load in loads:
        rate = statistics.median(load.rates)
        cpu = load.shadow_cpu / max(load.gets, 1) * 1e6
        waited = load.shadow_wait / max(load.gets, 1) * 1e6
        lines.append(
            f"{'redis GET, floor ' + load.label:<34} {rate:8.0f} /s   | ratio {rate / direct:5.2f}"
            f" | relay CPU per GET {cpu:5.1f} us, waited {waited:.0f} us for a CPU"
            f" | rates {', '.join(f'{each:.0f}' for each in load.rates)}"
        )
    return lines


def measure_nat_link(stream_size: int, streams: int, pings: int) -> list[str]:
    """A stream and round trips c -> b, direct and through a's NAT (bench.links' sink and
    client, the link unshaped), in turns: what a relay by packets costs a connection."""
    with (
        tempfile.TemporaryDirectory(prefix="hijack-bench-floor-") as name,
        Cluster(Path(name), nodes=3) as cluster,
    ):
        a, b, c = cluster.nodes
        sink = links.start_sink(b)
        front = nat_through(a, b, sink.port)
        connections = {
            "direct": links.Connection(c, b.address, sink),
            "nat": links.Connection(c, a.address, links.Sink(sink.pid, front)),
        }
        try:
            seconds: dict[str, list[float]] = {kind: [] for kind in connections}
            for _ in range(streams):
                for kind, connection in connections.items():
                    seconds[kind].append(float(connection.ask("up", stream_size)))
            trips = {kind: each.ask("ping", pings) for kind, each in connections.items()}
            with links.on_one_cpu():
                one_cpu = {kind: each.ask("ping", pings) for kind, each in connections.items()}
        finally:
            for connection in connections.values():
                connection.close()
    rate = {kind: stream_size / statistics.median(each) / 1e6 for kind, each in seconds.items()}
    added = {
        share: (percentile(trips["nat"], share) - percentile(trips["direct"], share)) * 1e6
        for share in (0.5, 0.99)
    }
    return [
        f"{'stream, floor nat':<34} {rate['nat']:8.0f} MB/s | {'direct TCP, same nodes':<38}"
        f" {rate['direct']:8.0f} MB/s | ratio {rate['nat'] / rate['direct']:5.2f}; unshaped veth",
        f"{'added round trip, floor nat':<34} p50 {added[0.5]:5.0f} us, p99 {added[0.99]:5.0f} us"
        f" | direct p50 {percentile(trips['direct'], 0.5) * 1e6:.0f} us; {pings} round trips;"
        f" all on one CPU (bench.links.on_one_cpu): p50"
        f" {(percentile(one_cpu['nat'], 0.5) - percentile(one_cpu['direct'], 0.5)) * 1e6:.0f} us",
    ]


if __name__ == "__main__":
    from hijack.sys.process import set_child_subreaper

    set_child_subreaper()
    start = os.getloadavg()[0]
    if sys.argv[1:] == ["--quick"]:  # the suite's run: each path once, briefly
        lines = measure_floor(1, warm=0.2, window=0.5) + measure_nat_link(8 << 20, 1, 50)
    else:
        lines = measure_floor(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
        lines += measure_nat_link(256 << 20, 3, 2000)
    print(f"load {start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print("\n".join(lines))
