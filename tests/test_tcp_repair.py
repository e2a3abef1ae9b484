"""hijack.sys.tcp_repair on connections of the test's own, over loopback: a send queue the
peer's window holds back is made again with its never-sent bytes sent as writes are, not
put back as sent (which had the peer get them only by retransmission, and the congestion
control count them all in flight at once: a connection made so could crawl under BBR)."""

from __future__ import annotations

import contextlib
import select
import socket
import struct
from collections.abc import Iterator

from hijack.sys import tcp_repair

TCPI_UNACKED_AT = 24  # struct tcp_info: 8 bytes of u8s, then rto, ato, snd_mss, rcv_mss
WRITTEN = 8 << 20


def pattern(start: int, length: int) -> bytes:
    """Bytes start..start+length of the stream: each position's byte told from its index."""
    return bytes((i * 7 + i // 251) & 0xFF for i in range(start, start + length))


@contextlib.contextmanager
def held_back() -> Iterator[tuple[socket.socket, socket.socket, int]]:
    """(client, server, bytes written): the client wrote up to WRITTEN bytes the server
    reads none of, so most wait in the client's send queue, never sent (the server's
    window is full)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    with client, server:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, WRITTEN)
        client.setblocking(False)
        data, sent = pattern(0, WRITTEN), 0
        while sent < WRITTEN:
            try:
                sent += client.send(data[sent:])
            except BlockingIOError:
                if not select.select([], [client], [], 1.0)[1]:
                    break  # the buffer is full
        assert sent > 4 << 20, sent
        client.setblocking(True)
        yield client, server, sent


def unacked_packets(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    found: int = struct.unpack_from("<I", info, TCPI_UNACKED_AT)[0]
    return found


def test_a_connection_made_again_sends_what_it_never_sent_as_writes_are() -> None:
    with held_back() as (client, server, sent):
        tcp_repair.set_repair(client.fileno(), True)
        state = tcp_repair.read_state(client.fileno())
        written = len(state.send_queue)
        # Most never left: the server's window holds back all but ~128 KiB.
        assert written > state.unsent > written // 2, (written, state.unsent)
        ends = client.getsockname(), client.getpeername()
        client.close()  # in repair mode: it sends nothing, the server's end lives on
        made = socket.socket(fileno=tcp_repair.make_connection(socket.AF_INET, *ends, state))
        with made:
            # In flight: what had been sent, not the whole queue.
            mss = made.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
            assert unacked_packets(made) * mss <= written - state.unsent + 2 * mss
            # The server gets every byte, once, in order.
            received = bytearray()
            server.settimeout(10)
            while len(received) < sent:
                chunk = server.recv(1 << 20)
                assert chunk, f"the stream ended after {len(received)} of {sent} bytes"
                received += chunk
            assert received == pattern(0, sent)
