"""The life of attached and moved processes: every record can be ended, status tells the truth.

Issue 15, item 1. A home shadow stands for its process as long as the
process lives, wherever it runs, and not longer: it ends once its process has
ended (its streams drained), says why, and lets go of the process's ports.
Its record at home lists the process through any number of moves, home
again included; `hijack forget` ends a record that nothing else can settle,
and `hijack recover` clears what ended.

Clusters and helpers are test_move's (tests/support/nodes.py): network
namespaces a, b, c with a daemon each, processes moved with `hijack move`
run inside the node they are on.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support import RunningFixture, spawn_fixture
from support.cli import HijackCli
from support.nodes import Cluster, Node
from test_move import (
    ECHO_SESSION,
    EXIT_TIMEOUT,
    LINE_TIMEOUT,
    Moved,
    ask,
    ask_moved,
    kill_daemon,
    move,
    poll_until,
    read_line,
    shadow_status,
    spawn_python,
    still_running,
    wait_gone,
)

from hijack.registry import Registry

# Binds 127.0.0.1:PORT (exit 0) or says why not.
BIND_SNIPPET = """\
import socket, sys
with socket.socket() as sock:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", int(sys.argv[1])))
    sock.listen()
"""


def status_of(node: Node) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(node.hijack_ok("status", "--json").stdout)
    return document


def row_of(node: Node, pid: int) -> dict[str, Any]:
    """The `hijack status --json` row of `pid` in `node`; it must be the only one."""
    rows = status_of(node)["processes"]
    assert [row["pid"] for row in rows] == [pid], json.dumps(rows, indent=1)
    row: dict[str, Any] = rows[0]
    return row


def assert_port_free(node: Node, port: int) -> None:
    """A restarted server could listen on 127.0.0.1:port in `node` again."""
    completed = node.run_python(BIND_SNIPPET, port)
    assert completed.returncode == 0, f"port {port} is still held: {completed.stderr}"


def kill_moved(moved: Moved) -> None:
    os.kill(moved.pid, signal.SIGKILL)
    wait_gone(moved.pid, EXIT_TIMEOUT, "the moved process, killed")


def served(node: Node, server: RunningFixture) -> subprocess.Popen[bytes]:
    """A client connected to the echo server, which has echoed one line."""
    session = spawn_python(node, ECHO_SESSION, "127.0.0.1", server.ready["port"])
    assert read_line(session, LINE_TIMEOUT) == "connected"
    assert ask(session, "hello") == "hello"
    return session


def there_and_back(cluster: Cluster, server: RunningFixture) -> Moved:
    """The echo server moved from a to b and back to a."""
    a, b = cluster["a"], cluster["b"]
    moved = move(a, server.pid, b)
    server.wait_exit()  # the original, killed by the move
    return move(b, moved.pid, a, home=(a, server.pid))


def test_a_process_moved_there_back_and_away_again_leaves_no_shadow_and_no_port(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=3) as cluster:
        a, c = cluster["a"], cluster["c"]
        for node in cluster:
            node.start_daemon()
        with spawn_fixture("echo_server", netns=a.netns) as server:
            port = int(server.ready["port"])
            session = served(a, server)
            back = there_and_back(cluster, server)
            # One row at home, under its new pid, with its shadow here: attached
            # again (its shadow handed its sockets back: test_move_home).
            row = row_of(a, back.pid)
            assert (row["state"], row["current_node"]) == ("attached", "a"), row
            assert (row["shadow"]["pid"], row["shadow"]["where"]) == (back.shadow_pid, "local")
            assert row["shadow"]["health"] == "ok", row

            away = move(a, back.pid, c, home=(a, server.pid))
            row = row_of(a, back.pid)  # still listed at home, moved on
            assert (row["state"], row["current_node"]) == ("moved", "c"), row
            assert row["shadow"]["pid"] == away.shadow_pid == back.shadow_pid, row
            assert ask(session, "from c") == "from c"

            kill_moved(away)  # with its client still connected
            wait_gone(away.shadow_pid, EXIT_TIMEOUT, "the home shadow of a process that ended")
            assert_port_free(a, port)
            row = row_of(a, back.pid)
            assert row["state"] == "gone", row
            assert row["shadow"]["health"] == "dead", row
            assert row["shadow"]["error"] == f"ended: process {away.pid} ended on c", row

            recovered = a.hijack_ok("recover").stdout
            assert f"process {back.pid} (echo_server): moved to c" in recovered, recovered
            assert status_of(a)["processes"] == []
            assert session.stdin is not None
            session.stdin.close()
            session.wait(EXIT_TIMEOUT)


def test_detach_of_a_process_back_home_ends_its_shadow_and_names_it(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a = cluster["a"]
        for node in cluster:
            node.start_daemon()
        with spawn_fixture("echo_server", netns=a.netns) as server:
            back = there_and_back(cluster, server)
            # Home lists both moves: the one it made, the one it received.
            moves = status_of(a)["moves"]
            assert [(m["source"], m["destination"], m["phase"]) for m in moves] == [
                ("b", "a", "done"),
                ("a", "b", "done"),
            ], moves
            assert moves[0]["new_pid"] == back.pid, moves
            # The one it received shows the freeze its mover measured (told once over).
            poll_until(
                lambda: status_of(a)["moves"][0]["freeze_ms"] is not None,
                "the freeze of the move a received, in its row",
            )
            result = a.hijack_ok("detach", back.pid)
            assert result.stdout.startswith(
                f"detached process {back.pid} (echo_server, attached); shadow {back.shadow_pid}"
                " ended"
            ), result.stdout
            wait_gone(back.shadow_pid, EXIT_TIMEOUT, "the shadow of a detached process")
            assert status_of(a)["processes"] == []
            assert not (a.state_dir / "shadows" / str(server.pid)).exists()


def test_a_process_back_home_that_ends_while_no_daemon_runs_ends_its_shadow(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a = cluster["a"]
        for node in cluster:
            node.start_daemon()
        with spawn_fixture("echo_server", netns=a.netns) as server:
            port = int(server.ready["port"])
            back = there_and_back(cluster, server)
            kill_daemon(a)  # nobody at home would tell the shadow
            kill_moved(back)
            wait_gone(back.shadow_pid, EXIT_TIMEOUT, "the shadow of a process that ended")
            assert_port_free(a, port)
            row = row_of(a, back.pid)
            assert row["state"] == "gone", row
            # Home again it is followed as an attached process is: its exit ends the shadow.
            assert row["shadow"]["error"] == f"ended: process {back.pid} exited"


def test_a_moved_process_that_ends_while_its_daemon_is_down_is_settled_when_it_returns(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        with spawn_fixture("echo_server", netns=a.netns) as server:
            moved = move(a, server.pid, b)
            kill_daemon(b)
            kill_moved(moved)
            row = row_of(a, server.pid)
            assert (row["state"], row["shadow"]["health"]) == ("moved", "ok"), row
            assert row["note"].startswith("node b does not answer"), row

            b.start_daemon()  # finds its migrant ended, releases its home shadow
            wait_gone(moved.shadow_pid, EXIT_TIMEOUT, "the home shadow, released late")
            row = row_of(a, server.pid)
            assert row["state"] == "gone", row
            assert row["shadow"]["error"] == f"ended: process {moved.pid} ended on b", row
            b_row = row_of(b, moved.pid)
            assert (b_row["state"], b_row["registry_state"]) == ("gone", "exited"), b_row


def test_forget_ends_the_record_and_shadow_of_a_process_dead_on_a_node_that_is_down(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        with spawn_fixture("echo_server", netns=a.netns) as server:
            port = int(server.ready["port"])
            moved = move(a, server.pid, b)
            kill_daemon(b)
            kill_moved(moved)

            refused = a.hijack("detach", server.pid)
            assert refused.returncode == 1, refused.describe()
            assert f"`hijack forget {server.pid}`" in refused.stderr, refused.describe()

            result = a.hijack_ok("forget", server.pid)
            assert result.stdout.startswith(
                f"forgot process {server.pid} (echo_server, moved); shadow {moved.shadow_pid} ended"
            ), result.stdout
            wait_gone(moved.shadow_pid, EXIT_TIMEOUT, "the shadow of a forgotten process")
            assert_port_free(a, port)
            assert status_of(a)["processes"] == []
            unknown = a.hijack("forget", server.pid)
            assert (unknown.returncode, unknown.stderr.count("\n")) == (1, 1), unknown.describe()


def test_a_migrant_that_ends_as_its_daemon_stops_still_releases_its_home_shadow(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        with spawn_fixture("echo_server", netns=a.netns) as server:
            port = int(server.ready["port"])
            moved = move(a, server.pid, b)
            # The daemon's thread that waits for the migrant stops with it: what it
            # had not told the shadow yet, the daemon tells it on its way out.
            os.kill(moved.pid, signal.SIGKILL)
            b.stop_daemon()
            wait_gone(moved.shadow_pid, EXIT_TIMEOUT, "the home shadow of a migrant that ended")
            assert_port_free(a, port)


# -- records alone (no process behind them) ---------------------------------------------

GONE_PID = 4_000_123  # above any pid this machine has used


def test_forget_ends_any_record_and_says_what_it_leaves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HIJACK_NODE", "home")  # the same node for the registry here and the CLI
    cli = HijackCli(tmp_path / "state")
    with Registry(tmp_path / "state") as registry:
        registry.record_attached(GONE_PID, 1, "held-one", GONE_PID + 1, str(tmp_path / "c.sock"))
        registry.set_state(GONE_PID, "held")
        registry.record_restored(GONE_PID + 2, "restored-one")
    refused = cli("detach", GONE_PID)
    assert (refused.returncode, refused.stderr.count("\n")) == (1, 1), refused.describe()
    assert "hijack recover" in refused.stderr, refused.describe()

    held = cli.ok("forget", GONE_PID).stdout
    assert held.startswith(
        f"forgot process {GONE_PID} (held-one, held); its shadow {GONE_PID + 1} had ended"
    ), held
    assert f"`kill -CONT {GONE_PID}` only if nothing of it runs elsewhere" in held, held
    plain = cli.ok("detach", GONE_PID + 2).stdout
    assert plain == f"detached process {GONE_PID + 2} (restored-one, restored); it had no shadow\n"
    with Registry(tmp_path / "state") as registry:
        assert registry.processes() == []


def test_recover_clears_the_records_of_processes_that_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HIJACK_NODE", "home")  # the same node for the registry here and the CLI
    cli = HijackCli(tmp_path / "state")
    with Registry(tmp_path / "state") as registry:
        registry.record_attached(GONE_PID, 1, "ended", GONE_PID + 1, str(tmp_path / "c.sock"))
        registry.record_restored(os.getpid(), "alive")  # runs: stays
    assert cli.ok("status").stdout.count("`hijack recover` clears this record") == 1
    recovered = cli.ok("recover").stdout
    assert recovered == f"process {GONE_PID} (ended): it has ended; record removed\n", recovered
    with Registry(tmp_path / "state") as registry:
        assert [record.pid for record in registry.processes()] == [os.getpid()]


def test_recover_forgets_direct_connections_no_process_here_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A swap's `direct` rows name a connection by its two addresses; one whose holder
    ended, closed it or moved on with it is forgotten by `recover` (a later connection
    between the same addresses would be taken for a direct one), a held one kept."""
    monkeypatch.setenv("HIJACK_NODE", "home")
    cli = HijackCli(tmp_path / "state")
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as client,
    ):
        accepted, _ = server.accept()
        with accepted:
            local = f"127.0.0.1:{client.getsockname()[1]}"
            remote = f"127.0.0.1:{server.getsockname()[1]}"
            gone = ("127.0.0.1:1", "127.0.0.1:2")
            with Registry(tmp_path / "state") as registry:
                registry.record_restored(os.getpid(), "holder")  # holds `client`
                registry.record_direct(local, remote)
                registry.record_direct(*gone)
            recovered = cli.ok("recover").stdout
            assert recovered == (
                "direct connection 127.0.0.1:1 <-> 127.0.0.1:2: no process here holds"
                " it; forgotten\n"
            ), recovered
            with Registry(tmp_path / "state") as registry:
                assert registry.direct_connections() == {(local, remote)}
                registry.forget(os.getpid(), "test over")


