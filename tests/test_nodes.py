"""The test nodes (support/nodes.py): namespaces, links, programs inside them, daemons, cleanup.

Plain processes stand in for hijack here, so these tests hold before `hijack
node serve` exists; one test runs the real daemon and is skipped until then.
"""

from __future__ import annotations

import os
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from support.nodes import (
    Cluster,
    Node,
    NodeError,
    find_leftover_namespaces,
    link_down,
    link_up,
    namespace_prefix,
    node_serve_missing,
    read_line,
    remove_namespaces,
    run_ip,
    snapshot_namespaces,
    spawn_in_namespace,
)

from hijack.node import pki
from hijack.sys import procfs

LINE_TIMEOUT = 10.0

# Echoes each connection, one after another, until killed; prints its port once listening.
ECHO_SERVER = """\
import socket
server = socket.create_server(("0.0.0.0", 0))
print(server.getsockname()[1], flush=True)
while True:
    connection, _ = server.accept()
    with connection:
        while data := connection.recv(65536):
            connection.sendall(data)
"""

# For each ADDRESS:PORT:PAYLOAD argument: connect, send, read the echo back, print it.
ECHO_CLIENT = """\
import socket, sys
for target in sys.argv[1:]:
    address, port, payload = target.split(":", 2)
    with socket.create_connection((address, int(port)), timeout=10) as connection:
        connection.sendall(payload.encode())
        connection.shutdown(socket.SHUT_WR)
        echoed = b""
        while data := connection.recv(65536):
            echoed += data
    print(echoed.decode(), flush=True)
"""

# One connection held open: each stdin line is sent and its echo printed.
ECHO_SESSION = """\
import socket, sys
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30) as connection:
    print("connected", flush=True)
    for line in sys.stdin:
        connection.sendall(line.encode())
        echoed = b""
        while not echoed.endswith(b"\\n"):
            echoed += connection.recv(65536)
        print(echoed.decode(), end="", flush=True)
"""

# Stands in for `hijack node serve` under the same contract; argv[1] picks a misbehaviour.
FAKE_DAEMON = """\
import os, signal, socket, sys
mode, listen = sys.argv[1], sys.argv[5]
assert sys.argv[2:5] == ["node", "serve", "--listen"], sys.argv
if mode == "die":
    sys.exit("fake daemon: dying before ready, on purpose")
if mode == "ignore-sigterm":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
address, port = listen.rsplit(":", 1)
server = socket.create_server((address, int(port)))
verb = "listening at" if mode == "wrong-line" else "listening on"
print(f"hijack node {os.environ['HIJACK_NODE']} {verb} {listen}", flush=True)
while True:
    server.accept()[0].close()
"""


def root_links() -> set[str]:
    return set(run_ip("-o", "link", "show").splitlines())


def start_echo_server(node: Node) -> int:
    server = node.spawn([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE)
    return int(read_line(server, LINE_TIMEOUT))


def fake_daemon(tmp_path: Path, mode: str) -> list[str]:
    script = tmp_path / "fake_daemon.py"
    script.write_text(FAKE_DAEMON)
    return [sys.executable, str(script), mode]


def has_exited(pidfd: int) -> bool:
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)


def test_three_nodes_reach_each_other_by_tcp_and_leave_nothing_behind(tmp_path: Path) -> None:
    links_before = root_links()
    with Cluster(tmp_path, nodes=3) as cluster:
        assert [node.name for node in cluster] == ["a", "b", "c"]
        assert [node.address for node in cluster] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
        assert cluster["b"] is cluster.nodes[1]
        namespaces = cluster.namespaces()
        assert set(namespaces) <= set(os.listdir("/run/netns"))
        assert all(name.startswith(namespace_prefix()) for name in namespaces)
        # Every link lives in the cluster's namespaces: the root namespace is untouched.
        assert root_links() == links_before

        ports = {node.name: start_echo_server(node) for node in cluster}
        for client in cluster:
            targets = [
                f"{server.address}:{ports[server.name]}:{client.name} to {server.name}"
                for server in cluster
                if server is not client
            ]
            completed = client.run_python(ECHO_CLIENT, *targets)
            assert completed.returncode == 0, completed.stderr
            assert completed.stdout.splitlines() == [target.split(":")[2] for target in targets]
        # The echo servers still run: the cluster's end must kill them.

    assert not set(namespaces) & set(os.listdir("/run/netns"))
    assert root_links() == links_before


