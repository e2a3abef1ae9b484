"""Node certificates a node must refuse, laid out as a HIJACK_PKI directory of their own.

Each function makes DIRECTORY hold node NAME's key and certificate with one
flaw, beside the cluster's own ca.crt and revoked.crl (so the node holding
them still trusts the cluster's daemons: only its own certificate is wrong).
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path

import pytest

from hijack.node import pki

PUBLIC = ("ca.crt", "revoked.crl")


def one_node_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> Path:
    """A cluster's keys and certificates in `tmp_path`/pki with one node, `name`, at
    127.0.0.1, and the test made that node (its PKI, name and state directory)."""
    directory = tmp_path / "pki"
    pki.init_ca(directory)
    pki.add_node(directory, name, "127.0.0.1")
    monkeypatch.setenv("HIJACK_PKI", str(directory))
    monkeypatch.setenv("HIJACK_NODE", name)
    monkeypatch.setenv("HIJACK_STATE_DIR", str(tmp_path / "state"))
    return directory


def _trusting(cluster: Path, directory: Path) -> None:
    """Put the cluster's CA certificate and revocation list in `directory`."""
    for name in PUBLIC:
        (directory / name).unlink(missing_ok=True)
        shutil.copy2(cluster / name, directory / name)


def from_another_ca(cluster: Path, directory: Path, name: str, address: str) -> Path:
    """NAME's certificate signed by a CA of its own, not the cluster's."""
    pki.init_ca(directory, name="another cluster")
    pki.add_node(directory, name, address)
    (directory / "ca.key").unlink()
    _trusting(cluster, directory)
    return directory


def reissued(
    cluster: Path,
    directory: Path,
    name: str,
    address: str | None,
    *,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> Path:
    """NAME's certificate signed by the cluster's CA, naming `address` (or no address)."""
    directory.mkdir(parents=True)
    shutil.copy2(cluster / "ca.key", directory / "ca.key")
    _trusting(cluster, directory)
    pki.add_node(directory, name, address, not_before=not_before, not_after=not_after)
    (directory / "ca.key").unlink()
    return directory


def expired(cluster: Path, directory: Path, name: str, address: str) -> Path:
    """NAME's certificate signed by the cluster's CA, but out of date since yesterday."""
    now = datetime.datetime.now(datetime.UTC)
    return reissued(
        cluster,
        directory,
        name,
        address,
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
