"""Property tests of everything hijack parses from outside: CRF images and the node protocol.

They drive the functions of tests/fuzz/targets.py, the same ones the atheris
harness (tests/fuzz/run.py, `make fuzz`) runs coverage-guided: whatever the
input, each ends in a HijackError (or an accepted input), never another
exception, a hang (every read is bounded) or a daemon thread left behind.
Inputs are built to get past the first check: mutations of a real image, of
a real TLS ClientHello and a real daemon's first flight, of real certificate
files, of a real move request; frames sent inside a real TLS session.
"""

from __future__ import annotations

import base64
import contextlib
import json
import ssl
import struct
from pathlib import Path

import pytest
from fuzz import targets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hijack.errors import HijackError
from hijack.image import FORMAT_VERSION
from hijack.node import daemon as node_daemon
from hijack.node import pki
from hijack.node.channel import HEAD, MAX_FRAME, Channel, Kind

CORPUS = Path(__file__).resolve().parent / "corpus" / "crf"
# A valid image, rebuilt from a corpus file that only has bytes after its END.
VALID_IMAGE = (CORPUS / "data-after-end.crf").read_bytes()[:-1]

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_valid_image_is_valid() -> None:
    targets.crf_reader(VALID_IMAGE)  # no refusal: the mutations below start from a real image


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """`original` with a few bits flipped, pieces cut or inserted, or u32s made extreme."""
    image = bytearray(original)
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "u32"]))
        at = draw(st.integers(0, len(image) - 1))
        if action == "flip":
            image[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "cut":
            del image[at : at + draw(st.integers(1, 4096))]
        elif action == "insert":
            image[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif at + 4 <= len(image):
            image[at : at + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, 2**31, 2**32 - 1])))
        if not image:
            break
    return bytes(image)


def mutated_images() -> st.SearchStrategy[bytes]:
    return mutated(VALID_IMAGE)


@FUZZ
@given(mutated_images())
def test_crf_reader_refuses_a_mutated_real_image_cleanly(data: bytes) -> None:
    targets.crf_reader(data)


@FUZZ
@given(st.binary(max_size=2048))
def test_crf_reader_refuses_random_bytes_cleanly(data: bytes) -> None:
    # This version's signature: the bytes after it meet the section reader.
    targets.crf_reader(b"CRF\0" + FORMAT_VERSION.to_bytes(4, "little") + data)


CLIENT_HELLO, DAEMON_FLIGHT = b"", b""


def flights() -> tuple[bytes, bytes]:
    global CLIENT_HELLO, DAEMON_FLIGHT
    if not CLIENT_HELLO:
        mover_in, mover_out, daemon_in, daemon_out = (ssl.MemoryBIO() for _ in range(4))
        mover = targets.identity("mover").client_context().wrap_bio(mover_in, mover_out)
        with contextlib.suppress(ssl.SSLWantReadError):
            mover.do_handshake()
        CLIENT_HELLO = mover_out.read()
        daemon = (
            targets.identity("daemon")
            .server_context()
            .wrap_bio(daemon_in, daemon_out, server_side=True)
        )
        daemon_in.write(CLIENT_HELLO)
        with contextlib.suppress(ssl.SSLWantReadError):
            daemon.do_handshake()
        DAEMON_FLIGHT = daemon_out.read()
    return CLIENT_HELLO, DAEMON_FLIGHT


def handshakes(side: int) -> st.SearchStrategy[bytes]:
    """A side of the TLS handshake (0: the client's, 1: the daemon's): a real one mutated,
    TLS records with any content, or bytes of no protocol (protocol 1's JSON hello)."""
    record = st.tuples(
        st.sampled_from([20, 21, 22, 23, 0, 255]), st.binary(max_size=300), st.booleans()
    ).map(lambda t: bytes([t[0], 3, 3]) + struct.pack("!H", len(t[1]) if t[2] else 65535) + t[1])
    hello = json.dumps({"hello": 1, "node": "old", "nonce": "00" * 32}).encode()
    return (
        st.deferred(lambda: mutated(flights()[side]))
        | st.lists(record, max_size=3).map(b"".join)
        | st.just(HEAD.pack(0, len(hello)) + hello)
        | st.binary(max_size=300)
    )


@FUZZ
@given(handshakes(0))
def test_a_daemon_refuses_any_handshake_without_a_certificate(data: bytes) -> None:
    targets.node_handshake(data)


@FUZZ
@given(handshakes(1))
def test_a_mover_refuses_any_daemon_answer_without_a_certificate(data: bytes) -> None:
    targets.node_client(data)


def certificate_files() -> st.SearchStrategy[bytes]:
    """node_certificate input: which file (first byte), then its bytes: the real file mutated,
    PEM around random DER, or anything."""
    directory = targets.certificates()

    @st.composite
    def one(draw: st.DrawFn) -> bytes:
        which = draw(st.integers(0, len(targets.CERTIFICATE_FILES) - 1))
        original = (directory / targets.CERTIFICATE_FILES[which]).read_bytes()
        body = draw(
            mutated(original)
            | st.binary(max_size=400).map(
                lambda der: (
                    b"-----BEGIN CERTIFICATE-----\n"
                    + base64.encodebytes(der)
                    + b"-----END CERTIFICATE-----\n"
                )
            )
            | st.binary(max_size=400)
        )
        return bytes([which]) + body

    return one()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(certificate_files())
