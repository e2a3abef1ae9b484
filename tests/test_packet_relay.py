"""`hijack move --packet-relays`: a process's TCP connections to another machine go on
through its home node's IP layer (hijack.node.packet_relay, hijack.sys.packet_route).

Three nodes: the stream_client fixture starts on node a, streaming to an echo server on
node c (a peer hijack does not manage, on another machine), and moves to b mid-stream.
The peer's connection keeps its addresses; the moved process's bytes pass a's IP
layer, not its shadow; the fixture checks every echoed byte itself.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from support import spawn_fixture
from support.nodes import Cluster, Node, read_line
from test_move import LINE_TIMEOUT, assert_ended_well, move, poll_until, wait_released
from test_swap import acked_between

STREAM_BYTES = 64 << 20

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


def test_a_stream_moved_with_packet_relays_goes_on_through_the_home_node(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        b.start_daemon()
        forwarding_on(a)
        peer = c.spawn([sys.executable, "-c", ECHO_PEER], stdout=subprocess.PIPE)
        port = int(read_line(peer, LINE_TIMEOUT))
        # Stopped, the peer's kernel takes the connection and what fits in its buffers:
        # the stream is under way and cannot end before the move.
        peer.send_signal(signal.SIGSTOP)
        stream = (c.address, str(port), str(STREAM_BYTES), "31")
        with spawn_fixture("stream_client", *stream, netns=a.netns) as client:
            poll_until(
                lambda: acked_between(a, c.address, port) > 0, "the stream to node c under way"
            )
            before = connections(c, port)
            assert len(before) == 1, before
            through_a = forwarded(a)
            moved = move(a, client.pid, b, options=("--packet-relays",))
            peer.send_signal(signal.SIGCONT)
            # Its connection is b's now, to the same peer, from the same port.
            mine = connections(b, int(before[0].split()[-1].rpartition(":")[2]))
            assert [row.split()[-1] for row in mine] == [f"{c.address}:{port}"], mine
            client.wait_exit()  # the original, killed by the move
            assert_ended_well(moved, "the stream_client moved with packet relays", tmp_path)
            wait_released(moved)
            assert client.stdout == f"streamed {STREAM_BYTES} bytes\nPASS stream_client\n"
            # The peer saw one connection all along, and a forwarded the rest of it.
            assert forwarded(a) - through_a > STREAM_BYTES // 65536
        peer.kill()
        peer.wait()


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