# A server: prints its port, accepts one client; on a stdin line writes to it for
# a second, as much as goes, says how much, and exits (nothing unread: its
# connections end with a FIN, what it wrote still on the way).
WRITER = """\
import socket, sys, time
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
connection, _ = server.accept()
print("accepted", flush=True)
sys.stdin.readline()
connection.setblocking(False)
sent, deadline = 0, time.monotonic() + 1
while time.monotonic() < deadline:
    try:
        sent += connection.send(b"x" * 65536)
    except BlockingIOError:
        time.sleep(0.01)
print(f"sent {sent}", flush=True)
"""

# Connects to 127.0.0.1:PORT, says so, and never reads: it waits for its stdin to end.
DEAF_CLIENT = """\
import socket, sys
connection = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print("connected", flush=True)
sys.stdin.read()
"""


def test_the_port_of_a_process_that_ended_is_free_while_its_shadow_drains(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        writer = spawn_python(a, WRITER)
        port = int(read_line(writer, LINE_TIMEOUT))
        client = spawn_python(a, DEAF_CLIENT, str(port))
        assert read_line(client, LINE_TIMEOUT) == "connected"
        assert read_line(writer, LINE_TIMEOUT) == "accepted"
        moved = move(a, writer.pid, b)
        # It writes more than a client that never reads can take: the shadow holds
        # the rest when the writer ends, and its daemon releases the shadow.
        assert ask_moved(writer, "write").startswith("sent ")
        wait_gone(moved.pid, EXIT_TIMEOUT, "the writer, ended")
        poll_until(
            lambda: any(s["buffered_in"] for s in shadow_status(a, writer.pid)["streams"]),
            "the shadow holding what the client did not read",
        )
        poll_until(lambda: a.run_python(BIND_SNIPPET, port).returncode == 0, "the port free")
        assert still_running(moved.shadow_pid), "the shadow should still be draining"
        client.kill()  # what it did not read goes with it: nothing left to drain
        client.wait(EXIT_TIMEOUT)
        wait_gone(moved.shadow_pid, EXIT_TIMEOUT, "the shadow, drained")
