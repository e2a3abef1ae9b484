"""`make demo`: hijack at work on live, unmodified programs, command by command.

1. A live move: two nodes (network namespaces joined by a veth link, each
   with its own node daemon); a TCP server with a client talking to it; the
   server moves to the other node and back while the client keeps talking
   and checks every answer; then the status.
2. An unmodified `python3 -m http.server` is attached: its shadow is forked and
   shows the descriptors it holds; the server keeps serving while attached and
   after it is detached.
3. An unmodified python3 computation is dumped with --kill mid-run, its image
   shown, and restored: it finishes with the right result.
4. The status of node a: what it attached, moved and restored, and the nodes.

Everything runs in a temporary directory with its own state registries, and
everything started here (namespaces included) is ended here.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
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

NETNS_PREFIX = "hijack-demo-"
DAEMON_PORT = 7450
SERVER_PORT = 9000

# An unmodified TCP echo server, and a client that sends a numbered line every
# 50 ms, checks that each comes back exactly, and reports every 20 lines.
ECHO_SERVER = """
import selectors, socket, sys
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
server.setblocking(False)
selector = selectors.DefaultSelector()
selector.register(server, selectors.EVENT_READ)
while True:
    for key, _ in selector.select():
        if key.fileobj is server:
            client, _ = server.accept()
            selector.register(client, selectors.EVENT_READ)
            continue
        data = key.fileobj.recv(65536)
        if data:
            key.fileobj.sendall(data)
        else:
            selector.unregister(key.fileobj)
            key.fileobj.close()
"""

ECHO_CLIENT = """
import socket, sys, time
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])))
reader = sock.makefile("rb")
for number in range(1, int(sys.argv[3]) + 1):
    line = f"line {number}\\n".encode()
    sock.sendall(line)
    answer = reader.readline()
    if answer != line:
        print(f"client: WRONG answer {answer!r} for {line!r}", flush=True)
        sys.exit(1)
    if number % 20 == 0:
        print(f"client: {number} lines sent and echoed back intact", flush=True)
    time.sleep(0.05)
print("client: every line came back, in order", flush=True)
"""

COMPUTATION = """
import time
total = 0
for step in range(1, 31):
    total += step * step
    print(f"step {step:2d}: running total {total}", flush=True)
    time.sleep(0.1)