def test_spawn_returns_with_the_program_itself_inside_the_node_with_its_env(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=1) as cluster:
        (node,) = cluster.nodes
        key, certificate = pki.node_paths(cluster.pki_dir, "a")
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert pki.load_identity(cluster.pki_dir, "a").name == "a"
        names = x509.load_pem_x509_certificate(certificate.read_bytes()).extensions
        alt = names.get_extension_for_class(x509.SubjectAlternativeName).value
        assert [str(ip) for ip in alt.get_values_for_type(x509.IPAddress)] == [node.address]
        assert node.env == {
            "HIJACK_STATE_DIR": str(node.state_dir),
            "HIJACK_NODE": "a",
            "HIJACK_PKI": str(cluster.pki_dir),
        }
        assert node.state_dir.is_dir()

        port = node.free_port()
        assert "refused" in (node.connect_error(node.address, port) or "")

        sleeper = node.spawn(["sleep", "60"], env={"EXTRA": "1"})
        # Already sleep itself, inside the node, when spawn returns.
        assert os.readlink(f"/proc/{sleeper.pid}/exe") == os.path.realpath(
            shutil.which("sleep") or "sleep"
        )
        netns = os.stat(f"/run/netns/{node.netns}")
        inside = os.stat(f"/proc/{sleeper.pid}/ns/net")
        assert (inside.st_dev, inside.st_ino) == (netns.st_dev, netns.st_ino)
        environ = Path(f"/proc/{sleeper.pid}/environ").read_bytes().split(b"\0")
        for variable, value in [*node.env.items(), ("EXTRA", "1")]:
            assert f"{variable}={value}".encode() in environ
        # Left running on purpose: the cluster's end kills and reaps it.
    assert sleeper.returncode == -signal.SIGKILL


