"""Home again: a process moved back to its home node gets its own sockets and pipes back.

A move whose destination is the process's home node has the home shadow hand
back the very open files it holds (docs/protocol.md, "Home again"): the
process then holds its original sockets, listener and pipes, the shadow
relays nothing more (no stream in its status, no connection to the node the
process came from) and follows it as it followed it once attached.

Helpers and programs come from test_move (the same Cluster of netns nodes).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
from pathlib import Path

import pytest
from support import spawn_fixture
from support.cli import restored_pid
from support.nodes import Cluster, Node, read_line
from test_faults import deliver, finish, hijack_in, session
from test_move import (
    EXIT_TIMEOUT,
    LINE_TIMEOUT,
    STREAM_BYTES,
    ask,
    ask_moved,
    finish_moved,
    is_forwarder,
    move,
    poll_until,
    runs_in,
    shadow_status,
    shape_loopback,
    spawn_python,
    ss_lines,
    wait_gone,
)
from test_nodes import ECHO_SESSION

from hijack.registry import Registry
from hijack.sys import procfs

STREAMING = 1024 * 1024  # bytes acknowledged before a move may start

# Relays are encrypted by default (through the node's forwarder); home again hands the
# originals back from those and from plain ones alike (docs/protocol.md, "Home again").
PLAIN = ("--plain-relays",)


def links(pid: int) -> dict[int, str]:
    """Each descriptor of `pid` and what it is ("socket:[ino]", "pipe:[ino]", a path)."""
    found = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            continue
    return found


def relay_sockets(shadow_pid: int, *pids: int) -> list[str]:
    """The sockets the shadow holds that the process (or no member of its tree, `pids`)
    does not, but for listeners (its endpoint, its control socket): relays and what they
    carry."""
    own = {link for pid in pids for link in links(pid).values() if link.startswith("socket:")}
    table = procfs.read_socket_table(shadow_pid)
    found = []
    for link in set(links(shadow_pid).values()) - own:
        if link.startswith("socket:"):
            info = table.get(int(link[len("socket:[") : -1]))
            if info is None or info.state != "LISTEN":
                found.append(f"{link} {info.describe() if info else ''}")
    return found


def assert_home_again(node: Node, home_pid: int, pid: int, shadow_pid: int) -> None:
    """The shadow of `pid` (attached as `home_pid`) relays nothing and follows it at home."""
    status = shadow_status(node, home_pid)
    assert status["mode"] == "home", status
    assert status["target_pid"] == pid, status
    assert status["streams"] == [], status
    assert status["location"] == "", status
    # A socket the process closed a moment ago is let go within the shadow's
    # FOLLOW_INTERVAL, as for any attached process: polled.
    poll_until(lambda: relay_sockets(shadow_pid, pid) == [], "no socket but the process's")
    with Registry(node.state_dir) as registry:
        record = registry.get(pid)
    assert (record.state, record.home_pid) == ("attached", None), record


@pytest.mark.parametrize("options", [(), PLAIN], ids=["encrypted", "plain"])
def test_a_server_moved_away_and_home_again_serves_with_its_own_sockets(
    tmp_path: Path, options: tuple[str, ...]
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        for node in cluster:
            node.start_daemon()
        shape_loopback(a)  # the streams are under way through both moves
        with spawn_fixture("echo_server", netns=a.netns) as server:
            port = str(server.ready["port"])
            home_pid = server.pid
            session = spawn_python(a, ECHO_SESSION, "127.0.0.1", port)
            assert read_line(session, LINE_TIMEOUT) == "connected"
            assert ask(session, "at home") == "at home"
            before = links(home_pid)
            stream = ("127.0.0.1", port, str(STREAM_BYTES))
            with spawn_fixture("stream_client", *stream, "71", netns=a.netns) as first:
                poll_until(
                    lambda: most_acknowledged(a, port) >= STREAMING, "the first stream under way"
                )
                away = move(a, home_pid, b, options=options)
                server.wait_exit()
                assert ask(session, "away") == "away"
                # A client the shadow accepts while the process is away (its relay goes
                # through b's forwarder, encrypted, whatever the options): it is the
                # process's own too once it is home.
                with spawn_fixture("stream_client", *stream, "72", netns=a.netns) as second:
                    poll_until(
                        lambda: any(
                            s["id"].startswith("acc:") and s["bytes_out"]
                            for s in shadow_status(a, home_pid)["streams"]
                        ),
                        "the second client relayed",
                    )
                    home = move(b, away.pid, a, home=(a, home_pid))
                    assert_home_again(a, home_pid, home.pid, away.shadow_pid)

                    # Its descriptors are the very ones it had before it left:
                    # listener, the session's connection, control pipe (same inodes).
                    after = links(home.pid)
                    for number, target in before.items():
                        if target.startswith(("socket:", "pipe:")) and number != first_fd(
                            before, after
                        ):
                            assert after.get(number) == target, (number, before, after)
                    # Every TCP socket it holds is a real one: its peers are clients.
                    rows = ss_lines(a, home.pid)
                    assert [r[3] for r in rows if r[0] == "LISTEN"] == [f"127.0.0.1:{port}"]
                    assert {r[3] for r in rows} == {f"127.0.0.1:{port}"}, rows
                    assert ask(session, "home again") == "home again"

                    # Traffic now, straight to it: a third client, every stream to
                    # its end, every byte in order, and the shadow stays out of it.
                    with spawn_fixture(
                        "stream_client", "127.0.0.1", port, str(8 << 20), "73", netns=a.netns
                    ) as third:
                        third.assert_intact()
                    second.assert_intact()
                first.assert_intact()
            assert_home_again(a, home_pid, home.pid, away.shadow_pid)
            assert session.stdin is not None
            session.stdin.close()
            assert session.wait(EXIT_TIMEOUT) == 0
            output = finish_moved(server, home, tmp_path)
        assert "over 4 connections" in output, output


def children(pid: int) -> list[int]:
    """The children of `pid` (what its threads forked), but a daemon's relay forwarder."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            found += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return [child for child in found if not is_forwarder(child)]


