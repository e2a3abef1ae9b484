"""The home shadow's own TLS 1.3 record layer, for an encrypted relay past its handshake.

OpenSSL (Python's ssl) does every handshake of the shadow's endpoint
(hijack.shadow.relay_link). An encrypted relay then carries the stream's
bytes for as long as it lives, and there OpenSSL through memory BIOs costs
the shadow a copy in and out of each BIO and its bookkeeping per call, and,
above all, keeps the connection's keys where nothing else can reach them:
the native pump (hijack/native/relay_pump.c) could not take such a stream.
So once the exchange is over, the shadow carries the relay's records itself
(RFC 8446, section 5.2):

- the traffic secrets come from OpenSSL's key log (SSLContext.keylog_filename
  pointed at a memfd: KeyLog; nothing on disk), found by the connection's
  ClientHello random;
- key and iv of each direction by HKDF-Expand-Label (section 7.1, 7.3);
- a record: its 5-byte header (application_data, 0x0303, length) is the AAD,
  the nonce is the iv XOR the record's number (section 5.3), the plaintext
  ends with its inner content type (23 for data), sealed by AES-GCM
  (cryptography's AESGCM; the two AES-GCM suites only: another one, such as
  ChaCha20-Poly1305, stays on OpenSSL).

From the other end (the node's forwarder, still OpenSSL) nothing changed:
the records follow on from the ones OpenSSL made and read, numbered on. What
OpenSSL could still send after a handshake is handled: an alert (close_notify
is the end, any other a failure), a KeyUpdate (section 4.6.3: the next key,
and ours too if asked), a NewSessionTicket (ignored: no session is resumed).
A record that does not open (tampered, out of step) is a failure, never data.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import os
import ssl
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

# The shadow carries its relays' records itself: on unless HIJACK_OWN_RECORDS=0 (OpenSSL
# then carries them all along, through its memory BIOs).
OWN_RECORDS = os.environ.get("HIJACK_OWN_RECORDS", "1") != "0"
HEADER = 5
APPLICATION_DATA, ALERT, HANDSHAKE = 23, 21, 22
MAX_PLAINTEXT = 1 << 14
TAG = 16
MAX_CIPHERTEXT = MAX_PLAINTEXT + 256  # section 5.2
KEY_UPDATE, NEW_SESSION_TICKET = 24, 4
CLOSE_NOTIFY = 0
LEGACY_VERSION = b"\x03\x03"
IV_SIZE = 12
# Suite -> (hash, key size): the suites this layer carries; any other stays on OpenSSL.
SUITES = {
    "TLS_AES_128_GCM_SHA256": ("sha256", 16),
    "TLS_AES_256_GCM_SHA384": ("sha384", 32),
}
CLIENT_SECRET, SERVER_SECRET = "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0"
# Secrets read from the key log and not asked for yet (every connection's, relays or not):
# past this many they are forgotten (a relay whose secrets went stays on OpenSSL).
KEPT_SECRETS = 512


class RecordError(ssl.SSLError):
    """A record that cannot be taken (it does not open, it is malformed, an alert)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def hkdf_expand_label(
    secret: bytes, label: str, context: bytes, length: int, hash_name: str
) -> bytes:
    """HKDF-Expand-Label (RFC 8446, section 7.1)."""
    full = b"tls13 " + label.encode()
    info = struct.pack(">HB", length, len(full)) + full + bytes([len(context)]) + context
    output, block, counter = b"", b"", 1
    while len(output) < length:
        block = hmac.digest(secret, block + info + bytes([counter]), hash_name)
        output += block
        counter += 1
    return output[:length]


