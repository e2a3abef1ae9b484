"""Post-copy move freezes of real servers under load (issue #17 item 5).

Three nodes of the test suite's clusters (tests/support/nodes.py): a server
starts on node a, CLIENTS clients on node c keep requesting from it over
keep-alive connections (each answer checked), and the server moves a -> b
with `hijack move --postcopy --timing` while they do. Two servers, as their
users run them:

- python: a threaded `http.server` (ThreadingHTTPServer) whose handler churns
  CHURN_MB of Python objects (each request replaces one slot of a table of
  lists of strings: memory mapped and unmapped all the time);
- java: a `com.sun.net.httpserver.HttpServer` (openjdk, a pool of worker
  threads) whose handler churns byte arrays on the JVM's heap.

Printed per server: each move's freeze beside the limit, where the freeze
went (the mover's and the destination's steps), what post-copy served after
the start, and the clients' requests and errors (an error is a failed or wrong
answer: there must be none).
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.testnodes import Node, relay_nodes

CLIENTS = 4
CHURN_MB = 160
FREEZE_TARGET_MS = 100.0  # issue #17 item 5
MOVE_TIMEOUT = 300.0
START_TIMEOUT = 60.0
JAVA = "/usr/bin/java"

PYTHON_SERVER = """
import http.server, random, sys
SLOTS = 40
PER_SLOT = int(sys.argv[2]) * 1024 * 1024 // SLOTS // 60   # ~60 bytes per small string
table = [None] * SLOTS
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        slot = random.randrange(SLOTS)
        table[slot] = [str(i) * 3 for i in range(PER_SLOT)]
        body = ("%s %d\\n" % (self.path, len(table[slot]))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler)
server.daemon_threads = True
server.serve_forever()
"""

JAVA_SERVER = """
import com.sun.net.httpserver.*;
import java.net.InetSocketAddress;
import java.util.concurrent.Executors;
import java.util.concurrent.ThreadLocalRandom;
public class Server {
    static final int SLOTS = 160;
    static final byte[][] table = new byte[SLOTS][];
    public static void main(String[] args) throws Exception {
        int slotSize = Integer.parseInt(args[1]) * 1024 * 1024 / SLOTS;
        HttpServer server = HttpServer.create(new InetSocketAddress(Integer.parseInt(args[0])), 64);
        server.createContext("/", exchange -> {
            int slot = ThreadLocalRandom.current().nextInt(SLOTS);
            byte[] churn = new byte[slotSize];
            churn[slot] = 1;
            synchronized (table) { table[slot] = churn; }
            byte[] body = (exchange.getRequestURI().getPath() + " " + slotSize + "\\n").getBytes();
            exchange.sendResponseHeaders(200, body.length);
            exchange.getResponseBody().write(body);
            exchange.close();
        });
        server.setExecutor(Executors.newFixedThreadPool(8));
        server.start();
    }
}
"""

# CLIENTS keep-alive connections to argv[1]:argv[2], each asking /C-N in turn and
# checking the answer names it; reconnects after an error (counted). Runs until
# the file argv[3] exists, then prints "requests N errors E" and the errors.
CLIENT = """
import http.client, os, sys, threading, time
host, port, stop, clients = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
counts = [0] * clients
errors = []
def run(c):
    conn = None
    n = 0
    while not os.path.exists(stop):
        n += 1
        path = "/%d-%d" % (c, n)
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=120)
            conn.request("GET", path)
            answer = conn.getresponse().read()
            if not answer.startswith(path.encode() + b" "):
                raise ValueError("wrong answer %r" % answer[:60])
            counts[c] += 1
        except Exception as error:
            errors.append("%s: %r" % (path, error))
            if conn is not None:
                conn.close()
            conn = None
            time.sleep(0.1)
threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("requests", sum(counts), "errors", len(errors))
for e in errors[:10]:
    print(e)
