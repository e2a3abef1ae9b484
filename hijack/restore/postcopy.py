"""Post-copy, the destination's side: a moved process runs while its last pages arrive.

The final image of a post-copy move leaves out its `lazy` runs (pages the
process wrote since the last pre-copy round, hijack.mutator.postcopy). Before
the process may run, `prepare` (the stub still has root's powers: an
unprivileged process may not make a userfaultfd that serves the kernel's own
touches) makes a userfaultfd inside it, takes it out and closes the stub's
copy, drops those pages (the stub holds what round 0 sent of them, stale
since) and registers their segments in missing mode. Once the process runs,
`serve` fills each page the moment it is first touched — asking the source
for it, with a few after it — and every page the source pushes meanwhile,
until the source has pushed them all; then the userfaultfd is closed and the
process is on its own.

Pages the process drops before they arrive (MADV_DONTNEED) are not filled
any more; a range it moves (mremap) is followed. A child it forks meanwhile
comes with a userfaultfd of its own (the fork event's): its address space is
served as the process's, from the pages missing in the parent at the fork.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import os
import select
import struct
import subprocess
import threading
import time
from collections.abc import Callable

from hijack.errors import HijackError
from hijack.image import records as rec
from hijack.mutator.postcopy import ADDRESS, MAX_FETCH, MEMBER_ADDRESS, PAGE_SIZE
from hijack.mutator.precopy import Run, clip_runs
from hijack.node.channel import Channel, ChannelError, Kind
from hijack.restore.precopy import MADV_DONTNEED
from hijack.restore.remote import Stub
from hijack.sys import pidfd, userfault

# The keeper (see LazyPages._keep): "done" on its stdin ends it; its end (EOF)
# without that stops the process, then it waits for the process to be gone.
# (A child forked during post-copy is not stopped, but its keeper holds its
# userfaultfd: it sleeps on the first missing page it touches.)
# A tree's member's keeper stops every member (its pid first): none runs on without
# the others, whose memory may be whole.
KEEPER = (
    'IFS= read -r word; [ "$word" = done ] && exit 0; kill -STOP "$@";'
    ' while kill -0 "$1" 2>/dev/null; do sleep 1; done'
)
DROP_BATCH = 128  # madvise calls per batch (64 bytes each in the stub's 16 KiB batch area)
READAHEAD = 16  # pages fetched with a touched one (processes tend to read on)


class _Space:
    """An address space waiting for lazy pages: the moved process's, or a child's it forked
    during post-copy, with its own userfaultfd."""

    def __init__(
        self, uffd: int, missing: bytearray, left: int, moves: list[tuple[int, int, int]]
    ) -> None:
        self.uffd = uffd
        # One byte a page of the lazy runs, in order: 1 while it is missing here.
        # (Bytes, not a dict of pages: a GiB is 262144 of them, made while frozen.)
        self.missing = missing
        self.left = left  # pages still missing
        # Its mremaps of lazy memory, in order: [start, end) moved by delta.
        self.moves = moves
        self.faults: collections.deque[int] = collections.deque()  # read, not served yet
        self.keeper: subprocess.Popen[bytes] | None = None

    def forked(self, uffd: int) -> _Space:
        """The child's space, as this one is at its fork."""
        return _Space(uffd, bytearray(self.missing), self.left, list(self.moves))

    def place(self, source: int) -> int:
        """Where the page at `source` in the original is here."""
        for start, end, delta in self.moves:
            if start <= source < end:
                source += delta
        return source

    def source(self, place: int) -> int:
        for start, end, delta in reversed(self.moves):
            if start + delta <= place < end + delta:
                place -= delta
        return place


