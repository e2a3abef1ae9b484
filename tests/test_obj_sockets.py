"""Sockets of other families come back from the image alone (`dump --kill`, no attach).

The `udp_sockets` fixture (tests/fixtures/udp_sockets.c) holds IPv4 and IPv6
UDP sockets bound, connected, never bound, with datagrams not yet read; after
`dump --kill` and `restore` it reads every datagram, checks its sender and
boundaries, and sends new ones; `socket_options` sets options on a TCP
listener, a TCP connection and a UDP socket, and reads them back; `netlink`
holds netlink sockets bound and not, with groups; `raw_sockets` raw IPv4 and
IPv6 sockets with their options. The /proc
views of its descriptors agree before and after (but for the sockets' inode
numbers).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
from support import spawn_fixture
from support.cli import HijackCli
from support.objects import (
    compare_views,
    dump_kill,
    objects_of,
    proc_views,
    restore_adopted,
    shown_json,
    without_socket_inodes,
)

from hijack.sys import netlock


@pytest.fixture
def hijack(tmp_path: Path, no_leaked_network_locks: None) -> HijackCli:
    return HijackCli(tmp_path / "state")


def test_udp_sockets_with_queued_datagrams_come_back(hijack: HijackCli, tmp_path: Path) -> None:
    image = tmp_path / "udp.crf"
    with spawn_fixture("udp_sockets", fifos=True) as fixture:
        port = fixture.ready["port"]
        before = proc_views(fixture.pid, without_socket_inodes, views=("fd",))
        dump_kill(hijack, fixture, image)

        shown = shown_json(hijack, image)
        udp = objects_of(shown, "UdpSocket")
        assert len(udp) == 8, udp
        [server] = [o for o in udp if o["local_address"] == f"127.0.0.1:{port}"]
        assert [d["length"] for d in server["queue"]] == [5, 0, 3000, 4]
        assert server["data_bytes"] == 3009
        text = hijack.ok("show", image).stdout
        assert f"udp: 127.0.0.1:{port}, 4 datagrams (3009 bytes) queued" in text, text
        assert "udp: unbound, 0 datagrams" in text, text

        compare_views(before, restore_adopted(hijack, fixture, image), without_socket_inodes)
        fixture.assert_intact()


def test_a_udp_peer_gets_no_refusal_while_the_process_is_gone(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "udp-echo.crf"
    with (
        spawn_fixture("udp_echo", fifos=True) as fixture,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer,
    ):
        peer.settimeout(10)
        peer.connect(("127.0.0.1", int(fixture.ready["connected_port"])))
        peer.send(b"before the dump")
        assert peer.recv(100) == b"before the dump"
        locks_before = set(netlock.locks_held(os.getpid()))
        dump_kill(hijack, fixture, image)
        # Both its bound sockets are locked until the restore.
        assert len(set(netlock.locks_held(os.getpid())) - locks_before) == 2
        # Dropped: no ICMP port unreachable, which loopback would have queued on the
        # peer's socket at once (its next send or recv would raise ECONNREFUSED).
        peer.send(b"while it is gone")
        peer.send(b"while it is gone, again")

        restore_adopted(hijack, fixture, image)
        assert set(netlock.locks_held(os.getpid())) == locks_before
        peer.send(b"after the restore")
        assert peer.recv(100) == b"after the restore"
        fixture.assert_intact()


def test_a_plain_dump_leaves_the_datagrams_queued(hijack: HijackCli, tmp_path: Path) -> None:
    with spawn_fixture("udp_sockets", fifos=True) as fixture:
        hijack.ok("dump", fixture.pid, "-o", tmp_path / "udp.crf")
        fixture.assert_intact()


def test_socket_options_read_back_the_same(hijack: HijackCli, tmp_path: Path) -> None:
    image = tmp_path / "options.crf"
    with socket.create_server(("127.0.0.1", 0)) as peer:
        port = peer.getsockname()[1]
        with spawn_fixture("socket_options", str(port), fifos=True) as fixture:
            held, _ = peer.accept()  # the other end of the fixture's connection
            with held:
                before = proc_views(fixture.pid, without_socket_inodes, views=("fd",))
                dump_kill(hijack, fixture, image)

                shown = shown_json(hijack, image)
                kept = objects_of(shown, "SocketOptions")
                assert len(kept) == 3, kept
                [filtered] = [o for o in kept if o["filter"]]
                assert filtered["filter_locked"] and len(filtered["filter"]) == 2 * 16
                text = hijack.ok("show", image).stdout
                assert "a filter of 2 instructions (locked)" in text, text

                compare_views(
                    before, restore_adopted(hijack, fixture, image), without_socket_inodes
                )
                fixture.assert_intact()


def test_netlink_sockets_come_back_with_their_port_and_groups(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "netlink.crf"
    with spawn_fixture("netlink", fifos=True) as fixture:
        before = proc_views(fixture.pid, without_socket_inodes, views=("fd",))
        dump_kill(hijack, fixture, image)
        text = hijack.ok("show", image).stdout
        assert f"netlink: protocol 0, port {fixture.ready['port']}, groups 1,5" in text, text
        assert "netlink: protocol 16, port 0, groups none" in text, text

        compare_views(before, restore_adopted(hijack, fixture, image), without_socket_inodes)
        fixture.assert_intact()


def test_raw_sockets_come_back_with_their_addresses_and_options(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "raw.crf"
    with spawn_fixture("raw_sockets", fifos=True) as fixture:
        before = proc_views(fixture.pid, without_socket_inodes, views=("fd",))
        dump_kill(hijack, fixture, image)
        text = hijack.ok("show", image).stdout
        assert "raw: ipv4 protocol 17 bound to 127.0.0.1" in text, text
        connected = "raw: ipv4 protocol 1 bound to 127.0.0.1 connected to 127.0.0.1, 16 options"
        assert connected in text, text
        assert "raw: ipv6 protocol 58," in text, text

        compare_views(before, restore_adopted(hijack, fixture, image), without_socket_inodes)
        fixture.assert_intact()