def test_any_damaged_certificate_file_is_one_hijack_error(data: bytes) -> None:
    targets.node_certificate(data)


def real_certificate() -> bytes:
    _, pem = pki.node_paths(targets.certificates(), "mover")
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


@FUZZ
@given(st.deferred(lambda: mutated(real_certificate())) | st.binary(max_size=600))
def test_the_names_of_any_certificate_are_read_or_refused_cleanly(der: bytes) -> None:
    targets.node_certificate(b"\xff" + der)  # and as node mover's key file


def test_the_names_of_a_node_certificate() -> None:
    names = pki.certificate_names(real_certificate())
    assert names == pki.CertificateNames("mover", frozenset({"mover", "127.0.0.1"}))


def move_requests() -> st.SearchStrategy[dict[str, object]]:
    """Move requests, most of them almost right."""
    anything = (
        st.none() | st.integers() | st.text(max_size=20) | st.lists(st.integers(), max_size=2)
    )
    home = st.fixed_dictionaries(
        {
            "node": st.just("a") | anything,
            "pid": st.just(1) | anything,
            "relay": st.just("127.0.0.1:1") | anything,
            "token": st.just("00ff") | anything,
        }
    )
    proxy = st.fixed_dictionaries(
        {"fd": st.integers(-1, 2**40) | anything, "stream": st.text(max_size=10) | anything},
        optional={"kind": st.sampled_from(["stream", "listener"]) | anything},
    )
    return st.fixed_dictionaries(
        {"op": st.just("move"), "move": st.just("m1") | anything, "home": home | anything},
        optional={"proxies": st.lists(proxy, max_size=2) | anything, "program": anything},
    )


def framed(frames: list[tuple[int, bytes]]) -> bytes:
    """node_session input: frames the target sends inside its TLS session."""
    return b"\x01" + b"".join(struct.pack("<BH", kind, len(p)) + p for kind, p in frames)


@st.composite
def sessions(draw: st.DrawFn) -> bytes:
    if draw(st.booleans()):
        return b"\x00" + draw(st.binary(max_size=200))  # raw bytes, read as frames
    request = draw(move_requests() | st.dictionaries(st.text(max_size=5), st.integers()))
    frames = [(Kind.MESSAGE, json.dumps(request).encode())]
    image = draw(mutated_images().map(lambda image: image[:8192]) | st.binary(max_size=512))
    frames += [(Kind.DATA, image[at : at + 4096]) for at in range(0, len(image), 4096)]
    frames += draw(st.lists(st.tuples(st.integers(0, 6), st.binary(max_size=64)), max_size=3))
    if draw(st.booleans()):
        frames.append((Kind.DATA_END, b""))
    return framed(frames)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sessions())
def test_a_daemon_refuses_any_session_of_a_cluster_node_cleanly(data: bytes) -> None:
    targets.node_session(data)


@pytest.mark.parametrize(
    "request_",
    [
        {"op": "move"},
        {"op": "move", "move": 1, "home": {}},
        {"op": "move", "move": "m", "home": {"node": "a", "pid": "x", "relay": "r", "token": ""}},
        {"op": "move", "move": "m", "home": {"node": "a", "pid": 1, "relay": "r", "token": "zz"}},
        {"op": "move", "move": "m", "home": [], "proxies": []},
        {
            "op": "move",
            "move": "m",
            "home": {"node": "a", "pid": 1, "relay": "r", "token": "00"},
            "proxies": [{"fd": 2**40, "stream": "s"}],
        },
        {
            "op": "move",
            "move": "m",
            "home": {"node": "a", "pid": 1, "relay": "r", "token": "00"},
            "proxies": "all",
        },
    ],
)
def test_a_malformed_move_request_is_one_hijack_error(request_: dict[str, object]) -> None:
    with pytest.raises(HijackError, match="malformed move request"):
        node_daemon._parse_move(request_)


@pytest.mark.parametrize("depth", [999, 2000])
def test_json_nested_deeper_than_python_recurses_is_a_malformed_message(depth: int) -> None:
    # Found by fuzzing: json.loads raised RecursionError, which ended the daemon's thread.
    targets.node_session(framed([(Kind.MESSAGE, b'{"a":' * depth + b"1" + b"}" * depth)]))


def test_a_frame_longer_than_the_limit_is_refused_before_it_is_read() -> None:
    # The length alone refuses it, so nothing is allocated.
    data = b"\x00" + struct.pack("<BI", Kind.MESSAGE, MAX_FRAME + 1)
    targets.node_session(data)


def test_an_error_from_a_peer_is_one_line() -> None:
    client, daemon_end = targets._tcp_pair()
    with client, daemon_end:
        mover = Channel(client, "b")  # type: ignore[arg-type]  # plain TCP will do here
        daemon = Channel(daemon_end, "a")  # type: ignore[arg-type]
        daemon.send({"error": "first line\nsecond line\r\n" + "x" * 5000})
        with pytest.raises(HijackError) as refused:
            mover.expect("phase")
    message = str(refused.value)
    assert message.startswith("b: first line second line xxx") and "\n" not in message
    assert len(message) <= 1003
