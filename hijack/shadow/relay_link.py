"""The connection between a node and a migrant's home shadow: TLS 1.3, then plain or not.

Every connection to the shadow's TCP endpoint (docs/protocol.md, "The
shadow's TCP endpoint") starts with a TLS 1.3 handshake:

- the shadow presents a certificate of its own, made when it first listens
  (ShadowIdentity: a fresh key that never leaves it); the node knows it by its
  SHA-256 fingerprint, which travelled with the migrant's token inside the
  node channel, and refuses any other;
- the node presents its cluster certificate (hijack.node.pki); the shadow
  checks it chains to the cluster's CA and is not on the revocation list (both
  handed to it by the mover, which reads them as root): a machine that is not
  in the cluster is refused before it can say anything;
- inside TLS, the node then proves it holds the migrant's token (HMAC over the
  shadow's fresh nonce): the token itself never travels.

Then a relay either stays inside TLS (encrypted, between different nodes) or,
with `plain`, both sides leave TLS at the same byte and carry raw bytes (the
splice path, as fast as a relay can be). Reading records one at a time (their
length is in their header) during this exchange is what lets both sides know
that byte: nothing beyond the last TLS record is ever read into OpenSSL.

A TlsLink is the streaming side (non-blocking) over the raw socket: OpenSSL
through memory BIOs, so that what is queued, sent and acknowledged stays
visible (hijack.shadow.relay waits on it during a move).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import hmac
import json
import os
import secrets
import selectors
import socket
import ssl
import struct
import termios
import time
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from hijack.errors import ShadowError
from hijack.shadow import tls_records

CHUNK = 256 * 1024
# Freed memory malloc keeps for the next buffers of a relaying process (hijack.sys.libc.
# keep_freed_memory): a few CHUNKs in flight each way, plaintext and ciphertext.
RELAY_HEAP = 4 * 1024 * 1024
RECORD_HEADER = 5
MAX_RECORD = (1 << 14) + 256  # the longest TLS 1.3 ciphertext record
RECORD_TYPES = (20, 21, 22, 23)  # change_cipher_spec, alert, handshake, application_data
RELAY_ACCEPTED = b"RLY1"
NONCE = 16
_LENGTH = struct.Struct("<I")
# A `migrated` request carries the unread bytes of every stream (base64): up to a
# socket receive buffer each. Only a peer that proved the token gets this far.
HEADER_LIMIT = 256 << 20
SHADOW_CERT_DAYS = 3650  # its key lives as long as the shadow; the node pins it, not its dates
ENCRYPTED, PLAIN = "tls", "plain"


class PeerClosed(ShadowError):
    """The peer closed its connection before its header (a node's link made ahead of a
    request it did not need: HomeShadow.prove_links)."""


class ShadowIdentity:
    """The shadow's own key and self-signed certificate, made once, in memory."""

    def __init__(self) -> None:
        # Here, not at the top: a shadow that never sees a move, and every mover,
        # do without loading the package.
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hijack home shadow")])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=SHADOW_CERT_DAYS))
            .sign(key, hashes.SHA256())
        )
        self.fingerprint = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
        self._chain = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.context: ssl.SSLContext | None = None
        # The traffic secrets of its connections (an encrypted relay carries its records
        # itself past the exchange: TlsLink.own_records).
        self.keylog = tls_records.KeyLog()

    def trust(self, cluster: str) -> None:
        """Accept the nodes whose certificates `cluster` (the CA's certificate and revocation
        list, PEM) vouches for; made again with each new list a mover hands us."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.verify_mode = ssl.CERT_REQUIRED
        context.num_tickets = 0  # nothing after the handshake: the plain switch is exact
        try:
            with _in_memory(self._chain) as chain:
                context.load_cert_chain(chain)
            with _in_memory(cluster.encode()) as cafile:
                context.load_verify_locations(cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ShadowError(f"cannot use the cluster's CA for relays: {exc}") from None
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_STRICT
        self.keylog.attach(context)
        self.context = context


@contextlib.contextmanager
def _in_memory(data: bytes) -> Iterator[str]:
    """A path OpenSSL can load `data` from, backed by no file on disk (a memfd)."""
    fd = os.memfd_create("hijack-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def cluster_trust(directory: Path) -> str:
    """What a shadow needs to check nodes: the CA's certificate and revocation list (PEM)."""
    try:
        return (directory / "ca.crt").read_text() + (directory / "revoked.crl").read_text()
    except OSError as exc:
        raise ShadowError(
            f"no cluster CA to hand the home shadow ({exc.filename}: {exc.strerror});"
            " relays need the cluster's certificates (`hijack cluster init`, `add-node`)"
        ) from None


