"""Relays by packets: a TCP connection moved away from its home node goes on through
that node's IP layer instead of through its shadow (`hijack move --packet-relays`,
docs/protocol.md, "Relays by packets").

The peer keeps talking to the home node's address (home:P <-> peer:X). The home node
rewrites the peer's packets to the destination's address (peer:X -> there:P) and the
destination's answers back to its own (there:P -> peer:X leaves as home:P): stateless
rewrites in nftables (no conntrack: the connection began before any rule, and a
conntrack entry made mid-stream would be the kernel's guess), one table per connection
named for its ends. The destination sends its answers through the home node by a
policy rule for exactly that connection (its ports and addresses), so a peer that it
could reach directly still sees them come from the home node's address.

While a move is frozen a *hold* keeps the peer's packets at the home node before they
are rewritten (in a packet queue, hijack.sys.nfqueue, let go in order when it is lifted;
dropped where there is none, the peer retransmitting them): the connection's state,
read at home, must not change, and the destination's socket, made in repair mode, must
not take bytes a failed move would lose.

Tables and rules are loaded over netlink with pyroute2, as the network locks are
(hijack.sys.netlock); IPv4 only.
"""

from __future__ import annotations

import socket
import struct
import zlib
from collections import OrderedDict
from typing import Any

from hijack.errors import HijackError
from hijack.sys.netlock import (
    NF_ACCEPT,
    NF_DROP,
    NFPROTO_IPV4,
    NFT_META_L4PROTO,
    NFT_PAYLOAD_NETWORK_HEADER,
    NFT_PAYLOAD_TRANSPORT_HEADER,
    Endpoint,
    change,
    equals,
    expression,
    meta_load,
    new_table,
    nftables_socket,
    payload_load,
    table_name,
    transaction,
    verdict_of,
)

ROUTE_PREFIX = "hijack_route_"
HOLD_PREFIX = "hijack_hold_"
# Before conntrack (-200) and every usual chain: a rewritten packet is never tracked.
REWRITE_PRIORITY = -300
HOLD_PRIORITY = -400  # before the rewrite
SOURCE_NAT_PRIORITY = 100  # after the routing decision: a local source there is no martian
# The destination's policy rules: before the main table (32766); one routing table per
# home node, holding its default route through that node.
RULE_PRIORITY = 1000
TABLE_BASE = 0x686A0000  # "hj" and 16 bits of the home node's address
IPV4_SOURCE_AT, IPV4_DESTINATION_AT, IPV4_CHECKSUM_AT = 12, 16, 10  # in the IPv4 header
NFT_PAYLOAD_CSUM_INET = 1
FORWARDING = "/proc/sys/net/ipv4/ip_forward"
GENERATION_TAG = "hijack"  # forward()'s rules' comments: "hijack N"


def preload() -> None:
    """Import pyroute2 now (~70 ms) rather than within a move's freeze."""
    import pyroute2.iproute
    import pyroute2.nftables.main  # noqa: F401


def _ends(home: Endpoint, peer: Endpoint) -> str:
    return f"{home[0]}:{home[1]}-{peer[0]}:{peer[1]}"


def route_name(home: Endpoint, peer: Endpoint) -> str:
    """The home node's table of the connection home <-> peer: named for its ends, so
    that `hijack status` and `hijack recover` can tell whose it is."""
    return ROUTE_PREFIX + _ends(home, peer)


def hold_name(home: Endpoint, peer: Endpoint) -> str:
    return HOLD_PREFIX + _ends(home, peer)


def ends_of(name: str) -> tuple[str, Endpoint, Endpoint] | None:
    """("route" or "hold", home, peer) of a table route_name() or hold_name() named."""
    for kind, prefix in (("route", ROUTE_PREFIX), ("hold", HOLD_PREFIX)):
        if name.startswith(prefix):
            home, _, peer = name[len(prefix) :].partition("-")
            try:
                return kind, _endpoint(home), _endpoint(peer)
            except ValueError:
                return None
    return None


def _endpoint(text: str) -> Endpoint:
    address, _, port = text.rpartition(":")
    return address, int(port)


def forwarding() -> bool:
    """Whether this network namespace forwards IPv4 packets (the home node must)."""
    try:
        with open(FORWARDING) as flag:
            return flag.read().strip() == "1"
    except OSError:
        return False


