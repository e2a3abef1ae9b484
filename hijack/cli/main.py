"""The `hijack` command: parse, call, render. Exit 0 ok, 1 failure, 2 usage."""

from __future__ import annotations

import argparse
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from types import FrameType

from rich.console import Console

from hijack.cli import render
from hijack.errors import HijackError
from hijack.mutator import attach as attaching
from hijack.registry import Registry

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hijack",
        description="Move a live Linux process to another machine without breaking its "
        "connections.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    attach = commands.add_parser("attach", help="seize PID and fork its shadow")
    attach.add_argument("pid", type=parse_pid, metavar="PID")
    attach.add_argument("--json", action="store_true", help="print the result as JSON")
    attach.set_defaults(handler=command_attach)

    detach = commands.add_parser("detach", help="end the shadow of PID and forget it")
    detach.add_argument("pid", type=parse_pid, metavar="PID")
    detach.set_defaults(handler=command_detach)
    return parser


def command_attach(args: argparse.Namespace, console: Console) -> int:
    with Registry() as registry:
        result = attaching.attach(args.pid, registry)
    render.attach_result(console, result, as_json=args.json)
    return EXIT_OK


def command_detach(args: argparse.Namespace, console: Console) -> int:
    with Registry() as registry:
        record = attaching.detach(args.pid, registry)
    console.print(f"detached process {record.pid}; shadow {record.shadow_pid} ended")
    return EXIT_OK


def main(argv: Sequence[str] | None = None, console: Console | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on bad usage, 0 on --help
        return int(exc.code or 0)
    console = console or Console()
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