# The traffic secrets of this node's connections to shadows, where they are kept (the node's
# forwarder: keep_node_secrets); its relays then carry their records themselves.
NODE_SECRETS: tls_records.KeyLog | None = None


def keep_node_secrets() -> tls_records.KeyLog:
    """Log the traffic secrets of this process's node contexts from here (a memfd): the
    forwarder's, which hands its relays to the native pump (TlsLink.own_records)."""
    global NODE_SECRETS
    if NODE_SECRETS is None:
        NODE_SECRETS = tls_records.KeyLog()
        _node_context.cache_clear()
    return NODE_SECRETS


@lru_cache(maxsize=4)
def _node_context(directory: Path, name: str, stamp: float) -> ssl.SSLContext:
    from hijack.node import pki  # the node side only: a shadow never reads node keys

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    # The shadow's certificate is its own, self-signed: it is pinned by its
    # fingerprint (relay_cert) after the handshake, not checked against a CA.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    key_path, cert_path = pki.node_paths(directory, name)
    try:
        context.load_cert_chain(cert_path, key_path)
    except (OSError, ssl.SSLError) as exc:
        raise ShadowError(
            f"cannot load node {name}'s certificate from {directory} for relays: {exc}"
        ) from None
    if NODE_SECRETS is not None:
        NODE_SECRETS.attach(context)
    return context


def node_context() -> ssl.SSLContext:
    """This node's client context towards home shadows (its cluster certificate)."""
    from hijack.node import pki
    from hijack.registry import node_name

    directory, name = pki.pki_dir(), node_name()
    _, cert_path = pki.node_paths(directory, name)
    try:
        stamp = cert_path.stat().st_mtime
    except OSError:
        stamp = 0.0
    return _node_context(directory, name, stamp)


