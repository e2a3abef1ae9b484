"""Node names: set by `hijack node serve --name` or $HIJACK_NODE, distinct by default.

A node named by its daemon alone (no $HIJACK_NODE anywhere on it) is moved
to and back from; a command whose $HIJACK_NODE contradicts the name its node
keeps, a destination named as the source, and a malformed name are each
refused in one line with nothing touched; two daemons on one host, neither
named, get names of their own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support import spawn_fixture
from support.cli import HijackCli
from support.nodes import HIJACK_PROGRAM, Cluster, read_line
from test_attach import attached
from test_move import (
    LINE_TIMEOUT,
    ask,
    assert_not_attached,
    assert_untouched,
    finish_moved,
    move,
    move_refused,
    spawn_python,
)
from test_nodes import ECHO_SESSION

from hijack.node import pki
from hijack.node.naming import NAME_FILE
from hijack.registry import Registry

WAIT = 30.0


def test_a_node_named_by_its_daemon_is_moved_to_and_from(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        a.start_daemon()
        # Node b is named by its daemon's --name only: its commands find the
        # name kept in its state directory.
        del b.env["HIJACK_NODE"]
        b.start_daemon(options=("--name", "b"))
        assert (b.state_dir / NAME_FILE).read_text() == "b\n"
        with spawn_fixture("echo_server", netns=a.netns) as server:
            home_pid = server.pid
            session = spawn_python(a, ECHO_SESSION, "127.0.0.1", server.ready["port"])
            assert read_line(session, LINE_TIMEOUT) == "connected"

            there = move(a, home_pid, b)
            server.wait_exit()
            assert ask(session, "on b") == "on b"

            # A command on b under another name is refused, by name, the process untouched.
            assert a.daemon_endpoint is not None
            result = b.run(
                [*HIJACK_PROGRAM, "move", str(there.pid), "--to", a.daemon_endpoint],
                env={"HIJACK_NODE": "home"},
                timeout=WAIT,
            )
            assert result.returncode == 1, result.stderr
            assert result.stderr.splitlines() == [
                f"hijack: $HIJACK_NODE is 'home', but this node ({b.state_dir}) is named 'b' by"
                " its daemon: unset $HIJACK_NODE or make it 'b'"
            ], result.stderr
            assert ask(session, "still on b") == "still on b"

            back = move(b, there.pid, a, home=(a, home_pid))
            assert ask(session, "home again") == "home again"
            assert session.stdin is not None
            session.stdin.close()
            assert session.wait(WAIT) == 0
            output = finish_moved(server, back, tmp_path)
        assert "PASS echo_server" in output


def test_a_destination_named_as_the_source_is_refused_and_nothing_moves(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        a.env["HIJACK_NODE"] = b.name  # a's commands under the name of b's daemon
        with spawn_fixture("echo_server", netns=a.netns) as server:
            line = move_refused(a, server.pid, b)
            assert line == (
                f"hijack: the daemon at {b.daemon_endpoint} is named 'b', as this node is:"
                " give each node a name of its own (`hijack node serve --name`, $HIJACK_NODE)"
            ), line
            assert_untouched(server.pid)
            assert_not_attached(a, server.pid)
            server.close_control()
            assert server.wait_exit() == 0


def test_a_malformed_name_is_refused_in_one_line(tmp_path: Path) -> None:
    cli = HijackCli(tmp_path / "state")
    usage = cli("node", "serve", "--name", "two words")
    assert usage.returncode == 2, usage.describe()
    assert usage.stderr.splitlines()[-1] == (
        "hijack node serve: error: argument --name: node name 'two words' (--name) is not"
        " valid: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
    ), usage.describe()
    environment = {**os.environ, "HIJACK_STATE_DIR": str(cli.state_dir), "HIJACK_NODE": "a/b"}
    status = subprocess.run(
        [sys.executable, "-m", "hijack", "status"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert status.returncode == 1, status.stderr
    assert status.stderr.splitlines() == [
        "hijack: node name 'a/b' ($HIJACK_NODE) is not valid: 1-64 letters, digits, '.', '_'"
        " or '-', starting with a letter or digit"
    ], status.stderr


@contextmanager
def unnamed_daemon(state: Path, certificates: Path) -> Iterator[str]:
    """`hijack node serve` on loopback with state directory `state` and no name given; its name.

    Started the first time, the daemon names its node, then refuses to serve
    without a certificate for that name: it is issued, as an admin would.
    """
    environment = {**os.environ, "HIJACK_STATE_DIR": str(state), "HIJACK_PKI": str(certificates)}
    environment.pop("HIJACK_NODE", None)
    if not (state / NAME_FILE).exists():
        first = subprocess.run(
            [*HIJACK_PROGRAM, "node", "serve", "--listen", "127.0.0.1:0"],
            env=environment,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=WAIT,
            check=False,
        )
        name = (state / NAME_FILE).read_text().strip()
        assert first.returncode == 1, first.stderr
        assert f"`hijack cluster add-node {name}`" in first.stderr, first.stderr
        pki.add_node(certificates, name)
    daemon = subprocess.Popen(
        [*HIJACK_PROGRAM, "node", "serve", "--listen", "127.0.0.1:0"],
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        words = read_line(daemon, WAIT).split()  # hijack node NAME listening on ADDRESS
        assert words[:2] == ["hijack", "node"] and words[3:5] == ["listening", "on"], words
        yield words[2]
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(WAIT) == 0
        assert daemon.stdout is not None
        daemon.stdout.close()


def test_two_daemons_on_one_host_get_names_of_their_own(tmp_path: Path) -> None:
    certificates = tmp_path / "pki"
    HijackCli(tmp_path / "first").ok("cluster", "init", "--pki", certificates)
    with (
        unnamed_daemon(tmp_path / "first", certificates) as first,
        unnamed_daemon(tmp_path / "second", certificates) as second,
    ):
        assert first != second
        for state, name in ((tmp_path / "first", first), (tmp_path / "second", second)):
            assert (state / NAME_FILE).read_text() == f"{name}\n"
            assert name.startswith(os.uname().nodename)
    # A daemon started again keeps its node's name.
    with unnamed_daemon(tmp_path / "first", certificates) as again:
        assert again == first


def test_a_process_attached_under_one_name_is_not_moved_under_another(tmp_path: Path) -> None:
    # What once failed with "ValueError: not enough values to unpack": the
    # move took the process for one away from home, with no relay to reach.
    cli = HijackCli(tmp_path / "state")
    cli.ok("cluster", "init")
    with spawn_fixture("counter", tmp_path / "counter.log", "2") as counter:
        with attached(cli, counter.pid):
            with Registry(cli.state_dir) as registry:
                home = registry.get(counter.pid).home_node
            environment = {
                **os.environ,
                "HIJACK_STATE_DIR": str(cli.state_dir),
                "HIJACK_NODE": "home",
            }
            result = subprocess.run(
                [*HIJACK_PROGRAM, "move", str(counter.pid), "--to", "127.0.0.1:1"],
                env=environment,
                capture_output=True,
                text=True,
                timeout=WAIT,
                check=False,
            )
            assert result.returncode == 1, result.stderr
            assert result.stderr.splitlines() == [
                f"hijack: process {counter.pid} was attached on node {home!r}, and this node is"
                f" named 'home' now: move it under its old name (HIJACK_NODE={home})"
            ], result.stderr
        counter.assert_intact()
