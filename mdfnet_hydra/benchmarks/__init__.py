"""Benchmarks: commands that print numbers and ratios measured in one run (never timed tests)."""