class TlsLink:
    """TLS over a raw socket, through memory BIOs."""

    def __init__(
        self,
        sock: socket.socket,
        tls: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> None:
        self.sock = sock
        self.tls = tls
        self.incoming = incoming
        self.outgoing = outgoing
        self.pending = bytearray()  # ciphertext made, not yet taken by the kernel
        self.eof = False  # the peer's raw end came
        self.plain_sent = 0  # plaintext bytes handed to TLS, in all
        # The last recv() read less than it asked the kernel for: all there was.
        self.drained = False
        # Past the exchange, the records carried by the shadow itself (own_records), not
        # OpenSSL; until then what tells where OpenSSL's numbering stands.
        self.records: tls_records.RecordLayer | None = None
        self.client_random = b""  # of its ClientHello: its secrets in the key log
        self.counting = False  # the handshake is done: records from here on are numbered
        self.records_in = 0  # application records OpenSSL opened (and handed to it)
        self.records_out = 0  # application records OpenSSL sealed

    # -- the exchange before streaming: blocking, one record at a time --------------

    @classmethod
    def handshake(cls, sock: socket.socket, context: ssl.SSLContext, *, server: bool) -> TlsLink:
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=server)
        link = cls(sock, tls, incoming, outgoing)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                link._send_all()
                incoming.write(_read_record(sock))
            except ssl.SSLError:
                with contextlib.suppress(OSError):
                    link._send_all()  # the alert: the peer learns why (a revoked certificate)
                raise
        link._send_all()
        # The client's records from here on are numbered (a server's: Admission counts).
        link.counting = not server
        return link

    def peer_fingerprint(self) -> str:
        der = self.tls.getpeercert(binary_form=True)
        return hashlib.sha256(der).hexdigest() if der else ""

    def read_exactly(self, size: int) -> bytes:
        data = bytearray()
        while len(data) < size:
            try:
                data += self.tls.read(size - len(data))
            except ssl.SSLWantReadError:
                record = _read_record(self.sock)
                if self.counting and record[0] == tls_records.APPLICATION_DATA:
                    self.records_in += 1
                self.incoming.write(record)
            except ssl.SSLZeroReturnError:
                raise ShadowError("the peer closed the connection") from None
        return bytes(data)

    def write_all(self, data: bytes) -> None:
        if self.records is not None:
            self.sock.sendall(self.records.seal(data))
            return
        self.tls.write(data)
        self._send_all()

    def _send_all(self) -> None:
        ciphertext = self.ciphertext()
        if ciphertext:
            self.sock.sendall(ciphertext)

    def ciphertext(self) -> bytes:
        """What OpenSSL sealed since last asked (its records counted once counting)."""
        data = self.outgoing.read()
        if self.counting:
            self.records_out += _count_records(data)
        elif not self.client_random and not self.tls.server_side:
            self.client_random = tls_records.client_random(data)  # our ClientHello's
        return data

    def own_records(self, keylog: tls_records.KeyLog) -> bool:
        """At a record boundary both ways (nothing OpenSSL holds, read or to send): carry
        the records ourselves from here (tls_records), numbered on from OpenSSL's; either
        side (the shadow's, the node forwarder's). Whether it could: not for a suite other
        than AES-GCM, nor without the connection's secrets in `keylog`; then OpenSSL goes
        on."""
        suite = self.tls.cipher()
        if self.records is not None or suite is None or suite[0] not in tls_records.SUITES:
            return self.records is not None
        if self.tls.version() != "TLSv1.3" or not self.counting or not self.client_random:
            return False
        if self.incoming.pending or self.outgoing.pending or self.tls.pending():
            return False
        found = keylog.secrets(self.client_random)
        if found is None:
            return False
        client, server = found
        theirs, ours = (client, server) if self.tls.server_side else (server, client)
        self.records = tls_records.RecordLayer(
            tls_records.Direction(suite[0], theirs, self.records_in),
            tls_records.Direction(suite[0], ours, self.records_out),
        )
        return True

    # -- streaming: non-blocking ----------------------------------------------------

    def recv(self) -> bytes:
        """The plaintext that has come: b"" at the peer's end; BlockingIOError if none yet."""
        if not self.eof:
            try:
                raw = self.sock.recv(CHUNK)
            except BlockingIOError:
                raw = None
            self.drained = raw is None or len(raw) < CHUNK
            if raw == b"":
                self.eof = True
            elif raw and self.records is not None:
                plain = self.records.open(raw)
                self._answer_records()
                if self.records.closed:
                    self.eof = True
                if plain:
                    return plain
            elif raw:
                self.incoming.write(raw)
        if self.records is not None:
            if self.eof:
                return b""  # a record cut short by the end is no data (a broken peer)
            raise BlockingIOError
        pieces = []  # a record's plaintext each (at most 16 KiB): joined once, not grown
        while True:
            try:
                pieces.append(self.tls.read(CHUNK))
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.eof = True
                break
        plain = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        if plain:
            return plain
        if self.eof:
            return b""  # a record cut short by the end is no data (a broken peer)
        raise BlockingIOError

    def send(self, data: bytes | bytearray | memoryview, *, flush: bool = True) -> int:
        """Take up to CHUNK bytes of `data` (0 while earlier ones wait for the kernel).
        Without `flush` the ciphertext waits for the next flush(): several small records
        leave in one system call (one segment)."""
        if len(self.pending) >= CHUNK:
            self.flush()
            if len(self.pending) >= CHUNK:
                return 0
        # Encrypted from the caller's buffer as it is (the views let go of it before the
        # caller cuts what was taken); the ciphertext is kept only for what the kernel
        # does not take at once.
        with memoryview(data) as view, view[:CHUNK] as part:
            if self.records is not None:
                ciphertext = self.records.seal(part)
                taken = len(part)
            else:
                taken = self.tls.write(part)
                ciphertext = self.ciphertext()  # counted: own_records may follow
        self.plain_sent += taken
        if flush and not self.pending:
            try:
                sent = self.sock.send(ciphertext)
            except BlockingIOError:
                sent = 0
            self.pending += memoryview(ciphertext)[sent:]
            return taken
        self.pending += ciphertext
        if flush:
            self.flush()
        return taken

    def send_from(self, buffer: bytearray) -> None:
        """Hand TLS what it takes of `buffer` (taken bytes leave it), and the kernel what
        it takes of the ciphertext."""
        while buffer:
            taken = self.send(buffer)
            if not taken:
                break
            del buffer[:taken]
        self.flush()

    def reopen(self, ciphertext: bytes) -> bytes:
        """Ciphertext read off the socket by another (the native pump) and not opened there:
        the plaintext of its whole records, the rest kept for what comes next."""
        assert self.records is not None
        plain = self.records.open(ciphertext)
        self._answer_records()
        if self.records.closed:
            self.eof = True
        return plain

    def _answer_records(self) -> None:
        """What our record layer owes the peer (a KeyUpdate it asked for) goes out first."""
        assert self.records is not None
        if self.records.replies:
            self.pending += self.records.replies  # sealed after all that waits: sent after it
            self.records.replies.clear()
            self.flush()

    def flush(self) -> int:
        """Hand the kernel what ciphertext waits: the byte count taken."""
        if not self.pending:
            return 0
        try:
            sent = self.sock.send(self.pending)
        except BlockingIOError:
            return 0
        del self.pending[:sent]
        return sent

    def unacknowledged(self) -> int:
        """Ciphertext not yet acknowledged by the peer's kernel, ours included."""
        value = fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
        return len(self.pending) + int(struct.unpack("i", value)[0])

    def shut_write(self) -> bool:
        """Our end, once all is sent (a TCP end under TLS: the next byte never comes)."""
        self.flush()
        if self.pending:
            return False
        self.sock.shutdown(socket.SHUT_WR)
        return True