def _packed(address: str) -> bytes:
    try:
        return socket.inet_aton(address)
    except OSError:
        raise HijackError(f"not an IPv4 address: {address!r}") from None


def _from_to(source: Endpoint, destination: Endpoint) -> list[list[dict[str, Any]]]:
    """Match TCP packets from `source` to `destination` (addresses and ports)."""
    return [
        [meta_load(NFT_META_L4PROTO)],
        [equals(bytes([socket.IPPROTO_TCP]))],
        [payload_load(NFT_PAYLOAD_NETWORK_HEADER, IPV4_SOURCE_AT, 8)],
        [equals(_packed(source[0]) + _packed(destination[0]))],
        [payload_load(NFT_PAYLOAD_TRANSPORT_HEADER, 0, 4)],
        [equals(struct.pack("!HH", source[1], destination[1]))],
    ]


def _set_address(offset: int, address: str) -> list[list[dict[str, Any]]]:
    """Write `address` at `offset` of the IPv4 header, its checksum and the TCP one (whose
    pseudo-header holds it) mended."""
    loaded: OrderedDict[str, Any] = OrderedDict()
    loaded["dreg"] = 1
    loaded["data"] = {"attrs": [("NFTA_DATA_VALUE", _packed(address))]}
    written: OrderedDict[str, Any] = OrderedDict()
    written["sreg"] = 1
    written["base"] = NFT_PAYLOAD_NETWORK_HEADER
    written["offset"] = offset
    written["len"] = 4
    written["csum_type"] = NFT_PAYLOAD_CSUM_INET
    written["csum_offset"] = IPV4_CHECKSUM_AT
    written["csum_flags"] = {"NFT_PAYLOAD_L4CSUM_PSEUDOHDR"}
    return [[expression("immediate", loaded)], [expression("payload", written)]]


def _untracked() -> list[dict[str, Any]]:
    # pyroute2 knows no data for `notrack` (it has none): the expression is its name alone.
    return [{"attrs": [("NFTA_EXPR_NAME", "notrack")]}]


def _rules_of(nft: Any, table: str) -> list[Any]:
    """Each rule of `table` (pyroute2's messages)."""
    return [rule for rule in nft.get_rules() if rule.get_attr("NFTA_RULE_TABLE") == table]


def _deleting(table: str, rules: list[Any]) -> list[Any]:
    """Changes of a transaction deleting `rules` of `table`."""
    return [
        change(
            "rule",
            "del",
            table=table,
            chain=rule.get_attr("NFTA_RULE_CHAIN"),
            handle=rule.get_attr("NFTA_RULE_HANDLE"),
        )
        for rule in rules
    ]


def _generation(rule: Any) -> int:
    """The generation forward() tagged `rule` with (its comment: "hijack N"); 0 if none."""
    tag = str(rule.get_attr("NFTA_RULE_USERDATA") or "")
    prefix, _, number = tag.partition(" ")
    return int(number) if prefix == GENERATION_TAG and number.isdigit() else 0


