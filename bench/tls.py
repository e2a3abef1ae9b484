"""What TLS 1.3 between nodes costs, on loopback, beside plain TCP in the same run:
the mutual handshake with cluster certificates (hijack/node/pki.py), and the
throughput of one stream encrypted and plain (the figure `--plain-relays` trades).

And the node channel itself (hijack/node/channel.py) as a move uses it: an
image streamed through DataWriter and DataReader, and a message round trip
(what `prepared`/`commit` cost while the process is frozen), over TLS 1.3 as
now, beside the same over protocol 1 as it was before TLS (frames in clear,
each with an HMAC-SHA256 under a session key: the code below is its frame
path, kept here for the comparison) and beside bare frames in clear.

And a whole move's freeze with TLS beside the freeze of the code before TLS:
commit BEFORE_TLS is taken from git history into a temporary directory (git
archive: the repository is not touched) and each tree moves the same C
dirtier between two namespace nodes of its own test support, in turns."""

from __future__ import annotations

import hmac
import os
import select
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hijack.node import pki
from hijack.node.channel import HEAD, Channel, DataReader, DataWriter

CHUNK = 1 << 16


def _pair(
    server: ssl.SSLContext | None, client: ssl.SSLContext | None
) -> tuple[socket.socket, socket.socket, float]:
    """A connected loopback pair, wrapped when contexts are given; and the setup time."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        accepted: list[socket.socket] = []
        started = time.perf_counter()
        outgoing = socket.create_connection(listener.getsockname())

        def accept() -> None:
            conn, _ = listener.accept()
            if server is not None:
                conn = pki.handshake(conn, server, server=True, deadline=10)
            accepted.append(conn)

        thread = threading.Thread(target=accept)
        thread.start()
        if client is not None:
            outgoing = pki.handshake(outgoing, client, server=False, deadline=10)
        thread.join()
        for sock in (accepted[0], outgoing):  # as the node channel's sockets
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return accepted[0], outgoing, time.perf_counter() - started


def _throughput(receiver: socket.socket, sender: socket.socket, size: int) -> float:
    """Bytes per second of SIZE bytes from sender to receiver."""
    block = b"\x5a" * CHUNK

    def drain() -> None:
        left = size
        while left > 0:
            got = receiver.recv(min(CHUNK, left))
            if not got:
                return
            left -= len(got)

    thread = threading.Thread(target=drain)
    started = time.perf_counter()
    thread.start()
    for _ in range(size // CHUNK):
        sender.sendall(block)
    thread.join()
    return size / (time.perf_counter() - started)


def measure_tls(directory: Path, size: int) -> list[str]:
    pki.init_ca(directory)
    pki.add_node(directory, "a")
    pki.add_node(directory, "b")
    lines = measure_channel(directory, size)
    server, client = pki.server_context(directory, "a"), pki.client_context(directory, "b")
    figures = {}
    for label, contexts in (("plain TCP", (None, None)), ("TLS 1.3", (server, client))):
        receiver, sender, setup = _pair(*contexts)
        with receiver, sender:
            figures[label] = (_throughput(receiver, sender, size), setup)
    plain, _ = figures["plain TCP"]
    for label, (rate, setup) in figures.items():
        lines.append(
            f"node stream, {label}: {rate / (1 << 20):.0f} MiB/s ({rate / plain:.2f}x plain),"
            f" connect+handshake {setup * 1000:.2f} ms"
        )
    return lines


class ProtocolOneChannel(Channel):
    """The frame path of the node channel before TLS (protocol 1): in clear, each frame
    followed by HMAC-SHA256(session, direction sequence head payload)."""

    def __init__(self, sock: Any, peer: str, is_client: bool) -> None:
        super().__init__(sock, peer)
        self._key = bytes(32)
        self._directions = (b"C", b"S") if is_client else (b"S", b"C")
        self._sent = self._received = 0

    def _mac(self, direction: bytes, sequence: int, head: bytes, payload: Any) -> bytes:
        mac = hmac.new(self._key, direction + sequence.to_bytes(8, "little") + head, "sha256")
        mac.update(payload)
        return mac.digest()

    def send_frame(self, kind: int, payload: bytes | memoryview) -> None:
        head = HEAD.pack(kind, len(payload))
        mac = self._mac(self._directions[0], self._sent, head, payload)
        self._sent += 1
        self.sock.sendall(head)
        self.sock.sendall(payload)
        self.sock.sendall(mac)

    def receive_frame(self) -> tuple[int, bytes]:
        head = self._read_exactly(HEAD.size)
        kind, length = HEAD.unpack(head)
        payload = self._read_exactly(length)
        mac = self._read_exactly(32)
        expected = self._mac(self._directions[1], self._received, head, payload)
        if not hmac.compare_digest(mac, expected):
            raise SystemExit("bench: a protocol 1 frame failed its check")
        self._received += 1
        return kind, payload


Pair = Callable[[], tuple[Channel, Channel]]


def _channel_pairs(directory: Path) -> dict[str, Pair]:
    server, client = pki.server_context(directory, "a"), pki.client_context(directory, "b")

    def tls() -> tuple[Channel, Channel]:
        receiver, sender, _ = _pair(server, client)
        return Channel(receiver, "a"), Channel(sender, "b")  # type: ignore[arg-type]

    def protocol_one() -> tuple[Channel, Channel]:
        receiver, sender, _ = _pair(None, None)
        return ProtocolOneChannel(receiver, "a", False), ProtocolOneChannel(sender, "b", True)

    def bare() -> tuple[Channel, Channel]:
        receiver, sender, _ = _pair(None, None)
        return Channel(receiver, "a"), Channel(sender, "b")  # type: ignore[arg-type]

    return {"TLS 1.3": tls, "protocol 1 (HMAC, clear)": protocol_one, "bare frames": bare}


def _image_stream(receiver: Channel, sender: Channel, size: int) -> float:
    """Seconds to send SIZE bytes as a move sends an image (1 MiB writes of a buffer)."""
    block = memoryview(bytes(range(256)) * 4096)  # 1 MiB

    def drain() -> None:
        DataReader(receiver).drain()

    thread = threading.Thread(target=drain)
    started = time.perf_counter()
    thread.start()
    writer = DataWriter(sender)
    for _ in range(size // len(block)):
        writer.write(block)
    writer.close()
    thread.join()
    return time.perf_counter() - started


def _message_round_trip(receiver: Channel, sender: Channel, count: int) -> float:
    """Median seconds of a small message and its answer (as `commit` and `running`)."""

    def answer() -> None:
        for _ in range(count):
            receiver.receive()
            receiver.send({"phase": "running", "pid": 4242})

    thread = threading.Thread(target=answer)
    thread.start()
    times = []
    for _ in range(count):
        started = time.perf_counter()
        sender.send({"op": "commit"})
        sender.receive()
        times.append(time.perf_counter() - started)
    thread.join()
    return sorted(times)[len(times) // 2]


def measure_channel(directory: Path, size: int) -> list[str]:
    """The node channel with TLS beside protocol 1 and bare frames (same run, same bytes)."""
    rates, trips = {}, {}
    for label, make in _channel_pairs(directory).items():
        receiver, sender = make()
        try:
            rates[label] = size / _image_stream(receiver, sender, size)
        finally:
            receiver.close()
            sender.close()
        receiver, sender = make()
        try:
            trips[label] = _message_round_trip(receiver, sender, 300)
        finally:
            receiver.close()
            sender.close()
    before = "protocol 1 (HMAC, clear)"
    tls_rate, before_rate = rates["TLS 1.3"], rates[before]
    tls_trip, before_trip = trips["TLS 1.3"], trips[before]
    return [
        f"{'move image stream, TLS 1.3':<34} {tls_rate / 1e6:8.0f} MB/s | "
        f"{'before TLS: ' + before:<38} {before_rate / 1e6:8.0f} MB/s | "
        f"ratio {tls_rate / before_rate:5.2f}; bare frames {rates['bare frames'] / 1e6:.0f} MB/s",
        f"{'message round trip, TLS 1.3':<34} {tls_trip * 1e6:8.0f} us   | "
        f"{'before TLS: ' + before:<38} {before_trip * 1e6:8.0f} us   | "
        f"added {(tls_trip - before_trip) * 1e6:.0f} us per exchange while frozen (3 a move)",
    ]


# -- a move's freeze with TLS beside the freeze before it, in the same run ------------------

BEFORE_TLS = "66ffbeb"  # main just before the node channels went over TLS (104b835)
FREEZE_SIZE_MIB = 64
DIRTY_RATE_MB = 10
DRIVER_TIMEOUT = 300.0  # a cluster, a fixture filled, one move: on a loaded machine

# Run with a tree's own code (cwd and PYTHONPATH): a two-node cluster of that tree's
# test support, the C dirtier in it; each stdin line moves it once (a <-> b, pre-copy)
# and prints the freeze the move reported (ms). At the end of stdin, the dirtier checks
# every page it wrote: exit 0 only if it says PASS.
FREEZE_DRIVER = """
import re, sys, tempfile, time
from pathlib import Path
from support.nodes import Cluster
from support.running import spawn_fixture

