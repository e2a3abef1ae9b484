"""What an attached process's shadow weighs: proportional memory (PSS) per shadow.

COUNT idle processes (each holding a pipe and a socket pair) are attached; once
every shadow rests as its holder (hijack.shadow.holder: idle for REST_AFTER
seconds), the PSS of all shadows (/proc/PID/smaps_rollup) is summed and
divided by COUNT. Beside it, the same for a few shadows kept in Python
(HIJACK_SHADOW_REST=off), as every shadow was before. Then what resting costs:
the answer to the first request a resting shadow gets (a Python start) beside
the next one's, and a resting shadow answering `release` itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hijack.mutator import attach as attaching
from hijack.registry import Registry
from hijack.shadow import control, holder

LIMIT_MIB = 1.0  # issue #17 item 7: at most 1 MiB PSS per attached process
REST_WAIT = 180.0  # seconds for every shadow to rest (a loaded machine)
MIB = 1024 * 1024


def pss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def resting(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")) == holder.PROGRAM.name
    return False


@contextmanager
def rest_setting(value: str | None) -> Iterator[None]:
    before = os.environ.get("HIJACK_SHADOW_REST")
    if value is None:
        os.environ.pop("HIJACK_SHADOW_REST", None)
    else:
        os.environ["HIJACK_SHADOW_REST"] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HIJACK_SHADOW_REST", None)
        else:
            os.environ["HIJACK_SHADOW_REST"] = before


@contextmanager
def attached(registry: Registry, count: int) -> Iterator[list[tuple[int, str]]]:
    """`count` idle processes, attached: (shadow pid, control socket) each."""
    targets: list[subprocess.Popen[bytes]] = []
    shadows: list[tuple[int, str]] = []
    peers: list[socket.socket] = []
    try:
        for _ in range(count):
            # A pipe (stdin) and a connected socket: what a shadow holds for a small server.
            ours, theirs = socket.socketpair()
            peers.append(ours)
            with theirs:
                target = subprocess.Popen(
                    ["sleep", "3600"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    pass_fds=[theirs.fileno()],
                    start_new_session=True,
                )
            targets.append(target)
            result = attaching.attach(target.pid, registry)
            assert result.record.shadow_pid and result.record.shadow_control
            shadows.append((result.record.shadow_pid, result.record.shadow_control))
        yield shadows
    finally:
        for target in targets:
            with contextlib.suppress(Exception):
                attaching.detach(target.pid, registry)
            target.kill()
            target.wait()
            if target.stdin is not None:
                target.stdin.close()
        for peer in peers:
            peer.close()
        for shadow, _ in shadows:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(shadow, 0)  # our child: bench is a child subreaper


def wait_resting(shadows: list[tuple[int, str]]) -> bool:
    deadline = time.monotonic() + REST_WAIT
    while time.monotonic() < deadline:
        if all(resting(pid) for pid, _ in shadows):
            return True
        time.sleep(0.5)
    return False


def measure_shadows(directory: Path, count: int, python_count: int) -> list[str]:
    with Registry(directory / "shadow-state") as registry:
        with rest_setting("off"), attached(registry, python_count) as shadows:
            time.sleep(2.0)  # past their start: what an idle one holds
            python_pss = sum(pss_bytes(pid) for pid, _ in shadows) / len(shadows)
        with rest_setting(None), attached(registry, count) as shadows:
            rested = wait_resting(shadows)
            total = sum(pss_bytes(pid) for pid, _ in shadows)
            per = total / len(shadows)
            first, again = [], []
            # `originals` (of no move: nothing) is one a resting shadow cannot answer itself.
            wake = {"op": "originals", "move": "bench"}
            for _pid, path in shadows[:10]:
                started = time.perf_counter()
                control.request(path, wake, timeout=60.0)
                first.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                control.request(path, wake, timeout=60.0)
                again.append((time.perf_counter() - started) * 1000)
            awake = sum(not resting(pid) for pid, _ in shadows)
            rested_note = "every one resting" if rested else f"{awake} NOT resting"
    met = "met" if per <= LIMIT_MIB * MIB and rested else "NOT met"
    return [
        f"{f'shadow PSS per attached process, {count} attached':<50} {per / MIB:6.2f} MiB | "
        f"{f'Python shadows ({python_count}, rest off)':<34} {python_pss / MIB:6.2f} MiB | "
        f"{rested_note}; target <= {LIMIT_MIB:g} MiB: {met}",
        f"{'first request to a resting shadow (median)':<50} "
        f"{statistics.median(first):6.1f} ms  | {'the next one (awake)':<34}"
        f" {statistics.median(again):6.1f} ms  | a Python start; "
        f"it rests again {holder.REST_AFTER:g} s after its last request",
    ]
