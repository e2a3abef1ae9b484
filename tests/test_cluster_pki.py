"""The cluster's certificates (hijack/node/pki.py): `hijack cluster init/add-node/revoke`
write a CA, node keys and a revocation list; a TLS 1.3 handshake between two nodes
succeeds only with certificates of the cluster's CA, in date, not revoked, naming
the node each side expects."""

from __future__ import annotations

import datetime
import socket
import stat
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.cli import HijackCli

from hijack.errors import HijackError
from hijack.node import pki

DEADLINE = 5.0
# Whichever side checks first: the server names the issuer, the client hears its alert.
UNKNOWN_CA = r"unknown ca|unable to get local issuer"


@pytest.fixture
def cli(tmp_path: Path) -> HijackCli:
    return HijackCli(tmp_path / "state")


def test_cluster_commands_write_the_documented_layout(cli: HijackCli, tmp_path: Path) -> None:
    directory = tmp_path / "pki"
    cli.ok("cluster", "init", "--pki", directory)
    cli.ok("cluster", "add-node", "a", "--address", "10.0.0.1", "--pki", directory)
    cli.ok("cluster", "add-node", "b", "--pki", directory)
    for path in ("ca.key", "ca.crt", "revoked.crl", "nodes/a.key", "nodes/a.crt", "nodes/b.key"):
        assert stat.S_IMODE((directory / path).stat().st_mode) == 0o600, path
    assert not list(pki.load_crl(directory))
    cli.ok("cluster", "revoke", "b", "--pki", directory)
    assert len(list(pki.load_crl(directory))) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ("add-node", "../evil"),
        ("add-node", ""),
        ("revoke", "nobody"),
        ("init", "--key", "cluster.key"),
    ],
)
def test_bad_cluster_commands_say_one_line(
    cli: HijackCli, tmp_path: Path, argv: tuple[str, ...]
) -> None:
    directory = tmp_path / "pki"
    pki.init_ca(directory)
    result = cli(*("cluster", *argv, "--pki", directory))
    assert result.returncode == 1, result
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr


def test_a_node_is_not_issued_twice_nor_the_ca_made_twice(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    pki.add_node(tmp_path, "a")
    with pytest.raises(HijackError, match="already"):
        pki.add_node(tmp_path, "a")
    with pytest.raises(HijackError, match="exists already"):
        pki.init_ca(tmp_path)


def _handshake(
    server_dir: Path, server_name: str, client_dir: Path, client_name: str
) -> tuple[str | None, str | None]:
    """Handshake over loopback TCP; (name the server saw, name the client saw), or raise."""
    server_context = pki.server_context(server_dir, server_name)
    client_context = pki.client_context(client_dir, client_name)
    seen: dict[str, str | BaseException] = {}
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with pki.handshake(conn, server_context, server=True, deadline=DEADLINE) as tls:
                    seen["server"] = pki.peer_name(tls)
                    tls.sendall(b"k")
            except BaseException as exc:  # reported to the test's thread
                seen["server"] = exc
            finally:
                conn.close()

        thread = threading.Thread(target=serve)
        thread.start()
        client_error: BaseException | None = None
        try:
            with (
                socket.create_connection(("127.0.0.1", port)) as sock,
                pki.handshake(sock, client_context, server=False, deadline=DEADLINE) as tls,
            ):
                client_saw = pki.peer_name(tls)
                if not tls.recv(1):  # TLS 1.3: the server's verdict on us arrives after
                    raise OSError("the server hung up")
        except (HijackError, OSError) as exc:
            client_error = exc
        finally:
            thread.join()
    server_saw = seen["server"]
    if isinstance(server_saw, BaseException):  # the server's reason is the one to read
        raise server_saw
    if client_error is not None:
        raise client_error
    return server_saw, client_saw


def _refused(server_dir: Path, client_dir: Path, reason: str, client_name: str = "b") -> None:
    with pytest.raises(HijackError, match=reason):
        _handshake(server_dir, "a", client_dir, client_name)


def test_two_nodes_of_one_cluster_meet_and_name_each_other(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    pki.add_node(tmp_path, "a")
    pki.add_node(tmp_path, "b")
    assert _handshake(tmp_path, "a", tmp_path, "b") == ("b", "a")


def test_a_node_of_another_ca_is_refused(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    for directory in (ours, theirs):
        pki.init_ca(directory)
        pki.add_node(directory, "a")
        pki.add_node(directory, "b")
    _refused(ours, theirs, UNKNOWN_CA)
    with pytest.raises(HijackError, match=UNKNOWN_CA):
        _handshake(theirs, "a", ours, "b")  # whichever side looks first


def test_an_expired_certificate_is_refused(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    pki.add_node(tmp_path, "a")
    now = datetime.datetime.now(datetime.UTC)
    pki.add_node(
        tmp_path,
        "b",
        not_before=now - datetime.timedelta(days=10),
        not_after=now - datetime.timedelta(days=1),
    )
    _refused(tmp_path, tmp_path, "certificate is refused: certificate has expired")


def test_a_revoked_node_is_refused_and_the_others_still_meet(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    for name in ("a", "b", "c"):
        pki.add_node(tmp_path, name)
    pki.revoke(tmp_path, "b")
    _refused(tmp_path, tmp_path, "certificate is refused: certificate revoked", "b")
    assert _handshake(tmp_path, "a", tmp_path, "c") == ("c", "a")


def test_a_peer_naming_another_node_is_refused_by_name(tmp_path: Path) -> None:
    pki.init_ca(tmp_path)
    pki.add_node(tmp_path, "a")
    pki.add_node(tmp_path, "b")
    server_saw, _ = _handshake(tmp_path, "a", tmp_path, "b")
    assert server_saw == "b"
    server = pki.server_context(tmp_path, "a")
    client = pki.client_context(tmp_path, "b")
    left, right = socket.socketpair()
    with left, right:
        thread = threading.Thread(
            target=lambda: pki.handshake(left, server, server=True, deadline=DEADLINE)
        )
        thread.start()
        tls = pki.handshake(right, client, server=False, deadline=DEADLINE)
        thread.join()
        pki.expect_peer(tls, "a")
        with pytest.raises(HijackError, match="names node 'a', not 'c'"):
            pki.expect_peer(tls, "c")


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(damage=st.binary(max_size=400))
def test_damaged_ca_and_revocation_files_are_one_clear_error(tmp_path: Path, damage: bytes) -> None:
    directory = tmp_path / "pki"
    if not (directory / "ca.key").exists():
        pki.init_ca(directory)
        pki.add_node(directory, "a")
    crl = directory / "revoked.crl"
    good = crl.read_bytes()
    crl.write_bytes(b"-----BEGIN X509 CRL-----\n" + damage)
    try:
        with pytest.raises(HijackError):
            pki.load_crl(directory)
        with pytest.raises(HijackError):
            pki.revoke(directory, "a")
    finally:
        crl.write_bytes(good)
