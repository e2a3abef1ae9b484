"""The home shadow's RelayHub run in this process, between real loopback connections: one
standing for the original (the test reads its peer's end) and one for the relay (the
test writes the process's end), its native pump as the shadow runs it."""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import time
from collections.abc import Iterator

from test_relay_forwarder import STREAM, pattern

from hijack.shadow.pump import pipe_held
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

    def __init__(self, slow_process: bool = False) -> None:
        """`slow_process`: the process's end takes little at a time (a relay that fills)."""
        self.selector = selectors.DefaultSelector()
        self.log: list[str] = []
        self.hub = RelayHub(self.selector, self.log.append)
        self.peer, original = tcp_pair(small=True)  # the peer does not read for a while
        original.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.hub.adopt(5, original.detach(), False)
        self.process_end, relay = tcp_pair(small=slow_process)
        if slow_process:
            relay.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
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
def relaying(slow_process: bool = False) -> Iterator[Hub]:
    hub = Hub(slow_process)
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


def test_an_event_for_a_stream_the_pump_took_in_the_same_batch_is_ignored() -> None:
    """One select() batch can hold two events of a stream: the first one's pumping empties
    its heads and hands the stream to the native pump, the second would then read the
    original (or splice a pipe) behind the pump's back. Bytes it left in the outward pipe
    (the relay full) were not in the pump's count: later bytes overtook them, and some
    never left (a moved echo stream got a byte out of place after an undone swap,
    test_swap.py; a swap found the inward pipe holding less than counted, refused with
    EAGAIN). The pump is held stopped while the second event runs (only the hub could
    read), and the process's end takes little at a time (the relay fills)."""
    with relaying(slow_process=True) as relayed:
        relayed.write(4 << 10)
        stream = relayed.stream
        deadline = time.monotonic() + TIMEOUT
        while not stream.native:
            assert time.monotonic() < deadline, relayed.log
            relayed.turn()
        pump = relayed.hub.pump
        assert pump is not None
        sent = pattern(0, 2 << 20)
        os.kill(pump.process.pid, signal.SIGSTOP)
        try:
            relayed.peer.sendall(sent[: 256 << 10])  # the original is readable now
            readable = selectors.EVENT_READ | selectors.EVENT_WRITE
            relayed.hub._on_event(stream, "original", stream.original, readable)
        finally:
            os.kill(pump.process.pid, signal.SIGCONT)
        relayed.peer.setblocking(False)
        received, offered = bytearray(), 256 << 10
        deadline = time.monotonic() + TIMEOUT
        while len(received) < len(sent):
            assert time.monotonic() < deadline, (len(received), relayed.log)
            with contextlib.suppress(BlockingIOError):
                offered += relayed.peer.send(sent[offered : offered + (64 << 10)])
            with contextlib.suppress(BlockingIOError):
                received += relayed.process_end.recv(1 << 20)
            relayed.turn()
        first_wrong = next((i for i, b in enumerate(received) if b != sent[i]), None)
        assert first_wrong is None, f"byte {first_wrong} of {len(sent)} out of place"
        relayed.hub._reclaim()
        for pipe in (stream.out_pipe, stream.in_pipe):
            assert pipe is not None and pipe.held == pipe_held(pipe.read_end)
