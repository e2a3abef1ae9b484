"""`hijack move PID --to HOST` of a process with descendants: the tree moves as one.

As a single process's move (hijack.node.move), with these differences:
- every member is frozen together (hijack.mutator.frozen_tree) and the image is a
  tree stream (docs/crf.md §7b), which the destination restores with its relations
  (hijack.restore.tree): under the old pids where they are free, else fresh ones;
- what joins members to each other (pipes, unix socket pairs: links `inside`) is made
  again there from the image; every other socket, pipe or listener of every member is
  proxied through the tree's one home shadow. A description members share (nginx's
  listener, inherited by its workers) is one stream, its relay (or listener) at the
  destination given to each of them;
- one two-phase commit for all: if anything fails before it, every member resumes
  untouched at home; after it, every member here is killed together;
- pre-copy over all members (precopy_tree): while the tree runs, each member's memory
  is sent in rounds, round 0's pages a member before it sent already (their frame is the
  same: shared copy-on-write since a fork) as references to that member's page; the
  destination keeps each member's pages (hijack.restore.tree_rounds). After the last
  round, the tree still running, it forks the tree's stubs with the relations read
  then (their pids decided there and then) and fills each from its rounds (_prebuild):
  the freeze only applies the final image to them, as a single process's. At the
  freeze a reference whose page either member wrote, dropped or mapped anew since (the
  tracking tells: Precopy.stale_references) is stored in the final image.
- post-copy (`--postcopy`, or by itself when the tree's rounds do not converge): every
  member's pages written since its last round in private anonymous memory are left out
  of the final image and served by the frozen originals after the start, one page
  server for the whole tree on the move's connection (docs/protocol.md, "Post-copy of a
  tree"); cut off before the last page, every member there is stopped and every
  original held here. Memory members share (MAP_SHARED, memfd: one object) is never
  lazy: what changed of it goes in the final image, once; pages still shared
  copy-on-write are never lazy either (a page a member wrote since its rounds is a
  frame of its own), and the final image stores them once, as before.

A process whose parent stays behind (an nginx worker, a pool's worker: a fork of
its parent that never exec'd) is refused unless --leave-parent
(refuse_leaving_parent): its parent would see it exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from hijack.errors import HijackError, ProcessGone, Unsupported
from hijack.image import records as rec
from hijack.mutator.dump import (
    Injected,
    kill_stopped,
    queue_injected,
    read_credentials,
    write_image,
    write_tree,
)
from hijack.mutator.frozen_tree import FrozenTree, frozen_tree, has_exited, relations_now
from hijack.mutator.handover import hand_descriptors_to_shadow
from hijack.mutator.parasite import map_areas, run_across, unmap_areas
from hijack.mutator.postcopy import encode_runs, lazy_bytes, pinned_pages
from hijack.mutator.precopy import Changes, Frames, Precopy, RoundSent
from hijack.mutator.shared_pages import SharedPages
from hijack.mutator.tracee import Tracee
from hijack.node import mounts, pki
from hijack.node.channel import Channel, DataWriter
from hijack.node.move import (
    FreezeTiming,
    HomeShadow,
    MemberMoved,
    MoveInDoubt,
    MoveResult,
    PostcopyBroken,
    Proxy,
    _abort,
    _commit,
    _laps_of,
    _Progress,
    _switch_shadow,
    connect_datagrams,
    consume_unread,
    converged,
    direct_numbers,
    drain_datagrams,
    drain_terminals,
    hand_back,
    home_fields,
    peek_unread,
    plan_proxies,
    quiet_shadow,
    serve_lazy,
    signals_held,
    tell_frozen,
    unhomeable,
    unsettled_for_home,
)
from hijack.node.packet_relay import PacketRelays
from hijack.node.repoint import Repointed
from hijack.objects import pipe, unix
from hijack.process.tree import read_tree
from hijack.registry import ProcessRecord
from hijack.shadow import control
from hijack.sys import kcmp, procfs
from hijack.testpoint import reached
from hijack.timing import Laps

PREPARE_TIMEOUT = 120.0  # seconds: a pre-copied tree's rebuild there, once its image is in


def is_tree(pid: int) -> bool:
    """Whether process `pid` has descendants (a move takes them with it)."""
    return len(read_tree(pid).members) > 1


# -- a member whose parent stays ---------------------------------------------------------


def forked_from_parent(pid: int) -> bool:
    """Whether `pid` is a fork of its parent that never exec'd (an nginx worker, a pool's
    worker): its auxiliary vector is its parent's, byte for byte. An exec gives a new one
    (its stack and, randomized, its entry point and AT_RANDOM)."""
    try:
        parent = procfs.read_stat(pid).ppid
        if parent <= 1:
            return False
        with open(f"/proc/{pid}/auxv", "rb") as own, open(f"/proc/{parent}/auxv", "rb") as theirs:
            return own.read() == theirs.read()
    except (OSError, ProcessGone):
        return False


def refuse_leaving_parent(pid: int, destination: str) -> None:
    """Refuse to move `pid` without its parent when it is a fork of its parent (which
    then sees it exit: nginx's master starts another worker); name the tree to move."""
    if not forked_from_parent(pid):
        return
    top = procfs.read_stat(pid).ppid
    while forked_from_parent(top):
        top = procfs.read_stat(top).ppid
    parent = procfs.read_stat(pid).ppid
    raise HijackError(
        f"cannot move process {pid} ({procfs.read_stat(pid).comm}) without its parent"
        f" {parent} ({procfs.read_stat(parent).comm}): it is a fork of its parent, which stays"
        " here and would see it exit (a server's master starts another worker). Move the"
        f" whole tree: `hijack move {top} --to {destination}`; or `--leave-parent` to move"
        " it alone anyway; nothing was changed",
        pid=pid,
    )


# -- planning ------------------------------------------------------------------------------


def links_inside(
    members: list[int], besides: frozenset[int], before: procfs.HolderScan | None = None
) -> frozenset[str]:
    """The descriptor links joining `members` only: pipes no other process holds (but
    `besides`: us, the tree's shadow) and unnamed unix socket pairs whose two ends they
    hold. Made again at the destination from the image. `before`: who held their pipes
    before the freeze (pipe.scan_holders_before): only what changed since is looked at."""
    entries = {pid: procfs.list_fds(pid) for pid in members}
    pipes = frozenset(
        e.target for found in entries.values() for e in found if e.kind is procfs.FdKind.PIPE
    )
    others = besides | frozenset(members)
    holders = pipe.holders_since(pipes, others, before) if pipes else {}
    inside = {target for target in pipes if not holders.get(target)}
    sockets = {e.ino for found in entries.values() for e in found if e.kind is procfs.FdKind.SOCKET}
    if sockets:
        paired = unix.pairs_inside(members[0], sockets)
        inside |= {f"socket:[{inode}]" for inode in paired}
    return frozenset(inside)


def stream_name(pid: int, fd: int, root: int) -> str:
    """At home, the shadow's stream of member `pid`'s descriptor `fd` (the root's as a
    single process's: "fd:N")."""
    return f"fd:{fd}" if pid == root else f"fd:{fd}@{pid}"


# What a member's plan may hold that a tree cannot move with yet: kind, what, a note.
TREE_REFUSED = (("master", "a pty master", ""),)


def plan_tree(
    members: list[int],
    root: int,
    shadow: HomeShadow | None,
    at_home: bool,
    *,
    shared: dict[tuple[int, int], tuple[int, int]] | None = None,
    besides: frozenset[int] = frozenset(),
    frozen: bool = True,
    sockets: dict[int, procfs.SocketInfo] | None = None,
    holders_before: procfs.HolderScan | None = None,
) -> dict[int, list[Proxy]]:
    """Each member's proxies, by pid; refuse what cannot go.

    At home, a descriptor a member shares with one before it (`shared`, the TREE's
    links) is its stream; away, the shadow's streams are matched by their ends.
    `sockets`: the tree's socket tables, read since it was frozen (else read here).
    `holders_before`: who held the members' pipes before the freeze (links_inside)."""
    # A single process: as hijack.node.move plans it.
    tree = len(members) > 1
    inside = links_inside(members, besides, holders_before) if tree else frozenset()
    # Running, members accept clients while we look: each reads the table after its
    # descriptors (plan_proxies). Frozen, one reading serves them all.
    if sockets is None and tree and frozen:
        sockets = procfs.read_socket_table(root)
    plans: dict[int, list[Proxy]] = {}
    terminals: dict[tuple[int, int], str] = {}  # at home: a terminal's (dev, ino) -> its stream
    for pid in members:
        plan, _ = plan_proxies(
            pid, None if at_home else shadow, at_home, frozen=frozen, sockets=sockets, inside=inside
        )
        for kind, what, note in TREE_REFUSED:
            fds = [str(p.fd) for p in plan if p.kind == kind]
            if fds and tree:
                raise Unsupported(
                    f"cannot move the tree of process {root}: member {pid} holds {what}"
                    f" (fd {', '.join(fds)}{note}); moving a tree with one is not"
                    " implemented yet; nothing was changed"
                )
        if at_home and tree:
            links = shared or {}
            plan = [
                dataclasses.replace(
                    p,
                    stream=terminal_stream(pid, p.fd, root, terminals)
                    if p.kind == "terminal"
                    else stream_name(*links.get((pid, p.fd), (pid, p.fd)), root=root),
                )
                if p.kind != "direct"
                else p
                for p in plan
            ]
        if tree:  # a direct connection is no stream of the shadow's: one name per member's
            plan = [
                dataclasses.replace(p, stream=f"direct:{p.fd}" + (f"@{pid}" if pid != root else ""))
                if p.kind == "direct"
                else p
                for p in plan
            ]
        plans[pid] = plan
    if tree:
        refuse_shared_direct(plans, root)
    return open_files_across(plans) if tree and frozen else plans


def _socket_holders(plans: dict[int, list[Proxy]]) -> dict[int, int]:
    """How many members hold each socket (by inode) of their plans."""
    counts: dict[int, int] = {}
    for member, plan in plans.items():
        for proxy in plan:
            with contextlib.suppress(OSError):  # closed since
                inode = os.stat(f"/proc/{member}/fd/{proxy.fd}").st_ino
                counts[inode] = counts.get(inode, 0) + 1
    return counts


def refuse_shared_direct(plans: dict[int, list[Proxy]], root: int) -> None:
    """Refuse a direct connection more than one member holds (inherited across a fork):
    its peer is made again towards the destination once, for one holder."""
    holders: dict[str, list[int]] = {}
    for pid, plan in plans.items():
        for proxy in plan:
            if proxy.kind in ("direct", "routed"):
                with contextlib.suppress(OSError):  # closed since: planned again frozen
                    socket_link = os.readlink(f"/proc/{pid}/fd/{proxy.fd}")
                    holders.setdefault(socket_link, []).append(pid)
    for link, pids in holders.items():
        if len(set(pids)) > 1:
            raise Unsupported(
                f"cannot move the tree of process {root}: members"
                f" {', '.join(map(str, sorted(set(pids))))} share one direct connection"
                f" ({link}, swapped); moving a tree with one is not implemented yet;"
                " nothing was changed"
            )


def terminal_stream(pid: int, fd: int, root: int, terminals: dict[tuple[int, int], str]) -> str:
    """At home, the stream of member `pid`'s terminal at `fd`: one for all the descriptors
    of every member on that terminal (one pty at the destination), named for its first
    holder's lowest descriptor ("tty:N" for the root's N, as a single process's)."""
    name = f"tty:{fd}" if pid == root else f"tty:{fd}@{pid}"
    try:
        found = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:  # closed since (the tree not frozen yet): the freeze plans it again
        return name
    return terminals.setdefault((found.st_dev, found.st_ino), name)


def open_files_across(plans: dict[int, list[Proxy]]) -> dict[int, list[Proxy]]:
    """Each terminal descriptor's `file` numbered across the tree: descriptors of several
    members that are one open file (inherited across a fork: one set of flags) get one
    slave at the destination, as one relayed socket does."""
    firsts: list[tuple[str, int, int, int]] = []  # (stream, pid, fd, number), one per file
    numbered: dict[tuple[int, int], int] = {}  # (pid, its file) -> number
    for pid, plan in plans.items():
        for proxy in plan:
            if proxy.kind != "terminal" or (pid, proxy.file) in numbered:
                continue
            number = next(
                (
                    n
                    for stream, other, fd, n in firsts
                    if stream == proxy.stream
                    and kcmp.same_description_in(other, fd, pid, proxy.file)
                ),
                None,
            )
            if number is None:
                number = len(firsts)
                firsts.append((proxy.stream, pid, proxy.file, number))
            numbered[(pid, proxy.file)] = number
    return {
        pid: [
            dataclasses.replace(p, file=numbered[(pid, p.file)]) if p.kind == "terminal" else p
            for p in plan
        ]
        for pid, plan in plans.items()
    }


# -- the move ------------------------------------------------------------------------------


def precopy_tree(
    pid: int,
    members: list[int],
    channel: Channel,
    move_id: str,
    program: str,
    report: Callable[[str, int], None],
    shadow: HomeShadow,
    postcopy: bool | None = None,
) -> dict[int, Precopy]:
    """Send every member's memory in rounds while the tree runs (docs/protocol.md, "Moving
    a tree"): each round, member by member; the rounds stop as a single process's do, on
    what the whole tree wrote. The members' Precopy, by pid (each to be closed).
    `postcopy` as hijack.node.move._precopy's: True, post-copy after round 0; None, when
    the tree's rounds stop without having converged."""
    channel.send(
        {
            "op": "precopy",
            "tree": True,
            "move": move_id,
            "pid": pid,
            "members": members,
            "program": program,
            "credentials": dataclasses.asdict(read_credentials(pid)),
            "mount_namespace": mounts.describe(pid, shadow.pid()),
        }
    )
    channel.expect("phase")  # accepted: a refusal comes before anything is touched
    precopies: dict[int, Precopy] = {}
    try:
        for member in members:
            try:
                precopies[member] = Precopy.start(member)
            except HijackError:
                if member == pid or not has_exited(member):
                    raise
                continue  # ended already (a pool's worker whose work is done)
            precopies[member].through_mem = True
        frames: Frames = {}
        sent = 0
        before: RoundSent | None = None
        root = precopies[members[0]]
        while True:
            number = root.rounds
            pages = image_bytes = 0
            for member, precopy in list(precopies.items()):
                if member != pid and has_exited(member):
                    # Its rounds stop: the frozen tree leaves it out, and a page another
                    # member referred to in its memory goes in the final image.
                    precopies.pop(member).close()
                    continue
                report(f"round {number}", sent)
                channel.send({"op": "round", "round": number, "member": member})
                writer = DataWriter(channel)
                progress = _Progress(writer, report, f"round {number}", sent)
                known = len(precopy.references)
                last = precopy.send_round(cast(BinaryIO, progress), frames if number == 0 else None)
                writer.close()
                precopy.bytes_sent += writer.sent
                sent += writer.sent
                pages += last.pages
                image_bytes += last.image_bytes
                channel.send(
                    {
                        "op": "refer",
                        "member": member,
                        "references": [list(r) for r in precopy.references[known:]],
                    }
                )
                channel.expect("phase")
            tree_round = RoundSent(number, pages, image_bytes)
            if number == 0:
                reached("move-first-round")
            if postcopy or not root.should_continue(tree_round, before):
                lazy = bool(postcopy) or (postcopy is None and not converged(tree_round, before))
                for precopy in precopies.values():
                    precopy.postcopy = lazy
                report("building there", sent)
                _prebuild(pid, channel)
                for precopy in precopies.values():
                    precopy.prepare_freeze()
                return precopies
            before = tree_round
    except BaseException:
        for precopy in precopies.values():
            precopy.close()
        raise


def _prebuild(pid: int, channel: Channel) -> None:
    """Have the destination fork the tree's stubs with its relations as they are now and
    build each from its rounds, before the freeze (docs/protocol.md, "Moving a tree"):
    the freeze then only applies the final image. The frozen tree is checked against
    this one there (a member forked or gone since: its stubs built during the freeze)."""
    tree = relations_now(pid)
    # Each member's executable: its stub's exe link is set to it before the freeze.
    exe: dict[str, str] = {}
    for member in tree.imaged:
        with contextlib.suppress(HijackError):  # gone meanwhile: its link set frozen
            exe[str(member.pid)] = procfs.read_exe(member.pid)
    channel.send(
        {
            "op": "prebuild",
            "members": [
                [m.pid, m.ppid, m.pgid, m.sid, m.exit_signal, m.exit_code, int(m.state), m.comm]
                for m in tree.members
            ],
            "contexts": [[c.pid, int(c.flags)] for c in tree.contexts],
            "exe": exe,
        }
    )
    patience = channel.sock.gettimeout()
    # It writes every member's pages in: on a big tree, longer than the usual silence.
    channel.sock.settimeout(max(patience or 0.0, PREPARE_TIMEOUT))
    try:
        channel.expect("phase")
    finally:
        channel.sock.settimeout(patience)
    reached("move-prebuilt")


@dataclass(frozen=True)
class TreeMoveContext:
    """What hijack.node.move's _move_attached hands a tree's move."""

    pid: int
    channel: Channel
    shadow: HomeShadow
    at_home: bool
    move_id: str
    record: ProcessRecord
    relay_address: str
    report: Callable[[str, int], None]
    mark_moved: Callable[[], None]
    destination: tuple[tuple[str, int], pki.NodeIdentity]
    home: control.HomeEndpoint | None
    packets: PacketRelays  # its members' connections relayed by packets


def move_tree_frozen(
    context: TreeMoveContext, precopied: dict[int, Precopy] | None = None
) -> MoveResult:
    """Freeze the tree, send it (after pre-copy: what changed since, of the members
    `precopied`), commit, switch the shadow, kill the members here."""
    pid, channel, shadow, move_id = context.pid, context.channel, context.shadow, context.move_id
    # Back to its home node, with nothing but streams and listeners relayed: the shadow
    # may hand every member its originals back (docs/protocol.md, "Home again").
    homing = not context.at_home and channel.peer == context.record.home_node
    relayed = "" if homing else None  # why its shadow relays its descriptors still
    handled = False  # the abort is _frozen's once the tree is frozen
    repointed = Repointed(context.destination[1])
    try:
        if homing:
            relayed = unhomeable([p for plan in _running_plans(context)[0].values() for p in plan])
        if not context.at_home:
            what = f"the tree of process {pid} runs"
            quiet_shadow(shadow, move_id, what, pid, flush=homing and not relayed)
        if homing and not relayed:
            relayed = unsettled_for_home(pid, shadow, lambda: _running_plans(context))
        # Who else holds the members' pipes, while they run: each member's image then
        # checks only what changed (a scan of every process each, frozen, otherwise).
        holders_before = pipe.scan_holders_before(*read_tree(pid).pids)
        # The peers' helpers of its members' direct connections, started while it runs.
        repointed.standby(pid)
        with frozen_tree(pid) as frozen:
            handled = True
            # The freeze began with the first member's interrupt (as a single process's:
            # its first interrupt), not with the looks above, taken while the tree runs.
            stops = [t.stopped_at for t in frozen.tracees.values() if t.stopped_at]
            laps = Laps(min(stops, default=0.0) or None)
            laps.lap("stop")
            return _frozen(
                context, frozen, laps, precopied or {}, holders_before, relayed, repointed
            )
    except BaseException:
        if not handled:
            repointed.abort()
            if not context.at_home:
                _abort(channel, shadow, move_id)
        raise


PLAN_TRIES = 5  # looks at a running tree whose members end while we look (then: refused)


def _running_plans(context: TreeMoveContext) -> tuple[dict[int, list[Proxy]], list[str]]:
    """Away, while the tree runs: each member's proxies, and the streams they hold. A
    member that ends while we look (a pipeline's producer done) is not there next time."""
    tries = PLAN_TRIES
    while True:
        members = list(read_tree(context.pid).pids)  # the root gone: ProcessGone
        try:
            plans = plan_tree(members, context.pid, context.shadow, False, frozen=False)
            return plans, sorted({p.stream for plan in plans.values() for p in plan})
        except ProcessGone:
            tries -= 1
            if not tries:
                raise


def _frozen(
    context: TreeMoveContext,
    frozen: FrozenTree,
    laps: Laps,
    precopied: dict[int, Precopy],
    holders_before: procfs.HolderScan,
    relayed: str | None = None,
    repointed: Repointed | None = None,
) -> MoveResult:
    """`relayed`: a move home's so far ("" if every original may come back), else None."""
    pid, channel, shadow, move_id = context.pid, context.channel, context.shadow, context.move_id
    homing = relayed == ""
    at_home = context.at_home
    tracees = frozen.tracees
    members = list(tracees)
    stopped = {m.pid for m in frozen.record.members if m.state is rec.MemberState.STOPPED}
    shared = {(s.pid, s.fd): (s.holder_pid, s.holder_fd) for s in frozen.record.shared}
    besides = frozenset({os.getpid(), shadow.pid()})
    # Members gone since the rounds have no image; those born since, a whole one.
    precopied = {member: p for member, p in precopied.items() if member in tracees}
    before = sum(p.bytes_sent for p in precopied.values())
    repointed = repointed or Repointed(context.destination[1])
    postcopy = any(p.postcopy for p in precopied.values())
    planned: dict[int, list[tuple[int, int]]] = {}  # each member's lazy candidates
    lazy: dict[int, list[tuple[int, int]]] = {}  # each member's pages left out of its image
    try:
        reached("move-frozen")
        if precopied:
            for precopy in precopied.values():
                precopy.freeze()
            laps.lap("dirty scan")
            changes = Changes(precopied)
            for precopy in precopied.values():
                precopy.stale_references(changes)
            laps.lap("references")
            if postcopy:
                # Decided before any image, told in the move's message: each member's
                # image is rebuilt there before the next one's comes (Precopy.plan_lazy).
                for member, precopy in precopied.items():
                    precopy.pinned = pinned_pages(tracees[member])
                    planned[member] = precopy.plan_lazy()
                laps.lap("post-copy: lazy pages")
        # Read once for the plan and the images (a table read walks the kernel's hash of
        # its kind: 7-10 ms for them all under load), as a single process's move does.
        sockets = procfs.read_socket_table(pid)
        plans = plan_tree(
            members,
            pid,
            shadow,
            at_home,
            shared=shared,
            besides=besides,
            sockets=sockets,
            holders_before=holders_before,
        )
        laps.lap("plan")
        # The members' direct connections (swapped): each peer frozen and joined towards
        # the destination, live at the commit (hijack.node.repoint), as a single process's.
        towards = channel.sock.getpeername()[0]
        for member, plan in plans.items():
            if any(p.kind == "direct" for p in plan):
                plans[member] = repointed.prepare(member, plan, towards, member, laps)
        if repointed.sessions:
            laps.lap("direct peers")
        # Its members' connections relayed by packets (hijack.node.packet_relay), as a
        # single process's; a socket two members share stays the shadow's.
        held = frozenset(ino for ino, count in _socket_holders(plans).items() if count > 1)
        for member, plan in plans.items():
            suffix = f"@{member}" if member != pid else ""
            plans[member] = context.packets.prepare(
                member, plan, sockets, repointed.queues, member=member, suffix=suffix, shared=held
            )
        if context.packets.taken:
            laps.lap("packet relays")
        # Their queues follow the move message in the order of its proxies.
        repointed.queues = {
            (member, p.fd): repointed.queues[(member, p.fd)]
            for member, plan in plans.items()
            for p in plan
            if p.kind == "direct"
        }
        unread: dict[str, bytes] = {}
        if at_home:
            control_path = context.record.shadow_control or ""
            for member in members:
                hand_descriptors_to_shadow(member, control_path, as_member=member != pid)
            proxy = [
                {
                    "fd": p.fd,
                    "member": 0 if member == pid else member,
                    "stream": p.stream,
                    "listener": p.kind == "listener",
                    "datagram": p.kind == "datagram",
                    "terminal": p.kind == "terminal",
                }
                for member, plan in plans.items()
                for p in plan
                if p.kind != "direct"  # no stream of the shadow's
            ]
            answer = shadow.migrating({"move": move_id, "proxy": proxy})
            plans = {
                member: connect_datagrams(plan, answer, context.relay_address)
                for member, plan in plans.items()
            }
        else:
            for member, plan in plans.items():
                unread.update(peek_unread(member, plan))
            if homing:
                present = sorted({p.stream for plan in plans.values() for p in plan})
                relayed = hand_back(plans, shadow, move_id, unread, present)
                homing = not relayed
            if homing:  # a description members share comes back once, to each of them
                plans = {
                    member: [dataclasses.replace(p, kind="original") for p in plan]
                    for member, plan in plans.items()
                }
        laps.lap("shadow hand-over")
        message = _move_message(context, plans, _controlling(frozen, plans), homing)
        if postcopy:
            message["postcopy"] = True
            message["lazy"] = {str(member): encode_runs(runs) for member, runs in planned.items()}
        channel.send(message)
        # (Sent while frozen, as the image: counted with it.)
        before += (queued := repointed.send_unread(channel))
        laps.lap("move message")
        context.report("streaming", before)
        writer = DataWriter(channel)
        parts = _write_tree(
            frozen, cast(BinaryIO, writer), besides, precopied, sockets, holders_before, laps
        )
        writer.close()
        laps.lap("image: pages")
        context.report("restoring", before + writer.sent)
        patience = channel.sock.gettimeout()
        if precopied:
            # The destination writes every member's pages from the rounds in now, after
            # the image's last byte: on a big tree, longer than the channel's usual silence.
            channel.sock.settimeout(max(patience or 0.0, PREPARE_TIMEOUT))
        try:
            prepared = channel.expect("phase")
        finally:
            channel.sock.settimeout(patience)
        laps.lap("destination")
        reached("move-prepared")
        lazy = {member: p.lazy for member, p in precopied.items() if p.lazy}
        # A post-copy's originals must outlive the commit until the last page is out:
        # `hijack recover` tells that move by this phase.
        context.report("post-copy" if lazy else "switching", before + writer.sent)
    except BaseException:
        repointed.abort()
        context.packets.abort()
        _abort(channel, shadow, move_id)
        raise
    # From the commit on, the answer alone decides (as hijack.node.move's).
    with signals_held():
        for member in members:
            os.kill(member, signal.SIGSTOP)
        try:
            outcome, answer, reason = _commit(channel, move_id, *context.destination)
        except Exception as exc:  # a malformed answer: what happened there is not known
            outcome, answer, reason = "unknown", {}, f"{type(exc).__name__}: {exc}"
        if outcome != "running":
            repointed.abort()  # in doubt too: each peer keeps its old connection
        if outcome == "aborted":
            context.packets.abort()
            _abort(channel, shadow, move_id)
            for member in members:
                if member not in stopped:
                    os.kill(member, signal.SIGCONT)  # the pending SIGSTOP taken back
            raise HijackError(
                f"{channel.peer} did not run the tree: {reason}; every member runs on here"
                " as before",
                pid=pid,
            )
        if outcome == "unknown" and lazy:
            # `hijack recover` would end the originals if the copy runs: the only whole
            # one, as the copy cannot get its pages any more.
            raise PostcopyBroken(
                f"move {move_id}: {reason}, and {channel.peer} could not be asked what became"
                f" of the commit. The tree of process {pid} is held stopped here: if a copy"
                f" of it runs on {channel.peer} it is stopped there, without its last pages;"
                f" kill that copy, then `kill -CONT` every member here",
                pid=pid,
            )
        if outcome == "unknown":
            raise MoveInDoubt(
                f"move {move_id}: {reason}, and {channel.peer} could not be asked what became"
                f" of the commit. The tree of process {pid} is held stopped here so that it"
                f" never runs twice: run `hijack recover` once {channel.peer} answers, or"
                f" `kill -CONT` its members only if nothing of it runs on {channel.peer}",
                pid=pid,
            )
        laps.lap("commit")
        unjoined = repointed.commit()
        routed = context.packets.commit()
        if routed:
            laps.lap("packet relays: let go")
        everything = [p for plan in plans.values() for p in plan]
        unread_datagrams: dict[str, list[tuple[str, bytes]]] = {}
        if not at_home:
            for member, plan in plans.items():
                unread_datagrams.update(drain_datagrams(member, plan))
                # The members' one pty here: what was typed and not read yet, taken once.
                typed = [p for p in plan if p.kind == "terminal" and p.stream not in unread]
                unread.update(drain_terminals(member, typed))
        pids = {int(old): int(now) for old, now in dict(prepared.get("pids", {})).items()}
        try:
            _switch_shadow(
                shadow,
                move_id,
                channel.peer,
                plans[pid] if homing else everything,  # home again: the root's numbers
                prepared,
                unread,
                unread_datagrams,
                sorted({p.stream for p in everything if p.kind != "direct"}),
                home_again=homing,
                members={
                    pids.get(member, member): {p.fd: p.stream for p in plan}
                    for member, plan in plans.items()
                    if member != pid and homing
                },
                direct={
                    0 if member == pid else member: direct_numbers(plan)
                    for member, plan in plans.items()
                }
                if at_home
                else None,
            )
            unswitched = None
        except HijackError as exc:
            unswitched = exc  # the copy runs all the same: it is the tree now
        laps.lap("shadow switch")
        freeze_ms = laps.total_ms()
        if not lazy:
            tell_frozen(channel, freeze_ms)
        context.packets.forget_left()
        context.mark_moved()
        if not at_home:
            for member, plan in plans.items():
                with contextlib.suppress(HijackError, OSError):  # committed: nothing may fail
                    consume_unread(member, plan)
        broken, postcopy_ms = None, 0.0
        if lazy:
            reached("move-postcopy")  # the copies run there, without their lazy pages yet
            context.report("post-copy", before + writer.sent)
            broken, postcopy_ms = serve_lazy(channel, answer, lazy, tree=True)
        if broken is None:
            _kill_together(list(tracees.values()))
    if broken is not None:
        # The pending SIGSTOP holds every original once we let them go.
        raise PostcopyBroken(
            f"move {move_id}: post-copy to {channel.peer} broke off ({broken}) with"
            f" {lazy_bytes([r for runs in lazy.values() for r in runs]) >> 20} MiB of pages"
            f" of {len(lazy)} members not all delivered: every member of the copy there"
            f" (root pid {answer.get('pid', '?')}) is stopped, and every member of the tree"
            f" of process {pid} is held stopped here as the only whole one. To go on here:"
            f" kill the copy's members on {channel.peer}, then `kill -CONT` every member here"
            f" ({' '.join(map(str, members))})",
            pid=pid,
        )
    if unjoined:
        raise HijackError(
            f"the tree of process {pid} runs on {channel.peer} as {answer['pid']}, but"
            f" {'; '.join(unjoined)}",
            pid=pid,
        )
    if unswitched is not None:
        raise HijackError(
            f"the tree of process {pid} runs on {channel.peer} as {answer['pid']}, but its home"
            f" shadow could not be told to relay to it ({unswitched})",
            pid=pid,
        )
    moved = tuple(
        MemberMoved(m.pid, pids.get(m.pid, 0), m.comm, *parts.get(m.pid, (0, 0.0)))
        for m in frozen.record.members
    )
    return MoveResult(
        move_id=move_id,
        pid=pid,
        new_pid=int(answer["pid"]),
        destination=channel.peer,
        freeze_ms=freeze_ms,
        bytes_sent=before + writer.sent,
        rounds=max((p.rounds for p in precopied.values()), default=0),
        frozen_bytes=queued + writer.sent,
        tracking_pause_ms=sum(p.pause_ms for p in precopied.values()),
        timing=FreezeTiming(
            laps.rounded(),
            sum(t.injected for t in tracees.values()),
            _laps_of(prepared) | _laps_of(answer),
            int(prepared.get("injected", 0)) + int(answer.get("injected", 0)),
        ),
        members=moved,
        relayed_at_home=relayed,
        postcopy_bytes=lazy_bytes([r for runs in lazy.values() for r in runs]),
        postcopy_ms=postcopy_ms,
        packet_relays=routed,
    )


def _controlling(frozen: FrozenTree, plans: dict[int, list[Proxy]]) -> dict[str, Any]:
    """The root's controlling terminal, if a member holds it: its stream, and the
    terminal's foreground process group if that is a group of the tree (docs/protocol.md,
    "Moving a tree"); {} if none."""
    root = frozen.record.members[0].pid
    stat = procfs.read_stat(root)
    if stat.tty_nr == 0:
        return {}
    for member, plan in plans.items():
        for proxy in plan:
            if proxy.kind != "terminal":
                continue
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{member}/fd/{proxy.fd}").st_rdev == stat.tty_nr:
                    groups = {m.pgid for m in frozen.record.members}
                    foreground = stat.tpgid if stat.tpgid in groups else 0
                    return {"controlling": proxy.stream, "foreground": foreground}
    return {}


def _move_message(
    context: TreeMoveContext,
    plans: dict[int, list[Proxy]],
    controlling: dict[str, Any],
    home_again: bool,
) -> dict[str, Any]:
    """The `move` of a tree (docs/protocol.md, "Moving a tree"); `home_again`: every
    member's proxies are originals its home shadow handed back."""
    return {
        **controlling,
        "op": "move",
        "tree": True,
        "move": context.move_id,
        "home_again": home_again,
        "pid": context.pid,
        "program": context.record.program,
        "mount_namespace": mounts.describe(context.pid, context.shadow.pid()),
        "home": home_fields(
            context.record, context.relay_address, context.shadow.token, context.home
        ),
        "proxies": [
            {**p.__dict__, "member": member} for member, plan in plans.items() for p in plan
        ],
        "postcopy": False,
    }


def _write_tree(
    frozen: FrozenTree,
    out: BinaryIO,
    besides: frozenset[int],
    precopied: dict[int, Precopy],
    sockets: dict[int, procfs.SocketInfo],
    holders_before: procfs.HolderScan | None = None,
    laps: Laps | None = None,
) -> dict[int, tuple[int, float]]:
    """The tree stream of the frozen tree to `out` (pages members still share since a
    fork stored once: write_tree; of a member `precopied`, what changed since the rounds):
    each member's (bytes, ms). `sockets`: its socket tables, read since it was frozen."""
    sizes: dict[int, tuple[int, float]] = {}
    # The tree's shadow holds its pipes too (handed over): inside all the same.
    inside = frozenset(frozen.tracees) | besides
    # Members sharing their parent's memory (CLONE_VM; a tree moved without rounds):
    # their images hold no pages, the destination builds that memory once.
    vm_children = frozenset(c.pid for c in frozen.record.contexts if rec.CloneFlags.VM in c.flags)

    # What only each member tells from inside (its batched calls), asked of all at once:
    # their areas mapped side by side, every member's batches run side by side, their
    # areas unmapped side by side after the last image. An injected call costs a trip
    # through the scheduler, ~1 ms under load: 9 members' 5 trips each one after the
    # other took 25-80 ms of the freeze.
    imaged = [frozen.tracees[m.pid] for m in frozen.record.imaged]
    # Each member's layout without any area: read before they are mapped (members sharing
    # their memory, CLONE_VM, would each see the other's), at the freeze if pre-copied.
    layouts = {
        t.pid: precopied[t.pid].maps_at_freeze if t.pid in precopied else procfs.read_maps(t.pid)
        for t in imaged
    }
    areas = dict(zip((t.pid for t in imaged), map_areas(imaged), strict=True))
    if laps is not None:
        laps.lap("image: areas")
    injected: dict[int, Injected] = {}
    tree_bytes: dict[Hashable, int] = {}  # shared memory's bytes: in one member's image

    def member_image(tracee: Tracee, shared: SharedPages) -> tuple[rec.End, int, int]:
        started = time.perf_counter()
        precopy = precopied.get(tracee.pid)
        end, threads, written = write_image(
            tracee,
            out,
            sockets=sockets,
            tree=inside,
            shared_pages=shared,
            precopied=precopy,
            holders_before=holders_before,
            parents_memory=tracee.pid in vm_children,
            laps=laps,
            parasite=areas[tracee.pid],
            maps=layouts[tracee.pid],
            injected=injected[tracee.pid],
            tree_bytes=tree_bytes,
        )
        if laps is not None:
            laps.lap("image: pages")
        sizes[tracee.pid] = (written, (time.perf_counter() - started) * 1000)
        return end, threads, written

    try:
        for member, precopy in precopied.items():
            if member in areas:
                precopy.scan_guards()  # in a thread: mapped first (an mmap waits for it)
        queued = {
            t.pid: queue_injected(t, areas[t.pid], precopied=precopied.get(t.pid)) for t in imaged
        }
        run_across([(t, queued[t.pid][0]) for t in imaged])
        if laps is not None:
            laps.lap("image: batches")
        injected.update((pid, read()) for pid, (_, read) in queued.items())
        for tracee in imaged:
            tracee.put_back()  # nothing more is injected but the unmaps
        if laps is not None:
            laps.lap("image: injected")
        write_tree(frozen, out, member_image)
    except BaseException:
        with contextlib.suppress(HijackError):
            unmap_areas([(t, areas[t.pid]) for t in imaged])
        raise
    unmap_areas([(t, areas[t.pid]) for t in imaged])
    # The munmaps left each member's injection thread on our registers again: put back,
    # so that a mover killed from here on (the commit, a post-copy) leaves every member
    # to run on where it stopped, not from the syscall instruction the calls ran at.
    for tracee in imaged:
        tracee.put_back()
    return sizes


def _kill_together(tracees: list[Tracee]) -> None:
    """Every member here, stopped, killed at once, then each collected (children first)."""
    for tracee in tracees:
        with contextlib.suppress(ProcessLookupError):
            os.kill(tracee.pid, signal.SIGKILL)
    for tracee in reversed(tracees):
        with contextlib.suppress(HijackError, OSError):
            kill_stopped(tracee)
