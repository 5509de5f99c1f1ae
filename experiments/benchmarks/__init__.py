"""Benchmark suites for scripts/benchmark.py: each module has `run(args) -> list[dict]`."""
