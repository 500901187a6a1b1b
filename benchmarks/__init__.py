"""Benchmarks: each prints JSON and writes it to benchmarks/results/<name>.json."""
