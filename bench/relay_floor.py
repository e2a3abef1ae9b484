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
  egress; the program itself never wakes).

Its relay CPU per GET is the program's own (user + sys): the sockmap's work is
done in softirq and in the kernel's workqueue, charged to no one here.
`python -m bench.relay_floor [ROUNDS]`; not in `make bench` (it measures no
part of hijack).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import redis
from bench.testnodes import Cluster

SOURCE = Path(__file__).with_name("relay_floor.c")
MODES = ("pump", "sockmap")


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


if __name__ == "__main__":
    from hijack.sys.process import set_child_subreaper

    set_child_subreaper()
    start = os.getloadavg()[0]
    lines = measure_floor(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
    print(f"load {start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print("\n".join(lines))
