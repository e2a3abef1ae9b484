"""Figures of a live move, on this machine's loopback with two node daemons.

- relay throughput: a client streams into a sink server, directly, then after
  the server moved (its bytes go through the home shadow's relay), as a ratio;
- throughput home again: the same after the server moved back to its home node
  (its shadow handed it back its own sockets: no relay), as a ratio to a sink
  started beside it then and never moved (the two taken in turns, best of 3);
- added round-trip latency: small request/answer pairs, the median with the
  relay minus the median without;
- freeze time of moving processes holding 10 MB and SIZE of memory, and of
  one holding SIZE that keeps dirtying 10 MB/s of it: with pre-copy (the
  default; the rounds it took) beside the same move with --no-precopy.

Each figure is measured in the same run as what it is compared with.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

MIB = 1024 * 1024
SERVE = (sys.executable, "-m", "hijack", "node", "serve")

# A server that, per connection, reads everything until EOF and answers the
# byte count; a line "ping" is answered at once (for round trips).
SINK = """
import socket, sys, threading
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
def serve(conn):
    total = 0
    buffer = bytearray(1 << 20)
    while True:
        got = conn.recv_into(buffer)
        if not got:
            break
        if got == 5 and buffer[:5] == b"ping\\n":
            conn.sendall(b"pong\\n")
            continue
        total += got
    conn.sendall(str(total).encode())
    conn.close()
while True:
    conn, _ = server.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

HOLDER = """
import os, sys, time
data = bytearray(os.urandom(1 << 20) * max(1, int(sys.argv[1]) >> 20))
print("ready", flush=True)
while True:
    time.sleep(1)
"""


# Holds SIZE of non-zero memory and dirties RATE bytes of it a second, in
# pages scattered over it, a hundredth of a second's worth at a time.
DIRTIER = """
import os, sys, time
size, rate = int(sys.argv[1]), int(sys.argv[2])
data = bytearray(size)
chunk = os.urandom(1 << 20)
for offset in range(0, size, 1 << 20):
    data[offset:offset + (1 << 20)] = chunk[: size - offset]
pages = size // 4096
per_tick = max(1, rate // 4096 // 100)
position = 0
print("ready", flush=True)
while True:
    for _ in range(per_tick):
        position = (position + 7919) % pages
        data[position * 4096] ^= 1
    time.sleep(0.01)
"""
DIRTY_RATE = 10 * 1000 * 1000


class Nodes:
    """Two node daemons on loopback, each with its own state directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.certificates = directory / "pki"
        self.daemons: list[subprocess.Popen[str]] = []
        self.ports = {"a": free_port(), "b": free_port()}
        self.output = ""  # what the last move printed

    def env(self, node: str) -> dict[str, str]:
        return {
            **os.environ,
            "HIJACK_STATE_DIR": str(self.directory / f"node-{node}"),
            "HIJACK_NODE": node,
            "HIJACK_PKI": str(self.certificates),
        }

    def start(self) -> None:
        self.hijack("a", "cluster", "init")
        for node in self.ports:
            self.hijack("a", "cluster", "add-node", node, "--address", "127.0.0.1")
        for node, port in self.ports.items():
            daemon = subprocess.Popen(
                # The benchmark's fixtures run as root: the daemons must accept them.
                [*SERVE, "--listen", f"127.0.0.1:{port}", "--allow-root"],
                env=self.env(node),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            assert daemon.stdout is not None
            daemon.stdout.readline()
            self.daemons.append(daemon)

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.send_signal(signal.SIGTERM)
        for daemon in self.daemons:
            daemon.wait(timeout=10)
        # Shadows of the moved processes may outlive the daemons that would
        # have released them: end whatever still runs out of our directory.
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                command = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if str(self.directory).encode() in command:
                with suppress(ProcessLookupError):
                    os.kill(int(entry), signal.SIGKILL)

    def hijack(self, node: str, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "hijack", *args],
            env=self.env(node),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise SystemExit(f"bench: hijack {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def move(self, pid: int, to: str, *options: str, source: str = "a") -> tuple[int, float, int]:
        """Move `pid` from node `source` to `to`; its new pid, the freeze time (ms), pre-copy
        rounds."""
        destination = f"127.0.0.1:{self.ports[to]}"
        output = self.hijack(source, "move", str(pid), "--to", destination, *options)
        output = self.output = " ".join(output.split())  # the line may wrap
        new_pid = int(output.split("runs there as ")[1].split(";")[0])
        freeze_ms = float(output.split("frozen ")[1].split(" ms")[0])
        rounds = int(output.split("(")[1].split(" pre-copy")[0]) if "pre-copy" in output else 0
        return new_pid, freeze_ms, rounds


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def started(argv: list[str], env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[str], str]]:
    # No terminal of ours: a terminal stays relayed by the shadow even home again.
    process = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert process.stdout is not None
    try:
        yield process, process.stdout.readline().strip()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def stream_into(port: int, size: int) -> float:
    """Seconds to send `size` bytes to the sink and have it confirm them all."""
    chunk = os.urandom(MIB)
    started_at = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(size // MIB):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        answer = sock.recv(64)
    elapsed = time.perf_counter() - started_at
    if int(answer) != size:
        raise SystemExit(f"bench: the sink got {answer!r} bytes of {size}")
    return elapsed


def round_trips(port: int, count: int) -> float:
    """Median seconds of a small request and its answer."""
    times = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(count):
            started_at = time.perf_counter()
            sock.sendall(b"ping\n")
            if sock.recv(16) != b"pong\n":
                raise SystemExit("bench: the sink did not answer pong")
            times.append(time.perf_counter() - started_at)
    return statistics.median(times)


HOME_ROUNDS = 3


def home_against_fresh(port: int, size: int, env: dict[str, str]) -> tuple[float, float]:
    """The best of HOME_ROUNDS streams into the sink back home and into a sink started now
    beside it (never moved), taken in turns: the machine's noise hits both alike."""
    home, fresh = [], []
    with started([sys.executable, "-c", SINK], env) as (_, fresh_port):
        for _ in range(HOME_ROUNDS):
            home.append(stream_into(port, size))
            fresh.append(stream_into(int(fresh_port), size))
    return min(home), min(fresh)