def test_run_and_hijack_run_inside_the_node_with_its_env(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        b = cluster["b"]
        completed = b.run_python(
            "import os; print(os.environ['HIJACK_NODE'], os.stat('/proc/self/ns/net').st_ino)"
        )
        assert completed.stdout.split() == ["b", str(os.stat(f"/run/netns/{b.netns}").st_ino)]
        result = b.hijack("show", tmp_path / "no-such-image")
        assert result.returncode == 1, result.describe()
        assert "no-such-image" in result.stderr, result.describe()


# Its pid, /proc/self, whether pid 1 is the node's init, its pids as /proc shows them
# (NSpid): one a line.
WHO_AM_I = """\
import os
print(os.getpid())
print(os.readlink("/proc/self"))
print(b"sigtimedwait" in open("/proc/1/cmdline", "rb").read())
print(*[line for line in open("/proc/self/status") if line.startswith("NSpid:")][0].split()[1:])
"""


def test_a_node_with_a_pid_namespace_of_its_own(tmp_path: Path) -> None:
    """Its programs live in its pid namespace and read it in /proc; an orphan goes to its
    init, which reaps it; the cluster's end kills everything in it."""
    with Cluster(tmp_path, nodes=2, pid_namespaces="b") as cluster:
        a, b = cluster.nodes
        assert b.own_pid_namespace and not a.own_pid_namespace
        pid, self_link, init, nspid = b.run_python(WHO_AM_I).stdout.splitlines()
        # The init is pid 1, and the program reads its own pid, not ours, in /proc.
        assert pid == self_link == nspid and int(pid) > 1, (pid, self_link, nspid)
        assert init == "True"
        sleeper = b.spawn(["sleep", "60"])
        inside = b.pid_inside(sleeper.pid)
        assert inside != sleeper.pid and b.host_pid(inside) == sleeper.pid
        assert a.pid_inside(sleeper.pid) == sleeper.pid  # a node of ours: the same pids
        assert b.pid_init is not None
        init = b.pid_init.pid
        # An orphan of the node (its parent exits at once) goes to the init, which reaps it.
        orphan = b.spawn(["sh", "-c", "sleep 60 & echo $!"], stdout=subprocess.PIPE, text=True)
        orphan_pid = b.host_pid(int(read_line(orphan, LINE_TIMEOUT)))
        orphan.wait()
        assert procfs.read_status(orphan_pid).ppid == init
        os.kill(orphan_pid, signal.SIGKILL)
        deadline = time.monotonic() + LINE_TIMEOUT
        while Path(f"/proc/{orphan_pid}").exists():  # nothing to wait on for another's child
            assert time.monotonic() < deadline, "the init did not reap the orphan"
            time.sleep(0.01)
    assert sleeper.returncode == -signal.SIGKILL
    assert not Path(f"/proc/{init}").exists()


def test_cleanup_kills_orphans_inside_even_when_the_test_fails(tmp_path: Path) -> None:
    # A daemonised grandchild (its parent exits at once) is no Popen of ours:
    # only the scan of the namespace's processes finds it.
    double_fork = (
        "import os, subprocess\n"
        "child = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    with (
        pytest.raises(RuntimeError, match="the test failed"),
        Cluster(tmp_path, nodes=2) as cluster,
    ):
        parent = cluster["b"].spawn([sys.executable, "-c", double_fork], stdout=subprocess.PIPE)
        orphan_pid = int(read_line(parent, LINE_TIMEOUT))
        orphan_pidfd = os.pidfd_open(orphan_pid)
        namespaces = cluster.namespaces()
        raise RuntimeError("the test failed")
    try:
        assert has_exited(orphan_pidfd)
    finally:
        os.close(orphan_pidfd)
    assert not set(namespaces) & set(os.listdir("/run/netns"))


def test_leak_check_finds_and_removes_a_leftover_namespace() -> None:
    before = snapshot_namespaces()
    leaked = f"{namespace_prefix()}leak"
    # Pid 0 is no pytest run: a name of another run must not count.
    other_run = f"hj0x{secrets.token_hex(3)}"
    run_ip("netns", "add", leaked)
    try:
        run_ip("netns", "add", other_run)
        try:
            sleeper = spawn_in_namespace(leaked, ["sleep", "60"])
            pidfd = os.pidfd_open(sleeper.pid)
            try:
                assert find_leftover_namespaces(before) == [leaked]
                remove_namespaces([leaked])
                assert find_leftover_namespaces(before) == []
                assert not (Path("/run/netns") / leaked).exists()
                assert has_exited(pidfd)  # killed: it would have kept the namespace alive
                sleeper.poll()  # reaped already by remove_namespaces; let Popen know
            finally:
                os.close(pidfd)
        finally:
            remove_namespaces([other_run])
    finally:
        remove_namespaces([leaked])  # a no-op unless an assertion failed above


def test_link_down_cuts_a_node_off_and_link_up_restores_it(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        port = start_echo_server(b)
        session = a.spawn(
            [sys.executable, "-c", ECHO_SESSION, b.address, str(port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
        )
        assert session.stdin is not None
        assert read_line(session, LINE_TIMEOUT) == "connected"
        session.stdin.write(b"before\n")
        assert read_line(session, LINE_TIMEOUT) == "before"

        link_down(b)
        assert a.connect_error(b.address, port, timeout=0.5) is not None
        assert b.connect_error(a.address, port, timeout=0.5) is not None
        # The rest of the cluster still talks: nothing listens on that port in
        # a, and "refused" is a's answer.
        assert "refused" in (c.connect_error(a.address, port, timeout=2.0) or "")
        # The established connection stalls, but does not break.
        session.stdin.write(b"during\n")
        with pytest.raises(NodeError, match="no line"):
            read_line(session, 0.3)

        link_up(b)
        a.wait_tcp(b.address, port, timeout=5.0)
        # TCP retransmits what was sent during the cut.
        assert read_line(session, LINE_TIMEOUT) == "during"


def test_start_daemon_waits_for_its_line_and_stop_daemon_for_exit_0(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        endpoint = a.start_daemon(port=7450, program=fake_daemon(tmp_path, "ok"))
        assert endpoint == a.daemon_endpoint == f"{a.address}:7450"
        b.wait_tcp(a.address, 7450, timeout=0.5)  # accepts at once: it printed its line
        assert a.daemon is not None
        daemon = a.daemon
        a.stop_daemon()
        assert daemon.returncode == 0
        assert a.daemon is None
        # Left running on purpose: the cluster's end stops it cleanly.
        b.start_daemon(program=fake_daemon(tmp_path, "ok"))


def test_start_daemon_fails_with_the_stderr_of_a_daemon_that_dies(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=1) as cluster:
        with pytest.raises(
            NodeError, match=r"(?s)closed stdout.*exit code 1\n.*dying before ready, on purpose"
        ):
            cluster["a"].start_daemon(program=fake_daemon(tmp_path, "die"))
        with pytest.raises(NodeError, match=r"printed 'hijack node a listening at .*exit code -9"):
            cluster["a"].start_daemon(program=fake_daemon(tmp_path, "wrong-line"))


def test_a_daemon_that_ignores_sigterm_is_killed_and_reported(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=1, stop_timeout=0.3) as cluster:
        (a,) = cluster.nodes
        a.start_daemon(program=fake_daemon(tmp_path, "ignore-sigterm"))
        daemon = a.daemon
        with pytest.raises(NodeError, match=r"did not end within 0\.3 s of SIGTERM"):
            a.stop_daemon(timeout=0.3)
        assert daemon is not None and daemon.returncode == -signal.SIGKILL

    with (
        pytest.raises(NodeError, match=r"node b did not end within 0\.3 s of SIGTERM"),
        Cluster(tmp_path / "second", nodes=2, stop_timeout=0.3) as cluster,
    ):
        cluster["b"].start_daemon(program=fake_daemon(tmp_path, "ignore-sigterm"))
        namespaces = cluster.namespaces()
    assert not set(namespaces) & set(os.listdir("/run/netns"))


def test_hijack_node_serve_starts_in_a_node_and_ends_on_sigterm(tmp_path: Path) -> None:
    missing = node_serve_missing()
    if missing is not None:
        pytest.skip(f"the node daemon does not exist yet: {missing}")
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        endpoint = a.start_daemon()
        host, port = endpoint.rsplit(":", 1)
        b.wait_tcp(host, int(port), timeout=1.0)
        a.stop_daemon()
