"""`make demo`: hijack at work on live, unmodified programs, command by command.

1. An unmodified `python3 -m http.server` is attached: its shadow is forked and
   shows the descriptors it holds; the server keeps serving while attached and
   after it is detached.
2. An unmodified python3 computation is dumped with --kill mid-run, its image
   shown, and restored: it finishes with the right result.

Everything runs in a temporary directory with its own state registry, and
everything started here is ended here.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rich.console import Console

from hijack.sys.process import set_child_subreaper

console = Console()
WAIT_SECONDS = 15.0

COMPUTATION = """
import time
total = 0
for step in range(1, 31):
    total += step * step
    print(f"step {step:2d}: running total {total}", flush=True)
    time.sleep(0.1)
print(f"final total {total} (expected {sum(s * s for s in range(1, 31))})", flush=True)
"""


def hijack(*args: str, state: Path) -> str:
    """Run one hijack command as a user would, echoing it and its output."""
    console.print(f"[bold cyan]$ hijack {' '.join(shlex.quote(a) for a in args)}[/]")
    environment = {**os.environ, "HIJACK_STATE_DIR": str(state), "COLUMNS": "100"}
    result = subprocess.run(
        [sys.executable, "-m", "hijack", *args],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"demo: hijack {args[0]} failed with exit code {result.returncode}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
        return f"HTTP {response.status}, {len(response.read())} bytes"


def wait_until_serving(port: int) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("demo: the web server did not start")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def reap_orphans() -> None:
    """Collect shadows and restored processes re-parented to us (the subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def attach_demo(workdir: Path, state: Path) -> None:
    console.rule("[bold]1. attach: a live web server gets a shadow")
    port = free_port()
    (workdir / "index.html").write_text("<h1>hello from a hijacked server</h1>\n")
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until_serving(port)
        console.print(f"web server pid {server.pid} on 127.0.0.1:{port}: {fetch(port)}")
        hijack("attach", str(server.pid), state=state)
        console.print(f"while attached, the server still answers: {fetch(port)}")
        hijack("detach", str(server.pid), state=state)
        console.print(f"after detach: {fetch(port)}")
    finally:
        stop(server)


def dump_restore_demo(workdir: Path, state: Path) -> None:
    console.rule("[bold]2. dump --kill and restore: a computation continues where it was")
    output = workdir / "computation.out"
    with open(output, "wb") as sink:
        computation = subprocess.Popen(
            [sys.executable, "-c", COMPUTATION],
            stdout=sink,
            stderr=sink,
            stdin=subprocess.DEVNULL,
        )
    deadline = time.monotonic() + WAIT_SECONDS
    while output.read_text().count("\n") < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    image = workdir / "computation.crf"
    try:
        hijack("dump", str(computation.pid), "-o", str(image), "--kill", state=state)
    finally:
        computation.wait()
    console.print(f"the original is gone (exit {computation.returncode}); its output so far:")
    console.print(output.read_text().rstrip().splitlines()[-1])
    hijack("show", str(image), state=state)
    restored = hijack("restore", str(image), state=state)
    pid = int(restored.split("restored process ")[1].split()[0])
    deadline = time.monotonic() + WAIT_SECONDS
    while "final total" not in output.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    reap_orphans()
    console.print(f"the restored process {pid} finished; the last lines of its output:")
    for line in output.read_text().rstrip().splitlines()[-3:]:
        console.print(f"  {line}")


def main() -> int:
    if os.geteuid() != 0:
        console.print("the demo needs root (ptrace of other processes, restore with set pids)")
        return 1
    set_child_subreaper()  # restored processes and shadows come back to us
    with tempfile.TemporaryDirectory(prefix="hijack-demo-") as directory:
        workdir = Path(directory)
        state = workdir / "state"
        attach_demo(workdir, state)
        dump_restore_demo(workdir, state)
        reap_orphans()
    console.rule("[bold green]done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
