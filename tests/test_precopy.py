"""Pure parts of pre-copy: the sets of page runs the mover keeps (sent, owed, dropped)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from hijack.mutator.precopy import clip_runs, subtract_runs, union_runs

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
