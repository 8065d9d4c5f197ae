"""Benchmarks of vmtide (issue 6). Not tests: run them by hand, read the reports in docs/bench."""
