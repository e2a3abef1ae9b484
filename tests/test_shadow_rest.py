"""Shadows that weigh little: an idle shadow rests as its native holder, and one process's
shadow or relay failing leaves every other attached process's streams as they were.

A shadow with nothing to relay execve's hijack/native/shadow-holder after
HIJACK_SHADOW_REST seconds idle (0 here: at its first look, a second after its
last request); the holder follows the process as the shadow does, answers
`status` from the shadow's last answer while it holds the same, and execve's
the Python shadow again at any other request (hijack/shadow/holder.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import spawn_fixture
from support.cli import HijackCli
from support.nodes import Cluster, read_line
from test_attach import reap_exited, same_open_file
from test_dump_restore import restored_pid
from test_faults import reap, session, shadow_pid_of
from test_move import logs, move, shadow_status

from hijack.shadow import control, holder

REST_TIMEOUT = 60.0  # for a shadow to rest or wake (a Python start on a loaded machine)


@pytest.fixture(autouse=True)
def rest_at_once(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HIJACK_SHADOW_REST", "0")  # the attach hands it to the shadow
    yield


def resting(pid: int) -> bool:
    return os.path.basename(os.readlink(f"/proc/{pid}/exe")) == holder.PROGRAM.name


def wait_for(condition: str, check: object) -> None:
    """Bounded poll: resting has no event to wait on (the shadow's form is its exe)."""
    assert callable(check)
    deadline = time.monotonic() + REST_TIMEOUT
    while not check():
        assert time.monotonic() < deadline, f"not {condition} within {REST_TIMEOUT} s"
        time.sleep(0.05)


def private_dirty_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    raise AssertionError("no Private_Dirty in smaps_rollup")


def test_an_idle_shadow_rests_follows_its_process_and_wakes_for_a_request(
    hijack: HijackCli,
) -> None:
    with (
        spawn_fixture("echo_server") as server,
        socket.create_connection(("127.0.0.1", int(server.ready["port"])), timeout=60) as peer,
    ):
        peer.sendall(b"ping")
        assert peer.recv(4) == b"ping"
        info = json.loads(hijack.ok("attach", "--json", server.pid).stdout)
        shadow, path = info["shadow_pid"], info["control"]
        wait_for("resting", lambda: resting(shadow))
        # The same process, holding the same open files (kcmp), in a fraction of the memory.
        assert private_dirty_kib(shadow) < 1024
        for entry in info["fds"]:
            assert same_open_file(server.pid, entry["fd"], shadow, entry["own_fd"])
        # `status` is answered by the holder itself: it stays at rest.
        rested = control.request(path, {"op": "status"})
        assert [e["fd"] for e in rested["fds"]] == [e["fd"] for e in info["fds"]]
        assert resting(shadow)
        # It follows the process: the server closes its end of the connection once
        # ours is closed, and the FIN only goes once the holder let go of its copy.
        peer.shutdown(socket.SHUT_WR)
        peer.settimeout(60.0)
        assert peer.recv(1) == b"", "the server's end was not closed"
        # Another request wakes the Python shadow, which knows what it holds now.
        held = control.request(path, {"op": "status"}, timeout=REST_TIMEOUT)
        assert held["shadow_pid"] == shadow and held["started_at"] == rested["started_at"]
        assert {e["fd"] for e in held["fds"]} < {e["fd"] for e in info["fds"]}
        for entry in held["fds"]:
            assert same_open_file(server.pid, entry["fd"], shadow, entry["own_fd"])
        wait_for("resting again", lambda: resting(shadow))
        # The process ends: so does its resting shadow, saying why beside its socket.
        server.close_control()
        server.assert_intact()
        reap_exited(shadow)
        ended = Path(path).parent / "ended"
        assert ended.read_text() == f"process {server.pid} exited\n"
        hijack.ok("recover")


def test_a_resting_shadow_holds_a_checkpointed_process_and_gives_it_back(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "echo.img"
    with (
        spawn_fixture("echo_server") as server,
        socket.create_connection(("127.0.0.1", int(server.ready["port"])), timeout=60) as peer,
    ):
        peer.sendall(b"one")
        assert peer.recv(3) == b"one"
        info = json.loads(hijack.ok("attach", "--json", server.pid).stdout)
        shadow = info["shadow_pid"]
        wait_for("resting", lambda: resting(shadow))
        hijack.ok("dump", server.pid, "-o", image, "--kill")
        assert server.wait_exit() == -signal.SIGKILL
        # Holding: the connection stays open in the shadow, at rest again.
        wait_for("resting while holding", lambda: resting(shadow))
        assert control.request(info["control"], {"op": "status"})["mode"] == "holding"
        pid = restored_pid(hijack.ok("restore", image))
        server.adopt(pid)
        peer.settimeout(60.0)
        peer.sendall(b"two")
        assert peer.recv(3) == b"two"
        answer = control.request(info["control"], {"op": "status"}, timeout=REST_TIMEOUT)
        assert (answer["mode"], answer["target_pid"]) == ("home", pid)
        hijack.ok("detach", pid)
        reap_exited(shadow)
        peer.close()
        server.close_control()
        server.assert_intact()


def test_one_shadow_killed_and_one_peer_gone_leave_the_others_streams_untouched(
    tmp_path: Path,
) -> None:
    """Three echo servers moved a -> b, each with a client at home whose stream their
    own shadow relays: the first's shadow is killed, the second's client is killed;
    the third talks on throughout, and the second's shadow stays up."""
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon()
        with (
            spawn_fixture("echo_server", netns=a.netns) as first,
            spawn_fixture("echo_server", netns=a.netns) as second,
            spawn_fixture("echo_server", netns=a.netns) as third,
            session(first.ready["port"], a) as talk_first,
            session(third.ready["port"], a) as talk_third,
        ):
            client = a.spawn(
                [sys.executable, "-c", PEER, str(second.ready["port"])],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            assert read_line(client, REST_TIMEOUT) == "connected"
            moved = {}
            for server in (first, second, third):
                moved[server.pid] = move(a, server.pid, b)
            talk_first("moved")
            talk_third("moved")
            shadows = {pid: shadow_pid_of(a, pid) for pid in moved}
            assert len(set(shadows.values())) == 3, "one shadow for each process"
            os.kill(shadows[first.pid], signal.SIGKILL)
            reap([shadows[first.pid]])
            client.kill()
            client.wait()
            assert client.stdout is not None
            client.stdout.close()
            # The first's client sees its connection end (its shadow is gone) ...
            assert talk_first("after", echoed=False) in ("EOF", "RESET ConnectionResetError")
            # ... the third's goes on as before, and the second's shadow still answers.
            for number in range(20):
                talk_third(f"still {number}")
            status = shadow_status(a, second.pid)
            assert status["shadow_pid"] == shadows[second.pid], logs(tmp_path)
            assert shadow_status(a, third.pid)["shadow_pid"] == shadows[third.pid]
            talk_third("last")


# A client of the echo server at 127.0.0.1:argv[1] that keeps one connection open.
PEER = """\
import socket, sys, time
connection = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
connection.sendall(b"hello\\n")
assert connection.recv(6) == b"hello\\n"
print("connected", flush=True)
time.sleep(3600)
"""
