"""`hijack drain`: move every process this node manages to the other nodes.

The processes are those attached here (their home is this node and they run
here) and the migrants that run here (moved here from elsewhere). Each is
moved by `hijack.node.move.move`, one after another, largest first, to the
destination the rule below ranks first; one that a destination refuses (or
that fails to go there) is tried at the next, and stays where it is, as the
move left it (running, attached as before), when none takes it.

The rule (README, "Draining a node"): each destination's daemon answers
`load` (hijack.node.load) once, at the start. A process of S bytes (resident)
goes to the node with the highest

    (mem_available - assigned_bytes - S) / (1 + (load1 + assigned) / cpus)

where `assigned` and `assigned_bytes` count the processes this drain already
sent there: free memory first, divided down by the load per processor, so
that equal nodes take turns and a busy or full one gets fewer. A node that
has not S bytes available after what it was already assigned comes last.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hijack.errors import HijackError
from hijack.node import pki
from hijack.node.channel import Channel, ChannelError
from hijack.node.daemon import parse_address
from hijack.node.move import MoveInDoubt, MoveResult, move
from hijack.registry import ProcessRecord, Registry, node_name
from hijack.sys import procfs

Report = Callable[[str, int], None]
# Called once per try: (pid, destination name) -> that move's progress callback.
ProgressFor = Callable[[int, str], Report]


@dataclass
class Destination:
    """A node a drain may send processes to, as its daemon reported itself."""

    name: str
    address: str  # "host:port" of its daemon
    load1: float
    cpus: int
    mem_available: int
    assigned: int = 0  # processes this drain sent there
    assigned_bytes: int = 0

    def score(self, size: int) -> tuple[bool, float]:
        room = self.mem_available - self.assigned_bytes - size
        busy = 1.0 + (self.load1 + self.assigned) / max(self.cpus, 1)
        return (room >= 0, room / busy)

    def take(self, size: int) -> None:
        self.assigned += 1
        self.assigned_bytes += size


@dataclass(frozen=True)
class Candidate:
    pid: int
    program: str
    size: int  # resident bytes when the drain began (0 if unreadable)


@dataclass(frozen=True)
class Outcome:
    pid: int
    program: str
    result: MoveResult | None  # None: it stayed
    error: str = ""  # why it stayed (the last destination's answer)


def managed(registry: Registry) -> list[ProcessRecord]:
    """The processes this node manages: attached here, or migrants running here."""
    here = node_name()
    return [
        record
        for record in registry.processes()
        if (record.state == "attached" and record.home_node == here)
        or (record.state == "running" and record.current_node == here)
    ]


def resolve(registry: Registry, targets: list[str]) -> list[str]:
    """Daemon addresses: each --to is a node name the registry knows, or HOST[:PORT].

    Without --to: every node this one has moved to or heard from, but itself.
    """
    if not targets:
        here = node_name()
        addresses = [address for name, address, _ in registry.nodes() if name != here]
        if not addresses:
            raise HijackError(
                "this node knows no other node yet: name the destinations with --to HOST[:PORT]"
            )
        return addresses
    resolved = []
    for target in targets:
        known = registry.node_address(target)
        if known is None:
            host, port = parse_address(target)
            known = f"{host}:{port}"
        resolved.append(known)
    return list(dict.fromkeys(resolved))


def survey(addresses: list[str], identity: pki.NodeIdentity) -> tuple[list[Destination], list[str]]:
    """Ask each daemon its load: (the destinations that answered, why the others did not)."""
    found: list[Destination] = []
    unreachable: list[str] = []
    here = node_name()
    for address in addresses:
        try:
            answer = ask_load(address, identity)
        except (HijackError, ChannelError, OSError) as exc:
            unreachable.append(f"{address}: {exc}")
            continue
        if answer["node"] == here:
            unreachable.append(f"{address}: that is this node ({here})")
            continue
        found.append(
            Destination(
                name=str(answer["node"]),
                address=address,
                load1=float(answer["load1"]),
                cpus=int(answer["cpus"]),
                mem_available=int(answer["mem_available"]),
            )
        )
    return found, unreachable


def ask_load(address: str, identity: pki.NodeIdentity) -> dict[str, Any]:
    channel = Channel.connect(parse_address(address), identity)
    try:
        channel.send({"op": "load"})
        answer = channel.receive()
    finally:
        channel.close()
    if "error" in answer or "load1" not in answer:
        raise HijackError(f"no load reported ({answer.get('error', 'an older daemon')})")
    return answer


def ranked(destinations: list[Destination], size: int) -> list[Destination]:
    """Best first, by the module's rule."""
    return sorted(destinations, key=lambda node: node.score(size), reverse=True)


def candidates(registry: Registry) -> list[Candidate]:
    found = []
    for record in managed(registry):
        try:
            size = procfs.resident_bytes(record.pid)
        except HijackError:
            size = 0  # its move says why it cannot be read
        found.append(Candidate(record.pid, record.program, size))
    return sorted(found, key=lambda candidate: candidate.size, reverse=True)


def drain(
    registry: Registry,
    processes: list[Candidate],
    destinations: list[Destination],
    progress_for: ProgressFor,
) -> list[Outcome]:
    """Move each of `processes` by the rule; one Outcome each, in their order."""
    outcomes = []
    for candidate in processes:
        outcomes.append(_drain_one(registry, candidate, destinations, progress_for))
    return outcomes


def _drain_one(
    registry: Registry,
    candidate: Candidate,
    destinations: list[Destination],
    progress_for: ProgressFor,
) -> Outcome:
    errors = []
    for destination in ranked(destinations, candidate.size):
        report = progress_for(candidate.pid, destination.name)
        try:
            result = move(candidate.pid, destination.address, registry, progress=report)
        except MoveInDoubt as exc:
            # Held stopped for `hijack recover`: never tried elsewhere.
            return Outcome(candidate.pid, candidate.program, None, str(exc))
        except HijackError as exc:
            errors.append(f"{destination.name}: {exc}")
            report("refused", 0)
            continue
        destination.take(candidate.size)
        return Outcome(candidate.pid, candidate.program, result)
    return Outcome(candidate.pid, candidate.program, None, "; ".join(errors))


def plan(registry: Registry, targets: list[str]) -> tuple[list[Candidate], list[Destination]]:
    """What to move and where it may go; raises if nowhere answers."""
    processes = candidates(registry)
    if not processes:
        return [], []
    destinations, unreachable = survey(resolve(registry, targets), pki.load_identity())
    if not destinations:
        raise HijackError("no destination answered: " + "; ".join(unreachable))
    return processes, destinations
