"""Socket swap: two managed ends of a relayed TCP connection joined directly.

After `hijack move` a process's connections go through its home shadow. When
the other end is a process hijack manages too, `hijack swap PID` joins the two
ends with a new direct connection between their nodes (docs/protocol.md,
"Socket swap"): what was in flight arrives first and once, each end's
descriptor holds the direct socket, and the shadow relays no more of it.

Helpers and programs come from test_move (the same Cluster of netns nodes).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import spawn_fixture
from support.nodes import Cluster, Node, link_down, link_up
from support.running import RunningFixture
from test_faults import deliver, finish, hijack_in, shadow_pid_of
from test_move import (
    Moved,
    assert_ended_well,
    daemon_log,
    exit_code_on,
    finish_moved,
    logs,
    move,
    poll_until,
    refusal_line,
    shadow_status,
    still_running,
    wait_gone,
)
from test_tree_move import move_tree

from hijack.process.tree import read_tree
from hijack.sys import procfs

PLAIN = ("--plain-relays",)  # relays not encrypted (the default is TLS between nodes)
# Node a's loopback slowed down so that the stream is still under way after the moves and
# the swaps (the direct connection between nodes is not shaped): 10 MB/s, 400 MB echoed.
LOOPBACK_SHAPE = ("rate", "80mbit", "burst", "256kb", "latency", "100ms")
STREAM_BYTES = 400 * 1024 * 1024
# How long a swap may take to reach a test point: its own bounds (hijack.node.swap), two
# drains of 30 s at most each (what the relayed end wrote crosses the slowed loopback to
# the server first: 12-20 s at load 20-30 over encrypted relays), the ends' helpers started.
SWAP_STAGE_TIMEOUT = 120.0
UNREACHABLE = "unreachable"  # an interruption: the swapped peer's node cut off
STREAM_END_TIMEOUT = 120.0  # what is left of a relayed stream at 10 MB/s, loaded


@contextlib.contextmanager
def echo_stream(
    node: Node,
    seed: int,
    size: int = STREAM_BYTES,
    server_args: tuple[str, ...] = (),
    client_args: tuple[str, ...] = (),
) -> Iterator[tuple[RunningFixture, RunningFixture]]:
    """(server, client): an echo_server in `node` (`server_args`) and a stream_client
    (`client_args`) echoing `size` bytes through it over the node's (slowed) loopback,
    under way."""
    shaped = node.run(
        ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", *LOOPBACK_SHAPE], timeout=10
    )
    assert shaped.returncode == 0, shaped.stderr
    with spawn_fixture("echo_server", *server_args, netns=node.netns) as server:
        stream = ("127.0.0.1", server.ready["port"], str(size), str(seed), *client_args)
        with spawn_fixture("stream_client", *stream, netns=node.netns) as client:
            yield server, client


def peers_of(pid: int) -> set[str]:
    """The peers ("ip:port") of the established TCP connections `pid` holds."""
    table = procfs.read_socket_table(pid)
    found = set()
    for entry in procfs.list_fds(pid):
        info = table.get(entry.ino) if entry.kind is procfs.FdKind.SOCKET else None
        if info is not None and info.type == socket.SOCK_STREAM and info.state == "ESTABLISHED":
            found.add(info.remote)
    return found


def stream_peer(pid: int, port: int | str) -> str:
    """The peer ("ip:port") of `pid`'s one established TCP connection from its port `port`."""
    table = procfs.read_socket_table(pid)
    found = [
        info.remote
        for entry in procfs.list_fds(pid)
        if entry.kind is procfs.FdKind.SOCKET
        and (info := table.get(entry.ino)) is not None
        and info.type == socket.SOCK_STREAM
        and info.state == "ESTABLISHED"
        and info.local.endswith(f":{port}")
    ]
    assert len(found) == 1, found
    return found[0]


def relayed_ids(node: Node, home_pid: int) -> list[str]:
    """The TCP connections the home shadow of `home_pid` relays (not its pipes)."""
    return [row["id"] for row in shadow_status(node, home_pid)["streams"] if row["original"]]


