"""The network lock: while a TCP connection is between its dump and its restore, packets
from the peer are dropped, so the kernel never answers them with a reset for a socket
that is gone. The peer retransmits them once the lock is lifted. A UDP socket's lock
drops the datagrams sent to it (from its peer, if connected), so the kernel answers
them with no ICMP port unreachable (a connected sender would get ECONNREFUSED); those
datagrams are lost, as on a lossy network: nothing keeps them.

One nftables table per socket, in the network namespace of the process, named for
the socket's ends (and protocol) so that a later `hijack restore` lifts exactly that
lock. Packets carrying OWN_MARK are let through: those the restorer writes itself to
the socket it rebuilds (a FIN replayed, a datagram queued again). Rules are loaded
over netlink with pyroute2 (no nft or iptables commands).
"""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import os
import socket
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from hijack.errors import HijackError
from hijack.sys.libc import libc

CLONE_NEWNET = 0x40000000
NF_DROP = 0
NF_ACCEPT = 1
NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6 = 1, 2, 10
NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER = 1, 2
NFT_META_MARK, NFT_META_L4PROTO = 3, 16
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
# The mark (SO_MARK) of the packets hijack writes to a socket it rebuilds: every lock
# lets them through. "hjk" in ASCII.
OWN_MARK = 0x686A6B
LOCK_PREFIX = "hijack_lock_"
# Before conntrack and every usual filter chain: the lock must win.
LOCK_PRIORITY = -400
T = TypeVar("T")

Endpoint = tuple[str, int]  # address, port


def lock_name(local: Endpoint, remote: Endpoint | None, protocol: int = socket.IPPROTO_TCP) -> str:
    """The table of the lock of a socket: a TCP connection, or a UDP socket (`remote`
    None when not connected)."""
    ends = f"{local}>{remote}" if protocol == socket.IPPROTO_TCP else f"udp {local}>{remote}"
    digest = hashlib.sha256(ends.encode()).hexdigest()[:16]
    return f"{LOCK_PREFIX}{digest}"


# pyroute2 is imported at first use: it takes 70 ms, and every hijack command imports
# this module (few make a lock).


def nftables_socket(family: int) -> Any:
    """A netlink socket of nftables for tables of `family`."""
    from pyroute2.nftables.main import NFTables

    return NFTables(nfgen_family=family)


