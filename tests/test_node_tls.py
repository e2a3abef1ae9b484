"""Node channels under TLS 1.3 with the cluster's certificates, between network-namespace nodes.

- A move between two nodes goes through TLS: a packet capture on the link
  (AF_PACKET, in the cluster's hub namespace) finds neither a secret the
  moved process holds in its memory nor its relay token, in any TCP stream.
- A mover presenting a certificate of another CA, an expired one or a
  revoked node's is refused by name, by the daemon; nothing is restored and
  the original runs on. So is a peer with no certificate.
- A daemon under a flood (500 silent connections and 50 slow handshakes,
  from many addresses, kept up) still takes a real move; its descriptors
  and memory come back to where they were.

The cluster helpers come from test_move.py (see its docstring).
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from support import certificates, spawn_fixture
from support.capture import Capture
from support.cli import CliResult, HijackCli
from support.nodes import HIJACK_PROGRAM, Cluster, Node, run_ip
from test_move import (
    EXIT_TIMEOUT,
    assert_not_attached,
    assert_untouched,
    daemon_log,
    finish_moved,
    move,
    move_refused,
    pids_inside,
    poll_until,
    refusal_line,
    start_daemon_with,
)

from hijack.node import pki
from hijack.registry import Registry

DAEMON_PORT = 7450


def test_a_move_between_two_nodes_carries_no_secret_in_clear(tmp_path: Path) -> None:
    secret = f"hijack-secret-{secrets.token_hex(16)}"
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        # The secret lives only in the process's memory (its environment, on its
        # stack): it can reach b only inside the image.
        with spawn_fixture("echo_server", netns=a.netns, env={"SECRET": secret}) as server:
            environ = Path(f"/proc/{server.pid}/environ").read_bytes()
            assert secret.encode() in environ
            with Capture(cluster.hub_netns, b.hub_link) as capture:
                moved = move(a, server.pid, b)
                capture.stop()
            with Registry(a.state_dir) as registry:
                token = registry.get(server.pid).relay_token
                (record,) = registry.moves(1)
            assert token
            streams = capture.streams()
            to_daemon = sum(len(data) for flow, data in streams.items() if flow[3] == DAEMON_PORT)
            print(f"captured {len(capture.frames)} frames, {to_daemon} bytes to b's daemon")
            # The capture saw the move: at least the image, in TLS records.
            assert to_daemon >= record.bytes_sent > 0, (to_daemon, record)
            daemon_streams = [data for flow, data in streams.items() if flow[3] == DAEMON_PORT]
            assert all(data[:1] == b"\x16" for data in daemon_streams)  # a TLS handshake
            for needle in (secret.encode(), token.encode(), bytes.fromhex(token)):
                assert needle not in capture.everything()
                for flow, data in streams.items():
                    assert needle not in data, f"{needle!r} in clear in {flow}"
            server.wait_exit()
            finish_moved(server, moved, tmp_path)


# -- certificates a daemon refuses -------------------------------------------------------


def logged_refusal(daemon: Node, peer: Node) -> str:
    """Why `daemon` says it refused a connection from `peer` (waits for the line)."""
    pattern = rf"refused {re.escape(peer.address)}:\d+: (.*)"
    found = poll_until(lambda: re.search(pattern, daemon_log(daemon)), "the refusal logged")
    return str(found[1])


def flawed_certificates(cluster: Cluster, mover: Node, flaw: str, where: Path) -> Path:
    """A HIJACK_PKI directory for `mover` whose own certificate has `flaw`."""
    if flaw == "another CA":
        return certificates.from_another_ca(cluster.pki_dir, where, mover.name, mover.address)
    if flaw == "expired":
        return certificates.expired(cluster.pki_dir, where, mover.name, mover.address)
    # Revoked while the daemon runs: it reads the new list at its next accept.
    pki.revoke(cluster.pki_dir, mover.name)
    return cluster.pki_dir


@pytest.mark.parametrize(
    ("flaw", "mover_hears", "daemon_logs"),
    [
        ("another CA", "unknown ca", "unable to get local issuer certificate"),
        ("expired", "certificate expired", "certificate has expired"),
        ("revoked", "certificate revoked", "certificate revoked"),
    ],
)
def test_a_mover_with_a_refused_certificate_moves_nothing(
    tmp_path: Path, flaw: str, mover_hears: str, daemon_logs: str
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        assert b.daemon is not None and b.daemon_endpoint is not None
        directory = flawed_certificates(cluster, a, flaw, tmp_path / "flawed")
        with spawn_fixture("echo_server", netns=a.netns) as server:
            completed = a.run(
                [*HIJACK_PROGRAM, "move", str(server.pid), "--to", b.daemon_endpoint],
                timeout=EXIT_TIMEOUT,
                env={"HIJACK_PKI": str(directory)},
            )
            line = refusal_line(CliResult(("move",), completed.returncode, "", completed.stderr))
            assert f"refused our certificate ({mover_hears})" in line, line
            refusal = logged_refusal(b, a)
            assert daemon_logs in refusal, daemon_log(b)
            assert " move " not in daemon_log(b)
            assert pids_inside(b) == {b.daemon.pid}
            assert_untouched(server.pid)
            assert_not_attached(a, server.pid)
            server.assert_intact()


def test_a_mover_refuses_a_daemon_whose_certificate_names_another_host(tmp_path: Path) -> None:
    # b's own certificate, of the cluster, but issued without its address: it
    # could be any node of the cluster answering at 10.77.0.2.
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        unnamed = certificates.reissued(cluster.pki_dir, tmp_path / "unnamed", "b", None)
        start_daemon_with(b, "HIJACK_PKI", str(unnamed))
        assert b.daemon is not None
        with spawn_fixture("echo_server", netns=a.netns) as server:
            line = move_refused(a, server.pid, b)
            assert f"the certificate of node 'b' does not name {b.address}" in line, line
            assert f"--address {b.address}" in line, line
            assert pids_inside(b) == {b.daemon.pid}
            assert_untouched(server.pid)
            assert_not_attached(a, server.pid)
            server.assert_intact()


def test_the_daemon_limits_must_be_numbers_above_zero(tmp_path: Path) -> None:
    cli = HijackCli(tmp_path / "state")
    for flag, value in (("--max-per-address", "0"), ("--handshake-timeout", "soon")):
        result = cli("node", "serve", flag, value)
        assert result.returncode == 2, result.describe()
        assert f"argument {flag}:" in result.stderr, result.describe()


# A TLS client with no certificate; and a peer of the shared key's days
# (protocol 1: a JSON hello in clear). Prints what it got.
NO_CERTIFICATE = """\
import json, socket, ssl, struct, sys
host, port, case = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with socket.create_connection((host, port), timeout=10) as sock:
    if case == "no certificate":
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            with context.wrap_socket(sock) as tls:
                print("answer", tls.recv(100))
        except ssl.SSLError as error:
            print("alert", error.reason)
    else:
        hello = json.dumps({"hello": 1, "node": "old", "nonce": "00" * 32}).encode()
        sock.sendall(struct.pack("<BI", 0, len(hello)) + hello)
        try:
            answer = sock.recv(100)
        except ConnectionResetError:
            answer = b""
        # A TLS alert record (type 21), or nothing: never a protocol 1 answer.
        print("closed" if not answer else "alert" if answer[0] == 21 else answer)
