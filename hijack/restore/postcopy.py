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

import bisect
import collections
import contextlib
import functools
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable

from hijack.errors import HijackError
from hijack.image import records as rec
from hijack.mutator.postcopy import ADDRESS, MAX_FETCH, PAGE_SIZE
from hijack.mutator.precopy import Run, clip_runs
from hijack.node.channel import Channel, ChannelError, Kind
from hijack.restore.precopy import MADV_DONTNEED
from hijack.restore.remote import Stub
from hijack.sys import pidfd, userfault

# The keeper (see LazyPages._keep): "done" on its stdin ends it; its end (EOF)
# without that stops the process, then it waits for the process to be gone.
KEEPER = (
    'IFS= read -r word; [ "$word" = done ] && exit 0; kill -STOP "$1";'
    ' while kill -0 "$1" 2>/dev/null; do sleep 1; done'
)
READAHEAD = 16  # pages fetched with a touched one (processes tend to read on)


class LazyPages:
    """The pages of a moved process still on its source node, and the userfaultfd that waits
    for them."""

    def __init__(self, runs: list[Run]) -> None:
        self.runs = runs  # where the pages are in the original (sorted, disjoint)
        self.uffd = -1
        # One byte a page of `runs`, in order: 1 while it is missing here; and 1
        # while it is fetched and has not arrived. (Bytes, not a dict of pages:
        # a GiB is 262144 of them, and this is made while the process is frozen.)
        self._starts = [start for start, _ in runs]
        self._first: list[int] = []  # the index of each run's first page
        total = 0
        for start, end in runs:
            self._first.append(total)
            total += (end - start) // PAGE_SIZE
        self.missing = bytearray(b"\x01") * total
        self.asked = bytearray(total)
        self.left = total  # pages still missing
        # The process's mremaps of lazy memory, in order: [start, end) moved by delta.
        self.moves: list[tuple[int, int, int]] = []
        self._faults: collections.deque[int] = collections.deque()  # read, not served yet
        self.faults = 0
        self.arrived = 0
        self._keeper: subprocess.Popen[bytes] | None = None

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
        self._keep(stub.pid)

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
                        f" with {self.left} pages missing"
                    )
        finally:
            os.close(ended)
        if self.left:
            raise HijackError(f"{channel.peer} pushed all but {self.left} pages")
        self.close()
        channel.send({"phase": "complete"})

    # -- where a page is: in the original (its source) and here (its place) ----------

    def _index(self, source: int) -> int:
        """The page's index in `missing`, or -1 if it is not lazy."""
        run = bisect.bisect_right(self._starts, source) - 1
        if run < 0 or source >= self.runs[run][1]:
            return -1
        return self._first[run] + (source - self.runs[run][0]) // PAGE_SIZE

    def _place(self, source: int) -> int:
        for start, end, delta in self.moves:
            if start <= source < end:
                source += delta
        return source

    def _source(self, place: int) -> int:
        for start, end, delta in reversed(self.moves):
            if start + delta <= place < end + delta:
                place -= delta
        return place

    def _missing_index(self, place: int) -> int:
        """The index of the page missing at `place`, or -1 (here, or never lazy)."""
        source = self._source(place)
        index = self._index(source)
        if index < 0 or not self.missing[index] or self._place(source) != place:
            return -1
        return index

    # -- events -----------------------------------------------------------------------

    def _read_events(self) -> None:
        """Take the waiting events: layout changes applied at once, faults queued."""
        for event, first, second, third in userfault.events(self.uffd):
            if event == userfault.UFFD_EVENT_PAGEFAULT:
                self._faults.append(second)
            elif event == userfault.UFFD_EVENT_REMOVE:
                self._dropped(first, second)
            elif event == userfault.UFFD_EVENT_REMAP:
                self.moves.append((first, first + third, second - first))

    def _dropped(self, start: int, end: int) -> None:
        """The process dropped [start, end) (MADV_DONTNEED): zeros now, nothing to fill."""
        if not self.moves:
            for run_start, run_end in clip_runs(self.runs, start, end):
                low = self._index(run_start)
                high = low + (run_end - run_start) // PAGE_SIZE
                self.left -= self.missing.count(1, low, high)
                self.missing[low:high] = bytes(high - low)
            return
        for place in range(start, end, PAGE_SIZE):
            index = self._missing_index(place)
            if index >= 0:
                self.missing[index] = 0
                self.left -= 1

    def _events(self, channel: Channel) -> None:
        self._read_events()
        while self._faults:
            place = self._faults.popleft()
            self.faults += 1
            index = self._missing_index(place)
            if index < 0:
                # Never had one, or dropped it since it came: zeros.
                self._until_done(functools.partial(userfault.zero, self.uffd, place))
            elif not self.asked[index]:
                self._fetch(channel, self._source(place), index)

    def _until_done(self, action: Callable[[], None]) -> None:
        """`action`, again each time the process was changing its layout meanwhile."""
        while True:
            try:
                action()
                return
            except userfault.Busy:
                self._read_events()  # the change waits for its event to be read
                os.sched_yield()

    def _fetch(self, channel: Channel, source: int, index: int) -> None:
        """Ask for `source` (page `index`), with the missing pages after it in its run."""
        run = bisect.bisect_right(self._starts, source) - 1
        last = self._first[run] + (self.runs[run][1] - self.runs[run][0]) // PAGE_SIZE
        count = 1
        while (
            count < READAHEAD
            and index + count < last
            and self.missing[index + count]
            and not self.asked[index + count]
        ):
            count += 1
        count = min(count, MAX_FETCH)
        self.asked[index : index + count] = b"\x01" * count
        channel.send({"op": "fetch", "address": source, "pages": count})

    # -- pages that arrive -------------------------------------------------------------

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
        first = self._index(address)
        pages = len(data) // PAGE_SIZE
        if first < 0 or self._index(address + (pages - 1) * PAGE_SIZE) != first + pages - 1:
            raise ChannelError(f"{channel.peer} sent pages at {address:#x} that are not lazy")
        # Again from the start if the layout changed meanwhile: a page dropped
        # since (MADV_DONTNEED) must not be filled.
        self._until_done(lambda: self._fill(address, first, data))
        return False

    def _fill(self, address: int, first: int, data: memoryview) -> None:
        """Fill the pages of `data` (page `first` on, from `address` in the original) still
        missing here, a run of them at a time; each run marked once filled."""
        end = first + len(data) // PAGE_SIZE
        low = self.missing.find(1, first, end)
        while low >= 0:
            high = self.missing.find(0, low, end)
            high = end if high < 0 else high
            if self.moves:
                high = low + 1  # a page at a time: its place may have moved
            offset = (low - first) * PAGE_SIZE
            chunk = bytes(data[offset : offset + (high - low) * PAGE_SIZE])
            userfault.fill(self.uffd, self._place(address + offset), chunk)
            self.missing[low:high] = bytes(high - low)
            self.asked[low:high] = bytes(high - low)
            self.left -= high - low
            self.arrived += high - low
            low = self.missing.find(1, high, end)

    def close(self) -> None:
        """Close the userfaultfd (and the keeper's): its ranges are the process's own again."""
        if self._keeper is not None:
            with contextlib.suppress(OSError):
                assert self._keeper.stdin is not None
                self._keeper.stdin.write(b"done\n")
                self._keeper.stdin.close()
            self._keeper.wait()
            self._keeper = None
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1

    def abandon(self) -> None:
        """Give up on the missing pages: the keeper stops the process and holds its
        userfaultfd until the process is gone; ours is closed."""
        if self._keeper is not None:
            keeper, self._keeper = self._keeper, None
            assert keeper.stdin is not None
            keeper.stdin.close()
            threading.Thread(target=keeper.wait, name="keeper", daemon=True).start()
        if self.uffd >= 0:
            os.close(self.uffd)
            self.uffd = -1

    def _keep(self, pid: int) -> None:
        """Start the keeper: a small process holding a copy of the userfaultfd. Should this
        daemon end before every page is in (SIGKILL included: the keeper's stdin closes),
        the keeper stops the process and holds the userfaultfd until the process is gone —
        so its missing pages never read as zeros. Told `done`, it exits."""
        self._keeper = subprocess.Popen(
            ["sh", "-c", KEEPER, "hijack-postcopy-keeper", str(pid)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(self.uffd,),
        )
