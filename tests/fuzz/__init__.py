"""Fuzz targets shared by the hypothesis tests and the atheris harness (tests/fuzz/run.py)."""
