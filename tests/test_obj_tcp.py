"""Established TCP connections survive `dump --kill` + `restore` without attach.

The echo server is dumped with --kill while a client streams a checksummed
stream through it: its connection is checkpointed with TCP_REPAIR, locked
(nftables, through pyroute2) while the server is gone, and rebuilt by the
restore. The client, untouched, must see every byte echoed in order and no
reset; the server must end intact.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from support import spawn_fixture
from support.cli import HijackCli, restored_pid

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
def hijack(tmp_path: Path) -> HijackCli:
    return HijackCli(tmp_path / "state")


def test_a_server_killed_mid_stream_and_restored_keeps_its_client(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "echo.crf"
    with spawn_fixture("echo_server", fifos=True) as server:
        port = server.ready["port"]
        with spawn_fixture(
            "stream_client", "127.0.0.1", port, str(STREAM_BYTES), "7"
        ) as client:
            wait_for_connection(server.pid)
            hijack.ok("dump", server.pid, "-o", image, "--kill")
            assert server.wait_exit() == -signal.SIGKILL
            # Until the restore, what the client sends is dropped, not answered by a reset.
            assert len(netlock.locks_held(client.pid)) == 1
            shown: dict[str, Any] = json.loads(hijack.ok("show", "--json", image).stdout)
            [connection] = [o for o in shown["objects"] if o["record"] == "TcpConnection"]
            assert connection["local_address"] == f"127.0.0.1:{port}"
            assert "tcp: 127.0.0.1:" in hijack.ok("show", image).stdout

            pid = restored_pid(hijack.ok("restore", image))
            server.adopt(pid)
            assert netlock.locks_held(client.pid) == []
            # The client goes on to the end of its stream, every echoed byte checked.
            assert client.wait_exit(timeout=120) == 0, client.describe()
        server.assert_intact()
    assert "echoed" in server.stdout

