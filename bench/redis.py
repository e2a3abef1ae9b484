"""Relays at message rates: redis-benchmark GETs through the home shadow beside direct.

Three nodes of the test suite's clusters (tests/support/nodes.py). Three
redis-servers (Debian's package) start on node a. redis-benchmark on node c
runs the same GET load (CLIENTS connections, as many requests as it can)
against each at a's address, one load at a time (the others stopped with
SIGSTOP, their connections kept):

- `direct`: the server that stays on a (c -> a);
- `plain`: a server moved to b with `hijack move --plain-relays` while its
  load was connected: each connection's relay goes from the home shadow on a
  straight to the process on b (c -> a -> b), spliced by the shadow's native
  pump (hijack.shadow.pump);
- `tls`: one moved with encrypted relays (the default) while its load was
  connected: TLS from the shadow to b's relay forwarder, which hands the
  process a loopback socket (hijack.node.forwarder; its native pump carries the
  relay past the opening exchange);
- `packet`: one moved with `hijack move --packet-relays` while its load was
  connected: a's IP layer forwards the connections' packets to b and back
  (hijack.node.packet_relay; a forwards IPv4 for it, redirects off): no process
  in their path;
- `accepted`: a load that connects to the `tls` server after its move: the
  shadow accepts each client and b's forwarder connects it to the process
  (encrypted whatever the move's mode).

Each load runs WARM seconds, then its rate is taken over WINDOW seconds from
the server's own count of commands (INFO stats); ROUNDS turns, the median is
printed beside direct's as a ratio beside its limit (issue #17: >= 0.7 of
direct), with the home shadow's CPU time (user + sys, its native pump
included) per GET and the node forwarder's on b (its pump included), and how long the shadow
waited for a CPU per GET (ready to run, not running: /proc/PID/schedstat).
That last one says what a ratio measured on a loaded machine is worth: each
message through the relay wakes one process more than direct does, and every
such wakeup waits its turn behind everything else that runs.

Every redis-server and every redis-benchmark runs in a session of its own, as
a server daemon and a client on another machine do: the kernel schedules
each session as a group (autogroup, on by default), and the home shadow has
its own session (hijack.mutator.shadow_fork). Were the client and the server
in the bench's one session, the direct load would hop between them inside
one group while each relayed message crossed to the shadow's group and back,
waiting at each crossing behind every other session of this shared machine:
the least relay there is (bench/relay_floor.py) fell from 6-29k GETs/s in
the bench's session to 2-4k in a session of its own, on the same nodes.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.links import cpu_seconds, forwarder_pid, with_children
from bench.testnodes import Node, relay_nodes
from hijack.shadow import control

REDIS_SERVER = "/usr/bin/redis-server"
REDIS_BENCHMARK = "/usr/bin/redis-benchmark"
REDIS_CLI = "/usr/bin/redis-cli"
CLIENTS = 10
RATE_TARGET = 0.7
MOVE_TIMEOUT = 300.0
START_TIMEOUT = 20.0
CLI_TIMEOUT = 10.0


@dataclass
class Load:
    """One redis-benchmark GET load and what was measured of it."""

    label: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    shadow: int = 0  # the home shadow's pid, once its server moved
    rates: list[float] = field(default_factory=list)
    gets: int = 0
    shadow_cpu: float = 0.0
    shadow_wait: float = 0.0  # seconds the shadow (and its pump) waited for a CPU
    forwarder_cpu: float = 0.0


def start_redis(node: Node, directory: Path, name: str) -> tuple[int, int]:
    """A redis-server on every address of `node`, no persistence: (pid, port)."""
    port = node.free_port()
    work = directory / name
    work.mkdir()
    options = {"bind": "0.0.0.0", "port": port, "save": "", "appendonly": "no", "dir": work}
    options |= {"logfile": work / "redis.log", "protected-mode": "no"}
    argv = [REDIS_SERVER, *(w for k, v in options.items() for w in (f"--{k}", str(v)))]
    process = node.spawn(argv, stdin=-3, stdout=-3, stderr=-3, start_new_session=True)
    node.wait_tcp("127.0.0.1", port, timeout=START_TIMEOUT)
    return process.pid, port


def info(client: Node, host: str, port: int, field_name: str) -> int:
    """A number of redis's INFO (asked from `client` over a connection of its own)."""
    result = client.run([REDIS_CLI, "-h", host, "-p", str(port), "info"], timeout=CLI_TIMEOUT)
    found = re.search(rf"^{field_name}:(\d+)", result.stdout, re.MULTILINE)
    if result.returncode != 0 or found is None:
        raise SystemExit(f"bench: redis-cli info: {result.stdout.strip()} {result.stderr.strip()}")
    return int(found[1])