def most_acknowledged(node: Node, port: str) -> int:
    """The most bytes one connection to 127.0.0.1:port in `node` has had acknowledged."""
    completed = node.run(
        ["ss", "-tinH", "state", "established", "dst", f"127.0.0.1:{port}"], timeout=10
    )
    return max(map(int, re.findall(r"bytes_acked:(\d+)", completed.stdout)), default=0)


def first_fd(before: dict[int, str], after: dict[int, str]) -> int:
    """The number the first streaming client had: it may have ended (and its descriptor
    been closed) before the process came home."""
    gone = [n for n, t in before.items() if t.startswith("socket:") and after.get(n) != t]
    return gone[0] if len(gone) == 1 else -1


# A python3 with a self-pipe (as event loops have): each stdin line goes through it and
# is answered with what came out, the pipe's two descriptor numbers first.
SELF_PIPE = """\
import os, sys
read_end, write_end = os.pipe()
print(read_end, write_end, flush=True)
for line in sys.stdin:
    os.write(write_end, line.encode())
    print(os.read(read_end, 1 << 16).decode().strip(), flush=True)
"""


def test_a_self_pipe_moved_away_and_home_again_is_a_real_pipe_again(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        for node in cluster:
            node.start_daemon()
        program = spawn_python(a, SELF_PIPE)
        try:
            read_end, write_end = map(int, read_line(program, LINE_TIMEOUT).split())
            assert ask(program, "at home") == "at home"
            before = links(program.pid)
            assert before[read_end] == before[write_end] and before[read_end].startswith("pipe:")
            away = move(a, program.pid, b)
            assert program.wait(EXIT_TIMEOUT) < 0  # the original, killed by the move
            assert ask_moved(program, "on b") == "on b"
            assert links(away.pid)[read_end].startswith("socket:")  # relayed there
            home = move(b, away.pid, a, home=(a, program.pid))
            assert_home_again(a, program.pid, home.pid, away.shadow_pid)
            after = links(home.pid)
            assert after[read_end] == after[write_end] == before[read_end], (before, after)
            assert after[0] == before[0] and after[1] == before[1], (before, after)  # stdio
            for word in ("home", "again"):
                assert ask_moved(program, word) == word
        finally:
            assert program.stdin is not None
            program.stdin.close()
        wait_gone(home.pid, EXIT_TIMEOUT, "the self-pipe program, its input ended")
        wait_gone(away.shadow_pid, EXIT_TIMEOUT, "its shadow, following it at home")


def test_an_idle_session_home_again_keeps_talking_through_its_own_socket(tmp_path: Path) -> None:
    """A client and a server both on node a; the client goes to b and back (its outgoing
    connection is handed back too), then talks on."""
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        for node in cluster:
            node.start_daemon()
        with spawn_fixture("echo_server", netns=a.netns) as server:
            port = str(server.ready["port"])
            session = spawn_python(a, ECHO_SESSION, "127.0.0.1", port)
            try:
                assert read_line(session, LINE_TIMEOUT) == "connected"
                assert ask(session, "at home") == "at home"
                before = links(session.pid)
                away = move(a, session.pid, b)
                assert ask_moved(session, "away") == "away"
                home = move(b, away.pid, a, home=(a, session.pid))
                assert_home_again(a, session.pid, home.pid, away.shadow_pid)
                sockets = {n: t for n, t in before.items() if t.startswith("socket:")}
                assert {n: links(home.pid)[n] for n in sockets} == sockets
                assert ask_moved(session, "home again") == "home again"

                # Attached again, its shadow holds what a dump --kill and a local
                # restore need: the very same socket, once more.
                image = tmp_path / "session.crf"
                a.hijack_ok("dump", home.pid, "-o", image, "--kill")
                restored = restored_pid(a.hijack_ok("restore", image))
                assert {n: links(restored)[n] for n in sockets} == sockets
                assert ask_moved(session, "restored") == "restored"
            finally:
                assert session.stdin is not None
                session.stdin.close()
            wait_gone(restored, EXIT_TIMEOUT, "the session, its input ended")
            server.close_control()
            assert server.wait_exit() == 0


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGKILL], ids=["INT", "KILL"])
def test_a_move_home_stopped_after_the_hand_back_leaves_the_relays_working(
    tmp_path: Path, signal_number: int
) -> None:
    """Stopped once the shadow has handed the originals back and the copy at home holds
    them (prepared), before the commit: the process runs on where it was, relayed as
    before (after `hijack recover` if the mover was killed), and goes home later."""
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        for node in cluster:
            node.start_daemon()
        assert a.daemon_endpoint is not None
        with spawn_fixture("echo_server", netns=a.netns) as server:
            home_pid = server.pid
            with session(server.ready["port"], a) as talk:
                talk("at home")
                away = move(a, home_pid, b)
                server.wait_exit()
                talk("away")
                mover = hijack_in(b, "move-prepared", "move", away.pid, "--to", a.daemon_endpoint)
                deliver(mover, signal_number)
                result = finish(mover, ("move",))
                assert result.returncode != 0, result.describe()
                assert runs_in(away.pid, b)
                shadow_log = a.state_dir / "shadows" / str(home_pid) / "shadow.log"
                assert "originals go back to the process at home" in shadow_log.read_text()
                if signal_number == signal.SIGKILL:
                    # The shadow waits (it relays nothing of those streams) until
                    # `hijack recover` on b tells it the move did not happen.
                    b.hijack_ok("recover")
                assert a.daemon is not None
                poll_until(lambda: not children(a.daemon.pid), "the copy at home gone")
                status = shadow_status(a, home_pid)
                assert (status["mode"], status["location"]) == ("away", "b"), status
                talk("relayed as before")
                home = move(b, away.pid, a, home=(a, home_pid))
                assert_home_again(a, home_pid, home.pid, away.shadow_pid)
                talk("home again")
            finish_moved(server, home, tmp_path)