@dataclass
class Direction:
    """One direction's protection: its secret, key, iv and the next record's number."""

    suite: str
    secret: bytes
    sequence: int = 0

    def __post_init__(self) -> None:
        self._derive()

    def _derive(self) -> None:
        hash_name, key_size = SUITES[self.suite]
        self.key = hkdf_expand_label(self.secret, "key", b"", key_size, hash_name)
        self.iv = hkdf_expand_label(self.secret, "iv", b"", IV_SIZE, hash_name)
        self._iv = int.from_bytes(self.iv, "big")
        self.aead = AESGCM(self.key)

    def update(self) -> None:
        """The next traffic secret (KeyUpdate, section 7.2): numbers start again at 0."""
        hash_name, _ = SUITES[self.suite]
        size = hashlib.new(hash_name).digest_size
        self.secret = hkdf_expand_label(self.secret, "traffic upd", b"", size, hash_name)
        self.sequence = 0
        self._derive()

    def nonce(self) -> bytes:
        return (self._iv ^ self.sequence).to_bytes(IV_SIZE, "big")


class RecordLayer:
    """Both directions of one connection: records sealed and opened here.

    `open` takes raw bytes as they come (any cut: a partial record waits in
    `partial`) and gives the plaintext of the whole records among them.
    """

    def __init__(self, reading: Direction, writing: Direction) -> None:
        self.reading = reading
        self.writing = writing
        self.partial = bytearray()  # raw bytes of a record not complete yet
        self.closed = False  # close_notify came: nothing after it is taken
        self.replies = bytearray()  # records we owe the peer (a KeyUpdate it asked for)

    def seal(
        self, data: bytes | bytearray | memoryview, content_type: int = APPLICATION_DATA
    ) -> bytes:
        """`data` as records (MAX_PLAINTEXT each at most), ready to send."""
        records = []
        with memoryview(data) as view:
            for start in range(0, len(view), MAX_PLAINTEXT):
                records.append(self._seal_one(view[start : start + MAX_PLAINTEXT], content_type))
        return records[0] if len(records) == 1 else b"".join(records)

    def _seal_one(self, piece: memoryview, content_type: int) -> bytes:
        inner = bytes(piece) + bytes([content_type])
        header = bytes([APPLICATION_DATA]) + LEGACY_VERSION + struct.pack(">H", len(inner) + TAG)
        sealed = self.writing.aead.encrypt(self.writing.nonce(), inner, header)
        self.writing.sequence += 1
        return header + sealed

    def open(self, raw: bytes | bytearray | memoryview) -> bytes:
        """The plaintext of the records `raw` completes (b"" if none); RecordError if one
        does not open or is not one to take. After close_notify (`closed`) nothing is."""
        if self.closed:
            return b""
        if self.partial:
            self.partial += raw
            data: bytes | bytearray | memoryview = self.partial
        else:
            data = raw  # the usual case: no copy of what came before it is opened
        pieces: list[bytes] = []
        start = 0
        with memoryview(data) as view:
            while len(view) - start >= HEADER:
                if view[start] != APPLICATION_DATA or view[start + 1 : start + 3] != LEGACY_VERSION:
                    raise RecordError("not a TLS 1.3 record")
                length = int.from_bytes(view[start + 3 : start + 5], "big")
                if length > MAX_CIPHERTEXT or length <= TAG:
                    raise RecordError("record overflow")
                end = start + HEADER + length
                if len(view) < end:
                    break
                plain = self._open_one(view[start : start + HEADER], view[start + HEADER : end])
                start = end
                if plain:
                    pieces.append(plain)
                if self.closed:
                    start = len(view)  # nothing after the end is the peer's data
                    break
            rest = bytes(view[start:])
        self.partial = bytearray(rest)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _open_one(self, header: memoryview, body: memoryview) -> bytes:
        try:
            # As bytes: the shadow of an unprivileged user's process runs the system's
            # Python (hijack.mutator.attach.shadow_interpreter), whose cryptography may be
            # one that takes nothing else (Debian 12's 38.0: "data must be bytes").
            inner = self.reading.aead.decrypt(self.reading.nonce(), bytes(body), bytes(header))
        except InvalidTag:  # tampered, or numbers out of step
            raise RecordError("bad record mac") from None
        self.reading.sequence += 1
        end = len(inner)
        while end and inner[end - 1] == 0:  # padding (section 5.4)
            end -= 1
        if not end:
            raise RecordError("a record with no content type")
        content_type = inner[end - 1]
        if content_type == APPLICATION_DATA:
            return inner[: end - 1]
        if content_type == ALERT:
            if end - 1 == 2 and inner[1] == CLOSE_NOTIFY:
                self.closed = True
                return b""
            raise RecordError(f"alert {inner[1] if end > 2 else '?'} from the peer")
        if content_type == HANDSHAKE:
            self._handshake(inner[: end - 1])
            return b""
        raise RecordError(f"a record of content type {content_type} after the handshake")

    def _handshake(self, messages: bytes) -> None:
        """Post-handshake messages: KeyUpdate, NewSessionTicket (one record holds whole ones:
        OpenSSL never splits these)."""
        start = 0
        while start < len(messages):
            if len(messages) - start < 4:
                raise RecordError("a handshake message cut short")
            kind = messages[start]
            length = int.from_bytes(messages[start + 1 : start + 4], "big")
            body = messages[start + 4 : start + 4 + length]
            if len(body) != length:
                raise RecordError("a handshake message cut short")
            start += 4 + length
            if kind == KEY_UPDATE and length == 1 and body[0] in (0, 1):
                self.reading.update()
                if body[0] == 1:  # update_requested: ours follows, under the old key
                    self.replies += self.seal(bytes([KEY_UPDATE, 0, 0, 1, 0]), HANDSHAKE)
                    self.writing.update()
            elif kind != NEW_SESSION_TICKET:
                raise RecordError(f"handshake message {kind} after the handshake")