def _count_records(data: bytes) -> int:
    """The application records (all encrypted ones) in `data`, whole records."""
    count, start = 0, 0
    while start + RECORD_HEADER <= len(data):
        count += data[start] == tls_records.APPLICATION_DATA
        start += RECORD_HEADER + int.from_bytes(data[start + 3 : start + 5], "big")
    return count


def _exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ShadowError("the peer closed the connection")
        data += chunk
    return bytes(data)


def _read_record(sock: socket.socket) -> bytes:
    """One TLS record, no byte more: what follows the last one may be plain."""
    head = _exactly(sock, RECORD_HEADER)
    length = int.from_bytes(head[3:5], "big")
    if length > MAX_RECORD:
        raise ShadowError("not TLS: a record longer than TLS allows")
    return head + _exactly(sock, length)


# -- both sides of the exchange ------------------------------------------------------


class Admission:
    """The shadow's side of one connection's exchange, driven by readiness: never blocks.

    Fed by the shadow's event loop (hijack.shadow.door) each time the socket
    is readable or writable, it goes as far as what has come allows: the TLS
    handshake, the nonce, the node's proof, its header. Raw bytes are read one
    TLS record at a time and plaintext only as far as it is needed, so that
    nothing beyond the header is taken from the peer (a plain relay leaves TLS
    right after). A failure (a refused certificate, a wrong proof, a peer
    gone) raises ShadowError; `header` is set once the exchange is complete.
    """

    def __init__(self, sock: socket.socket, identity: ShadowIdentity, token: bytes) -> None:
        if identity.context is None:
            raise ShadowError("no cluster CA handed to this shadow yet")
        sock.setblocking(False)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = identity.context.wrap_bio(incoming, outgoing, server_side=True)
        self.link = TlsLink(sock, tls, incoming, outgoing)
        self.token = token
        self.nonce = b""  # sent once the handshake is done
        self.proved = False  # the node proved the token: no stranger any more
        self.length = -1  # of the header, once read
        self.header: dict[str, Any] | None = None
        self._record = bytearray()  # the raw record being read
        self._plain = bytearray()  # plaintext read towards the next field

    def wants_write(self) -> bool:
        return bool(self.link.pending)

    def step(self) -> None:
        """Go on with what has come; ShadowError if the peer is refused."""
        try:
            self._step()
        except ssl.SSLCertVerificationError as exc:
            self._send_alert()
            raise ShadowError(f"TLS: its certificate is refused: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            self._send_alert()
            raise ShadowError(f"TLS: {exc.reason or exc}") from None
        except ConnectionError as exc:
            raise ShadowError(f"the peer's connection failed: {exc}") from None

    def _send_alert(self) -> None:
        """The alert OpenSSL made (the peer learns why: a revoked certificate), if it fits."""
        self.link.pending += self.link.ciphertext()
        with contextlib.suppress(OSError):
            self.link.flush()

    def _step(self) -> None:
        self.link.flush()
        while self.header is None:
            if not self.nonce:
                try:
                    self.link.tls.do_handshake()
                except ssl.SSLWantReadError:
                    self.link.pending += self.link.ciphertext()
                    self.link.flush()
                    if not self._take_record():
                        return
                    continue
                self.link.counting = True  # application records from here on
                self.nonce = secrets.token_bytes(NONCE)
                self.link.tls.write(self.nonce)
                self.link.pending += self.link.ciphertext()
                self.link.flush()
            elif not self.proved:
                proof = self._field(32)
                if proof is None:
                    return
                expected = hmac.digest(self.token, self.nonce, "sha256")
                if not self.token or not hmac.compare_digest(proof, expected):
                    raise ShadowError("wrong token")
                self.proved = True
            elif self.length < 0:
                length = self._field(_LENGTH.size)
                if length is None:
                    return
                (self.length,) = _LENGTH.unpack(length)
                if self.length > HEADER_LIMIT:
                    raise ShadowError("header too long")
            else:
                payload = self._field(self.length)
                if payload is None:
                    return
                self.header = _parse_header(payload)

    def _field(self, size: int) -> bytes | None:
        """The next `size` plaintext bytes, once they have all come (None until then)."""
        while len(self._plain) < size:
            try:
                self._plain += self.link.tls.read(size - len(self._plain))
            except ssl.SSLWantReadError:
                if not self._take_record():
                    return None
            except ssl.SSLZeroReturnError:
                raise PeerClosed("the peer closed the connection") from None
        field, self._plain = bytes(self._plain), bytearray()
        return field

    def _take_record(self) -> bool:
        """Read towards the next TLS record, no byte beyond it: whether one is complete
        (and handed to OpenSSL)."""
        while True:
            size = RECORD_HEADER
            if len(self._record) >= RECORD_HEADER:
                if self._record[0] not in RECORD_TYPES or self._record[1] != 3:
                    raise ShadowError("not TLS: no record header")  # garbage: not waited on
                length = int.from_bytes(self._record[3:5], "big")
                if length > MAX_RECORD:
                    raise ShadowError("not TLS: a record longer than TLS allows")
                size += length
            if len(self._record) == size:
                record = bytes(self._record)
                if not self.link.client_random:
                    self.link.client_random = tls_records.client_random(record)
                if self.link.counting and record[0] == tls_records.APPLICATION_DATA:
                    self.link.records_in += 1
                self.link.incoming.write(record)
                self._record.clear()
                return True
            try:
                chunk = self.link.sock.recv(size - len(self._record))
            except BlockingIOError:
                return False
            if not chunk:
                raise PeerClosed("the peer closed the connection")
            self._record += chunk


def _parse_header(payload: bytes) -> dict[str, Any]:
    try:
        header = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ShadowError(f"malformed header: {exc}") from None
    if not isinstance(header, dict):
        raise ShadowError("malformed header: not an object")
    return header


def accept(
    sock: socket.socket, identity: ShadowIdentity, token: bytes, timeout: float = 5.0
) -> tuple[dict[str, Any], TlsLink]:
    """The shadow's side, waiting for it (one connection at a time: tests, fuzzing): the
    node's header once its certificate and token proof pass within `timeout` seconds."""
    admission = Admission(sock, identity, token)
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ)
        while True:
            admission.step()
            if admission.header is not None:
                return admission.header, admission.link
            events = selectors.EVENT_READ
            if admission.wants_write():
                events |= selectors.EVENT_WRITE
            selector.modify(sock, events)
            left = deadline - time.monotonic()
            if left <= 0 or not selector.select(left):
                raise ShadowError(f"no complete exchange within {timeout:g} s")


