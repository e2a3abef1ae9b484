"""The node daemon's policy and its resistance to a node of the cluster that breaks the rules.

- A daemon refuses a process with root's powers unless started with
  --allow-root: by name, before it makes anything; the original runs on.
- A process of an unprivileged user moves to a daemon without --allow-root.
- A peer with a certificate of the cluster (node "rude") that passes the
  TLS handshake and then sends garbage (bad frames,
  oversized lengths, truncated streams, malformed requests, a broken image)
  gets a refusal the daemon logs in one line; the daemon stays up, starts
  nothing, and serves the next good move.
- The policy itself (hijack.node.policy) on records: root's powers, files
  mapped from this node that changed, code mapped shared.

The cluster helpers come from test_move.py (see its docstring).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import spawn_fixture
from support.nodes import Cluster, Node
from support.tempdirs import make_temp_dir, remove_temp_dir
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
)

from hijack.image import records as rec
from hijack.image.identity import file_identity
from hijack.node import pki, policy
from hijack.registry import Registry

NOBODY = 65534
STREAM = str(4 * 1024 * 1024)  # bytes a stream_client echoes through the server under test


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.MULTILINE)[1])  # type: ignore[index]


# -- the policy on a real daemon ----------------------------------------------------------


def test_a_daemon_without_allow_root_refuses_a_root_process_by_name(tmp_path: Path) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon(allow_root=False)
        assert b.daemon is not None
        with spawn_fixture("echo_server", netns=a.netns) as server:
            port = server.ready["port"]
            with spawn_fixture(
                "stream_client", "127.0.0.1", port, STREAM, "7", netns=a.netns
            ) as client:
                line = move_refused(a, server.pid, b)
                assert f"b: refusing echo_server (pid {server.pid})" in line, line
                assert "root's powers (uid 0, gid 0" in line, line
                assert "--allow-root" in line, line
                refusal = poll_until(
                    lambda: re.search(r"move \S+ failed: (refusing echo_server.*)", daemon_log(b)),
                    "b logs the refusal",
                )
                assert refusal[1] in line
                # Nothing was made for it there: no process, no relay, no listener.
                assert pids_inside(b) == {b.daemon.pid}
                assert "Traceback" not in daemon_log(b)
                assert_untouched(server.pid)
                assert_not_attached(a, server.pid)  # attached by the move, detached again
                with Registry(a.state_dir) as registry:
                    (record,) = registry.moves()
                assert record.phase == "failed" and "refusing" in (record.error or ""), record
                client.assert_intact(EXIT_TIMEOUT)
            server.assert_intact()
        assert f"echoed {STREAM} bytes over 1 connections" in server.stdout


@contextlib.contextmanager
def reachable_by_others() -> Iterator[Path]:
    """A directory others may traverse (0711), for a cluster whose shadows run as nobody.

    pytest's tmp_path is under /tmp/pytest-of-root (0700): a shadow running as
    its target's user could not reach its directory in the node's state there.
    """
    directory = make_temp_dir("hijack-trust-")
    try:
        directory.chmod(0o711)
        yield directory
    finally:
        remove_temp_dir(directory)


def test_a_process_of_an_unprivileged_user_moves_to_a_daemon_without_allow_root() -> None:
    with reachable_by_others() as where, Cluster(where, nodes=2) as cluster:
        a, b = cluster.nodes
        b.start_daemon(allow_root=False)
        with spawn_fixture("echo_server", netns=a.netns, user=NOBODY) as server:
            assert uid_of(server.pid) == NOBODY
            port = server.ready["port"]
            with spawn_fixture(
                "stream_client", "127.0.0.1", port, STREAM, "8", netns=a.netns
            ) as client:
                moved = move(a, server.pid, b)
                assert uid_of(moved.pid) == NOBODY
                server.wait_exit()
                client.assert_intact(EXIT_TIMEOUT)
            output = finish_moved(server, moved, where)
        assert f"echoed {STREAM} bytes over 1 connections" in output


# -- a node of the cluster that breaks the protocol -----------------------------------------

# Passes the TLS handshake with a certificate of the cluster (node "rude"),
# then breaks the protocol as argv[3] says; prints what the daemon answered
# (or how it hung up).
RUDE_PEER = """\
import json, socket, sys
import struct
from hijack.errors import HijackError
from hijack.image.codec import FORMAT_VERSION
from hijack.node import pki
from hijack.node.channel import HEAD, MAX_FRAME, Channel, Kind
host, port, case = sys.argv[1], int(sys.argv[2]), sys.argv[3]
channel = Channel.connect((host, port), pki.load_identity())
request = {"op": "move", "move": "rude-" + case, "program": "none",
           "home": {"node": "a", "pid": 1, "relay": "127.0.0.1:9", "token": "00"}, "proxies": []}