"""

MOVED = re.compile(r"runs there as (\d+); frozen ([\d.]+) ms")
SERVED = re.compile(r"post-copy: ([\d.]+ ?\w+) served after the start, in (\d+) ms")
RESULT = re.compile(r"requests (\d+) errors (\d+)")


def start_server(kind: str, node: Node, directory: Path) -> tuple[int, int]:
    """The server `kind` on every address of `node`: (pid, port)."""
    port = node.free_port()
    if kind == "python":
        argv = ["/usr/bin/python3", "-c", PYTHON_SERVER, str(port), str(CHURN_MB)]
    else:
        work = directory / "java"
        work.mkdir(exist_ok=True)
        (work / "Server.java").write_text(JAVA_SERVER)
        argv = [JAVA, "-Xmx512m", str(work / "Server.java"), str(port), str(CHURN_MB)]
    process = node.spawn(argv, stdin=-3, stdout=-3, stderr=-3, start_new_session=True)
    node.wait_tcp("127.0.0.1", port, timeout=START_TIMEOUT)
    return process.pid, port


def start_clients(client: Node, host: str, port: int, stop: Path) -> subprocess.Popen[str]:
    return client.spawn(
        [sys.executable, "-c", CLIENT, host, str(port), str(stop), str(CLIENTS)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def measure_server(kind: str, moves: int, warm: float) -> list[str]:
    if kind == "java" and not os.path.exists(JAVA):
        return [f"{'move freeze, java HttpServer':<44} skipped: no {JAVA}"]
    if kind == "python" and shutil.which("python3") is None:
        return [f"{'move freeze, python http.server':<44} skipped: no python3"]
    lines: list[str] = []
    with relay_nodes(f"hijack-bench-{kind}-") as (directory, cluster):
        a, b, c = cluster.nodes
        assert b.daemon_endpoint is not None
        freezes: list[float] = []
        for number in range(moves):
            pid, port = start_server(kind, a, directory)
            stop = directory / f"stop-{number}"
            clients = start_clients(c, a.address, port, stop)
            time.sleep(warm)  # the clients' load, the churned memory in place
            load = os.getloadavg()[0]
            moved = a.hijack(
                "move",
                pid,
                "--to",
                b.daemon_endpoint,
                "--postcopy",
                "--timing",
                timeout=MOVE_TIMEOUT,
            )
            time.sleep(warm)  # the clients go on through the relay
            stop.touch()
            out, _ = clients.communicate(timeout=MOVE_TIMEOUT)
            if moved.returncode != 0:
                raise SystemExit(f"bench: {moved.describe()}")
            text = " ".join(moved.stdout.split())
            found = MOVED.search(text)
            result = RESULT.search(out)
            if found is None or result is None:
                raise SystemExit(f"bench: unexpected output: {text}\n{out}")
            freezes.append(float(found[2]))
            served = SERVED.search(text)
            lines.append(
                f"  {kind} move {number + 1}: frozen {found[2]} ms at load {load:.1f};"
                f" {served[1] if served else 'nothing'} served after the start;"
                f" clients: {result[1]} requests, {result[2]} errors"
            )
            if int(result[2]):  # a guarantee broken, not a figure: no bench goes on
                raise SystemExit(f"bench: {kind} clients saw errors across its move:\n{out}")
            lines += ["    " + each for each in moved.stdout.splitlines() if "ms" in each]
            moved_pid = int(found[1])
            b.run(["kill", "-9", str(moved_pid)], timeout=30)
    median = statistics.median(freezes)
    met = "met" if median <= FREEZE_TARGET_MS else "NOT met"
    name = {"python": "python http.server", "java": "java HttpServer"}[kind]
    return [
        f"{'move freeze (median), ' + name + ', --postcopy':<52} {median:8.1f} ms   | "
        f"range {min(freezes):.1f}-{max(freezes):.1f} ms, {moves} moves, {CLIENTS} clients"
        f" | target <= {FREEZE_TARGET_MS:.0f} ms: {met}",
        *lines,
    ]


def measure_servers(
    moves: int, warm: float, kinds: tuple[str, ...] = ("python", "java")
) -> list[str]:
    """make bench's lines: each server's post-copy freezes (`moves` moves each)."""
    return [line for kind in kinds for line in measure_server(kind, moves, warm)]


if __name__ == "__main__":
    from hijack.sys.process import set_child_subreaper

    set_child_subreaper()
    kinds = sys.argv[1].split(",") if len(sys.argv) > 1 else ["python", "java"]
    moves = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    warm = float(sys.argv[3]) if len(sys.argv) > 3 else 5.0
    for each in kinds:
        print("\n".join(measure_servers(moves, warm, (each,))), flush=True)
