"""`hijack move` between test nodes: live processes keep every connection, pipe and key.

Each test builds a Cluster (tests/support/nodes.py): network namespaces on one
bridge, each with its own address and `hijack node serve`. A process starts
inside node a and is moved with `hijack move PID --to NODE` run inside the
node it runs on now, as a user there would. Its sockets, pipes and terminal
stay in its shadow at home, which relays them; the peers never hear of it.

A moved process is the child of the destination daemon, so its verdict is
read without waitpid: its exit through a pidfd, its exit code from the
daemon's log (`process P ended (CODE)`), its PASS from its stdout file (a
regular file, reopened by path on the node it moved to). A migrant that ends
on its node makes the daemon release its home shadow, which the tests wait
for too. Whatever is left (a migrant after a failure, a shadow) is inside a
cluster namespace and is killed and reaped when the cluster ends.

A stream that a move must catch mid-way is held (held_echo_stream): one of its
ends is stopped until the move is over, so it is under way by construction,
however long the move takes on a loaded machine. Streams that must go on
flowing while a move runs (echo_stream) run over a loopback shaped by
LOOPBACK_SHAPE in their node: unshaped, 100 MB each way are echoed in half a
second, less than a move takes to start.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pytest
from support import RunningFixture, certificates, spawn_fixture
from support.cli import CliResult
from support.nodes import (
    HIJACK_PROGRAM,
    Cluster,
    Node,
    read_line,
    run_ip,
    two_nodes,
)
from test_nodes import ECHO_SESSION

from hijack.registry import Registry
from hijack.shadow import control
from hijack.sys import dirty

STREAM_BYTES = 100 * 1024 * 1024
# 200 MB cross node a's loopback for a 100 MB echo: about 5 s at this rate.
LOOPBACK_SHAPE = ("rate", "320mbit", "burst", "256kb", "latency", "100ms")
STREAMING_BEFORE_MOVE = 1024 * 1024  # bytes acknowledged before a move may start
STREAM_TIMEOUT = 120.0
EXIT_TIMEOUT = 30.0
LINE_TIMEOUT = 10.0
POLL_INTERVAL = 0.01  # between two looks at a log or `ss` in a bounded poll

MOVED_LINE = re.compile(
    r"moved process (\d+) to (\w+): it runs there as (\d+); frozen ([\d.]+) ms, (.+) sent"
)

# -- programs run inside the nodes ------------------------------------------------------

# Prints a descriptor's number, then echoes each stdin line: a process holding
# one descriptor of the kind argv[1] names, which hijack cannot proxy.
HOLDER = """\
import os, socket, sys
kind = sys.argv[1]
if kind == "netlink":
    held = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    fd = held.fileno()
elif kind == "udplite":
    held = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 136)  # IPPROTO_UDPLITE
    held.bind(("127.0.0.1", 0))
    fd = held.fileno()
else:  # a unix datagram socket with a name (a socketpair would be made again there)
    held = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    held.bind(b"\\0hijack-holder-%d" % os.getpid())
    fd = held.fileno()
print(fd, flush=True)
for line in sys.stdin:
    print(line.strip(), flush=True)
"""

# The peer of udp_echo: for each stdin line, a burst of datagrams of several
# sizes (up to the largest IPv4 payload) to each of its sockets, from the same
# two sockets every time (a port of 0: not that one): one unconnected
# (sendto/recvfrom: each echo must come from the address it was sent to), one
# connected (send/recv, as a client would). Each echo must come back whole, in
# order. Prints "ok N" (N datagrams) or "FAIL why".
UDP_PEER = """\
import os, socket, sys
port, connected_port = int(sys.argv[1]), int(sys.argv[2])
host = sys.argv[3] if len(sys.argv) > 3 else "127.0.0.1"
family = socket.AF_INET6 if ":" in host else socket.AF_INET
plain = socket.socket(family, socket.SOCK_DGRAM)
bound = socket.socket(family, socket.SOCK_DGRAM)
if connected_port:
    bound.connect((host, connected_port))
for sock in (plain, bound):
    sock.settimeout(5)
SIZES = (1, 100, 1400, 9000, 60000, 65507)
targets = [(sock, (host, number))
           for sock, number in ((plain, port), (bound, connected_port)) if number]
for line in sys.stdin:
    count = 0
    for sock, target in targets:
        burst = [os.urandom(size) for size in SIZES]
        for payload in burst:
            if sock is bound:
                sock.send(payload)
            else:
                sock.sendto(payload, target)
        for payload in burst:
            try:
                echo, sender = (sock.recv(65536), target) if sock is bound else sock.recvfrom(65536)
            except OSError as error:
                print(f"FAIL no echo of {len(payload)} bytes from {target}: {error}", flush=True)
                sys.exit(1)
            if echo != payload or sender[:2] != target:
                print(f"FAIL {len(echo)} bytes from {sender} for {len(payload)} to {target}",
                      flush=True)
                sys.exit(1)
            count += 1
    print(f"ok {count}", flush=True)
"""

# An IPv6 UDP echo service on ::1: prints its port, echoes every datagram to
# its sender until its stdin ends.
UDP6_SERVICE = """\
import select, socket, sys
sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
sock.bind(("::1", 0))
print(sock.getsockname()[1], flush=True)
while True:
    readable, _, _ = select.select([sys.stdin, sock], [], [])
    if sock in readable:
        data, sender = sock.recvfrom(65536)
        sock.sendto(data, sender)
    if sys.stdin in readable and not sys.stdin.readline():
        break
"""

# A udp_echo peer that keeps one datagram in flight at a time, numbered, to
# argv[1], until its stdin ends. An echo must come back whole; one missing
# for a second is sent again (as a UDP protocol would), five times at most. A
# stdin line: "ok N R" (N echoed, R sent again).
UDP_PINGER = """\
import os, select, socket, struct, sys, time
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.connect(("127.0.0.1", int(sys.argv[1])))
echoed = again = 0
def echo_of(payload):
    deadline = time.monotonic() + 1
    while select.select([sock], [], [], max(0, deadline - time.monotonic()))[0]:
        echo = sock.recv(65536)
        if echo == payload:
            return True
        if struct.unpack("!Q", echo[:8])[0] >= echoed:
            print(f"FAIL datagram {echoed}: {len(echo)} other bytes back", flush=True)
            sys.exit(1)
    return False  # an older one, late: skipped
while True:
    if select.select([sys.stdin], [], [], 0)[0]:
        if not sys.stdin.readline():
            break
        print(f"ok {echoed} {again}", flush=True)
    payload = struct.pack("!Q", echoed) + os.urandom(echoed % 1400)
    for attempt in range(5):
        sock.send(payload)
        if echo_of(payload):
            break
        again += 1
    else:
        print(f"FAIL no echo of datagram {echoed}, sent 5 times", flush=True)
        sys.exit(1)
    echoed += 1
"""

# Reads "connect HOST PORT" lines from the FIFO argv[1]; connects, reads the
# line the server sends, answers "ok LOCAL HEARD" (its own end, the end the
# server saw) or "error NAME" on the FIFO argv[2]. "exit" ends it (status 0).
DIALER = """\
import socket, sys
commands = open(sys.argv[1], "rb", buffering=0)
replies = open(sys.argv[2], "wb", buffering=0)
for line in iter(commands.readline, b""):
    words = line.decode().split()
    if words == ["exit"]:
        break
    try:
        with socket.create_connection((words[1], int(words[2])), timeout=5) as connection:
            local = "%s:%d" % connection.getsockname()
            heard = connection.makefile("rb").readline().decode().strip()
        replies.write(f"ok {local} {heard}\\n".encode())
    except OSError as error:
        replies.write(f"error {type(error).__name__}\\n".encode())