class LazyPages:
    """The pages of a moved process still on its source node, and the userfaultfds that
    wait for them."""

    def __init__(self, runs: list[Run], member: int | None = None) -> None:
        # A tree's member: its pid on the source, named in its fetches and frames.
        self.member = member
        self.companions: list[int] = []  # the other members here, stopped with it (_keep)
        self.ended = False  # the process ended (with no child forked meanwhile)
        self.runs = runs  # where the pages are in the original (sorted, disjoint)
        self._starts = [start for start, _ in runs]
        self._first: list[int] = []  # the index of each run's first page
        total = 0
        for start, end in runs:
            self._first.append(total)
            total += (end - start) // PAGE_SIZE
        self.asked = bytearray(total)  # 1 while a page is fetched and has not arrived
        self.spaces: list[_Space] = []
        self._pending = _Space(-1, bytearray(b"\x01") * total, total, [])
        self._poller: select.poll | None = None
        self.faults = 0
        self.arrived = 0
        self.forks = 0  # children forked during post-copy, followed
        self.pid = 0

    @property
    def total_bytes(self) -> int:
        return sum(end - start for start, end in self.runs)

    @property
    def left(self) -> int:
        """Pages still missing, in all the spaces (none once the process ended)."""
        return 0 if self.ended else sum(space.left for space in self.spaces)

    def prepare(self, stub: Stub, segments: tuple[rec.Segment, ...]) -> None:
        """Make the userfaultfd in the stub, drop the lazy pages, register their segments."""
        inside = stub.call("userfaultfd", userfault.USERFAULTFD_FLAGS)
        try:
            space, self._pending.uffd = self._pending, pidfd.copy_fd(stub.pid, inside)
        finally:
            stub.call("close", inside)
        self.spaces.append(space)
        userfault.handshake(space.uffd)
        # One stop per DROP_BATCH runs, not one per run (a server's heap has hundreds:
        # each stop was ~0.1-0.3 ms of the freeze; hijack.mutator.parasite).
        for first in range(0, len(self.runs), DROP_BATCH):
            with stub.batched():
                for start, end in self.runs[first : first + DROP_BATCH]:
                    stub.call("madvise", start, end - start, MADV_DONTNEED)
        for segment in segments:
            if clip_runs(self.runs, segment.start, segment.end):
                userfault.register_missing(space.uffd, segment.start, segment.end)
        self.pid = stub.pid
        self._keep(space)

    def serve(self, channel: Channel, pid: int, timeout: float) -> None:
        """Fill pages as they are touched or pushed, until the source has pushed them all.

        Returns early if the process ends (and forked no child meanwhile).
        ChannelError if the source goes away or is silent for `timeout` seconds
        while pages are missing; HijackError if it pushed all and some never came.
        """
        serve_members(channel, {pid: self}, timeout)

    def _fetch_message(self, source: int, count: int) -> dict[str, object]:
        message: dict[str, object] = {"op": "fetch", "address": source, "pages": count}
        if self.member is not None:
            message["member"] = self.member
        return message

    # -- where a page is: in the original (its source) and in a space (its place) ------

    def _index(self, source: int) -> int:
        """The page's index in the spaces' `missing`, or -1 if it is not lazy."""
        run = bisect.bisect_right(self._starts, source) - 1
        if run < 0 or source >= self.runs[run][1]:
            return -1
        return self._first[run] + (source - self.runs[run][0]) // PAGE_SIZE

    def _missing_index(self, space: _Space, place: int) -> int:
        """The index of the page missing at `place` in `space`, or -1."""
        source = space.source(place)
        index = self._index(source)
        if index < 0 or not space.missing[index] or space.place(source) != place:
            return -1
        return index

    # -- events -----------------------------------------------------------------------

    def _read_events(self, space: _Space) -> None:
        """Take `space`'s waiting events: layout changes and forks at once, faults queued."""
        for event, first, second, third in userfault.events(space.uffd):
            if event == userfault.UFFD_EVENT_PAGEFAULT:
                space.faults.append(second)
            elif event == userfault.UFFD_EVENT_REMOVE:
                self._dropped(space, first, second)
            elif event == userfault.UFFD_EVENT_REMAP:
                space.moves.append((first, first + third, second - first))
            elif event == userfault.UFFD_EVENT_FORK:
                child = space.forked(first & 0xFFFFFFFF)  # installed here by the read
                self.spaces.append(child)
                self.forks += 1
                if self._poller is not None:
                    self._poller.register(child.uffd, select.POLLIN)
                self._keep(child)

    def _dropped(self, space: _Space, start: int, end: int) -> None:
        """`space` dropped [start, end) (MADV_DONTNEED): zeros now, nothing to fill."""
        if not space.moves:
            for run_start, run_end in clip_runs(self.runs, start, end):
                low = self._index(run_start)
                high = low + (run_end - run_start) // PAGE_SIZE
                space.left -= space.missing.count(1, low, high)
                space.missing[low:high] = bytes(high - low)
            return
        for place in range(start, end, PAGE_SIZE):
            index = self._missing_index(space, place)
            if index >= 0:
                space.missing[index] = 0
                space.left -= 1

    def _events(self, channel: Channel, uffd: int) -> None:
        space = next(space for space in self.spaces if space.uffd == uffd)
        self._read_events(space)
        while space.faults:
            place = space.faults.popleft()
            self.faults += 1
            index = self._missing_index(space, place)
            if index < 0:
                # Never had one, or dropped it since it came: zeros.
                zero = functools.partial(userfault.zero, space.uffd, place)
                self._until_done(space, zero)
            elif not self.asked[index]:
                self._fetch(channel, space, space.source(place), index)

    def _until_done(self, space: _Space, action: Callable[[], None]) -> None:
        """`action` on `space`, again each time it was changing its layout meanwhile."""
        while True:
            try:
                action()
                return
            except userfault.Busy:
                self._read_events(space)  # the change waits for its event to be read
                os.sched_yield()

    def _fetch(self, channel: Channel, space: _Space, source: int, index: int) -> None:
        """Ask for `source` (page `index`), with the missing pages after it in its run."""
        run = bisect.bisect_right(self._starts, source) - 1
        last = self._first[run] + (self.runs[run][1] - self.runs[run][0]) // PAGE_SIZE
        count = 1
        while (
            count < READAHEAD
            and index + count < last
            and space.missing[index + count]
            and not self.asked[index + count]
        ):
            count += 1
        count = min(count, MAX_FETCH)
        self.asked[index : index + count] = b"\x01" * count
        channel.send(self._fetch_message(source, count))

    # -- pages that arrive -------------------------------------------------------------

    def arrived_pages(self, channel: Channel, address: int, data: memoryview) -> None:
        """Pages the source sent (pushed or fetched), from `address` in the original: filled
        wherever they are still missing."""
        first = self._index(address)
        pages = len(data) // PAGE_SIZE
        if first < 0 or self._index(address + (pages - 1) * PAGE_SIZE) != first + pages - 1:
            raise ChannelError(f"{channel.peer} sent pages at {address:#x} that are not lazy")
        self.asked[first : first + pages] = bytes(pages)
        if self.ended:
            return  # nobody wants them any more
        filled = 0
        while filled < len(self.spaces):  # a child forked meanwhile too (it is last)
            space = self.spaces[filled]
            # Again from the start if the layout changed meanwhile: a page dropped
            # since (MADV_DONTNEED) must not be filled.
            self._until_done(space, functools.partial(self._fill, space, address, first, data))
            filled += 1

    def _fill(self, space: _Space, address: int, first: int, data: memoryview) -> None:
        """Fill the pages of `data` (page `first` on, from `address` in the original) still
        missing in `space`, a run of them at a time; each run marked once filled."""
        end = first + len(data) // PAGE_SIZE
        low = space.missing.find(1, first, end)
        while low >= 0:
            high = space.missing.find(0, low, end)
            high = end if high < 0 else high
            if space.moves:
                high = low + 1  # a page at a time: its place may have moved
            offset = (low - first) * PAGE_SIZE
            chunk = bytes(data[offset : offset + (high - low) * PAGE_SIZE])
            userfault.fill(space.uffd, space.place(address + offset), chunk)
            space.missing[low:high] = bytes(high - low)
            space.left -= high - low
            self.arrived += high - low
            low = space.missing.find(1, high, end)

    def close(self) -> None:
        """Close the userfaultfds (and the keepers'): the ranges are the processes' own."""
        for space in self.spaces:
            if space.keeper is not None:
                with contextlib.suppress(OSError):
                    assert space.keeper.stdin is not None
                    space.keeper.stdin.write(b"done\n")
                    space.keeper.stdin.close()
                space.keeper.wait()
                space.keeper = None
            if space.uffd >= 0:
                os.close(space.uffd)
                space.uffd = -1

    def abandon(self) -> None:
        """Give up on the missing pages: the keepers stop the process and hold the
        userfaultfds until it is gone; ours are closed."""
        for space in self.spaces:
            if space.keeper is not None:
                keeper, space.keeper = space.keeper, None
                assert keeper.stdin is not None
                keeper.stdin.close()
                threading.Thread(target=keeper.wait, name="keeper", daemon=True).start()
            if space.uffd >= 0:
                os.close(space.uffd)
                space.uffd = -1

    def stop_serving(self) -> None:
        """The process ended (and forked no child that lives on): its userfaultfds go."""
        self.ended = True
        for space in self.spaces:
            if self._poller is not None and space.uffd >= 0:
                self._poller.unregister(space.uffd)
        self.close()

    def _keep(self, space: _Space) -> None:
        """Start `space`'s keeper: a small process holding a copy of its userfaultfd.
        Should this daemon end before every page is in (SIGKILL included: the keeper's
        stdin closes), the keeper stops the process and holds the userfaultfd until the
        process is gone — so missing pages never read as zeros.
        Told `done`, it exits."""
        space.keeper = subprocess.Popen(
            ["sh", "-c", KEEPER, "hijack-postcopy-keeper", str(self.pid)]
            + [str(pid) for pid in self.companions if pid != self.pid],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(space.uffd,),
        )


