"""`hijack move --packet-relays`: a process's TCP connections to another machine go on
through its home node's IP layer (hijack.node.packet_relay, hijack.sys.packet_route).

Three nodes: the stream_client fixture starts on node a, streaming to an echo server on
node c (a peer hijack does not manage, on another machine), and moves to b mid-stream.
The peer's connection keeps its addresses; the moved process's bytes pass a's IP
layer, not its shadow; the fixture checks every echoed byte itself.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import RunningFixture, spawn_fixture
from support.nodes import Cluster, Node, read_line
from test_faults import deliver, finish, hijack_in
from test_move import (
    LINE_TIMEOUT,
    Moved,
    assert_ended_well,
    move,
    move_refused,
    poll_until,
    shadow_status,
    start_daemon_with,
    wait_released,
)
from test_swap import acked_between

STREAM_BYTES = 64 << 20
SWEEP_WAIT = 20.0  # the daemon looks for ended connections every 5 s

# An echo server on every address of its node: prints its port, then echoes each
# connection back to it until it ends.
ECHO_PEER = """\
import socket, sys, threading
listener = socket.create_server(("0.0.0.0", 0))
print(listener.getsockname()[1], flush=True)
def echo(conn):
    with conn:
        while data := conn.recv(1 << 16):
            conn.sendall(data)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""


def forwarded(node: Node) -> int:
    """Packets `node`'s IP layer forwarded (ForwDatagrams of its /proc/net/snmp)."""
    done = node.run(["cat", "/proc/net/snmp"], timeout=10)
    names, values = [line.split() for line in done.stdout.splitlines() if line.startswith("Ip:")]
    return int(values[names.index("ForwDatagrams")])


def forwarding_on(node: Node) -> None:
    for setting in ("net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0"):
        done = node.run(["sysctl", "-qw", setting], timeout=10)
        assert done.returncode == 0, done.stderr


def connections(node: Node, port: int) -> list[str]:
    """`ss` rows of `node`'s established TCP connections to or from `port`."""
    done = node.run(["ss", "-tnH", "state", "established"], timeout=10)
    return [line for line in done.stdout.splitlines() if f":{port} " in f"{line} "]


def route_tables(node: Node) -> list[str]:
    """The nftables tables of relays by packets (and their holds) in `node`."""
    done = node.run([sys.executable, "-c", TABLES], timeout=10)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def policy_rules(node: Node) -> list[str]:
    """`node`'s policy routing rules sending a connection through a home node."""
    done = node.run(["ip", "-4", "rule", "show", "pref", "1000"], timeout=10)
    return done.stdout.splitlines()


TABLES = "from hijack.sys import packet_route; print(*packet_route.tables())"
GENERATIONS = """\
from hijack.sys import netlock, packet_route
nft = netlock.nftables_socket(netlock.NFPROTO_IPV4)
for rule in nft.get_rules():
    if rule.get_attr("NFTA_RULE_TABLE").startswith(packet_route.ROUTE_PREFIX):
        print(rule.get_attr("NFTA_RULE_USERDATA"))
"""


def rewrite_generations(node: Node) -> set[str]:
    """The generations ("hijack N") of the rewrites' rules in `node`: one once a later
    move's freeze is over (the superseded ones removed)."""
    done = node.run([sys.executable, "-c", GENERATIONS], timeout=10)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.splitlines())


@contextlib.contextmanager
def echo_peer(node: Node) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """ECHO_PEER in `node`, stopped: (process, port). Stopped, its kernel takes a connection
    and what fits in its buffers: a stream to it is under way and cannot end until it is let
    go on (SIGCONT)."""
    peer = node.spawn([sys.executable, "-c", ECHO_PEER], stdout=subprocess.PIPE)
    try:
        port = int(read_line(peer, LINE_TIMEOUT))
        peer.send_signal(signal.SIGSTOP)
        yield peer, port
    finally:
        peer.kill()
        peer.wait()


@contextlib.contextmanager
def stream_to_peer(
    home: Node, peer_node: Node, seed: int, *extra: str
) -> Iterator[tuple[subprocess.Popen[bytes], int, RunningFixture]]:
    """(the echo peer, its port, the stream_client): the fixture on `home` streaming to an
    echo peer on `peer_node`, stopped (the stream under way, it cannot end meanwhile)."""
    with echo_peer(peer_node) as (peer, port):
        stream = (peer_node.address, str(port), str(STREAM_BYTES), str(seed), *extra)
        with spawn_fixture("stream_client", *stream, netns=home.netns) as client:
            poll_until(
                lambda: acked_between(home, peer_node.address, port) > 0,
                f"the stream to {peer_node.name} under way",
            )
            yield peer, port, client


