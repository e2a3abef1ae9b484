"""The test suite's network-namespace nodes and fixtures, for the benches that need real links.

tests/support builds the C fixtures and the clusters of namespace nodes (a
bridge, one veth per node, a daemon in each) that the move tests use; the
benches use the very same, so a figure is measured on what the tests check.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

SUPPORT = Path(__file__).resolve().parent.parent / "tests"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

from support.nodes import Cluster, Node, run_ip, shaped  # noqa: E402
from support.running import RunningFixture, spawn_fixture  # noqa: E402

__all__ = [
    "Cluster",
    "Node",
    "RunningFixture",
    "relay_nodes",
    "run_ip",
    "shaped",
    "spawn_fixture",
]


@contextlib.contextmanager
def relay_nodes(prefix: str) -> Iterator[tuple[Path, Cluster]]:
    """(a directory, three nodes a, b, c) with daemons on a and b: a process moves a -> b
    and a client on c reaches it through its home shadow on a."""
    with (
        tempfile.TemporaryDirectory(prefix=prefix) as directory,
        Cluster(Path(directory), nodes=3) as cluster,
    ):
        a, b, _ = cluster.nodes
        a.start_daemon()
        b.start_daemon()
        assert b.daemon_endpoint is not None
        yield Path(directory), cluster