def test_a_moved_client_and_its_attached_server_are_joined_directly(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        # The server waits in epoll: its entry must follow the swapped socket.
        with echo_stream(a, seed=41, server_args=("0", "epoll")) as (server, client):
            a.hijack_ok("attach", server.pid)
            # Encrypted relays (the default): the swap drains the node's forwarder too.
            # Not swapped by the move itself (--no-swap): `hijack swap` does it.
            moved = move(a, client.pid, b, options=("--no-swap",))
            client.wait_exit()  # the original, killed by the move
            assert still_running(moved.pid), "the stream ended before the swap: too fast"
            assert len(relayed_ids(a, client.pid)) == 1
            listed = a.hijack_ok("swap", "--list")
            assert f"stream_client {moved.pid} on b" in listed.stdout, listed.describe()
            assert f"echo_server {server.pid} on a" in listed.stdout, listed.describe()
            # Where the migrant runs, the list points to its home node.
            elsewhere = b.hijack_ok("swap", "--list").stdout
            assert "swapped by their home node (a)" in elsewhere, elsewhere

            # `hijack status` marks the stream as one a swap can join directly.
            snapshot = json.loads(a.hijack_ok("status", "--json").stdout)
            (process,) = [p for p in snapshot["processes"] if p["pid"] == client.pid]
            streams = [s for s in process["shadow"]["streams"] if s["original"]]
            assert [s["swappable"] for s in streams] == [True], streams

            swapped = a.hijack_ok("swap", client.pid)
            print(swapped.stdout)
            assert "direct: " in swapped.stdout, swapped.describe()
            # The shadow relays nothing of it any more; the server talks to b itself.
            assert relayed_ids(a, client.pid) == [], f"{client.stderr}\n{server.stderr}"
            poll_until(
                lambda: any(peer.startswith("10.77.0.2:") for peer in peers_of(server.pid)),
                "the server's connection goes to node b",
            )
            # (Its control socket stays relayed: through the forwarder here, on loopback.)
            peers = {peer for peer in peers_of(moved.pid) if not peer.startswith("127.")}
            assert peers and all(peer.startswith("10.77.0.1:") for peer in peers), peers
            # It finishes there on its own: its own check of every byte echoed, in order.
            assert_ended_well(moved, "the swapped stream_client", tmp_path)
            server.assert_intact()


def bytes_from_process(node: Node, home_pid: int) -> int:
    """What the home shadow of `home_pid` has relayed from the process (moved away) of its
    TCP connection: it grows only while the process runs (towards the process the shadow
    fills its socket's buffers, megabytes, whether it runs or is held frozen)."""
    (row,) = [row for row in shadow_status(node, home_pid)["streams"] if row["original"]]
    return int(row["bytes_in"])


def tracer_of(pid: int) -> int:
    """The pid of the process tracing `pid` (its TracerPid), 0 if none or `pid` ended."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0  # ended
    line = next(line for line in status.splitlines() if line.startswith("TracerPid:"))
    return int(line.split(":", 1)[1])


def tracer_name(pid: int) -> str:
    """The name (comm) of the process tracing `pid`."""
    return Path(f"/proc/{tracer_of(pid)}/comm").read_text().strip()


def traced(pid: int) -> bool:
    """Whether `pid` is held by a tracer (a swap end's helper freezes it so)."""
    return tracer_of(pid) != 0


def goes_on_relayed(
    home: Node, home_pid: int, moved: Moved, what: str, client: RunningFixture, tmp_path: Path
) -> None:
    """The stream of `moved` (`home_pid` at `home`) is relayed by its home shadow and goes on
    after a swap given up: its process let go by the swap's helper (running, its old socket
    back), 1 MiB more relayed from it. A failure shows `client`'s stderr (the moved process's
    comes there through its shadow: a FAIL line says what it saw) and the nodes' logs."""
    assert relayed_ids(home, home_pid) == ["fd:3"], what
    poll_until(
        lambda: not still_running(moved.pid) or not traced(moved.pid),
        f"{what}: the swap's helper lets the process go",
        timeout=SWAP_STAGE_TIMEOUT,
    )
    before = bytes_from_process(home, home_pid)
    poll_until(
        lambda: (
            bytes_from_process(home, home_pid) > before + (1 << 20) or not still_running(moved.pid)
        ),
        f"{what}: the relayed stream goes on",
        timeout=60,
    )
    assert still_running(moved.pid), f"{what}: the stream ended\n{client.stderr}\n{logs(tmp_path)}"


# Where a swap is stopped, and how: a signal to `hijack swap` or its peer's node cut off.
Interruption = tuple[str, signal.Signals | str]


def interrupt_swaps(
    home: Node,
    node: Node,
    home_pid: int,
    moved: Moved,
    relays: str,
    interruptions: tuple[Interruption, ...],
    client: RunningFixture,
    tmp_path: Path,
) -> None:
    """`hijack swap` of the process `moved` to `node` (`home_pid` at `home`) stopped at each
    of `interruptions` (a stage and a signal, or `UNREACHABLE`: `node` cut off): each time
    it stays relayed and goes on."""
    for stage, interruption in interruptions:
        what = f"{node.name} unreachable" if interruption == UNREACHABLE else interruption
        assert still_running(moved.pid), "the stream ended before the swaps: too fast"
        started = time.monotonic()
        try:
            swapping = hijack_in(home, stage, "swap", home_pid, timeout=SWAP_STAGE_TIMEOUT)
        except AssertionError as exc:  # ended before its stage: the stream may have died
            raise AssertionError(f"{exc}\n{client.stderr}\n{logs(tmp_path)}") from None
        reached = time.monotonic() - started  # printed: how long its drains took
        if isinstance(what, str):
            link_down(node)
            deliver(swapping, signal.SIGCONT)
        else:
            deliver(swapping, what)
        result = finish(swapping)
        link_up(node)
        assert result.returncode != 0, f"{relays} {stage} {what}: {result.describe()}"
        # Relayed as before, and it goes on: its process runs (a move of it while the
        # swap's helper still held it would be refused).
        goes_on_relayed(home, home_pid, moved, f"{relays} {stage} {what}", client, tmp_path)
        print(
            f"{relays} {stage} (reached in {reached:.1f} s) {what}: relayed still,"
            f" {result.stderr.strip()}"
        )


def test_a_swap_interrupted_at_any_step_leaves_the_relayed_stream_working(
    tmp_path: Path,
) -> None:
    """Over plain relays, then (one stream, moved on) over an encrypted one."""
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        for node in cluster.nodes:  # a's daemon swaps for `hijack swap` run on c
            node.start_daemon()
        # The server waits in epoll: a swap undone after the join moves its entry back.
        epoll = ("0", "epoll")
        with echo_stream(a, seed=42, size=3 * STREAM_BYTES, server_args=epoll) as (
            server,
            client,
        ):
            a.hijack_ok("attach", server.pid)
            moved = move(a, client.pid, b, options=(*PLAIN, "--no-swap"))
            client.wait_exit()  # the original, killed by the move
            # Each stage and each kind of interruption once, the furthest stage over the
            # encrypted relay (its drains are the slow ones: 13-21 s under load).
            plain = (("swap-frozen", signal.SIGINT), ("swap-frozen", UNREACHABLE))
            interrupt_swaps(a, b, client.pid, moved, "plain", plain, client, tmp_path)
            # On to c (a move run where it runs, not swapped), its relay encrypted now.
            encrypted = ("--no-plain-relays", "--no-swap")
            moved = move(b, moved.pid, c, home=(a, client.pid), options=encrypted)
            interrupt_swaps(
                a,
                c,
                client.pid,
                moved,
                "encrypted",
                (("swap-joined", signal.SIGKILL),),
                client,
                tmp_path,
            )
            # Then a swap that is let through, asked where it runs: every byte, in order,
            # both ways.
            print(c.hijack_ok("swap", moved.pid).stdout)
            assert relayed_ids(a, client.pid) == []
            assert_ended_well(moved, "the stream_client swapped at last", tmp_path)
            server.assert_intact()


def test_a_swap_end_whose_coordinator_is_cut_off_lets_its_process_go(tmp_path: Path) -> None:
    """`hijack swap` stopped at `swap-frozen` (both ends frozen) and the moved end's node b
    cut off: no FIN or reset of the coordinator crosses a partition, and b's helper would
    hold the process frozen until the daemon's own timeout, or until the coordinator's FIN
    came through once the link is back (seen: 25 s later). The channel's keep-alive probes
    go unanswered: the helper lets the process go with its old socket, the link still
    down and the coordinator still stopped. Then the stream goes on, relayed, to its end."""
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        with echo_stream(a, seed=46, server_args=("0", "epoll")) as (server, client):
            a.hijack_ok("attach", server.pid)
            moved = move(a, client.pid, b, options=(*PLAIN, "--no-swap"))
            client.wait_exit()
            swapping = hijack_in(a, "swap-frozen", "swap", client.pid, timeout=SWAP_STAGE_TIMEOUT)
            try:
                assert traced(moved.pid), "the moved end is not frozen at swap-frozen"
                # A move refused meanwhile names the tracer: the swap's helper, by its name.
                assert tracer_name(moved.pid) == "hijack-swap-end"
                link_down(b)
                cut = time.monotonic()
                try:
                    poll_until(
                        lambda: "coordinator is gone" in daemon_log(b),
                        "b's helper gives its end up while its coordinator's node is cut off",
                        timeout=SWAP_STAGE_TIMEOUT,
                    )
                    said = daemon_log(b)
                    print(f"let go {time.monotonic() - cut:.1f} s after the link went down")
                    # Its coordinator's node silent, not the daemon's minute without a message.
                    assert "its node has not answered" in said, said
                    assert still_running(moved.pid), f"{client.stderr}\n{logs(tmp_path)}"
                    assert not traced(moved.pid), "b's helper still holds the process"
                finally:
                    link_up(b)
                deliver(swapping, signal.SIGCONT)
                result = finish(swapping)
            finally:
                if swapping.poll() is None:  # a failure above: the coordinator still stopped
                    swapping.kill()
                    swapping.communicate()
            assert result.returncode != 0, result.describe()
            assert "relayed still" in result.stdout, result.describe()
            goes_on_relayed(a, client.pid, moved, "a swap end let go", client, tmp_path)
            # Its own check of every byte echoed, in order (the rest at the slowed rate).
            wait_gone(moved.pid, STREAM_END_TIMEOUT, "the stream_client let go")
            code = exit_code_on(b, moved.pid)
            assert code == 0, f"ended with {code}\n{client.stderr}\n{logs(tmp_path)}"
            server.assert_intact()


def acked_between(node: Node, peer: str, port: int) -> int:
    """Bytes acknowledged on `node`'s established connection to `peer`'s address whose one
    end is the server's `port` (`ss -i`): the stream's, not another link the node has there
    (a daemon's, a relay's)."""
    return int(_acked_found(node, peer, port)[0])


def _acked_found(node: Node, peer: str, port: int) -> tuple[int, str]:
    """acked_between's count (0 unless exactly one connection matches) and what ss said."""
    ss = f"ss -tinH state established dst {peer} ( sport = :{port} or dport = :{port} )"
    completed = node.run(ss.split(), timeout=10)
    found = re.findall(r"bytes_acked:(\d+)", completed.stdout)
    return (int(found[0]) if len(found) == 1 else 0), completed.stdout


def connection_inode(pid: int, peer: str) -> int:
    """The inode of `pid`'s one established TCP connection to a peer starting `peer`."""
    table = procfs.read_socket_table(pid)
    found = [
        entry.ino
        for entry in procfs.list_fds(pid)
        if (info := table.get(entry.ino)) is not None
        and info.state == "ESTABLISHED"
        and info.remote.startswith(peer)
    ]
    assert len(found) == 1, found
    return found[0]


def assert_old_end_let_go(home: Node, server: RunningFixture, old_end: int, peer: str) -> None:
    """`server`, moved away from `home`, left nothing of its direct connection to `peer`
    (its old end: socket inode `old_end`) there: no copy kept by its shadow, no socket in
    FIN_WAIT or TIME_WAIT; a move home can make the connection again under its addresses."""
    shadow = shadow_pid_of(home, server.pid)
    assert old_end not in {entry.ino for entry in procfs.list_fds(shadow)}
    port = server.ready["port"]
    listed = home.run(["ss", "-tanH", "dst", peer, "sport", "=", f":{port}"], timeout=10)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.strip() == "", listed.stdout


# What a connection must carry without its home node, and how long it may take. A direct
# connection made again in repair mode under BBR can crawl for tens of seconds after a
# move (CI of 9d6b29b: 3.1 MB in 30 s at 80 Mbit/s, the restored end's BBR with no
# bandwidth sample and 155 kbit/s of pacing from a first RTT sample of 212 ms taken from
# a timestamp its old end had sent before the freeze; the other end in RTO backoff 6):
# a known problem (issue #17's notes), not what this checks: that it goes on at all.
WITHOUT_HOME_BYTES = 2 << 20
WITHOUT_HOME_TIMEOUT = 60.0


def goes_on_without(home: Node, node: Node, peer_node: Node, port: int) -> None:
    """With `home` cut off, WITHOUT_HOME_BYTES more are acknowledged on `node`'s connection
    to `peer_node` (the stream's: one end the server's `port`)."""
    peer = peer_node.address
    link_down(home)
    try:
        before = acked_between(node, peer, port)
        try:
            poll_until(
                lambda: acked_between(node, peer, port) > before + WITHOUT_HOME_BYTES,
                f"{WITHOUT_HOME_BYTES >> 20} MiB more acknowledged between {node.name} and"
                f" {peer} (port {port}) while {home.name} is cut off",
                timeout=WITHOUT_HOME_TIMEOUT,
            )
        except AssertionError as failed:
            # Both ends' TCP state: a stall seen once under load (CI of a12fb9f) showed c
            # in RTO backoff, its BBR pacing at 2.7 Gbit/s into the 80 Mbit/s link.
            said = _acked_found(node, peer, port)[1]
            theirs = _acked_found(peer_node, node.address, port)[1]
            raise AssertionError(
                f"{failed} (from {before}; ss on {node.name}: {said!r};"
                f" on {peer_node.name}: {theirs!r})"
            ) from None
    finally:
        link_up(home)  # the processes' pipes (stdout, stderr) are relayed through it


def swapped_counts(home: Node, pids: set[int]) -> dict[int, tuple[int, int]]:
    """pid -> (bytes to, from the process) its home shadow had relayed of each stream a
    swap took off its relay (`hijack status --json`: the shadow's `swapped`), once the
    shadow of each of `pids` answered (a busy one may miss the status's time limit)."""
    counts: dict[int, tuple[int, int]] = {}

    def answered() -> bool:
        snapshot = json.loads(home.hijack_ok("status", "--json").stdout)
        counts.clear()
        counts.update(
            (process["pid"], (row["bytes_to_process"], row["bytes_from_process"]))
            for process in snapshot["processes"]
            if process["shadow"]
            for row in process["shadow"]["swapped"]
        )
        return set(counts) == pids

    poll_until(answered, f"the shadows of {sorted(pids)} reporting their swapped streams")
    return counts


def test_two_migrants_joined_directly_by_the_move_outlive_their_home_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        b.start_daemon()
        c.start_daemon()
        with echo_stream(a, seed=43) as (server, client):
            moved_client = move(a, client.pid, b)  # the server is not managed: relayed
            client.wait_exit()
            assert still_running(moved_client.pid), "the stream ended before the swap: too fast"
            assert len(relayed_ids(a, client.pid)) == 1
            # Both ends relayed (encrypted) by their shadows at a: the server's move joins b
            # and c directly by itself, once the server runs at c.
            capsys.readouterr()
            moved_server = move(a, server.pid, c)
            server.wait_exit()
            said = capsys.readouterr().out
            print(said)
            assert re.search(r"swap: .* direct: 10\.77\.0\.\d:\d+ <-> 10\.77", said), said
            assert relayed_ids(a, client.pid) == []
            assert relayed_ids(a, server.pid) == []
            assert peers_of(moved_client.pid) & {f"10.77.0.3:{server.ready['port']}"}
            # The home shadows' counters of the stream stand still while it goes on.
            counts = swapped_counts(a, {client.pid, server.pid})
            goes_on_without(a, b, c, int(server.ready["port"]))  # b and c joined directly
            assert swapped_counts(a, {client.pid, server.pid}) == counts
            assert_ended_well(moved_client, "the stream_client, swapped", tmp_path)
            finish_moved(server, moved_server, tmp_path)  # it checked its own state: PASS


def shape_links(cluster: Cluster) -> None:
    """Every node's link slowed as its loopback: a direct connection is still under way."""
    for node in cluster.nodes:
        shaping = ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf", *LOOPBACK_SHAPE]
        shaped = node.run(shaping, timeout=10)
        assert shaped.returncode == 0, shaped.stderr


def unshape_links(cluster: Cluster) -> None:
    for node in cluster.nodes:
        unshaped = node.run(["tc", "qdisc", "del", "dev", "eth0", "root"], timeout=10)
        assert unshaped.returncode == 0, unshaped.stderr


def test_swapped_ends_move_on_and_their_connection_stays_direct(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        for node in cluster.nodes:  # a's daemon freezes the server for the client's moves
            node.start_daemon()
        shape_links(cluster)
        # 1 GiB: still under way after a swap and three moves at load 14 (it ran out at
        # 300 MiB); the shaping is taken off before the rest is waited for.
        with echo_stream(a, seed=44, size=1 << 30, server_args=("0", "epoll")) as (
            server,
            client,
        ):
            a.hijack_ok("attach", server.pid)
            moved = move(a, client.pid, b, options=(*PLAIN, "--swap"))
            client.wait_exit()
            # A later move given up (SIGINT) once both new ends exist: the old one goes on.
            endpoint = c.daemon_endpoint or ""
            moving = hijack_in(b, "move-prepared", "move", moved.pid, "--to", endpoint)
            deliver(moving, signal.SIGINT)
            assert finish(moving).returncode == 1
            assert all(peer.startswith("10.77.0.2:") for peer in peers_of(server.pid))
            # The client on to c, the server to b: each time the direct connection follows.
            moved = move(b, moved.pid, c, home=(a, client.pid))
            assert all(peer.startswith("10.77.0.3:") for peer in peers_of(server.pid))
            old_end = connection_inode(server.pid, "10.77.0.3:")
            moved_server = move(a, server.pid, b)
            server.wait_exit()
            assert_old_end_let_go(a, server, old_end, "10.77.0.3")
            assert still_running(moved.pid), "the stream ended before the last move: too fast"
            assert relayed_ids(a, client.pid) == relayed_ids(a, server.pid) == []
            assert f"10.77.0.2:{server.ready['port']}" in peers_of(moved.pid)
            goes_on_without(a, c, b, int(server.ready["port"]))
            # The server home again: its connection made again there, direct still (what
            # keeps its other descriptors relayed, and said so).
            capsys.readouterr()
            home_again = move(b, moved_server.pid, a, home=(a, server.pid))
            said = capsys.readouterr().out
            print(said)
            assert "direct (kept direct)" in said, said
            assert f"10.77.0.1:{server.ready['port']}" in peers_of(moved.pid)
            assert relayed_ids(a, server.pid) == []
            unshape_links(cluster)
            assert_ended_well(moved, "the stream_client moved twice", tmp_path)
            finish_moved(server, home_again, tmp_path)


def test_a_move_run_away_from_home_swaps_through_the_home_node(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue's moves, each run where the process runs: the client to b (its server not
    managed yet: relayed), then from b to c (node b asks the home node a to swap), the
    server to b (the direct connection follows)."""
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        for node in cluster.nodes:  # a's daemon swaps for the move run on b
            node.start_daemon()
            # Reno, not BBR (this machine's default; cubic is not allowed in a namespace
            # here): a connection made again in repair mode under BBR can crawl for
            # minutes after a move (WITHOUT_HOME_BYTES: a known problem, issue #17's
            # notes; CI of 9201d67 failed on it once more); this test checks the swaps.
            done = node.run(["sysctl", "-qw", "net.ipv4.tcp_congestion_control=reno"], timeout=10)
            assert done.returncode == 0, done.stderr
        shape_links(cluster)
        with echo_stream(a, seed=45, size=1 << 30, server_args=("0", "epoll")) as (
            server,
            client,
        ):
            moved = move(a, client.pid, b)  # encrypted relays; the server is not managed
            client.wait_exit()
            assert len(relayed_ids(a, client.pid)) == 1
            # `hijack swap` on b asks a, where its shadow is; a has nothing to join yet.
            refused = refusal_line(b.hijack("swap", moved.pid))
            assert "its home node a: " in refused and str(client.pid) in refused, refused
            a.hijack_ok("attach", server.pid)
            capsys.readouterr()
            moved = move(b, moved.pid, c, home=(a, client.pid))
            said = capsys.readouterr().out
            print(said)
            assert re.search(r"swap: .* direct: 10\.77\.0\.\d:\d+ <-> 10\.77", said), said
            assert relayed_ids(a, client.pid) == []
            assert all(peer.startswith("10.77.0.3:") for peer in peers_of(server.pid))
            old_end = connection_inode(server.pid, "10.77.0.3:")
            moved_server = move(a, server.pid, b)
            server.wait_exit()
            assert_old_end_let_go(a, server, old_end, "10.77.0.3")
            assert still_running(moved.pid), "the stream ended before the last move: too fast"
            assert relayed_ids(a, client.pid) == relayed_ids(a, server.pid) == []
            assert f"10.77.0.2:{server.ready['port']}" in peers_of(moved.pid)
            goes_on_without(a, c, b, int(server.ready["port"]))
            unshape_links(cluster)
            assert_ended_well(moved, "the stream_client swapped from away", tmp_path)
            finish_moved(server, moved_server, tmp_path)


def test_a_tree_whose_member_holds_a_swapped_connection_moves_with_it_direct(
    tmp_path: Path,
) -> None:
    """A stream_client's child streams to an echo server; the tree attached, the server
    moved (and swapped) to b: the child's connection is direct. The tree's move is given
    up once prepared (every member and the peer run on, as before), then the tree moves
    to c and on to b: each time the connection follows the child, direct, the server
    untouched; the home shadows relay none of it; the stream is complete both ways."""
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        for node in cluster.nodes:  # b's daemon freezes the server for the tree's moves
            node.start_daemon()
        shape_links(cluster)
        fork = ("fork",)  # the stream is the child's
        with echo_stream(
            a, seed=45, size=1 << 30, server_args=("0", "epoll"), client_args=fork
        ) as (server, client):
            poll_until(lambda: len(read_tree(client.pid).members) == 2, "the client's child")
            child = read_tree(client.pid).members[1].pid
            port, child_port = server.ready["port"], client.ready["local_port"]
            a.hijack_ok("attach", client.pid)  # the tree: its one shadow holds its originals
            moved_server = move(a, server.pid, b, options=(*PLAIN, "--swap"))
            server.wait_exit()
            assert relayed_ids(a, server.pid) == []
            assert stream_peer(child, child_port).startswith("10.77.0.2:")
            counts = swapped_counts(a, {server.pid})
            # Given up once the destination prepared it: every member runs on, the server's
            # end is its old one again (towards a), nothing lost.
            endpoint = c.daemon_endpoint or ""
            moving = hijack_in(a, "move-prepared", "move", client.pid, "--to", endpoint)
            deliver(moving, signal.SIGINT)
            given_up = finish(moving)
            assert given_up.returncode == 1, given_up.describe()
            assert list(read_tree(client.pid).pids) == [client.pid, child]
            assert stream_peer(moved_server.pid, port).startswith("10.77.0.1:")
            # The tree to c, then on to b (where the server runs): the connection follows.
            there, _ = move_tree(a, client.pid, c)
            client.wait_exit()
            assert stream_peer(moved_server.pid, port).startswith("10.77.0.3:")
            goes_on_without(a, b, c, int(port))  # the server and the child, directly
            there, _ = move_tree(c, there, b)
            (child_there,) = read_tree(there).pids[1:]
            assert stream_peer(child_there, child_port).startswith("10.77.0.2:")
            assert stream_peer(moved_server.pid, port).startswith("10.77.0.2:")
            # Neither home shadow relayed any of it: none relays a TCP connection, the
            # server's counters of the stream stand where its swap left them.
            assert relayed_ids(a, client.pid) == relayed_ids(a, server.pid) == []
            assert swapped_counts(a, {server.pid}) == counts
            unshape_links(cluster)
            shadow_pid = int(shadow_status(a, client.pid)["shadow_pid"])
            tree = Moved(there, b, 0.0, shadow_pid)
            assert_ended_well(tree, "the stream_client's tree moved twice", tmp_path)
            finish_moved(server, moved_server, tmp_path)
