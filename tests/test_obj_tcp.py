"""Established TCP connections survive `dump --kill` + `restore` without attach.

The echo server is dumped with --kill while a client streams a checksummed
stream through it: its connection is checkpointed with TCP_REPAIR, locked
(nftables, through pyroute2) while the server is gone, and rebuilt by the
restore. The client, untouched, must see every byte echoed in order and no
reset; the server must end intact.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from support import spawn_fixture
from support.cli import HijackCli, restored_pid
from support.procview import has_exited
from support.redis import REDIS_SERVER, Resp, redis_server

from hijack.sys import netlock, procfs

STREAM_BYTES = 512 * 1024 * 1024  # long enough to be mid-stream at the dump
POLL_TIMEOUT = 10.0


def wait_for_connection(pid: int) -> None:
    """Until `pid` holds an established TCP connection (it accepted its client); bounded."""
    deadline = time.monotonic() + POLL_TIMEOUT
    while time.monotonic() < deadline:
        sockets = procfs.read_socket_table(pid)
        inodes = {entry.ino for entry in procfs.list_fds(pid)}
        if any(s.state == "ESTABLISHED" for ino, s in sockets.items() if ino in inodes):
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} accepted no connection within {POLL_TIMEOUT} s")


@pytest.fixture
def hijack(tmp_path: Path, no_leaked_network_locks: None) -> HijackCli:
    return HijackCli(tmp_path / "state")


def test_a_server_killed_mid_stream_and_restored_keeps_its_client(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "echo.crf"
    with spawn_fixture("echo_server", fifos=True) as server:
        port = server.ready["port"]
        with spawn_fixture("stream_client", "127.0.0.1", port, str(STREAM_BYTES), "7") as client:
            wait_for_connection(server.pid)
            locks_before = set(netlock.locks_held(client.pid))  # another suite's may be there
            hijack.ok("dump", server.pid, "-o", image, "--kill")
            assert server.wait_exit() == -signal.SIGKILL
            # Until the restore, what the client sends is dropped, not answered by a reset.
            assert len(set(netlock.locks_held(client.pid)) - locks_before) == 1
            shown: dict[str, Any] = json.loads(hijack.ok("show", "--json", image).stdout)
            [connection] = [o for o in shown["objects"] if o["record"] == "TcpConnection"]
            assert connection["local_address"] == f"127.0.0.1:{port}"
            assert "tcp: 127.0.0.1:" in hijack.ok("show", image).stdout

            pid = restored_pid(hijack.ok("restore", image))
            server.adopt(pid)
            assert set(netlock.locks_held(client.pid)) == locks_before
            # The client goes on to the end of its stream, every echoed byte checked.
            assert client.wait_exit(timeout=120) == 0, client.describe()
        server.assert_intact()
    assert "echoed" in server.stdout


@pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not installed (`make test` installs it: apt-get install redis-server)",
)
def test_an_unattached_redis_server_keeps_its_clients_through_dump_kill_and_restore(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "redis.crf"
    with redis_server(tmp_path) as (server, port, log):
        client = Resp(port)
        assert client.command("SET", "before", "the dump") == b"OK"
        hijack.ok("dump", server.pid, "-o", image, "--kill")
        assert server.wait(timeout=30) == -signal.SIGKILL
        # Sent while redis is gone: the lock holds it back until the restore.
        client.send("GET", "before")
        restored = restored_pid(hijack.ok("restore", image))
        other: Resp | None = None
        try:
            assert restored == server.pid
            assert client.reply() == b"the dump"
            assert client.command("SET", "after", "the restore") == b"OK"
            other = Resp(port)
            assert other.command("GET", "after") == b"the restore"
            client.send("SHUTDOWN", "NOSAVE")
            assert client.closed_by_peer()
            # A clean end: it is our child now (the suite is a subreaper).
            _, status = os.waitpid(restored, 0)
            assert os.waitstatus_to_exitcode(status) == 0, log.read_text()
        finally:
            if not has_exited(restored):
                os.kill(restored, signal.SIGKILL)
                os.waitpid(restored, 0)
            client.close()
            if other is not None:
                other.close()
