"""A node's name: how records, moves and `hijack status` tell nodes apart.

A command's node name is, in order: $HIJACK_NODE; else the name the node's
daemon kept in the state directory (NAME_FILE); else a default made from the
host name: the host name itself for the default state directory, the host
name and a digest of the state directory for any other (a second node on
one host gets a name of its own).

The daemon (`hijack node serve`) names the node: --name, else $HIJACK_NODE,
else the name kept, else the default; and keeps it, so that every command
of that node uses the same name. A command whose $HIJACK_NODE is not the
name kept is refused, by name, before it records anything under a wrong one.

A name is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path

from hijack.errors import HijackError

VARIABLE = "HIJACK_NODE"
NAME_FILE = "node-name"
VALID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
DIGEST_LENGTH = 6  # hex digits of the state directory's digest in a default name


def node_name(directory: Path, default_directory: Path) -> str:
    """The name of the node whose state directory is `directory`."""
    given = os.environ.get(VARIABLE) or None  # set but empty: unset
    if given is not None:
        check_name(given, f"${VARIABLE}")
    kept = kept_name(directory)
    if given and kept and given != kept:
        raise HijackError(
            f"${VARIABLE} is {given!r}, but this node ({directory}) is named {kept!r} by its"
            f" daemon: unset ${VARIABLE} or make it {kept!r}"
        )
    return given or kept or default_name(directory, default_directory)


def default_name(directory: Path, default_directory: Path) -> str:
    host = socket.gethostname()
    if directory.resolve() == default_directory.resolve():
        return host
    digest = hashlib.sha256(os.fsencode(directory.resolve())).hexdigest()[:DIGEST_LENGTH]
    return f"{host}-{digest}"[:64]


def kept_name(directory: Path) -> str | None:
    try:
        text = (directory / NAME_FILE).read_text().strip()
    except OSError:
        # None kept, or a state directory out of reach: the registry, which
        # needs it too, says why when it is opened.
        return None
    check_name(text, str(directory / NAME_FILE))
    return text


def name_the_node(directory: Path, default_directory: Path, requested: str | None) -> str:
    """The daemon's name for its node (`requested`: --name), kept for the node's commands.

    This process goes by it from now on ($HIJACK_NODE set to it). A requested
    name that cannot be kept is refused; any other is used all the same (the
    daemon then fails where the state directory is needed, saying why).
    """
    given = os.environ.get(VARIABLE) or None
    if requested is not None:
        check_name(requested, "--name")
        if given and given != requested:
            raise HijackError(
                f"--name {requested!r} and ${VARIABLE}={given!r} disagree: give one name"
            )
    elif given is not None:
        check_name(given, f"${VARIABLE}")
    name = requested or given or kept_name(directory) or default_name(directory, default_directory)
    path = directory / NAME_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{NAME_FILE}.{os.getpid()}")
        partial.write_text(name + "\n")
        os.replace(partial, path)
    except OSError as exc:
        if requested is not None:
            raise HijackError(f"cannot keep the node name in {path}: {exc.strerror}") from None
    os.environ[VARIABLE] = name
    return name


def check_name(name: str, source: str) -> None:
    if not VALID_NAME.fullmatch(name):
        raise HijackError(f"node name {name!r} ({source}) is not valid: {RULE}")
