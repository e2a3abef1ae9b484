"""Packet sockets (AF_PACKET) come back from the image alone (`dump --kill`, no attach).

The `packet_sockets` fixture (tests/fixtures/packet_sockets.c) runs in a network
namespace of the test's own with a veth pair: raw and datagram packet sockets,
bound to an interface or not, two in one fanout group, with options and a
promiscuous membership. After `dump --kill` and `restore` (both run in that
namespace) it checks each socket and that a frame sent from the peer reaches the
group. The `packet_ring` fixture's TPACKET_V1/V2 rings and the `packet_ring_v3`
fixture's TPACKET_V3 ring come back with their frames and the kernel's position in
them; a ring whose position cannot be told is refused by name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import spawn_fixture
from support.cli import HijackCli, restored_pid
from support.nodes import run_ip, spawn_in_namespace
from support.objects import (
    Views,
    compare_views,
    dump_kill,
    objects_of,
    proc_views,
    restore_adopted,
    shown_json,
    without_socket_inodes,
)
from support.procview import difference, has_exited
from support.redis import wait_until
from support.running import RunningFixture
from test_obj_dgram import own_namespace

from hijack.sys import packet_diag

IFACE, PEER = "hjv0", "hjv1"
ETH_P_ALL = 3

# Holds the mapped TPACKET_V2 RX ring of a packet socket it closed.
CLOSED_RING_HOLDER = """\
import ctypes, os, socket, struct, sys
held = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
held.setsockopt(263, 10, 1)  # PACKET_VERSION TPACKET_V2
held.setsockopt(263, 5, struct.pack("4I", 4096, 1, 2048, 2))  # PACKET_RX_RING
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
assert libc.mmap(None, 4096, 3, 1, held.fileno(), 0) not in (None, ctypes.c_void_p(-1).value)
fd = held.detach()
os.close(fd)  # (Python's mmap would keep a descriptor of its own)
print(fd, flush=True)
sys.stdin.read()
"""

# Holds a TPACKET_V2 packet socket on lo that sent a frame through each slot of its TX
# ring: gone round, nothing tells where the kernel sends next.
USED_TX_RING_HOLDER = """\
import mmap, socket, struct, sys
held = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
held.setsockopt(263, 10, 1)  # PACKET_VERSION TPACKET_V2
held.setsockopt(263, 13, struct.pack("4I", 4096, 1, 2048, 2))  # PACKET_TX_RING
ring = mmap.mmap(held.fileno(), 4096)
held.bind(("lo", 0))
for slot in range(2):
    ring[2048 * slot + 32 : 2048 * slot + 92] = bytes(12) + b"\\x88\\xb5" + bytes(46)
    struct.pack_into("=II", ring, 2048 * slot, 1, 60)  # TP_STATUS_SEND_REQUEST, tp_len
    held.send(b"")
print(held.fileno(), flush=True)
sys.stdin.read()
"""


# Sends each line of its stdin as a UDP datagram to 127.0.0.1 port 9; prints "sent" after.
UDP_SENDER = """\
import socket, sys
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as out:
    for line in sys.stdin:
        out.sendto(line.strip().encode(), ("127.0.0.1", 9))