"""


@pytest.mark.parametrize(
    ("case", "heard", "logged"),
    [
        (
            "no certificate",
            "alert TLSV13_ALERT_CERTIFICATE_REQUIRED",
            "TLS failed: peer did not return a certificate",
        ),
        ("protocol 1", "closed", "TLS failed: wrong version number"),
    ],
)
def test_a_peer_without_a_certificate_is_refused(
    tmp_path: Path, case: str, heard: str, logged: str
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        assert b.daemon is not None
        completed = a.run_python(NO_CERTIFICATE, b.address, DAEMON_PORT, case)
        assert completed.returncode == 0, completed.stderr
        assert completed.stdout.strip() == heard, completed.stdout
        refusal = logged_refusal(b, a)
        assert logged in refusal, daemon_log(b)
        assert pids_inside(b) == {b.daemon.pid}


# -- a daemon under a flood ----------------------------------------------------------------

# From the addresses argv[3] (comma-separated), round robin: HALF_OPEN
# connections that never say a word and SLOW ones that send a real
# ClientHello a byte per tick; each the daemon closes is opened again (at most
# REOPEN a tick), until stdin closes. Prints "flooding" once all are open,
# and at the end how many it opened.
FLOOD = """\
import select, socket, ssl, sys
host, port, sources = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
HALF_OPEN, SLOW, REOPEN, TICK = 500, 50, 25, 0.05
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
bio_in, bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
try:
    context.wrap_bio(bio_in, bio_out).do_handshake()
