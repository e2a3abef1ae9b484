"""UDP-Lite and ICMP ping sockets come back from the image alone (`dump --kill`, no attach).

The `udplite_sockets` fixture (tests/fixtures/udplite_sockets.c) holds UDP-Lite
sockets bound, connected, with checksum coverages and datagrams not yet read;
`ping_sockets` holds ICMP ping sockets (SOCK_DGRAM, IPPROTO_ICMP/ICMPV6), made
in a network namespace of the test's own, where net.ipv4.ping_group_range lets
root make them. After `dump --kill` and `restore` each fixture checks its own
sockets; the /proc views of its descriptors agree before and after.
"""

from __future__ import annotations

import secrets
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from support import spawn_fixture
from support.cli import HijackCli
from support.nodes import entering_namespace, namespace_prefix, remove_namespaces, run_ip
from support.objects import (
    compare_views,
    dump_kill,
    objects_of,
    proc_views,
    restore_adopted,
    shown_json,
    without_socket_inodes,
)


def test_udplite_sockets_come_back_with_their_datagrams_and_coverage(
    hijack: HijackCli, tmp_path: Path
) -> None:
    image = tmp_path / "udplite.crf"
    with spawn_fixture("udplite_sockets", fifos=True) as fixture:
        port = fixture.ready["port"]
        before = proc_views(fixture.pid, without_socket_inodes, views=("fd",))
        dump_kill(hijack, fixture, image)

        shown = shown_json(hijack, image)
        lite = objects_of(shown, "UdpSocket")
        assert len(lite) == 4 and all(o["protocol"] == 136 for o in lite), lite
        text = hijack.ok("show", image).stdout
        assert f"udp: UDP-Lite 127.0.0.1:{port}, 2 datagrams (2005 bytes) queued" in text, text

        compare_views(before, restore_adopted(hijack, fixture, image), without_socket_inodes)
        fixture.assert_intact()


@contextmanager
def own_namespace() -> Iterator[str]:
    """A network namespace of our own, loopback up, where root's group may make ping
    sockets (net.ipv4.ping_group_range is per namespace)."""
    name = f"{namespace_prefix()}own{secrets.token_hex(3)}"
    run_ip("netns", "add", name)
    try:
        run_ip("-n", name, "link", "set", "lo", "up")
        with entering_namespace(name) as enter:
            subprocess.run(
                ["sysctl", "-q", "-w", "net.ipv4.ping_group_range=0 0"],
                check=True,
                timeout=10,
                preexec_fn=enter,
            )
        yield name
    finally:
        remove_namespaces([name])


def test_ping_sockets_come_back_bound_connected_with_their_identifier(tmp_path: Path) -> None:
    image = tmp_path / "ping.crf"
    with (
        own_namespace() as netns,
        spawn_fixture("ping_sockets", fifos=True, netns=netns) as fixture,
    ):
        hijack = HijackCli(tmp_path / "state", netns)
        ident = fixture.ready["ident"]
        before = proc_views(fixture.pid, without_socket_inodes, views=("fd",))
        dump_kill(hijack, fixture, image)

        shown = shown_json(hijack, image)
        pings = objects_of(shown, "PingSocket")
        assert len(pings) == 3, pings
        text = hijack.ok("show", image).stdout
        bound = f"ping: ipv4 bound to 127.0.0.1:{ident} connected to 127.0.0.1, 3 replies queued"
        assert bound in text, text
        assert "ping: ipv6 bound to [::1]:" in text and ", 1 reply queued" in text, text

        compare_views(before, restore_adopted(hijack, fixture, image), without_socket_inodes)
        fixture.assert_intact()
