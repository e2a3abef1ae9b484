"""Post-copy, the mover's side: the frozen original serves the pages its copy still lacks.

When pre-copy does not converge (the process writes faster than the link
drains), or with `hijack move --postcopy`, the rounds stop and the final image
leaves out the pages written since the last round (the `lazy` runs,
hijack.mutator.precopy): the process starts on the destination without them.
Once it runs there (the commit), this node's mover stays on the move's
channel as its page server (docs/protocol.md, "Post-copy"): it answers each
`fetch` of a page the copy touched with that page, read from the frozen
original, and in between pushes every lazy page in order; when all are out it
says `pushed`, and the destination answers `complete` once it holds them all.
Only then may the original be ended. Until then the process needs both nodes.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import itertools
import os
import select
import struct
import time

from hijack.errors import HijackError
from hijack.mutator.precopy import Run, clip_runs, union_runs
from hijack.mutator.tracee import Tracee
from hijack.node.channel import Channel, ChannelError, Kind
from hijack.sys import memory
from hijack.sys import ptrace as pt

PAGE_SIZE = 4096
PUSH_CHUNK = 256 * 1024  # bytes of a pushed piece: a fetch waits behind one at most (on our side)
MAX_FETCH = 64  # pages one fetch may ask
# A DATA frame of post-copy: the address of its first page, then the pages.
ADDRESS = struct.Struct("<Q")
# A tree's: the member (its pid on the source node), then the address of its first page.
MEMBER_ADDRESS = struct.Struct("<QQ")
RUN = struct.Struct("<QQ")
PAGE_TIMEOUT = 10.0  # seconds a page server or client waits on a silent peer before giving up
# Auto mode: a round that leaves at least this much for the freeze and did not shrink
# enough ends pre-copy with post-copy (below it, the freeze sends it quickly enough).
POSTCOPY_MIN_BYTES = 8 * 1024 * 1024


def page_timeout() -> float:
    """PAGE_TIMEOUT, or $HIJACK_PAGE_TIMEOUT (tests shorten it)."""
    try:
        value = float(os.environ.get("HIJACK_PAGE_TIMEOUT") or PAGE_TIMEOUT)
    except ValueError:
        return PAGE_TIMEOUT
    return value if value > 0 else PAGE_TIMEOUT


def encode_runs(runs: list[Run]) -> str:
    return base64.b64encode(b"".join(RUN.pack(start, end) for start, end in runs)).decode()


def decode_runs(text: object) -> list[Run]:
    """The runs of a `lazy` message: sorted, disjoint, page-aligned, or HijackError."""
    try:
        data = base64.b64decode(str(text), validate=True)
    except ValueError:
        raise HijackError("malformed lazy runs") from None
    if len(data) % RUN.size:
        raise HijackError("malformed lazy runs")
    runs = [RUN.unpack_from(data, offset) for offset in range(0, len(data), RUN.size)]
    previous = 0
    for start, end in runs:
        if start < previous or end <= start or (start | end) % PAGE_SIZE:
            raise HijackError("malformed lazy runs")
        previous = end
    return runs


def lazy_bytes(runs: list[Run]) -> int:
    return sum(end - start for start, end in runs)


class PageServer:
    """Serves the lazy pages of frozen originals to their copies over `channel`: one
    process's (`members` {pid: its lazy runs}), or every member of a tree's (`tree`: each
    frame and fetch names its member, by its pid here; docs/protocol.md, "Post-copy of a
    tree"). One server for the whole tree, on the move's one connection: a fetch of any
    member is answered between two pushed pieces, whichever member those are of."""

    def __init__(self, members: dict[int, list[Run]], channel: Channel, tree: bool = False) -> None:
        self.members = {pid: runs for pid, runs in members.items() if runs}
        self.channel = channel
        self.tree = tree
        self.header = MEMBER_ADDRESS if tree else ADDRESS
        self.pushed = 0  # bytes of lazy pages pushed (fetched ones not counted)
        self.fetched = 0  # pages sent because a copy touched them
        self._gone: set[int] = set()  # members whose copy ended: nothing more is wanted
        self._buffer = bytearray(self.header.size + max(PUSH_CHUNK, MAX_FETCH * PAGE_SIZE))

    def serve(self, timeout: float) -> None:
        """Until the destination holds every lazy page; ChannelError if it goes silent or
        away for `timeout` seconds, HijackError if it gives up (its own reason)."""
        sock = self.channel.sock
        sock.settimeout(timeout)
        # A tree's members in turn, a piece each: none waits for the others' whole memory.
        queues = [
            collections.deque(
                (pid, piece, min(piece + PUSH_CHUNK, end))
                for start, end in runs
                for piece in range(start, end, PUSH_CHUNK)
            )
            for pid, runs in self.members.items()
        ]
        queue = collections.deque(
            item for turn in itertools.zip_longest(*queues) for item in turn if item is not None
        )
        announced = False
        silent_since = time.monotonic()
        while True:
            wait = 0.0 if queue else min(timeout, 0.5)
            # What TLS decrypted already is not the socket's to tell about.
            if sock.pending() or select.select([sock], [], [], wait)[0]:
                silent_since = time.monotonic()
                message = self.channel.answer(self.channel.receive())
                if message.get("phase") == "complete":
                    return
                if message.get("op") == "fetch":
                    self._fetch(message)
                    continue
                if message.get("op") == "gone":
                    member = message.get("member")
                    if not self.tree or member is None:
                        return  # the copy ended there: no page is wanted any more
                    if isinstance(member, int):
                        self._gone.add(member)  # that member's: the others' still are
                        continue
                raise ChannelError(f"{self.channel.peer} sent {message!r:.80} during post-copy")
            if queue:
                pid, start, end = queue.popleft()
                if pid not in self._gone:
                    self._send(pid, start, end)
                    self.pushed += end - start
            elif not announced:
                self.channel.send({"op": "pushed"})
                announced = True
            elif time.monotonic() - silent_since > timeout:
                raise ChannelError(f"{self.channel.peer} did not answer for {timeout:.0f} s")

    def _fetch(self, message: dict[str, object]) -> None:
        address, pages = message.get("address"), message.get("pages")
        member = message.get("member") if self.tree else next(iter(self.members), 0)
        if not isinstance(address, int) or not isinstance(pages, int):
            raise ChannelError(f"{self.channel.peer} sent a malformed fetch")
        if not isinstance(member, int) or member not in self.members:
            raise ChannelError(f"{self.channel.peer} fetched pages of no member ({member!r:.20})")
        pages = max(1, min(pages, MAX_FETCH))
        # Only lazy pages are served: nothing else of the original is anyone's business.
        lazy = self.members[member]
        for start, end in clip_runs(lazy, address, address + pages * PAGE_SIZE):
            self._send(member, start, end)
            self.fetched += (end - start) // PAGE_SIZE

    def _send(self, pid: int, start: int, end: int) -> None:
        size = end - start
        if self.tree:
            MEMBER_ADDRESS.pack_into(self._buffer, 0, pid, start)
        else:
            ADDRESS.pack_into(self._buffer, 0, start)
        view = memoryview(self._buffer)[: self.header.size + size]
        memory.read_into(pid, start, view[self.header.size :])
        self.channel.send_frame(Kind.DATA, view)


# Below a thread's stack pointer: where the restore writes its seccomp filter.
STACK_PINNED = 64 * 1024


def pinned_pages(tracee: Tracee) -> list[Run]:
    """The pages of the frozen process that the restore itself touches, never left out:
    each thread's TCB (its cached tid), its rseq area and the top of its stack."""
    runs: list[Run] = []
    for thread in tracee.threads.values():
        registers = thread.registers
        if registers is None:
            continue  # gone while it was stopped: not in the image either
        areas = [
            (registers.rsp - STACK_PINNED, registers.rsp + PAGE_SIZE),
            (registers.fs_base - PAGE_SIZE, registers.fs_base + 2 * PAGE_SIZE),
        ]
        with contextlib.suppress(HijackError):
            rseq = pt.get_rseq_configuration(thread.tid)
            if rseq.rseq_abi_pointer:
                areas.append((rseq.rseq_abi_pointer, rseq.rseq_abi_pointer + rseq.rseq_abi_size))
        for low, high in areas:
            if high > PAGE_SIZE:
                start = max(low, 0) & ~(PAGE_SIZE - 1)
                runs.append((start, (high + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)))
    return union_runs(runs, [])