except ssl.SSLWantReadError:
    pass
HELLO = bio_out.read()
opened = 0
def connect():
    global opened
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((sources[opened % len(sources)], 0))
    opened += 1
    try:
        sock.connect((host, port))
    except BlockingIOError:
        pass
    return sock
def closed(sock):
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True
half = [connect() for _ in range(HALF_OPEN)]
slow = [[connect(), 0] for _ in range(SLOW)]
print("flooding", flush=True)
while not select.select([sys.stdin], [], [], TICK)[0]:
    budget = REOPEN
    for index, sock in enumerate(half):
        if budget and closed(sock):
            sock.close()
            half[index] = connect()
            budget -= 1
    for entry in slow:
        sock, sent = entry
        if budget and closed(sock):
            sock.close()
            entry[:] = [connect(), 0]
            budget -= 1
            continue
        try:
            entry[1] += sock.send(HELLO[sent : sent + 1]) if sent < len(HELLO) else 0
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            pass  # not connected yet, or closed: seen next tick
print("opened", opened, flush=True)
"""
FLOOD_SOURCES = [f"10.77.0.{100 + index}" for index in range(10)]


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def resident_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)[1])  # type: ignore[index]


def test_a_flood_of_silent_and_slow_peers_does_not_stop_a_move(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        for source in FLOOD_SOURCES:
            run_ip("-n", c.netns, "address", "add", f"{source}/24", "dev", "eth0")
        b.start_daemon(options=["--handshake-timeout", "2"])
        assert b.daemon is not None
        daemon = b.daemon.pid
        # A first move loads all a move needs: later figures are the daemon's own.
        with spawn_fixture("echo_server", netns=a.netns) as first:
            moved = move(a, first.pid, b)
            first.wait_exit()
            finish_moved(first, moved, tmp_path)
        fds, memory = descriptors(daemon), resident_kib(daemon)

        flood = c.spawn(
            [sys.executable, "-c", FLOOD, b.address, str(DAEMON_PORT), ",".join(FLOOD_SOURCES)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert flood.stdout is not None and flood.stdin is not None
            assert flood.stdout.readline().strip() == "flooding"
            during = descriptors(daemon)
            with spawn_fixture("echo_server", netns=a.netns) as server:
                moved = move(a, server.pid, b)
                peak = max(during, descriptors(daemon))
                server.wait_exit()
                finish_moved(server, moved, tmp_path)
            flood.stdin.close()
            said = flood.stdout.read()
            assert flood.wait(EXIT_TIMEOUT) == 0
        finally:
            if flood.poll() is None:
                flood.kill()
                flood.wait()
        opened = int(said.split()[-1])
        print(f"flood opened {opened} connections; daemon fds {fds} -> peak {peak}")
        assert opened > 550, said
        # At most the handshakes under way and the moves' connections on top.
        assert peak <= fds + 64 + 8, (fds, peak)
        poll_until(lambda: descriptors(daemon) <= fds, "b's descriptors back to before")
        grown = resident_kib(daemon) - memory
        print(f"daemon memory: {memory} KiB before, grown by {grown} KiB")
        assert grown < 16 * 1024, (memory, grown)
        assert b.daemon.poll() is None
        log_lines = daemon_log(b).count("\n")
        assert log_lines < 200, daemon_log(b)[-3000:]
        assert "Traceback" not in daemon_log(b)