def connect(
    address: str, fingerprint: str, token: bytes, header: dict[str, Any], timeout: float
) -> TlsLink:
    """The node's side: TLS to the shadow at `address`, pinned, then our proof and header."""
    link = connect_proved(address, fingerprint, token, timeout)
    send_header(link, header, address)
    return link


def send_header(link: TlsLink, header: dict[str, Any], address: str) -> None:
    """The header after connect_proved's proof (the shadow waits HANDSHAKE_TIMEOUT for it,
    hijack.shadow.door)."""
    payload = json.dumps(header, separators=(",", ":")).encode()
    try:
        link.write_all(_LENGTH.pack(len(payload)) + payload)
    except (OSError, ssl.SSLError) as exc:
        link.sock.close()
        raise ShadowError(f"handshake with the home shadow at {address} failed: {exc}") from None


def connect_proved(address: str, fingerprint: str, token: bytes, timeout: float) -> TlsLink:
    """TLS to the shadow at `address`, pinned, and our proof of the token: a link ready for
    its header (send_header). Made ahead of a request it saves the handshake's time."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ShadowError(f"no address of the home shadow to reach (have {address!r})")
    if not fingerprint:
        raise ShadowError(f"no certificate of the home shadow at {address} to check it by")
    context = node_context()
    try:
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except OSError as exc:
        raise ShadowError(
            f"cannot reach the home shadow at {address}: {exc.strerror or exc}"
        ) from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        link = TlsLink.handshake(sock, context, server=False)
        if not hmac.compare_digest(link.peer_fingerprint(), fingerprint):
            raise ShadowError("it is not the home shadow: its certificate is another")
        nonce = link.read_exactly(NONCE)
        link.write_all(hmac.digest(token, nonce, "sha256"))
    except (OSError, ShadowError, ssl.SSLError) as exc:
        sock.close()
        raise ShadowError(f"handshake with the home shadow at {address} failed: {exc}") from None
    return link


def read_answer(link: TlsLink) -> dict[str, Any]:
    (length,) = _LENGTH.unpack(link.read_exactly(_LENGTH.size))
    if length > HEADER_LIMIT:
        raise ShadowError("answer too long")
    answer = json.loads(link.read_exactly(length))
    if not isinstance(answer, dict):
        raise ShadowError("malformed answer")
    return answer


def send_answer(link: TlsLink, message: dict[str, Any]) -> None:
    payload = json.dumps(message, separators=(",", ":")).encode()
    link.write_all(_LENGTH.pack(len(payload)) + payload)