MOVED = re.compile(r"moved process (\\d+) to (\\w+): it runs there as (\\d+); frozen ([\\d.]+) ms")
size, rate = sys.argv[1], sys.argv[2]
with tempfile.TemporaryDirectory(prefix="hijack-bench-freeze-") as directory:
    with Cluster(Path(directory), nodes=2) as cluster:
        a, b = cluster.nodes
        a.start_daemon()
        b.start_daemon()
        with spawn_fixture("dirtier", size, rate, netns=a.netns, ready_timeout=120) as dirtier:
            pid, here, there = dirtier.pid, a, b
            print("ready", flush=True)
            for number, _ in enumerate(sys.stdin):
                result = here.hijack(
                    "move", pid, "--to", there.daemon_endpoint, "--precopy", timeout=300
                )
                found = MOVED.search(" ".join(result.stdout.split()))
                if result.returncode != 0 or found is None:
                    sys.exit(f"move failed: {result.describe()}")
                if number == 0:
                    dirtier.wait_exit()  # the original, killed by the move: reaped
                pid, here, there = int(found[3]), there, here
                print(found[4], flush=True)
            dirtier.close_control()
            deadline = time.monotonic() + 120
            while f"PASS {dirtier.name}" not in dirtier.stdout:
                if time.monotonic() > deadline:
                    sys.exit(f"the moved dirtier did not pass its check: {dirtier.stdout}")
                time.sleep(0.1)  # its stdout is a file: nothing to wait on
