"""What a node daemon agrees to restore (docs/security.md, "The node daemon's policy").

A daemon restores on request of any node with a certificate of the cluster's
CA (hijack.node.pki), as root. It
refuses, by name and before anything is created for the move:

- a process with root's powers — uid or gid 0 (real, effective, saved,
  filesystem), the root group among its groups, or any capability in its
  permitted, effective, inheritable or ambient set — unless it was started
  with `--allow-root`;
- a file it cannot verify: every segment the image maps from a file
  (ContentsKind.FILE: `dump --no-binary` / `--no-shared-libs`) must exist on
  this node with the size, modification time and ELF build-id the image
  records (the executable too, when `--no-binary` left its pages out); a
  file mapped shared and executable, whose code would come from this node's
  copy with nothing to check it by, is refused.

Pages the image carries (ContentsKind.STORED, what `hijack move` always
sends) are not compared with this node's files: they are the bytes the
process ran, read from its memory by a node of the cluster and carried
inside TLS (hijack.node.channel); this node's
copy of the file, if any, is never mapped.
"""

from __future__ import annotations

from hijack.errors import HijackError
from hijack.image import records as rec
from hijack.image.identity import check_identity


class Refused(HijackError):
    """The daemon's policy does not allow this image here."""


def check_image(
    header: rec.ImageHeader,
    credentials: tuple[rec.Credentials, ...],
    segments: rec.Segments,
    *,
    allow_root: bool,
) -> None:
    """Raise Refused (one line, naming what) for an image this node must not restore.
    `credentials`: the process's, then those of each thread that has its own (a thread's
    powers are the process's: it shares the memory)."""
    for each in credentials:
        check_powers(f"{header.comm} (pid {header.pid})", each, allow_root=allow_root)
    check_files(header, segments)


def check_powers(who: str, credentials: rec.Credentials, *, allow_root: bool) -> None:
    """Refuse `who` if it has root's powers, unless `allow_root` (also before pre-copy)."""
    if not allow_root:
        powers = root_powers(credentials)
        if powers:
            raise Refused(
                f"refusing {who}: it runs with root's powers "
                f"({', '.join(powers)}); this node was not started with --allow-root"
            )


def root_powers(credentials: rec.Credentials) -> list[str]:
    """What in `credentials` makes a process root, or something near it; empty if nothing."""
    powers = []
    uids = (credentials.uid, credentials.euid, credentials.suid, credentials.fsuid)
    gids = (credentials.gid, credentials.egid, credentials.sgid, credentials.fsgid)
    if 0 in uids:
        powers.append("uid 0")
    if 0 in gids or 0 in credentials.groups:
        powers.append("gid 0")
    # The bounding set is full for every process; only these sets grant anything.
    for name, value in (
        ("permitted", credentials.cap_permitted),
        ("effective", credentials.cap_effective),
        ("inheritable", credentials.cap_inheritable),
        ("ambient", credentials.cap_ambient),
    ):
        if value:
            powers.append(f"{name} capabilities {value:#x}")
    return powers


def check_files(header: rec.ImageHeader, segments: rec.Segments) -> None:
    """Every file the image maps instead of carrying must be here and unchanged."""
    check_layout(f"{header.comm} (pid {header.pid})", segments)


def check_layout(who: str, segments: rec.Segments) -> None:
    """check_files for `who`; also for a move's pre-copy round 0, which builds the stub."""
    for segment in segments.segments:
        if segment.file is not None:
            check_identity(segment.file)
        elif (
            segment.contents is rec.ContentsKind.NONE
            and segment.path.startswith("/")
            and segment.prot & rec.Prot.EXEC
        ):
            # A shared mapping's bytes are the file's: executable ones would be
            # code this node's file supplies, with no identity to check it by.
            raise Refused(
                f"refusing {who}: it maps {segment.path} shared "
                "and executable, code that cannot be verified"
            )