def change(kind: str, command: str, **fields: Any) -> Any:
    """One change of a transaction(): `kind` "table", "chain" or "rule"; `command` "add",
    "insert" (a rule at the head of its chain) or "del"; `fields` as pyroute2's
    nft.table(), nft.chain() and nft.rule() take them (a base chain's hook=NAME and
    priority=N; a rule's expressions: a list of lists, as built here)."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST
    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES
    from pyroute2.netlink.nfnetlink import nftsocket as nft

    message_class, new, delete = {
        "table": (nft.nft_table_msg, nft.NFT_MSG_NEWTABLE, nft.NFT_MSG_DELTABLE),
        "chain": (nft.nft_chain_msg, nft.NFT_MSG_NEWCHAIN, nft.NFT_MSG_DELCHAIN),
        "rule": (nft.nft_rule_msg, nft.NFT_MSG_NEWRULE, nft.NFT_MSG_DELRULE),
    }[kind]
    if "hook" in fields:
        hook = [["NFTA_HOOK_HOOKNUM", HOOKS[fields.pop("hook")]]]
        fields["hook"] = {"attrs": [*hook, ["NFTA_HOOK_PRIORITY", fields.pop("priority")]]}
        fields.setdefault("type", "filter")
    if "expressions" in fields:
        fields["expressions"] = [part for built in fields["expressions"] for part in built]
    message = message_class()
    message["attrs"] = [[message_class.name2nla(key), value] for key, value in fields.items()]
    made = {"add": NLM_F_CREATE | NLM_F_APPEND, "insert": NLM_F_CREATE}
    message["header"]["type"] = NFNL_SUBSYS_NFTABLES << 8 | (new if command in made else delete)
    message["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | made.get(command, 0)
    return message


def new_table(name: str, *chains: tuple[str, int]) -> list[Any]:
    """Making table `name` with a base chain per (hook, priority), each named for its hook
    (changes of a transaction())."""
    made = [change("table", "add", name=name)]
    for hook, priority in chains:
        made.append(
            change(
                "chain",
                "add",
                table=name,
                name=hook,
                hook=hook,
                priority=priority,
                policy=NF_ACCEPT,
            )
        )
    return made


def transaction(nft: Any, family: int, changes: list[Any]) -> None:
    """Apply change()s to `family`'s tables in one nftables transaction: the kernel makes
    them all or none, at once (no packet sees a table half made or half replaced), and
    pays its grace period once for them all (a rule deleted alone costs ~10 ms here)."""
    from pyroute2.netlink import NLM_F_REQUEST
    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES
    from pyroute2.netlink.nfnetlink.nftsocket import nfgen_msg

    if not changes:
        return
    begin, end = nfgen_msg(), nfgen_msg()
    for message, kind in ((begin, NFNL_MSG_BATCH_BEGIN), (end, NFNL_MSG_BATCH_END)):
        message["res_id"] = NFNL_SUBSYS_NFTABLES
        message["header"]["type"] = kind
        message["header"]["flags"] = NLM_F_REQUEST
    for message in changes:
        message["nfgen_family"] = family
    nft.nlm_request_batch([begin, *changes, end])


def expression(name: str, arguments: OrderedDict[str, Any]) -> dict[str, Any]:
    from pyroute2.nftables.expressions import genex

    built: dict[str, Any] = genex(name, arguments)
    return built


def verdict_of(code: int) -> list[dict[str, Any]]:
    from pyroute2.nftables.expressions import verdict

    expressions: list[dict[str, Any]] = verdict(code=code)
    return expressions


def payload_load(base: int, offset: int, length: int) -> dict[str, Any]:
    arguments: OrderedDict[str, Any] = OrderedDict()
    arguments["dreg"] = 1
    arguments["base"] = base
    arguments["offset"] = offset
    arguments["len"] = length
    return expression("payload", arguments)


def equals(data: bytes) -> dict[str, Any]:
    arguments: OrderedDict[str, Any] = OrderedDict()
    arguments["sreg"] = 1
    arguments["op"] = 0  # NFT_CMP_EQ
    arguments["data"] = {"attrs": [("NFTA_DATA_VALUE", data)]}
    return expression("cmp", arguments)


def meta_load(key: int) -> dict[str, Any]:
    arguments: OrderedDict[str, Any] = OrderedDict()
    arguments["key"] = key
    arguments["dreg"] = 1
    return expression("meta", arguments)


def _family(local: Endpoint, protocol: int) -> int:
    """The table family of a lock: a UDP socket's takes IPv4 and IPv6 alike (one bound to
    [::] receives both), matching no address."""
    if protocol != socket.IPPROTO_TCP:
        return NFPROTO_INET
    return NFPROTO_IPV6 if wire_address(local[0]).version == 6 else NFPROTO_IPV4


def wire_address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address packets carry: an IPv6 socket's IPv4-mapped one (::ffff:1.2.3.4) is
    IPv4 on the wire."""
    found = ipaddress.ip_address(address)
    if isinstance(found, ipaddress.IPv6Address) and found.ipv4_mapped is not None:
        return found.ipv4_mapped
    return found


def _own_packets() -> tuple[list[dict[str, Any]], ...]:
    """Packets marked OWN_MARK: accepted."""
    return (
        [meta_load(NFT_META_MARK)],
        [equals(struct.pack("=I", OWN_MARK))],
        verdict_of(NF_ACCEPT),
    )


def _drop_from_peer(
    local: Endpoint, remote: Endpoint | None, protocol: int
) -> tuple[list[dict[str, Any]], ...]:
    """Packets of `protocol` from `remote` (None: from anyone) to `local`: dropped."""
    match = [[meta_load(NFT_META_L4PROTO), equals(bytes([protocol]))]]
    if protocol == socket.IPPROTO_TCP:
        local_ip = wire_address(local[0])
        # The destination address: at 16 in an IPv4 header, at 24 in an IPv6 one.
        daddr_at = 24 if local_ip.version == 6 else 16
        match += [
            [payload_load(NFT_PAYLOAD_NETWORK_HEADER, daddr_at, len(local_ip.packed))],
            [equals(local_ip.packed)],
        ]
    if remote is not None:
        match += [
            [payload_load(NFT_PAYLOAD_TRANSPORT_HEADER, 0, 4)],
            [equals(struct.pack("!HH", remote[1], local[1]))],
        ]
    else:
        match += [
            [payload_load(NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2)],
            [equals(struct.pack("!H", local[1]))],
        ]
    return (*match, verdict_of(NF_DROP))