def start_load(client: Node, host: str, load: Load) -> None:
    """redis-benchmark's GETs from `client`, connected (CLIENTS connections), then stopped."""
    argv = [REDIS_BENCHMARK, "-h", host, "-p", str(load.port), "-c", str(CLIENTS)]
    argv += ["-n", "2000000000", "-t", "get"]
    load.process = client.spawn(argv, stdin=-3, stdout=-3, stderr=-3, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT
    while info(client, host, load.port, "connected_clients") < CLIENTS + 1:  # + ours
        if time.monotonic() > deadline or load.process.poll() is not None:
            raise SystemExit(f"bench: redis-benchmark did not connect to port {load.port}")
        time.sleep(0.05)
    os.kill(load.process.pid, signal.SIGSTOP)


def run_queue_seconds(pid: int) -> float:
    """Time `pid` and its children running now spent ready to run on a run queue, waiting
    for a CPU (the second field of each thread's /proc schedstat)."""
    waited = 0
    for each in with_children(pid):
        for task in Path(f"/proc/{each}/task").iterdir():
            waited += int((task / "schedstat").read_text().split()[1])
    return waited / 1e9


def shadow_of(node: Node, pid: int) -> int:
    path = node.state_dir / "shadows" / str(pid) / "control.sock"
    return int(control.request(str(path), {"op": "status"})["shadow_pid"])


def run_load(
    client: Node, host: str, load: Load, forwarder: int, warm: float, window: float
) -> None:
    """Let `load` run for `warm` + `window` seconds and take its rate over the window."""
    assert load.process is not None
    os.kill(load.process.pid, signal.SIGCONT)
    try:
        time.sleep(warm)
        shadow_before = cpu_seconds(load.shadow) if load.shadow else 0.0
        wait_before = run_queue_seconds(load.shadow) if load.shadow else 0.0
        forwarder_before = cpu_seconds(forwarder) if forwarder else 0.0
        count_before = info(client, host, load.port, "total_commands_processed")
        started = time.perf_counter()
        time.sleep(window)
        count_after = info(client, host, load.port, "total_commands_processed")
        elapsed = time.perf_counter() - started
        if load.shadow:
            load.shadow_cpu += cpu_seconds(load.shadow) - shadow_before
            load.shadow_wait += run_queue_seconds(load.shadow) - wait_before
        if forwarder:
            load.forwarder_cpu += cpu_seconds(forwarder) - forwarder_before
    finally:
        os.kill(load.process.pid, signal.SIGSTOP)
    gets = count_after - count_before - 1  # less our second INFO
    load.gets += gets
    load.rates.append(gets / elapsed)


def line(load: Load, direct: Load) -> list[str]:
    rate, direct_rate = statistics.median(load.rates), statistics.median(direct.rates)
    ratio = rate / direct_rate
    met = "met" if ratio >= RATE_TARGET else "NOT met"
    name = f"redis GET relayed, {load.label}"
    shadow_us = load.shadow_cpu / max(load.gets, 1) * 1e6
    forwarder_us = load.forwarder_cpu / max(load.gets, 1) * 1e6
    wait_us = load.shadow_wait / max(load.gets, 1) * 1e6
    return [
        f"{name:<34} {rate:8.0f} /s   | {'redis GET direct, same nodes':<38}"
        f" {direct_rate:8.0f} /s   | ratio {ratio:5.2f}  target >= {RATE_TARGET:.2f}: {met}",
        f"{'shadow CPU per GET, ' + load.label:<34} {shadow_us:8.1f} us   |"
        f" {'node forwarder CPU per GET':<38} {forwarder_us:8.1f} us   |"
        f" {CLIENTS} clients, {load.gets} GETs; the shadow waited {wait_us:.0f} us"
        " per GET for a CPU",
    ]


def measure_redis(rounds: int, warm: float, window: float) -> list[str]:
    programs = (REDIS_SERVER, REDIS_BENCHMARK, REDIS_CLI)
    if not all(os.path.exists(program) for program in programs):
        return [f"{'redis GET relayed':<34} skipped: no {' or '.join(programs)}"]
    with relay_nodes("hijack-bench-redis-") as (directory, cluster):
        a, b, c = cluster.nodes
        assert b.daemon_endpoint is not None
        loads: list[Load] = []
        # A relay by packets: a forwards them (hijack.node.packet_relay); in and out of one
        # link, it would tell c to go to b itself (an ICMP redirect) unless told not to.
        for setting in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0"):
            if a.run(["sysctl", "-qw", setting], timeout=CLI_TIMEOUT).returncode != 0:
                raise SystemExit(f"bench: cannot set {setting} on node a")
        kinds = [("direct", None), ("plain", ("--plain-relays",)), ("tls", ())]
        for label, options in [*kinds, ("packet", ("--packet-relays",))]:
            pid, port = start_redis(a, directory, label)
            load = Load(label, port)
            start_load(c, a.address, load)
            if options is not None:
                moved = a.hijack(
                    "move", pid, "--to", b.daemon_endpoint, *options, timeout=MOVE_TIMEOUT
                )
                if moved.returncode != 0:
                    raise SystemExit(f"bench: {moved.describe()}")
                load.shadow = shadow_of(a, pid)
            loads.append(load)
        accepted = Load("accepted", loads[2].port, shadow=loads[2].shadow)
        start_load(c, a.address, accepted)  # through the tls server's shadow, after its move
        loads.append(accepted)
        try:
            for _ in range(rounds):  # in turns: a change of the machine's load hits each alike
                for load in loads:
                    run_load(c, a.address, load, forwarder_pid(b), warm, window)
        finally:
            for load in loads:
                if load.process is not None:
                    load.process.kill()
                    load.process.wait()
    return [text for load in loads[1:] for text in line(load, loads[0])]


if __name__ == "__main__":
    import sys

    from hijack.sys.process import set_child_subreaper

    set_child_subreaper()
    arguments = [float(word) for word in sys.argv[1:]] or [3, 1.0, 3.0]
    print("\n".join(measure_redis(int(arguments[0]), arguments[1], arguments[2])))
