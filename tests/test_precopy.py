"""Pure parts of pre-copy: the sets of page runs the mover keeps (sent, owed, dropped), and
round 0's segments found again at the freeze."""

from __future__ import annotations

import itertools
from typing import cast

from hypothesis import given
from hypothesis import strategies as st

from hijack.image import records as rec
from hijack.mutator.precopy import HeldPages, Precopy, clip_runs, subtract_runs, union_runs
from hijack.sys import dirty

Run = tuple[int, int]
runs_lists = st.lists(
    st.tuples(st.integers(0, 200), st.integers(1, 20)).map(lambda t: (t[0], t[0] + t[1])),
    max_size=15,
)


def pages(runs: list[Run]) -> set[int]:
    return {page for start, end in runs for page in range(start, end)}


def as_runs(numbers: set[int]) -> list[Run]:
    runs: list[Run] = []
    for number in sorted(numbers):
        if runs and runs[-1][1] == number:
            runs[-1] = (runs[-1][0], number + 1)
        else:
            runs.append((number, number + 1))
    return runs


@given(runs_lists, runs_lists, st.integers(0, 220), st.integers(0, 220))
def test_run_sets_behave_as_sets_of_pages(
    first: list[Run], second: list[Run], start: int, end: int
) -> None:
    a, b = union_runs(first, []), union_runs(second, [])
    assert a == as_runs(pages(first))  # sorted, disjoint, merged
    assert union_runs(first, second) == as_runs(pages(first) | pages(second))
    assert subtract_runs(a, b) == as_runs(pages(first) - pages(second))
    assert clip_runs(a, start, end) == as_runs(pages(first) & set(range(start, end)))


PAGE = 4096
# A layout: disjoint segments, each (first page, pages, inode), as /proc's maps lists them.
layouts = st.lists(
    st.tuples(st.integers(0, 3), st.integers(1, 6), st.sampled_from([0, 0, 7])),
    min_size=0,
    max_size=12,
)


def segments_of(layout: list[tuple[int, int, int]], base: int = 0) -> list[rec.Segment]:
    segments, page = [], base
    for gap, size, inode in layout:
        page += gap
        segments.append(
            rec.Segment(
                start=page * PAGE,
                end=(page + size) * PAGE,
                prot=rec.Prot.READ | rec.Prot.WRITE,
                shared=False,
                offset=page * PAGE if inode else 0,
                dev_major=0,
                dev_minor=0,
                inode=inode,
                contents=rec.ContentsKind.STORED,
                path="/f" if inode else "",
                vm_flags=("rd", "wr"),
                file=None,
            )
        )
        page += size
    return segments


@given(layouts, layouts, st.integers(0, 8))
def test_a_freeze_finds_round_zeros_segments_by_bisection(
    first: list[tuple[int, int, int]], now: list[tuple[int, int, int]], shift: int
) -> None:
    """Each segment of the freeze is cut at, and judged within, round 0's segments exactly
    as a look at every one of them does (Precopy._bases_over finds them by bisection)."""
    precopy = Precopy(0, cast(dirty.WrittenPages, None))
    precopy.base = segments_of(first)
    for segment in segments_of(now, shift):
        over = [b for b in precopy.base if b.end > segment.start and b.start < segment.end]
        assert precopy._bases_over(segment.start, segment.end) == over
        edges = sorted(
            {e for b in over for e in (b.start, b.end) if segment.start < e < segment.end}
        )
        pieces = precopy._split_at_base(segment)
        assert [(p.start, p.end) for p in pieces] == list(
            itertools.pairwise([segment.start, *edges, segment.end])
        )
        for piece in pieces:
            holding = [b for b in precopy.base if b.start <= piece.start and piece.end <= b.end]
            within = bool(holding) and (
                holding[0].inode == piece.inode
                and (
                    piece.inode == 0
                    or piece.offset - holding[0].offset == piece.start - holding[0].start
                )
            )
            assert precopy._within_base(piece) == within
    precopy.base = segments_of(now)  # a new round 0 (a list of its own): found afresh
    assert precopy._bases_over(0, 1 << 40) == precopy.base


def test_held_pages_tell_what_was_sent_and_only_that() -> None:
    """HeldPages (a writable private file mapping's pages as the destination holds them):
    a page is the same only if it was sent and reads as sent; a send reaching outside the
    segment keeps its part inside."""
    held = HeldPages(4 * PAGE, 4 * PAGE)  # pages 4-7
    sent = bytearray(b"a" * PAGE + b"b" * PAGE)
    held.keep(4 * PAGE, memoryview(sent))  # pages 4-5
    assert held.same(4 * PAGE, sent, 0, 2 * PAGE)
    assert not held.same(4 * PAGE, bytearray(b"a" * PAGE + b"c" * PAGE), 0, 2 * PAGE)
    assert not held.same(6 * PAGE, bytearray(PAGE), 0, PAGE), "never sent: not the same"
    assert not held.same(7 * PAGE, bytearray(2 * PAGE), 0, 2 * PAGE), "outside the segment"
    late = bytearray(b"d" * PAGE + b"e" * PAGE + b"f" * PAGE)
    held.keep(6 * PAGE, memoryview(late))  # pages 6-8: 8 lies outside
    assert held.same(6 * PAGE, late, 0, 2 * PAGE)
    held.keep(5 * PAGE, memoryview(bytearray(b"g" * PAGE)))  # sent again: the new bytes
    assert held.same(5 * PAGE, bytearray(b"g" * PAGE), 0, PAGE)
    assert not held.same(4 * PAGE, sent, 0, 2 * PAGE)