"""

# Listens on argv[1] (port printed), tells each client the address it came from.
ADDRESS_REPORTER = """\
import socket, sys
server = socket.create_server((sys.argv[1], 0))
print(server.getsockname()[1], flush=True)
while True:
    connection, peer = server.accept()
    with connection:
        connection.sendall(f"{peer[0]}:{peer[1]}\\n".encode())
"""

# One RESP connection to redis at 127.0.0.1:argv[1]. Sets KEYS keys, prints
# "loaded", then issues INCR/SET/GET without pause, checking every answer,
# until a stdin line asks: "count" (prints "issued N"), "check" (reads every
# key back: "checked K keys, W wrong"), "shutdown" (SHUTDOWN NOSAVE through
# the same connection, which redis closes: "shut down"). Any error or wrong
# answer: "FAIL why", exit 1.
REDIS_CLIENT = """\
import select, socket, sys
KEYS = 1000
connection = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
reader = connection.makefile("rb")

def reply():
    line = reader.readline()
    if not line:
        raise ConnectionError("redis closed the connection")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(f"redis error: {rest.decode()}")
    if kind == b":":
        return int(rest)
    if kind == b"$":
        return None if int(rest) < 0 else reader.read(int(rest) + 2)[:-2].decode()
    raise RuntimeError(f"unexpected reply {line!r}")

def command(*words):
    encoded = [str(word).encode() for word in words]
    connection.sendall(
        b"*%d\\r\\n" % len(encoded) + b"".join(b"$%d\\r\\n%s\\r\\n" % (len(w), w) for w in encoded)
    )
    return reply()

def expect(answer, wanted, what):
    if answer != wanted:
        raise RuntimeError(f"{what}: {answer!r}, not {wanted!r}")

try:
    for key in range(KEYS):
        expect(command("SET", f"key:{key}", f"value:{key}"), "OK", f"SET key:{key}")
    print("loaded", flush=True)
    issued = 0
    while True:
        if select.select([sys.stdin], [], [], 0)[0]:
            request = sys.stdin.readline().strip()
            if request == "count":
                print(f"issued {issued}", flush=True)
            elif request == "check":
                wrong = [k for k in range(KEYS) if command("GET", f"key:{k}") != f"value:{k}"]
                print(f"checked {KEYS} keys, {len(wrong)} wrong", flush=True)
            elif request == "shutdown":
                try:
                    command("SHUTDOWN", "NOSAVE")
                except ConnectionError:
                    print("shut down", flush=True)
                    break
                raise RuntimeError("SHUTDOWN NOSAVE answered instead of closing")
            continue
        round_ = issued // 3
        expect(command("INCR", "counter"), round_ + 1, "INCR counter")
        expect(command("SET", f"loop:{round_ % 100}", round_), "OK", "SET loop")
        expect(command("GET", f"loop:{round_ % 100}"), str(round_), "GET loop")
        issued += 3
except Exception as error:
    print(f"FAIL {type(error).__name__}: {error}", flush=True)
    sys.exit(1)
"""


# -- helpers --------------------------------------------------------------------------


@dataclass(frozen=True)
class Moved:
    """A process after a move: its pid on the node it runs on now, and its home shadow."""

    pid: int
    node: Node
    freeze_ms: float
    shadow_pid: int


def logs(tmp_path: Path) -> str:
    """Every daemon's stderr and every shadow's log of the test's cluster(s), for messages."""
    parts = []
    for path in sorted(tmp_path.glob("**/daemon.stderr")) + sorted(
        tmp_path.glob("**/shadows/*/shadow.log")
    ):
        parts.append(f"--- {path.relative_to(tmp_path)} ---\n{path.read_text(errors='replace')}")
    return "\n".join(parts)


def move(
    source: Node,
    pid: int,
    destination: Node,
    home: tuple[Node, int] | None = None,
    *,
    precopy: bool = True,
    options: tuple[str, ...] = (),
) -> Moved:
    """`hijack move PID --to DESTINATION` inside `source`; it must succeed and say where.

    `home` is the node and pid the process started as (default: `source`, `pid`).
    Pre-copy is forced on (by default it is on only for big processes): every
    move test runs it. `--timing` too: both nodes tell where the freeze went.
    """
    assert destination.daemon_endpoint is not None, f"node {destination.name} runs no daemon"
    option = "--precopy" if precopy else "--no-precopy"
    exe = os.readlink(f"/proc/{pid}/exe")
    result = source.hijack(
        "move", pid, "--to", destination.daemon_endpoint, option, *options, "--timing"
    )
    where = source.directory.parent
    assert result.returncode == 0, f"[node {source.name}] {result.describe()}\n{logs(where)}"
    found = MOVED_LINE.search(result.stdout)
    assert found is not None, result.describe()
    assert (int(found[1]), found[2]) == (pid, destination.name), result.describe()
    shadow_pid = shadow_status(*(home or (source, pid)))["shadow_pid"]
    moved = Moved(int(found[3]), destination, float(found[4]), shadow_pid)
    print(f"moved {pid} {source.name} -> {destination.name}: frozen {found[4]} ms, {found[5]}")
    print(f"  {result.stdout.strip()}")
    assert ("pre-copy rounds" in result.stdout) == precopy, result.describe()
    for side in ("freeze here (ms): stop", f"freeze at {destination.name} (ms): "):
        assert side in result.stdout, result.describe()
    assert runs_in(moved.pid, destination), f"process {moved.pid} is not inside {destination}"
    if not exe.endswith(" (deleted)"):  # (else the copy's is the restore stub's)
        # Its executable (/proc/PID/exe): set at the freeze, or in the stub its
        # pre-copy rounds built, after round 0 (Prebuilt.set_exe).
        assert os.readlink(f"/proc/{moved.pid}/exe") == exe
    return moved


def move_refused(source: Node, pid: int, destination: Node, *options: str) -> str:
    """`hijack move` that must fail: exit 1, one line on stderr (returned)."""
    assert destination.daemon_endpoint is not None
    result = source.hijack("move", pid, "--to", destination.daemon_endpoint, *options)
    return refusal_line(result)


def refusal_line(result: CliResult) -> str:
    assert result.returncode == 1, result.describe()
    assert result.stderr.startswith("hijack: "), result.describe()
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), result.describe()
    print(f"refused: {result.stderr.strip()}")
    return result.stderr.strip()


def runs_in(pid: int, node: Node) -> bool:
    inside = os.stat(f"/proc/{pid}/ns/net")
    netns = os.stat(f"/run/netns/{node.netns}")
    return (inside.st_dev, inside.st_ino) == (netns.st_dev, netns.st_ino)


def pids_inside(node: Node) -> set[int]:
    """The processes in `node`'s namespace, but its relay forwarder and the forwarder's
    native relay pump: like its daemon, a part of the node, which outlives a move
    (hijack/node/forwarder.py)."""
    pids = {int(pid) for pid in run_ip("netns", "pids", node.netns).split()}
    return {pid for pid in pids if not (is_forwarder(pid) or is_forwarder(parent_of(pid)))}


