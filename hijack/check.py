"""`hijack check`: can this kernel, machine and user do everything hijack needs?

One line per feature: what was tried, ok or what is missing, and what then does
not work. A feature is *required* when a core command cannot work without it;
the others only limit something (a missing one is reported, exit stays 0).
The probes themselves (hijack.sys.probe) try the real thing on children and
memory of their own, and change nothing machine-wide.
"""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from hijack.errors import HijackError
from hijack.node import pki
from hijack.registry import node_name, state_dir
from hijack.sys import probe

# PAGEMAP_SCAN arrived in Linux 6.7: older kernels cannot pre-copy.
PAGEMAP_SCAN_KERNEL = (6, 7)


@dataclass(frozen=True)
class Feature:
    name: str
    required: bool
    without: str  # what does not work when it is missing
    probe: Callable[[], str]  # the detail on success; raises on failure
    # Without it the others cannot be tried (their probes would read other processes).
    first: bool = False


@dataclass(frozen=True)
class Finding:
    name: str
    ok: bool
    required: bool
    detail: str  # what was found, or what is missing
    without: str  # what does not work when it is missing (empty when ok)


def _architecture() -> str:
    machine = platform.machine()
    if machine != "x86_64":
        raise HijackError(f"this machine is {machine}; hijack knows x86_64 only")
    return f"x86_64, Linux {platform.release()}"


def _kernel_release() -> tuple[int, int]:
    major, minor = platform.release().split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _capabilities(names: tuple[str, ...]) -> Callable[[], str]:
    def check() -> str:
        missing = [name for name in names if name not in probe.effective_capabilities()]
        if missing:
            raise HijackError(f"{', '.join(missing)} missing (uid {os.geteuid()})")
        return ", ".join(names)

    return check


def _ptrace_scope() -> str:
    scope = probe.ptrace_scope()
    if scope is None:
        return "no Yama: only capabilities decide"
    if scope == 3:
        raise HijackError("Yama ptrace_scope is 3: no process may be traced until reboot")
    if scope == 2 and "CAP_SYS_PTRACE" not in probe.effective_capabilities():
        raise HijackError("Yama ptrace_scope is 2 and CAP_SYS_PTRACE is missing")
    return f"Yama ptrace_scope {scope}"


def _pagemap_scan() -> str:
    if _kernel_release() < PAGEMAP_SCAN_KERNEL:
        raise HijackError(f"Linux {platform.release()} predates PAGEMAP_SCAN (6.7)")
    return probe.try_dirty_tracking()


def _state_directory() -> str:
    directory = state_dir()
    if not directory.exists():
        parent = next(p for p in directory.parents if p.exists())
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise HijackError(f"{directory} does not exist and cannot be created")
        return f"{directory} (made on first use)"
    if not directory.is_dir():
        raise HijackError(f"{directory} is not a directory")
    try:  # root passes os.access on any mode: only a real write tells (read-only mounts)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        raise HijackError(f"{directory} is not writable: {exc.strerror}") from None
    return f"{directory} is writable"


def _cluster_certificates() -> str:
    """The CA's certificate, the revocation list and this node's key and certificate."""
    directory, name = pki.pki_dir(), node_name()
    pki.load_crl(directory)
    pki.load_identity(directory, name)  # loads and matches them all, as a daemon would
    return f"{directory} (node {name})"


FEATURES = (
    Feature("machine", True, "nothing: hijack runs on x86_64 Linux", _architecture),
    Feature(
        "privileges",
        True,
        "attach, dump, restore and move (run as root)",
        _capabilities(("CAP_SYS_PTRACE", "CAP_SYS_ADMIN", "CAP_CHECKPOINT_RESTORE")),
    ),
    Feature(
        "proc",
        True,
        "every command: the pids read in /proc would name other processes",
        probe.proc_shows_own_pids,
        first=True,
    ),
    Feature("ptrace scope", True, "attach, dump and move", _ptrace_scope),
    Feature("ptrace seize", True, "attach, dump and move", probe.try_seize),
    Feature("clone3 set_tid", True, "restore under the old pid", probe.try_set_tid),
    Feature("PR_SET_MM_MAP", True, "restore (brk, arguments, auxv, exe)", probe.try_mm_map),
    Feature(
        "pidfd_getfd", True, "attach's hand-over, dump's terminals, moves", probe.try_pidfd_getfd
    ),
    Feature(
        "dirty-page tracking",
        False,
        "pre-copy: every move freezes for its whole dump (--no-precopy)",
        _pagemap_scan,
    ),
    Feature(
        "network namespaces",
        False,
        "`make demo` and the test suite's nodes",
        probe.try_network_namespace,
    ),
    Feature(
        "raising hard limits",
        False,
        "a restored hard resource limit above the restorer's stays at the restorer's",
        _capabilities(("CAP_SYS_RESOURCE",)),
    ),
    Feature("state directory", True, "attach, move, status (the registry)", _state_directory),
    Feature("cluster certificates", True, "move and node serve", _cluster_certificates),
)


def run_checks(features: tuple[Feature, ...] = FEATURES) -> list[Finding]:
    findings = []
    for feature in features:
        try:
            detail, ok = feature.probe(), True
        except (HijackError, OSError) as exc:
            detail, ok = str(exc), False
        findings.append(
            Finding(
                name=feature.name,
                ok=ok,
                required=feature.required,
                detail=detail,
                without="" if ok else feature.without,
            )
        )
        if feature.first and not ok:
            break  # the rest would try the kernel on others' processes
    return findings
