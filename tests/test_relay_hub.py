"""The home shadow's RelayHub run in this process, between real loopback connections: one
standing for the original (the test reads its peer's end) and one for the relay (the
test writes the process's end), its native pump as the shadow runs it."""

from __future__ import annotations

import contextlib
import selectors
import socket
import time
from collections.abc import Iterator

from test_relay_forwarder import STREAM, pattern

from hijack.shadow.relay import RelayHub, Stream

TIMEOUT = 30.0


def tcp_pair(small: bool = False) -> tuple[socket.socket, socket.socket]:
    """(client, accepted) over loopback; `small`: the client takes little at a time."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if small:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.connect(listener.getsockname())
        accepted, _ = listener.accept()
    return client, accepted


class Hub:
    """A hub relaying one stream: the original's peer and the process's end are ours."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.log: list[str] = []
        self.hub = RelayHub(self.selector, self.log.append)
        self.peer, original = tcp_pair(small=True)  # the peer does not read for a while
        original.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.hub.adopt(5, original.detach(), False)
        self.process_end, relay = tcp_pair()
        self.process_end.setblocking(False)
        self.hub.attach_relay(STREAM, "m1", relay)
        self.hub.migrated("m1", "n", {}, {}, set())
        self.written = 0

    @property
    def stream(self) -> Stream:
        return self.hub.streams[STREAM]

    def turn(self) -> None:
        for key, events in self.selector.select(0.005):
            key.data(key.fileobj, events)

    def write(self, size: int) -> None:
        """The process writes `size` more bytes of the pattern, the hub relaying them."""
        data = pattern(self.written, size)
        deadline = time.monotonic() + TIMEOUT
        while data:
            assert time.monotonic() < deadline, f"the hub took {self.written} bytes only"
            with contextlib.suppress(BlockingIOError):
                sent = self.process_end.send(data)
                data = data[sent:]
                self.written += sent
            self.turn()

    def close(self) -> None:
        self.hub.close_pump()
        for stream in list(self.hub.streams.values()):
            self.hub._close(stream, reset=True)
        self.selector.close()
        self.peer.close()
        self.process_end.close()


@contextlib.contextmanager
def relaying() -> Iterator[Hub]:
    hub = Hub()
    try:
        yield hub
    finally:
        hub.close()


def test_a_swap_keeps_what_the_process_sent_its_peer_in_order() -> None:
    """When a swap takes a stream off its relay, bytes the process sent may wait in the
    kernel pipe towards the original (its peer reads slowly); what the process sends
    after them must reach the peer after them (it overtook them once: an echo stream
    swapped mid-way got a byte out of place, tests/test_swap.py's tree test)."""
    with relaying() as relayed:
        deadline = time.monotonic() + TIMEOUT
        while not (relayed.stream.in_pipe and relayed.stream.in_held):
            # Until the original's socket is full and bytes wait in the hub (a pipe).
            assert time.monotonic() < deadline, relayed.log
            relayed.write(64 << 10)
            for _ in range(20):
                relayed.turn()
            relayed.hub._reclaim()  # the pump's count of what its pipes hold
        held_before = relayed.stream.in_held
        relayed.hub.swap_write(STREAM, "swap-1")
        assert relayed.stream.in_held == held_before  # nothing lost by the switch
        relayed.write(256 << 10)
        received = bytearray()
        relayed.peer.setblocking(False)
        deadline = time.monotonic() + TIMEOUT
        while len(received) < relayed.written:
            assert time.monotonic() < deadline, (len(received), relayed.written, relayed.log)
            with contextlib.suppress(BlockingIOError):
                received += relayed.peer.recv(1 << 20)
            relayed.turn()
        assert len(received) == relayed.written
        expected = pattern(0, len(received))
        mismatch = next((i for i in range(len(received)) if received[i] != expected[i]), None)
        assert mismatch is None, f"byte {mismatch} of {len(received)} out of place"