print(f"final total {total} (expected {sum(s * s for s in range(1, 31))})", flush=True)
"""


def hijack(
    *args: str, state: Path, netns: str = "", extra_env: dict[str, str] | None = None
) -> str:
    """Run one hijack command as a user would, echoing it and its output."""
    where = f"[{netns.removeprefix(NETNS_PREFIX)}] " if netns else ""
    console.print(f"[bold cyan]{where}$ hijack {' '.join(shlex.quote(a) for a in args)}[/]")
    environment = {
        **os.environ,
        "HIJACK_STATE_DIR": str(state),
        # Our output is a pipe to rich: give it the terminal's width.
        "COLUMNS": str(max(120, shutil.get_terminal_size().columns)),
        **(extra_env or {}),
    }
    inside = ["ip", "netns", "exec", netns] if netns else []
    result = subprocess.run(
        [*inside, sys.executable, "-m", "hijack", *args],
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


class Node:
    """A network namespace with an address and its own state directory and daemon."""

    def __init__(self, name: str, address: str, workdir: Path, certificates: Path) -> None:
        self.name = name
        self.netns = NETNS_PREFIX + name
        self.address = address
        self.state = workdir / f"node-{name}"
        # Both nodes read one directory here; on real machines each has its own copy.
        self.env = {"HIJACK_NODE": name, "HIJACK_PKI": str(certificates)}
        self.daemon: subprocess.Popen[str] | None = None

    def spawn(
        self, argv: list[str], stdout: int | None = None, stderr: int | None = None
    ) -> subprocess.Popen[str]:
        environment = {**os.environ, "HIJACK_STATE_DIR": str(self.state), **self.env}
        return subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *argv],
            env=environment,
            text=True,
            stdout=stdout,
            stderr=stderr,
        )

    def start_daemon(self) -> None:
        listen = f"{self.address}:{DAEMON_PORT}"
        self.daemon = self.spawn(
            # The demo's processes run as root, which a daemon refuses by default.
            [sys.executable, "-m", "hijack", "node", "serve", "--listen", listen, "--allow-root"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.daemon.stdout is not None
        console.print(f"node {self.name}: {self.daemon.stdout.readline().strip()}")

    def hijack(self, *args: str) -> str:
        return hijack(*args, state=self.state, netns=self.netns, extra_env=self.env)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def make_nodes(workdir: Path) -> tuple[Node, Node]:
    """Two namespaces joined by one veth link: 10.78.0.1 and 10.78.0.2."""
    certificates = workdir / "pki"
    home = Node("a", "10.78.0.1", workdir, certificates)
    away = Node("b", "10.78.0.2", workdir, certificates)
    hijack("cluster", "init", "--pki", str(certificates), state=home.state)
    for node in (home, away):
        add = ("cluster", "add-node", node.name, "--address", node.address)
        hijack(*add, "--pki", str(certificates), state=home.state)
    for node in (home, away):
        ip("netns", "add", node.netns)
        ip("-n", node.netns, "link", "set", "lo", "up")
    ip("link", "add", "hjdemo-a", "netns", home.netns, "type", "veth",
       "peer", "name", "hjdemo-b", "netns", away.netns)  # fmt: skip
    for node, link in ((home, "hjdemo-a"), (away, "hjdemo-b")):
        ip("-n", node.netns, "addr", "add", f"{node.address}/24", "dev", link)
        ip("-n", node.netns, "link", "set", link, "up")
    return home, away


def remove_nodes(nodes: tuple[Node, ...]) -> None:
    for node in nodes:
        pids = subprocess.run(
            ["ip", "netns", "pids", node.netns], capture_output=True, text=True, check=False
        ).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", node.netns], capture_output=True, check=False)
    reap_orphans()


def move_demo(home: Node, away: Node) -> None:
    console.rule("[bold]1. move: a live TCP server goes to another node and back")
    server = home.spawn([sys.executable, "-c", ECHO_SERVER, home.address, str(SERVER_PORT)])
    wait_until_serving_in(home, SERVER_PORT)
    client = home.spawn(
        [sys.executable, "-c", ECHO_CLIENT, home.address, str(SERVER_PORT), "120"],
        stdout=subprocess.PIPE,
    )
    assert client.stdout is not None
    console.print(client.stdout.readline().rstrip())
    moved = home.hijack("move", str(server.pid), "--to", away.address)
    server.wait()
    pid = moved.split("runs there as ")[1].split(";")[0]
    console.print(client.stdout.readline().rstrip())
    away.hijack("move", pid, "--to", home.address)
    for line in client.stdout:
        console.print(line.rstrip())
    client.wait()


def wait_until_serving_in(node: Node, port: int) -> None:
    probe = (
        "import socket, sys, time\n"
        "for _ in range(300):\n"
        "    try:\n"
        f"        socket.create_connection(('{node.address}', {port}), timeout=0.5).close()\n"
        "        sys.exit(0)\n"
        "    except OSError:\n"
        "        time.sleep(0.05)\n"
        "sys.exit(1)\n"
    )
    if node.spawn([sys.executable, "-c", probe]).wait() != 0:
        raise SystemExit("demo: the server did not start")


def attach_demo(workdir: Path, state: Path, env: dict[str, str]) -> None:
    console.rule("[bold]2. attach: a live web server gets a shadow")
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
        hijack("attach", str(server.pid), state=state, extra_env=env)
        console.print(f"while attached, the server still answers: {fetch(port)}")
        hijack("detach", str(server.pid), state=state, extra_env=env)
        console.print(f"after detach: {fetch(port)}")
    finally:
        stop(server)


def dump_restore_demo(workdir: Path, state: Path, env: dict[str, str]) -> None:
    console.rule("[bold]3. dump --kill and restore: a computation continues where it was")
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
        hijack("dump", str(computation.pid), "-o", str(image), "--kill", state=state, extra_env=env)
    finally:
        computation.wait()
    console.print(f"the original is gone (exit {computation.returncode}); its output so far:")
    console.print(output.read_text().rstrip().splitlines()[-1])
    hijack("show", str(image), state=state, extra_env=env)
    restored = hijack("restore", str(image), state=state, extra_env=env)
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
        nodes = make_nodes(workdir)
        home, away = nodes
        try:
            for node in nodes:
                node.start_daemon()
            move_demo(home, away)
            # The rest runs on node a's registry too, under its name (outside
            # its namespace), so the status shows it all.
            attach_demo(workdir, home.state, home.env)
            dump_restore_demo(workdir, home.state, home.env)
            console.rule("[bold]4. status: what node a knows")
            home.hijack("status")
        finally:
            remove_nodes(nodes)
        reap_orphans()
    console.rule("[bold green]done")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
