"""SIGINT and SIGTERM reaching `hijack attach` while it holds the target.

The signal is sent while the target is seen traced by the command (its
TracerPid, read from /proc in a tight bounded loop): round by round, after
more observations of the traced state, so it lands early in the seize, during
the injected calls, or after the release. No sleep decides when. Wherever it
lands, the target must be left running and intact, and no shadow may survive
an attach that failed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import spawn_fixture

ROUNDS = 11  # the signals spread over the whole attach: after 0 to 600 reads of /proc
OBSERVATIONS_STEP = 60  # more /proc reads of the traced target before each round's signal
TRACE_WAIT = 10.0


def tracer_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("TracerPid:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no TracerPid")


def shadows_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"hijack.shadow" in argv and str(pid).encode() in argv:
            found.append(int(entry))
    return found


def reap(pid: int) -> None:
    """Shadows are re-parented to us (a child subreaper): collect an ended one."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


@pytest.mark.parametrize("signal_number", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_attach_leaves_the_target_running_and_intact(
    tmp_path: Path, signal_number: int
) -> None:
    env = {**os.environ, "HIJACK_STATE_DIR": str(tmp_path / "state")}
    outcomes = {0: 0, 1: 0}
    with spawn_fixture("counter", str(tmp_path / "counter.log"), "2") as counter:
        for round_number in range(ROUNDS):
            command = subprocess.Popen(
                [sys.executable, "-m", "hijack", "attach", str(counter.pid)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            deadline = time.monotonic() + TRACE_WAIT
            observations = round_number * OBSERVATIONS_STEP
            while command.poll() is None and time.monotonic() < deadline:
                if tracer_of(counter.pid) == command.pid:
                    if observations == 0:
                        command.send_signal(signal_number)
                        break
                    observations -= 1
            _stdout, stderr = command.communicate(timeout=30)
            assert command.returncode in outcomes, f"exit {command.returncode}: {stderr}"
            outcomes[command.returncode] += 1
            if command.returncode == 1:
                assert len(stderr.strip().splitlines()) == 1, stderr
                assert "Traceback" not in stderr
                assert "interrupted" in stderr or "hijack:" in stderr
            # Released either way: never left traced, stopped, or with a shadow
            # from a failed attach.
            assert tracer_of(counter.pid) == 0
            leftover = shadows_of(counter.pid)
            if command.returncode == 0:
                subprocess.run(
                    [sys.executable, "-m", "hijack", "detach", str(counter.pid)],
                    env=env,
                    check=True,
                    capture_output=True,
                )
            else:
                assert leftover == [], f"a failed attach left shadows {leftover}"
            for shadow in leftover:
                reap(shadow)
        assert counter.finish() == 0, counter.describe()
    print(
        f"{signal.Signals(signal_number).name}: {outcomes[1]} attaches interrupted, "
        f"{outcomes[0]} completed before the signal landed"
    )