signature = b"CRF\\0" + struct.pack("<I", FORMAT_VERSION)
raw = {
    "garbage": b"\\xff" * 64,
    "oversized-length": HEAD.pack(Kind.MESSAGE, MAX_FRAME + 1),
    "truncated-frame": HEAD.pack(Kind.MESSAGE, 100) + b"{" * 10,
    "unknown-kind": HEAD.pack(9, 2) + b"{}",
}
try:
    if case in raw:
        channel.sock.sendall(raw[case])
    elif case == "not-json":
        channel.send_frame(Kind.MESSAGE, b"\\xff{")
    elif case == "data-first":
        channel.send_frame(Kind.DATA, b"x")
    elif case == "unknown-op":
        channel.send({"op": "format-disk"})
    elif case == "malformed-move":
        channel.send({"op": "move", "move": "m", "home": "nowhere"})
    elif case == "garbage-image":
        channel.send(request)
        channel.send_frame(Kind.DATA, b"junk" * 1000)
        channel.send_frame(Kind.DATA_END, b"")
    elif case == "truncated-image":
        channel.send(request)
        channel.send_frame(Kind.DATA, signature + b"HEAD")
    elif case == "message-inside-image":
        channel.send(request)
        channel.send_frame(Kind.DATA, signature)
        channel.send({"op": "commit"})
    try:
        # The TCP socket's shutdown: SSLSocket's would drop TLS for the read below.
        socket.socket.shutdown(channel.sock, socket.SHUT_WR)
    except OSError:
        pass  # the daemon hung up first: what it said, if anything, is still to read
    print("answer", channel.receive())
except HijackError as error:
    print("hung up", error)
