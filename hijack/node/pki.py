"""The cluster's certificates: a CA, one key and certificate per node, a revocation list.

Layout (docs/security.md, "Keys and certificates"), in $HIJACK_PKI or STATE/pki:

    ca.key              the CA's private key (0600; keep it on one admin machine)
    ca.crt              the CA's certificate (every node holds a copy)
    revoked.crl         the revocation list, signed by the CA (every node holds a copy)
    nodes/NAME.key      a node's private key (0600; only that node holds it)
    nodes/NAME.crt      a node's certificate: subject CN=NAME, DNS name NAME (+ --address)

The keys and certificates come from the `cryptography` package; TLS itself is
Python's `ssl` (OpenSSL), version 1.3 only, each side verifying the other's
chain to ca.crt, the revocation list and the node name it expects.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import socket
import ssl
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hijack.errors import HijackError
from hijack.registry import node_name, state_dir

CA_DAYS = 3650
NODE_DAYS = 825
CRL_DAYS = 3650  # the list is reissued at every revocation; it must not lapse between
NODE_NAME_MAX = 64


def pki_dir() -> Path:
    return Path(os.environ.get("HIJACK_PKI") or state_dir() / "pki")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read, never replacing one (keys are not overwritten)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _replace_private(path: Path, data: bytes) -> None:
    """Replace a file atomically (the revocation list a daemon may be reading)."""
    part = path.with_name(path.name + ".part")
    part.unlink(missing_ok=True)
    _write_private(part, data)
    os.replace(part, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check_name(name: str) -> None:
    if (
        not name
        or len(name) > NODE_NAME_MAX
        or not all(c.isalnum() or c in "-_." for c in name)
        or name.startswith((".", "-"))
    ):
        raise HijackError(
            f"bad node name {name!r}: letters, digits, '-', '_', '.' (at most {NODE_NAME_MAX})"
        )


def _load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        key_bytes = (directory / "ca.key").read_bytes()
        cert_bytes = (directory / "ca.crt").read_bytes()
    except OSError as exc:
        raise HijackError(
            f"no cluster CA in {directory} ({exc.strerror}); create it with `hijack cluster init`"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_bytes, password=None)
        cert = x509.load_pem_x509_certificate(cert_bytes)
    except ValueError as exc:
        raise HijackError(f"the cluster CA in {directory} is damaged: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise HijackError(f"the cluster CA key in {directory} is not an EC key")
    return key, cert


def _issue_crl(
    directory: Path,
    key: ec.EllipticCurvePrivateKey,
    ca: x509.Certificate,
    revoked: list[x509.RevokedCertificate],
) -> None:
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=CRL_DAYS))
    )
    for entry in revoked:
        builder = builder.add_revoked_certificate(entry)
    crl = builder.sign(key, hashes.SHA256())
    _replace_private(directory / "revoked.crl", crl.public_bytes(serialization.Encoding.PEM))


def init_ca(directory: Path, name: str = "hijack cluster") -> None:
    """Create the cluster's CA and an empty revocation list; refuse if one is there."""
    if (directory / "ca.key").exists() or (directory / "ca.crt").exists():
        raise HijackError(f"a cluster CA exists already in {directory}")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(directory / "ca.key", _pem_key(key))
    _write_private(directory / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    _issue_crl(directory, key, cert, [])


def node_paths(directory: Path, name: str) -> tuple[Path, Path]:
    """(key, certificate) of node NAME."""
    return directory / "nodes" / f"{name}.key", directory / "nodes" / f"{name}.crt"


def add_node(
    directory: Path,
    name: str,
    address: str | None = None,
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[Path, Path]:
    """Issue node NAME a key and a certificate signed by the cluster's CA."""
    _check_name(name)
    ca_key, ca = _load_ca(directory)
    key_path, cert_path = node_paths(directory, name)
    if key_path.exists() or cert_path.exists():
        raise HijackError(f"node {name} has a certificate already; revoke it and remove its files")
    alt_names: list[x509.GeneralName] = [x509.DNSName(name)]
    if address is not None:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            alt_names.append(x509.DNSName(address))
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - datetime.timedelta(minutes=5))
        .not_valid_after(not_after or now + datetime.timedelta(days=NODE_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(
            # A node is a server (daemon) and a client (mover, daemon to daemon).
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(key_path, _pem_key(key))
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def revoke(directory: Path, name: str) -> int:
    """Put node NAME's certificate on the revocation list; its serial number."""
    _check_name(name)
    ca_key, ca = _load_ca(directory)
    _, cert_path = node_paths(directory, name)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except OSError as exc:
        raise HijackError(
            f"no certificate for node {name} at {cert_path} ({exc.strerror})"
        ) from None
    crl = load_crl(directory)
    entries = list(crl)
    if not any(entry.serial_number == cert.serial_number for entry in entries):
        entries.append(
            x509.RevokedCertificateBuilder()
            .serial_number(cert.serial_number)
            .revocation_date(_now())
            .build()
        )
    _issue_crl(directory, ca_key, ca, entries)
    return cert.serial_number


def load_crl(directory: Path) -> x509.CertificateRevocationList:
    path = directory / "revoked.crl"
    try:
        return x509.load_pem_x509_crl(path.read_bytes())
    except OSError as exc:
        raise HijackError(f"no revocation list at {path} ({exc.strerror})") from None
    except ValueError as exc:
        raise HijackError(f"the revocation list at {path} is damaged: {exc}") from None


def _context(purpose: ssl.Purpose, directory: Path, name: str) -> ssl.SSLContext:
    context = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    # A name is checked by peer_name() against the node expected, on both sides alike;
    # OpenSSL's host-name check covers only the client's view of the server.
    context.check_hostname = False
    key_path, cert_path = node_paths(directory, name)
    try:
        context.load_cert_chain(cert_path, key_path)
        context.load_verify_locations(cafile=directory / "ca.crt")
        # The revocation list is read into every context made: a daemon makes a new
        # one when the file changes (NodeIdentity), so `revoke` takes effect once the
        # new list is copied to the node.
        context.load_verify_locations(cafile=directory / "revoked.crl")
    except (OSError, ssl.SSLError) as exc:
        raise HijackError(
            f"cannot load node {name}'s certificates from {directory}: {exc}"
            f" (`hijack cluster add-node {name}` on the CA's machine, then copy them here)"
        ) from None
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_X509_STRICT
    return context


def server_context(directory: Path, name: str) -> ssl.SSLContext:
    """TLS 1.3 for node NAME's daemon: client certificates required, CA and revocation checked."""
    return _context(ssl.Purpose.CLIENT_AUTH, directory, name)


def client_context(directory: Path, name: str) -> ssl.SSLContext:
    """TLS 1.3 for node NAME connecting to another node (mover, daemon to daemon)."""
    return _context(ssl.Purpose.SERVER_AUTH, directory, name)


class CertificateNames(NamedTuple):
    """What a node certificate names: its node (CN) and the hosts it may answer for."""

    node: str
    hosts: frozenset[str]  # its node name, DNS names and IP addresses


def certificate_names(der: bytes) -> CertificateNames:
    """The names in a DER certificate (verified by TLS before we look); HijackError if it
    has none to go by or does not parse."""
    try:
        cert = x509.load_der_x509_certificate(der)
        common = [
            value
            for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if isinstance(value := attribute.value, str)
        ]
        try:
            alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            alt = x509.SubjectAlternativeName([])
        hosts = {*common, *alt.get_values_for_type(x509.DNSName)}
        hosts.update(str(address) for address in alt.get_values_for_type(x509.IPAddress))
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        # cryptography's errors for what does not parse, read lazily as extensions are
        raise HijackError(f"the peer's certificate does not parse: {exc}") from None
    if len(common) != 1:
        raise HijackError("the peer's certificate names no node")
    return CertificateNames(common[0], frozenset(hosts))


def _peer_names(tls: ssl.SSLSocket) -> CertificateNames:
    der = tls.getpeercert(binary_form=True)
    if der is None:
        raise HijackError("the peer sent no certificate")
    return certificate_names(der)


def peer_name(tls: ssl.SSLSocket) -> str:
    """The node name the peer's verified certificate gives (its common name)."""
    return _peer_names(tls).node


def expect_peer(tls: ssl.SSLSocket, expected: str) -> None:
    """Refuse a peer whose verified certificate names another node than the one expected."""
    name = peer_name(tls)
    if name != expected:
        raise HijackError(f"the peer's certificate names node {name!r}, not {expected!r}")


def names_host(tls: ssl.SSLSocket, host: str) -> None:
    """Refuse a server whose verified certificate does not name HOST, the address dialed.

    Named means: its node name (CN or DNS name) is HOST, or one of its IP
    addresses (`add-node --address`) is HOST. A certificate of the cluster
    that names another host is another node answering in its place.
    """
    names = _peer_names(tls)
    wanted = host.strip("[]")
    with contextlib.suppress(ValueError):
        wanted = str(ipaddress.ip_address(wanted))  # one spelling of an IPv6 address
    if wanted not in names.hosts:
        raise HijackError(
            f"the certificate of node {names.node!r} does not name {host}"
            f" (it names {', '.join(sorted(names.hosts))}): issue it with `hijack cluster"
            f" add-node NAME --address {host}`, or connect by a name it has"
        )


class NodeIdentity:
    """This node's TLS contexts, from its certificates in `directory`.

    The server's context is made again whenever the revocation list changes
    (checked at every accept: a stat), so a `revoke` copied to a node takes
    effect at the daemon's next connection without a restart.
    """

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.name = name
        self._client: ssl.SSLContext | None = None
        self._server: ssl.SSLContext | None = None
        self._crl_seen: tuple[int, int, int] | None = None
        self.server_context()  # refuse at once if this node's files do not load

    def _crl_signature(self) -> tuple[int, int, int]:
        try:
            found = os.stat(self.directory / "revoked.crl")
        except OSError as exc:
            raise HijackError(
                f"no revocation list at {self.directory / 'revoked.crl'} ({exc.strerror})"
            ) from None
        return found.st_ino, found.st_size, found.st_mtime_ns

    def server_context(self) -> ssl.SSLContext:
        signature = self._crl_signature()
        if self._server is None or signature != self._crl_seen:
            self._server = server_context(self.directory, self.name)
            self._crl_seen = signature
        return self._server

    def client_context(self) -> ssl.SSLContext:
        if self._client is None:
            self._client = client_context(self.directory, self.name)
        return self._client


def load_identity(directory: Path | None = None, name: str | None = None) -> NodeIdentity:
    """This node's identity: $HIJACK_PKI (or STATE/pki) and its node name."""
    return NodeIdentity(directory or pki_dir(), name or node_name())


ALERT = "ALERT_"


def describe_tls_error(exc: OSError) -> str:
    """One line for a failed TLS exchange: a refusal the peer sent us says so, by its reason."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"its certificate is refused: {exc.verify_message}"
    reason = getattr(exc, "reason", None)
    if isinstance(reason, str):
        said = reason.split(ALERT, 1)[-1].lower().replace("_", " ")
        if ALERT not in reason:
            return f"TLS failed: {said}"
        if "certificate" in said or "unknown ca" in said:
            return f"it refused our certificate ({said})"
        return f"it ended the TLS session ({said})"
    return exc.strerror or str(exc) or type(exc).__name__


def handshake(
    sock: socket.socket,
    context: ssl.SSLContext,
    *,
    server: bool,
    deadline: float,
) -> ssl.SSLSocket:
    """Run the TLS handshake within DEADLINE seconds; one clear error if it fails."""
    sock.settimeout(deadline)
    try:
        tls = context.wrap_socket(sock, server_side=server)
    except ssl.SSLCertVerificationError as exc:
        raise HijackError(f"TLS: the peer's certificate is refused: {exc.verify_message}") from None
    except TimeoutError:
        raise HijackError(f"TLS handshake failed: no answer within {deadline:g} s") from None
    except (ssl.SSLError, OSError) as exc:
        raise HijackError(f"TLS handshake failed: {describe_tls_error(exc)}") from None
    return tls
