"""The documents say what the code does: the CRF version, the environment variables."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hijack.image.codec import FORMAT_VERSION

REPOSITORY = Path(__file__).resolve().parent.parent
CRF_SPEC = (REPOSITORY / "docs" / "crf.md").read_text()
README = (REPOSITORY / "README.md").read_text()


def test_the_crf_spec_names_the_version_the_code_writes() -> None:
    title = re.match(r"# CRF — the Checkpoint/Restart File format, version (\d+)\n", CRF_SPEC)
    assert title is not None and int(title[1]) == FORMAT_VERSION, CRF_SPEC.splitlines()[0]
    example_block = re.search(r"```json\n(.*?)```", CRF_SPEC, re.S)
    assert example_block is not None
    assert json.loads(example_block[1])["format_version"] == FORMAT_VERSION
    # No other place claims a version for the document.
    claims = re.findall(r"describes version \**(\d+)", CRF_SPEC)
    assert all(int(number) == FORMAT_VERSION for number in claims), claims


def environment_variables_read() -> set[str]:
    """Every HIJACK_* variable the package, the benchmarks and the test harness read."""
    found: set[str] = set()
    for folder in ("hijack", "bench", "tests/support"):
        for path in (REPOSITORY / folder).rglob("*.py"):
            found |= set(re.findall(r"\"(HIJACK_[A-Z_]+)\"", path.read_text()))
    return found - {"HIJACK_PROGRAM", "HIJACK_SERVE"}  # names of constants, not variables


def test_the_readme_documents_every_environment_variable_in_one_table() -> None:
    section = re.search(r"^### Environment\n(.*?)(?=^#)", README, re.M | re.S)
    assert section is not None, "README.md has no Environment section"
    documented = set(re.findall(r"^\| `(\w+)` \|", section[1], re.M))
    missing = environment_variables_read() - documented
    assert not missing, f"read but not in README's Environment table: {sorted(missing)}"


def test_no_file_holds_a_merge_conflict_left_unresolved() -> None:
    """A merge once left both sides of a conflict in README.md, markers and all."""
    marker = re.compile(r"^(<{7} |>{7} |={7}$)", re.M)
    texts = [REPOSITORY / "README.md", *(REPOSITORY / "docs").glob("*.md")]
    for folder in ("hijack", "bench", "tests"):
        for suffix in ("py", "c", "S"):
            texts += (REPOSITORY / folder).rglob(f"*.{suffix}")
    left = []
    for path in texts:
        text = path.read_text(errors="replace")
        found = marker.search(text)
        if found:
            line = text.count("\n", 0, found.start()) + 1
            left.append(f"{path.relative_to(REPOSITORY)}:{line}")
    assert not left, f"merge conflict markers at {left}"
