"""`python -m hijack`: the same as the `hijack` command."""

from hijack.cli.main import run

run()