def forward(home: Endpoint, peer: Endpoint, there: str | None, sources: list[str]) -> None:
    """At the home node: the peer's packets to the connection home <-> peer rewritten to
    `there` (a node's address, the same port; None: not rewritten, they are home's again),
    and what the connection sends from each of `sources` (addresses, the same port)
    rewritten back to come from home. Supersedes an earlier call's rules (a later move:
    the node it leaves stays among `sources` until it is silenced, so a segment it sends
    meanwhile still reaches the peer as the connection's); tidy() removes them.

    One transaction that only adds (0.5 ms here; a deletion waits out a grace period,
    6-20 ms, and forward() runs within a move's freeze): the new rules at the head of
    their chains, tagged one generation past the table's rules. The old ones lose all
    effect at once: a packet rewritten by a new rule no longer matches an old one, and
    with `there` None an accept comes first (the peer's packets pass unrewritten). Never
    a moment without rules, either: a segment the connection sends that left home
    unrewritten would reach the peer from a stranger's address, whose reset would end
    the connection (seen in CI when the table was deleted and made again)."""
    name = route_name(home, peer)

    def install(nft: Any) -> None:
        existed = name in map(table_name, nft.get_tables())
        if existed:
            changes = []
            generation = 1 + max(map(_generation, _rules_of(nft, name)), default=0)
        else:
            changes = new_table(
                name, ("prerouting", REWRITE_PRIORITY), ("postrouting", SOURCE_NAT_PRIORITY)
            )
            generation = 1

        def rule(chain: str, expressions: list[list[dict[str, Any]]]) -> None:
            tag = f"{GENERATION_TAG} {generation}"
            made = change(
                "rule", "insert", table=name, chain=chain, expressions=expressions, userdata=tag
            )
            changes.append(made)

        towards = _from_to(peer, home)
        if there is not None:
            rule("prerouting", [*towards, _untracked(), *_set_address(IPV4_DESTINATION_AT, there)])
        elif existed:  # an earlier generation may rewrite them: not any more
            rule("prerouting", [*towards, verdict_of(NF_ACCEPT)])
        for source in dict.fromkeys(sources):
            back = _from_to((source, home[1]), peer)
            rule("prerouting", [*back, _untracked()])
            rule("postrouting", [*back, *_set_address(IPV4_SOURCE_AT, home[0])])
        transaction(nft, NFPROTO_IPV4, changes)

    _nft(install, f"cannot forward {home} <-> {peer} to {there or 'home'}")


def tidy(home: Endpoint, peer: Endpoint) -> None:
    """Delete the rules a later forward() superseded (after the freeze: 6-20 ms here);
    nothing if there are none."""
    name = route_name(home, peer)

    def remove(nft: Any) -> None:
        if name not in map(table_name, nft.get_tables()):
            return
        rules = _rules_of(nft, name)
        newest = max(map(_generation, rules), default=0)
        old = [rule for rule in rules if _generation(rule) < newest]
        transaction(nft, NFPROTO_IPV4, _deleting(name, old))

    _nft(remove, f"cannot tidy the rewrites of {home} <-> {peer}")


def unforward(home: Endpoint, peer: Endpoint) -> None:
    """Remove forward()'s table; nothing if there is none."""
    _drop_table(route_name(home, peer), f"cannot stop forwarding {home} <-> {peer}")


def hold(home: Endpoint, peer: Endpoint, queue: int | None = None) -> None:
    """Hold the peer's packets to `home` before anything else sees them: in packet queue
    `queue` (hijack.sys.nfqueue: let go in order once its holder accepts them), or
    dropped (the peer sends them again, on its retransmission timer: 200 ms or more)."""
    name = hold_name(home, peer)

    def install(nft: Any) -> None:
        held = verdict_of(NF_DROP) if queue is None else [_queued_to(queue)]
        expressions = [*_from_to(peer, home), held]
        # At the head: before the accept of an earlier release() whose table is still here.
        changes = [
            change("rule", "insert", table=name, chain="prerouting", expressions=expressions)
        ]
        if name not in map(table_name, nft.get_tables()):
            changes = [*new_table(name, ("prerouting", HOLD_PRIORITY)), *changes]
        transaction(nft, NFPROTO_IPV4, changes)

    _nft(install, f"cannot hold {home} <-> {peer}")


def _queued_to(number: int) -> dict[str, Any]:
    """xtables' NFQUEUE target (revision 3) through nftables' compat expression: this
    kernel has no nftables `queue` (CONFIG_NFT_QUEUE is not set); NFT_COMPAT and
    XT_TARGET_NFQUEUE are. No bypass flag: with nobody bound, the packet is dropped."""
    arguments: OrderedDict[str, Any] = OrderedDict()
    arguments["name"] = "NFQUEUE"
    arguments["rev"] = 3
    # struct xt_NFQ_info_v3: queuenum, queues_total, flags (u16 each), padded to 8.
    arguments["info"] = struct.pack("=HHHxx", number, 1, 0)
    return expression("target", arguments)


def release(home: Endpoint, peer: Endpoint) -> None:
    """Lift hold(): an accept put before its rule (adding takes 0.5 ms here, deleting the
    rule 6-20 ms: it waits out a grace period, the peer held meanwhile); the table goes
    at remove_hold(), after the freeze. Nothing if there is no hold."""
    name = hold_name(home, peer)

    def let_go(nft: Any) -> None:
        if name in map(table_name, nft.get_tables()):
            accepted = [*_from_to(peer, home), verdict_of(NF_ACCEPT)]
            let = change("rule", "insert", table=name, chain="prerouting", expressions=accepted)
            transaction(nft, NFPROTO_IPV4, [let])

    _nft(let_go, f"cannot release {home} <-> {peer}")