class KeyLog:
    """OpenSSL's key log for one SSLContext, in a memfd (no file on disk).

    `attach(context)` points the context's keylog_filename at it; `secrets(random)`
    finds the two application traffic secrets of the connection whose ClientHello
    random is `random`, and forgets them (a key log is read once)."""

    def __init__(self) -> None:
        self.fd = os.memfd_create("hijack-keylog", os.MFD_CLOEXEC)
        self._lines: dict[tuple[str, str], bytes] = {}
        self._read_to = 0  # the offset of the first line not read yet

    def attach(self, context: ssl.SSLContext) -> None:
        context.keylog_filename = f"/proc/self/fd/{self.fd}"

    def secrets(self, client_random: bytes) -> tuple[bytes, bytes] | None:
        """(client's, server's) traffic secrets of that connection, or None if not logged."""
        self._read()
        wanted = client_random.hex()
        client = self._lines.pop((CLIENT_SECRET, wanted), None)
        server = self._lines.pop((SERVER_SECRET, wanted), None)
        if client is None or server is None:
            return None
        return client, server

    def _read(self) -> None:
        size = os.fstat(self.fd).st_size
        if size <= self._read_to:
            return
        data = os.pread(self.fd, size - self._read_to, self._read_to)
        complete = data.rfind(b"\n") + 1
        for line in data[:complete].split(b"\n"):
            words = line.decode("ascii", "replace").split()
            if len(words) == 3 and words[0] in (CLIENT_SECRET, SERVER_SECRET):
                self._lines[(words[0], words[1].lower())] = bytes.fromhex(words[2])
        self._read_to += complete
        # What was read is let go as a hole, not cut off: OpenSSL appends (the file is open
        # O_APPEND) from whichever thread makes a handshake (the forwarder's run side by
        # side), and a line written between our read and a cut would be lost.
        _punch_hole(self.fd, self._read_to)
        if len(self._lines) > KEPT_SECRETS:  # of connections that never asked (not relays)
            self._lines.clear()

    def close(self) -> None:
        os.close(self.fd)


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def _punch_hole(fd: int, length: int) -> None:
    """Free the first `length` bytes of file `fd` (a memfd), its size and offsets as they are.
    If the kernel refuses, they stay (memory, not a failure: nothing reads them again)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, length)


def client_random(client_hello: bytes) -> bytes:
    """The random of a ClientHello record (header, handshake header, version, random)."""
    if len(client_hello) < HEADER + 4 + 2 + 32 or client_hello[HEADER] != 1:
        return b""
    return bytes(client_hello[HEADER + 6 : HEADER + 38])
