"""`hijack drain`: every process a node manages goes to the other nodes, spread by their load.

Built as tests/test_move.py's tests are (a Cluster of network namespaces, each
with its daemon, `hijack` run inside the node drained). The processes are
echo servers attached in node a, each with an echo session connected to it
that must answer before and after the drain over the same connection.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from support import RunningFixture, spawn_fixture
from support.cli import CliResult
from support.nodes import Cluster, Node, read_line
from test_move import (
    EXIT_TIMEOUT,
    HOLDER,
    LINE_TIMEOUT,
    Moved,
    ask,
    assert_ended_well,
    assert_untouched,
    finish_moved,
    logs,
    runs_in,
    shadow_status,
    spawn_python,
    still_running,
)
from test_nodes import ECHO_SESSION
from test_swap import echo_stream, relayed_ids

from hijack.registry import Registry

DRAINED_LINE = re.compile(r"drained process (\d+) to (\w+): it runs there as (\d+)")
DRAIN_TIMEOUT = 120.0


@contextmanager
def served(
    node: Node, count: int
) -> Iterator[list[tuple[RunningFixture, subprocess.Popen[bytes]]]]:
    """`count` echo servers in `node`, attached, each with a connected echo session."""
    with ExitStack() as stack:
        pairs = []
        for _ in range(count):
            server = stack.enter_context(spawn_fixture("echo_server", netns=node.netns))
            session = spawn_python(node, ECHO_SESSION, "127.0.0.1", server.ready["port"])
            stack.callback(session.wait)  # LIFO: killed first, then reaped
            stack.callback(session.kill)
            assert read_line(session, LINE_TIMEOUT) == "connected"
            assert ask(session, "before") == "before"
            node.hijack_ok("attach", server.pid)
            pairs.append((server, session))
        yield pairs


def drain(node: Node, *destinations: Node) -> CliResult:
    targets = [word for there in destinations for word in ("--to", str(there.daemon_endpoint))]
    result = node.hijack("drain", *targets, timeout=DRAIN_TIMEOUT)
    print(result.describe())
    return result


def drained(result: CliResult) -> dict[int, tuple[str, int]]:
    """{pid: (node name, new pid)} from the drain's lines."""
    return {
        int(found[1]): (found[2], int(found[3])) for found in DRAINED_LINE.finditer(result.stdout)
    }


def finish(
    pairs: list[tuple[RunningFixture, subprocess.Popen[bytes]]],
    moved: dict[int, tuple[str, int]],
    cluster: Cluster,
    home: Node,
    tmp_path: Path,
) -> None:
    """Every session answers on its old connection; every server then ends well where it went."""
    for server, session in pairs:
        name, new_pid = moved[server.pid]
        node = cluster[name]
        assert runs_in(new_pid, node), f"{server.pid} is not in {name} as {new_pid}"
        assert ask(session, f"on {name}") == f"on {name}", logs(tmp_path)
        shadow_pid = shadow_status(home, server.pid)["shadow_pid"]
        assert session.stdin is not None
        session.stdin.close()
        assert session.wait(EXIT_TIMEOUT) == 0
        server.wait_exit()
        output = finish_moved(server, Moved(new_pid, node, 0.0, shadow_pid), tmp_path)
        assert "over 1 connections" in output, output


def test_drain_spreads_every_managed_process_and_their_clients_go_on(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        b.start_daemon()
        c.start_daemon()
        with served(a, 4) as pairs:
            result = drain(a, b, c)
            assert result.returncode == 0, f"{result.describe()}\n{logs(tmp_path)}"
            moved = drained(result)
            assert set(moved) == {server.pid for server, _ in pairs}, result.describe()
            # Equal nodes take turns (the rule divides by what each was already sent).
            counts = sorted(list(name for name, _ in moved.values()).count(n) for n in "bc")
            assert counts == [2, 2], result.describe()
            with Registry(a.state_dir) as registry:
                assert {record.state for record in registry.processes()} == {"moved"}
            finish(pairs, moved, cluster, a, tmp_path)
        # A node that manages nothing has nothing to drain.
        assert "nothing to drain" in a.hijack_ok("drain", "--to", str(b.daemon_endpoint)).stdout


def test_drain_names_what_stayed_and_it_runs_on_at_home(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        # A netlink socket cannot be proxied: no node can take this one.
        holder = spawn_python(a, HOLDER, "netlink")
        try:
            int(read_line(holder, LINE_TIMEOUT))
            a.hijack_ok("attach", holder.pid)
            with served(a, 1) as pairs:
                result = drain(a, b)
                assert result.returncode == 1, result.describe()
                assert f"process {holder.pid} stayed" in result.stdout, result.describe()
                assert result.stderr.count("\n") == 1, result.describe()
                assert f"1 of 2 process(es) stayed: {holder.pid} (" in result.stderr
                assert "cannot be proxied" in result.stdout, result.describe()
                assert ask(holder, "still here") == "still here"
                assert runs_in(holder.pid, a)
                with Registry(a.state_dir) as registry:
                    assert registry.get(holder.pid).state == "attached"
                finish(pairs, drained(result), cluster, a, tmp_path)
            a.hijack_ok("detach", holder.pid)
            assert_untouched(holder.pid)
        finally:
            holder.kill()
            holder.wait()


def test_drain_joins_the_connections_between_the_processes_it_moved(tmp_path: Path) -> None:
    # A stream_client and its echo_server, both attached on a: the drain sends one to b
    # and the other to c (equal nodes take turns), then joins them directly, so a's
    # shadows relay nothing of their stream and a may go.
    with Cluster(tmp_path, nodes=3) as cluster:
        a, b, c = cluster.nodes
        b.start_daemon()
        c.start_daemon()
        with echo_stream(a, seed=47) as (server, client):
            a.hijack_ok("attach", server.pid)
            a.hijack_ok("attach", client.pid)
            result = drain(a, b, c)
            assert result.returncode == 0, f"{result.describe()}\n{logs(tmp_path)}"
            assert re.search(r"swap: .* direct: 10\.77\.0\.\d:\d+ <-> 10\.77", result.stdout), (
                result.describe()
            )
            moved = drained(result)
            assert {name for name, _ in moved.values()} == {"b", "c"}, result.describe()
            server.wait_exit()
            client.wait_exit()
            assert relayed_ids(a, client.pid) == relayed_ids(a, server.pid) == []
            (client_node, client_pid), (server_node, server_pid) = (
                moved[client.pid],
                moved[server.pid],
            )
            assert still_running(client_pid), "the stream ended before the drain: too fast"
            shadows = {pid: shadow_status(a, pid)["shadow_pid"] for pid in moved}
            moved_client = Moved(client_pid, cluster[client_node], 0.0, shadows[client.pid])
            assert_ended_well(moved_client, "the stream_client, drained and swapped", tmp_path)
            moved_server = Moved(server_pid, cluster[server_node], 0.0, shadows[server.pid])
            finish_moved(server, moved_server, tmp_path)  # it checked its own state: PASS
