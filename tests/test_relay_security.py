"""Relays between nodes: who may open one, who can read one, who can reach a moved listener.

After a move, a process's connections are relayed between the home shadow
and its new node (docs/protocol.md, "The shadow's TCP endpoint"). These tests
stand where an attacker stands: on another node knowing the shadow's port,
on the link with a packet socket, next to the moved process's listener.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from support import RunningFixture, spawn_fixture
from support.nodes import Cluster, Node, read_line, spawn_in_namespace
from test_move import (
    LINE_TIMEOUT,
    Moved,
    ask,
    finish_moved,
    move,
    shadow_status,
    spawn_python,
)
from test_nodes import ECHO_SESSION

from hijack.node import pki
from hijack.registry import Registry
from hijack.shadow.door import HANDSHAKE_TIMEOUT, MAX_PENDING, Door
from hijack.shadow.relay_link import ShadowIdentity, cluster_trust

# Tries, from another node, to open a relay to the shadow at HOST:PORT without its
# token: one line each, "NAME refused ..." or "NAME ACCEPTED".
STRANGER = """\
import os, socket, ssl, sys
from hijack.shadow import control
host, port, fingerprint, other_ca = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

def attempt(name, try_it):
    try:
        try_it()
        print(name, "ACCEPTED", flush=True)
    except Exception as exc:
        print(name, "refused", type(exc).__name__, flush=True)

def no_tls():  # the pre-TLS protocol: a guessed proof and a header
    with socket.create_connection((host, port), timeout=5) as sock:
        header = b'{"kind":"relay","stream":"fd:3"}'
        sock.sendall(os.urandom(32) + len(header).to_bytes(4, "little") + header)
        answer = sock.recv(64)
        if b"RLY1" not in answer:
            raise ConnectionError(f"answered {answer!r}")

def tls_with(certificate_dir):
    def connect():
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if certificate_dir:
            node = f"{certificate_dir}/nodes/c"
            context.load_cert_chain(f"{node}.crt", f"{node}.key")
        with socket.create_connection((host, port), timeout=5) as raw:
            with context.wrap_socket(raw) as tls:
                nonce = tls.recv(16)  # a refused certificate comes back as an alert here
                if len(nonce) != 16:
                    raise ConnectionError("no nonce")
                tls.sendall(os.urandom(32))  # a guessed proof
                if tls.recv(4) == b"":
                    raise ConnectionError("closed")
    return connect

def wrong_token():  # a cluster node's own certificate, the shadow's pinned one, no token
    home = control.HomeEndpoint(f"{host}:{port}", os.urandom(32), fingerprint)
    control.open_link(home, {"kind": "relay", "stream": "fd:3", "move": "x", "mode": "plain"})

attempt("no-tls", no_tls)
attempt("no-certificate", tls_with(""))
attempt("another-ca", tls_with(other_ca))
attempt("wrong-token", wrong_token)
"""

# Captures every frame on the interfaces of the namespace it runs in (the hub's
# bridge and the hub's ends of the nodes' veths) into FILE until its stdin ends. A
# frame is queued to it as it crosses the hub, before it reaches the other node: what
# an answer came back through is queued by the time the answer is read, and is read
# here even if stdin ends first (a capture that lagged lost the last exchanges).
CAPTURE = """\
import select, socket, sys
capture = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
capture.setsockopt(socket.SOL_SOCKET, 33, 64 << 20)  # SO_RCVBUFFORCE: bursts of fragments
print("capturing", flush=True)
with open(sys.argv[1], "wb") as out:
    while sys.stdin not in select.select([capture, sys.stdin], [], [])[0]:
        out.write(capture.recv(1 << 16))
    capture.setblocking(False)
    try:
        while True:
            out.write(capture.recv(1 << 16))
    except BlockingIOError:
        pass
"""

# Connects to HOST PORT: "connected", or the error's name.
PROBE = """\
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
    print("connected", flush=True)
except OSError as exc:
    print(type(exc).__name__, flush=True)
"""

MARKER = "relayed-secret-7f3a9c41d2e8b605"


def endpoint_of(home: Node, home_pid: int) -> tuple[str, int, str]:
    """(address, port, certificate fingerprint) of the home shadow's TCP endpoint."""
    status = shadow_status(home, home_pid)
    with Registry(home.state_dir) as registry:
        record = registry.get(home_pid)
    assert record.relay_cert, record
    return home.address, int(status["endpoint_port"]), record.relay_cert


