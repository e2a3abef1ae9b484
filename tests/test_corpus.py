"""Every malformed image of tests/corpus/crf is refused by `hijack show` and `hijack restore`.

The corpus is written by tests/corpus/make_crf_corpus.py from a real image
(each file's name says how it is broken). Each command must exit 1 with one
line on stderr, no traceback, and start no process: a restore reads the whole
image before it lets anything run, and a stub it began is killed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from support import find_leaked_processes, snapshot_descendants
from support.cli import CliResult, HijackCli

CORPUS = Path(__file__).resolve().parent / "corpus" / "crf"
IMAGES = sorted(CORPUS.glob("*.crf"))


def test_the_corpus_is_there() -> None:
    assert len(IMAGES) >= 30, f"tests/corpus/crf holds {len(IMAGES)} images"


def assert_one_line_refusal(result: CliResult) -> None:
    assert result.returncode == 1, result.describe()
    assert result.stderr.startswith("hijack: "), result.describe()
    assert result.stderr.count("\n") == 1 and result.stderr.endswith("\n"), result.describe()
    assert "Traceback" not in result.stderr + result.stdout, result.describe()


@pytest.mark.parametrize("image", IMAGES, ids=[path.stem for path in IMAGES])
def test_a_malformed_image_is_refused_in_one_line_and_starts_nothing(
    image: Path, tmp_path: Path
) -> None:
    hijack = HijackCli(tmp_path / "state")
    before = snapshot_descendants(os.getpid())
    shown = hijack("show", image)
    assert_one_line_refusal(shown)
    restored = hijack("restore", image)
    assert_one_line_refusal(restored)
    assert restored.stdout == "", restored.describe()
    assert find_leaked_processes(os.getpid(), before) == []
    print(f"{image.name}: {restored.stderr.strip()}")
