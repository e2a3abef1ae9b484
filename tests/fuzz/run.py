"""The atheris harness: `python tests/fuzz/run.py TARGET [libFuzzer options]` (`make fuzz`).

TARGET is a function of tests/fuzz/targets.py (crf_reader, node_handshake,
node_client, node_certificate, node_session). Unless corpus directories are given, the
corpus grows in build/fuzz/TARGET (crf_reader also reads the malformed
images of tests/corpus/crf, which libFuzzer leaves as they are). A finding is an input
for which the target raised (see targets.py): libFuzzer saves it as
build/fuzz/TARGET-crash-*; replay it with
`python tests/fuzz/run.py TARGET build/fuzz/TARGET-crash-...`.

Needs atheris (`pip install atheris`; `make fuzz` installs it in the venv).
"""

from __future__ import annotations

import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TESTS))

import atheris  # noqa: E402

with atheris.instrument_imports(include=["hijack"]):
    from fuzz import targets

TARGETS = ("crf_reader", "node_handshake", "node_client", "node_certificate", "node_session")
SEED_CORPUS = {"crf_reader": TESTS / "corpus" / "crf"}
WORK = TESTS.parent / "build" / "fuzz"


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    name, options = sys.argv[1], sys.argv[2:]
    target = getattr(targets, name)
    if not any(option.startswith("-artifact_prefix=") for option in options):
        WORK.mkdir(parents=True, exist_ok=True)
        options.append(f"-artifact_prefix={WORK}/{name}-")
    if not any(not option.startswith("-") for option in options):
        work = WORK / name
        work.mkdir(parents=True, exist_ok=True)
        options.append(str(work))  # the first directory: where new inputs go
        if name in SEED_CORPUS:
            options.append(str(SEED_CORPUS[name]))
    atheris.Setup([sys.argv[0], *options], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
