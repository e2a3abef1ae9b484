"""The benchmarks run in a short mode in CI, so they cannot rot. Nothing is timed here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_bench(module: str, timeout: float) -> str:
    """`python -m MODULE --quick` in the repository: what it printed (it must end well)."""
    result = subprocess.run(
        [sys.executable, "-m", module, "--quick"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_quick_bench_prints_every_figure_beside_its_baseline() -> None:
    printed = run_bench("bench", timeout=600)
    figures = (
        "dump to a file",
        "dump to a pipe",
        "restore from a file",
        "snapshot dump freeze",
        "by pre-copy rounds (",
        "snapshot dump to a synced file",
        "dump CPU per GiB",
        "relay throughput",
        "added round trip",
        "throughput home again",
        "move freeze time, 10 MB",
        "move freeze time, 64 MiB",
        "move freeze time, 64 MiB dirtying 10 MB/s",
        "move freeze p50",
        "move freeze p99",
        "move total time",
        "freeze steps on the mover",
        "freeze steps at the destination",
        "relay throughput, veth",
        "relay throughput, 1 Gbit/s",
        "relay throughput, 10 Gbit/s",
        "the same relay, --plain-relays",
        "the same, --plain-relays",
        "relayed by packets",
        "peer pause across a move, shadow",
        "added round trip p50, veth",
        "added round trip p99, veth",
        "added round trip p50, one CPU",
        "added round trip p50, busy polling",
        "shadow CPU per GB relayed",
        "move freeze, 64 MiB dirtying 200 MB/s, default (auto)",
        "move freeze, 64 MiB dirtying 200 MB/s, --postcopy",
        "move image stream, TLS 1.3",
        "message round trip, TLS 1.3",
        "node stream, TLS 1.3",
        "move freeze, TLS 1.3 (median)",
        "before TLS (66ffbeb), same run",
        "tree move freeze, 1+8 sharing",
        "tree move image, 1+8 sharing",
        "tree move memory (sum of PSS), 1+8 sharing",
        "tree restore, 1 + 8 children sharing",
        "tree move freeze, post-copy, 1+8 dirtying",
        "move freeze of a swapped end",
        "sent while frozen (median)",
        "the slowest freeze's steps",
        "redis GET relayed, plain",
        "redis GET relayed, tls",
        "redis GET relayed, accepted",
        "redis GET relayed, packet",
        "shadow CPU per GET, plain",
        "shadow PSS per attached process",
        "first request to a resting shadow",
        "move freeze (median), python http.server, --postcopy",
    )
    for figure in figures:
        assert figure in printed, printed


def test_the_relay_floor_bench_measures_each_path() -> None:
    """bench/relay_floor.py (not in make bench: it measures no part of hijack) once, short."""
    printed = run_bench("bench.relay_floor", timeout=300)
    lines = [f"redis GET, floor {path} " for path in ("direct", "pump", "sockmap", "nat")]
    for line in (*lines, "stream, floor nat", "added round trip, floor nat"):
        assert line in printed, printed