def test_a_stranger_who_knows_the_shadows_port_opens_no_relay_and_streams_go_on(
    tmp_path: Path,
) -> None:
    other_ca = tmp_path / "other-ca"
    pki.init_ca(other_ca, name="another cluster")
    pki.add_node(other_ca, "c")
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        b.start_daemon()
        with spawn_fixture("echo_server", netns=a.netns) as server:
            # A client's connection, relayed once the server moved: it must not notice.
            session = spawn_python(a, ECHO_SESSION, "127.0.0.1", server.ready["port"])
            assert read_line(session, LINE_TIMEOUT) == "connected"
            assert ask(session, "before") == "before"
            moved = move(a, server.pid, b)
            server.wait_exit()
            assert ask(session, "moved") == "moved"
            host, port, fingerprint = endpoint_of(a, server.pid)
            stranger = spawn_python(c, STRANGER, host, str(port), fingerprint, str(other_ca))
            lines = [read_line(stranger, LINE_TIMEOUT) for _ in range(4)]
            stranger.wait(LINE_TIMEOUT)
            print("\n".join(lines))
            for name, line in zip(
                ("no-tls", "no-certificate", "another-ca", "wrong-token"), lines, strict=True
            ):
                assert line.startswith(f"{name} refused"), lines
            assert ask(session, "after") == "after"  # the same connection, untouched
            assert session.stdin is not None
            session.stdin.close()
            assert session.wait(LINE_TIMEOUT) == 0
            output = finish_moved(server, moved, tmp_path)
        assert "over 1 connections" in output  # no stranger's relay reached it
        shadow_log = (a.state_dir / "shadows" / str(server.pid) / "shadow.log").read_text()
        assert shadow_log.count("refused a connection") >= 4, shadow_log


# Asks the home shadow its status as a node holding the migrant's token: "ok" or the error.
ASK_STATUS = """\
import sys
from hijack.shadow import control
home = control.HomeEndpoint(sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3])
try:
    control.remote_request(home, {"op": "status"}, timeout=5)
    print("ok", flush=True)
except Exception as exc:
    print(type(exc).__name__, exc, flush=True)
"""


def moved_with_its_relay(a: Node, b: Node, server: RunningFixture) -> tuple[Moved, tuple[str, ...]]:
    """`server` moved from a to b: its move, and how its home shadow's relay is reached
    (address, token, certificate: what a mover on b is given)."""
    moved = move(a, server.pid, b)
    server.wait_exit()
    with Registry(a.state_dir) as registry:
        record = registry.get(server.pid)
    assert record.relay_address and record.relay_token and record.relay_cert
    return moved, (record.relay_address, record.relay_token, record.relay_cert)


