"""Benchmarks (not part of the installed package): op and full-step timings and memory,
the original algorithm as a baseline; results are written to bench/results/."""
