"""Benchmarks: scripts that print tables (python -m benchmarks.serving, benchmarks.load)."""