def test_a_revoked_node_is_refused_even_with_the_token(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        b.start_daemon()
        pki.revoke(cluster.pki_dir, "c")  # before the move: the shadow gets the new list
        with spawn_fixture("echo_server", netns=a.netns) as server:
            moved, arguments = moved_with_its_relay(a, b, server)
            assert read_line(spawn_python(b, ASK_STATUS, *arguments), LINE_TIMEOUT) == "ok"
            refused = read_line(spawn_python(c, ASK_STATUS, *arguments), LINE_TIMEOUT)
            assert refused.startswith("ShadowError") and "revoked" in refused.lower(), refused
            finish_moved(server, moved, tmp_path)
        shadow_log = (a.state_dir / "shadows" / str(server.pid) / "shadow.log").read_text()
        assert "its certificate is refused: certificate revoked" in shadow_log, shadow_log


# As a mover before its freeze (hijack.node.move.HomeShadow.prove_links): two connections
# proved ahead, a status asked on the first, the second closed before its header.
PROVED_AHEAD = """\
import sys
from hijack.shadow import control
home = control.HomeEndpoint(sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3])
used, unused = control.prove_link(home), control.prove_link(home)
print(sorted(control.remote_request(home, {"op": "status"}, proved=used)), flush=True)
unused.sock.close()
print("done", flush=True)
"""


def test_a_connection_proved_ahead_carries_a_later_request_and_closes_quietly(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        with spawn_fixture("echo_server", netns=a.netns) as server:
            moved, arguments = moved_with_its_relay(a, b, server)
            asking = spawn_python(b, PROVED_AHEAD, *arguments)
            assert "'streams'" in read_line(asking, LINE_TIMEOUT)
            assert read_line(asking, LINE_TIMEOUT) == "done"
            assert asking.wait(LINE_TIMEOUT) == 0
            # The shadow serves on: a request after the closed one is answered.
            assert read_line(spawn_python(b, ASK_STATUS, *arguments), LINE_TIMEOUT) == "ok"
            finish_moved(server, moved, tmp_path)
        shadow_log = (a.state_dir / "shadows" / str(server.pid) / "shadow.log").read_text()
        assert "refused a connection" not in shadow_log, shadow_log


def test_the_moved_listener_takes_only_the_home_shadows_clients(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        b.start_daemon()
        with spawn_fixture("echo_server", netns=a.netns) as server:
            port = server.ready["port"]
            moved = move(a, server.pid, b)
            server.wait_exit()
            (listener,) = [
                s["listener"] for s in shadow_status(a, server.pid)["streams"] if s["listener"]
            ]
            host, _, listener_port = listener.rpartition(":")
            assert host == "127.0.0.1", listener  # not on the node's network address
            # Its backlog is the process's own (echo_server listens with 64).
            listening = b.run(["ss", "-ltnH", f"sport = :{listener_port}"], timeout=10).stdout
            assert listening.split()[2] == "64", listening
            # From another node: nothing listens there on the network.
            remote = spawn_python(c, PROBE, b.address, listener_port)
            assert read_line(remote, LINE_TIMEOUT) == "ConnectionRefusedError"
            # On its own node, a process without the forwarder's mark is dropped.
            local = spawn_python(b, PROBE, "127.0.0.1", listener_port)
            assert read_line(local, LINE_TIMEOUT) == "TimeoutError"
            # The home address still reaches it, through the shadow.
            with spawn_fixture(
                "stream_client", "127.0.0.1", port, str(1 << 20), "41", netns=a.netns
            ) as client:
                client.assert_intact()
            output = finish_moved(server, moved, tmp_path)
        assert "over 1 connections" in output  # neither stranger got in


@contextlib.contextmanager
def capturing(cluster: Cluster, frames: Path) -> Iterator[None]:
    """Every frame between the nodes into `frames` while inside."""
    capture = spawn_in_namespace(
        cluster.hub_netns,
        [sys.executable, "-c", CAPTURE, frames],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert read_line(capture, LINE_TIMEOUT) == "capturing"
        yield
    finally:
        assert capture.stdin is not None
        capture.stdin.close()
        capture.wait(LINE_TIMEOUT)


def captured_after_a_move(tmp_path: Path, *options: str) -> bytes:
    """Every frame between the nodes while a moved echo_server echoes MARKER to a client."""
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        with spawn_fixture("echo_server", netns=a.netns) as server:
            session = spawn_python(a, ECHO_SESSION, "127.0.0.1", server.ready["port"])
            assert read_line(session, LINE_TIMEOUT) == "connected"
            moved = move(a, server.pid, b, options=options)
            server.wait_exit()
            frames = tmp_path / "frames"
            with capturing(cluster, frames):
                for _ in range(3):
                    assert ask(session, MARKER) == MARKER
            assert session.stdin is not None
            session.stdin.close()
            assert session.wait(LINE_TIMEOUT) == 0
            finish_moved(server, moved, tmp_path)
        seen = frames.read_bytes()
        # Three lines there and back: six frames, each 66 bytes of headers (Ethernet,
        # IPv4, TCP with timestamps) and the line at least, in clear or sealed;
        # every one captured (ACKs may ride on them, or come later: not counted).
        sent = 6 * (66 + len(MARKER) + 1)
        assert len(seen) >= sent, f"{len(seen)} bytes captured between the nodes, not {sent}"
        os.unlink(frames)
        return seen


def test_relayed_bytes_between_nodes_are_encrypted(tmp_path: Path) -> None:
    seen = captured_after_a_move(tmp_path)
    assert MARKER.encode() not in seen


def test_plain_relays_carry_the_bytes_as_they_are(tmp_path: Path) -> None:
    seen = captured_after_a_move(tmp_path, "--plain-relays")
    assert MARKER.encode() in seen


# A peer of udp_echo's two sockets (the second connects to its first sender: here, after
# the move, a stand-in of the forwarder when encrypted): for each stdin line, datagrams
# of several sizes that start with MARKER, to each; each echo must come back whole, in
# order, from where it went. "ok N", or "FAIL why".
MARKED_PEER = """import socket, sys
port, connected_port, marker = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
bound = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
bound.connect(("127.0.0.1", connected_port))
for sock in (plain, bound):
    sock.settimeout(5)
SIZES = (len(marker), 1400, 9000, 65507)
for number, line in enumerate(sys.stdin):
    count = 0
    for sock, target in ((plain, ("127.0.0.1", port)), (bound, ("127.0.0.1", connected_port))):
        burst = [(marker + str(number).encode() * size)[:size] for size in SIZES]
        for payload in burst:
            sock.sendto(payload, target)
        for payload in burst:
            try:
                echo, sender = sock.recvfrom(65536)
            except OSError as error:
                print(f"FAIL no echo of {len(payload)} bytes from {target}: {error}", flush=True)
                sys.exit(1)
            if echo != payload or sender[:2] != target:
                print(f"FAIL {len(echo)} bytes from {sender} for {len(payload)}", flush=True)
                sys.exit(1)
            count += 1
    print(f"ok {count}", flush=True)
"""


def datagrams_captured_after_a_move(
    tmp_path: Path, *options: str
) -> tuple[bytes, list[dict[str, Any]]]:
    """Every frame between the nodes while a moved udp_echo echoes datagrams that carry
    MARKER; and the shadow's UDP streams."""
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        with spawn_fixture("udp_echo", netns=a.netns) as service:
            ports = service.ready["port"], service.ready["connected_port"]
            moved = move(a, service.pid, b, options=options)
            service.wait_exit()
            frames = tmp_path / "frames"
            with capturing(cluster, frames):
                peer = spawn_python(a, MARKED_PEER, *ports, MARKER)
                for _ in range(3):
                    assert ask(peer, "again") == "ok 8"
            streams = shadow_status(a, service.pid)["streams"]
            assert peer.stdin is not None
            peer.stdin.close()
            assert peer.wait(LINE_TIMEOUT) == 0
            output = finish_moved(service, moved, tmp_path)
        assert "echoed 24 datagrams" in output and "12 on the connected socket" in output, output
        seen = frames.read_bytes()
        # Each exchange sends 76 KB each way at least (in clear or not): three of them.
        assert len(seen) > 6 * 76000, "not the datagrams captured between the nodes"
        os.unlink(frames)
        return seen, [s for s in streams if s["kind"] == "datagram"]


def test_relayed_datagrams_between_nodes_are_encrypted(tmp_path: Path) -> None:
    seen, streams = datagrams_captured_after_a_move(tmp_path)
    assert MARKER.encode() not in seen
    assert [s["encrypted"] for s in streams] == [True, True], streams
    # The connected socket's peer is a stand-in of its node's forwarder; the shadow knows
    # which relay it stands for (a later move connects the next socket to the same).
    assert all(s["aliases"] for s in streams), streams


def test_plain_relays_carry_datagrams_as_they_are(tmp_path: Path) -> None:
    seen, streams = datagrams_captured_after_a_move(tmp_path, "--plain-relays")
    assert MARKER.encode() in seen
    assert [s["encrypted"] for s in streams] == [False, False], streams


# Echoes random chunks through HOST:PORT for the seconds each stdin line says, checking
# every byte; answers "ROUNDS MAX_GAP" (the longest wait for one echo, seconds).
STREAMER = """\
import os, socket, sys, time
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as connection:
    print("connected", flush=True)
    for line in sys.stdin:
        rounds, longest, end = 0, 0.0, time.monotonic() + float(line)
        while time.monotonic() < end:
            chunk = os.urandom(16384)
            sent = time.monotonic()
            connection.sendall(chunk)
            echoed = b""
            while len(echoed) < len(chunk):
                part = connection.recv(len(chunk) - len(echoed))
                if not part:
                    sys.exit("the stream ended")
                echoed += part
            if echoed != chunk:
                sys.exit("the echo differs from what was sent")
            longest, rounds = max(longest, time.monotonic() - sent), rounds + 1
        print(rounds, f"{longest:.3f}", flush=True)
"""

# Opens connections to the shadow at HOST:PORT and stalls each in its own way: silent,
# a TLS record header cut short, a ClientHello and no more (the shadow answers and waits
# for our Finished), a record of garbage a byte at a time (never complete before the
# deadline). "stalled", then "dropped SECONDS" for each as the shadow closes it, "done".
STALLER = """\
import select, socket, ssl, sys, time
host, port = sys.argv[1], int(sys.argv[2])

def client_hello():
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO())
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        return outgoing.read()

openings = [b"", b"", b"\\x16\\x03", client_hello(), client_hello(), client_hello()]
connections = {}
for opening in openings:
    sock = socket.create_connection((host, port), timeout=5)
    sock.sendall(opening)
    connections[sock] = time.monotonic()
trickler = socket.create_connection((host, port), timeout=5)
trickler.sendall(b"\\x16\\x03\\x01\\x02\\x00")  # a handshake record of 512 bytes follows
connections[trickler] = time.monotonic()
print("stalled", flush=True)
while connections:
    readable, _, _ = select.select(list(connections), [], [], 0.2)
    for sock in readable:
        try:
            ended = sock.recv(65536) == b""
        except ConnectionResetError:
            ended = True
        if ended:
            print("dropped", f"{time.monotonic() - connections.pop(sock):.2f}", flush=True)
            sock.close()
    if trickler in connections:
        try:
            trickler.send(b"G")
        except OSError:
            pass
print("done", flush=True)
"""


def test_strangers_stalling_on_the_relay_port_hold_up_no_stream(tmp_path: Path) -> None:
    """The shadow's exchanges are steps of its event loop: none holds up a relayed stream."""
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        b.start_daemon()
        c.start_daemon()
        with spawn_fixture("echo_server", netns=a.netns) as server:
            streamer = spawn_python(a, STREAMER, "127.0.0.1", str(server.ready["port"]))
            assert read_line(streamer, LINE_TIMEOUT) == "connected"
            moved = move(a, server.pid, b)
            server.wait_exit()
            host, port, _ = endpoint_of(a, server.pid)
            staller = spawn_python(c, STALLER, host, str(port))
            assert read_line(staller, LINE_TIMEOUT) == "stalled"
            rounds, longest = ask(streamer, "2.0").split()
            print(f"{rounds} echoes of 16 KiB beside 7 stalled strangers, longest {longest} s")
            # Before, one stranger held the shadow's loop for its 3 s timeout: far above.
            assert int(rounds) > 0 and float(longest) < HANDSHAKE_TIMEOUT / 2, (rounds, longest)
            # A node of the cluster gets through beside them: the relays of another move.
            moved = move(b, moved.pid, c, home=(a, server.pid))
            rounds, longest = ask(streamer, "0.5").split()
            assert int(rounds) > 0, rounds
            drops = [read_line(staller, 3 * LINE_TIMEOUT) for _ in range(7)]
            assert read_line(staller, LINE_TIMEOUT) == "done"
            print("strangers:", ", ".join(drops))
            for line in drops:
                word, seconds = line.split()
                assert word == "dropped", drops
                # Closed at the deadline (a loaded machine may be late, never early).
                assert HANDSHAKE_TIMEOUT - 0.5 < float(seconds) < 4 * HANDSHAKE_TIMEOUT, drops
            assert staller.wait(LINE_TIMEOUT) == 0
            assert streamer.stdin is not None
            streamer.stdin.close()
            assert streamer.wait(LINE_TIMEOUT) == 0
            finish_moved(server, moved, tmp_path)
        shadow_log = (a.state_dir / "shadows" / str(server.pid) / "shadow.log").read_text()
        assert "within 5 s" in shadow_log, shadow_log


def test_the_shadows_door_keeps_at_most_its_cap_of_exchanges(tmp_path: Path) -> None:
    """Past MAX_PENDING, the oldest stranger's exchange makes room; none is ever waited on."""
    pki.init_ca(tmp_path)
    identity = ShadowIdentity()
    identity.trust(cluster_trust(tmp_path))
    refused: list[str] = []
    with selectors.DefaultSelector() as selector:
        listener = socket.create_server(("127.0.0.1", 0), backlog=64)
        door = Door(listener, selector, lambda *_: refused.append("admitted?"), refused.append)
        door.identity, door.token = identity, os.urandom(32)
        strangers = [
            socket.create_connection(listener.getsockname()) for _ in range(MAX_PENDING + 8)
        ]
        try:
            while len(door.pending) < MAX_PENDING or selector.select(0.2):
                for key, events in selector.select(0):
                    key.data(key.fileobj, events)
            assert len(door.pending) == MAX_PENDING
            for sock in strangers[:8]:  # the oldest: closed, nothing said
                sock.settimeout(LINE_TIMEOUT)
                assert sock.recv(1) == b""
            assert any("dropped an exchange" in line for line in refused), refused
            assert "admitted?" not in refused
        finally:
            for sock in strangers:
                sock.close()
            door.close()