def is_forwarder(pid: int) -> bool:
    try:
        return b"hijack.node.forwarder" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def parent_of(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def wait_gone(pid: int, timeout: float, what: str) -> None:
    """Wait (pidfd) for `pid`, not necessarily our child, to end."""
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        readable, _, _ = select.select([handle], [], [], timeout)
    finally:
        os.close(handle)
    assert readable, f"{what} (pid {pid}) still runs after {timeout} s"


def still_running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def poll_until(condition: Any, what: str, timeout: float = LINE_TIMEOUT) -> Any:
    """Call `condition` until it returns something true (returned); fail after `timeout`.

    For what nothing can be waited on: a log line, a counter in `ss`.
    """
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(POLL_INTERVAL)
    return found


def daemon_log(node: Node) -> str:
    return (node.directory / "daemon.stderr").read_text(errors="replace")


def exit_code_on(node: Node, pid: int) -> int:
    """The exit code the daemon of `node` logged for its child `pid` (it logs after waitpid)."""
    pattern = re.compile(rf"process {pid} ended \((-?\d+)\)")
    found = poll_until(
        lambda: pattern.search(daemon_log(node)), f"node {node.name} logs the end of {pid}"
    )
    return int(found[1])


def assert_ended_well(moved: Moved, what: str, tmp_path: Path) -> None:
    """The moved process ends (bounded) with status 0 on its node."""
    wait_gone(moved.pid, EXIT_TIMEOUT, what)
    code = exit_code_on(moved.node, moved.pid)
    assert code == 0, f"{what} ended with {code} on node {moved.node.name}\n{logs(tmp_path)}"


def wait_released(moved: Moved) -> None:
    """A migrant that ended lets its home shadow end, once all it wrote is passed on."""
    wait_gone(moved.shadow_pid, EXIT_TIMEOUT, f"the home shadow of {moved.pid}, released")


def finish_moved(fixture: RunningFixture, moved: Moved, tmp_path: Path) -> str:
    """Close CONTROL_FD of a fixture that runs moved; demand exit 0 and PASS; return stdout.

    Its original (killed by the move) must have been reaped (wait_exit).
    """
    fixture.close_control()
    assert_ended_well(moved, f"moved {fixture.name}", tmp_path)
    wait_released(moved)
    stdout = fixture.stdout
    assert f"PASS {fixture.name}" in stdout, f"{stdout}\n{fixture.stderr}\n{logs(tmp_path)}"
    return stdout


def control_socket(home: Node, home_pid: int) -> str:
    return str(home.state_dir / "shadows" / str(home_pid) / "control.sock")


def shadow_status(home: Node, home_pid: int) -> dict[str, Any]:
    return control.request(control_socket(home, home_pid), {"op": "status"})


def assert_untouched(pid: int) -> None:
    """Running or sleeping as before: not stopped, not traced, no shadow."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert fields["State"][0] in "RS", f"process {pid} is {fields['State']}"
    assert fields["TracerPid"].strip() == "0", f"process {pid} is traced"


def assert_not_attached(node: Node, pid: int) -> None:
    """No shadow and no record of `pid` in `node`: as a process hijack never touched."""
    assert not (node.state_dir / "shadows" / str(pid)).exists()
    with Registry(node.state_dir) as registry:
        assert registry.find(pid) is None


def shape_loopback(node: Node) -> None:
    """Limit the rate of `node`'s loopback (see the module docstring)."""
    completed = node.run(
        ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", *LOOPBACK_SHAPE], timeout=10
    )
    assert completed.returncode == 0, completed.stderr


def acknowledged(node: Node, port: int, counter: str = "bytes_acked") -> int:
    """Bytes the connection to 127.0.0.1:port in `node` has had acknowledged (`ss -i`), or
    has received (`counter` "bytes_received")."""
    completed = node.run(
        ["ss", "-tinH", "state", "established", "dst", f"127.0.0.1:{port}"], timeout=10
    )
    found = re.search(rf"\b{counter}:(\d+)", completed.stdout)
    return int(found[1]) if found else 0


@contextlib.contextmanager
def echo_stream(node: Node, seed: int) -> Iterator[tuple[RunningFixture, RunningFixture]]:
    """(server, client): an echo_server in `node` and a stream_client echoing STREAM_BYTES
    through it, under way, over the node's shaped loopback."""
    shape_loopback(node)
    with spawn_fixture("echo_server", netns=node.netns) as server:
        port = server.ready["port"]
        stream = ("127.0.0.1", port, str(STREAM_BYTES), str(seed))
        with spawn_fixture("stream_client", *stream, netns=node.netns) as client:
            poll_until(
                lambda: acknowledged(node, int(port)) >= STREAMING_BEFORE_MOVE,
                f"a stream to port {port} in node {node.name} under way",
            )
            yield server, client


def stop(fixture: RunningFixture) -> None:
    """SIGSTOP `fixture` and wait until it is stopped (a signal is taken on its way back to
    user space, not at once)."""
    fixture.send_signal(signal.SIGSTOP)
    poll_until(
        lambda: Path(f"/proc/{fixture.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T",
        f"fixture {fixture.name} (pid {fixture.pid}) stopped",
    )


@dataclass
class HeldStream:
    """An echo_server and a stream_client echoing STREAM_BYTES through it, mid-stream, bytes
    queued both ways; `held` (one of the two) is stopped: the stream cannot end before
    go_on()."""

    server: RunningFixture
    client: RunningFixture
    held: RunningFixture

    def go_on(self) -> None:
        self.held.send_signal(signal.SIGCONT)


@contextlib.contextmanager
def held_echo_stream(
    node: Node, seed: int, *, hold: Literal["client", "server"]
) -> Iterator[HeldStream]:
    """A HeldStream in `node`, its `hold` ("client" or "server") stopped; the other one may
    be moved.

    Mid-stream by construction, not by timing: until go_on() one end or the other
    is stopped at every moment, and STREAM_BYTES is far more than the connection's
    buffers hold, so the stream can only stall, never end. The server is stopped
    before the client connects (its first bytes wait in the server's socket), the
    client once they are there; the server then echoes into the client's socket
    until both ways are full. Both ends go on when the block ends, whatever happened.
    """
    with spawn_fixture("echo_server", netns=node.netns) as server:
        port = server.ready["port"]
        stream = ("127.0.0.1", port, str(STREAM_BYTES), str(seed))
        try:
            stop(server)
            with spawn_fixture("stream_client", *stream, netns=node.netns) as client:
                try:
                    where = f"the stream to port {port} in node {node.name}"
                    poll_until(lambda: acknowledged(node, int(port)) > 0, f"{where} under way")
                    stop(client)
                    server.send_signal(signal.SIGCONT)
                    poll_until(
                        lambda: acknowledged(node, int(port), "bytes_received") > 0,
                        f"{where} echoed",
                    )
                    held = client
                    if hold == "server":
                        stop(server)
                        client.send_signal(signal.SIGCONT)
                        held = server
                    yield HeldStream(server, client, held)
                finally:
                    client.send_signal(signal.SIGCONT)
        finally:
            server.send_signal(signal.SIGCONT)


def standard_descriptors(pid: int) -> dict[int, tuple[int, int] | None]:
    """What `pid` has at descriptors 0, 1 and 2: each one's file (device, inode), or None."""
    found: dict[int, tuple[int, int] | None] = {}
    for number in (0, 1, 2):
        try:
            info = os.stat(f"/proc/{pid}/fd/{number}")
        except FileNotFoundError:
            found[number] = None
        else:
            found[number] = (info.st_dev, info.st_ino)
    return found


def assert_standard_descriptors_kept(shadow_pid: int, process: dict[int, object]) -> None:
    """The shadow's 0, 1 and 2 are still what the process had there (the originals it
    relays) or /dev/null: never a pipe or socket of its own, which a write to descriptor
    2 below Python (a fatal error) would go into."""
    null = os.stat(os.devnull)
    shadow = standard_descriptors(shadow_pid)
    for number, held in shadow.items():
        where = f"the shadow's fd {number}"
        assert held is not None, f"{where} is free"
        link = os.readlink(f"/proc/{shadow_pid}/fd/{number}")
        assert held in (process[number], (null.st_dev, null.st_ino)), f"{where} is {link}"


def kill_daemon(node: Node) -> None:
    """SIGKILL the node's daemon (no clean end to report) and forget it."""
    assert node.daemon is not None
    node.daemon.kill()
    node.daemon.wait()
    node.daemon = node.daemon_endpoint = None


def move_with_the_daemon_killed(
    home: Node, destination: Node, pid: int, logged: str, what: str, *options: str
) -> None:
    """`hijack move PID` from `home`, its destination's daemon SIGKILLed once its log
    matches `logged`; the move must end in one refusal line."""
    assert destination.daemon_endpoint is not None
    mover = home.spawn(
        [*HIJACK_PROGRAM, "move", str(pid), "--to", destination.daemon_endpoint, *options],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    poll_until(
        lambda: re.search(logged, daemon_log(destination)),
        f"the daemon of {destination.name} {what}",
    )
    kill_daemon(destination)
    stdout, stderr = mover.communicate(timeout=EXIT_TIMEOUT)
    refusal_line(CliResult(("move",), mover.returncode, stdout, stderr))


def start_daemon_with(node: Node, variable: str, value: str) -> None:
    """Start `node`'s daemon with one variable of the node's environment changed."""
    usual = node.env[variable]
    node.env[variable] = value
    try:
        node.start_daemon()
    finally:
        node.env[variable] = usual


def write_all(stream: Any, data: bytes) -> None:
    """Write all of `data` to a pipe (select-bounded)."""
    os.set_blocking(stream.fileno(), False)
    pending = memoryview(data)
    deadline = time.monotonic() + STREAM_TIMEOUT
    while pending:
        remaining = deadline - time.monotonic()
        _, writable, _ = select.select([], [stream], [], max(remaining, 0))
        assert writable, f"{len(pending)} of {len(data)} bytes not taken after {STREAM_TIMEOUT} s"
        pending = pending[os.write(stream.fileno(), pending) :]


def read_to_end(stream: Any) -> bytes:
    """Everything a pipe still gives until EOF (select-bounded)."""
    data = bytearray()
    deadline = time.monotonic() + STREAM_TIMEOUT
    while True:
        remaining = deadline - time.monotonic()
        readable, _, _ = select.select([stream], [], [], max(remaining, 0))
        assert readable, f"no EOF after {len(data)} bytes and {STREAM_TIMEOUT} s"
        chunk = os.read(stream.fileno(), 1024 * 1024)
        if not chunk:
            return bytes(data)
        data += chunk


def through_cat(cat: subprocess.Popen[bytes], data: bytes) -> bytes:
    """Write `data` to cat's stdin while reading as much back from its stdout."""
    assert cat.stdin is not None and cat.stdout is not None
    os.set_blocking(cat.stdin.fileno(), False)
    pending = memoryview(data)
    echoed = bytearray()
    deadline = time.monotonic() + STREAM_TIMEOUT
    while len(echoed) < len(data):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"{len(echoed)} of {len(data)} bytes back from cat"
        writers = [cat.stdin] if pending else []
        readable, writable, _ = select.select([cat.stdout], writers, [], remaining)
        if writable:
            pending = pending[os.write(cat.stdin.fileno(), pending[: 64 * 1024]) :]
        if readable:
            chunk = os.read(cat.stdout.fileno(), 1024 * 1024)
            assert chunk, f"cat's stdout ended after {len(echoed)} of {len(data)} bytes"
            echoed += chunk
    return bytes(echoed)


def pattern(size: int, seed: int) -> bytes:
    """`size` bytes that no shift, loss or repetition of a slice leaves equal."""
    return random.Random(seed).randbytes(size)


def ss_lines(node: Node, pid: int) -> list[list[str]]:
    """`ss -tanp` rows (state, recv-q, send-q, local, peer) of the TCP sockets of `pid`."""
    completed = node.run(["ss", "-tanpH"], timeout=10)
    return [line.split()[:5] for line in completed.stdout.splitlines() if f"pid={pid}," in line]


def spawn_python(node: Node, program: str, *args: str) -> subprocess.Popen[bytes]:
    """python3 running `program` inside `node`, its stdin and stdout pipes to the test.

    Its stderr is /dev/null, not pytest's capture file: that one is deleted,
    and a move refuses a deleted file.
    """
    return node.spawn(
        [sys.executable, "-c", program, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        bufsize=0,
    )


def ask(process: subprocess.Popen[bytes], request: str) -> str:
    """One line to the process's stdin; the line it answers on its stdout."""
    assert process.stdin is not None
    process.stdin.write(f"{request}\n".encode())
    return read_line(process, LINE_TIMEOUT)


def ask_moved(process: subprocess.Popen[bytes], request: str) -> str:
    """ask() a process that was moved: its original is gone, its pipes relayed to it."""
    assert process.stdin is not None
    process.stdin.write(f"{request}\n".encode())
    return line_from(process, LINE_TIMEOUT, f"an answer to {request!r}")


def line_from(process: subprocess.Popen[bytes], timeout: float, what: str = "a line") -> str:
    """The next line on the stdout pipe of `process`, which may have been moved (its
    original gone: no pidfd to wait on), select-bounded."""
    assert process.stdout is not None
    line = bytearray()
    deadline = time.monotonic() + timeout
    while not line.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {what} within {timeout} s: {line!r}"
        readable, _, _ = select.select([process.stdout], [], [], remaining)
        if readable:
            byte = os.read(process.stdout.fileno(), 1)
            assert byte, f"stdout ended before {what}: {line!r}"
            line += byte
    return line.decode().strip()


def fd_of(pid: int, variable: str) -> int:
    """A descriptor number the fixture protocol put in the environment of `pid`."""
    for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
        if entry.startswith(f"{variable}=".encode()):
            return int(entry.split(b"=", 1)[1])
    raise AssertionError(f"no {variable} in the environment of {pid}")


# -- TCP streams ----------------------------------------------------------------------


def test_echo_server_moved_mid_stream_echoes_100_mb_both_ways(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        with held_echo_stream(a, seed=11, hold="client") as stream:
            server, client = stream.server, stream.client
            before = standard_descriptors(server.pid)
            moved = move(a, server.pid, b)
            assert_standard_descriptors_kept(moved.shadow_pid, before)
            stream.go_on()
            client.assert_intact(STREAM_TIMEOUT)  # every byte echoed once, in order
            server.wait_exit()  # the original, killed by the move
            output = finish_moved(server, moved, tmp_path)
        assert f"echoed {STREAM_BYTES} bytes over 1 connections" in output


def test_stream_client_moved_mid_stream_keeps_its_connection(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        with held_echo_stream(a, seed=12, hold="server") as stream:
            server, client = stream.server, stream.client
            moved = move(a, client.pid, b)
            stream.go_on()
            client.wait_exit()
            # It finishes on its own, there: its own check of every byte.
            assert_ended_well(moved, "the moved stream_client", tmp_path)
            wait_released(moved)
            assert client.stdout == f"streamed {STREAM_BYTES} bytes\nPASS stream_client\n"
            server.assert_intact()  # no reset, every byte it received echoed
        assert f"echoed {STREAM_BYTES} bytes over 1 connections" in server.stdout


def test_a_moved_server_accepts_new_clients_at_its_original_address(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        with spawn_fixture("echo_server", netns=a.netns) as server:
            port = server.ready["port"]
            moved = move(a, server.pid, b)
            server.wait_exit()
            with contextlib.ExitStack() as stack:
                stream = ("127.0.0.1", port, str(1 << 20))
                clients = [  # three connections at once
                    stack.enter_context(
                        spawn_fixture("stream_client", *stream, str(seed), netns=a.netns)
                    )
                    for seed in (21, 22, 23)
                ]
                for client in clients:
                    client.assert_intact()
            output = finish_moved(server, moved, tmp_path)
        # The connections reached the moved process: its counters say so.
        assert f"echoed {3 << 20} bytes over 3 connections" in output


# -- UDP ------------------------------------------------------------------------------


@contextlib.contextmanager
def udp_service(
    node: Node,
) -> Iterator[tuple[RunningFixture, subprocess.Popen[bytes], tuple[str, str]]]:
    """(service, peer, its two ports): udp_echo in `node`, and a peer it has answered."""
    with spawn_fixture("udp_echo", netns=node.netns) as service:
        ports = service.ready["port"], service.ready["connected_port"]
        peer = spawn_python(node, UDP_PEER, *ports)
        assert ask(peer, "before") == "ok 12"
        yield service, peer, ports


def test_a_moved_udp_service_keeps_answering_at_its_original_address(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        with udp_service(a) as (service, peer, (port, _)):
            # More peers of the unconnected socket, one of them new after the move.
            others = [spawn_python(a, UDP_PEER, port, "0") for _ in range(3)]
            for other in others[:2]:
                assert ask(other, "before") == "ok 6"
            moved = move(a, service.pid, b)
            service.wait_exit()
            for _ in range(3):
                assert ask(peer, "after") == "ok 12"
                for other in others:
                    assert ask(other, "after") == "ok 6"
            status = shadow_status(a, service.pid)
            datagrams = [s for s in status["streams"] if s["kind"] == "datagram"]
            assert len(datagrams) == 2, status
            assert {s["relay"].rsplit(":", 1)[0] for s in datagrams} == {b.address}, status
            # One relay per peer of the unconnected socket; one for the connected one.
            assert sorted(s["peers"] for s in datagrams) == [1, 4], status
            output = finish_moved(service, moved, tmp_path)
        # The first peer: 12 before the move, 3 x 12 after; the others 6 each time they asked.
        assert f"echoed {48 + 6 * (4 + 4 + 3)} datagrams" in output, output


def test_a_moved_ipv6_udp_service_keeps_answering_on_its_ipv6_address(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        service = spawn_python(a, UDP6_SERVICE)
        port = read_line(service, LINE_TIMEOUT)
        peer = spawn_python(a, UDP_PEER, port, "0", "::1")
        assert ask(peer, "before") == "ok 6"
        moved = move(a, service.pid, b)
        assert service.wait(EXIT_TIMEOUT) == -signal.SIGKILL  # the original
        for _ in range(3):
            assert ask(peer, "after") == "ok 6"
        (datagram,) = [
            s for s in shadow_status(a, service.pid)["streams"] if s["kind"] == "datagram"
        ]
        assert datagram["datagrams_out"] == datagram["datagrams_in"] == 18, datagram
        assert service.stdin is not None
        service.stdin.close()
        assert_ended_well(moved, "the moved IPv6 service", tmp_path)
        wait_released(moved)


def test_a_moved_udp_client_keeps_exchanging_with_its_server(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        with spawn_fixture("udp_echo", netns=a.netns) as server:
            # The client: one UDP socket connected to the server's connected port
            # (its other one, never used, is unbound: in no /proc/net table).
            client = spawn_python(a, UDP_PEER, "0", server.ready["connected_port"])
            assert ask(client, "before") == "ok 6"
            moved = move(a, client.pid, b)
            assert client.wait(EXIT_TIMEOUT) == -signal.SIGKILL  # the original
            for _ in range(3):
                assert ask_moved(client, "after") == "ok 6"
            assert client.stdin is not None
            client.stdin.close()
            assert_ended_well(moved, "the moved UDP client", tmp_path)
            wait_released(moved)
            server.assert_intact()  # no error on its connected socket: its peer stayed
        assert "echoed 24 datagrams (" in server.stdout, server.stdout
        assert "24 on the connected socket" in server.stdout, server.stdout


def test_a_moved_ipv6_udp_client_keeps_exchanging_with_its_server(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        server = spawn_python(a, UDP6_SERVICE)
        port = read_line(server, LINE_TIMEOUT)
        client = spawn_python(a, UDP_PEER, "0", port, "::1")  # connected to [::1]:port
        assert ask(client, "before") == "ok 6"
        moved = move(a, client.pid, b)
        assert client.wait(EXIT_TIMEOUT) == -signal.SIGKILL  # the original
        for _ in range(3):
            assert ask_moved(client, "after") == "ok 6"
        assert client.stdin is not None and server.stdin is not None
        client.stdin.close()
        assert_ended_well(moved, "the moved IPv6 UDP client", tmp_path)
        wait_released(moved)
        server.stdin.close()
        assert server.wait(EXIT_TIMEOUT) == 0


def test_a_udp_service_moved_on_and_home_again_keeps_answering(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        for node in cluster:
            node.start_daemon()
        with spawn_fixture("udp_echo", netns=a.netns) as service:
            port, connected_port = service.ready["port"], service.ready["connected_port"]
            home_pid = service.pid
            pinger = spawn_python(a, UDP_PINGER, port)  # datagrams in flight during every move
            echoed = [int(ask(pinger, "count").split()[1])]
            again = 0
            here, pid = a, home_pid
            peer = None
            for there in (b, c, a):
                moved = move(here, pid, there, home=(a, home_pid))
                if here is a:
                    service.wait_exit()
                if peer is None:
                    # Its first datagram connects udp_echo's second socket, on b: to
                    # the shadow's relay for this peer, which must follow to c and a.
                    peer = spawn_python(a, UDP_PEER, port, connected_port)
                assert ask(peer, f"on {there.name}") == "ok 12"
                answer = ask(pinger, "count")
                status = shadow_status(a, home_pid)
                assert answer.startswith("ok "), (answer, there.name, status["streams"])
                echoed.append(int(answer.split()[1]))
                again = int(answer.split()[2])
                relays = {s["relay"] for s in status["streams"] if s["kind"] == "datagram"}
                assert {r.rsplit(":", 1)[0] for r in relays} == {there.address}, status
                here, pid = there, moved.pid
            assert echoed == sorted(echoed) and echoed[0] < echoed[-1], echoed
            # Caught in a move, a datagram is passed on all the same, save one
            # the process had read but not yet answered when it left home: it
            # answers it from its new node, to an address only home has.
            assert again <= 1, again
            assert pinger.stdin is not None
            pinger.stdin.close()
            assert pinger.wait(EXIT_TIMEOUT) == 0
            print(f"ping-pong datagrams echoed by the end of each move: {echoed}; again: {again}")
            output = finish_moved(service, moved, tmp_path)
        assert ", 18 on the connected socket" in output, output  # 6 on each node


def test_a_udp_service_whose_move_fails_keeps_its_sockets_and_answers(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        # Found out only when the process is restored and held there.
        (tmp_path / "a-file").write_text("not a directory\n")
        start_daemon_with(b, "HIJACK_STATE_DIR", str(tmp_path / "a-file"))
        with udp_service(a) as (service, peer, _):
            line = move_refused(a, service.pid, b)
            assert "cannot open the state registry" in line, line
            assert_untouched(service.pid)
            assert_not_attached(a, service.pid)  # attached by the move, detached again
            assert ask(peer, "after") == "ok 12"
            service.assert_intact()
        assert "echoed 24 datagrams" in service.stdout


# -- failed moves ---------------------------------------------------------------------


def test_a_destination_killed_mid_transfer_leaves_the_original_running(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        with held_echo_stream(a, seed=31, hold="client") as stream:
            server, client = stream.server, stream.client
            assert b.daemon_endpoint is not None
            move_with_the_daemon_killed(
                a, b, server.pid, r"move \w+ of echo_server from a", "receives the move"
            )
            stream.go_on()
            assert_untouched(server.pid)
            assert runs_in(server.pid, a)
            with Registry(a.state_dir) as registry:
                (record,) = registry.moves()
            assert record.phase == "failed", record
            # Nothing half-built survives there (a stub dies with its tracer).
            poll_until(lambda: not pids_inside(b), "b's half-built process gone")
            client.assert_intact(STREAM_TIMEOUT)
            assert_not_attached(a, server.pid)  # as before the command

            # The same process moves once the destination is back.
            b.start_daemon()
            moved = move(a, server.pid, b)
            server.wait_exit()
            output = finish_moved(server, moved, tmp_path)
        assert f"echoed {STREAM_BYTES} bytes over 1 connections" in output


@pytest.mark.parametrize("precopy", ["--no-precopy", "--precopy"])
@pytest.mark.parametrize(
    ("flaw", "reason"),
    [
        (
            "a certificate of another CA",
            "certificate is refused: unable to get local issuer certificate",
        ),
        ("a state directory it cannot use", "cannot open the state registry"),
    ],
)
def test_a_destination_that_refuses_the_process_changes_nothing(
    tmp_path: Path, flaw: str, reason: str, precopy: str
) -> None:
    # With pre-copy, the destination refuses while the first round streams
    # in: its reason must reach the mover all the same, never a reset.
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        if flaw == "a certificate of another CA":
            # The mover refuses it before it sends anything.
            other = certificates.from_another_ca(
                cluster.pki_dir, tmp_path / "other", "b", b.address
            )
            start_daemon_with(b, "HIJACK_PKI", str(other))
        else:
            # Found out only when the process is restored and held there.
            (tmp_path / "a-file").write_text("not a directory\n")
            start_daemon_with(b, "HIJACK_STATE_DIR", str(tmp_path / "a-file"))
        with held_echo_stream(a, seed=41, hold="client") as stream:
            server, client = stream.server, stream.client
            line = move_refused(a, server.pid, b, precopy)
            assert reason in line, line
            stream.go_on()
            assert_untouched(server.pid)
            assert b.daemon is not None
            assert pids_inside(b) == {b.daemon.pid}
            client.assert_intact(STREAM_TIMEOUT)
            assert_not_attached(a, server.pid)  # attached by the move, detached again
            server.assert_intact()
        assert f"echoed {STREAM_BYTES} bytes over 1 connections" in server.stdout


# -- several moves ----------------------------------------------------------------------


def assert_relays_one_hop(
    moved: Moved, home: Node, home_pid: int, control_fd: int, *, plain: bool = False
) -> None:
    """Every relay of the process on its node goes straight to the home shadow: plain at
    home, else through its node's forwarder (docs/protocol.md, "Encrypted relays")."""
    status = shadow_status(home, home_pid)
    shadow_end = f"{home.address}:{status['endpoint_port']}"
    assert status["location"] == moved.node.name, status
    rows = ss_lines(moved.node, moved.pid)
    established = [row for row in rows if row[0] == "ESTAB"]
    listening = [row for row in rows if row[0] == "LISTEN"]
    # The control pipe and one client connection, each a relay to the shadow.
    assert len(established) == 2, (rows, status)
    # Its listener is on loopback: only the shadow's clients, through the node, get in.
    assert [row[3].rsplit(":", 1)[0] for row in listening] == ["127.0.0.1"], rows
    streams = {stream["id"]: stream for stream in status["streams"]}
    relayed = {(s["relay"], s["shadow_end"]) for s in streams.values() if s["relay"]}
    assert relayed == {(row[3], row[4]) for row in established}, (rows, status)
    assert streams[f"fd:{control_fd}"]["relay"], status
    if moved.node is home or plain:
        assert {row[4] for row in established} == {shadow_end}, (rows, status)
    else:
        # Its node's forwarder holds the other ends, and its TLS relays (and the
        # listener's link) go straight to the shadow.
        everyone = {int(pid) for pid in run_ip("netns", "pids", moved.node.netns).split()}
        forwarded = [
            row
            for pid in everyone
            if is_forwarder(pid)
            for row in ss_lines(moved.node, pid)
            if row[0] == "ESTAB" and row[4] == shadow_end
        ]
        assert len(forwarded) >= 3, (forwarded, status)


def test_two_moves_with_one_hop_relays_then_home_again_unrelayed(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        for node in cluster:
            node.start_daemon()
        with spawn_fixture("echo_server", netns=a.netns) as server:
            port = server.ready["port"]
            home_pid = server.pid
            control_fd = fd_of(home_pid, "CONTROL_FD")
            session = spawn_python(a, ECHO_SESSION, "127.0.0.1", port)
            assert read_line(session, LINE_TIMEOUT) == "connected"
            assert ask(session, "at home") == "at home"

            here, pid = a, home_pid
            freezes = []
            for there in (b, c, a):
                moved = move(here, pid, there, home=(a, home_pid))
                freezes.append(moved.freeze_ms)
                if here is a:
                    server.wait_exit()
                else:
                    # Nothing of it is left where it was: only that node's daemon.
                    assert here.daemon is not None
                    assert pids_inside(here) == {here.daemon.pid}
                if there is a:
                    # Home again: its own sockets and pipe back, nothing relayed
                    # (test_move_home holds the details).
                    status = shadow_status(a, home_pid)
                    assert (status["mode"], status["streams"]) == ("home", []), status
                else:
                    assert_relays_one_hop(moved, a, home_pid, control_fd)
                assert ask(session, f"on {there.name}") == f"on {there.name}"
                with spawn_fixture(
                    "stream_client", "127.0.0.1", port, str(1 << 20), "61", netns=a.netns
                ) as client:
                    client.assert_intact()
                here, pid = there, moved.pid
            print(f"freezes: {freezes} ms")

            assert session.stdin is not None
            session.stdin.close()
            assert session.wait(EXIT_TIMEOUT) == 0
            output = finish_moved(server, moved, tmp_path)
        assert "over 4 connections" in output


# -- a new node's own network -----------------------------------------------------------


def test_a_moved_process_connects_out_from_its_new_node(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        b.start_daemon()
        reporters = {}
        for node, address in ((b, "127.0.0.1"), (c, c.address)):
            reporter = node.spawn(
                [sys.executable, "-c", ADDRESS_REPORTER, address], stdout=subprocess.PIPE
            )
            reporters[node.name] = f"{address} {read_line(reporter, LINE_TIMEOUT)}"
        commands_path, replies_path = tmp_path / "commands.fifo", tmp_path / "replies.fifo"
        os.mkfifo(commands_path)
        os.mkfifo(replies_path)
        # O_RDWR: neither open blocks, and the dialer's opens (and its restore's) never wait.
        commands = os.open(commands_path, os.O_RDWR | os.O_CLOEXEC)
        replies = os.open(replies_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            dialer = a.spawn(
                [sys.executable, "-c", DIALER, commands_path, replies_path],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # not pytest's capture file: deleted, not reopenable
                stderr=subprocess.DEVNULL,
            )
            with os.fdopen(os.dup(replies), "rb", buffering=0) as reply_stream:

                def dial(target: str) -> str:
                    os.write(commands, f"connect {target}\n".encode())
                    readable, _, _ = select.select([reply_stream], [], [], LINE_TIMEOUT)
                    assert readable, f"no reply to connect {target}"
                    return reply_stream.readline().decode().strip()

                assert dial(reporters["c"]).split()[2].startswith(f"{a.address}:")
                # b's loopback server is b's own: from a, nothing listens there.
                assert dial(reporters["b"]) == "error ConnectionRefusedError"

                moved = move(a, dialer.pid, b)
                reply = dial(reporters["c"]).split()
                assert reply[0] == "ok", reply
                assert reply[1].startswith(f"{b.address}:"), reply  # its own end
                assert reply[2] == reply[1], reply  # what c saw
                reply = dial(reporters["b"]).split()
                assert reply[0] == "ok" and reply[2].startswith("127.0.0.1:"), reply
                os.write(commands, b"exit\n")
                assert_ended_well(moved, "the moved dialer", tmp_path)
                wait_released(moved)
        finally:
            os.close(commands)
            os.close(replies)


# -- pipes and stdio --------------------------------------------------------------------


def test_stdin_and_stdout_pipes_are_proxied_after_a_move(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        cat = a.spawn(
            ["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert cat.stdin is not None and cat.stdout is not None
        assert through_cat(cat, b"before the move\n") == b"before the move\n"
        moved = move(a, cat.pid, b)
        assert cat.wait(EXIT_TIMEOUT) == -signal.SIGKILL  # the original
        assert through_cat(cat, b"after the move\n") == b"after the move\n"
        data = pattern(8 << 20, 5)
        assert through_cat(cat, data) == data
        # Its last words: its input ends and it exits before anyone reads them.
        last_words = pattern(3 << 20, 6)
        write_all(cat.stdin, last_words)
        cat.stdin.close()
        assert_ended_well(moved, "the moved cat", tmp_path)
        assert read_to_end(cat.stdout) == last_words  # all of them, then EOF
        wait_released(moved)


# A python3 holding two socketpairs with data queued in them (a stream and a datagram
# pair); for each stdin line it reads them all and answers with what it read.
SOCKETPAIRS = """\
import socket, sys
stream = socket.socketpair()
stream[0].sendall(b"queued bytes")
dgram = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
dgram[0].send(b"one")
dgram[0].send(b"two")
print("ready", flush=True)
for line in sys.stdin:
    got = [stream[1].recv(100), dgram[1].recv(100), dgram[1].recv(100)]
    stream[0].sendall(b"again")
    dgram[1].send(b"back")
    got += [stream[1].recv(100), dgram[0].recv(100)]
    print(b" ".join(got).decode(), flush=True)
"""


def test_socketpairs_are_made_again_at_the_destination_with_their_queues(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        holder = spawn_python(a, SOCKETPAIRS)
        assert read_line(holder, LINE_TIMEOUT) == "ready"
        moved = move(a, holder.pid, b)
        assert holder.wait(EXIT_TIMEOUT) == -signal.SIGKILL  # the original
        # Not relayed: made again there, with what was queued in them.
        assert ask_moved(holder, "read") == "queued bytes one two again back"
        assert holder.stdin is not None
        holder.stdin.close()
        assert_ended_well(moved, "the moved holder", tmp_path)
        wait_released(moved)


# -- what cannot be proxied -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "named"),
    [
        ("netlink", r"socket socket:\[\d+\]"),
        ("unix-datagram", r"socket unix"),
        ("udplite", r"socket socket:\[\d+\]"),  # a datagram socket, but not UDP
    ],
)
def test_a_descriptor_that_cannot_be_proxied_is_named_and_nothing_moves(
    tmp_path: Path, kind: str, named: str
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        holder = spawn_python(a, HOLDER, kind)
        fd = int(read_line(holder, LINE_TIMEOUT))
        line = move_refused(a, holder.pid, b)
        assert re.search(rf"fd {fd} \({named}", line), line
        assert line.endswith("cannot be proxied; nothing was changed"), line
        assert_untouched(holder.pid)
        assert not (a.state_dir / "shadows" / str(holder.pid)).exists()
        with Registry(a.state_dir) as registry:
            assert registry.find(holder.pid) is None
        assert " move " not in daemon_log(b)
        assert ask(holder, "still here") == "still here"


@pytest.mark.parametrize("option", ["--precopy", "--postcopy"])
def test_system_v_shared_memory_refuses_rounds_before_anything_is_touched(
    tmp_path: Path, option: str
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        with spawn_fixture("sysv_shm", netns=a.netns) as shm:
            line = move_refused(a, shm.pid, b, option)
            assert re.search(r"System V shared memory at 0x[0-9a-f]+ \(a move's pre-copy", line)
            assert "without --precopy/--postcopy" in line and line.endswith("nothing was changed")
            assert_untouched(shm.pid)
            assert_not_attached(a, shm.pid)
            assert " move " not in daemon_log(b)
            shm.assert_intact()


def test_system_v_shared_memory_moves_frozen_whole_there_and_home(tmp_path: Path) -> None:
    """Attached again at its address by the destination's restore of the whole image (the
    segment found live under its id, or made again from the image), its contents intact."""
    with two_nodes(tmp_path) as (a, b), spawn_fixture("sysv_shm", netns=a.netns) as shm:
        there = move(a, shm.pid, b, precopy=False)
        shm.wait_exit()  # the original, killed by the move
        back = move(b, there.pid, a, home=(a, shm.pid), precopy=False)
        finish_moved(shm, back, tmp_path)


# -- what the image itself carries -------------------------------------------------------


@pytest.mark.parametrize("name", ["ghost", "memfd"])
def test_deleted_files_and_memfds_are_made_again_from_the_image_on_the_destination(
    tmp_path: Path, name: str
) -> None:
    """Not proxied: the destination rebuilds them (bytes, holes, offsets, seals, the sharing
    between a memfd's descriptor and its mapping, a deleted cwd) from the image."""
    data = tmp_path / "data"
    data.mkdir()
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        with spawn_fixture(name, *([data] if name == "ghost" else []), netns=a.netns) as held:
            moved = move(a, held.pid, b)
            held.wait_exit()  # the original, killed by the move
            finish_moved(held, moved, tmp_path)
    assert list(data.iterdir()) == []  # made again under their names, unlinked at once


# -- an unmodified server ---------------------------------------------------------------


def redis_options(port: int, directory: Path) -> list[str]:
    """A redis on 127.0.0.1:port that never writes its data set to disk."""
    options = {"bind": "127.0.0.1", "port": port, "save": "", "appendonly": "no"}
    options |= {"dir": directory, "logfile": directory / "redis.log"}
    return [word for name, value in options.items() for word in (f"--{name}", str(value))]


def test_redis_moved_mid_session_keeps_its_keys_and_its_connection(tmp_path: Path) -> None:
    redis = "/usr/bin/redis-server"
    if not os.path.exists(redis):
        pytest.skip("no redis-server (Debian's redis-server package)")
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        port = a.free_port()
        server = a.spawn(
            [redis, *redis_options(port, tmp_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        a.wait_tcp("127.0.0.1", port)
        client = spawn_python(a, REDIS_CLIENT, str(port))

        assert read_line(client, LINE_TIMEOUT) == "loaded"
        issued_before = int(ask(client, "count").split()[1])
        moved = move(a, server.pid, b)
        assert server.wait(EXIT_TIMEOUT) == -signal.SIGKILL
        issued_after = int(ask(client, "count").split()[1])
        assert issued_before < issued_after, (issued_before, issued_after)
        # And on: two questions in a row may find no command between them (a loaded
        # machine's client answers the second before it runs its loop again).
        poll_until(
            lambda: int(ask(client, "count").split()[1]) > issued_after,
            "the client's commands answered by the moved redis",
        )
        assert ask(client, "check") == "checked 1000 keys, 0 wrong"
        assert ask(client, "shutdown") == "shut down"
        assert client.wait(EXIT_TIMEOUT) == 0
        assert_ended_well(moved, "the moved redis-server", tmp_path)
        wait_released(moved)


# -- pre-copy ---------------------------------------------------------------------------

DIRTY_RATE = "20"  # MB/s the dirtier rewrites while it is pre-copied


def rounds_of(result_stdout: str) -> int:
    found = re.search(r"\((\d+) pre-copy rounds\)", result_stdout)
    return int(found[1]) if found else 0


def test_a_process_dirtying_memory_during_precopy_arrives_intact_and_comes_home(
    tmp_path: Path,
) -> None:
    with two_nodes(tmp_path) as (a, b):
        # Writes, zeroed and dropped pages, mappings replaced and mprotected,
        # all while the rounds run; it checks every page at the end.
        with spawn_fixture("dirtier", "64", DIRTY_RATE, netns=a.netns) as dirtier:
            there = move(a, dirtier.pid, b)
            dirtier.wait_exit()
            back = move(b, there.pid, a, home=(a, dirtier.pid))
            output = finish_moved(dirtier, back, tmp_path)
        assert "steps" in output


def test_guard_pages_arrive_with_a_precopied_move(tmp_path: Path) -> None:
    """The freeze scans for guard pages beside its injected calls (Precopy.scan_guards):
    the moved process has them where it had them (it checks them itself at the end)."""
    with (
        two_nodes(tmp_path) as (a, b),
        spawn_fixture("guarded", netns=a.netns) as fixture,
    ):
        guards = dirty.guard_regions(fixture.pid)
        first = int(fixture.ready["guarded"], 16) + 3 * 4096
        assert guards == [(first, first + 2 * 4096)], guards
        moved = move(a, fixture.pid, b)
        fixture.wait_exit()
        assert dirty.guard_regions(moved.pid) == guards
        finish_moved(fixture, moved, tmp_path)


def test_a_destination_killed_during_precopy_leaves_the_original_untracked_and_running(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        with spawn_fixture("dirtier", "256", DIRTY_RATE, netns=a.netns) as dirtier:
            assert b.daemon_endpoint is not None
            move_with_the_daemon_killed(
                a,
                b,
                dirtier.pid,
                r"move \w+ of dirtier from a .*: pre-copy",
                "receives the rounds",
                "--precopy",
            )
            assert_untouched(dirtier.pid)
            assert runs_in(dirtier.pid, a)
            # No userfaultfd left in it, nor any range registered with one.
            links = [os.readlink(f"/proc/{dirtier.pid}/fd/{fd}") for fd in fds_of(dirtier.pid)]
            assert not [link for link in links if "userfaultfd" in link], links
            smaps = Path(f"/proc/{dirtier.pid}/smaps").read_text()
            assert not re.search(r"^VmFlags:.* u[wm]\b", smaps, re.MULTILINE)
            with Registry(a.state_dir) as registry:
                (record,) = registry.moves()
            assert record.phase == "failed", record
            poll_until(lambda: not pids_inside(b), "b's half-built process gone")
            # It goes on writing, and every page it wrote holds what it wrote.
            dirtier.assert_intact()


def fds_of(pid: int) -> list[str]:
    return os.listdir(f"/proc/{pid}/fd")


def test_a_root_process_is_refused_before_precopy_builds_anything(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon(allow_root=False)
        assert b.daemon is not None and b.daemon_endpoint is not None
        with spawn_fixture("dirtier", "16", DIRTY_RATE, netns=a.netns) as dirtier:
            result = a.hijack("move", dirtier.pid, "--to", b.daemon_endpoint, "--precopy")
            line = refusal_line(result)
            assert f"refusing dirtier (pid {dirtier.pid})" in line, line
            assert "root's powers" in line, line
            assert "pre-copy" in daemon_log(b)
            assert pids_inside(b) == {b.daemon.pid}  # no stub was ever made
            assert_untouched(dirtier.pid)
            links = [os.readlink(f"/proc/{dirtier.pid}/fd/{fd}") for fd in fds_of(dirtier.pid)]
            assert not [link for link in links if "userfaultfd" in link], links
            dirtier.assert_intact()


def test_a_threaded_process_moved_keeps_its_personality_no_new_privs_and_names(
    tmp_path: Path,
) -> None:
    # Pre-copied, its worker thread is cloned at the destination as the move message
    # comes, before the image (restorer.clone_ahead); the restore gives it afterwards
    # what a clone made after the leader's personality would inherit, and its own
    # no_new_privs (THREAD_CREDENTIALS: the worker was made before the leader set it).
    with (
        two_nodes(tmp_path) as (a, b),
        spawn_fixture("process_flags", netns=a.netns) as fixture,
    ):
        before = flags_of(fixture.pid)
        moved = move(a, fixture.pid, b)
        fixture.wait_exit()
        after = flags_of(moved.pid)
        assert after["leader"] == before["leader"], (before, after)
        assert after["names"] == before["names"], (before, after)
        # Every thread with its leader's personality (an image has one: a restore clones
        # the threads after it), and its own no_new_privs.
        personality = before["leader"].split(",")[0]
        assert {flags.split(",")[0] for flags in after["threads"]} == {personality}, after
        no_new_privs = sorted(flags.split(",")[1] for flags in before["threads"])
        assert sorted(flags.split(",")[1] for flags in after["threads"]) == no_new_privs, after
        finish_moved(fixture, moved, tmp_path)  # its own check: personality, flags


def test_thirty_threads_moved_keep_their_own_altstacks_and_tid_addresses(tmp_path: Path) -> None:
    # The mover reads what only a call made in each thread tells (its clear-child-tid
    # address, its altstack) in every thread at once (hijack.mutator.parasite); the
    # destination gives each of its threads, cloned ahead, its own back.
    with (
        two_nodes(tmp_path) as (a, b),
        spawn_fixture("altstacks", "30", netns=a.netns) as fixture,
    ):
        tids = {int(tid) for tid in os.listdir(f"/proc/{fixture.pid}/task")}
        assert len(tids) == int(fixture.ready["threads"]) == 31
        moved = move(a, fixture.pid, b)
        fixture.wait_exit()
        assert len(os.listdir(f"/proc/{moved.pid}/task")) == 31
        stdout = finish_moved(fixture, moved, tmp_path)  # each thread checks its own
        assert "checked=31" in stdout, stdout


def flags_of(pid: int) -> dict[str, Any]:
    """The personality and NoNewPrivs of `pid`'s leader and of each thread, their names."""

    def flags(task: Path) -> str:
        status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines())
        personality = (task / "personality").read_text().strip()
        return f"personality {personality}, NoNewPrivs {status['NoNewPrivs'].strip()}"

    tasks = sorted(Path(f"/proc/{pid}/task").iterdir())
    return {
        "leader": flags(Path(f"/proc/{pid}")),
        "threads": [flags(task) for task in tasks],
        "names": sorted((task / "comm").read_text() for task in tasks),
    }