def lock(
    pid: int, local: Endpoint, remote: Endpoint | None, protocol: int = socket.IPPROTO_TCP
) -> None:
    """Drop what `remote` (None: anyone) sends to `local` over `protocol` (TCP, UDP) in
    the network namespace of `pid`."""

    def install() -> None:
        name = lock_name(local, remote, protocol)
        family = _family(local, protocol)
        nft = nftables_socket(family)
        try:
            transaction(
                nft,
                family,
                [
                    *new_table(name, ("input", LOCK_PRIORITY)),
                    change("rule", "add", table=name, chain="input", expressions=_own_packets()),
                    change(
                        "rule",
                        "add",
                        table=name,
                        chain="input",
                        expressions=_drop_from_peer(local, remote, protocol),
                    ),
                ],
            )
        finally:
            nft.close()

    in_network_of(pid, install, f"cannot lock {describe(local, remote, protocol)}")


def unlock(
    pid: int, local: Endpoint, remote: Endpoint | None, protocol: int = socket.IPPROTO_TCP
) -> None:
    """Lift the lock of lock(); nothing if there is none."""

    def remove() -> None:
        name = lock_name(local, remote, protocol)
        nft = nftables_socket(_family(local, protocol))
        try:
            if any(table_name(table) == name for table in nft.get_tables()):
                nft.table("del", name=name)
        finally:
            nft.close()

    in_network_of(pid, remove, f"cannot unlock {describe(local, remote, protocol)}")


def describe(local: Endpoint, remote: Endpoint | None, protocol: int) -> str:
    if protocol == socket.IPPROTO_TCP:
        return f"the connection {local} -> {remote}"
    return f"the UDP socket {local}" + (f" -> {remote}" if remote else "")


def locks_held(pid: int) -> list[str]:
    """The names of the lock tables in the network namespace of `pid` (every family)."""

    def names() -> list[str]:
        found = []
        for family in (NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6):
            nft = nftables_socket(family)
            try:
                found += [
                    name
                    for name in map(table_name, nft.get_tables())
                    if name and name.startswith(LOCK_PREFIX)
                ]
            finally:
                nft.close()
        return found

    return in_network_of(pid, names, "cannot list the network locks")


def remove_lock(pid: int, name: str) -> None:
    """Remove lock table `name` (as locks_held() lists it) in the namespace of `pid`."""

    def remove() -> None:
        for family in (NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6):
            nft = nftables_socket(family)
            try:
                if name in map(table_name, nft.get_tables()):
                    nft.table("del", name=name)
            finally:
                nft.close()

    in_network_of(pid, remove, f"cannot remove the network lock {name}")


def table_name(table: Any) -> str | None:
    found: str | None = table.get_attr("NFTA_TABLE_NAME")
    return found


def in_network_of(pid: int, work: Callable[[], T], failure: str) -> T:
    """Run `work` in the network namespace of `pid`: in a thread of its own entered there
    (setns moves only the calling thread), or here if we share it."""
    mine = os.stat("/proc/self/ns/net")
    try:
        theirs = os.stat(f"/proc/{pid}/ns/net")
    except OSError as exc:
        raise HijackError(f"{failure}: process {pid}: {exc.strerror}") from None
    if (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino):
        return _checked(work, failure)
    outcome: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        namespace = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(namespace, CLONE_NEWNET) != 0:
                raise HijackError(f"{failure}: setns: {os.strerror(ctypes.get_errno())}")
            outcome.append(_checked(work, failure))
        except BaseException as error:
            errors.append(error)
        finally:
            os.close(namespace)

    thread = threading.Thread(target=run, name="netlock")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return outcome[0]


def _checked(work: Callable[[], T], failure: str) -> T:
    try:
        return work()
    except OSError as exc:
        raise HijackError(f"{failure}: {exc.strerror or exc}") from None
    except Exception as exc:  # pyroute2 raises its own NetlinkError (an OSError too) or others
        raise HijackError(f"{failure}: {exc}") from None
