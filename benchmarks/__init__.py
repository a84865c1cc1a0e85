"""Reproducible benchmarks; each module is one entry point writing JSON to benchmarks/results/."""
