"""What TLS 1.3 between nodes costs, on loopback, beside plain TCP in the same run:
the mutual handshake with cluster certificates (hijack/node/pki.py), and the
throughput of one stream encrypted and plain (the figure `--plain-relays` trades)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

from hijack.node import pki

CHUNK = 1 << 16


def _pair(
    server: ssl.SSLContext | None, client: ssl.SSLContext | None
) -> tuple[socket.socket, socket.socket, float]:
    """A connected loopback pair, wrapped when contexts are given; and the setup time."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        accepted: list[socket.socket] = []
        started = time.perf_counter()
        outgoing = socket.create_connection(listener.getsockname())

        def accept() -> None:
            conn, _ = listener.accept()
            if server is not None:
                conn = pki.handshake(conn, server, server=True, deadline=10)
            accepted.append(conn)

        thread = threading.Thread(target=accept)
        thread.start()
        if client is not None:
            outgoing = pki.handshake(outgoing, client, server=False, deadline=10)
        thread.join()
        return accepted[0], outgoing, time.perf_counter() - started


def _throughput(receiver: socket.socket, sender: socket.socket, size: int) -> float:
    """Bytes per second of SIZE bytes from sender to receiver."""
    block = b"\x5a" * CHUNK

    def drain() -> None:
        left = size
        while left > 0:
            got = receiver.recv(min(CHUNK, left))
            if not got:
                return
            left -= len(got)

    thread = threading.Thread(target=drain)
    started = time.perf_counter()
    thread.start()
    for _ in range(size // CHUNK):
        sender.sendall(block)
    thread.join()
    return size / (time.perf_counter() - started)


def measure_tls(directory: Path, size: int) -> list[str]:
    pki.init_ca(directory)
    pki.add_node(directory, "a")
    pki.add_node(directory, "b")
    server, client = pki.server_context(directory, "a"), pki.client_context(directory, "b")
    lines = []
    figures = {}
    for label, contexts in (("plain TCP", (None, None)), ("TLS 1.3", (server, client))):
        receiver, sender, setup = _pair(*contexts)
        with receiver, sender:
            figures[label] = (_throughput(receiver, sender, size), setup)
    plain, _ = figures["plain TCP"]
    for label, (rate, setup) in figures.items():
        lines.append(
            f"node stream, {label}: {rate / (1 << 20):.0f} MiB/s ({rate / plain:.2f}x plain),"
            f" connect+handshake {setup * 1000:.2f} ms"
        )
    return lines
