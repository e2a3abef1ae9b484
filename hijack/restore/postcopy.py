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
any more; a range it moves (mremap) is followed. A fork during post-copy is
not followed: the child would read the missing pages as zeros (a limit, in
README).
"""

from __future__ import annotations

import collections
import functools
import os
import select
import time
from collections.abc import Callable

from hijack.errors import HijackError
from hijack.image import records as rec
from hijack.mutator.postcopy import ADDRESS, MAX_FETCH, PAGE_SIZE
from hijack.mutator.precopy import Run, clip_runs
from hijack.node.channel import Channel, ChannelError, Kind
from hijack.restore.remote import Stub
from hijack.sys import pidfd, userfault

MADV_DONTNEED = 4
READAHEAD = 16  # pages fetched with a touched one (processes tend to read on)


class LazyPages:
    """The pages of a moved process still on its source node, and the userfaultfd that waits
    for them."""

    def __init__(self, runs: list[Run]) -> None:
        self.runs = runs
        self.uffd = -1
        # Where each missing page is here -> where it is in the original (an mremap
        # here moves it), and back.
        self.missing: dict[int, int] = {}
        self.here: dict[int, int] = {}
        for start, end in runs:
            for page in range(start, end, PAGE_SIZE):
                self.missing[page] = page
                self.here[page] = page
        self.asked: set[int] = set()  # source pages fetched and not arrived yet
        self._faults: collections.deque[int] = collections.deque()  # read, not served yet
        self.faults = 0
        self.arrived = 0

    @property
    def total_bytes(self) -> int:
        return sum(end - start for start, end in self.runs)

    def prepare(self, stub: Stub, segments: tuple[rec.Segment, ...]) -> None:
        """Make the userfaultfd in the stub, drop the lazy pages, register their segments."""
        inside = stub.call("userfaultfd", userfault.USERFAULTFD_FLAGS)
        try:
            self.uffd = pidfd.copy_fd(stub.pid, inside)
        finally:
            stub.call("close", inside)
        userfault.handshake(self.uffd)
        for start, end in self.runs:
            stub.call("madvise", start, end - start, MADV_DONTNEED)
        for segment in segments:
            if clip_runs(self.runs, segment.start, segment.end):
                userfault.register_missing(self.uffd, segment.start, segment.end)

    def serve(self, channel: Channel, pid: int, timeout: float) -> None:
        """Fill pages as they are touched or pushed, until the source has pushed them all.

        Returns early if the process ends. ChannelError if the source goes away
        or is silent for `timeout` seconds while pages are missing; HijackError
        if it pushed all and some never came.
        """
        poller = select.poll()
        poller.register(self.uffd, select.POLLIN)
        poller.register(channel.sock, select.POLLIN)
        ended = pidfd.pidfd_open(pid)
        poller.register(ended, select.POLLIN)
        pushed = False
        heard = time.monotonic()
        try:
            while not pushed:
                for fd, _events in poller.poll(250):
                    if fd == self.uffd:
                        self._events(channel)
                    elif fd == ended:
                        channel.send({"op": "gone"})
                        return
                    else:
                        heard = time.monotonic()
                        pushed = self._frame(channel)
                if not pushed and time.monotonic() - heard > timeout:
                    raise ChannelError(
                        f"{channel.peer} sent nothing for {timeout:.0f} s"
                        f" with {len(self.missing)} pages missing"
                    )
        finally:
            os.close(ended)
        if self.missing:
            raise HijackError(f"{channel.peer} pushed all but {len(self.missing)} pages")
        self.close()
        channel.send({"phase": "complete"})

    def _read_events(self) -> None:
        """Take the waiting events: layout changes applied at once, faults queued."""
        for event, first, second, third in userfault.events(self.uffd):
            if event == userfault.UFFD_EVENT_PAGEFAULT:
                self._faults.append(second)
            elif event == userfault.UFFD_EVENT_REMOVE:
                for page in range(first, second, PAGE_SIZE):  # zeros now: nothing to fill
                    source = self.missing.pop(page, None)
                    if source is not None:
                        del self.here[source]
            elif event == userfault.UFFD_EVENT_REMAP:
                moved = [
                    (page, self.missing.pop(page))
                    for page in range(first, first + third, PAGE_SIZE)
                    if page in self.missing
                ]
                for page, source in moved:
                    self.missing[page - first + second] = source
                    self.here[source] = page - first + second

    def _events(self, channel: Channel) -> None:
        self._read_events()
        while self._faults:
            page = self._faults.popleft()
            self.faults += 1
            source = self.missing.get(page)
            if source is None:
                # Never had one, or dropped it since it came: zeros.
                self._until_done(functools.partial(userfault.zero, self.uffd, page))
            elif source not in self.asked:
                self._fetch(channel, page, source)

    def _until_done(self, action: Callable[[], None]) -> None:
        """`action`, again each time the process was changing its layout meanwhile."""
        while True:
            try:
                action()
                return
            except userfault.Busy:
                self._read_events()  # the change waits for its event to be read
                os.sched_yield()

    def _fetch(self, channel: Channel, page: int, source: int) -> None:
        """Ask for `source` (missing at `page`), with the missing pages after it."""
        count = 1
        while (
            count < READAHEAD
            and self.missing.get(page + count * PAGE_SIZE) == source + count * PAGE_SIZE
            and source + count * PAGE_SIZE not in self.asked
        ):
            count += 1
        count = min(count, MAX_FETCH)
        self.asked.update(source + index * PAGE_SIZE for index in range(count))
        channel.send({"op": "fetch", "address": source, "pages": count})

    def _frame(self, channel: Channel) -> bool:
        """One frame from the source: pages (filled), `pushed` (True) or its error."""
        kind, payload = channel.receive_frame()
        if kind == Kind.MESSAGE:
            if channel.answer(payload).get("op") != "pushed":
                raise ChannelError(f"{channel.peer} sent {payload[:80]!r} during post-copy")
            return True
        if kind != Kind.DATA or len(payload) < ADDRESS.size + PAGE_SIZE:
            raise ChannelError(f"{channel.peer} sent a malformed post-copy frame")
        (address,) = ADDRESS.unpack_from(payload)
        data = memoryview(payload)[ADDRESS.size :]
        # Again from the start if the layout changed meanwhile: a page dropped
        # since (MADV_DONTNEED) must not be filled.
        self._until_done(lambda: self._fill(address, data))
        return False

    def _fill(self, address: int, data: memoryview) -> None:
        """Fill the pages of `data` (from `address` in the original) still missing here, in
        runs whose places here follow one another; each run forgotten once filled."""
        pages = len(data) // PAGE_SIZE
        runs: list[tuple[int, int, int]] = []  # (place here, first index, count)
        for index in range(pages):
            place = self.here.get(address + index * PAGE_SIZE)
            if place is None:
                continue
            if (
                runs
                and runs[-1][1] + runs[-1][2] == index
                and place == runs[-1][0] + runs[-1][2] * PAGE_SIZE
            ):
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((place, index, 1))
        for place, first, count in runs:
            chunk = bytes(data[first * PAGE_SIZE : (first + count) * PAGE_SIZE])
            userfault.fill(self.uffd, place, chunk)
            for index in range(first, first + count):
                source = address + index * PAGE_SIZE
                del self.missing[self.here.pop(source)]
                self.asked.discard(source)
                self.arrived += 1

    def close(self) -> None:
        """Close the userfaultfd: its ranges are the process's own again."""
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1