def goes_on_from(node: Node, peer_node: Node, port: int, peer: subprocess.Popen[bytes]) -> None:
    """The stream, let go on, carries 1 MiB from `node` (where the client runs now); its
    peer is stopped again after."""
    peer.send_signal(signal.SIGCONT)
    poll_until(
        lambda: acked_between(node, peer_node.address, port) > 1 << 20, f"on from {node.name}"
    )
    peer.send_signal(signal.SIGSTOP)


def ends_at(node: Node, own_port: int) -> list[str]:
    """The local ends ("ip:port") of `node`'s established connections on `own_port`."""
    return [row.split()[-2] for row in connections(node, own_port)]


def port_of(row: str, column: int) -> int:
    return int(row.split()[column].rpartition(":")[2])


def test_a_stream_moved_with_packet_relays_goes_on_through_the_home_node(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        b.start_daemon()
        a.start_daemon()  # asked by b's to stop rewriting the connection once it ended
        forwarding_on(a)
        with stream_to_peer(a, c, 31) as (peer, port, client):
            before = connections(c, port)
            assert len(before) == 1, before
            through_a = forwarded(a)
            moved = move(a, client.pid, b, options=("--packet-relays",))
            peer.send_signal(signal.SIGCONT)
            # Its connection is b's now, to the same peer, from the same port.
            mine = connections(b, port_of(before[0], -1))
            assert [row.split()[-1] for row in mine] == [f"{c.address}:{port}"], mine
            assert len(policy_rules(b)) == 1, policy_rules(b)
            # Both nodes' status say so: b runs it, a rewrites it.
            routed = json.loads(b.hijack_ok("status", "--json").stdout)["routed"]
            assert [(r["local"], r["remote"], r["home_node"]) for r in routed] == [
                (f"{b.address}:{port_of(before[0], -1)}", f"{c.address}:{port}", "a")
            ], routed
            tables = json.loads(a.hijack_ok("status", "--json").stdout)["packet_tables"]
            assert [name.split("_")[1] for name in tables] == ["route"], tables
            assert "relayed by packets" in b.hijack_ok("status").stdout
            client.wait_exit()  # the original, killed by the move
            assert_ended_well(moved, "the stream_client moved with packet relays", tmp_path)
            wait_released(moved)
            assert client.stdout == f"streamed {STREAM_BYTES} bytes\nPASS stream_client\n"
            # The peer saw one connection all along, and a forwarded the rest of it.
            assert connections(c, port) == [] or port_of(connections(c, port)[0], -1) == (
                port_of(before[0], -1)
            )
            assert forwarded(a) - through_a > STREAM_BYTES // 65536
            # Ended, its rules go: b's daemon looks every few seconds.
            poll_until(lambda: not policy_rules(b), "b's rule removed", SWEEP_WAIT)
            poll_until(lambda: not route_tables(a), "a's rewrites removed", SWEEP_WAIT)


def test_a_stream_relayed_by_packets_moves_on_and_home_again(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=4) as cluster:
        a, b, c, d = cluster.nodes
        b.start_daemon()
        d.start_daemon()
        a.start_daemon()
        forwarding_on(a)
        with stream_to_peer(a, c, 32) as (peer, port, client):
            own_port = port_of(connections(c, port)[0], -1)
            at_b = move(a, client.pid, b, options=("--packet-relays",))
            goes_on_from(b, c, port, peer)
            at_d = move(b, at_b.pid, d, home=(a, client.pid))
            assert ends_at(d, own_port) == [f"{d.address}:{own_port}"]
            assert policy_rules(b) == [] and len(policy_rules(d)) == 1
            poll_until(lambda: rewrite_generations(a) == {"hijack 2"}, "a's old rewrites gone")
            goes_on_from(d, c, port, peer)
            home = move(d, at_d.pid, a, home=(a, client.pid))
            # Home again: its own address, nothing rewritten, no rule anywhere.
            assert ends_at(a, own_port) == [f"{a.address}:{own_port}"]
            assert route_tables(a) == [] and policy_rules(d) == []
            peer.send_signal(signal.SIGCONT)
            client.wait_exit()
            assert_ended_well(home, "the stream_client moved home again", tmp_path)
            assert client.stdout == f"streamed {STREAM_BYTES} bytes\nPASS stream_client\n"


def test_a_tree_whose_child_streams_moves_by_packets_and_home_again(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        b.start_daemon()
        a.start_daemon()
        forwarding_on(a)
        # The connection is the child's: the tree moves as one, its child's stream by packets.
        with stream_to_peer(a, c, 34, "fork") as (peer, port, client):
            own_port = port_of(connections(c, port)[0], -1)
            at_b = move(a, client.pid, b, options=("--packet-relays",))
            assert ends_at(b, own_port) == [f"{b.address}:{own_port}"]
            goes_on_from(b, c, port, peer)
            home = move(b, at_b.pid, a, home=(a, client.pid))
            assert route_tables(a) == [] and policy_rules(b) == []
            peer.send_signal(signal.SIGCONT)
            client.wait_exit()
            assert_ended_well(home, "the stream_client's tree home again", tmp_path)
            assert client.stdout == f"streamed {STREAM_BYTES} bytes\nPASS stream_client\n"


def test_a_move_by_packets_that_fails_leaves_the_connection_going_on_at_home(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        # Found out only once the process is made there, its connection made in repair
        # mode and routed: after a has held and rewritten it.
        (tmp_path / "a-file").write_text("not a directory\n")
        start_daemon_with(b, "HIJACK_STATE_DIR", str(tmp_path / "a-file"))
        forwarding_on(a)
        with stream_to_peer(a, c, 33) as (peer, _, client):
            line = move_refused(a, client.pid, b, "--packet-relays")
            assert "did not run the process" in line or "state registry" in line, line
            assert route_tables(a) == [] and policy_rules(b) == []
            peer.send_signal(signal.SIGCONT)
            client.assert_intact()  # every byte echoed, at home
            assert client.stdout == f"streamed {STREAM_BYTES} bytes\nPASS stream_client\n"


@pytest.mark.parametrize("stage", ["move-prepared", "move-committed"])
def test_a_mover_killed_mid_move_by_packets_is_settled_by_recover(
    tmp_path: Path, stage: str
) -> None:
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        b.start_daemon()
        forwarding_on(a)
        assert b.daemon_endpoint is not None
        with stream_to_peer(a, c, 35) as (peer, _, client):
            mover = hijack_in(
                a, stage, "move", client.pid, "--to", b.daemon_endpoint, "--packet-relays"
            )
            deliver(mover, signal.SIGKILL)
            assert finish(mover).returncode == -signal.SIGKILL
            recovered = a.hijack("recover")
            assert recovered.returncode == 0, recovered.describe()
            # Committed: it runs on b, the original ended; else on at home.
            said = "the original here was ended" if stage == "move-committed" else "runs on"
            assert said in recovered.stdout, recovered.describe()
            assert [name.split("_")[1] for name in route_tables(a)] == (
                ["route"] if stage == "move-committed" else []
            )
            peer.send_signal(signal.SIGCONT)
            if stage == "move-committed":
                client.wait_exit()
                moved_pid = int(recovered.stdout.split(" as ")[1].split(";")[0])
                shadow = shadow_status(a, client.pid)["shadow_pid"]
                moved = Moved(moved_pid, b, 0.0, shadow)
                assert_ended_well(moved, "the stream_client recovered on b", tmp_path)
            else:
                client.assert_intact()  # every byte echoed, at home
            assert client.stdout == f"streamed {STREAM_BYTES} bytes\nPASS stream_client\n"


# Run inside a node: one `route` request to the daemon at HOST:PORT, as a cluster node.
ROUTE_REQUEST = """\
import sys
from hijack.node import pki
from hijack.node.channel import Channel
host, port, origin, peer, to = sys.argv[1:6]
channel = Channel.connect((host, int(port)), pki.load_identity())
channel.send({"op": "route", "origin": origin, "peer": peer, "hold": True, "to": to})
print(channel.receive())
"""


def test_no_node_can_have_a_connection_of_the_home_node_redirected(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        a.start_daemon()
        forwarding_on(a)
        assert a.daemon_endpoint is not None
        with stream_to_peer(a, c, 36) as (peer, port, client):
            own = f"{a.address}:{port_of(connections(c, port)[0], -1)}"
            host, daemon_port = a.daemon_endpoint.split(":")
            asked = b.run_python(
                ROUTE_REQUEST, host, daemon_port, own, f"{c.address}:{port}", b.address
            )
            assert "is not relayed here" in asked.stdout, asked.stdout + asked.stderr
            assert route_tables(a) == []
            peer.send_signal(signal.SIGCONT)
            client.assert_intact()


def test_packet_relays_are_refused_where_this_node_does_not_forward(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        a.run(["sysctl", "-qw", "net.ipv4.ip_forward=0"], timeout=10)
        with spawn_fixture("echo_server", netns=a.netns) as server:
            result = a.hijack("move", server.pid, "--to", b.daemon_endpoint or "",
                              "--packet-relays")  # fmt: skip
            assert result.returncode == 1, result.describe()
            assert "does not forward IPv4" in result.stderr, result.describe()
            assert "Traceback" not in result.stderr
            server.close_control()
            server.assert_intact()
