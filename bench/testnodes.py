"""The test suite's network-namespace nodes and fixtures, for the benches that need real links.

tests/support builds the C fixtures and the clusters of namespace nodes (a
bridge, one veth per node, a daemon in each) that the move tests use; the
benches use the very same, so a figure is measured on what the tests check.
"""

from __future__ import annotations

import sys
from pathlib import Path

SUPPORT = Path(__file__).resolve().parent.parent / "tests"
if str(SUPPORT) not in sys.path:
    sys.path.insert(0, str(SUPPORT))

from support.nodes import Cluster, Node, run_ip  # noqa: E402
from support.running import RunningFixture, spawn_fixture  # noqa: E402

__all__ = ["Cluster", "Node", "RunningFixture", "run_ip", "spawn_fixture"]
