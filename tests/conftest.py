"""Session setup and the per-test leak check every test runs under.

pytest becomes a child subreaper, so whatever a test starts stays its
descendant however it was orphaned (this machine's PID 1 does not reap
orphans, see KERNEL-NOTES "The machine's init"). After each test, a process
that appeared during the test and is still alive, a harness temp directory
still on disk, or a test node's network namespace (support/nodes.py) still
there, fails that test: it is killed/removed and named.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import (
    find_leaked_processes,
    find_leftover_namespaces,
    find_leftover_temp_dirs,
    fixture_path,
    kill_and_reap,
    remove_namespaces,
    session_fixtures,
    snapshot_descendants,
    snapshot_namespaces,
    snapshot_temp_dirs,
)
from support.objects import hijack  # noqa: F401 (the CLI fixture of the tests of each kind)
from support.tempdirs import remove_temp_dir

from hijack.shadow import holder, pump
from hijack.sys import netlock
from hijack.sys.process import set_child_subreaper


def pytest_sessionstart(session: pytest.Session) -> None:
    set_child_subreaper()
    pump.build()  # the shadow's native relay pump, as `make` builds it at install
    holder.build()  # and the resting shadow's holder


@pytest.fixture(scope="session")
def fixture_bin() -> Callable[[str], Path]:
    """Build the fixtures once per session; give the path of one by name."""
    session_fixtures()  # build (or skip) at setup, not halfway through a test
    return fixture_path


@pytest.fixture(autouse=True)
def no_leaked_processes_or_temp_dirs() -> Iterator[None]:
    # Autouse and first in the closure: torn down after every other fixture
    # of the test, so what they clean up is not reported.
    root = os.getpid()
    processes_before = snapshot_descendants(root)
    temp_dirs_before = snapshot_temp_dirs()
    namespaces_before = snapshot_namespaces()  # only this process's test nodes count
    yield
    problems: list[str] = []
    leaked = find_leaked_processes(root, processes_before)
    if leaked:
        survivors = kill_and_reap(leaked, root, processes_before)
        problems.append(
            "leaked processes (killed and reaped):\n"
            + "\n".join(f"  {info.describe()}" for info in leaked)
        )
        if survivors:
            problems.append(
                "could not reap:\n" + "\n".join(f"  {info.describe()}" for info in survivors)
            )
    leftovers = find_leftover_temp_dirs(temp_dirs_before)
    for path in leftovers:
        remove_temp_dir(path)
    if leftovers:
        problems.append(
            "harness temp dirs left behind (removed): " + ", ".join(map(str, leftovers))
        )
    # Processes inside a leftover namespace were named by the check above if
    # they descended from us; remove_namespaces kills whatever else is inside.
    leftover_namespaces = find_leftover_namespaces(namespaces_before)
    if leftover_namespaces:
        remove_namespaces(leftover_namespaces)
        problems.append(
            "network namespaces left behind (processes inside killed, removed): "
            + ", ".join(leftover_namespaces)
        )
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def no_leaked_network_locks(tmp_path: Path) -> Iterator[None]:
    """Fail a test that leaves a network lock (hijack.sys.netlock) behind, and remove it.

    Only the test's own locks count: those written down in a state directory
    under its tmp_path (hijack.lockbook records a lock before taking it, and
    crosses it out once lifted). The locks live in this machine's own network
    namespace, where another suite running at the same time holds its own.
    """
    root = os.getpid()
    before = set(netlock.locks_held(root))
    yield
    ours = {record.stem for record in tmp_path.rglob("netlocks/*.json")}
    leftover = (set(netlock.locks_held(root)) - before) & ours
    for name in leftover:
        netlock.remove_lock(root, name)
    if leftover:
        pytest.fail(
            "network locks left behind (removed): " + ", ".join(sorted(leftover)), pytrace=False
        )
