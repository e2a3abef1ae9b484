"""The `hijack` command: parse, call, render. Exit 0 ok, 1 failure, 2 usage."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import BinaryIO

from rich.console import Console

import hijack
from hijack import check as checking
from hijack import lockbook, objects
from hijack.cli import render
from hijack.errors import HijackError
from hijack.image.codec import (
    next_is_round,
    read_image,
    read_round,
    read_stream,
    round_pages,
    skip_rounds,
)
from hijack.image.records import Pages
from hijack.image.summary import (
    ImageSummary,
    TreeSummary,
    summarize,
    summarize_rounds,
    summarize_stream,
)
from hijack.mutator import attach as attaching
from hijack.mutator import dump as dumping
from hijack.mutator.handover import hand_descriptors_to_shadow
from hijack.mutator.tracee import signals_deferred
from hijack.node import daemon as node_daemon
from hijack.node import drain as draining
from hijack.node import gate, naming, pki, repoint
from hijack.node import move as moving
from hijack.node import swap as swapping
from hijack.node.daemon import DEFAULT_PORT
from hijack.objects.base import DEFAULT_GHOST_LIMIT
from hijack.registry import DEFAULT_STATE_DIR, Registry, node_name, state_dir
from hijack.restore import tree as restoring_trees
from hijack.shadow import control
from hijack.status import model as status_model
from hijack.status import view as status_view
from hijack.status import watch as status_watch
from hijack.sys import procfs

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
PIPED_WIDTH = 1000  # columns of output to a pipe or file: tables at their whole width


class Interrupted(HijackError):
    """SIGINT or SIGTERM reached the command; everything it changed was undone."""


def _raise_interrupted(signal_number: int, _frame: FrameType | None) -> None:
    raise Interrupted(f"interrupted by {signal.Signals(signal_number).name}; target left as it was")


def parse_pid(text: str) -> int:
    try:
        pid = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}") from None
    if pid <= 0:
        raise argparse.ArgumentTypeError(f"not a process id: {text!r}")
    return pid


SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(text: str) -> int:
    """A size in bytes: a number, optionally followed by K, M or G (powers of 1024)."""
    number, unit = text[:-1], text[-1:].upper()
    if unit.isdigit():
        number, unit = text, ""
    if not number.isdigit() or unit not in SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size (bytes, or with K, M, G): {text!r}")
    return int(number) * SIZE_UNITS[unit]


def checked_argument(check: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type: the text as given, a usage error if `check` refuses it."""

    def argument(text: str) -> str:
        try:
            check(text)
        except HijackError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return argument


def positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    """An argparse type: a number above 0 (an int or a float, as `kind` reads it)."""

    def argument(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
        return value

    return argument


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hijack",
        description="Move a live Linux process to another machine without breaking its "
        "connections.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    parser.add_argument("--version", action="version", version=f"hijack {hijack.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    attach = commands.add_parser("attach", help="seize PID and fork its shadow")
    attach.add_argument("pid", type=parse_pid, metavar="PID")
    attach.add_argument("--json", action="store_true", help="print the result as JSON")
    attach.set_defaults(handler=command_attach)

    detach = commands.add_parser("detach", help="end the shadow of PID and forget it")
    detach.add_argument("pid", type=parse_pid, metavar="PID")
    detach.set_defaults(handler=command_detach)

    forget = commands.add_parser(
        "forget", help="end the record of PID whatever its state, and its shadow if it runs"
    )
    forget.add_argument("pid", type=parse_pid, metavar="PID")
    forget.set_defaults(handler=command_forget)

    dump = commands.add_parser("dump", help="write a CRF image of PID; it runs on")
    dump.add_argument("pid", type=parse_pid, metavar="PID")
    dump.add_argument(
        "-o", "--output", required=True, metavar="FILE", help="image file, - for stdout"
    )
    dump.add_argument(
        "--kill", action="store_true", help="end the process once the image is complete"
    )
    dump.add_argument(
        "--skip-unsupported",
        action="store_true",
        help="with --kill: kill it even though its restore must drop descriptors it cannot rebuild",
    )
    dump.add_argument("--no-binary", action="store_true", help="map the executable from its file")
    dump.add_argument(
        "--no-shared-libs", action="store_true", help="map shared libraries from their files"
    )
    dump.add_argument(
        "--ghost-limit",
        type=parse_size,
        default=DEFAULT_GHOST_LIMIT,
        metavar="SIZE",
        help="the most data one deleted but open file may put in the image (bytes, or with"
        " K, M, G; default 64M): a bigger one is refused",
    )
    dump.add_argument(
        "--snapshot",
        choices=("auto", "rounds", "fork"),
        default="auto",
        help="without --kill, how the process is frozen only briefly: pre-copy rounds"
        " (the image holds rounds: a freeze that does not grow with its memory), a forked"
        " copy (a plain image; its freeze grows ~20 ms a GiB), or auto: rounds from"
        " 256 MiB of private memory",
    )
    dump.set_defaults(handler=command_dump)

    restore = commands.add_parser("restore", help="rebuild and run a process from an image")
    restore.add_argument("image", metavar="FILE", help="image file, - for stdin")
    restore.add_argument(
        "--skip-unsupported",
        action="store_true",
        help="drop descriptors that cannot be restored (they are listed) instead of refusing",
    )
    restore.add_argument(
        "--new-pids",
        action="store_true",
        help="a tree: restore it under new pids (printed) where its old ones are taken",
    )
    restore.set_defaults(handler=command_restore)

    show = commands.add_parser("show", help="what an image holds")
    show.add_argument("image", metavar="FILE", help="image file, - for stdin")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    show.set_defaults(handler=command_show)

    core = commands.add_parser("core", help="write an ELF core file of an image, for gdb")
    core.add_argument("image", metavar="IMAGE", help="image file, - for stdin")
    core.add_argument("-o", "--output", required=True, metavar="FILE", help="the core file")
    core.set_defaults(handler=command_core)

    move = commands.add_parser("move", help="live-move PID to another node's daemon")
    move.add_argument("pid", type=parse_pid, metavar="PID")
    move.add_argument(
        "--to",
        required=True,
        type=checked_argument(node_daemon.parse_address),
        metavar="HOST[:PORT]",
        help="the destination daemon",
    )
    move.add_argument(
        "--precopy",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send memory in rounds while the process runs, so it is frozen only for the last"
        " changes (default: unless it holds less than 1 MiB of private memory); --precopy"
        " alone never falls back to post-copy",
    )
    move.add_argument(
        "--postcopy",
        action="store_true",
        default=None,
        help="after one pre-copy round, start the process there at once and send the pages it"
        " wrote since on first touch and in the background (default: only when the rounds do"
        " not converge); until the last page arrives the process needs both nodes",
    )
    move.add_argument(
        "--timing",
        action="store_true",
        help="also print where the freeze went: each step on both nodes, in ms, and the"
        " system calls injected into the frozen process and into its copy",
    )
    move.add_argument(
        "--plain-relays",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="carry its relayed connections unencrypted between nodes, for a link you trust"
        " (still authenticated; kept for its later moves and drains; default: as its last"
        " move chose, else encrypted)",
    )
    move.add_argument(
        "--packet-relays",
        action="store_true",
        help="its TCP connections to other machines go on through this node's IP layer"
        " (nftables rewrites, no process in their path) instead of through its shadow: the"
        " peers see nothing change, the process sees its node's address on them. A move from"
        " home, on a node forwarding IPv4; not encrypted between the nodes; its later moves"
        ' take them along (docs/protocol.md, "Relays by packets")',
    )
    move.add_argument(
        "--leave-parent",
        action="store_true",
        help="move a fork of its parent (an nginx worker) without that parent, which then sees"
        " it exit (by default refused: move the parent's tree instead)",
    )
    move.add_argument(
        "--swap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="once it runs there, join its relayed connections whose other end this node"
        " manages too directly (as hijack swap PID does; a move run on its home node;"
        " default: on). A swap that fails leaves them relayed and says why; the move is"
        " done either way",
    )
    move.set_defaults(handler=command_move)

    drain = commands.add_parser(
        "drain", help="move every process this node manages to other nodes (README: the rule)"
    )
    drain.add_argument(
        "--to",
        action="append",
        default=[],
        metavar="NODE",
        help="a destination: a node name this node knows, or its daemon's HOST[:PORT];"
        " repeat for more (default: every other node this node knows)",
    )
    drain.add_argument(
        "--swap",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="once every process went, join their relayed connections whose other end"
        " this node manages too directly (as hijack move does; default: on), so this"
        " node's shadows relay none of them",
    )
    drain.set_defaults(handler=command_drain)

    swap = commands.add_parser(
        "swap",
        help="join PID's relayed connections to processes this node manages directly",
    )
    swap.add_argument("pid", type=parse_pid, nargs="?", help="a process this node manages")
    swap.add_argument(
        "--list", action="store_true", help="only list the connections that qualify (every PID)"
    )
    swap.set_defaults(handler=command_swap)

    recover = commands.add_parser(
        "recover", help="settle what interrupted moves left here (a process held in doubt)"
    )
    recover.set_defaults(handler=command_recover)

    node = commands.add_parser("node", help="the node daemon")
    node_commands = node.add_subparsers(dest="node_command", required=True, metavar="COMMAND")
    serve = node_commands.add_parser("serve", help="receive moves (the restart daemon)")
    serve.add_argument(
        "--listen",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        type=checked_argument(lambda text: node_daemon.parse_address(text, listening=True)),
        metavar="ADDR:PORT",
        help=f"where to listen (default 127.0.0.1:{DEFAULT_PORT}: loopback only)",
    )
    serve.add_argument(
        "--name",
        type=checked_argument(lambda text: naming.check_name(text, "--name")),
        help="this node's name, kept in its state directory for its commands (default:"
        " $HIJACK_NODE, else the name kept, else the host name; with a state directory other"
        " than the default, the host name and a digest of it)",
    )
    serve.add_argument(
        "--allow-root",
        action="store_true",
        help="also restore processes with root's powers (uid/gid 0, capabilities); "
        "see docs/security.md",
    )
    limits = gate.Limits()
    serve.add_argument(
        "--handshake-timeout",
        type=positive(float),
        default=limits.handshake_timeout,
        metavar="SECONDS",
        help=f"time a peer has for the TLS handshake (default {limits.handshake_timeout:g})",
    )
    for flag, default, what in (
        ("--max-handshakes", limits.handshakes, "TLS handshakes under way at a time"),
        ("--max-connections", limits.connections, "authenticated connections served at a time"),
        ("--max-per-address", limits.per_address, "connections from one peer address"),
    ):
        serve.add_argument(
            flag,
            type=positive(int),
            default=default,
            metavar="N",
            help=f"at most N {what} (default {default}; docs/security.md)",
        )
    serve.set_defaults(handler=command_node_serve)

    cluster = commands.add_parser("cluster", help="the cluster's key and certificates")
    cluster_commands = cluster.add_subparsers(
        dest="cluster_command", required=True, metavar="COMMAND"
    )
    init = cluster_commands.add_parser(
        "init", help="create the cluster's certificate authority and revocation list"
    )
    # Gone with the shared key (protocol 1): said so, rather than "unrecognized".
    init.add_argument("--key", help=argparse.SUPPRESS)
    init.add_argument(
        "--pki", metavar="DIR", help="where the CA goes (default $HIJACK_PKI or STATE/pki)"
    )
    init.set_defaults(handler=command_cluster_init)
    add_node = cluster_commands.add_parser(
        "add-node", help="issue a node its key and certificate, signed by the cluster's CA"
    )
    add_node.add_argument("name", metavar="NAME", help="the node's name (its certificate's)")
    add_node.add_argument("--address", metavar="ADDR", help="also name this IP address or host")
    add_node.add_argument("--pki", metavar="DIR", help="the CA's directory (default as init)")
    add_node.set_defaults(handler=command_cluster_node)
    revoke = cluster_commands.add_parser(
        "revoke", help="put a node's certificate on the revocation list every daemon reads"
    )
    revoke.add_argument("name", metavar="NAME", help="the node to revoke")
    revoke.add_argument("--pki", metavar="DIR", help="the CA's directory (default as init)")
    revoke.set_defaults(handler=command_cluster_node)
    add_status_parser(commands)

    check = commands.add_parser(
        "check", help="can this machine and user do everything hijack needs?"
    )
    check.add_argument("--json", action="store_true", help="print the findings as JSON")
    check.set_defaults(handler=command_check)
    # Last: every command is known by now.
    accept_after_every_command(parser, "--debug")
    return parser


def accept_after_every_command(parser: argparse.ArgumentParser, flag: str) -> None:
    """Let `flag` of `parser` come after the command too (`hijack move --debug ...`).

    Added to every subcommand with a suppressed default, so that a subcommand
    without it leaves the value given before the command as it was.
    """
    help_text = next(action.help for action in parser._actions if flag in action.option_strings)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subcommand in action.choices.values():
                subcommand.add_argument(
                    flag, action="store_true", default=argparse.SUPPRESS, help=help_text
                )
                accept_after_every_command(subcommand, flag)


def add_status_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser(
        "status", help="every known process, shadow, move and node on this node"
    )
    output = status.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the status as JSON")
    output.add_argument(
        "--watch", action="store_true", help="a live full-screen view, refreshed every second"
    )
    status.set_defaults(handler=command_status)


def command_attach(args: argparse.Namespace, console: Console) -> int:
    with Registry() as registry:
        result = attaching.attach(args.pid, registry)
    render.attach_result(console, result, as_json=args.json)
    return EXIT_OK


def command_detach(args: argparse.Namespace, console: Console) -> int:
    with Registry() as registry:
        ended = attaching.detach(args.pid, registry)
    render.ended(console, "detached", ended)
    return EXIT_OK


def command_forget(args: argparse.Namespace, console: Console) -> int:
    with Registry() as registry:
        ended = attaching.forget(args.pid, registry)
    render.ended(console, "forgot", ended)
    return EXIT_OK


def command_dump(args: argparse.Namespace, console: Console) -> int:
    if args.kill and args.snapshot != "auto":
        raise HijackError("--snapshot is how a dump without --kill freezes: not with --kill")
    with Registry() as registry:
        attached = registry.find(args.pid)
        holder = attached if attached and attached.state == "attached" else None

        handed_over: list[str] = []

        def hand_over(pids: tuple[int, ...]) -> None:
            # The shadow keeps the killed processes' descriptors for their restore.
            if holder is not None and holder.shadow_control:
                handed_over.append(holder.shadow_control)
                for pid in pids:
                    hand_descriptors_to_shadow(
                        pid, holder.shadow_control, as_member=pid != args.pid
                    )

        options = {
            "kill": args.kill,
            "no_binary": args.no_binary,
            "no_shared_libs": args.no_shared_libs,
            "before_kill": hand_over,
            # The shadow keeps the descriptors; or the user accepts losing them.
            "check_descriptors": holder is None and not args.skip_unsupported,
            "ghost_limit": args.ghost_limit,
            "snapshot": args.snapshot,
        }
        try:
            if args.output == "-":
                result = dumping.dump(args.pid, sys.stdout.buffer, **options)
                console = Console(stderr=True)  # stdout carries the image
            else:
                result = dumping.dump_to_file(args.pid, Path(args.output), **options)
        except BaseException:
            for control_path in handed_over:  # not killed after all: the shadow follows it again
                with contextlib.suppress(HijackError):
                    control.request(control_path, {"op": "home", "pid": args.pid})
            raise
        if args.kill and holder is not None:
            registry.set_state(args.pid, "checkpointed")
    # An attached tree's shadow keeps what members share: only a skip makes copies.
    copies = holder is None and args.skip_unsupported
    render.dump_result(console, result, args.output, killed=args.kill, copies=copies)
    return EXIT_OK


def command_restore(args: argparse.Namespace, console: Console) -> int:
    with Registry() as registry, open_image(args.image) as stream:
        result = restoring_trees.restore_image(
            stream,
            skip_unsupported=args.skip_unsupported,
            registry=registry,
            new_pids=args.new_pids,
        )
    if isinstance(result, restoring_trees.TreeRestoreResult):
        render.tree_restore_result(console, result)
    else:
        render.restore_result(console, result)
    return EXIT_OK


def command_show(args: argparse.Namespace, console: Console) -> int:
    with open_image(args.image) as stream:
        # A snapshot's file may hold pre-copy rounds before its image (docs/crf.md §7a).
        rounds = []
        stream, is_round = next_is_round(stream)
        while is_round:
            rounds.append(summarize_rounds(read_round(stream)))
            stream, is_round = next_is_round(stream)
        summary: ImageSummary | TreeSummary
        if rounds:
            summary = summarize(read_image(stream), describe=objects.describe, rounds=rounds)
        else:
            summary = summarize_stream(read_stream(stream), describe=objects.describe)
    if isinstance(summary, TreeSummary):
        render.tree_summary(console, summary, as_json=args.json)
    else:
        render.image_summary(console, summary, as_json=args.json)
    return EXIT_OK


def command_core(args: argparse.Namespace, console: Console) -> int:
    # lief takes a second or more to load: only this command pays for it.
    from hijack import core as core_files

    if args.output == "-":
        raise HijackError("a core file is written out of order: -o needs a file, not stdout")
    with open_image(args.image) as stream:
        stream, rounds = skip_rounds(stream)
        if not rounds:
            result = core_files.write_core_file(read_image(stream), Path(args.output))
        elif args.image == "-":
            raise HijackError(
                "an image made of pre-copy rounds is read twice for a core: give its file,"
                " not stdin"
            )
        else:

            def pages() -> Iterator[Pages]:
                with open(args.image, "rb") as again:
                    yield from round_pages(again)

            result = core_files.write_core_file(read_image(stream), Path(args.output), pages)
    render.core_result(console, result, args.output)
    return EXIT_OK


def command_move(args: argparse.Namespace, console: Console) -> int:
    if args.postcopy and args.precopy is not None:
        raise HijackError("--postcopy starts with one pre-copy round: drop --(no-)precopy")
    with Registry() as registry, contextlib.ExitStack() as stack:
        home = swapping.home_of(registry, args.pid)  # before the move takes its record
        # The progress bar's thread must never take SIGINT or SIGTERM: blocked
        # in this thread, they then wait wherever a move holds them back.
        with signals_deferred():
            progress = stack.enter_context(
                render.move_progress(console, args.pid, args.to, expected_image_bytes(args.pid))
            )
        result = moving.move(
            args.pid,
            args.to,
            registry,
            progress=progress,
            precopy=args.precopy,
            plain_relays=args.plain_relays,
            postcopy=args.postcopy,
            leave_parent=args.leave_parent,
            packet_relays=args.packet_relays,
        )
    render.move_result(console, result, timing=args.timing)
    if args.swap:
        swap_after_moves(console, [args.pid], {args.pid: home})
    return EXIT_OK


def swap_after_moves(
    console: Console, pids: list[int], homes: dict[int, swapping.Home | None]
) -> None:
    """Join the relayed connections of the moved `pids` whose other end their home node
    manages too, a line each: here, or asked of their home node's daemon (`homes`, read
    before the moves: a migrant's record leaves with it). The moves are done whatever
    becomes of a swap: it only says so. A connection between two of them is swapped once
    (the first finds it)."""
    for pid in pids:
        home = homes.get(pid)
        try:
            if home is None:
                outcomes = swapping.swap(pid, after_move=True)
            else:
                with Registry() as registry:
                    outcomes = list(
                        swapping.swap_at_home(home, pki.load_identity(), registry, after_move=True)
                    )
        except (HijackError, OSError) as exc:
            console.print(f"swap: {exc}; relayed still", highlight=False, markup=False)
            continue
        for described, outcome in outcomes:
            console.print(f"swap: {described}: {outcome}", highlight=False, markup=False)


def command_drain(args: argparse.Namespace, console: Console) -> int:
    with Registry() as registry, contextlib.ExitStack() as stack:
        processes, destinations = draining.plan(registry, args.to)
        if not processes:
            console.print("nothing to drain: this node manages no process")
            return EXIT_OK
        homes = {p.pid: swapping.home_of(registry, p.pid) for p in processes}
        with signals_deferred():  # as in command_move: the view's thread takes no signal
            progress_for = stack.enter_context(render.drain_progress(console, processes))
        outcomes = draining.drain(registry, processes, destinations, progress_for)
        stack.close()
    render.drain_summary(console, outcomes)
    if args.swap:  # once every process went: both ends of a connection may have moved
        moved = [outcome.pid for outcome in outcomes if outcome.result]
        swap_after_moves(console, moved, homes)
    stayed = [outcome for outcome in outcomes if outcome.result is None]
    if stayed:
        names = ", ".join(f"{outcome.pid} ({outcome.program})" for outcome in stayed)
        raise HijackError(f"{len(stayed)} of {len(outcomes)} process(es) stayed: {names}")
    return EXIT_OK


def command_swap(args: argparse.Namespace, console: Console) -> int:
    if args.list:
        with Registry() as registry:
            pairs = swapping.find_pairs(registry)
            homes = sorted({m.home_node for m in registry.running_migrants()} - {node_name()})
        for pair in pairs:
            console.print(pair.describe(), highlight=False, markup=False)
        if not pairs:
            console.print("no relayed connection has two ends this node manages")
        if homes:  # a migrant's relays, and the pairs they make, are its home node's
            console.print(
                f"the processes moved here are swapped by their home node ({', '.join(homes)}):"
                " `hijack swap --list` there, or `hijack swap PID` here",
                highlight=False,
                markup=False,
            )
        return EXIT_OK
    if args.pid is None:
        raise HijackError("swap: name a PID (or --list)")
    with Registry() as registry:
        home = swapping.home_of(registry, args.pid)
        if home is None:
            outcomes = swapping.swap(args.pid)
        else:  # a migrant here: its home node's shadows relay it, and swap it
            outcomes = list(swapping.swap_at_home(home, pki.load_identity(), registry))
    for described, outcome in outcomes:
        console.print(f"{described}: {outcome}", highlight=False, markup=False)
    failed = [outcome for _, outcome in outcomes if not outcome.startswith("direct")]
    if failed:
        raise HijackError(f"{len(failed)} of {len(outcomes)} connection(s) stay relayed")
    return EXIT_OK


def expected_image_bytes(pid: int) -> int | None:
    try:
        return procfs.resident_bytes(pid)
    except HijackError:
        return None  # the move says why it cannot read the process


def command_recover(args: argparse.Namespace, console: Console) -> int:
    with Registry() as registry:
        settled, in_doubt = moving.recover(registry)
        settled += repoint.prune_direct(registry)
    settled += lockbook.settle()  # network locks left by a `dump --kill` killed itself
    for line in settled + in_doubt:
        console.print(line, highlight=False)
    if in_doubt:
        raise HijackError(f"{len(in_doubt)} move(s) still in doubt; run `hijack recover` again")
    if not settled:
        console.print("nothing to recover")
    return EXIT_OK


def command_node_serve(args: argparse.Namespace, console: Console) -> int:
    naming.name_the_node(state_dir(), Path(DEFAULT_STATE_DIR), args.name)
    limits = gate.Limits(
        handshake_timeout=args.handshake_timeout,
        handshakes=args.max_handshakes,
        connections=args.max_connections,
        per_address=args.max_per_address,
    )
    node_daemon.serve(
        node_daemon.parse_address(args.listen, listening=True),
        pki.load_identity(),
        limits,
        allow_root=args.allow_root,
    )
    return EXIT_OK


def command_cluster_init(args: argparse.Namespace, console: Console) -> int:
    if args.key is not None:
        raise HijackError(
            "there is no shared cluster key any more: nodes use certificates"
            " (docs/security.md, 'Moving from the shared key')"
        )
    directory = Path(args.pki) if args.pki else pki.pki_dir()
    pki.init_ca(directory)
    console.print(
        f"cluster CA written to {directory}: keep ca.key there; copy ca.crt and revoked.crl"
        " to every node"
    )
    return EXIT_OK


def command_cluster_node(args: argparse.Namespace, console: Console) -> int:
    """`cluster add-node` and `cluster revoke`: one node's certificate, issued or revoked."""
    directory = Path(args.pki) if args.pki else pki.pki_dir()
    if args.cluster_command == "add-node":
        key_path, cert_path = pki.add_node(directory, args.name, args.address)
        said = (
            f"key {key_path}, certificate {cert_path} (mode 0600):"
            " copy both to that node only, with ca.crt and revoked.crl"
        )
    else:
        serial = pki.revoke(directory, args.name)
        said = f"revoked (serial {serial:x}): copy {directory / 'revoked.crl'} to every node"
    console.print(f"node {args.name}: {said}")
    return EXIT_OK


def command_status(args: argparse.Namespace, console: Console) -> int:
    with Registry() as registry:
        if args.watch:
            # q ends the view; so do Ctrl-C and SIGTERM, the terminal restored all the same.
            with contextlib.suppress(Interrupted):
                status_watch.watch(console, registry)
            return EXIT_OK
        snapshot = status_model.gather(registry)
    if args.json:
        status_view.status_json(console, snapshot)
    else:
        status_view.status(console, snapshot)
    return EXIT_OK


def command_check(args: argparse.Namespace, console: Console) -> int:
    findings = checking.run_checks()
    render.check_findings(console, findings, as_json=args.json)
    missing = [finding.name for finding in findings if finding.required and not finding.ok]
    if missing:
        raise HijackError(f"missing what hijack needs: {', '.join(missing)}")
    return EXIT_OK


@contextlib.contextmanager
def open_image(name: str) -> Iterator[BinaryIO]:
    if name == "-":
        yield sys.stdin.buffer
        return
    try:
        stream = open(name, "rb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise HijackError(f"cannot open image {name}: {exc.strerror}") from None
    with stream:
        yield stream


def _console() -> Console:
    """The terminal's width; piped (and no $COLUMNS), wide enough that no table is cut."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return Console()
    return Console(width=PIPED_WIDTH)


def main(argv: Sequence[str] | None = None, console: Console | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    console = console or _console()
    previous = {
        sig: signal.signal(sig, _raise_interrupted) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    handler: Callable[[argparse.Namespace, Console], int] = args.handler
    try:
        return handler(args, console)
    except HijackError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"hijack: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except OSError as exc:  # e.g. the reader of `dump -o -` went away
        if args.debug:
            traceback.print_exc()
        print(f"hijack: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # a bug of ours: still one line, unless --debug
        if args.debug:
            traceback.print_exc()
        print(
            f"hijack: internal error: {type(exc).__name__}: {exc} (run with --debug for details)",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