def kill_moved(pid: int) -> None:
    """A moved process is the destination daemon's child; it reaps it."""
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def measure_moves(directory: Path, stream_size: int, big: int) -> list[str]:
    nodes = Nodes(directory)
    nodes.start()
    lines = []
    try:
        with started([sys.executable, "-c", SINK], nodes.env("a")) as (sink, port_text):
            port = int(port_text)
            direct_s = stream_into(port, stream_size)
            direct_rtt = round_trips(port, 500)
            moved_pid, _, _ = nodes.move(sink.pid, "b")
            try:
                relayed_s = stream_into(port, stream_size)
                relayed_rtt = round_trips(port, 500)
                moved_pid, _, _ = nodes.move(moved_pid, "a", source="b")
                unrelayed = "home again: it holds its own" in nodes.output
                home_s, fresh_s = home_against_fresh(port, stream_size, nodes.env("a"))
            finally:
                kill_moved(moved_pid)
        ratio = direct_s / relayed_s
        lines.append(
            f"{'relay throughput':<34} {stream_size / relayed_s / 1e6:8.0f} MB/s | "
            f"{'direct TCP, same path':<38} {stream_size / direct_s / 1e6:8.0f} MB/s | "
            f"ratio {ratio:5.2f}  target >= 0.90: {'met' if ratio >= 0.9 else 'NOT met'}"
        )
        home_ratio = fresh_s / home_s
        lines.append(
            f"{'throughput home again (a->b->a)':<34} {stream_size / home_s / 1e6:8.0f} MB/s | "
            f"{'a sink never moved, same path':<38} {stream_size / fresh_s / 1e6:8.0f} MB/s | "
            f"ratio {home_ratio:5.2f}  target >= 0.95: {'met' if home_ratio >= 0.95 else 'NOT met'}"
            + ("" if unrelayed else " (still relayed by its shadow!)")
        )
        added_us = (relayed_rtt - direct_rtt) * 1e6
        lines.append(
            f"{'added round trip (median)':<34} {added_us:8.0f} us   | "
            f"{'direct round trip':<38} {direct_rtt * 1e6:8.0f} us   | "
            f"target <= 50 us: {'met' if added_us <= 50 else 'NOT met'}"
        )
        big_label = f"{big // MIB} MiB"
        holders = (
            ("10 MB", [HOLDER, str(10 * MIB)]),
            (big_label, [HOLDER, str(big)]),
            (f"{big_label} dirtying 10 MB/s", [DIRTIER, str(big), str(DIRTY_RATE)]),
        )
        for label, program in holders:
            freezes = {}
            for options in ((), ("--no-precopy",)):
                with started([sys.executable, "-c", *program], nodes.env("a")) as (holder, _):
                    moved_pid, freeze_ms, rounds = nodes.move(holder.pid, "b", *options)
                    kill_moved(moved_pid)
                freezes[options] = (freeze_ms, rounds)
            (freeze_ms, rounds), (plain_ms, _) = freezes[()], freezes[("--no-precopy",)]
            lines.append(
                f"{'move freeze time, ' + label:<34} {freeze_ms:8.1f} ms   | "
                f"{'--no-precopy':<38} {plain_ms:8.1f} ms   | "
                f"{rounds} pre-copy rounds; target <= 50 ms:"
                f" {'met' if freeze_ms <= 50 else 'NOT met'}"
            )
    finally:
        nodes.stop()
    return lines
