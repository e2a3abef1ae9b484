"""The test harness: build the C fixtures, run them under their protocol, catch leaks.

See tests/fixtures/README.md for the protocol the fixtures follow.
"""

from support.build import (
    FIXTURE_DIR,
    FixtureBuildError,
    GccMissing,
    build_fixtures,
    fixture_names,
    fixture_path,
    session_fixtures,
)
from support.leaks import (
    ProcessInfo,
    descendants,
    find_leaked_processes,
    kill_and_reap,
    snapshot_descendants,
)
from support.nodes import (  # test nodes' namespaces, for the per-test leak check
    find_leftover_namespaces,
    remove_namespaces,
    snapshot_namespaces,
)
from support.running import FixtureError, RunningFixture, spawn_fixture
from support.tempdirs import find_leftover_temp_dirs, snapshot_temp_dirs

__all__ = [
    "FIXTURE_DIR",
    "FixtureBuildError",
    "FixtureError",
    "GccMissing",
    "ProcessInfo",
    "RunningFixture",
    "build_fixtures",
    "descendants",
    "find_leaked_processes",
    "find_leftover_namespaces",
    "find_leftover_temp_dirs",
    "fixture_names",
    "fixture_path",
    "kill_and_reap",
    "remove_namespaces",
    "session_fixtures",
    "snapshot_descendants",
    "snapshot_namespaces",
    "snapshot_temp_dirs",
    "spawn_fixture",
]
