"""Benchmarks: run with `make bench`; results with date and machine in bench/RESULTS.md."""
