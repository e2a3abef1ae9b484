"""Soak: a server fixture moved again and again between three nodes under constant client load.

The echo_server starts in node a and is moved a → b → c → a → b → ... while
clients never stop talking to it: a load of stream_client fixtures one after
the other (each streams LOAD_STREAM_BYTES of its checksummed stream and
checks every echoed byte in order), and one session connection that asks a
line after each move. After each move: the process runs on its new node,
the session answers through it, a load stream completes through it, and the
node it left holds nothing but its daemon. A move to a is a move home: the
shadow hands the process its own sockets back if it caught up in time (home
again), else relays them on, and the next move is a first move again or one
more from away. At the end: every stream was intact, the server echoed
exactly the bytes the clients sent, the daemons' memory (VmRSS) and
descriptor counts are as they were after the warm-up, and the home shadow
holds no more descriptors than at the first move away after it.

The suite runs a short form (SOAK_MOVES, default 6); `make soak` the full one
(SOAK_MOVES=50). The figures are printed (pytest -s shows them).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

from support import spawn_fixture
from support.nodes import Cluster, Node, read_line
from test_move import (
    ECHO_SESSION,
    EXIT_TIMEOUT,
    LINE_TIMEOUT,
    Moved,
    ask,
    assert_ended_well,
    logs,
    move,
    pids_inside,
    spawn_python,
    wait_released,
)
from test_relay_pump import pump_of

SOAK_MOVES = int(os.environ.get("SOAK_MOVES", "6"))
WARM_UP_MOVES = 3  # a -> b -> c -> a: every daemon has received once before the baseline
LOAD_STREAM_BYTES = 4 * 1024 * 1024
LOAD_TIMEOUT = 120.0  # one load stream, moves included
FLOW_TIMEOUT = 60.0  # after a move, for a load stream to complete through the new node
# VmRSS a daemon may gain from the warm-up to the end: allocator noise, not per-move growth
# (a leak of one image buffer or thread stack per move would exceed it well before 50 moves).
RSS_GROWTH_LIMIT_KB = 8 * 1024


class Load:
    """stream_client fixtures one after the other against the server, until stopped."""

    def __init__(self, node: Node, port: str) -> None:
        self.node = node
        self.port = port
        self.completed = 0  # streams that ended intact
        self.failures: list[str] = []
        self.changed = threading.Condition()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-load", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        seed = 1000
        while not self.stopping.is_set() and not self.failures:
            seed += 1
            stream = ("127.0.0.1", self.port, str(LOAD_STREAM_BYTES), str(seed))
            try:
                with spawn_fixture("stream_client", *stream, netns=self.node.netns) as client:
                    client.assert_intact(LOAD_TIMEOUT)
            except Exception as exc:  # reported by the test, not lost in this thread
                self.failures.append(f"stream {seed}: {exc}")
            with self.changed:
                if not self.failures:
                    self.completed += 1
                self.changed.notify_all()

    def wait_for_one_more(self, timeout: float) -> None:
        """Wait until a stream that started after now has completed (so it crossed the node)."""
        with self.changed:
            target = self.completed + 2  # the one under way may have started before the move
            ok = self.changed.wait_for(
                lambda: self.completed >= target or bool(self.failures), timeout
            )
        assert not self.failures, self.failures
        assert ok, f"no load stream completed within {timeout} s"

    def stop(self) -> int:
        self.stopping.set()
        self.thread.join(LOAD_TIMEOUT + 10)
        assert not self.thread.is_alive(), "the load did not stop"
        assert not self.failures, self.failures
        return self.completed


def vm_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# The shadow makes a stream's splice pipe when bytes first splice in that
# direction, and an encrypted relay moves them through TLS instead: whether the
# session's two directions hold a pipe differs from one move to the next. So
# the shadow's pipes made since the baseline may be those two; every other
# descriptor (sockets above all) counts one by one.
SESSION_SPLICE_PIPES = 2


def fd_names(pid: int) -> list[str]:
    """What each descriptor of `pid` is (readlink); one closed while listed is passed over
    (the shadow closes a stream's as a load connection ends)."""
    names = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            names.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return names


def shadow_fd_count(pid: int, pipes_before: frozenset[str]) -> int:
    """The shadow's descriptors, less those of up to SESSION_SPLICE_PIPES pipes made since
    `pipes_before` (pipe:[INODE] names), and less two a move home that left the process
    relayed adds for good: the pidfd it watches the process by, back on its node, and
    the control socket of the native pump that splices its plain relays there (the
    baseline, taken away, has neither; a move home refused the originals when bytes for
    a load client were under way, now and then)."""
    names = fd_names(pid)
    new_pipes = {name for name in names if name.startswith("pipe:")} - pipes_before
    allowed = set(sorted(new_pipes)[:SESSION_SPLICE_PIPES])
    count = sum(name not in allowed and name != "anon_inode:[pidfd]" for name in names)
    return count - (1 if pump_of(pid) else 0)


def pipes_of(pid: int) -> frozenset[str]:
    return frozenset(name for name in fd_names(pid) if name.startswith("pipe:"))


def settled_fd_count(
    pid: int, expected: int, pipes_before: frozenset[str], timeout: float = 10.0
) -> int:
    """The descriptor count of `pid` once it is back to `expected`, or the last one seen.

    The last load client has exited, but the shadow ends its stream (a socket,
    its relay, and with splicing two pipes) only once the server's end of it
    has come back: a moment later. A leak never settles.
    """
    deadline = time.monotonic() + timeout
    count = shadow_fd_count(pid, pipes_before)
    while count > expected and time.monotonic() < deadline:
        time.sleep(0.05)
        count = shadow_fd_count(pid, pipes_before)
    return count


def daemon_pid(node: Node) -> int:
    assert node.daemon is not None
    return node.daemon.pid


def test_soak_moves_between_three_nodes_under_load(tmp_path: Path) -> None:
    started = time.monotonic()
    with Cluster(tmp_path, nodes=3) as cluster:
        a = cluster.nodes[0]
        for node in cluster:
            node.start_daemon()
        with spawn_fixture("echo_server", netns=a.netns) as server:
            port = server.ready["port"]
            home_pid = server.pid
            session = spawn_python(a, ECHO_SESSION, "127.0.0.1", port)
            assert read_line(session, LINE_TIMEOUT) == "connected"
            session_bytes = 0
            load = Load(a, port)
            load.start()
            try:
                here, pid = a, home_pid
                moved: Moved | None = None
                baseline: dict[str, tuple[int, int]] = {}
                shadow_fds = 0
                shadow_pipes: frozenset[str] = frozenset()
                freezes: list[float] = []
                for number in range(1, SOAK_MOVES + 1):
                    there = cluster.nodes[number % 3]
                    moved = move(here, pid, there, home=(a, home_pid))
                    freezes.append(moved.freeze_ms)
                    if here is a and number == 1:
                        server.wait_exit()  # the original, killed by the first move
                    line = f"move {number} to {there.name}"
                    assert ask(session, line) == line
                    session_bytes += len(line) + 1
                    load.wait_for_one_more(FLOW_TIMEOUT)
                    if here is not a:
                        # Nothing of it is left where it was: only that node's daemon.
                        assert pids_inside(here) == {daemon_pid(here)}, logs(tmp_path)
                    if number == WARM_UP_MOVES:
                        baseline = {
                            node.name: (vm_rss_kb(daemon_pid(node)), fd_count(daemon_pid(node)))
                            for node in cluster
                        }
                    if number == WARM_UP_MOVES + 1:
                        # Away (on b): relayed. Back at a it may be relayed too, or hold
                        # its own descriptors again (home again), with fewer here.
                        shadow_fds = fd_count(moved.shadow_pid)
                        shadow_pipes = pipes_of(moved.shadow_pid)
                    here, pid = there, moved.pid
                assert moved is not None
                streams = load.stop()
                # Measured with the process still running and its session open,
                # as at the baseline: only what was left over by the moves counts.
                ending = {
                    node.name: (vm_rss_kb(daemon_pid(node)), fd_count(daemon_pid(node)))
                    for node in cluster
                }
                shadow_fds_end = settled_fd_count(moved.shadow_pid, shadow_fds, shadow_pipes)
            finally:
                load.stopping.set()
            assert session.stdin is not None
            session.stdin.close()
            assert session.wait(EXIT_TIMEOUT) == 0

            server.close_control()
            assert_ended_well(moved, "the soaked echo_server", tmp_path)
            wait_released(moved)
            output = server.stdout
            assert "PASS echo_server" in output, f"{output}\n{server.stderr}\n{logs(tmp_path)}"
            for node in cluster:
                assert pids_inside(node) == {daemon_pid(node)}, f"{node}: {logs(tmp_path)}"

        echoed = streams * LOAD_STREAM_BYTES + session_bytes
        assert f"echoed {echoed} bytes over {streams + 1} connections" in output, (
            f"{output}\nexpected {echoed} bytes over {streams + 1} connections"
        )
        print(
            f"soak: {SOAK_MOVES} moves, {streams} load streams of {LOAD_STREAM_BYTES} bytes, "
            f"{echoed} bytes echoed, in {time.monotonic() - started:.0f} s; "
            f"freeze min/median/max {min(freezes):.0f}/{sorted(freezes)[len(freezes) // 2]:.0f}/"
            f"{max(freezes):.0f} ms"
        )
        if baseline:
            for name, (rss, fds) in baseline.items():
                rss_end, fds_end = ending[name]
                print(
                    f"daemon {name}: VmRSS {rss} -> {rss_end} kB ({rss_end - rss:+d}), "
                    f"fds {fds} -> {fds_end}"
                )
            print(f"home shadow: fds {shadow_fds} -> {shadow_fds_end}")
            for name, (rss, fds) in baseline.items():
                rss_end, fds_end = ending[name]
                assert fds_end <= fds, f"daemon {name} holds {fds_end - fds} more descriptors"
                assert rss_end - rss <= RSS_GROWTH_LIMIT_KB, (
                    f"daemon {name} grew by {rss_end - rss} kB over "
                    f"{SOAK_MOVES - WARM_UP_MOVES} moves"
                )
            assert not shadow_fds or shadow_fds_end <= shadow_fds, (
                f"the home shadow holds {shadow_fds_end - shadow_fds} more descriptors"
            )