"""

RUDE_CASES = {
    "garbage": "sent a frame of 4294967295 bytes",
    "oversized-length": f"sent a frame of {16 * 1024 * 1024 + 1} bytes",
    "truncated-frame": "rude closed the connection",
    "unknown-kind": "rude sent a frame of unknown kind 9",
    "not-json": "rude sent a malformed message",
    "data-first": "rude sent a data frame where a message was due",
    "unknown-op": "unknown op 'format-disk'",
    "malformed-move": "malformed move request",
    "garbage-image": "move rude-garbage-image failed: not a CRF image (bad signature)",
    "truncated-image": "move rude-truncated-image failed: rude closed the connection",
    "message-inside-image": "rude sent a message inside the image stream",
}


def rude_peer(node: Node, host: str, port: str, case: str) -> subprocess.CompletedProcess[str]:
    """RUDE_PEER run in `node` as node "rude" (its certificate, issued in the cluster)."""
    command = [sys.executable, "-c", RUDE_PEER, host, port, case]
    return node.run(command, timeout=EXIT_TIMEOUT, env={"HIJACK_NODE": "rude"})


def test_a_node_sending_garbage_is_refused_and_the_daemon_serves_on(
    tmp_path: Path,
) -> None:
    with Cluster(tmp_path, nodes=2) as cluster:
        a, b = cluster.nodes
        pki.add_node(cluster.pki_dir, "rude", a.address)
        b.start_daemon()
        assert b.daemon is not None and b.daemon_endpoint is not None
        host, port = b.daemon_endpoint.rsplit(":", 1)
        for case, logged in RUDE_CASES.items():
            completed = rude_peer(a, host, port, case)
            assert completed.returncode == 0, f"{case}: {completed.stderr}"
            print(f"{case}: {completed.stdout.strip()}")
            poll_until(lambda logged=logged: logged in daemon_log(b), f"b logs {logged!r}")
            assert b.daemon.poll() is None, f"the daemon died of {case}\n{daemon_log(b)}"
            assert pids_inside(b) == {b.daemon.pid}, case
        answers = {"unknown-op": "format-disk", "malformed-move": "malformed move request"}
        for case, answer in answers.items():
            completed = rude_peer(a, host, port, case)
            assert answer in completed.stdout, completed.stdout
        assert "Traceback" not in daemon_log(b), daemon_log(b)

        # And it still serves a good move.
        with spawn_fixture("echo_server", netns=a.netns) as server:
            moved = move(a, server.pid, b)
            server.wait_exit()
            finish_moved(server, moved, tmp_path)


# -- the policy on records (pure) ----------------------------------------------------------


def credentials(**changes: object) -> rec.Credentials:
    ids = {name: NOBODY for name in ("uid", "euid", "suid", "fsuid", "gid", "egid", "sgid")}
    base = rec.Credentials(
        **ids,
        fsgid=NOBODY,
        cap_inheritable=0,
        cap_permitted=0,
        cap_effective=0,
        cap_bounding=(1 << 41) - 1,
        cap_ambient=0,
        umask=0o22,
        no_new_privs=False,
        groups=(),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


HEADER = rec.ImageHeader(
    pid=4242,
    ppid=1,
    pgid=4242,
    sid=4242,
    created_ns=0,
    options=rec.DumpOptions(0),
    comm="server",
    argv=("/usr/bin/server",),
    exe="/usr/bin/server",
    node="a",
)
NO_SEGMENTS = rec.Segments(segments=())


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"euid": 0}, "uid 0"),
        ({"fsuid": 0}, "uid 0"),
        ({"sgid": 0}, "gid 0"),
        ({"groups": (27, 0)}, "gid 0"),
        ({"cap_effective": 1 << 21}, "effective capabilities 0x200000"),
        ({"cap_ambient": 1 << 10}, "ambient capabilities 0x400"),
    ],
)
def test_root_powers_are_refused_by_name_unless_allowed(
    changes: dict[str, object], named: str
) -> None:
    root_ish = credentials(**changes)
    with pytest.raises(policy.Refused) as refused:
        policy.check_image(HEADER, (root_ish,), NO_SEGMENTS, allow_root=False)
    message = str(refused.value)
    assert message.startswith("refusing server (pid 4242): it runs with root's powers ("), message
    assert named in message and "--allow-root" in message, message
    policy.check_image(HEADER, (root_ish,), NO_SEGMENTS, allow_root=True)
    policy.check_image(HEADER, (credentials(),), NO_SEGMENTS, allow_root=False)
    # A thread's own credentials (THREAD_CREDENTIALS) are judged as the process's: it
    # shares the memory of a leader without those powers.
    with pytest.raises(policy.Refused, match=named):
        policy.check_image(HEADER, (credentials(), root_ish), NO_SEGMENTS, allow_root=False)


def file_segment(path: Path, identity: rec.FileIdentity | None, **changes: object) -> rec.Segment:
    segment = rec.Segment(
        start=0x400000,
        end=0x401000,
        prot=rec.Prot.READ | rec.Prot.EXEC,
        shared=False,
        offset=0,
        dev_major=0,
        dev_minor=0,
        inode=1,
        contents=rec.ContentsKind.FILE if identity else rec.ContentsKind.NONE,
        path=str(path),
        vm_flags=(),
        file=identity,
    )
    return dataclasses.replace(segment, **changes)  # type: ignore[arg-type]


def test_a_mapped_file_is_verified_by_size_time_and_build_id(tmp_path: Path) -> None:
    binary = Path(os.readlink("/proc/self/exe"))  # an ELF with a build-id
    identity = file_identity(str(binary), str(binary))
    assert identity.build_id, f"{binary} has no build-id"
    user = credentials()

    def check(identity: rec.FileIdentity) -> None:
        segments = rec.Segments(segments=(file_segment(binary, identity),))
        policy.check_image(HEADER, (user,), segments, allow_root=False)

    check(identity)
    for changed, differs in [
        ({"size": identity.size + 1}, f"size {identity.size + 1} -> {identity.size}"),
        ({"mtime_ns": identity.mtime_ns - 1}, "modification time"),
        ({"build_id": bytes(20)}, "ELF build-id"),
    ]:
        with pytest.raises(policy.HijackError) as refused:
            check(dataclasses.replace(identity, **changed))  # type: ignore[arg-type]
        assert str(refused.value) == (
            f"{binary} changed since the dump ({differs}); refusing to map it"
        ), refused.value
    missing = dataclasses.replace(identity, path=str(tmp_path / "gone"))
    with pytest.raises(policy.HijackError, match=r"/gone, mapped by the image, cannot be opened"):
        check(missing)


def test_code_mapped_shared_from_a_file_is_refused(tmp_path: Path) -> None:
    library = tmp_path / "code.bin"
    library.write_bytes(bytes(4096))
    segment = file_segment(library, None, shared=True)
    with pytest.raises(policy.Refused, match=r"maps .*code\.bin shared and executable"):
        policy.check_image(
            HEADER, (credentials(),), rec.Segments(segments=(segment,)), allow_root=True
        )
    data = dataclasses.replace(segment, prot=rec.Prot.READ | rec.Prot.WRITE)
    policy.check_image(HEADER, (credentials(),), rec.Segments(segments=(data,)), allow_root=False)