# A python3 with bytes waiting in a self-pipe it reads only when told ("drain"); it
# answers every other stdin line at once.
LAZY_PIPE = """\
import os, sys
read_end, write_end = os.pipe()
os.write(write_end, b"queued before any move")
print("ready", flush=True)
for line in sys.stdin:
    if line == "drain\\n":
        print(os.read(read_end, 1 << 16).decode(), flush=True)
    else:
        print(line.strip(), flush=True)
"""


def test_a_process_that_does_not_read_its_relays_comes_home_relayed_and_later_unrelayed(
    tmp_path: Path,
) -> None:
    """Bytes it has not read are in no original: the move home relays it as before (and
    says why); once it has read them, the next move home gives it its own pipes."""
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        for node in cluster:
            node.start_daemon()
        assert a.daemon_endpoint is not None
        program = spawn_python(a, LAZY_PIPE)
        try:
            assert read_line(program, LINE_TIMEOUT) == "ready"
            home_pid = program.pid
            away = move(a, home_pid, b)
            assert ask_moved(program, "on b") == "on b"
            result = b.hijack("move", away.pid, "--to", a.daemon_endpoint, "--no-precopy")
            assert result.returncode == 0, result.describe()
            assert "home again, relayed by its shadow still: it did not catch up" in " ".join(
                result.stdout.split()
            ), result.describe()
            back = int(re.search(r"runs there as (\d+)", result.stdout)[1])  # type: ignore[index]
            status = shadow_status(a, home_pid)
            assert (status["mode"], status["location"]) == ("away", "a"), status
            assert ask_moved(program, "drain") == "queued before any move"  # once
            assert ask_moved(program, "relayed at home") == "relayed at home"

            away = move(a, back, b, home=(a, home_pid))
            home = move(b, away.pid, a, home=(a, home_pid))
            assert_home_again(a, home_pid, home.pid, away.shadow_pid)
            assert links(home.pid)[0].startswith("pipe:")
            assert ask_moved(program, "home") == "home"
        finally:
            assert program.stdin is not None
            program.stdin.close()
        wait_gone(home.pid, EXIT_TIMEOUT, "the lazy program, its input ended")