def serve_members(channel: Channel, members: dict[int, LazyPages], timeout: float) -> None:
    """Serve the lazy pages of one process, or of every member of a tree ({pid here: its
    pages}; each LazyPages names its member on the source), on the move's channel, until
    the source has pushed them all (docs/protocol.md, "Post-copy"). A member that ends
    (and forked no child meanwhile) wants no more: the source is told (`gone`, with the
    member for a tree's); once all ended, `gone` alone, and the serving ends.

    ChannelError if the source goes away or is silent for `timeout` seconds while pages
    are missing; HijackError if it pushed all and some never came.
    """
    tree = any(pages.member is not None for pages in members.values())
    by_member = {pages.member: pages for pages in members.values()}
    header = MEMBER_ADDRESS if tree else ADDRESS
    poller = select.poll()
    for pages in members.values():
        pages._poller = poller
        for space in pages.spaces:
            poller.register(space.uffd, select.POLLIN)
    poller.register(channel.sock, select.POLLIN)
    ended: dict[int, LazyPages] = {}
    try:
        for pid, pages in members.items():
            handle = pidfd.pidfd_open(pid)
            ended[handle] = pages
            poller.register(handle, select.POLLIN)
    except BaseException:
        for handle in ended:
            os.close(handle)
        raise
    pushed = False
    heard = time.monotonic()
    try:
        sock = channel.sock.fileno()
        while not pushed:
            # What TLS decrypted already is not the socket's to tell about.
            decrypted = channel.sock.pending() > 0
            ready = [fd for fd, _events in poller.poll(0 if decrypted else 250)]
            if decrypted and sock not in ready:
                ready.append(sock)
            for fd in ready:
                if fd in ended:
                    poller.unregister(fd)
                    pages = ended.pop(fd)
                    os.close(fd)
                    if len(pages.spaces) > 1:
                        continue  # a child it forked still waits for pages
                    if not any(not p.ended and p is not pages for p in members.values()):
                        channel.send({"op": "gone"})
                        for each in members.values():
                            each.ended = True
                            each.close()
                        return
                    pages.stop_serving()
                    channel.send({"op": "gone", "member": pages.member})
                elif fd == sock:
                    heard = time.monotonic()
                    pushed = _frame(channel, by_member, header)
                else:
                    owner = next(p for p in members.values() if any(s.uffd == fd for s in p.spaces))
                    owner._events(channel, fd)
            if not pushed and time.monotonic() - heard > timeout:
                missing = sum(pages.left for pages in members.values())
                raise ChannelError(
                    f"{channel.peer} sent nothing for {timeout:.0f} s with {missing} pages missing"
                )
    finally:
        for handle in ended:
            os.close(handle)
    missing = sum(pages.left for pages in members.values())
    if missing:
        raise HijackError(f"{channel.peer} pushed all but {missing} pages")
    for pages in members.values():
        pages.close()
    channel.send({"phase": "complete"})


def _frame(channel: Channel, members: dict[int | None, LazyPages], header: struct.Struct) -> bool:
    """One frame from the source: pages (filled), `pushed` (True) or its error."""
    kind, payload = channel.receive_frame()
    if kind == Kind.MESSAGE:
        if channel.answer(payload).get("op") != "pushed":
            raise ChannelError(f"{channel.peer} sent {payload[:80]!r} during post-copy")
        return True
    if kind != Kind.DATA or len(payload) < header.size + PAGE_SIZE:
        raise ChannelError(f"{channel.peer} sent a malformed post-copy frame")
    if header is MEMBER_ADDRESS:
        member, address = MEMBER_ADDRESS.unpack_from(payload)
        pages = members.get(member)
    else:
        (address,) = ADDRESS.unpack_from(payload)
        pages = members.get(None)
    if pages is None:
        raise ChannelError(f"{channel.peer} sent pages of no member being moved")
    pages.arrived_pages(channel, address, memoryview(payload)[header.size :])
    return False