print("sent", flush=True)
"""
TCPDUMP = shutil.which("tcpdump")
PCAP_HEADER, PCAP_RECORD = 24, struct.Struct("=IIII")  # ts_sec, ts_usec, incl_len, orig_len


def send_udp(netns: str, markers: list[str]) -> None:
    """Send each of `markers` to 127.0.0.1:9 inside `netns`, one datagram each."""
    sender = spawn_in_namespace(
        netns, [sys.executable, "-c", UDP_SENDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    out, _ = sender.communicate("".join(f"{m}\n" for m in markers).encode(), timeout=30)
    assert sender.returncode == 0 and out == b"sent\n"


def captured(pcap: Path) -> list[bytes]:
    """The packets a pcap file holds so far (a record cut short at its end left out)."""
    data = pcap.read_bytes() if pcap.exists() else b""
    packets, at = [], PCAP_HEADER
    while at + PCAP_RECORD.size <= len(data):
        length = PCAP_RECORD.unpack_from(data, at)[2]
        if at + PCAP_RECORD.size + length > len(data):
            break
        packets.append(data[at + PCAP_RECORD.size : at + PCAP_RECORD.size + length])
        at += PCAP_RECORD.size + length
    return packets


def markers_in(pcap: Path) -> list[str]:
    """The markers (hijack-N) in the packets of `pcap`, in order."""
    found = []
    for packet in captured(pcap):
        at = packet.find(b"hijack-")
        if at >= 0:
            found.append(packet[at:].decode())
    return found


def packet_view(pid: int) -> set[tuple[object, ...]]:
    """What packet_diag says of the sockets of `pid` (but their inode numbers)."""
    links = [os.readlink(link) for link in Path(f"/proc/{pid}/fd").iterdir()]
    inodes = {int(link[len("socket:[") : -1]) for link in links if link.startswith("socket:[")}
    return {
        (d.type, d.protocol, d.ifindex, d.fanout, d.memberships, d.rx_ring, d.tx_ring)
        for inode, d in packet_diag.packet_sockets(pid).items()
        if inode in inodes
    }


@contextlib.contextmanager
def fixture_on_veth(
    name: str, tmp_path: Path, *args: str
) -> Iterator[tuple[RunningFixture, HijackCli]]:
    """Fixture `name` IFACE PEER `args` in a namespace of our own with that veth pair, and the
    CLI that dumps and restores it there."""
    with own_namespace() as netns:
        add_veth(netns)
        with spawn_fixture(name, IFACE, PEER, *args, fifos=True, netns=netns) as fixture:
            yield fixture, HijackCli(tmp_path / "state", netns)


def restored_the_same(
    hijack: HijackCli,
    fixture: RunningFixture,
    image: Path,
    before: Views,
    packets_before: set[tuple[object, ...]],
) -> None:
    """Restore `image` of `fixture`; its views and packet sockets are `before`'s again and
    it finds itself intact."""
    pid = restore_adopted(hijack, fixture, image)
    compare_views(before, pid, without_socket_inodes)
    packets_after = packet_view(pid)
    assert packets_before == packets_after, difference(packets_before, packets_after)
    fixture.assert_intact()


def add_veth(netns: str) -> None:
    run_ip("-n", netns, "link", "add", IFACE, "type", "veth", "peer", "name", PEER)
    run_ip("-n", netns, "link", "set", IFACE, "up")
    run_ip("-n", netns, "link", "set", PEER, "up")


def test_packet_sockets_come_back_bound_with_fanout_and_options(tmp_path: Path) -> None:
    image = tmp_path / "packet.crf"
    with fixture_on_veth("packet_sockets", tmp_path) as (fixture, hijack):
        ifindex = int(fixture.ready["ifindex"])
        before = proc_views(fixture.pid, without_socket_inodes, views=("fd",))
        packets_before = packet_view(fixture.pid)
        assert len(packets_before) == 5, packets_before
        dump_kill(hijack, fixture, image)

        shown = shown_json(hijack, image)
        packets = objects_of(shown, "PacketSocket")
        assert len(packets) == 5, packets
        [promiscuous] = [o for o in packets if o["memberships"]]
        assert promiscuous["memberships"][0]["type"] == 1  # PACKET_MR_PROMISC
        text = hijack.ok("show", image).stdout
        group = f"raw protocol 0x0003, interface {ifindex}, fanout group 77 mode 0x0"
        assert text.count(group) == 2, text

        restored_the_same(hijack, fixture, image, before, packets_before)


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_a_tpacket_ring_comes_back_with_its_frames_and_position(
    tmp_path: Path, version: str
) -> None:
    image = tmp_path / "ring.crf"
    extra = () if version == "v2" else ("v1",)
    with fixture_on_veth("packet_ring", tmp_path, *extra) as (fixture, hijack):
        before = proc_views(fixture.pid, without_socket_inodes)
        packets_before = packet_view(fixture.pid)
        dump_kill(hijack, fixture, image)

        packets = objects_of(shown_json(hijack, image), "PacketSocket")
        [ring] = [o for o in packets if o["rx_ring"]]
        assert ring["rx_head"] == 6, ring  # six frames came, the kernel fills the 7th
        [mapping] = ring["ring_mappings"]
        assert mapping["start"] == int(fixture.ready["ring"], 16), ring
        assert "RX ring" in hijack.ok("show", image).stdout
        if version == "v1":
            # Moving the kernel's position takes lo: down, the restore says so, starts
            # nothing, and works once it is up again.
            assert hijack.netns is not None
            run_ip("-n", hijack.netns, "link", "set", "lo", "down")
            failed = hijack("restore", image)
            assert failed.returncode == 1, failed.describe()
            assert "is lo up?" in failed.stderr and "Traceback" not in failed.stderr
            assert len(failed.stderr.strip().splitlines()) == 1, failed.describe()
            run_ip("-n", hijack.netns, "link", "set", "lo", "up")

        restored_the_same(hijack, fixture, image, before, packets_before)


@pytest.mark.parametrize("state", ["open", "frozen"])
def test_a_tpacket_v3_ring_comes_back_with_its_blocks_and_position(
    tmp_path: Path, state: str
) -> None:
    """open: the kernel appends after the frames of its open block, which it closes where
    its last frame ends; frozen: it waits for the block the program gave back."""
    image = tmp_path / "ring.crf"
    with fixture_on_veth("packet_ring_v3", tmp_path, state) as (fixture, hijack):
        before = proc_views(fixture.pid, without_socket_inodes)
        packets_before = packet_view(fixture.pid)
        dump_kill(hijack, fixture, image)

        packets = objects_of(shown_json(hijack, image), "PacketSocket")
        [ring] = [o for o in packets if o["rx_ring"]]
        assert ring["version"] == 2 and ring["rx_head"] == (2 if state == "open" else 0), ring
        assert "RX ring of 4 blocks, block" in hijack.ok("show", image).stdout

        restored_the_same(hijack, fixture, image, before, packets_before)


@pytest.mark.parametrize(
    ("holder_program", "refusal"),
    [
        (USED_TX_RING_HOLDER, "with a PACKET_TX_RING not mapped whole, gone round"),
        (CLOSED_RING_HOLDER, "a socket's ring mapped with no descriptor of it left (socket:["),
    ],
    ids=["used-tx", "socket-closed"],
)
def test_a_packet_ring_whose_position_is_not_known_is_refused_by_name(
    tmp_path: Path, holder_program: str, refusal: str
) -> None:
    with own_namespace() as netns:
        holder = spawn_in_namespace(
            netns,
            [sys.executable, "-c", holder_program],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout is not None
            fd = int(holder.stdout.readline())
            hijack = HijackCli(tmp_path / "state", netns)
            refused = hijack("dump", holder.pid, "-o", tmp_path / "ring.crf", "--kill")
            assert refused.returncode == 1, refused.describe()
            if holder_program != CLOSED_RING_HOLDER:
                assert f"fd {fd} (socket socket:[" in refused.stderr, refused.describe()
            assert refusal in refused.stderr, refused.describe()
            assert holder.poll() is None  # refused before the kill
        finally:
            holder.kill()
            holder.wait()


@pytest.mark.skipif(
    TCPDUMP is None,
    reason="tcpdump is not installed (`make test` installs it: apt-get install tcpdump)",
)
def test_tcpdump_keeps_capturing_through_dump_kill_and_restore(tmp_path: Path) -> None:
    """libpcap's TPACKET_V3 ring: what came before the dump is written once, what comes
    after the restore is captured too, in order."""
    assert TCPDUMP is not None
    pcap, log, image = tmp_path / "lo.pcap", tmp_path / "tcpdump.log", tmp_path / "tcpdump.crf"
    before = [f"hijack-{n}" for n in range(20)]
    after = [f"hijack-{n}" for n in range(20, 50)]
    argv = [TCPDUMP, "-i", "lo", "-n", "-U", "-Z", "root", "-w", pcap, "udp port 9"]
    with own_namespace() as netns, open(log, "wb") as output:
        tcpdump = spawn_in_namespace(
            netns, argv, stdin=subprocess.DEVNULL, stdout=output, stderr=output
        )
        restored = 0
        try:
            wait_until(lambda: b"listening on lo" in log.read_bytes(), "tcpdump starting")
            send_udp(netns, before)
            wait_until(lambda: markers_in(pcap) == before, "tcpdump writing what it saw")
            hijack = HijackCli(tmp_path / "state", netns)
            hijack.ok("dump", tcpdump.pid, "-o", image, "--kill")
            assert tcpdump.wait(timeout=30) == -signal.SIGKILL
            text = hijack.ok("show", image).stdout
            assert "RX ring of" in text and "blocks, block" in text, text

            restored = restored_pid(hijack.ok("restore", image))
            send_udp(netns, after)
            wait_until(lambda: markers_in(pcap) == before + after, "tcpdump capturing again")
            os.kill(restored, signal.SIGINT)
            _, status = os.waitpid(restored, 0)
            assert os.waitstatus_to_exitcode(status) == 0, log.read_text()
            assert markers_in(pcap) == before + after
        finally:
            if tcpdump.poll() is None:
                tcpdump.kill()
                tcpdump.wait()
            if restored and not has_exited(restored):
                os.kill(restored, signal.SIGKILL)
                os.waitpid(restored, 0)