def remove_hold(home: Endpoint, peer: Endpoint) -> None:
    """Remove hold()'s table, released or not; nothing if there is none."""
    _drop_table(hold_name(home, peer), f"cannot remove the hold of {home} <-> {peer}")


def tables() -> list[str]:
    """The names of this namespace's route and hold tables."""
    found: list[str] = []

    def names(nft: Any) -> None:
        found.extend(
            name
            for name in map(table_name, nft.get_tables())
            if name and name.startswith((ROUTE_PREFIX, HOLD_PREFIX))
        )

    _nft(names, "cannot list the packet relays' tables")
    return found


def _drop_table(name: str, failure: str) -> None:
    def remove(nft: Any) -> None:
        if name in map(table_name, nft.get_tables()):
            nft.table("del", name=name)

    _nft(remove, failure)


def _nft(work: Any, failure: str) -> None:
    nft = nftables_socket(NFPROTO_IPV4)
    try:
        work(nft)
    except HijackError:
        raise
    except Exception as exc:  # pyroute2's NetlinkError (an OSError) and its own errors
        raise HijackError(f"{failure}: {getattr(exc, 'strerror', None) or exc}") from None
    finally:
        nft.close()


def _table_of(gateway: str) -> int:
    return TABLE_BASE | zlib.crc32(_packed(gateway)) & 0xFFFF


def _rule(local: Endpoint, peer: Endpoint, gateway: str) -> dict[str, Any]:
    return {
        "family": socket.AF_INET,
        "priority": RULE_PRIORITY,
        "table": _table_of(gateway),
        "src": local[0],
        "src_len": 32,
        "dst": peer[0],
        "dst_len": 32,
        "ip_proto": socket.IPPROTO_TCP,
        "sport_range": f"{local[1]}:{local[1]}",
        "dport_range": f"{peer[1]}:{peer[1]}",
    }


def send_through(local: Endpoint, peer: Endpoint, gateway: str) -> None:
    """At the destination: what the connection local -> peer sends goes to `gateway` (the
    home node's address, on a link of this node), whatever route this node has to the peer."""
    from pyroute2 import IPRoute

    table = _table_of(gateway)
    try:
        with IPRoute() as ip:
            routes = ip.route("dump", table=table)
            if not any(route.get("gateway") == gateway for route in routes):
                ip.route("replace", dst="0.0.0.0/0", gateway=gateway, table=table)
            if not _rule_exists(ip, local, peer, gateway):
                ip.rule("add", **_rule(local, peer, gateway))
    except Exception as exc:
        raise HijackError(
            f"cannot send {local} -> {peer} through {gateway}:"
            f" {getattr(exc, 'strerror', None) or exc}"
        ) from None


def stop_sending_through(local: Endpoint, peer: Endpoint, gateway: str) -> None:
    """Remove send_through()'s rule (its table's route stays: other connections may use
    it, and unused it routes nothing); nothing if there is none."""
    from pyroute2 import IPRoute

    try:
        with IPRoute() as ip:
            if _rule_exists(ip, local, peer, gateway):
                ip.rule("del", **_rule(local, peer, gateway))
    except Exception as exc:
        raise HijackError(
            f"cannot remove the rule of {local} -> {peer}: {getattr(exc, 'strerror', None) or exc}"
        ) from None


def _rule_exists(ip: Any, local: Endpoint, peer: Endpoint, gateway: str) -> bool:
    wanted = (_table_of(gateway), local[0], peer[0], f"{local[1]}:{local[1]}")
    for rule in ip.get_rules(family=socket.AF_INET, priority=RULE_PRIORITY):
        found = (
            rule.get("FRA_TABLE"),
            rule.get("FRA_SRC"),
            rule.get("FRA_DST"),
            rule.get("FRA_SPORT_RANGE"),
        )
        if found == wanted and rule.get("FRA_DPORT_RANGE") == f"{peer[1]}:{peer[1]}":
            return True
    return False