"""


def _line(process: subprocess.Popen[str], timeout: float, what: str) -> str:
    assert process.stdout is not None
    readable, _, _ = select.select([process.stdout], [], [], timeout)
    line = process.stdout.readline() if readable else ""
    if not line:
        process.kill()
        _, errors = process.communicate()
        raise SystemExit(f"bench: {what}: no answer\n{errors[-3000:]}")
    return line.strip()


def _start_driver(tree: Path, build_dir: Path | None) -> subprocess.Popen[str]:
    environment = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{tree / 'tests'}"}
    if build_dir is not None:  # its own fixtures: never in the build directory the tests use
        environment["HIJACK_FIXTURE_BUILD_DIR"] = str(build_dir)
    return subprocess.Popen(
        [sys.executable, "-c", FREEZE_DRIVER, str(FREEZE_SIZE_MIB), str(DIRTY_RATE_MB)],
        cwd=tree,
        env=environment,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _tree_before_tls(repository: Path, into: Path) -> str:
    """The code of BEFORE_TLS extracted into `into` (git archive: the repository is left as
    it is); "" or why it cannot be."""
    archive = into.with_suffix(".tar")
    try:
        subprocess.run(
            ["git", "-C", str(repository), "archive", "-o", str(archive), BEFORE_TLS],
            check=True,
            capture_output=True,
            timeout=120,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"no git history to take {BEFORE_TLS} from ({exc})"
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    archive.unlink()
    return ""


def measure_freeze_before_tls(directory: Path, moves: int) -> list[str]:
    """MOVES moves of the dirtier with this tree (TLS 1.3) and as many with the tree before
    TLS, taken in turns (a change of load hits both alike): the medians side by side."""
    label = f"{'move freeze, TLS 1.3 (median)':<34}"
    before = directory / "before-tls"
    why = _tree_before_tls(Path(__file__).resolve().parent.parent, before)
    if why:
        return [f"{label} not beside the freeze before TLS: {why}"]
    drivers = {
        "TLS 1.3": _start_driver(Path(__file__).resolve().parent.parent, None),
        "before TLS": _start_driver(before, directory / "before-tls-fixtures"),
    }
    freezes: dict[str, list[float]] = {name: [] for name in drivers}
    try:
        for name, driver in drivers.items():
            if _line(driver, DRIVER_TIMEOUT, f"the {name} tree's cluster") != "ready":
                raise SystemExit(f"bench: the {name} tree's cluster did not start")
        for _ in range(moves):
            for name, driver in drivers.items():
                assert driver.stdin is not None
                driver.stdin.write("move\n")
                driver.stdin.flush()
                freezes[name].append(float(_line(driver, DRIVER_TIMEOUT, f"a {name} move")))
        for name, driver in drivers.items():
            _, errors = driver.communicate(timeout=DRIVER_TIMEOUT)
            if driver.returncode != 0:
                raise SystemExit(f"bench: the {name} tree's moves: {errors[-3000:]}")
    finally:
        for driver in drivers.values():
            if driver.poll() is None:
                driver.kill()
                driver.communicate()
        shutil.rmtree(before, ignore_errors=True)
    tls, clear = (statistics.median(freezes[name]) for name in drivers)
    return [
        f"{label} {tls:8.1f} ms   | {'before TLS (' + BEFORE_TLS + '), same run':<38}"
        f" {clear:8.1f} ms   | ratio {tls / clear:5.2f}; {moves} moves each in turns,"
        f" {FREEZE_SIZE_MIB} MiB dirtying {DIRTY_RATE_MB} MB/s"
    ]
